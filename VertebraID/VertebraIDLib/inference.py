"""CT -> 26 activation maps with the trained network (paper §3.1), on CPU or CUDA.

    model = load_model("model.safetensors", "auto")
    heatmaps = predict_heatmaps(ct, model, "auto", progress)   # Volume (I, J, K, 26) float32, RAS grid
    heatmaps, level_evidence = predict_evidence(ct, model)      # + the level labeller, for pipeline.prepare

Preprocessing (shared with training, so the network sees the same kind of image):
1. checks: a 3-D scan, at least 40 mm along each axis, at most 2 m, with CT intensities
   (Hounsfield units: fat or air below -200 HU somewhere; MRI and raw detector values have
   none), finite;
2. anti-aliasing: block averaging by the largest whole factor that keeps the voxels finer than
   the model's (a 0.8 mm scan becomes ~3.2 mm before resampling to 4 mm); cheap, and it keeps
   peak memory close to the size of the input;
3. MONAI `Orientation` to RAS and `Spacing` to the model's voxel size (trilinear);
4. MONAI `ScaleIntensityRange`: the model's HU window (bone-centred by default) to [0, 1].

Inference: MONAI `SlidingWindowInferer` with Gaussian blending over patches of the model's
patch size; the stitched output stays on the CPU, so GPU memory holds only a few patches
(memory-bounded for any scan size). On CUDA the network runs under float16 autocast (a
regression of smooth blobs does not need float32), on the CPU in float32. The progress callback
is called after every window; returning True raises `pipeline.Cancelled`. Outputs are clipped
at 0 (a Gaussian map is non-negative) and returned channels-last on the model grid with its
RAS affine; `compact=True` returns float16 (half the memory; the pipeline accepts it).
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np

from .errors import VertebraIDError
from .network import Model, load_model, resolve_device  # noqa: F401  (load_model: the Slicer module's loader)
from .volume import Volume, check_finite

ProgressCallback = Callable[[float, str], "bool | None"]

MIN_EXTENT_MM = 40.0
MAX_EXTENT_MM = 2000.0
MAX_INPUT_VOXELS = 1_500_000_000
#: A CT has fat (about -100 HU) or air (-1000 HU); this share of voxels must lie below -200 HU.
CT_LOW_HU = -200.0
CT_MIN_LOW_FRACTION = 0.002


def check_ct(ct: Volume) -> None:
    """One clear sentence for anything that is not a 3-D CT in Hounsfield units."""
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
    sample = array[:: max(1, array.shape[0] // 64), :: max(1, array.shape[1] // 64), :: max(1, array.shape[2] // 64)]
    low = float(np.mean(sample < CT_LOW_HU))
    if low < CT_MIN_LOW_FRACTION or float(np.median(sample)) > 1500:
        raise VertebraIDError(
            "The image intensities do not look like CT Hounsfield units (no fat or air below -200 HU); "
            "VertebraID needs a CT scan, not MRI or unscaled values."
        )


def _block_average(ct: Volume, spacing_mm) -> Volume:
    """Average whole blocks of voxels so that the voxels stay finer than `spacing_mm` (anti-aliasing)."""
    import torch

    # voxel axes need not be RAS axes: the model spacing's smallest value bounds every axis
    factors = np.maximum(np.floor(min(spacing_mm) / ct.spacing + 1e-6).astype(int), 1)
    if np.all(factors == 1):
        return ct
    tensor = torch.from_numpy(np.ascontiguousarray(ct.array, dtype=np.float32))[None, None]
    pooled = torch.nn.functional.avg_pool3d(tensor, kernel_size=tuple(int(f) for f in factors), ceil_mode=False)
    affine = ct.affine.copy()
    affine[:3, 3] = ct.voxel_to_world((factors - 1) / 2.0)
    affine[:3, :3] = ct.affine[:3, :3] * factors
    return Volume(pooled[0, 0].numpy(), affine)


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


def _window_count(shape, roi, overlap: float) -> int:
    count = 1
    for size, r in zip(shape, roi):
        if size <= r:
            continue
        step = max(int(r * (1 - overlap)), 1)
        count *= math.ceil((size - r) / step) + 1
    return count


def predict_heatmaps(
    ct: Volume,
    model: Model,
    device: str = "auto",
    progress: ProgressCallback | None = None,
    *,
    overlap: float = 0.25,
    sw_batch_size: int = 1,
    compact: bool = False,
) -> Volume:
    """The 26 activation maps of a CT on the model's grid (RAS), float32 (float16 when compact)."""
    return predict_evidence(ct, model, device, progress, overlap=overlap, sw_batch_size=sw_batch_size,
                            compact=compact)[0]


def predict_evidence(
    ct: Volume,
    model: Model,
    device: str = "auto",
    progress: ProgressCallback | None = None,
    *,
    overlap: float = 0.25,
    sw_batch_size: int = 1,
    compact: bool = False,
):
    """(the 26 activation maps, the model's level labeller as `pipeline.prepare`'s `level_evidence`
    or None when it has none), the CT prepared once for both networks."""
    import torch
    from monai.inferers import SlidingWindowInferer

    from .pipeline import Cancelled

    if not isinstance(model, Model):
        raise VertebraIDError("predict_heatmaps needs a model from network.load_model.")
    torch_device = resolve_device(device) if device is not None else model.device
    if progress is not None and progress(0.0, "Preparing the CT for the network"):
        raise Cancelled("Preparing the CT for the network")
    image = preprocess(ct, model.spacing_mm, model.hu_window)
    network = model.network.to(torch_device).eval()
    roi = model.patch_size
    total = _window_count(image.shape3, roi, overlap)
    done = [0]

    def run_windows(batch):
        with torch.autocast("cuda", dtype=torch.float16, enabled=torch_device.type == "cuda"):
            out = network(batch)
        done[0] += batch.shape[0]
        if progress is not None:
            fraction = 0.05 + 0.95 * min(done[0] / total, 1.0)
            if progress(fraction, f"Network: window {min(done[0], total)} of {total}"):
                raise Cancelled("Network inference")
        return out.float()

    inferer = SlidingWindowInferer(
        roi_size=roi, sw_batch_size=sw_batch_size, overlap=overlap, mode="gaussian",
        sw_device=torch_device, device=torch.device("cpu"), padding_mode="constant", cval=0.0,
    )
    tensor = torch.from_numpy(image.array)[None, None]
    with torch.inference_mode():
        output = (inferer(tensor, run_windows)[0] / model.heatmap_height).clamp(min=0.0)
    dtype = np.float16 if compact else np.float32
    maps = np.ascontiguousarray(np.moveaxis(output.numpy(), 0, -1), dtype=dtype)
    return Volume(maps, image.affine), _level_evidence(image, model)


def _level_evidence(image: Volume, model: Model):
    """The labeller reading the heatmap network's own input along a centreline (None without one)."""
    if model.labeller is None:
        return None
    from .labeller import level_signals

    network, config = model.labeller
    return lambda centerline: level_signals(network, image, centerline, config)
