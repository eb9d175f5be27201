"""Training the level labeller (`networks/labeller.py`) on phantoms, on a CPU in minutes.

    vertebraid train-labeller --model M --samples DIR [--phantoms 2000] [--minutes 30] [--attach]

Each phantom gives one sample: its windowed CT straightened along the true centreline (jittered
and extended past the end vertebrae, as a traced one is), stored as `<seed>.npz` so that a rerun
only adds missing ones. Training draws random fields of view, mirrors, in-plane shifts, contrast
and noise; the targets are a Gaussian bump per level along the spine; BCE, AdamW, cosine
schedule over the time budget.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np
from scipy import ndimage

from ..engine.anatomy import CHANNEL_OF, NUM_CHANNELS
from ..engine.centerline import centerline_through
from ..engine.vertebrae import Vertebra
from ..engine.volume import Volume
from ..errors import VertebraIDError
from ..io.files import PathLike, atomic_path
from ..networks.bundle import (
    attach_labeller,
    load_labeller,
    model_paths,
    read_model_metadata,
    save_labeller,
)
from ..networks.labeller import (
    LabellerConfig,
    bone_view,
    build_labeller,
    straighten_image,
)
from ..networks.preprocess import preprocess
from ..synthetic.labelmap_ct import LabelMap, read_labelmap, vertebra_centres
from ..synthetic.phantom import generate_phantom


def target_signals(positions: np.ndarray, length: int, config: LabellerConfig) -> np.ndarray:
    """(26, Z) Gaussian bumps of height 1 at each (channel, fractional plane index) of `positions`."""
    target = np.zeros((NUM_CHANNELS, length), np.float32)
    k = np.arange(length)
    sigma = config.sigma_mm / config.step_mm
    for channel, where in np.asarray(positions, float).reshape(-1, 2):
        bump = np.exp(-0.5 * ((k - where) / sigma) ** 2)
        target[int(channel)] = np.maximum(target[int(channel)], bump)
    return target


def spine_sample(ct: Volume, truth: list[Vertebra], config: LabellerConfig, hu_window, model_spacing_mm: float,
                 rng: np.random.Generator):
    """One training sample: (the CT straightened along its spine as uint8, (channel, plane index) pairs).

    The centreline is the truth's, jittered by 2 mm and extended 10-60 mm past the end vertebrae
    (as a traced one is); the CT is prepared and windowed as inference does. None when the CT
    shows fewer than two vertebrae (or is too small to be read).
    """
    if sum(v.label in CHANNEL_OF for v in truth) < 2:
        return None
    try:
        image = preprocess(ct, model_spacing_mm, hu_window)
    except VertebraIDError:  # a drawn field of view too thin to show vertebrae
        return None
    line = centerline_through(truth, config.step_mm, rng, 2.0, tuple(rng.uniform(10.0, 60.0, 2)))
    x = straighten_image(image, line, config)
    pairs = [(CHANNEL_OF[v.label], float(line.project(np.asarray(v.position)[None])[0]))
             for v in truth if v.label in CHANNEL_OF]
    return (np.clip(x, 0.0, 1.0) * 255 + 0.5).astype(np.uint8), np.array(pairs, np.float32).reshape(-1, 2)


def phantom_sample(seed: int, config: LabellerConfig, hu_window, model_spacing_mm: float):
    """The sample of phantom `seed` (rendered at 2 or 3 mm); None when it shows fewer than two vertebrae."""
    rng = np.random.default_rng([int(seed), 777])
    phantom = generate_phantom(int(seed), spacing=float(rng.choice([2.0, 3.0])))
    return spine_sample(phantom.ct, phantom.truth, config, hu_window, model_spacing_mm, rng)


def labelmap_sample(labelmap: LabelMap, seed: int, config: LabellerConfig, hu_window, model_spacing_mm: float):
    """The sample of a CT rendered from real anatomy (`labelmap`, deformed and imaged as drawn from `seed`)."""
    rng = np.random.default_rng([int(seed), 778])
    hu, affine, labels, _ = labelmap.render(rng, spacing_mm=float(rng.choice([2.0, 3.0])))
    centres = vertebra_centres(labels, affine, labelmap.prepared.names)
    truth = [Vertebra(level, position) for level, position in centres.items() if level in CHANNEL_OF]
    return spine_sample(Volume(hu, affine), truth, config, hu_window, model_spacing_mm, rng)


#: Windowed values (HU -250..1250 -> 0..1) the augmentations use: water (0 HU) and the bone threshold (200 HU).
_WATER, _BONE = 250.0 / 1500.0, 450.0 / 1500.0


def _augment(x: np.ndarray, pairs: np.ndarray, rng: np.random.Generator):
    """What real scans do to a straightened spine, drawn at random: a partial field of view along the
    spine and across it (slabs), a left-right mirror, an off-centre centreline, bone-only images (soft
    tissue set to 0 HU), thick slices and blur, contrast, gamma and noise."""
    z = x.shape[2]
    pairs = pairs.copy()
    if rng.random() < 0.5 and z > 24:
        n = int(rng.integers(20, z))
        start = int(rng.integers(0, z - n + 1))
        x = x[:, :, start : start + n]
        pairs[:, 1] -= start
    if rng.random() < 0.5:
        x = x[:, ::-1]  # y is the patient's left-right: mirroring keeps every label
    # a traced centreline can run several mm off the bodies' centres: shift the planes up to 8 mm
    dx, dy = rng.integers(-2, 3, 2)
    x = np.roll(x, (int(dx), int(dy)), axis=(0, 1)).astype(np.float32)
    if rng.random() < 0.1:  # a bone-only image: everything below 200 HU set to 0 HU
        x = np.where(x < _BONE, _WATER, x)
    if rng.random() < 0.15:  # a slab: the scan covers only a band across the spine (outside: 0)
        axis = int(rng.integers(0, 2))
        half = int(rng.integers(6, 16))
        centre = x.shape[axis] // 2 + int(rng.integers(-3, 4))
        keep = np.abs(np.arange(x.shape[axis]) - centre) <= half
        x = x * (keep[:, None, None] if axis == 0 else keep[None, :, None])
    if rng.random() < 0.2:  # thick slices (along the spine) or a soft kernel (in-plane)
        sigma = (rng.uniform(0.0, 0.6), rng.uniform(0.0, 0.6), rng.uniform(0.4, 1.5))
        x = ndimage.gaussian_filter(x, sigma, mode="nearest")
    if rng.random() < 0.3:
        x = np.clip(x, 0.0, 1.0) ** rng.uniform(0.7, 1.5)
    x = x * rng.uniform(0.85, 1.15) + rng.uniform(-0.05, 0.05)
    x = x + rng.normal(0.0, rng.uniform(0.0, 0.03), x.shape)
    return np.ascontiguousarray(x, np.float32), pairs


def prepare_samples(folder: PathLike, seeds, config: LabellerConfig, hu_window, model_spacing_mm: float,
                    progress: Callable | None = None, labelmap: LabelMap | None = None) -> list[Path]:
    """Samples as `<seed>.npz` in `folder` (kept between runs: a rerun only adds missing ones): of
    phantoms, or of CTs rendered from `labelmap` (real anatomy) when one is given."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise VertebraIDError(f"The samples folder '{folder}' is a file; give a folder.")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise VertebraIDError(f"Cannot create the samples folder '{folder}' ({exc.strerror}).") from None
    seeds = list(seeds)
    for i, seed in enumerate(seeds):
        path = folder / f"{seed}.npz"
        if not path.exists():
            if labelmap is None:
                sample = phantom_sample(seed, config, hu_window, model_spacing_mm)
            else:
                sample = labelmap_sample(labelmap, seed, config, hu_window, model_spacing_mm)
            x, pairs = sample if sample is not None else (np.zeros((0, 0, 0), np.uint8), np.zeros((0, 2), np.float32))
            with atomic_path(path) as tmp:
                np.savez_compressed(tmp, x=x, pairs=pairs)
        if progress is not None:
            progress(i + 1, len(seeds))
    return [folder / f"{s}.npz" for s in seeds]


def _read_samples(files) -> list:
    samples = []
    for f in files:
        with np.load(f) as d:
            if d["x"].size:
                samples.append((d["x"], d["pairs"]))
    return samples


def train_labeller(sample_files, config: LabellerConfig, minutes: float, seed: int = 0,
                   learning_rate: float = 1e-3, log: Callable = print, max_steps: int | None = None,
                   groups: dict | None = None, start_from=None):
    """Train on stored samples for `minutes` (cosine schedule over that time) or `max_steps` steps
    (schedule over those), whichever ends first; returns (network, record).

    `groups` ({name: (files, share)}), when given instead of `sample_files`, mixes sources at fixed
    shares of the steps (phantoms and each label map's renders), however many samples each has.
    `start_from`: a labeller network whose weights training continues from (fine-tuning).
    """
    import torch
    import torch.nn.functional as F

    if groups is None:
        groups = {"samples": (sample_files, 1.0)}
    pools = {name: _read_samples(files) for name, (files, _) in groups.items()}
    pools = {name: pool for name, pool in pools.items() if pool}
    if not pools:
        raise VertebraIDError("No training samples with at least two vertebrae.")
    names = sorted(pools)
    shares = np.array([float(groups[name][1]) for name in names])
    shares = shares / shares.sum()
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    network = build_labeller(config)
    if start_from is not None:
        network.load_state_dict(start_from.state_dict())
    optimizer = torch.optim.AdamW(network.parameters(), learning_rate, weight_decay=1e-4)
    pos_weight = torch.tensor(5.0)  # a bump covers a few planes of ~100: weigh them up
    start, step, recent = time.perf_counter(), 0, []
    total_s = max(float(minutes), 0.01) * 60
    network.train()
    while (elapsed := time.perf_counter() - start) < total_s and (max_steps is None or step < max_steps):
        pool = pools[names[int(rng.choice(len(names), p=shares))]]
        x, pairs = pool[int(rng.integers(len(pool)))]
        x, pairs = _augment(x.astype(np.float32) / 255.0, pairs, rng)
        x = bone_view(x, config)
        target = torch.from_numpy(target_signals(pairs, x.shape[2], config))[None]
        done = elapsed / total_s if max_steps is None else max(elapsed / total_s, step / max_steps)
        lr = learning_rate * min(1.0, (step + 1) / 100) * 0.5 * (1 + np.cos(np.pi * done))
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = F.binary_cross_entropy_with_logits(network(torch.from_numpy(x)[None, None]), target,
                                                  pos_weight=pos_weight)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(network.parameters(), 5.0)
        optimizer.step()
        recent.append(loss.item())
        step += 1
        if step % 500 == 0:
            log(f"labeller step {step}: loss {np.mean(recent[-500:]):.4f} ({elapsed / 60:.1f} min)")
    network.eval()
    record = {"steps": step, "minutes": round((time.perf_counter() - start) / 60, 1),
              "samples": {name: len(pools[name]) for name in names},
              "shares": {name: round(float(share), 3) for name, share in zip(names, shares)},
              "fine_tuned": start_from is not None,
              "final_loss": round(float(np.mean(recent[-500:])), 4) if recent else None, "seed": seed,
              "learning_rate": learning_rate}
    return network, record


def train_for_model(model_path: PathLike, samples: PathLike, phantoms: int = 2000, minutes: float = 30.0,
                    seed: int = 0, attach: bool = False, log: Callable = print, threads: int = 0,
                    labelmaps=(), renders: int = 0, fine_tune: bool = False, bone_floor_hu: float | None = None,
                    phantom_share: float = 0.5) -> tuple[Path, dict]:
    """The whole recipe for a heatmap model: samples on its grid and HU window, training,
    `<model>_labeller.safetensors` beside it and, with `attach`, its entry in the model's metadata.

    Samples: phantoms (seeds 0..phantoms-1, in `samples`) and, for each label map of real anatomy in
    `labelmaps`, `renders` CTs rendered from it (in `samples/<label map name>`); phantoms take
    `phantom_share` of the training steps and the label maps share the rest. `fine_tune` continues
    from the labeller the model already has. `bone_floor_hu`: the labeller reads bone only (HU below
    it blanked; `LabellerConfig.bone_floor`). `threads`: torch CPU threads (0: torch's default)."""
    import torch

    if isinstance(threads, bool) or int(threads) < 0:
        raise VertebraIDError("The number of threads must not be negative.")
    if threads:
        torch.set_num_threads(int(threads))
    if isinstance(phantoms, bool) or int(phantoms) < 1 or not float(minutes) > 0:
        raise VertebraIDError("The number of phantoms and the training minutes must be positive.")
    if isinstance(renders, bool) or int(renders) < 0 or (labelmaps and int(renders) < 1):
        raise VertebraIDError("Give a positive number of renders per label map.")
    if not 0.0 < float(phantom_share) <= 1.0:
        raise VertebraIDError("The phantoms' share of the training steps must be above 0 and at most 1.")
    weights, _ = model_paths(model_path)
    meta = read_model_metadata(weights)
    window = meta["normalization"]["hu_window"]
    floor = 0.0
    if bone_floor_hu is not None:
        floor = (float(bone_floor_hu) - window[0]) / (window[1] - window[0])
        if not 0.0 < floor < 1.0:
            raise VertebraIDError(f"The bone floor must lie inside the model's HU window ({window[0]:g} to {window[1]:g}).")
    start_from = None
    if fine_tune:
        if meta.get("level_labeller") is None:
            raise VertebraIDError(f"The model '{weights.name}' has no level labeller to fine-tune.")
        start_from, config = load_labeller(meta["level_labeller"], weights.parent, "cpu")
        if bone_floor_hu is not None and abs(config.bone_floor - floor) > 1e-9:
            raise VertebraIDError("A fine-tuned labeller keeps the bone floor it was trained with.")
    else:
        config = LabellerConfig(bone_floor=floor)
    spacing = float(min(meta["spacing_mm"]))

    def counter(kind):
        def show(done, total):
            if done % 100 == 0 or done == total:
                log(f"{kind} samples {done}/{total}")
        return show

    label_share = (1.0 - float(phantom_share)) / max(len(labelmaps), 1)
    sources = {"phantoms": (prepare_samples(samples, range(int(phantoms)), config, window, spacing,
                                            counter("phantom")), float(phantom_share))}
    for path in labelmaps:
        labelmap = read_labelmap(path)
        name = labelmap.name
        files = prepare_samples(Path(samples) / name, range(int(renders)), config, window, spacing,
                                counter(name), labelmap=labelmap)
        sources[name] = (files, label_share)
    network, record = train_labeller(None, config, minutes, seed, log=log, groups=sources, start_from=start_from)
    data = [f"phantoms, seeds 0..{int(phantoms) - 1}, rendered at 2 or 3 mm"]
    data += [f"{int(renders)} CTs rendered from the label map {name} (deformed, imaged at 2 or 3 mm)"
             for name in sources if name != "phantoms"]
    record.update({"data": "; ".join(data), "threads": torch.get_num_threads(), "bone_floor_hu": bone_floor_hu})
    out = weights.with_name(f"{weights.stem}_labeller.safetensors")
    entry = save_labeller(network, config, out, record)
    log(f"labeller -> {out}")
    if attach:
        log(f"recorded in {attach_labeller(weights, entry)}")
    return out, entry
