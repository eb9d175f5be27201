"""Any detector's points as evidence: render them into activation maps, run the same pipeline.

A point may carry probabilities per region ("C", "T", "L", "S") or per level ("L4"...),
unnormalised. Each level's channel gets the point's blob scaled by that level's
probability relative to the point's most likely level, so a confident lumbar point fires all
five lumbar channels at full height and the chain's spacing and order pick which one.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import VertebraIDError
from .anatomy import LEVELS_26, NUM_CHANNELS, region
from .corrections import Constraint
from .evidence import Evidence
from .pipeline import Result, locate
from .settings import EngineSettings
from .vertebrae import Vertebra, sort_by_level
from .volume import Volume

REGIONS = ("C", "T", "L", "S")


def render_gaussians(
    centres_ras,
    channel_weights,
    reference,
    sigma_mm,
    *,
    truncate: float = 4.0,
    combine: str = "max",
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Gaussian blobs on a grid: blob n adds `channel_weights[n, c] * exp(-d^2 / 2 sigma_n^2)` to channel c.

    `reference` is anything with `affine` (voxel -> RAS) and `shape3` (or an `array`); each blob
    is evaluated only in the voxel box that holds its sphere of radius `truncate * sigma`, so the
    cost grows with the number of blobs, not the grid. `combine` is "max" (overlapping blobs keep
    their peaks, as a network regressing Gaussians would) or "sum". Returns float32 (I, J, K, C);
    with `out` given, blobs are drawn into it (it must have that shape).
    """
    centres = np.atleast_2d(np.asarray(centres_ras, dtype=float))
    weights = np.atleast_2d(np.asarray(channel_weights, dtype=np.float32))
    if centres.shape[1] != 3 or weights.shape[0] != centres.shape[0]:
        raise ValueError("centres_ras must be (N, 3) and channel_weights (N, C) with the same N.")
    if combine not in ("max", "sum"):
        raise ValueError("combine must be 'max' or 'sum'.")
    sigmas = np.broadcast_to(np.asarray(sigma_mm, dtype=float), (centres.shape[0],))
    shape = tuple(getattr(reference, "shape3", None) or np.shape(reference.array)[:3])
    channels = weights.shape[1]
    if out is None:
        out = np.zeros(shape + (channels,), dtype=np.float32)
    elif out.shape != shape + (channels,):
        raise ValueError(f"out has shape {out.shape}, expected {shape + (channels,)}.")
    affine = np.asarray(reference.affine, dtype=float)
    linear = affine[:3, :3]
    inverse = np.linalg.inv(linear)
    gram = linear.T @ linear  # squared world distance of a voxel-index offset
    reach = np.linalg.norm(inverse, axis=1)  # voxel extent per mm of world radius, per axis
    ijk_centres = (centres - affine[:3, 3]) @ inverse.T
    dims = np.array(shape)
    for ijk, sigma, w in zip(ijk_centres, sigmas, weights):
        active = np.flatnonzero(w)
        if active.size == 0 or sigma <= 0:
            continue
        radius = truncate * sigma
        lo = np.maximum(np.ceil(ijk - radius * reach).astype(int), 0)
        hi = np.minimum(np.floor(ijk + radius * reach).astype(int), dims - 1)
        if np.any(hi < lo):
            continue
        di, dj, dk = (np.arange(lo[a], hi[a] + 1) - ijk[a] for a in range(3))
        di, dj, dk = di[:, None, None], dj[None, :, None], dk[None, None, :]
        dist2 = (
            gram[0, 0] * di * di + gram[1, 1] * dj * dj + gram[2, 2] * dk * dk
            + 2.0 * (gram[0, 1] * di * dj + gram[0, 2] * di * dk + gram[1, 2] * dj * dk)
        )
        blob = np.exp(-dist2 / (2.0 * sigma * sigma)).astype(np.float32)
        blob[dist2 > radius * radius] = 0.0
        box = out[lo[0] : hi[0] + 1, lo[1] : hi[1] + 1, lo[2] : hi[2] + 1]
        for c in active:
            target = box[..., c]
            if combine == "max":
                np.maximum(target, w[c] * blob, out=target)
            else:
                target += w[c] * blob
    return out


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


def has_level_evidence(probabilities: list[dict | None] | None) -> bool:
    """Whether any point names a level (not only a region).

    The paper's anchor weights say that C1, C2, S1 and S2 are told apart from their neighbours
    more reliably; evidence that only names a region carries no such distinction, so with it
    the weights would only pull chains towards the ends of the spine.
    """
    return any(p and any(k not in REGIONS for k in p) for p in (probabilities or []))


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
    positions = _check_positions(positions_ras)
    probabilities = probabilities or [None] * len(positions)
    if len(probabilities) != len(positions):
        raise VertebraIDError("There must be one probability entry per point.")
    grid = reference if reference is not None else grid_around(positions, spacing_mm, margin_mm)
    if len(positions) == 0:
        return Volume(np.zeros(grid.shape3 + (NUM_CHANNELS,), np.float32), grid.affine)
    weights = np.stack([level_weights(p) for p in probabilities])
    return Volume(render_gaussians(positions, weights, grid, sigma_mm), grid.affine)


def point_evidence(
    positions_ras,
    probabilities: list[dict | None] | None = None,
    sigma_mm: float = 4.0,
    spacing_mm: float = 2.0,
    description: str = "points",
) -> Evidence:
    """The points as evidence: 26 maps, and as Ĝ one unit blob per point whatever its level weights.

    The anchor weights apply only when some point carries level probabilities (`has_level_evidence`).
    """
    positions = _check_positions(positions_ras)
    heatmaps = render_point_heatmaps(positions, probabilities, None, sigma_mm, spacing_mm)
    unit = np.ones((len(positions), 1), np.float32)
    combined = Volume(render_gaussians(positions, unit, heatmaps, sigma_mm)[..., 0], heatmaps.affine)
    return Evidence(heatmaps, combined, description, {"sigma_mm": float(sigma_mm)},
                    level_specific=has_level_evidence(probabilities))


@dataclass
class PointLabelling:
    """What `label_points` found: the engine's result, the labelled points, and the points left out."""

    result: Result  # the pipeline's result on the rendered maps
    vertebrae: list[Vertebra]  # labelled input points (source_index set) and inferred ones (None)
    rejected: list[int]  # input points that received no label


def label_points(
    positions_ras,
    probabilities: list[dict | None] | None = None,
    settings: EngineSettings = EngineSettings(),
    constraints: list[Constraint] | None = None,
    *,
    sigma_mm: float = 4.0,
    spacing_mm: float = 2.0,
    match_mm: float = 12.0,
    include_inferred: bool = True,
) -> PointLabelling:
    """Label unlabelled points: render, locate, then give each chain vertebra its nearest point.

    The anchor weights apply only when some point carries level probabilities (see
    `has_level_evidence`).

    A chain vertebra takes the nearest input point within `match_mm` (each point at most once,
    closest pairs first); points left over are rejected. Chain vertebrae with no point are the
    optimiser's inference of a missed vertebra, kept when `include_inferred`; a user's fixed point
    (`constraints`) that no input point marks is always kept, where the user put it.
    """
    positions = _check_positions(positions_ras)
    if len(positions) == 0:
        empty = locate(Volume(np.zeros((2, 2, 2, NUM_CHANNELS), np.float32), np.eye(4)), settings)
        return PointLabelling(empty, [], [])
    evidence = point_evidence(positions, probabilities, sigma_mm, spacing_mm)
    result = locate(evidence, settings, constraints)

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
    for i, v in enumerate(chain):
        if i in taken_chain:
            continue
        if v.locked:  # a user's fixed point that no input point marks: kept where the user put it
            labelled.append(Vertebra(v.label, v.position, v.confidence, source_index=None, locked=True))
        elif include_inferred:
            labelled.append(Vertebra(v.label, v.position, v.confidence, source_index=None, extra={"inferred": True}))
    rejected = sorted(set(range(len(positions))) - taken_points)
    return PointLabelling(result, sort_by_level(labelled), rejected)
