"""Training the heatmap network: `train(config)` from plain Python, the CLI or Slicer.

    config = load_config("VertebraIDTrain/configs/phantoms_cpu.toml")
    result = train(config, resume=True)        # -> TrainResult (model file, history)

Data: phantoms generated on the fly (new seeds every epoch: the network never sees a case
twice) and, optionally, annotated folders (VerSe layout or generic case folders, read with
`datasets.iter_cases`). Each case is checked, block-averaged and HU-windowed exactly as in
inference (`inference.reduce_and_window`); patches are then resampled from it.

Patches and augmentation: a patch is MONAI `SpatialResample` of the case onto a random grid of
`patch_size` voxels at the model spacing, centred on a random vertebra (+- a quarter patch)
with probability `spine_fraction`, else anywhere in the scan (with `balance_regions`, the
vertebra's region C/T/L/S is drawn first, evenly among the case's). The grid carries the spatial
augmentation: small rotations, isotropic scaling and a left-right mirror (the spine's order
is untouched: no flips along the spine, no large rotations). The target, 26 Gaussian maps
(sigma in mm, peak `heatmap_height`, one channel per level; T13 and L6 have none) is rendered
directly on the patch grid from the true body centres, so image and target agree exactly
whatever the augmentation. Loader workers send only the blobs (centre in patch voxels, channel,
width; `sample_patch_blobs`) and `render_blob_targets` draws the maps where the network runs:
a dense 26-channel patch is ~100 MB at 96^3, and shipping it between processes was what
limited training on a GPU. Intensity augmentation (MONAI): noise, blur,
gamma, scale and shift, a bias field, thick-slice blur — texture and contrast randomisation that keeps bone
the brightest structure, aimed at closing the gap from phantoms to real scans.

Loss: mean squared error (the paper's L2) over all voxels and channels; optionally the blobs'
voxels weigh more (`foreground_weight`) and so may rarer regions' channels (`region_loss_weights`).

Validation runs the whole chain on held-out phantoms (seeds disjoint from training):
`inference.predict_heatmaps` -> `pipeline.locate` -> `metrics.evaluate_case`, and logs the id
rate (not only the loss) and, for the network alone, which channel fires on each vertebra (its
own level? a level of its region C/T/L/S?). TensorBoard logs go to `<output>/tensorboard`.

Checkpoints: after every epoch, `<output>/checkpoints/epoch-NNNN.safetensors` (weights and
optimiser tensors) and `.json` (epoch, step, non-tensor optimiser state, history, the
tensors' SHA-256; written last, so it is the commit point). A run killed at any moment
resumes from the newest intact checkpoint and loses at most the epoch in progress; data of
every epoch derives from (seed, epoch, index), so a resumed run sees the same data. The model
file `<output>/model.safetensors` (+ `.json`) is written after every epoch with the measured
validation metrics; `model-best.*` keeps the best id rate.

Several processes (torchrun, DistributedDataParallel): each rank takes its share of the
epoch's cases; rank 0 validates, logs and writes files. Backend gloo on CPU, nccl on GPU.
Mixed precision (float16 autocast + gradient scaling) on CUDA when `amp` is on.
"""
from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

import numpy as np

from .anatomy import LEVELS_26, NUM_CHANNELS, region
from .errors import VertebraIDError
from .fileio import atomic_path, write_json_atomic
from .network import NetworkConfig

PathLike = str | os.PathLike
CHANNEL_OF = {name: c for c, name in enumerate(LEVELS_26)}


# =========================================================================== configuration


@dataclass
class ModelSection:
    kind: str = "dynunet"
    channels: list = field(default_factory=lambda: [16, 32, 64, 128])
    spacing_mm: float = 4.0
    patch_size: int = 96
    sigma_mm: float = 6.0
    # Peak of the target blobs. A random network's outputs are O(1) everywhere; with unit-height
    # targets the cheapest first move is to shrink them all towards zero, and the sparse blobs
    # never pull back. Taller targets make the blobs dominate the loss; outputs are divided by it.
    heatmap_height: float = 1.0
    hu_window: list = field(default_factory=lambda: [-250.0, 1250.0])


@dataclass
class DataSection:
    phantoms_per_epoch: int = 32
    phantom_seed: int = 0
    phantom_options: dict = field(default_factory=dict)  # PhantomOptions fields; unset ones are random
    folders: list = field(default_factory=list)  # VerSe roots or folders of cases
    folder_cases_per_epoch: int = 0
    patches_per_case: int = 4
    spine_fraction: float = 0.85
    # Centre spine patches on a region (C, T, L, S) drawn evenly among those the case shows, then
    # on one of its vertebrae: with every vertebra equally likely, thoracic levels fill most
    # patches and an under-trained network answers with thoracic channels everywhere.
    balance_regions: bool = False


@dataclass
class AugmentSection:
    flip_lr: float = 0.5
    rotate_deg: list = field(default_factory=lambda: [10.0, 10.0, 15.0])  # about the R, A, S axes
    scale: list = field(default_factory=lambda: [0.85, 1.15])
    intensity: float = 1.0  # multiplies the probability of every intensity augmentation


@dataclass
class TrainSection:
    epochs: int = 40
    batch_size: int = 2
    learning_rate: float = 3e-4
    weight_decay: float = 1e-5
    warmup_steps: int = 50
    num_workers: int = 0
    amp: bool = True
    grad_clip: float = 5.0
    checkpoints_kept: int = 2
    # Targets are sparse blobs (a few hundred voxels of a patch per channel): with plain L2 a
    # network first learns to output zeros. Voxels weigh 1 + foreground_weight x target.
    foreground_weight: float = 0.0
    # Loss weight of each region's channels, e.g. {C = 2.0, S = 2.0}; unnamed regions weigh 1.
    # Per level, cervical and sacral blobs are ~4x rarer in the phantoms than thoracic ones.
    region_loss_weights: dict = field(default_factory=dict)
    init_from: str = ""  # a model file whose weights start the training (same [model]); "" = random
    max_minutes: float = 0.0  # stop (with a saved model and a validation) after the epoch that passes this; 0 = off


@dataclass
class ValidationSection:
    phantoms: int = 8
    seed: int = 1_000_000
    every: int = 1
    method: str = "exact"
    phantom_options: dict = field(default_factory=dict)


@dataclass
class TrainConfig:
    output_dir: str = "runs/vertebraid"
    seed: int = 0
    device: str = "auto"
    threads: int = 0  # CPU threads for torch; 0 = torch's default
    description: str = ""
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    augment: AugmentSection = field(default_factory=AugmentSection)
    train: TrainSection = field(default_factory=TrainSection)
    validation: ValidationSection = field(default_factory=ValidationSection)

    @property
    def network_config(self) -> NetworkConfig:
        return NetworkConfig(kind=self.model.kind, channels=tuple(self.model.channels))

    def to_dict(self) -> dict:
        return asdict(self)


_SECTIONS = {"model": ModelSection, "data": DataSection, "augment": AugmentSection, "train": TrainSection,
             "validation": ValidationSection}


def _build_section(cls, values: dict, where: str):
    if not isinstance(values, dict):
        raise VertebraIDError(f"Config section [{where}] must be a table of settings.")
    known = {f.name for f in fields(cls)}
    for key in values:
        if key not in known:
            raise VertebraIDError(f"Unknown setting '{key}' in [{where}]; known: {', '.join(sorted(known))}.")
    defaults = cls()
    out = {}
    for key, value in values.items():
        default = getattr(defaults, key)
        out[key] = _coerce(value, default, f"{where}.{key}")
    return cls(**{**asdict(defaults), **out})


def _coerce(value, default, name: str):
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise VertebraIDError(f"Setting {name} must be true or false, got {value!r}.")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or float(value) != int(value):
            raise VertebraIDError(f"Setting {name} must be a whole number, got {value!r}.")
        return int(value)
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise VertebraIDError(f"Setting {name} must be a number, got {value!r}.")
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise VertebraIDError(f"Setting {name} must be text, got {value!r}.")
        return value
    if isinstance(default, list):
        if not isinstance(value, list):
            raise VertebraIDError(f"Setting {name} must be a list, got {value!r}.")
        return value
    if isinstance(default, dict):
        if not isinstance(value, dict):
            raise VertebraIDError(f"Setting {name} must be a table, got {value!r}.")
        return value
    return value


def config_from_dict(data: dict, base_dir: PathLike | None = None) -> TrainConfig:
    """Validate a configuration (as read from TOML or JSON); relative paths are taken from `base_dir`."""
    if not isinstance(data, dict):
        raise VertebraIDError("A training configuration must be a table of settings.")
    top = {f.name for f in fields(TrainConfig)} - set(_SECTIONS)
    for key in data:
        if key not in top and key not in _SECTIONS:
            raise VertebraIDError(f"Unknown setting '{key}'; known: {', '.join(sorted(top | set(_SECTIONS)))}.")
    defaults = TrainConfig()
    kwargs = {k: _coerce(v, getattr(defaults, k), k) for k, v in data.items() if k in top}
    for name, cls in _SECTIONS.items():
        kwargs[name] = _build_section(cls, data.get(name, {}), name)
    config = TrainConfig(**kwargs)
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    out = Path(config.output_dir).expanduser()
    config.output_dir = str(out if out.is_absolute() else (base / out).resolve())
    if config.train.init_from:
        init = Path(config.train.init_from).expanduser()
        config.train.init_from = str(init if init.is_absolute() else (base / init).resolve())
    config.data.folders = [str(p if Path(p).is_absolute() else (base / p).resolve()) for p in
                           (Path(str(f)).expanduser() for f in config.data.folders)]
    validate_config(config)
    return config


def validate_config(config: TrainConfig) -> None:
    m, d, a, t, v = config.model, config.data, config.augment, config.train, config.validation
    net = config.network_config  # checks kind and channels
    if not 0.5 <= m.spacing_mm <= 10:
        raise VertebraIDError(f"model.spacing_mm must be between 0.5 and 10 mm, got {m.spacing_mm}.")
    if m.patch_size < 16 or m.patch_size % net.downsampling:
        raise VertebraIDError(f"model.patch_size must be at least 16 and a multiple of {net.downsampling}, got {m.patch_size}.")
    for name, weight in t.region_loss_weights.items():
        if name not in ("C", "T", "L", "S") or isinstance(weight, bool) or not isinstance(weight, (int, float)) \
                or not math.isfinite(weight) or weight <= 0:
            raise VertebraIDError(f"train.region_loss_weights takes regions C, T, L, S with positive numbers, "
                                  f"got {name} = {weight!r}.")
    if t.foreground_weight < 0:
        raise VertebraIDError(f"train.foreground_weight must be >= 0, got {t.foreground_weight}.")
    if not 0 < m.heatmap_height <= 1e4:
        raise VertebraIDError(f"model.heatmap_height must be in (0, 10000], got {m.heatmap_height}.")
    if t.init_from and not Path(t.init_from).is_file():
        raise VertebraIDError(f"train.init_from: the model file '{t.init_from}' does not exist.")
    if t.max_minutes < 0:
        raise VertebraIDError(f"train.max_minutes must be >= 0 (0 = no limit), got {t.max_minutes}.")
    if not 0.5 <= m.sigma_mm <= 50:
        raise VertebraIDError(f"model.sigma_mm must be between 0.5 and 50 mm, got {m.sigma_mm}.")
    if len(m.hu_window) != 2 or not all(isinstance(x, (int, float)) for x in m.hu_window) or m.hu_window[0] >= m.hu_window[1]:
        raise VertebraIDError("model.hu_window must be two numbers [low, high] with low < high (HU).")
    if d.phantoms_per_epoch < 0 or d.folder_cases_per_epoch < 0 or d.patches_per_case < 1:
        raise VertebraIDError("data: case counts must be >= 0 and patches_per_case >= 1.")
    if d.phantoms_per_epoch + d.folder_cases_per_epoch == 0:
        raise VertebraIDError("data: give phantoms_per_epoch or folders with folder_cases_per_epoch (no training data).")
    if d.folder_cases_per_epoch and not d.folders:
        raise VertebraIDError("data.folder_cases_per_epoch needs data.folders.")
    for folder in d.folders:
        if not Path(folder).exists():
            raise VertebraIDError(f"The data folder '{folder}' does not exist.")
    if not 0 <= d.spine_fraction <= 1 or not 0 <= a.flip_lr <= 1 or a.intensity < 0:
        raise VertebraIDError("spine_fraction and flip_lr must be in [0, 1], intensity >= 0.")
    if len(a.rotate_deg) != 3 or max(abs(float(r)) for r in a.rotate_deg) > 30:
        raise VertebraIDError("augment.rotate_deg must be three angles of at most 30 degrees (larger ones could reorder the spine).")
    if len(a.scale) != 2 or not 0.5 <= a.scale[0] <= a.scale[1] <= 2:
        raise VertebraIDError("augment.scale must be [low, high] with 0.5 <= low <= high <= 2.")
    if t.epochs < 1 or t.batch_size < 1 or t.learning_rate <= 0 or t.checkpoints_kept < 1 or t.num_workers < 0:
        raise VertebraIDError("train: epochs, batch_size and checkpoints_kept must be >= 1, learning_rate > 0.")
    from .pipeline import METHODS

    if v.method not in METHODS:
        raise VertebraIDError(f"validation.method must be one of {', '.join(METHODS)}.")
    if v.phantoms < 0 or v.every < 1:
        raise VertebraIDError("validation.phantoms must be >= 0 and validation.every >= 1.")
    train_seeds = (d.phantom_seed, d.phantom_seed + 2 * t.epochs * max(d.phantoms_per_epoch, 1))
    if v.phantoms and train_seeds[0] < v.seed + v.phantoms and v.seed < train_seeds[1]:
        raise VertebraIDError("validation.seed overlaps the training phantoms' seeds; choose seeds far apart.")
    if config.device not in ("auto", "cpu", "cuda"):
        raise VertebraIDError(f"device must be auto, cpu or cuda, got {config.device!r}.")


def load_config(path: PathLike) -> TrainConfig:
    """Read a TOML (.toml) or JSON (.json) training configuration."""
    path = Path(path)
    if not path.is_file():
        raise VertebraIDError(f"The training configuration '{path}' does not exist.")
    text = path.read_text()
    try:
        if path.suffix.lower() == ".toml":
            try:
                import tomllib
            except ImportError:  # Python 3.10
                raise VertebraIDError("TOML configurations need Python 3.11 or newer; use a JSON configuration.") from None
            data = tomllib.loads(text)
        elif path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            raise VertebraIDError(f"'{path.name}' is neither a .toml nor a .json configuration.")
    except VertebraIDError:
        raise
    except Exception as exc:  # tomllib.TOMLDecodeError, json.JSONDecodeError
        raise VertebraIDError(f"Cannot read the configuration '{path}': {exc}.") from None
    return config_from_dict(data, base_dir=path.parent)


# =========================================================================== data


@dataclass
class TrainingCase:
    """A case reduced and windowed as for inference, with the vertebrae that have a channel."""

    image: object  # Volume, float32 in [0, 1] (block-averaged, original orientation)
    positions: np.ndarray  # (N, 3) RAS mm
    channels: np.ndarray  # (N,) channel indices
    name: str


def make_training_case(ct, truth, name: str, config: TrainConfig) -> TrainingCase:
    from .inference import reduce_and_window

    reduced = reduce_and_window(ct, [config.model.spacing_mm] * 3, config.model.hu_window)
    keep = [v for v in (truth or []) if v.label in CHANNEL_OF and np.all(np.isfinite(v.position))]
    positions = np.array([v.position for v in keep], float).reshape(-1, 3)
    channels = np.array([CHANNEL_OF[v.label] for v in keep], int)
    return TrainingCase(reduced, positions, channels, name)


def weighted_l2(prediction, target, foreground_weight: float = 0.0, heatmap_height: float = 1.0,
                channel_weights=None):
    """The paper's L2 loss, optionally weighting voxels by 1 + foreground_weight x target / heatmap_height
    and each channel by `channel_weights` (C,)."""
    squared = (prediction - target) ** 2
    if foreground_weight > 0:
        squared = squared * (1.0 + (foreground_weight / heatmap_height) * target)
    if channel_weights is not None:
        squared = squared * channel_weights.to(squared.device, squared.dtype).view(1, -1, *([1] * (squared.ndim - 2)))
    return squared.mean()


def channel_loss_weights(region_weights: dict) -> np.ndarray | None:
    """Per-channel loss weights (26,) from per-region ones; None when every region weighs 1."""
    if not region_weights or all(float(w) == 1.0 for w in region_weights.values()):
        return None
    return np.array([float(region_weights.get(region(name), 1.0)) for name in LEVELS_26], np.float32)


def phantom_case(seed: int, config: TrainConfig, options: dict | None = None) -> TrainingCase:
    """One phantom as a training case; a seed whose options cannot be drawn falls back to the next."""
    from .phantom import generate_phantom

    opts = dict(config.data.phantom_options if options is None else options)
    last = None
    for attempt in range(5):
        s = seed + attempt * 7_919_993
        try:
            p = generate_phantom(s, **opts)
            return make_training_case(p.ct, p.truth, f"phantom-{s}", config)
        except VertebraIDError as exc:
            last = exc
    raise VertebraIDError(f"Phantom seeds from {seed} could not be generated with the configured options: {last}")


def _rotation(angles_deg) -> np.ndarray:
    ax, ay, az = np.radians(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def patch_affine(centre, patch_size: int, spacing_mm: float, rotation=np.eye(3), scale: float = 1.0,
                 flip_lr: bool = False) -> np.ndarray:
    """Voxel -> RAS affine of a patch grid centred on `centre` (rotation, scale, mirror)."""
    linear = rotation @ np.diag([-1.0 if flip_lr else 1.0, 1.0, 1.0]) * (spacing_mm * scale)
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = np.asarray(centre, float) - linear @ np.full(3, (patch_size - 1) / 2.0)
    return affine


def _intensity_transforms(config: TrainConfig):
    from monai.transforms import (
        Compose, RandAdjustContrast, RandBiasField, RandGaussianNoise, RandGaussianSmooth, RandScaleIntensity,
        RandShiftIntensity,
    )

    k = config.augment.intensity

    def p(x):
        return float(min(1.0, x * k))

    return Compose([
        RandBiasField(prob=p(0.15), coeff_range=(0.0, 0.15)),
        RandGaussianSmooth(prob=p(0.2), sigma_x=(0.3, 1.0), sigma_y=(0.3, 1.0), sigma_z=(0.3, 1.0)),
        # thick slices: blur along the patch's third axis, which stays close to the scanner's S axis
        RandGaussianSmooth(prob=p(0.2), sigma_x=(0.0, 0.2), sigma_y=(0.0, 0.2), sigma_z=(0.5, 1.5)),
        RandAdjustContrast(prob=p(0.3), gamma=(0.7, 1.5)),
        RandScaleIntensity(prob=p(0.3), factors=0.15),
        RandShiftIntensity(prob=p(0.3), offsets=0.08),
        RandGaussianNoise(prob=p(0.3), mean=0.0, std=0.04),
    ])


#: Blob rows per patch (a case has at most one vertebra per channel); unused rows have channel -1.
MAX_BLOBS = NUM_CHANNELS


def render_blob_targets(blobs, patch_size: int, heatmap_height: float):
    """Dense targets (B, 26, P, P, P) from blob rows (B, MAX_BLOBS, 5) = (i, j, k, channel, sigma in voxels).

    Torch, on the blobs' device. One blob per channel, so each map is a separable Gaussian.
    """
    import torch

    blobs = torch.as_tensor(blobs, dtype=torch.float32)
    batch = blobs.shape[0]
    axis = torch.arange(patch_size, device=blobs.device, dtype=torch.float32)
    target = torch.zeros((batch, NUM_CHANNELS, patch_size, patch_size, patch_size), device=blobs.device)
    valid = blobs[..., 3] >= 0
    if not bool(valid.any()):
        return target
    b, n = torch.nonzero(valid, as_tuple=True)
    rows = blobs[b, n]
    g = torch.exp(-((axis[None, None, :] - rows[:, :3, None]) ** 2) / (2.0 * rows[:, 4, None, None] ** 2))  # (M, 3, P)
    maps = heatmap_height * g[:, 0, :, None, None] * g[:, 1, None, :, None] * g[:, 2, None, None, :]
    target[b, rows[:, 3].long()] = maps
    return target


def centre_vertebra(channels: np.ndarray, rng: np.random.Generator, balance_regions: bool) -> int:
    """Index of the vertebra a spine patch is centred on: uniform, or uniform over regions first."""
    if not balance_regions:
        return int(rng.integers(len(channels)))
    regions = np.array([region(LEVELS_26[c]) for c in channels])
    present = np.unique(regions)
    return int(rng.choice(np.flatnonzero(regions == present[rng.integers(len(present))])))


def sample_patch(case: TrainingCase, config: TrainConfig, rng: np.random.Generator, intensity=None,
                 augment: bool = True):
    """(image (1, P, P, P), target (26, P, P, P), patch affine) as float32 arrays."""
    image, blobs, affine = sample_patch_blobs(case, config, rng, intensity, augment)
    target = render_blob_targets(blobs[None], config.model.patch_size, config.model.heatmap_height)[0]
    return image, target.numpy(), affine


def sample_patch_blobs(case: TrainingCase, config: TrainConfig, rng: np.random.Generator, intensity=None,
                       augment: bool = True):
    """(image (1, P, P, P), blobs (MAX_BLOBS, 5), patch affine): the compact form for loader workers."""
    import torch
    from monai.data import MetaTensor
    from monai.transforms import SpatialResample

    size = config.model.patch_size
    spacing = config.model.spacing_mm
    a = config.augment
    extent = size * spacing
    if len(case.positions) and rng.random() < config.data.spine_fraction:
        centre = case.positions[centre_vertebra(case.channels, rng, config.data.balance_regions)]
        centre = centre + rng.uniform(-0.25, 0.25, 3) * extent
    else:
        corners = case.image.corners_world()
        centre = rng.uniform(corners.min(0), corners.max(0))
    if augment:
        rotation = _rotation(rng.uniform(-1, 1, 3) * np.asarray(a.rotate_deg, float))
        scale = float(rng.uniform(a.scale[0], a.scale[1]))
        flip = bool(rng.random() < a.flip_lr)
    else:
        rotation, scale, flip = np.eye(3), 1.0, False
    affine = patch_affine(centre, size, spacing, rotation, scale, flip)
    source = MetaTensor(torch.from_numpy(np.ascontiguousarray(case.image.array, np.float32))[None],
                        affine=torch.as_tensor(case.image.affine, dtype=torch.float64))
    patch = SpatialResample(mode="bilinear", padding_mode="zeros", dtype=torch.float32)(
        source, dst_affine=torch.as_tensor(affine, dtype=torch.float64), spatial_size=(size, size, size)
    )
    image = patch.as_tensor() if hasattr(patch, "as_tensor") else patch
    if augment and intensity is not None:
        intensity.set_random_state(seed=int(rng.integers(2**31)))
        image = torch.as_tensor(intensity(image)).float()
    blobs = np.full((MAX_BLOBS, 5), -1.0, np.float32)
    if len(case.positions):
        # the patch grid is isotropic (rotation x uniform scale), so a round blob stays round in voxels
        voxel_mm = spacing * scale
        ijk = (case.positions - affine[:3, 3]) @ np.linalg.inv(affine[:3, :3]).T
        sigma = config.model.sigma_mm / voxel_mm
        near = np.all((ijk > -4 * sigma) & (ijk < size - 1 + 4 * sigma), axis=1)  # others add nothing
        rows = np.column_stack([ijk, case.channels, np.full(len(ijk), sigma)])[near][:MAX_BLOBS]
        blobs[:len(rows)] = rows
    return np.asarray(image, np.float32).reshape(1, size, size, size), blobs, affine


def load_folder_cases(folders, config: TrainConfig, log=print) -> list[TrainingCase]:
    """Every annotated case under the folders, reduced for training (cases that fail are skipped)."""
    from .datasets import iter_cases

    out = []
    for root in folders:
        try:
            for case in iter_cases(root):
                if case.image is None or not case.truth:
                    continue
                try:
                    out.append(make_training_case(case.image, case.truth, case.name, config))
                except VertebraIDError as exc:
                    log(f"skipping {case.name}: {exc}")
        except VertebraIDError as exc:
            log(f"skipping {root}: {exc}")
    return out


def _epoch_cases(config: TrainConfig, epoch: int, rank: int, world: int, num_folder_cases: int) -> list[tuple]:
    """This rank's cases of an epoch: ('phantom', seed) or ('folder', index); same count on every rank."""
    d = config.data
    per_rank = d.phantoms_per_epoch // world if world > 1 else d.phantoms_per_epoch
    seeds = [d.phantom_seed + epoch * d.phantoms_per_epoch + i for i in range(d.phantoms_per_epoch)]
    specs = [("phantom", s) for s in seeds[rank * per_rank:(rank + 1) * per_rank]]
    if d.folder_cases_per_epoch and num_folder_cases:
        rng = np.random.default_rng([config.seed, epoch, 17])
        chosen = rng.integers(num_folder_cases, size=d.folder_cases_per_epoch)
        per_rank_f = len(chosen) // world if world > 1 else len(chosen)
        specs += [("folder", int(i)) for i in chosen[rank * per_rank_f:(rank + 1) * per_rank_f]]
    order = np.random.default_rng([config.seed, epoch, rank, 29]).permutation(len(specs))
    return [specs[i] for i in order]


def _patch_stream_class():
    import torch

    class PatchStream(torch.utils.data.IterableDataset):
        """One epoch's patches for one rank; DataLoader workers split the cases between them."""

        def __init__(self, config, epoch, rank, world, folder_cases):
            self.config, self.epoch, self.rank, self.world = config, epoch, rank, world
            self.folder_cases = folder_cases
            self.specs = _epoch_cases(config, epoch, rank, world, len(folder_cases))

        def __len__(self):
            return len(self.specs) * self.config.data.patches_per_case

        def __iter__(self):
            info = torch.utils.data.get_worker_info()
            wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
            intensity = _intensity_transforms(self.config)
            for k, (kind, key) in enumerate(self.specs):
                if k % nw != wid:
                    continue
                case = phantom_case(key, self.config) if kind == "phantom" else self.folder_cases[key]
                for j in range(self.config.data.patches_per_case):
                    rng = np.random.default_rng([self.config.seed, self.epoch, self.rank, k, j])
                    image, blobs, _ = sample_patch_blobs(case, self.config, rng, intensity)
                    yield torch.from_numpy(image), torch.from_numpy(blobs)

    return PatchStream


# =========================================================================== checkpoints


def _checkpoint_dir(config: TrainConfig) -> Path:
    return Path(config.output_dir) / "checkpoints"


def save_checkpoint(config: TrainConfig, network, optimizer, scaler, state: dict) -> Path:
    """epoch-NNNN.safetensors (tensors) then epoch-NNNN.json (the rest + their checksum)."""
    from safetensors.torch import save_file

    from .network import sha256_file, weights_state

    folder = _checkpoint_dir(config)
    folder.mkdir(parents=True, exist_ok=True)
    stem = folder / f"epoch-{state['epoch']:04d}"
    tensors = {f"model.{k}": v for k, v in weights_state(network).items()}
    opt = optimizer.state_dict()
    opt_plain: dict = {"param_groups": opt["param_groups"], "state": {}}
    for pid, entries in opt["state"].items():
        for name, value in entries.items():
            if hasattr(value, "detach"):
                tensors[f"optimizer.{pid}.{name}"] = value.detach().to("cpu").contiguous()
            else:
                opt_plain["state"].setdefault(str(pid), {})[name] = value
    with atomic_path(stem.with_suffix(".safetensors")) as tmp:
        save_file(tensors, str(tmp))
        digest = sha256_file(tmp)
    record = {**state, "tensors_sha256": digest, "optimizer": opt_plain,
              "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
              "model_config": asdict(config.model)}
    write_json_atomic(stem.with_suffix(".json"), json.loads(json.dumps(record, default=float)))
    kept = sorted(folder.glob("epoch-*.json"))
    for old in kept[: -config.train.checkpoints_kept]:
        for p in (old, old.with_suffix(".safetensors")):
            p.unlink(missing_ok=True)
    return stem.with_suffix(".json")


def latest_checkpoint(config: TrainConfig) -> tuple[dict, Path] | None:
    """The newest checkpoint whose JSON reads and whose tensors match their checksum."""
    from .network import sha256_file

    folder = _checkpoint_dir(config)
    for meta_path in sorted(folder.glob("epoch-*.json"), reverse=True):
        tensors = meta_path.with_suffix(".safetensors")
        try:
            record = json.loads(meta_path.read_text())
            if tensors.is_file() and sha256_file(tensors) == record.get("tensors_sha256"):
                return record, tensors
        except (OSError, ValueError):
            continue
    return None


def load_checkpoint(record: dict, tensors_path: Path, network, optimizer, scaler) -> None:
    from safetensors.torch import load_file

    from .network import load_weights_state

    tensors = load_file(str(tensors_path))
    load_weights_state(network, {k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    opt_state: dict = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, pid, name = key.split(".", 2)
            opt_state.setdefault(int(pid), {})[name] = value
    for pid, entries in record["optimizer"]["state"].items():
        opt_state.setdefault(int(pid), {}).update(entries)
    optimizer.load_state_dict({"state": opt_state, "param_groups": record["optimizer"]["param_groups"]})
    if scaler is not None and record.get("scaler"):
        scaler.load_state_dict(record["scaler"])


# =========================================================================== validation


def validation_cases(config: TrainConfig) -> list[tuple]:
    """(name, ct, truth) of the held-out phantoms."""
    from .phantom import generate_phantom

    v = config.validation
    opts = v.phantom_options or config.data.phantom_options
    out = []
    for i in range(v.phantoms):
        p = generate_phantom(v.seed + i, **opts)
        out.append((f"phantom-{v.seed + i}", p.ct, p.truth))
    return out


def level_peak_errors(heatmaps, truth) -> list[float]:
    """Distance (mm) from each true vertebra to the maximum of its own level's map."""
    errors = []
    for v in truth:
        c = CHANNEL_OF.get(v.label)
        if c is None or not np.all(np.isfinite(v.position)):
            continue
        channel = heatmaps.array[..., c]
        ijk = np.array(np.unravel_index(int(np.argmax(channel)), channel.shape), float)
        peak = heatmaps.affine[:3, :3] @ ijk + heatmaps.affine[:3, 3]
        errors.append(float(np.linalg.norm(peak - np.asarray(v.position, float))))
    return errors


def strongest_levels(heatmaps, truth, radius_mm: float = 6.0) -> list[tuple[str, str]]:
    """(true level, level whose map is highest within `radius_mm` of its centre) per vertebra in view.

    The network alone, before any optimiser: whether a vertebra's own channel is the one that
    fires on it, or which region's channels do instead.
    """
    spacing = heatmaps.spacing
    out = []
    for v in truth:
        if v.label not in CHANNEL_OF or not np.all(np.isfinite(v.position)):
            continue
        ijk = heatmaps.world_to_voxel(np.asarray(v.position, float)[None])[0]
        reach = radius_mm / spacing
        lo = np.maximum(np.ceil(ijk - reach).astype(int), 0)
        hi = np.minimum(np.floor(ijk + reach).astype(int), np.array(heatmaps.shape3) - 1)
        if np.any(hi < lo):
            continue
        grids = np.meshgrid(*(np.arange(lo[a], hi[a] + 1) for a in range(3)), indexing="ij")
        offsets = np.stack([g - ijk[a] for a, g in enumerate(grids)], axis=-1) * spacing
        inside = np.linalg.norm(offsets, axis=-1) <= radius_mm
        if not inside.any():
            continue
        box = heatmaps.array[lo[0]: hi[0] + 1, lo[1]: hi[1] + 1, lo[2]: hi[2] + 1]
        out.append((v.label, LEVELS_26[int(np.argmax(box[inside].max(axis=0)))]))
    return out


def strongest_channel_rates(pairs: list[tuple[str, str]]) -> dict:
    """From `strongest_levels`: the share whose strongest channel is their own level, and per
    true region the share whose strongest channel lies in that region (None where none)."""
    rates = {"channel_level_right": float(np.mean([t == s for t, s in pairs])) if pairs else None}
    for name in ("C", "T", "L", "S"):
        hits = [region(s) == name for t, s in pairs if region(t) == name]
        rates[f"channel_region_right_{name}"] = float(np.mean(hits)) if hits else None
    return rates


def validate(network, metadata: dict, cases, config: TrainConfig, device) -> dict:
    """Id rate through the whole pipeline: network -> locate -> metrics."""
    from .metrics import evaluate_case, summarize
    from .network import Model
    from .pipeline import LocateOptions, locate
    from .inference import predict_heatmaps

    module = getattr(network, "module", network)
    was_training = module.training
    model = Model(module.eval(), metadata, device, None, config.network_config)
    options = LocateOptions(method=config.validation.method, sigma_mm=config.model.sigma_mm)
    evaluations, peak_errors, strongest = [], [], []
    t0 = time.perf_counter()
    for name, ct, truth in cases:
        heatmaps = predict_heatmaps(ct, model, str(device))
        peak_errors += level_peak_errors(heatmaps, truth)
        strongest += strongest_levels(heatmaps, truth)
        result = locate(heatmaps, options)
        evaluations.append(evaluate_case(result.vertebrae, truth, name=name))
    module.train(was_training)
    summary = summarize(evaluations)
    overall = summary.regions["all"]
    return {
        "id_rate": overall.id_rate,
        "error_mean_mm": overall.error_mean_mm,
        "all_correct_rate": summary.all_correct_rate,
        "num_scans": summary.num_scans,
        "num_vertebrae": overall.num_gt,
        # the network alone: how often a level's map peaks within 10 mm of that vertebra
        "level_peak_within_10mm": float(np.mean(np.asarray(peak_errors) <= 10.0)) if peak_errors else None,
        # which channel fires on each vertebra (its own level? its own region?)
        **strongest_channel_rates(strongest),
        "seconds": time.perf_counter() - t0,
    }


# =========================================================================== training loop


@dataclass
class TrainResult:
    output_dir: Path
    model_path: Path | None
    epochs_done: int
    resumed_from: int | None
    history: list = field(default_factory=list)


def _initialise_from(network, config: TrainConfig) -> None:
    """Start from a model file's weights (checksum-verified); its architecture and grid must match."""
    from .network import load_model, load_weights_state, weights_state

    source = load_model(config.train.init_from, "cpu")
    m = config.model
    mismatch = [name for name, ours, theirs in (
        ("network", config.network_config.to_dict(), source.config.to_dict()),
        ("spacing_mm", [float(m.spacing_mm)] * 3, list(source.spacing_mm)),
        ("sigma_mm", float(m.sigma_mm), source.sigma_mm),
        ("heatmap_height", float(m.heatmap_height), source.heatmap_height),
        ("hu_window", [float(v) for v in m.hu_window], list(source.hu_window)),
    ) if ours != theirs]
    if mismatch:
        raise VertebraIDError(f"train.init_from '{config.train.init_from}' differs in {', '.join(mismatch)} from [model].")
    load_weights_state(network, weights_state(source.network))


def _learning_rate(config: TrainConfig, step: int, total: int, elapsed_s: float = 0.0) -> float:
    """Warm-up, then a cosine decay over the planned steps, or over max_minutes when that ends first."""
    t = config.train
    warm = min(1.0, (step + 1) / max(t.warmup_steps, 1))
    done = step / max(total, 1)
    if t.max_minutes:
        done = max(done, elapsed_s / (60.0 * t.max_minutes))
    return t.learning_rate * warm * 0.5 * (1.0 + math.cos(math.pi * min(done, 1.0)))


def train_step(model, optimizer, scaler, image, blobs, config: TrainConfig, device, amp: bool):
    """One optimiser step on a batch from the loader (images and blob rows); returns the loss tensor."""
    import torch

    image = image.to(device, non_blocking=True)
    target = render_blob_targets(blobs.to(device, non_blocking=True), config.model.patch_size,
                                 config.model.heatmap_height)
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.float16, enabled=amp):
        prediction = model(image)
    weights = channel_loss_weights(config.train.region_loss_weights)
    loss = weighted_l2(prediction.float(), target, config.train.foreground_weight, config.model.heatmap_height,
                       None if weights is None else torch.from_numpy(weights))
    if scaler is not None and amp:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.train.grad_clip)
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.train.grad_clip)
        optimizer.step()
    return loss


def _distributed(device_kind: str):
    """(rank, world, initialised_here) from torchrun's environment."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, False
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), True


def train(config: TrainConfig | PathLike, resume: bool = False, progress: Callable | None = None,
          show_progress: bool = True, log: Callable = print) -> TrainResult:
    """Train (or resume) as configured; returns where the model is. `progress(fraction, message)`
    returning True cancels (`pipeline.Cancelled`) after the last completed epoch's checkpoint."""
    import torch
    import torch.distributed as dist
    from tqdm import tqdm

    from .network import build_network, make_metadata, resolve_device, save_model
    from .pipeline import Cancelled

    if not isinstance(config, TrainConfig):
        config = load_config(config)
    config = copy.deepcopy(config)
    out = Path(config.output_dir)
    device = resolve_device(config.device)
    rank, world, own_group = _distributed(device.type)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
    main = rank == 0
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        if not resume and latest_checkpoint(config) is not None:
            raise VertebraIDError(
                f"'{out}' already holds checkpoints; resume them (--resume) or choose another output_dir."
            )
        torch.manual_seed(config.seed)
        network = build_network(config.network_config)
        if config.train.init_from and not resume:
            _initialise_from(network, config)
        network = network.to(device)
        optimizer = torch.optim.AdamW(network.parameters(), lr=config.train.learning_rate,
                                      weight_decay=config.train.weight_decay)
        amp = device.type == "cuda" and config.train.amp
        scaler = torch.amp.GradScaler("cuda", enabled=amp) if device.type == "cuda" else None
        start_epoch, step, history, best, resumed_from = 0, 0, [], None, None
        found = latest_checkpoint(config) if resume else None
        if found is not None:
            record, tensors = found
            if record.get("model_config") != asdict(config.model):
                raise VertebraIDError("The checkpoint was trained with other [model] settings; it cannot be resumed.")
            load_checkpoint(record, tensors, network, optimizer, scaler)
            start_epoch, step = int(record["epoch"]), int(record["step"])
            history, best = list(record.get("history", [])), record.get("best")
            resumed_from = start_epoch
            if main:
                log(f"Resuming after epoch {start_epoch} (step {step}) from {tensors.name}.")
        elif resume and main:
            log("No checkpoint to resume; starting from scratch.")
        model = torch.nn.parallel.DistributedDataParallel(network) if world > 1 else network

        folder_cases = load_folder_cases(config.data.folders, config, log) if config.data.folders else []
        if config.data.folder_cases_per_epoch and not folder_cases and config.data.phantoms_per_epoch == 0:
            raise VertebraIDError("The data folders hold no annotated case to train on.")
        val_cases = validation_cases(config) if main and config.validation.phantoms else []
        PatchStream = _patch_stream_class()
        per_epoch = len(PatchStream(config, 0, rank, world, folder_cases))
        batches_per_epoch = math.ceil(per_epoch / config.train.batch_size)
        total_steps = batches_per_epoch * config.train.epochs
        writer = None
        if main:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(out / "tensorboard"), purge_step=step if resumed_from else None)
        metadata_base = dict(
            spacing_mm=config.model.spacing_mm, patch_size=config.model.patch_size, sigma_mm=config.model.sigma_mm,
            hu_window=config.model.hu_window, heatmap_height=config.model.heatmap_height,
        )
        model_path = out / "model.safetensors" if (out / "model.safetensors").exists() else None
        run_start = time.perf_counter()
        for epoch in range(start_epoch, config.train.epochs):
            model.train()
            stream = PatchStream(config, epoch, rank, world, folder_cases)
            workers = config.train.num_workers
            loader = torch.utils.data.DataLoader(stream, batch_size=config.train.batch_size, num_workers=workers,
                                                 pin_memory=device.type == "cuda",
                                                 prefetch_factor=4 if workers else None)
            bar = tqdm(loader, total=batches_per_epoch, desc=f"epoch {epoch + 1}/{config.train.epochs}",
                       disable=not (main and show_progress), leave=False)
            t0, seen, loss_sum, batches = time.perf_counter(), 0, 0.0, 0
            for image, blobs in bar:
                lr = _learning_rate(config, step, total_steps, time.perf_counter() - run_start)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                loss = train_step(model, optimizer, scaler, image, blobs, config, device, amp)
                step += 1
                batches += 1
                seen += image.shape[0]
                loss_sum += float(loss.detach())
                bar.set_postfix(loss=f"{float(loss.detach()):.5f}")
                if writer is not None:
                    writer.add_scalar("train/loss", float(loss.detach()), step)
                    writer.add_scalar("train/lr", lr, step)
                if progress is not None and main:
                    fraction = (epoch + batches / max(batches_per_epoch, 1)) / config.train.epochs
                    if progress(fraction, f"Epoch {epoch + 1}/{config.train.epochs}, loss {float(loss.detach()):.5f}"):
                        raise Cancelled("Training cancelled")
            seconds = time.perf_counter() - t0
            entry = {"epoch": epoch + 1, "step": step, "loss": loss_sum / max(batches, 1),
                     "patches_per_s": seen * world / max(seconds, 1e-9), "seconds": seconds,
                     "patches": seen * world,
                     "phantoms": sum(kind == "phantom" for kind, _ in stream.specs) * world}
            out_of_time = _out_of_time(config, run_start, world, device)
            last = out_of_time or epoch + 1 == config.train.epochs
            if main and val_cases and ((epoch + 1) % config.validation.every == 0 or last):
                metadata = make_metadata(config.network_config, **metadata_base)
                entry["validation"] = validate(model, metadata, val_cases, config, device)
            if main:
                history.append(entry)
                if writer is not None:
                    writer.add_scalar("epoch/loss", entry["loss"], step)
                    writer.add_scalar("epoch/patches_per_s", entry["patches_per_s"], step)
                    for key, value in entry.get("validation", {}).items():
                        if value is not None:
                            writer.add_scalar(f"validation/{key}", value, step)
                    writer.flush()
                val = entry.get("validation", {})
                improved = val.get("id_rate") is not None and (best is None or val["id_rate"] >= best["id_rate"])
                if improved:
                    best = {"epoch": epoch + 1, "id_rate": val["id_rate"]}
                metadata = make_metadata(
                    config.network_config, **metadata_base,
                    training=_training_description(config, epoch + 1, step, history),
                    metrics={"validation": val, "train_loss": entry["loss"], "epoch": epoch + 1},
                )
                model_path, _ = save_model(network, metadata, out / "model.safetensors")
                if improved:
                    save_model(network, metadata, out / "model-best.safetensors")
                save_checkpoint(config, network, optimizer, scaler,
                                {"epoch": epoch + 1, "step": step, "history": history, "best": best,
                                 "config": config.to_dict()})
                message = f"epoch {epoch + 1}: loss {entry['loss']:.5f}, {entry['patches_per_s']:.2f} patches/s"
                if "id_rate" in val and val["id_rate"] is not None:
                    message += f", validation id rate {100 * val['id_rate']:.1f} %"
                if val.get("level_peak_within_10mm") is not None:
                    message += f", level peaks within 10 mm {100 * val['level_peak_within_10mm']:.1f} %"
                if val.get("channel_level_right") is not None:
                    by_region = " / ".join(f"{r} {100 * val[f'channel_region_right_{r}']:.0f}"
                                           for r in "CTLS" if val.get(f"channel_region_right_{r}") is not None)
                    message += (f", strongest channel on a vertebra: its level {100 * val['channel_level_right']:.1f} %, "
                                f"its region {by_region} %")
                log(message)
            if world > 1:
                dist.barrier()
            if out_of_time:
                if main:
                    log(f"Stopping after epoch {epoch + 1}: train.max_minutes ({config.train.max_minutes}) reached.")
                break
        if writer is not None:
            writer.close()
        epochs_done = history[-1]["epoch"] if history else start_epoch
        return TrainResult(out, model_path if main else None, epochs_done, resumed_from, history)
    finally:
        if own_group and dist.is_initialized():
            dist.destroy_process_group()


def _out_of_time(config: TrainConfig, run_start: float, world: int, device) -> bool:
    """Whether train.max_minutes has passed; with several processes, rank 0's clock decides for all."""
    if not config.train.max_minutes:
        return False
    import torch
    import torch.distributed as dist

    flag = torch.tensor([float(time.perf_counter() - run_start > 60.0 * config.train.max_minutes)], device=device)
    if world > 1:
        dist.broadcast(flag, src=0)
    return bool(flag.item())


def _training_description(config: TrainConfig, epochs: int, steps: int, history: list) -> dict:
    """What a model file says about its training; counts come from the history (resumed runs included)."""
    d = config.data
    return {
        "description": config.description,
        "epochs": epochs,
        "steps": steps,
        "phantoms_seen": sum(int(e.get("phantoms", d.phantoms_per_epoch)) for e in history),
        "patches_seen": sum(int(e.get("patches", 0)) for e in history),
        "training_seconds": round(sum(float(e.get("seconds", 0.0)) for e in history), 1),
        "init_from": config.train.init_from,
        "phantom_seeds_from": d.phantom_seed,
        "phantom_options": d.phantom_options,
        "folders": d.folders,
        "folder_cases_per_epoch": d.folder_cases_per_epoch,
        "patches_per_case": d.patches_per_case,
        "spine_fraction": d.spine_fraction,
        "balance_regions": d.balance_regions,
        "augment": asdict(config.augment),
        "train": asdict(config.train),
        "validation": {k: v for k, v in asdict(config.validation).items()},
    }
