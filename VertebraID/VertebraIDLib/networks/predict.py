"""CT -> evidence -> labelled vertebrae with a trained model: the one path every face uses.

    model = load_model("model.safetensors", "auto")
    result = detect(ct, model, EngineSettings(), progress=progress)   # pipeline.Result
    evidence = predict_evidence(ct, model, "auto", progress)            # Evidence for pipeline.locate
    heatmaps = predict_heatmaps(ct, model)                               # the 26 maps alone

`detect` is what `vertebraid detect`, the Slicer module, the benches and the training
validation run, so that a number measured in one place holds in the others.

The CT is prepared once (`preprocess.py`) for both networks. Inference: MONAI
`SlidingWindowInferer` with Gaussian blending over patches of the model's patch size; the
stitched output stays on the CPU, so GPU memory holds only a few patches (memory-bounded for
any scan size). On CUDA the network runs under float16 autocast (a regression of smooth blobs
does not need float32), on the CPU in float32. The progress callback is called after every
window; returning True raises `Cancelled`. Outputs are clipped at 0 (a Gaussian map is
non-negative) and returned channels-last on the model grid with its RAS affine;
`compact=True` returns float16 (half the memory; the pipeline accepts it).
"""
from __future__ import annotations

import math
import time

import numpy as np

from ..engine import pipeline
from ..engine.corrections import Constraint
from ..engine.evidence import Evidence, LevelEvidence, anatomy_from_ct
from ..engine.progress import ProgressCallback, report, scaled
from ..engine.settings import EngineSettings
from ..engine.skeleton import is_bone_only, locate_in_skeleton
from ..engine.volume import Volume
from ..errors import VertebraIDError
from .bundle import Model, resolve_device
from .labeller import level_signals
from .preprocess import check_scan_geometry, preprocess

#: Windowed intensity above which a voxel is the patient (≈ -175 HU with the usual window: fat and
#: every tissue, not air), and the margin kept around the patient (voxels of the network's grid).
BODY_LEVEL = 0.05
BODY_MARGIN = 8
SKELETON_DESCRIPTION = ("bone-only CT: vertebrae found in the bone and named by the ribs and the sacrum "
                        "(no network; every label to be checked)")


def body_box(array: np.ndarray, level: float = BODY_LEVEL, margin: int = BODY_MARGIN) -> tuple[slice, ...]:
    """The patient's bounding box (plus a margin) in the network's input; the whole image when no voxel is above `level`.

    Outside it there is only air, which the windowed input already holds at 0, as the sliding
    window's padding does: cropping to it spares the network the windows that see only air.
    """
    inside = array > level
    if not inside.any():
        return tuple(slice(0, n) for n in array.shape)
    box = []
    for axis in range(array.ndim):
        other = tuple(a for a in range(array.ndim) if a != axis)
        hits = np.flatnonzero(inside.any(axis=other))
        box.append(slice(max(int(hits[0]) - margin, 0), min(int(hits[-1]) + 1 + margin, array.shape[axis])))
    return tuple(box)


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
                            compact=compact).heatmaps


def predict_evidence(
    ct: Volume,
    model: Model,
    device: str = "auto",
    progress: ProgressCallback | None = None,
    *,
    overlap: float = 0.25,
    sw_batch_size: int = 1,
    compact: bool = False,
) -> Evidence:
    """The model's evidence for a CT: its 26 maps, its settings, and its level labeller (if it has one)
    reading the same prepared CT along the traced centreline."""
    import torch
    from monai.inferers import SlidingWindowInferer

    if not isinstance(model, Model):
        raise VertebraIDError("Network inference needs a model from networks.bundle.load_model.")
    torch_device = resolve_device(device) if device is not None else model.device
    report(progress, 0.0, "Preparing the CT for the network")
    image = preprocess(ct, model.spacing_mm, model.hu_window)
    network = model.network.to(torch_device).eval()
    roi = model.patch_size
    box = body_box(image.array)
    cropped = image.array[box]
    total = _window_count(cropped.shape, roi, overlap)
    done = [0]

    def run_windows(batch):
        with torch.autocast("cuda", dtype=torch.float16, enabled=torch_device.type == "cuda"):
            out = network(batch)
        done[0] += batch.shape[0]
        report(progress, 0.05 + 0.95 * min(done[0] / total, 1.0), f"Network: window {min(done[0], total)} of {total}")
        return out.float()

    inferer = SlidingWindowInferer(
        roi_size=roi, sw_batch_size=sw_batch_size, overlap=overlap, mode="gaussian",
        sw_device=torch_device, device=torch.device("cpu"), padding_mode="constant", cval=0.0,
    )
    tensor = torch.from_numpy(np.ascontiguousarray(cropped))[None, None]
    with torch.inference_mode():
        output = (inferer(tensor, run_windows)[0] / model.heatmap_height).clamp(min=0.0)
    dtype = np.float16 if compact else np.float32
    maps = np.zeros(image.shape3 + (output.shape[0],), dtype=dtype)
    maps[box] = np.moveaxis(output.numpy(), 0, -1)
    description = f"network model {model.path.name if model.path else '(in memory)'}"
    if model.labeller is not None:
        description += " with its level labeller"
    return Evidence(Volume(maps, image.affine), None, description, model.engine_settings,
                    level_evidence=_level_evidence(image, model), anatomy=anatomy_from_ct(ct))


def _level_evidence(image: Volume, model: Model) -> LevelEvidence | None:
    """The labeller reading the heatmap network's own input along a centreline (None without one)."""
    if model.labeller is None:
        return None
    network, config = model.labeller
    return lambda centerline: level_signals(network, image, centerline, config)


def detect(
    ct: Volume,
    model: Model,
    settings: EngineSettings = EngineSettings(),
    constraints: list[Constraint] | None = None,
    *,
    device: str | None = None,
    progress: ProgressCallback | None = None,
) -> pipeline.Result:
    """CT -> the model's evidence -> the engine -> labelled vertebrae (RAS).

    `settings` are the user's (method, transitional...); the model's own (its σ, α, floor,
    centreline threshold, temperature) are applied over them. A bone-only CT (`engine.skeleton`) is
    labelled from its bone without the network, every label flagged for checking. `constraints`: the user's fixed
    points (Re-label). `device` None: where the model is.
    """
    t0 = time.perf_counter()
    check_scan_geometry(ct)
    if is_bone_only(ct):  # no soft tissue for the network: the bone itself, every label flagged
        report(progress, 0.0, "A bone-only CT: finding the vertebrae in the bone")
        result = locate_in_skeleton(ct, settings, constraints)
        result.prepared.description = SKELETON_DESCRIPTION
        result.timings_s = {"skeleton": time.perf_counter() - t0, **result.timings_s}
        report(progress, 1.0, "Done")
        return result
    evidence = predict_evidence(ct, model, device, scaled(progress, 0.0, 0.8))
    network_s = time.perf_counter() - t0
    result = pipeline.locate(evidence, settings, constraints, progress=scaled(progress, 0.8, 1.0))
    result.timings_s = {"network": network_s, **result.timings_s}
    return result
