"""Training checkpoints: resume a run killed at any moment, losing at most the epoch in progress.

After every epoch, `<output>/checkpoints/epoch-NNNN.safetensors` (weights and optimiser
tensors) and `.json` (epoch, step, non-tensor optimiser state, history, the tensors' SHA-256;
written last, so it is the commit point). `latest_checkpoint` finds the newest intact one.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from ..io.files import write_json_atomic
from ..io.weights import read_weights, sha256_file, write_weights
from ..networks.bundle import load_weights_arrays, weights_state
from .config import TrainConfig

CHECKPOINT_FORMAT = "vertebraid-training-checkpoint"


def _checkpoint_dir(config: TrainConfig) -> Path:
    return Path(config.output_dir) / "checkpoints"


def save_checkpoint(config: TrainConfig, network, optimizer, scaler, state: dict) -> Path:
    """epoch-NNNN.safetensors (tensors) then epoch-NNNN.json (the rest + their checksum)."""
    folder = _checkpoint_dir(config)
    folder.mkdir(parents=True, exist_ok=True)
    stem = folder / f"epoch-{state['epoch']:04d}"
    tensors = {f"model.{k}": v.numpy() for k, v in weights_state(network).items()}
    opt = optimizer.state_dict()
    opt_plain: dict = {"param_groups": opt["param_groups"], "state": {}}
    for pid, entries in opt["state"].items():
        for name, value in entries.items():
            if hasattr(value, "detach"):
                tensors[f"optimizer.{pid}.{name}"] = value.detach().to("cpu").contiguous().numpy()
            else:
                opt_plain["state"].setdefault(str(pid), {})[name] = value
    digest = write_weights(tensors, stem.with_suffix(".safetensors"), CHECKPOINT_FORMAT)
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
    """Restore the network, optimiser and gradient scaler from a checkpoint `latest_checkpoint` found."""
    import torch

    arrays = read_weights(tensors_path, record.get("tensors_sha256"), "checkpoint")
    load_weights_arrays(network, {k[6:]: v for k, v in arrays.items() if k.startswith("model.")})
    opt_state: dict = {}
    for key, value in arrays.items():
        if key.startswith("optimizer."):
            _, pid, name = key.split(".", 2)
            opt_state.setdefault(int(pid), {})[name] = torch.from_numpy(value)
    for pid, entries in record["optimizer"]["state"].items():
        opt_state.setdefault(int(pid), {}).update(entries)
    optimizer.load_state_dict({"state": opt_state, "param_groups": record["optimizer"]["param_groups"]})
    if scaler is not None and record.get("scaler"):
        scaler.load_state_dict(record["scaler"])
