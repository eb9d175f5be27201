"""Images as a numpy array plus the affine that maps voxel indices to RAS millimetres.

A `Volume`'s array axes are the voxel axes (i, j, k[, channel]) and its `affine` maps
(i, j, k, 1) to RAS (Slicer's world). Orientation is never assumed from axis order: code that
needs "superior" asks the affine. Files become Volumes in `io.images`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import map_coordinates

from ..errors import VertebraIDError

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass
class Volume:
    """A 3-D (or 4-D, channels last) image with its voxel-to-RAS affine."""

    array: np.ndarray
    affine: np.ndarray

    def __post_init__(self):
        self.affine = np.asarray(self.affine, dtype=float)
        if self.affine.shape != (4, 4):
            raise VertebraIDError("An image affine must be a 4x4 matrix.")
        if self.array.ndim not in (3, 4):
            raise VertebraIDError(f"Expected a 3-D or 4-D image, got {self.array.ndim} dimensions.")

    @property
    def shape3(self) -> tuple[int, int, int]:
        return tuple(self.array.shape[:3])

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size (mm) along i, j, k."""
        return np.linalg.norm(self.affine[:3, :3], axis=0)

    def voxel_to_world(self, ijk: np.ndarray) -> np.ndarray:
        """RAS millimetres of voxel indices (..., 3)."""
        ijk = np.asarray(ijk, dtype=float)
        return ijk @ self.affine[:3, :3].T + self.affine[:3, 3]

    def world_to_voxel(self, ras: np.ndarray) -> np.ndarray:
        """Fractional voxel indices of RAS points (..., 3)."""
        inv = np.linalg.inv(self.affine)
        ras = np.asarray(ras, dtype=float)
        return ras @ inv[:3, :3].T + inv[:3, 3]

    def axis_most_along(self, direction) -> tuple[int, float]:
        """The voxel axis closest to a RAS direction, and the sign of its alignment."""
        cols = self.affine[:3, :3] / self.spacing
        dots = cols.T @ np.asarray(direction, dtype=float)
        axis = int(np.argmax(np.abs(dots)))
        return axis, float(np.sign(dots[axis]))

    def channel(self, c: int) -> "Volume":
        """One channel of a 4-D volume as a 3-D Volume (a view)."""
        return Volume(self.array[..., c], self.affine)

    def corners_world(self) -> np.ndarray:
        """RAS coordinates of the 8 corner voxel centres."""
        n = np.array(self.shape3) - 1
        corners = np.array([[a, b, c] for a in (0, n[0]) for b in (0, n[1]) for c in (0, n[2])], float)
        return self.voxel_to_world(corners)


def check_finite(array: np.ndarray, what: str = "The image") -> None:
    """One sentence when the array holds NaN or infinite values."""
    if not np.isfinite(array).all():
        raise VertebraIDError(f"{what} contains NaN or infinite values.")


# --------------------------------------------------------------------------- reading

# --------------------------------------------------------------------------- writing


def resample_to_spacing(volume: Volume, spacing_mm: float, order: int = 1) -> Volume:
    """Resample onto an axis-aligned RAS grid of isotropic spacing covering the same extent."""
    corners = volume.corners_world()
    lo, hi = corners.min(0), corners.max(0)
    shape = np.maximum(np.floor((hi - lo) / spacing_mm).astype(int) + 1, 1)
    affine = np.eye(4)
    affine[:3, :3] = np.eye(3) * spacing_mm
    affine[:3, 3] = lo
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)
    src = volume.world_to_voxel(grid * spacing_mm + lo).T
    if volume.array.ndim == 3:
        out = map_coordinates(volume.array, src, order=order, mode="constant", cval=float(volume.array.min()))
        return Volume(out.reshape(tuple(shape)).astype(volume.array.dtype), affine)
    chans = [
        map_coordinates(volume.array[..., c], src, order=order, mode="constant", cval=0.0).reshape(tuple(shape))
        for c in range(volume.array.shape[3])
    ]
    return Volume(np.stack(chans, -1).astype(volume.array.dtype), affine)
