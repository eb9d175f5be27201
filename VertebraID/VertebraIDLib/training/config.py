"""A training run's configuration: a TOML (or JSON) file of sections, validated on reading.

    config = load_config("VertebraIDTrain/configs/phantoms_cpu.toml")

Sections: [model] (network, grid, targets), [data] (phantoms, annotated folders, patches),
[augment], [train] (optimiser, schedule, time budget) and [validation]; `config_from_dict`
refuses unknown keys and values of the wrong type with one sentence.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ..engine.settings import METHODS
from ..errors import VertebraIDError
from ..io.files import PathLike
from ..networks.heatmap import NetworkConfig


@dataclass
class ModelSection:
    """[model]: the network, its grid and targets."""

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
    """[data]: phantoms, annotated folders and patches."""

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
    """[augment]: spatial and intensity augmentation."""

    flip_lr: float = 0.5
    rotate_deg: list = field(default_factory=lambda: [10.0, 10.0, 15.0])  # about the R, A, S axes
    scale: list = field(default_factory=lambda: [0.85, 1.15])
    intensity: float = 1.0  # multiplies the probability of every intensity augmentation


@dataclass
class TrainSection:
    """[train]: optimiser, schedule, time budget and checkpoints."""

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
    """[validation]: held-out phantoms and how often."""

    phantoms: int = 8
    seed: int = 1_000_000
    every: int = 1
    method: str = "exact"
    phantom_options: dict = field(default_factory=dict)


@dataclass
class TrainConfig:
    """A whole training run's configuration."""

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
        """The configuration as plain data (stored in checkpoints)."""
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
    """One sentence for any inconsistent setting (patch size, seeds, augmentation...)."""
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
