"""Straightening along the centreline (paper Eq. 2) and the 1-D signals (Eq. 3).

Grid index (x, y, z) of a straightened volume maps to the world point
    s(z·δ) + e1(z)·(x − cx)·δ + e2(z)·(y − cy)·δ
where (cx, cy) is the grid's centre, so the centreline runs down the middle of the grid.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import map_coordinates

from .centerline import Centerline
from .landmarks import Landmarks
from .volume import Volume


@dataclass
class StraightGrid:
    """The sampling grid in the normal planes of a centreline."""

    centerline: Centerline
    half_width: int  # samples either side of the centreline in x and y
    plane_step_mm: float | None = None  # in-plane sample spacing; default: the step along the spine

    @property
    def step_mm(self) -> float:
        """Spacing along the spine (z)."""
        return self.centerline.step_mm

    @property
    def plane_mm(self) -> float:
        """Spacing within the normal planes (x, y)."""
        return self.plane_step_mm or self.centerline.step_mm

    @property
    def shape(self) -> tuple[int, int, int]:
        n = 2 * self.half_width + 1
        return (n, n, len(self.centerline))

    def world_points(self) -> np.ndarray:
        """RAS coordinates of every grid node, shape (X, Y, Z, 3)."""
        offsets = (np.arange(2 * self.half_width + 1) - self.half_width) * self.plane_mm
        c = self.centerline
        return (
            c.points[None, None, :, :]
            + offsets[:, None, None, None] * c.e1[None, None, :, :]
            + offsets[None, :, None, None] * c.e2[None, None, :, :]
        )

    def to_world(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """RAS of fractional grid indices (x, y, z) (arrays of equal shape) -> (..., 3)."""
        p, e1, e2, _ = self.centerline.interpolate(z)
        dx = (np.asarray(x, float) - self.half_width)[..., None] * self.plane_mm
        dy = (np.asarray(y, float) - self.half_width)[..., None] * self.plane_mm
        return p + dx * e1 + dy * e2

    def display_affine(self) -> np.ndarray:
        """A geometry for viewing the straightened grid: x anterior, y left, z down from the top.

        The grid is not a rigid image of the patient; this places it upright near the
        centreline's top so that a viewer shows the spine vertically.
        """
        d, p = self.step_mm, self.plane_mm
        affine = np.eye(4)
        affine[:3, 0] = [0, p, 0]  # e1 ~ anterior
        affine[:3, 1] = [-p, 0, 0]  # e2 = e3 x e1 ~ left when e3 points down
        affine[:3, 2] = [0, 0, -d]  # caudal
        top = self.centerline.points[0]
        affine[:3, 3] = top - affine[:3, :3] @ np.array([self.half_width, self.half_width, 0.0])
        return affine

    def sample(self, volume: Volume, order: int = 1, cval: float = 0.0) -> np.ndarray:
        """Resample a 3-D or 4-D volume on this grid (linear interpolation by default)."""
        ijk = volume.world_to_voxel(self.world_points().reshape(-1, 3)).T
        shape = self.shape
        if volume.array.ndim == 3:
            out = map_coordinates(volume.array, ijk, order=order, mode="constant", cval=cval, prefilter=False)
            return out.reshape(shape).astype(np.float32)
        # Crop to the sampled region (C-contiguous, channels last) so each gather is cheap.
        lo = np.maximum(np.floor(ijk.min(axis=1)).astype(int), 0)
        hi = np.minimum(np.floor(ijk.max(axis=1)).astype(int) + 2, volume.shape3)
        n_ch = volume.array.shape[3]
        if np.any(hi <= lo):
            return np.full(shape + (n_ch,), cval, np.float32)
        crop = np.ascontiguousarray(volume.array[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]], dtype=np.float32)
        return _trilinear_channels(crop, ijk.T - lo, cval).reshape(shape + (n_ch,))


def _trilinear_channels(array: np.ndarray, ijk: np.ndarray, cval: float) -> np.ndarray:
    """Linear interpolation of every channel of (I, J, K, C) at N points (N, 3) in one pass.

    Equivalent to map_coordinates(order=1) per channel, but the corner indices and weights
    are computed once and each gather reads all channels of a voxel together.
    """
    n_ch = array.shape[3]
    dims = np.array(array.shape[:3])
    base = np.floor(ijk).astype(np.int64)
    frac = (ijk - base).astype(np.float32)
    inside = np.all((ijk >= 0) & (ijk <= dims - 1), axis=1)
    flat = array.reshape(-1, n_ch)
    strides = np.array([dims[1] * dims[2], dims[2], 1])
    out = np.zeros((len(ijk), n_ch), np.float32)
    for corner in np.ndindex(2, 2, 2):
        c = np.array(corner)
        idx = np.clip(base + c, 0, dims - 1)
        w = np.prod(np.where(c == 1, frac, 1.0 - frac), axis=1)
        out += w[:, None] * flat[idx @ strides]
    out[~inside] = cval
    return out


@dataclass
class Rectified:
    """Straightened activation maps and their 1-D signals.

    `signals[:, c]` is Q for channel c and `combined_signal` is Q̂, each minus its noise
    floor and divided by `scale` = 2πσ² (mm²), σ being the activation blobs' width. A
    plane-sum of a 3-D Gaussian of height A and width σ is A·2πσ², so after this division a
    vertebra's peak in Q is its blob height, whatever the grid spacing or σ.
    """

    grid: StraightGrid  # of `combined`
    maps: np.ndarray  # (X', Y', Z, C) on `maps_grid` (coarser in-plane: only their plane sums matter)
    maps_grid: StraightGrid
    combined: np.ndarray  # (X, Y, Z)
    signals: np.ndarray  # (Z, C)
    combined_signal: np.ndarray  # (Z,)
    scale: float
    sigma_mm: float
    # (Z, 26) from the level labeller (networks/labeller.py), on the same samples: added to `signals`
    level_signals: np.ndarray | None = None
    # ribs and sacrum read from the CT along the same samples (landmarks.py)
    landmarks: Landmarks | None = None

    @property
    def evidence(self) -> np.ndarray:
        """What the optimiser weighs per level: the maps' signals, plus the labeller's when there are any."""
        if self.level_signals is None:
            return self.signals
        return self.signals + self.level_signals

    @property
    def step_mm(self) -> float:
        return self.grid.step_mm

    @property
    def affine(self) -> np.ndarray:
        return self.grid.display_affine()

    def straighten(self, volume: Volume, window_mm: float | None = None, order: int = 1) -> Volume:
        """The volume (e.g. the CT) resampled along the centreline, as a displayable Volume."""
        grid = self.grid
        if window_mm is not None:
            grid = StraightGrid(grid.centerline, int(round(window_mm / grid.plane_mm)), grid.plane_step_mm)
        background = float(volume.array.min()) if volume.array.size else 0.0
        return Volume(grid.sample(volume, order=order, cval=background), grid.display_affine())


def _log_curvature_sigma(left: float, centre: float, right: float, step_mm: float) -> float | None:
    """σ of a Gaussian through three equally spaced samples around its top (None if not a top)."""
    if min(left, centre, right) <= 0:
        return None
    curv = np.log(left) - 2 * np.log(centre) + np.log(right)  # = -step²/σ² for a Gaussian
    return step_mm / np.sqrt(-curv) if curv < 0 else None


def estimate_blob_sigma(straight_combined: np.ndarray, combined_signal: np.ndarray, step_mm: float, default_mm: float = 4.0) -> float:
    """Width σ (mm) of the activation blobs, measured across the spine at the peaks of Q̂.

    Along the spine neighbouring vertebrae overlap, but within a normal plane a blob stands
    alone, so its in-plane log-curvature at the maximum gives σ.
    """
    s = np.asarray(combined_signal, float)
    if len(s) < 3 or s.max() <= 0:
        return default_mm
    inner = s[1:-1]
    peaks = np.nonzero((inner > s[:-2]) & (inner >= s[2:]) & (inner > 0.3 * s.max()))[0] + 1
    sigmas = []
    for z in peaks:
        plane = straight_combined[:, :, z]
        i, j = np.unravel_index(int(np.argmax(plane)), plane.shape)
        if 0 < i < plane.shape[0] - 1:
            sigmas.append(_log_curvature_sigma(plane[i - 1, j], plane[i, j], plane[i + 1, j], step_mm))
        if 0 < j < plane.shape[1] - 1:
            sigmas.append(_log_curvature_sigma(plane[i, j - 1], plane[i, j], plane[i, j + 1], step_mm))
    sigmas = [v for v in sigmas if v is not None]
    if not sigmas:
        return default_mm
    return float(np.clip(np.median(sigmas), 1.0, 20.0))


def _baseline(signal: np.ndarray, supported: np.ndarray) -> np.ndarray:
    """Per-channel noise floor of 1-D signals: their median along the supported spine.

    A network's low-level background, summed over a whole normal plane, adds an offset
    comparable to a real vertebra's peak; each channel fires at only a few places along the
    spine, so its median is that offset.
    """
    part = signal[supported] if supported.any() else signal
    return np.median(part, axis=0)


def rectify(
    heatmaps: Volume,
    combined: Volume,
    centerline: Centerline,
    window_mm: float = 25.0,
    sigma_mm: float | None = None,
    combined_is_sum: bool = True,
) -> Rectified:
    """Straighten all channels and Ĝ along the centreline and collapse them to 1-D signals.

    Signals are baseline-subtracted (`combined_is_sum`: Ĝ is the channels' sum, so its floor is
    the sum of theirs) and divided by 2πσ²; σ (the blobs' width) is estimated
    from Q̂ unless given (a model's metadata or a point renderer knows it).
    """
    step = centerline.step_mm
    grid = StraightGrid(centerline, max(int(round(window_mm / step)), 1))
    combined_straight = grid.sample(combined)
    combined_signal = combined_straight.sum(axis=(0, 1), dtype=np.float64) * step**2
    sigma = sigma_mm or estimate_blob_sigma(combined_straight, combined_signal, step)
    # A plane sum of Gaussian blobs sampled every h is exact to ~2·exp(-2π²σ²/h²) (Poisson
    # summation): < 0.1 % at h = 1.5σ. The 26 channels are sampled that coarsely in-plane.
    plane = step * max(1, int(np.floor(1.5 * sigma / step)))
    maps_grid = StraightGrid(centerline, max(int(round(window_mm / plane)), 1), plane)
    maps = maps_grid.sample(heatmaps)
    signals = maps.sum(axis=(0, 1), dtype=np.float64) * plane**2
    channel_floor = _baseline(signals, centerline.supported)
    signals = signals - channel_floor
    # Ĝ = Σ G_v carries the sum of the channels' floors; its own median would also remove the
    # tails between close vertebrae. A supplied Ĝ (rendered points) has no background.
    combined_signal = combined_signal - (channel_floor.sum() if combined_is_sum else 0.0)
    scale = 2 * np.pi * sigma**2
    return Rectified(grid, maps, maps_grid, combined_straight, signals / scale, combined_signal / scale, scale, sigma)
