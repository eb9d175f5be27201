"""Validation during training: the whole chain on held-out phantoms, as `vertebraid detect` runs it.

`validate` builds a Model from the network being trained (with a level labeller when its
metadata names one) and calls `networks.predict.detect` on each case, so the validation id rate
is exactly what `detect` would report on the same phantoms. The network alone is measured too:
how often a level's own map peaks at its vertebra, and which channel fires on each vertebra.
"""
from __future__ import annotations

import time

import numpy as np

from ..engine.anatomy import CHANNEL_OF, LEVELS_26, region
from ..engine.settings import EngineSettings
from ..evaluation.metrics import evaluate_case, summarize
from ..networks.bundle import in_memory_model
from ..networks.predict import detect
from ..synthetic.phantom import generate_phantom
from .config import TrainConfig


def validation_cases(config: TrainConfig) -> list[tuple]:
    """(name, ct, truth) of the held-out phantoms."""
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


def validate(network, metadata: dict, cases, config: TrainConfig, device, folder=None) -> dict:
    """Id rate of `vertebraid detect` with this network and metadata: `detect` -> metrics.

    The model is the one the run writes (`metadata`: its σ, and its level labeller, read from
    `folder`, and engine settings when it names them), so `vertebraid detect --model` on the
    same cases reports the same identification.
    """
    module = getattr(network, "module", network)
    was_training = module.training
    model = in_memory_model(module.eval(), metadata, device, folder)
    settings = EngineSettings(method=config.validation.method)
    evaluations, peak_errors, strongest = [], [], []
    t0 = time.perf_counter()
    for name, ct, truth in cases:
        result = detect(ct, model, settings)
        heatmaps = result.prepared.heatmaps
        peak_errors += level_peak_errors(heatmaps, truth)
        strongest += strongest_levels(heatmaps, truth)
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
