"""Any detector's points as evidence: render them into activation maps, run the same pipeline.

A point may carry probabilities per region ("C", "T", "L", "S") or per level ("L4"...),
unnormalised. Each level's channel gets the point's blob scaled by that level's
probability relative to the point's most likely level, so a confident lumbar point fires all
five lumbar channels at full height and the chain's spacing and order pick which one.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from .anatomy import LEVELS_26, NUM_CHANNELS, region
from .errors import VertebraIDError
from .pipeline import Constraint, LocateOptions, Result, locate
from .vertebrae import Vertebra
from .volume import Volume

REGIONS = ("C", "T", "L", "S")


def level_weights(probabilities: dict | None) -> np.ndarray:
    """Channel weights (26,) in [0, 1] for one point; all ones when nothing is known."""
    if not probabilities:
        return np.ones(NUM_CHANNELS, np.float32)
    w = np.zeros(NUM_CHANNELS, np.float32)
    regions_given = {k: float(v) for k, v in probabilities.items() if k in REGIONS}
    levels_given = {k: float(v) for k, v in probabilities.items() if k not in REGIONS}
    for key, value in list(regions_given.items()) + list(levels_given.items()):
        if not np.isfinite(value) or value < 0:
            raise VertebraIDError(f"Probability '{key}' must be a finite number >= 0, got {value}.")
    for c, name in enumerate(LEVELS_26):
        if name in levels_given:
            w[c] = levels_given[name]
        elif regions_given:
            w[c] = regions_given.get(region(name), 0.0)
    for name in levels_given:
        if name not in LEVELS_26 and name not in ("T13", "L6"):
            raise VertebraIDError(f"Unknown level '{name}' in point probabilities.")
    peak = w.max()
    return w / peak if peak > 0 else np.ones(NUM_CHANNELS, np.float32)


def grid_around(positions_ras: np.ndarray, spacing_mm: float, margin_mm: float) -> Volume:
    """An empty axis-aligned RAS grid covering the points plus a margin."""
    lo = positions_ras.min(axis=0) - margin_mm
    hi = positions_ras.max(axis=0) + margin_mm
    shape = tuple(int(n) for n in np.ceil((hi - lo) / spacing_mm).astype(int) + 1)
    affine = np.eye(4)
    affine[:3, :3] *= spacing_mm
    affine[:3, 3] = lo
    return Volume(np.zeros(shape, np.float32), affine)


def _check_positions(positions_ras) -> np.ndarray:
    positions = np.asarray(positions_ras, dtype=float)
    if positions.ndim != 2 or positions.shape[1] != 3:
        raise VertebraIDError("Points must be a list of [x, y, z] positions.")
    if not np.isfinite(positions).all():
        raise VertebraIDError("A point position is NaN or infinite.")
    return positions


def render_point_heatmaps(
    positions_ras,
    probabilities: list[dict | None] | None = None,
    reference: Volume | None = None,
    sigma_mm: float = 4.0,
    spacing_mm: float = 2.0,
    margin_mm: float = 60.0,
) -> Volume:
    """26-channel activation maps with one Gaussian blob per point (on `reference`'s grid if given)."""
    from .simulate import render_gaussians

    positions = _check_positions(positions_ras)
    probabilities = probabilities or [None] * len(positions)
    if len(probabilities) != len(positions):
        raise VertebraIDError("There must be one probability entry per point.")
    grid = reference if reference is not None else grid_around(positions, spacing_mm, margin_mm)
    weights = np.stack([level_weights(p) for p in probabilities]) if len(positions) else np.zeros((0, NUM_CHANNELS))
    array = render_gaussians(positions, weights, grid, sigma_mm) if len(positions) else np.zeros(grid.shape3 + (NUM_CHANNELS,), np.float32)
    return Volume(array, grid.affine)


@dataclass
class PointLabelling:
    result: Result  # the pipeline's result on the rendered maps
    vertebrae: list[Vertebra]  # labelled input points (source_index set) and inferred ones (None)
    rejected: list[int]  # input points that received no label


def label_points(
    positions_ras,
    probabilities: list[dict | None] | None = None,
    options: LocateOptions = LocateOptions(),
    constraints: list[Constraint] | None = None,
    *,
    sigma_mm: float = 4.0,
    spacing_mm: float = 2.0,
    match_mm: float = 12.0,
    include_inferred: bool = True,
    energy_params=None,
) -> PointLabelling:
    """Label unlabelled points: render, locate, then give each chain vertebra its nearest point.

    A chain vertebra takes the nearest input point within `match_mm` (each point at most once,
    closest pairs first); points left over are rejected. Chain vertebrae with no point are the
    optimiser's inference of a missed vertebra, kept when `include_inferred`.
    """
    from .simulate import render_gaussians

    positions = _check_positions(positions_ras)
    if len(positions) == 0:
        empty = locate(Volume(np.zeros((2, 2, 2, NUM_CHANNELS), np.float32), np.eye(4)), options)
        return PointLabelling(empty, [], [])
    heatmaps = render_point_heatmaps(positions, probabilities, None, sigma_mm, spacing_mm)
    # Ĝ: one unit blob per point, whatever its level weights.
    combined = Volume(render_gaussians(positions, np.ones((len(positions), 1)), heatmaps, sigma_mm)[..., 0], heatmaps.affine)
    options = replace(options, sigma_mm=sigma_mm)
    result = locate(heatmaps, options, constraints, combined=combined, energy_params=energy_params)

    chain = result.vertebrae
    labelled: list[Vertebra] = []
    taken_points: set[int] = set()
    taken_chain: set[int] = set()
    if chain:
        d = np.linalg.norm(np.array([v.position for v in chain])[:, None, :] - positions[None, :, :], axis=2)
        for flat in np.argsort(d, axis=None):
            i, j = np.unravel_index(flat, d.shape)
            if d[i, j] > match_mm:
                break
            if i in taken_chain or j in taken_points:
                continue
            taken_chain.add(int(i))
            taken_points.add(int(j))
            v = chain[i]
            labelled.append(Vertebra(v.label, positions[j], v.confidence, source_index=int(j), locked=v.locked))
    if include_inferred:
        for i, v in enumerate(chain):
            if i not in taken_chain:
                labelled.append(Vertebra(v.label, v.position, v.confidence, source_index=None, extra={"inferred": True}))
    from .vertebrae import sort_by_level

    rejected = sorted(set(range(len(positions))) - taken_points)
    return PointLabelling(result, sort_by_level(labelled), rejected)
