"""The heatmap network (paper §3.1) and its model files.

    config = NetworkConfig()                          # DynUNet, filters (16, 32, 64, 128)
    net = build_network(config)                       # 1 input channel (windowed CT) -> 26 maps
    save_model(net, metadata, "model.safetensors")   # + model.json beside it
    model = load_model("model.safetensors", "auto")  # -> Model(network, metadata, device)

Choices, and why:
- MONAI's DynUNet (the nnU-Net architecture): 3x3x3 kernels, instance norm, leaky ReLU; four
  levels with filters (16, 32, 64, 128) and strides (1, 2, 2, 2) by default. The paper regresses
  26 Gaussian maps with an L2 loss; a plain linear output (no activation) does that. Small on
  purpose (~1.2 M parameters): with 4 mm voxels and 96^3 patches (38 cm of context, enough to
  see several vertebrae and the ribs or pelvis that name them) it trains on a CPU.
- A model is two files: `<name>.safetensors` (weights only: safetensors holds plain tensors
  and cannot execute code) and `<name>.json` (metadata: labels, spacing, patch size, sigma, HU
  window, network config, training data, measured metrics, version, and the SHA-256 of the
  weights file). Loading checks the checksum before reading the weights; a pickle or a
  PyTorch checkpoint offered as a model is recognised by its first bytes and refused. Nothing
  here ever calls `torch.load`.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .anatomy import LEVELS_26, NUM_CHANNELS
from .errors import VertebraIDError
from .fileio import atomic_path, write_json_atomic

MODEL_FORMAT = "vertebraid-heatmap-model"
MODEL_FORMAT_VERSION = 1
NETWORK_KINDS = ("dynunet", "basicunet")
#: Where the bundled model lives (the default of `vertebraid detect` and the Slicer module): in the
#: source tree and the Slicer extension, and where a wheel (`pip install .`) puts it (pyproject's data-files).
MODELS_DIR = Path(__file__).resolve().parents[1] / "Resources" / "Models"
INSTALLED_MODELS_DIR = Path(sys.prefix) / "share" / "vertebraid" / "models"
BUNDLED_MODEL_NAME = "vertebraid.safetensors"

PathLike = str | os.PathLike
#: Keys of a model metadata's "engine" table -> the LocateOptions fields they set.
ENGINE_SETTINGS = {"evidence_weight": "evidence_weight", "evidence_floor": "evidence_floor",
                   "centreline_threshold": "threshold", "confidence_temperature": "confidence_temperature",
                   "gap_fraction_min": "gap_fraction_min"}


@dataclass(frozen=True)
class NetworkConfig:
    """Architecture of the heatmap network (stored in every model file's metadata)."""

    kind: str = "dynunet"
    channels: tuple = (16, 32, 64, 128)  # filters per level; len = number of levels
    in_channels: int = 1
    out_channels: int = NUM_CHANNELS
    dropout: float = 0.0

    def __post_init__(self):
        if self.kind not in NETWORK_KINDS:
            raise VertebraIDError(f"Unknown network kind '{self.kind}'; choose {' or '.join(NETWORK_KINDS)}.")
        try:
            channels = tuple(int(c) for c in self.channels)
        except (TypeError, ValueError):
            raise VertebraIDError(f"Network channels must be whole numbers, got {self.channels!r}.") from None
        if len(channels) < 3 or min(channels) < 1:
            raise VertebraIDError("A network needs at least 3 levels of positive channel counts.")
        if self.kind == "basicunet" and len(channels) != 6:
            raise VertebraIDError("MONAI's BasicUNet takes exactly 6 channel counts.")
        object.__setattr__(self, "channels", channels)
        if not 0.0 <= float(self.dropout) < 1.0:
            raise VertebraIDError(f"Dropout must be in [0, 1), got {self.dropout}.")

    @property
    def downsampling(self) -> int:
        """Patch sizes must be multiples of this."""
        return 2 ** (len(self.channels) - 1) if self.kind == "dynunet" else 16

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channels"] = list(self.channels)
        return d

    @classmethod
    def from_dict(cls, data: dict) -> "NetworkConfig":
        if not isinstance(data, dict):
            raise VertebraIDError("The network configuration must be a table of settings.")
        known = {"kind", "channels", "in_channels", "out_channels", "dropout"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise VertebraIDError(f"Unknown network setting '{unknown[0]}'; known: {', '.join(sorted(known))}.")
        return cls(**data)


def build_network(config: NetworkConfig = NetworkConfig()):
    """A MONAI 3-D U-Net: (B, 1, X, Y, Z) windowed CT -> (B, 26, X, Y, Z) Gaussian maps."""
    if config.kind == "basicunet":
        from monai.networks.nets import BasicUNet

        return BasicUNet(3, config.in_channels, config.out_channels, features=config.channels, dropout=config.dropout)
    from monai.networks.nets import DynUNet

    levels = len(config.channels)
    return DynUNet(
        spatial_dims=3,
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        kernel_size=[3] * levels,
        strides=[1] + [2] * (levels - 1),
        upsample_kernel_size=[2] * (levels - 1),
        filters=list(config.channels),
        dropout=config.dropout or None,
        norm_name=("INSTANCE", {"affine": True}),
        res_block=True,
    )


def count_parameters(network) -> int:
    return int(sum(p.numel() for p in network.parameters()))


# --------------------------------------------------------------------------- devices


def resolve_device(device: str = "auto"):
    """'auto' -> CUDA when available, else CPU; 'cuda' without a GPU is an error."""
    import torch

    name = str(device or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise VertebraIDError("CUDA was requested but no CUDA GPU is available; use --device cpu or auto.")
        return torch.device(name)
    raise VertebraIDError(f"Unknown device '{device}'; choose auto, cpu or cuda.")


# --------------------------------------------------------------------------- model files


@dataclass
class Model:
    """A loaded network with its metadata; the preprocessing settings come from the metadata."""

    network: object  # torch.nn.Module, in eval mode, on `device`
    metadata: dict
    device: object = None
    path: Path | None = None
    config: NetworkConfig = field(default_factory=NetworkConfig)
    # the level labeller (labeller.py) when the metadata names one: (network, LabellerConfig)
    labeller: tuple | None = None

    @property
    def spacing_mm(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in self.metadata["spacing_mm"])

    @property
    def patch_size(self) -> tuple[int, int, int]:
        return tuple(int(v) for v in self.metadata["patch_size"])

    @property
    def sigma_mm(self) -> float:
        return float(self.metadata["sigma_mm"])

    @property
    def heatmap_height(self) -> float:
        """Peak value of the training targets; outputs are divided by it (older models: 1)."""
        return float(self.metadata.get("heatmap_height", 1.0))

    @property
    def locate_settings(self) -> dict:
        """LocateOptions fields for this model's maps: σ, and what its metadata's "engine" table sets.

        A network's peaks need not reach the targets' height, nor be equally tall along the
        spine; `bench/tune_engine.py` picks the optimiser's α and floor and the centreline's
        threshold on validation phantoms and stores them there.
        """
        engine = self.metadata.get("engine") or {}
        settings = {"sigma_mm": self.sigma_mm}
        for key, field_name in ENGINE_SETTINGS.items():
            if engine.get(key) is not None:
                settings[field_name] = engine[key]
        return settings

    @property
    def hu_window(self) -> tuple[float, float]:
        lo, hi = self.metadata["normalization"]["hu_window"]
        return float(lo), float(hi)


def model_paths(path: PathLike) -> tuple[Path, Path]:
    """(weights, metadata) of a model given either file: 'm.safetensors' <-> 'm.json'."""
    p = Path(path)
    if p.suffix.lower() == ".json":
        return p.with_suffix(".safetensors"), p
    return p, p.with_suffix(".json")


def bundled_model_path() -> Path | None:
    for folder in (MODELS_DIR, INSTALLED_MODELS_DIR):
        if (folder / BUNDLED_MODEL_NAME).is_file():
            return folder / BUNDLED_MODEL_NAME
    return None


def default_model_path() -> Path:
    """The bundled model, or a clear error while none is installed."""
    p = bundled_model_path()
    if p is None:
        raise VertebraIDError(
            f"No bundled model is installed ({MODELS_DIR} and {INSTALLED_MODELS_DIR} hold no {BUNDLED_MODEL_NAME}); "
            "give a model with --model (train one with `vertebraid train CONFIG`)."
        )
    return p


def sha256_file(path: PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def make_metadata(
    config: NetworkConfig,
    *,
    spacing_mm,
    patch_size,
    sigma_mm: float,
    hu_window,
    heatmap_height: float = 1.0,
    training: dict | None = None,
    metrics: dict | None = None,
    **extra,
) -> dict:
    """The metadata a model file carries (weights checksum added by `save_model`)."""
    from . import __version__ as package_version

    spacing = [float(v) for v in (spacing_mm if hasattr(spacing_mm, "__len__") else [spacing_mm] * 3)]
    patch = [int(v) for v in (patch_size if hasattr(patch_size, "__len__") else [patch_size] * 3)]
    return {
        "format": MODEL_FORMAT,
        "format_version": MODEL_FORMAT_VERSION,
        "vertebraid_version": package_version,
        "labels": list(LEVELS_26),
        "spacing_mm": spacing,
        "patch_size": patch,
        "sigma_mm": float(sigma_mm),
        "heatmap_height": float(heatmap_height),
        "normalization": {
            "hu_window": [float(hu_window[0]), float(hu_window[1])],
            "description": "HU clipped to the window and scaled linearly to [0, 1]",
            "orientation": "RAS",
        },
        "network": config.to_dict(),
        "training": training or {},
        "metrics": metrics or {},
        **extra,
    }


def save_model(network, metadata: dict, path: PathLike) -> tuple[Path, Path]:
    """Write weights (safetensors) and metadata (JSON, with the weights' SHA-256), atomically."""
    weights_path, meta_path = model_paths(path)
    digest = write_weights(weights_state(network), weights_path, MODEL_FORMAT)
    meta = dict(metadata)
    meta["weights_file"] = weights_path.name
    meta["weights_sha256"] = digest
    write_json_atomic(meta_path, meta)
    return weights_path, meta_path


def write_weights(state: dict, path: Path, file_format: str) -> str:
    """Tensors to a safetensors file, atomically; returns the file's SHA-256."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"format": file_format})
        os.chmod(tmp, 0o644)  # save_file creates a new file with the temporary's 0600 mode
        digest = sha256_file(tmp)
    return digest


def read_weights(path: Path, sha256: str, what: str) -> dict:
    """The tensors of a safetensors file whose SHA-256 matches; `what` names it in errors."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    _refuse_pickle(path)
    if sha256_file(path) != str(sha256).lower():
        raise VertebraIDError(
            f"The {what} '{path.name}' does not match its checksum: the file is corrupt or was modified."
        )
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise VertebraIDError(f"The {what} '{path.name}' is not a readable safetensors file.") from exc


def weights_state(network) -> dict:
    """The network's tensors by name, each stored once (DynUNet reaches some layers by two names)."""
    module = getattr(network, "module", network)  # DistributedDataParallel wraps the network
    unique = {name for name, _ in module.named_parameters()} | {name for name, _ in module.named_buffers()}
    return {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items() if k in unique}


def load_weights_state(network, state: dict) -> None:
    """Inverse of `weights_state`; raises RuntimeError when the tensors do not fit the network."""
    module = getattr(network, "module", network)
    expected = weights_state(module)
    if set(state) != set(expected):
        raise RuntimeError("tensor names differ")
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise RuntimeError(f"shape of {name} differs")
    module.load_state_dict(state, strict=False)


_PICKLE_PREFIXES = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05", b"PK\x03\x04")


def _refuse_pickle(path: Path) -> None:
    with open(path, "rb") as fh:
        head = fh.read(8)
    if head.startswith(_PICKLE_PREFIXES):
        raise VertebraIDError(
            f"'{path}' is a pickle or PyTorch checkpoint, not a safetensors model; VertebraID never unpickles files."
        )


def read_model_metadata(path: PathLike) -> dict:
    """The metadata of a model file, validated (no weights read)."""
    weights_path, meta_path = model_paths(path)
    if not weights_path.is_file():
        raise VertebraIDError(f"The model file '{weights_path}' does not exist.")
    _refuse_pickle(weights_path)
    if not meta_path.is_file():
        raise VertebraIDError(f"The model '{weights_path.name}' has no metadata file '{meta_path.name}' beside it.")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise VertebraIDError(f"The model metadata '{meta_path}' is not valid JSON ({type(exc).__name__}).") from None
    if not isinstance(meta, dict) or meta.get("format") != MODEL_FORMAT:
        raise VertebraIDError(f"'{meta_path}' is not VertebraID model metadata.")
    if int(meta.get("format_version", 0)) > MODEL_FORMAT_VERSION:
        raise VertebraIDError(f"The model '{weights_path.name}' needs a newer VertebraID (format {meta['format_version']}).")
    for key in ("labels", "spacing_mm", "patch_size", "sigma_mm", "normalization", "network", "weights_sha256"):
        if key not in meta:
            raise VertebraIDError(f"The model metadata '{meta_path.name}' lacks '{key}'.")
    if list(meta["labels"]) != list(LEVELS_26):
        raise VertebraIDError(f"The model '{weights_path.name}' does not predict the 26 levels C1..S2.")
    return meta


def load_model(path: PathLike | None = None, device: str = "auto") -> Model:
    """Load a model file (the bundled one when `path` is None), checksum first; never unpickles."""
    weights_path = Path(path) if path is not None else default_model_path()
    weights_path, _ = model_paths(weights_path)
    meta = read_model_metadata(weights_path)
    state = read_weights(weights_path, meta["weights_sha256"], "model")
    torch_device = resolve_device(device)
    config = NetworkConfig.from_dict(meta["network"])
    network = build_network(config)
    try:
        load_weights_state(network, state)
    except RuntimeError:
        raise VertebraIDError(
            f"The weights in '{weights_path.name}' do not fit the network described in its metadata."
        ) from None
    network.to(torch_device).eval()
    labeller = None
    if meta.get("level_labeller") is not None:
        from .labeller import load_labeller

        labeller = load_labeller(meta["level_labeller"], weights_path.parent, torch_device)
    return Model(network, meta, torch_device, weights_path, config, labeller)
