"""Training data of the heatmap network: cases, patches and their targets.

A case (a phantom or an annotated scan) is checked, block-averaged and HU-windowed exactly as in
inference (`networks.preprocess.reduce_and_window`); patches are then resampled from it on a
random grid (rotation, scale, mirror) and the 26 Gaussian targets are rendered on that grid
from the true body centres, so image and target agree exactly whatever the augmentation.
Loader workers send only the blobs (`sample_patch_blobs`); `render_blob_targets` draws the
maps where the network runs.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..engine.anatomy import CHANNEL_OF, LEVELS_26, NUM_CHANNELS, region
from ..errors import VertebraIDError
from ..io.cases import iter_cases
from ..networks.preprocess import reduce_and_window
from ..synthetic.phantom import generate_phantom
from .config import TrainConfig


@dataclass
class TrainingCase:
    """A case reduced and windowed as for inference, with the vertebrae that have a channel."""

    image: object  # Volume, float32 in [0, 1] (block-averaged, original orientation)
    positions: np.ndarray  # (N, 3) RAS mm
    channels: np.ndarray  # (N,) channel indices
    name: str


def make_training_case(ct, truth, name: str, config: TrainConfig) -> TrainingCase:
    """A CT and its truth as a training case (reduced and windowed as for inference)."""
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
        Compose,
        RandAdjustContrast,
        RandBiasField,
        RandGaussianNoise,
        RandGaussianSmooth,
        RandScaleIntensity,
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
