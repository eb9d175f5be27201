"""Training throughput: how many patches per second the data pipeline and a training step reach.

    python bench/training_speed.py CONFIG [--workers 1] [--batches 20] [--device auto]

Runs the configuration's own data stream (phantoms generated on the fly, patches with
augmentation, blob targets) through a DataLoader with the given number of workers, first
alone (data only), then with forward + backward + optimiser steps of the configured network
(targets drawn on the device, AMP on CUDA). Prints one markdown table row per stage. The
first batch (worker start, first phantom) is not timed.
"""
from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path


def _stream(config, workers: int):
    import torch
    from VertebraIDLib.training.data import _patch_stream_class

    stream = _patch_stream_class()(config, 0, 0, 1, [])
    return torch.utils.data.DataLoader(stream, batch_size=config.train.batch_size, num_workers=workers)


def _timed(batches, work, count: int) -> tuple[float, int]:
    """(seconds, patches) over `count` batches after the first."""
    iterator = iter(batches)
    work(next(iterator))
    t0, patches = time.perf_counter(), 0
    for _ in range(count):
        try:
            batch = next(iterator)
        except StopIteration:
            break
        work(batch)
        patches += batch[0].shape[0]
    return time.perf_counter() - t0, patches


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers (default 1)")
    parser.add_argument("--batches", type=int, default=20, help="timed batches per stage (default 20)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    args = parser.parse_args()

    import torch
    from VertebraIDLib.networks.bundle import resolve_device
    from VertebraIDLib.networks.heatmap import build_network
    from VertebraIDLib.training.config import load_config
    from VertebraIDLib.training.heatmap import train_step

    config = load_config(args.config)
    # enough cases for the timed batches, whatever the configured epoch size
    needed = (args.batches + 2) * config.train.batch_size // config.data.patches_per_case + args.workers + 1
    config = dataclasses.replace(config, data=dataclasses.replace(
        config.data, phantoms_per_epoch=max(config.data.phantoms_per_epoch, needed)))
    device = resolve_device(args.device)
    m = config.model
    print(f"config {args.config.name}: {m.kind} {m.channels}, {m.patch_size}^3 patches at {m.spacing_mm} mm, "
          f"batch {config.train.batch_size}, {config.data.patches_per_case} patches per phantom, "
          f"phantoms {config.data.phantom_options or 'random'}; device {device}, {args.workers} workers, "
          f"torch threads {torch.get_num_threads()}\n")
    print("| stage | patches | seconds | patches/s |\n|---|---|---|---|")

    seconds, patches = _timed(_stream(config, args.workers), lambda batch: None, args.batches)
    print(f"| data only | {patches} | {seconds:.1f} | {patches / seconds:.2f} |", flush=True)

    network = build_network(config.network_config).to(device).train()
    optimizer = torch.optim.AdamW(network.parameters(), lr=config.train.learning_rate)
    amp = device.type == "cuda" and config.train.amp
    scaler = torch.amp.GradScaler("cuda", enabled=amp) if device.type == "cuda" else None

    def step(batch):
        train_step(network, optimizer, scaler, *batch, config, device, amp)
        if device.type == "cuda":
            torch.cuda.synchronize()

    seconds, patches = _timed(_stream(config, args.workers), step, args.batches)
    print(f"| data + training step | {patches} | {seconds:.1f} | {patches / seconds:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
