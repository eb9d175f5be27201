"""A model: the heatmap network and its level labeller, with the metadata that says how to use them.

    save_model(net, metadata, "model.safetensors")   # + model.json beside it
    model = load_model("model.safetensors", "auto")  # -> Model(network, metadata, device, ..., labeller)

A model is two files: `<name>.safetensors` (weights only: safetensors holds plain tensors and
cannot execute code) and `<name>.json` (metadata: labels, spacing, patch size, sigma, HU
window, network config, training data, measured metrics, the engine settings tuned for its
maps, version, and the SHA-256 of the weights file). Its level labeller (`labeller.py`), when
it has one, is a third file named in the metadata (`"level_labeller"`, with its own SHA-256),
so one `--model` brings both. Loading checks every checksum before reading weights; a pickle
or a PyTorch checkpoint offered as a model is refused (`io.weights`). Nothing here calls
`torch.load`.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .. import __version__ as package_version
from ..engine.anatomy import LEVELS_26
from ..engine.settings import EngineSettings
from ..errors import VertebraIDError
from ..io.files import PathLike, write_json_atomic
from ..io.weights import read_weights, refuse_pickle, write_weights
from .heatmap import NetworkConfig, build_network
from .labeller import LABELLER_FORMAT, LabellerConfig, build_labeller

MODEL_FORMAT = "vertebraid-heatmap-model"
MODEL_FORMAT_VERSION = 1
#: Where the bundled model lives (the default of `vertebraid detect` and the Slicer module): in the
#: source tree and the Slicer extension, and where a wheel (`pip install .`) puts it (pyproject's data-files).
MODELS_DIR = Path(__file__).resolve().parents[2] / "Resources" / "Models"
INSTALLED_MODELS_DIR = Path(sys.prefix) / "share" / "vertebraid" / "models"
BUNDLED_MODEL_NAME = "vertebraid.safetensors"


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
    def engine_settings(self) -> dict:
        """EngineSettings for this model's maps: σ, and what its metadata's "engine" table sets.

        A network's peaks need not reach the targets' height, nor be equally tall along the
        spine; `vertebraid tune-engine` picks the optimiser's α and floor and the centreline's
        threshold on validation phantoms and stores them there.
        """
        return EngineSettings.metadata_overrides(self.metadata)

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
    """The bundled model file (source tree or installed wheel), or None when neither holds one."""
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
    digest = write_weights(weights_arrays(network), weights_path, MODEL_FORMAT)
    meta = dict(metadata)
    meta["weights_file"] = weights_path.name
    meta["weights_sha256"] = digest
    write_json_atomic(meta_path, meta)
    return weights_path, meta_path


def weights_state(network) -> dict:
    """The network's tensors by name, each stored once (DynUNet reaches some layers by two names)."""
    module = getattr(network, "module", network)  # DistributedDataParallel wraps the network
    unique = {name for name, _ in module.named_parameters()} | {name for name, _ in module.named_buffers()}
    return {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items() if k in unique}


def weights_arrays(network, half: bool = False) -> dict:
    """`weights_state` as numpy arrays for a weights file; `half` stores floating tensors as float16."""
    return {k: (v.half() if half and v.is_floating_point() else v).numpy() for k, v in weights_state(network).items()}


def load_weights_arrays(network, arrays: dict) -> None:
    """Inverse of `weights_arrays` (float16 widened to float32); RuntimeError when they do not fit."""
    import torch

    load_weights_state(network, {k: torch.from_numpy(v.astype("float32") if v.dtype.kind == "f" else v)
                                 for k, v in arrays.items()})


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


def read_model_metadata(path: PathLike) -> dict:
    """The metadata of a model file, validated (no weights read)."""
    weights_path, meta_path = model_paths(path)
    if not weights_path.is_file():
        raise VertebraIDError(f"The model file '{weights_path}' does not exist.")
    refuse_pickle(weights_path)
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
        load_weights_arrays(network, state)
    except RuntimeError:
        raise VertebraIDError(
            f"The weights in '{weights_path.name}' do not fit the network described in its metadata."
        ) from None
    network.to(torch_device).eval()
    labeller = None
    if meta.get("level_labeller") is not None:
        labeller = load_labeller(meta["level_labeller"], weights_path.parent, torch_device)
    return Model(network, meta, torch_device, weights_path, config, labeller)


def in_memory_model(network, metadata: dict, device, folder: Path | None = None) -> Model:
    """A Model around a network in memory (one being trained): as `load_model` would give once it
    is saved with this metadata. Its level labeller, when the metadata names one, is read from `folder`."""
    device = resolve_device(str(device))
    labeller = None
    if metadata.get("level_labeller") is not None and folder is not None:
        labeller = load_labeller(metadata["level_labeller"], Path(folder), device)
    return Model(network, metadata, device, None, NetworkConfig.from_dict(metadata["network"]), labeller)


def save_labeller(network, config: LabellerConfig, path: PathLike, training: dict | None = None) -> dict:
    """Write the labeller's weights (safetensors, atomically); return the metadata entry that points at them."""
    path = Path(path)
    # float16 halves the file (the bundled models share a 20 MB budget); loading widens it again
    digest = write_weights(weights_arrays(network, half=True), path, LABELLER_FORMAT)
    return {"format": LABELLER_FORMAT, "config": config.to_dict(), "weights_file": path.name,
            "weights_sha256": digest, "training": training or {}}


def attach_labeller(model_path: PathLike, entry: dict) -> Path:
    """Record a labeller in a heatmap model's metadata (its weights file must sit beside the model)."""
    _, meta_path = model_paths(model_path)
    meta = read_model_metadata(model_path)
    if not (meta_path.parent / entry["weights_file"]).is_file():
        raise VertebraIDError(f"The labeller '{entry['weights_file']}' must sit beside the model '{meta_path.name}'.")
    meta["level_labeller"] = entry
    write_json_atomic(meta_path, meta)
    return meta_path


def load_labeller(entry: dict, folder: Path, device):
    """(network in eval mode, config) from a model metadata's "level_labeller" entry; checksum first."""
    if not isinstance(entry, dict) or entry.get("format") != LABELLER_FORMAT or "weights_file" not in entry:
        raise VertebraIDError("The model's level labeller entry is not valid.")
    path = folder / str(entry["weights_file"])
    if Path(entry["weights_file"]).name != entry["weights_file"] or not path.is_file():
        raise VertebraIDError(f"The model's level labeller '{entry['weights_file']}' is missing.")
    stored = read_weights(path, entry.get("weights_sha256", ""), "level labeller")
    config = LabellerConfig.from_dict(entry.get("config", {}))
    network = build_labeller(config)
    try:
        load_weights_arrays(network, stored)
    except RuntimeError:
        raise VertebraIDError(f"The level labeller '{path.name}' does not fit its configuration.") from None
    return network.to(device).eval(), config
