"""Training the heatmap network: `train(config)` from plain Python, the CLI or Slicer.

    config = load_config("VertebraIDTrain/configs/phantoms_cpu.toml")
    result = train(config, resume=True)        # -> TrainResult (model file, history)

Data (`data.py`): phantoms generated on the fly (new seeds every epoch: the network never sees
a case twice) and, optionally, annotated folders (VerSe layout or generic case folders, read
with `io.cases.iter_cases`). Each case is checked, block-averaged and HU-windowed exactly as in
inference (`networks.preprocess.reduce_and_window`); patches are then resampled from it.

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

Validation (`validate.py`) runs `networks.predict.detect` on held-out phantoms (seeds disjoint
from training) and logs the id rate (not only the loss) and, for the network alone, which
channel fires on each vertebra (its own level? a level of its region C/T/L/S?). TensorBoard
logs go to `<output>/tensorboard`.

Checkpoints (`checkpoints.py`): after every epoch, `<output>/checkpoints/epoch-NNNN.safetensors` (weights and
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
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from ..engine.progress import ProgressCallback, report
from ..errors import VertebraIDError
from ..io.files import PathLike
from ..networks.bundle import (
    load_model,
    load_weights_state,
    make_metadata,
    resolve_device,
    save_model,
    weights_state,
)
from ..networks.heatmap import build_network
from .checkpoints import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import TrainConfig, load_config
from .data import (
    _patch_stream_class,
    channel_loss_weights,
    load_folder_cases,
    render_blob_targets,
    weighted_l2,
)
from .validate import validate, validation_cases

# =========================================================================== training loop


@dataclass
class TrainResult:
    """Where a run's model is, how many epochs it did, and its history."""

    output_dir: Path
    model_path: Path | None
    epochs_done: int
    resumed_from: int | None
    history: list = field(default_factory=list)


def _initialise_from(network, config: TrainConfig) -> None:
    """Start from a model file's weights (checksum-verified); its architecture and grid must match."""
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


@dataclass
class _RunState:
    """Where a run stands: what a checkpoint restores."""

    epoch: int = 0
    step: int = 0
    history: list = field(default_factory=list)
    best: dict | None = None
    resumed_from: int | None = None


def train(config: TrainConfig | PathLike, resume: bool = False, progress: ProgressCallback | None = None,
          show_progress: bool = True, log: Callable = print) -> TrainResult:
    """Train (or resume) as configured; returns where the model is. `progress(fraction, message)`
    returning True cancels (`Cancelled`) after the last completed epoch's checkpoint."""
    import torch
    import torch.distributed as dist

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
        network, optimizer, scaler, state = _start(config, resume, device, log if main else (lambda *_: None))
        model = torch.nn.parallel.DistributedDataParallel(network) if world > 1 else network
        folder_cases = load_folder_cases(config.data.folders, config, log) if config.data.folders else []
        if config.data.folder_cases_per_epoch and not folder_cases and config.data.phantoms_per_epoch == 0:
            raise VertebraIDError("The data folders hold no annotated case to train on.")
        val_cases = validation_cases(config) if main and config.validation.phantoms else []
        PatchStream = _patch_stream_class()
        batches_per_epoch = math.ceil(len(PatchStream(config, 0, rank, world, folder_cases)) / config.train.batch_size)
        total_steps = batches_per_epoch * config.train.epochs
        writer = None
        if main:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(out / "tensorboard"), purge_step=state.step if state.resumed_from else None)
        model_path = out / "model.safetensors" if (out / "model.safetensors").exists() else None
        run_start = time.perf_counter()
        for epoch in range(state.epoch, config.train.epochs):
            stream = PatchStream(config, epoch, rank, world, folder_cases)
            entry = _train_epoch(model, optimizer, scaler, stream, config, device, state, epoch, batches_per_epoch,
                                 total_steps, run_start, writer, progress if main else None, main and show_progress)
            entry["patches_per_s"] *= world
            entry["patches"] *= world
            entry["phantoms"] = sum(kind == "phantom" for kind, _ in stream.specs) * world
            out_of_time = _out_of_time(config, run_start, world, device)
            if main:
                validating = val_cases and ((epoch + 1) % config.validation.every == 0
                                            or out_of_time or epoch + 1 == config.train.epochs)
                if validating:
                    entry["validation"] = validate(model, _metadata(config), val_cases, config, device, out)
                model_path = _end_epoch(network, optimizer, scaler, config, state, entry, writer)
                log(_epoch_message(entry))
            if world > 1:
                dist.barrier()
            if out_of_time:
                if main:
                    log(f"Stopping after epoch {epoch + 1}: train.max_minutes ({config.train.max_minutes}) reached.")
                break
        if writer is not None:
            writer.close()
        epochs_done = state.history[-1]["epoch"] if state.history else state.epoch
        return TrainResult(out, model_path if main else None, epochs_done, state.resumed_from, state.history)
    finally:
        if own_group and dist.is_initialized():
            dist.destroy_process_group()


def _start(config: TrainConfig, resume: bool, device, log: Callable):
    """(network, optimiser, gradient scaler, run state): fresh, from `init_from`, or the newest checkpoint."""
    import torch

    if not resume and latest_checkpoint(config) is not None:
        raise VertebraIDError(
            f"'{config.output_dir}' already holds checkpoints; resume them (--resume) or choose another output_dir."
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
    state = _RunState()
    found = latest_checkpoint(config) if resume else None
    if found is not None:
        record, tensors = found
        if record.get("model_config") != asdict(config.model):
            raise VertebraIDError("The checkpoint was trained with other [model] settings; it cannot be resumed.")
        load_checkpoint(record, tensors, network, optimizer, scaler)
        state = _RunState(int(record["epoch"]), int(record["step"]), list(record.get("history", [])),
                          record.get("best"), int(record["epoch"]))
        log(f"Resuming after epoch {state.epoch} (step {state.step}) from {tensors.name}.")
    elif resume:
        log("No checkpoint to resume; starting from scratch.")
    return network, optimizer, scaler, state


def _train_epoch(model, optimizer, scaler, stream, config: TrainConfig, device, state: _RunState, epoch: int,
                 batches_per_epoch: int, total_steps: int, run_start: float, writer, progress, show_bar: bool) -> dict:
    """One epoch of optimiser steps on this rank's patches; returns its history entry (this rank's counts)."""
    import torch
    from tqdm import tqdm

    model.train()
    workers = config.train.num_workers
    loader = torch.utils.data.DataLoader(stream, batch_size=config.train.batch_size, num_workers=workers,
                                         pin_memory=device.type == "cuda", prefetch_factor=4 if workers else None)
    bar = tqdm(loader, total=batches_per_epoch, desc=f"epoch {epoch + 1}/{config.train.epochs}",
               disable=not show_bar, leave=False)
    amp = device.type == "cuda" and config.train.amp
    t0, seen, loss_sum, batches = time.perf_counter(), 0, 0.0, 0
    for image, blobs in bar:
        lr = _learning_rate(config, state.step, total_steps, time.perf_counter() - run_start)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = float(train_step(model, optimizer, scaler, image, blobs, config, device, amp).detach())
        state.step += 1
        batches += 1
        seen += image.shape[0]
        loss_sum += loss
        bar.set_postfix(loss=f"{loss:.5f}")
        if writer is not None:
            writer.add_scalar("train/loss", loss, state.step)
            writer.add_scalar("train/lr", lr, state.step)
        fraction = (epoch + batches / max(batches_per_epoch, 1)) / config.train.epochs
        report(progress, fraction, f"Epoch {epoch + 1}/{config.train.epochs}, loss {loss:.5f}")
    seconds = time.perf_counter() - t0
    return {"epoch": epoch + 1, "step": state.step, "loss": loss_sum / max(batches, 1),
            "patches_per_s": seen / max(seconds, 1e-9), "seconds": seconds, "patches": seen}


def _metadata(config: TrainConfig, **extra) -> dict:
    """The model file's metadata for this configuration."""
    m = config.model
    return make_metadata(config.network_config, spacing_mm=m.spacing_mm, patch_size=m.patch_size, sigma_mm=m.sigma_mm,
                         hu_window=m.hu_window, heatmap_height=m.heatmap_height, **extra)


def _end_epoch(network, optimizer, scaler, config: TrainConfig, state: _RunState, entry: dict, writer) -> Path:
    """Rank 0 after an epoch: history, TensorBoard, the model files and the checkpoint; returns the model path."""
    out = Path(config.output_dir)
    state.history.append(entry)
    state.epoch = entry["epoch"]
    if writer is not None:
        writer.add_scalar("epoch/loss", entry["loss"], state.step)
        writer.add_scalar("epoch/patches_per_s", entry["patches_per_s"], state.step)
        for key, value in entry.get("validation", {}).items():
            if value is not None:
                writer.add_scalar(f"validation/{key}", value, state.step)
        writer.flush()
    val = entry.get("validation", {})
    improved = val.get("id_rate") is not None and (state.best is None or val["id_rate"] >= state.best["id_rate"])
    if improved:
        state.best = {"epoch": entry["epoch"], "id_rate": val["id_rate"]}
    metadata = _metadata(config, training=_training_description(config, entry["epoch"], state.step, state.history),
                         metrics={"validation": val, "train_loss": entry["loss"], "epoch": entry["epoch"]})
    model_path, _ = save_model(network, metadata, out / "model.safetensors")
    if improved:
        save_model(network, metadata, out / "model-best.safetensors")
    save_checkpoint(config, network, optimizer, scaler,
                    {"epoch": entry["epoch"], "step": state.step, "history": state.history, "best": state.best,
                     "config": config.to_dict()})
    return model_path


def _epoch_message(entry: dict) -> str:
    """The log line of an epoch: loss, speed, and the validation's id rate and channel diagnostics."""
    val = entry.get("validation", {})
    message = f"epoch {entry['epoch']}: loss {entry['loss']:.5f}, {entry['patches_per_s']:.2f} patches/s"
    if val.get("id_rate") is not None:
        message += f", validation id rate {100 * val['id_rate']:.1f} %"
    if val.get("level_peak_within_10mm") is not None:
        message += f", level peaks within 10 mm {100 * val['level_peak_within_10mm']:.1f} %"
    if val.get("channel_level_right") is not None:
        by_region = " / ".join(f"{r} {100 * val[f'channel_region_right_{r}']:.0f}"
                               for r in "CTLS" if val.get(f"channel_region_right_{r}") is not None)
        message += (f", strongest channel on a vertebra: its level {100 * val['channel_level_right']:.1f} %, "
                    f"its region {by_region} %")
    return message


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
