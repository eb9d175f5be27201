"""A CT as the networks see it (shared by inference and training, so both see the same image).

1. checks: a 3-D scan, at least 40 mm along each axis, at most 2 m, with CT intensities
   (Hounsfield units: fat or air below -200 HU somewhere; MRI and raw detector values have
   none), finite;
2. anti-aliasing: block averaging by the largest whole factor that keeps the voxels finer than
   the model's (a 0.8 mm scan becomes ~3.2 mm before resampling to 4 mm); cheap, and it keeps
   peak memory close to the size of the input;
3. MONAI `Orientation` to RAS and `Spacing` to the model's voxel size (trilinear);
4. MONAI `ScaleIntensityRange`: the model's HU window (bone-centred by default) to [0, 1].
"""
from __future__ import annotations

import numpy as np

from ..engine.volume import Volume, check_finite
from ..errors import VertebraIDError

MIN_EXTENT_MM = 40.0
MAX_EXTENT_MM = 2000.0
MAX_INPUT_VOXELS = 1_500_000_000
#: A CT has fat (about -100 HU) or air (-1000 HU); this share of voxels must lie below -200 HU.
CT_LOW_HU = -200.0
CT_MIN_LOW_FRACTION = 0.002


def check_ct(ct: Volume) -> None:
    """One clear sentence for anything that is not a 3-D CT in Hounsfield units."""
    check_scan_geometry(ct)
    array = ct.array
    sample = array[:: max(1, array.shape[0] // 64), :: max(1, array.shape[1] // 64), :: max(1, array.shape[2] // 64)]
    low = float(np.mean(sample < CT_LOW_HU))
    if low < CT_MIN_LOW_FRACTION or float(np.median(sample)) > 1500:
        raise VertebraIDError(
            "The image intensities do not look like CT Hounsfield units (no fat or air below -200 HU); "
            "VertebraID needs a CT scan, not MRI or unscaled values."
        )


def check_scan_geometry(ct: Volume) -> None:
    """One clear sentence for anything that is not a finite 3-D scan of a plausible size."""
    array = ct.array
    if array.ndim != 3:
        raise VertebraIDError(f"Expected a 3-D CT scan, got an image with {array.ndim} dimensions ({array.shape}).")
    if min(array.shape) < 2:
        raise VertebraIDError(f"The image is 2-D (shape {array.shape}); a 3-D CT scan is needed.")
    if array.size > MAX_INPUT_VOXELS:
        raise VertebraIDError(f"The scan has {array.size:,} voxels, more than the {MAX_INPUT_VOXELS:,} supported.")
    extent = ct.spacing * np.array(array.shape)
    if extent.min() < MIN_EXTENT_MM:
        raise VertebraIDError(
            f"The scan is too small ({' x '.join(f'{e:.0f}' for e in extent)} mm); at least {MIN_EXTENT_MM:.0f} mm "
            "along each axis is needed to see vertebrae."
        )
    if extent.max() > MAX_EXTENT_MM:
        raise VertebraIDError(
            f"The scan is too large ({' x '.join(f'{e:.0f}' for e in extent)} mm); check its voxel size "
            f"(at most {MAX_EXTENT_MM:.0f} mm along an axis)."
        )
    check_finite(array, "The CT")


def _block_average(ct: Volume, spacing_mm) -> Volume:
    """Average whole blocks of voxels so that the voxels stay finer than `spacing_mm` (anti-aliasing)."""
    import torch

    # voxel axes need not be RAS axes: the model spacing's smallest value bounds every axis
    factors = np.maximum(np.floor(min(spacing_mm) / ct.spacing + 1e-6).astype(int), 1)
    if np.all(factors == 1):
        return ct
    # Image readers often give Fortran-ordered arrays: pool their C-ordered transpose (a view), not a
    # reordered copy of the whole CT, and transpose the small result back.
    transposed = not ct.array.flags.c_contiguous and ct.array.flags.f_contiguous
    data, kernel = (ct.array.T, factors[::-1]) if transposed else (ct.array, factors)
    tensor = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))[None, None]
    pooled = torch.nn.functional.avg_pool3d(tensor, kernel_size=tuple(int(f) for f in kernel), ceil_mode=False)
    pooled = pooled[0, 0].numpy()
    affine = ct.affine.copy()
    affine[:3, 3] = ct.voxel_to_world((factors - 1) / 2.0)
    affine[:3, :3] = ct.affine[:3, :3] * factors
    return Volume(pooled.T if transposed else pooled, affine)


def _to_meta_tensor(volume: Volume):
    import torch
    from monai.data import MetaTensor

    array = np.ascontiguousarray(volume.array, dtype=np.float32)
    return MetaTensor(torch.from_numpy(array)[None], affine=torch.as_tensor(volume.affine, dtype=torch.float64))


def window_intensity(volume: Volume, hu_window) -> Volume:
    """HU window -> [0, 1] (MONAI ScaleIntensityRange, clipped)."""
    from monai.transforms import ScaleIntensityRange

    lo, hi = float(hu_window[0]), float(hu_window[1])
    scaled = ScaleIntensityRange(a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True)(volume.array.astype(np.float32))
    return Volume(np.asarray(scaled, dtype=np.float32), volume.affine)


def reduce_and_window(ct: Volume, spacing_mm, hu_window) -> Volume:
    """Checks, anti-aliasing and windowing: the image before resampling (training uses this too)."""
    check_ct(ct)
    return window_intensity(_block_average(ct, spacing_mm), hu_window)


def preprocess(ct: Volume, spacing_mm, hu_window) -> Volume:
    """The network's input grid: RAS-oriented, at `spacing_mm`, intensities in [0, 1]."""
    from monai.transforms import Orientation, Spacing

    spacing = tuple(float(s) for s in (spacing_mm if hasattr(spacing_mm, "__len__") else [spacing_mm] * 3))
    reduced = reduce_and_window(ct, spacing, hu_window)
    img = _to_meta_tensor(reduced)
    img = Orientation(axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")))(img)
    img = Spacing(pixdim=spacing, mode="bilinear", padding_mode="zeros", dtype=np.float32)(img)
    return Volume(np.ascontiguousarray(img[0].numpy(), dtype=np.float32), np.asarray(img.affine, dtype=float))
