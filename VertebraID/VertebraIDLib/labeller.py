"""The level labeller: which vertebra is where, read from the CT straightened along the spine.

The heatmap network sees 38 cm of context per patch: enough to find every vertebra, but often
not enough to know which one it is (which is why its maps fire thoracic channels along most of
a spine). The labeller looks at the whole spine at once, cheaply:

1. the windowed CT (the heatmap network's own input grid) is resampled in the normal planes of
   the centreline (±96 mm around it, 4 mm samples, one plane per 4 mm of spine): a small,
   upright image of the spine, the same for any scan orientation;
2. a small 3-D CNN reads each plane's neighbourhood (vertebra shape, ribs, pelvis) and pools it
   to a feature vector per plane; a stack of dilated 1-D convolutions along the spine (a
   receptive field of the whole spine) turns them into 26 signals, one per level, each a
   Gaussian bump (σ 6 mm, height 1) where that level's body centre is;
3. those signals are added to the heatmap network's own 1-D signals (`Rectified.level_signals`),
   so the optimiser weighs both; positions still come from the heatmap network's Ĝ.

The labeller trains on phantoms alone, on a CPU in minutes (`vertebraid train-labeller`):
its input per phantom is ~49 x 49 x 100 samples, not a 3-D volume.

Files: `<name>.safetensors` (weights) referenced from the heatmap model's metadata
("level_labeller": configuration, file name, SHA-256, training), so one `--model` brings both.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .anatomy import LEVELS_26, NUM_CHANNELS
from .errors import VertebraIDError
from .volume import Volume

LABELLER_FORMAT = "vertebraid-level-labeller"
PathLike = str | os.PathLike
_CHANNEL_OF = {name: i for i, name in enumerate(LEVELS_26)}


@dataclass(frozen=True)
class LabellerConfig:
    """Architecture and sampling of a labeller (stored in the model metadata)."""

    half_width: int = 24  # plane samples either side of the centreline
    step_mm: float = 4.0  # along the spine and within the planes
    sigma_mm: float = 6.0  # width of the target bumps along the spine
    features: tuple = (16, 32, 64, 64)  # 3-D encoder filters (in-plane stride 2 but the last)
    hidden: int = 96  # 1-D channels along the spine
    dilations: tuple = (1, 2, 4, 8, 16, 32, 1, 2, 4, 8)

    def __post_init__(self):
        try:
            features = tuple(int(f) for f in self.features)
            dilations = tuple(int(d) for d in self.dilations)
            ok = (int(self.half_width) >= 4 and float(self.step_mm) > 0 and float(self.sigma_mm) > 0
                  and len(features) >= 2 and min(features) >= 4 and int(self.hidden) >= 8
                  and int(self.hidden) % 8 == 0 and min(f % 4 for f in features) == 0
                  and len(dilations) >= 1 and min(dilations) >= 1)
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise VertebraIDError("The level labeller's configuration is invalid (sizes must be positive whole numbers).")
        object.__setattr__(self, "features", features)
        object.__setattr__(self, "dilations", dilations)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["features"], d["dilations"] = list(self.features), list(self.dilations)
        return d

    @classmethod
    def from_dict(cls, data: dict) -> "LabellerConfig":
        known = set(cls.__dataclass_fields__)
        if not isinstance(data, dict) or set(data) - known:
            raise VertebraIDError("The level labeller's configuration has unknown settings.")
        return cls(**data)


def build_labeller(config: LabellerConfig = LabellerConfig()):
    """(B, 1, X, Y, Z) straightened CT in [0, 1] -> (B, 26, Z) logits, one per level and plane."""
    import torch
    from torch import nn

    def conv3d(i, o, stride):
        return nn.Sequential(nn.Conv3d(i, o, 3, padding=1, stride=stride), nn.GroupNorm(4, o), nn.LeakyReLU(0.1))

    class LevelLabeller(nn.Module):
        def __init__(self):
            super().__init__()
            chans = (1,) + config.features
            self.encoder = nn.Sequential(*[
                conv3d(chans[i], chans[i + 1], (2, 2, 1) if i < len(config.features) - 1 else 1)
                for i in range(len(config.features))
            ])
            self.project = nn.Conv1d(2 * config.features[-1], config.hidden, 1)
            self.along = nn.ModuleList(
                nn.Sequential(nn.Conv1d(config.hidden, config.hidden, 3, padding=d, dilation=d),
                              nn.GroupNorm(8, config.hidden), nn.LeakyReLU(0.1))
                for d in config.dilations
            )
            self.head = nn.Conv1d(config.hidden, NUM_CHANNELS, 1)

        def forward(self, x):
            f = self.encoder(x)
            # max: a rib or the pelvis anywhere in the plane; mean: how much bone there is
            h = self.project(torch.cat([f.amax(dim=(2, 3)), f.mean(dim=(2, 3))], 1))
            for block in self.along:
                h = h + block(h)
            return self.head(h)

    return LevelLabeller()


# --------------------------------------------------------------------------- straightening


def straighten_image(image: Volume, centerline, config: LabellerConfig = LabellerConfig()) -> np.ndarray:
    """The windowed CT in the centreline's normal planes: (X, Y, Z) float32, 0 outside the scan."""
    from .rectify import StraightGrid

    if abs(centerline.step_mm - config.step_mm) > 1e-6:
        raise VertebraIDError(f"The level labeller needs a centreline sampled every {config.step_mm:g} mm, "
                              f"got {centerline.step_mm:g} mm.")
    return StraightGrid(centerline, config.half_width, config.step_mm).sample(image, order=1, cval=0.0)


def truth_centerline(truth, step_mm: float, rng: np.random.Generator | None = None, jitter_mm: float = 0.0,
                     extend_mm=(20.0, 20.0)):
    """A centreline through known body centres (a smooth curve), extended past both ends."""
    from scipy.interpolate import make_interp_spline

    from .centerline import _extend

    known = sorted((v for v in truth if v.label in _CHANNEL_OF), key=lambda v: _CHANNEL_OF[v.label])
    points = np.array([v.position for v in known], float)
    if len(points) < 2:
        raise VertebraIDError("A centreline needs at least two known body centres.")
    if rng is not None and jitter_mm > 0:
        points = points + rng.normal(0.0, jitter_mm, points.shape)
    arc = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(points, axis=0), axis=1))])
    curve = make_interp_spline(arc, points, k=min(3, len(points) - 1))
    dense = curve(np.linspace(0.0, arc[-1], max(int(arc[-1]), 4)))  # ~1 mm apart
    head, tail = (int(round(e)) for e in extend_mm)
    extended = _extend(dense, max(head, tail))
    n = max(head, tail)
    return _curve(extended[n - head : n + len(dense) + tail], step_mm)


def _curve(track: np.ndarray, step_mm: float):
    """A centreline every `step_mm` along a polyline, every sample counted as supported."""
    from .centerline import Centerline, _resample_by_arc_length, moving_frames

    points, _ = _resample_by_arc_length(track, step_mm)
    e1, e2, e3 = moving_frames(points)
    return Centerline(points, e1, e2, e3, float(step_mm), np.ones(len(points), bool))


def target_signals(positions: np.ndarray, length: int, config: LabellerConfig) -> np.ndarray:
    """(26, Z) Gaussian bumps of height 1 at each (channel, fractional plane index) of `positions`."""
    target = np.zeros((NUM_CHANNELS, length), np.float32)
    k = np.arange(length)
    sigma = config.sigma_mm / config.step_mm
    for channel, where in np.asarray(positions, float).reshape(-1, 2):
        bump = np.exp(-0.5 * ((k - where) / sigma) ** 2)
        target[int(channel)] = np.maximum(target[int(channel)], bump)
    return target


def phantom_sample(seed: int, config: LabellerConfig, hu_window, model_spacing_mm: float):
    """One training sample from phantom `seed`: (straightened CT as uint8, (channel, plane index) pairs).

    The centreline is the truth's, jittered by 2 mm and extended 10-60 mm past the end vertebrae
    (as a traced one is); the phantom is rendered at 2 or 3 mm and windowed as inference does.
    Returns None when the phantom shows fewer than two vertebrae.
    """
    from .inference import preprocess
    from .phantom import generate_phantom

    rng = np.random.default_rng([int(seed), 777])
    phantom = generate_phantom(int(seed), spacing=float(rng.choice([2.0, 3.0])))
    if sum(v.label in _CHANNEL_OF for v in phantom.truth) < 2:
        return None
    image = preprocess(phantom.ct, model_spacing_mm, hu_window)
    line = truth_centerline(phantom.truth, config.step_mm, rng, 2.0, tuple(rng.uniform(10.0, 60.0, 2)))
    x = straighten_image(image, line, config)
    pairs = [(_CHANNEL_OF[v.label], float(line.project(np.asarray(v.position)[None])[0]))
             for v in phantom.truth if v.label in _CHANNEL_OF]
    return (np.clip(x, 0.0, 1.0) * 255 + 0.5).astype(np.uint8), np.array(pairs, np.float32).reshape(-1, 2)


# --------------------------------------------------------------------------- inference


def level_signals(network, image: Volume, centerline, config: LabellerConfig, device=None) -> np.ndarray:
    """(Z, 26) signals on `centerline`'s samples: ~1 at each level's body centre, ~0 elsewhere.

    A centreline sampled at another step is read at the labeller's own and interpolated back.
    """
    import torch

    same_step = abs(centerline.step_mm - config.step_mm) < 1e-6
    line = centerline if same_step else _curve(centerline.points, config.step_mm)
    x = straighten_image(image, line, config)
    device = device or next(network.parameters()).device
    with torch.inference_mode():
        logits = network(torch.from_numpy(np.ascontiguousarray(x))[None, None].to(device))
    signals = torch.sigmoid(logits[0].float()).cpu().numpy().T.astype(np.float64)
    if same_step:
        return signals
    own = np.arange(len(line)) * config.step_mm
    wanted = np.arange(len(centerline)) * centerline.step_mm
    return np.stack([np.interp(wanted, own, signals[:, c]) for c in range(signals.shape[1])], axis=1)


# --------------------------------------------------------------------------- files


def save_labeller(network, config: LabellerConfig, path: PathLike, training: dict | None = None) -> dict:
    """Write the weights (safetensors, atomically); return the metadata entry that points at them."""
    from .network import weights_state, write_weights

    path = Path(path)
    # float16 halves the file (the bundled models share a 20 MB budget); loading widens it again
    state = {k: (v.half() if v.is_floating_point() else v) for k, v in weights_state(network).items()}
    digest = write_weights(state, path, LABELLER_FORMAT)
    return {"format": LABELLER_FORMAT, "config": config.to_dict(), "weights_file": path.name,
            "weights_sha256": digest, "training": training or {}}


def attach_labeller(model_path: PathLike, entry: dict) -> Path:
    """Record a labeller in a heatmap model's metadata (its weights file must sit beside the model)."""
    from .fileio import write_json_atomic
    from .network import model_paths, read_model_metadata

    _, meta_path = model_paths(model_path)
    meta = read_model_metadata(model_path)
    if not (meta_path.parent / entry["weights_file"]).is_file():
        raise VertebraIDError(f"The labeller '{entry['weights_file']}' must sit beside the model '{meta_path.name}'.")
    meta["level_labeller"] = entry
    write_json_atomic(meta_path, meta)
    return meta_path


def load_labeller(entry: dict, folder: Path, device):
    """(network in eval mode, config) from a model metadata's "level_labeller" entry; checksum first."""
    from .network import load_weights_state, read_weights

    if not isinstance(entry, dict) or entry.get("format") != LABELLER_FORMAT or "weights_file" not in entry:
        raise VertebraIDError("The model's level labeller entry is not valid.")
    path = folder / str(entry["weights_file"])
    if Path(entry["weights_file"]).name != entry["weights_file"] or not path.is_file():
        raise VertebraIDError(f"The model's level labeller '{entry['weights_file']}' is missing.")
    stored = read_weights(path, entry.get("weights_sha256", ""), "level labeller")
    config = LabellerConfig.from_dict(entry.get("config", {}))
    network = build_labeller(config)
    try:
        load_weights_state(network, {k: (v.float() if v.is_floating_point() else v) for k, v in stored.items()})
    except RuntimeError:
        raise VertebraIDError(f"The level labeller '{path.name}' does not fit its configuration.") from None
    return network.to(device).eval(), config


# --------------------------------------------------------------------------- training


def _augment(x: np.ndarray, pairs: np.ndarray, rng: np.random.Generator):
    """A random field of view (half the time), a left-right mirror, an in-plane shift, contrast and noise."""
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
    x = np.roll(x, (int(dx), int(dy)), axis=(0, 1))
    x = x * rng.uniform(0.85, 1.15) + rng.uniform(-0.05, 0.05)
    x = x + rng.normal(0.0, rng.uniform(0.0, 0.03), x.shape)
    return np.ascontiguousarray(x, np.float32), pairs


def prepare_samples(folder: PathLike, seeds, config: LabellerConfig, hu_window, model_spacing_mm: float,
                    progress: Callable | None = None) -> list[Path]:
    """Phantom samples as `<seed>.npz` in `folder` (kept between runs: a rerun only adds missing ones)."""
    from .fileio import atomic_path

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
            sample = phantom_sample(seed, config, hu_window, model_spacing_mm)
            x, pairs = sample if sample is not None else (np.zeros((0, 0, 0), np.uint8), np.zeros((0, 2), np.float32))
            with atomic_path(path) as tmp:
                np.savez_compressed(tmp, x=x, pairs=pairs)
        if progress is not None:
            progress(i + 1, len(seeds))
    return [folder / f"{s}.npz" for s in seeds]


def train_labeller(sample_files, config: LabellerConfig, minutes: float, seed: int = 0,
                   learning_rate: float = 1e-3, log: Callable = print, max_steps: int | None = None):
    """Train on stored samples for `minutes` (cosine schedule over that time) or `max_steps` steps
    (schedule over those), whichever ends first; returns (network, record)."""
    import torch
    import torch.nn.functional as F

    samples = []
    for f in sample_files:
        with np.load(f) as d:
            if d["x"].size:
                samples.append((d["x"], d["pairs"]))
    if not samples:
        raise VertebraIDError("No training samples with at least two vertebrae.")
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    network = build_labeller(config)
    optimizer = torch.optim.AdamW(network.parameters(), learning_rate, weight_decay=1e-4)
    pos_weight = torch.tensor(5.0)  # a bump covers a few planes of ~100: weigh them up
    start, step, recent = time.perf_counter(), 0, []
    total_s = max(float(minutes), 0.01) * 60
    network.train()
    while (elapsed := time.perf_counter() - start) < total_s and (max_steps is None or step < max_steps):
        x, pairs = samples[int(rng.integers(len(samples)))]
        x, pairs = _augment(x.astype(np.float32) / 255.0, pairs, rng)
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
    record = {"steps": step, "minutes": round((time.perf_counter() - start) / 60, 1), "samples": len(samples),
              "final_loss": round(float(np.mean(recent[-500:])), 4) if recent else None, "seed": seed,
              "learning_rate": learning_rate}
    return network, record


def train_for_model(model_path: PathLike, samples: PathLike, phantoms: int = 2000, minutes: float = 30.0,
                    seed: int = 0, attach: bool = False, log: Callable = print) -> tuple[Path, dict]:
    """The whole recipe for a heatmap model: phantom samples (its grid and HU window), training,
    `<model>_labeller.safetensors` beside it and, with `attach`, its entry in the model's metadata."""
    import torch

    from .network import model_paths, read_model_metadata

    if isinstance(phantoms, bool) or int(phantoms) < 1 or not float(minutes) > 0:
        raise VertebraIDError("The number of phantoms and the training minutes must be positive.")
    weights, _ = model_paths(model_path)
    meta = read_model_metadata(weights)
    config = LabellerConfig()
    window = meta["normalization"]["hu_window"]

    def show(done, total):
        if done % 100 == 0 or done == total:
            log(f"phantom samples {done}/{total}")

    files = prepare_samples(samples, range(int(phantoms)), config, window, float(min(meta["spacing_mm"])), show)
    network, record = train_labeller(files, config, minutes, seed, log=log)
    record.update({"data": f"phantoms, seeds 0..{int(phantoms) - 1}, rendered at 2 or 3 mm",
                   "threads": torch.get_num_threads()})
    out = weights.with_name(f"{weights.stem}_labeller.safetensors")
    entry = save_labeller(network, config, out, record)
    log(f"labeller -> {out}")
    if attach:
        log(f"recorded in {attach_labeller(weights, entry)}")
    return out, entry
