"""Spine centreline from the combined activation map Ĝ, and its moving frames (paper §3.2).

The centreline is traced through mass centres of Ĝ's slices perpendicular to the patient's
superior-inferior axis. Slices are taken in world (RAS) space, binned by the superior
coordinate, so the array's axis order and orientation never matter.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.interpolate import make_interp_spline
from scipy.ndimage import gaussian_filter1d

from ..errors import VertebraIDError
from .anatomy import CHANNEL_OF
from .volume import Volume

ANTERIOR = np.array([0.0, 1.0, 0.0])  # RAS


@dataclass
class Centerline:
    """An arc-length parameterised curve from cranial to caudal, with a frame per sample.

    e3 is the unit tangent (pointing caudally), e1 the unit normal closest to anterior, and
    e2 = e3 x e1 completes a right-handed frame (e1 x e2 = e3). `supported` marks the samples
    backed by activation (the rest are the short extensions past both ends).
    """

    points: np.ndarray  # (T, 3) RAS mm
    e1: np.ndarray  # (T, 3)
    e2: np.ndarray  # (T, 3)
    e3: np.ndarray  # (T, 3)
    step_mm: float
    supported: np.ndarray  # (T,) bool

    def __len__(self) -> int:
        return len(self.points)

    def interpolate(self, t: np.ndarray | float):
        """Point and frame at fractional sample index t (linear between samples)."""
        t = np.clip(np.asarray(t, dtype=float), 0, len(self.points) - 1)
        i0 = np.floor(t).astype(int)
        i1 = np.minimum(i0 + 1, len(self.points) - 1)
        w = (t - i0)[..., None]

        def lerp(a):
            return a[i0] * (1 - w) + a[i1] * w

        return lerp(self.points), lerp(self.e1), lerp(self.e2), lerp(self.e3)

    def project(self, ras: np.ndarray) -> np.ndarray:
        """Fractional sample index of the centreline point nearest each RAS point (N,)."""
        ras = np.atleast_2d(np.asarray(ras, dtype=float))
        d = np.linalg.norm(ras[:, None, :] - self.points[None, :, :], axis=2)
        nearest = np.argmin(d, axis=1)
        # refine along the local tangent
        offset = np.einsum("nj,nj->n", ras - self.points[nearest], self.e3[nearest]) / self.step_mm
        return np.clip(nearest + np.clip(offset, -1, 1), 0, len(self.points) - 1)


def _slab_centres(world: np.ndarray, weights: np.ndarray, z_edges: np.ndarray):
    """Weighted mean (x, y) and total weight of points in each superior-coordinate slab."""
    nbins = len(z_edges) - 1
    b = np.clip(np.searchsorted(z_edges, world[:, 2], side="right") - 1, 0, nbins - 1)
    mass = np.bincount(b, weights, nbins)
    with np.errstate(invalid="ignore", divide="ignore"):
        cx = np.bincount(b, weights * world[:, 0], nbins) / mass
        cy = np.bincount(b, weights * world[:, 1], nbins) / mass
    return cx, cy, mass


def _smooth_track(z: np.ndarray, values: np.ndarray, mass: np.ndarray, sigma_bins: float) -> np.ndarray:
    """Fill empty slabs by linear interpolation, then smooth with weights (normalised convolution)."""
    ok = mass > 0
    filled = np.interp(z, z[ok], values[ok])
    w = np.where(ok, mass, mass[ok].max() * 1e-3)
    num = gaussian_filter1d(filled * w, sigma_bins, mode="nearest")
    den = gaussian_filter1d(w, sigma_bins, mode="nearest")
    return num / den


def trace_centerline(
    combined: Volume,
    *,
    threshold: float = 0.5,
    min_peak: float = 0.05,
    step_mm: float = 2.0,
    smooth_mm: float = 12.0,
    extend_mm: float = 20.0,
    radii_mm: tuple[float, ...] = (40.0, 25.0, 20.0),
) -> Centerline | None:
    """Trace the spine centreline through Ĝ; None when no voxel reaches `min_peak`.

    Voxels above `threshold` x (Ĝ's peak) are kept; their activation-weighted mass centres per
    slab give a first track. Activation far from the spine (ribs, pelvis, false positives)
    would drag slab centres sideways, so the track is re-estimated a few times from voxels
    within a shrinking radius of the previous smooth track.
    """
    g = combined.array
    peak = float(g.max()) if g.size else 0.0
    if not np.isfinite(peak) or peak < min_peak:
        return None
    idx = np.nonzero(g > threshold * peak)
    weights = g[idx].astype(float)
    world = combined.voxel_to_world(np.stack(idx, axis=1))
    if len(world) < 2:
        return None

    slab = step_mm
    z_lo, z_hi = world[:, 2].min(), world[:, 2].max()
    if z_hi - z_lo < slab:
        z_hi = z_lo + slab
    z_edges = np.arange(z_lo - 1e-6, z_hi + slab, slab)
    z = 0.5 * (z_edges[:-1] + z_edges[1:])
    sigma_bins = max(smooth_mm / slab, 0.5)

    keep = np.ones(len(world), dtype=bool)
    for radius in (None,) + tuple(radii_mm):
        if radius is not None:
            b = np.clip(np.searchsorted(z_edges, world[:, 2], side="right") - 1, 0, len(z) - 1)
            dist = np.hypot(world[:, 0] - x_track[b], world[:, 1] - y_track[b])
            keep = dist <= radius
            if not keep.any():
                break
        cx, cy, mass = _slab_centres(world[keep], weights[keep], z_edges)
        x_track = _smooth_track(z, cx, mass, sigma_bins)
        y_track = _smooth_track(z, cy, mass, sigma_bins)
        has_mass = mass > 0

    # Cranial first: the label order (C1 -> S2) runs down the body.
    order = np.argsort(-z)
    track = np.stack([x_track[order], y_track[order], z[order]], axis=1)
    has_mass = has_mass[order]
    first, last = np.nonzero(has_mass)[0][[0, -1]]
    track = track[first : last + 1]
    n_ext = _n_ext(extend_mm, slab)
    track = _extend(track, n_ext)
    points, vertex_arc = _resample_by_arc_length(track, step_mm)
    # samples between the first and last supported slab (extensions excluded)
    lo = vertex_arc[n_ext] / step_mm
    hi = vertex_arc[len(track) - 1 - n_ext] / step_mm
    supported = np.zeros(len(points), dtype=bool)
    supported[int(np.floor(lo)) : int(np.ceil(hi)) + 1] = True
    e1, e2, e3 = moving_frames(points)
    return Centerline(points, e1, e2, e3, float(step_mm), supported)


def _n_ext(extend_mm: float, slab: float) -> int:
    return int(round(extend_mm / slab))


def _extend(track: np.ndarray, n: int) -> np.ndarray:
    """Continue the track n slabs past both ends along its end directions (averaged over ~10 slabs)."""
    if n == 0:
        return track
    if len(track) < 2:
        return np.concatenate([np.repeat(track[:1], n, 0), track, np.repeat(track[-1:], n, 0)])
    m = min(len(track) - 1, 10)
    head_dir = (track[0] - track[m]) / m
    tail_dir = (track[-1] - track[-1 - m]) / m
    steps = np.arange(1, n + 1)[:, None]
    head = track[0] + steps[::-1] * head_dir
    tail = track[-1] + steps * tail_dir
    return np.concatenate([head, track, tail])


def _resample_by_arc_length(track: np.ndarray, step_mm: float):
    """Points every step_mm along the polyline, and the arc length at each input vertex."""
    seg = np.linalg.norm(np.diff(track, axis=0), axis=1)
    s = np.concatenate([[0.0], np.cumsum(seg)])
    n = max(int(np.floor(s[-1] / step_mm)) + 1, 2)
    s_new = np.arange(n) * step_mm
    points = np.stack([np.interp(s_new, s, track[:, d]) for d in range(3)], axis=1)
    return points, s


def moving_frames(points: np.ndarray):
    """Tangent e3, anterior-most normal e1, and e2 = e3 x e1 at each point."""
    if len(points) < 2:
        e3 = np.tile([0.0, 0.0, -1.0], (len(points), 1))
    else:
        e3 = np.gradient(points, axis=0)
    e3 = e3 / np.maximum(np.linalg.norm(e3, axis=1, keepdims=True), 1e-9)
    e1 = ANTERIOR - (e3 @ ANTERIOR)[:, None] * e3
    norm = np.linalg.norm(e1, axis=1)
    bad = norm < 1e-6  # tangent along anterior: borrow a neighbour's normal
    e1 = e1 / np.maximum(norm, 1e-9)[:, None]
    if bad.any():
        good = np.nonzero(~bad)[0]
        fallback = np.array([0.0, 0.0, 1.0])
        for i in np.nonzero(bad)[0]:
            e1[i] = e1[good[np.argmin(np.abs(good - i))]] if len(good) else fallback
    e2 = np.cross(e3, e1)
    return e1, e2, e3


def centerline_through(vertebrae, step_mm: float, rng: np.random.Generator | None = None, jitter_mm: float = 0.0,
                       extend_mm=(20.0, 20.0)) -> Centerline:
    """A centreline through known body centres (a smooth curve), extended past both ends.

    `jitter_mm` moves each centre by Gaussian noise (`rng`), as a traced centreline strays;
    `extend_mm` (head, tail) continues the curve past the end vertebrae.
    """
    known = sorted((v for v in vertebrae if v.label in CHANNEL_OF), key=lambda v: CHANNEL_OF[v.label])
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
    return polyline_centerline(extended[n - head : n + len(dense) + tail], step_mm)


def polyline_centerline(track: np.ndarray, step_mm: float) -> Centerline:
    """A centreline every `step_mm` along a polyline, every sample counted as supported."""
    points, _ = _resample_by_arc_length(track, step_mm)
    e1, e2, e3 = moving_frames(points)
    return Centerline(points, e1, e2, e3, float(step_mm), np.ones(len(points), bool))


def curve_through_samples(points: np.ndarray, supported: np.ndarray, step_mm: float) -> tuple[Centerline, np.ndarray]:
    """A centreline through `points` (one per sample of another centreline, cranial first), every
    `step_mm` by arc length; and each new sample's fractional index among the given points (to carry
    per-sample values over). A new sample is supported where the nearest given one is."""
    points = np.asarray(points, float)
    seg = np.linalg.norm(np.diff(points, axis=0), axis=1)
    arc = np.concatenate([[0.0], np.cumsum(seg)])
    n = max(int(np.floor(arc[-1] / step_mm)) + 1, 2)
    t = np.interp(np.arange(n) * step_mm, arc, np.arange(len(points), dtype=float))
    new = np.stack([np.interp(t, np.arange(len(points)), points[:, d]) for d in range(3)], axis=1)
    e1, e2, e3 = moving_frames(new)
    keep = np.asarray(supported, bool)[np.clip(np.round(t).astype(int), 0, len(points) - 1)]
    return Centerline(new, e1, e2, e3, float(step_mm), keep), t


def centerline_of_samples(points: np.ndarray, step_mm: float, supported: np.ndarray) -> Centerline:
    """A centreline whose samples are `points` as they are (already `step_mm` apart: a stored one)."""
    points = np.asarray(points, float)
    e1, e2, e3 = moving_frames(points)
    return Centerline(points, e1, e2, e3, float(step_mm), np.asarray(supported, bool))
