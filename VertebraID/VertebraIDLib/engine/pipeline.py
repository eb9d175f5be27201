"""Activation maps -> labelled vertebrae: the paper's steps 2-3, with every intermediate kept.

    prepared = prepare(evidence, settings)    # Ĝ, centreline, rectified maps, 1-D signals
    result = solve(prepared)                  # optimiser + back to 3-D
    result = locate(evidence, settings)       # both

`evidence` is an `Evidence` (maps with what came with them) or a bare Volume of 26 maps;
`settings` an `EngineSettings`, to which the evidence's own (a model's σ and α...) are applied.
`Result` keeps the intermediates so that a viewer (the Slicer module, QC pictures) shows
them without recomputing.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import numpy as np

from ..errors import VertebraIDError
from . import optimize as opt
from .anatomy import LEVELS_26, NUM_CHANNELS, typical_gap_mm
from .centerline import Centerline, curve_through_samples, trace_centerline
from .corrections import (
    Constraint,
    check_constraint_labels,
    fixed_levels,
    pin_constraints,
)
from .evidence import Evidence, checked_landmarks, checked_level_signals
from .landmarks import Landmarks, anchor_in_view, contradiction, level_log_likelihood
from .progress import ProgressCallback, report
from .rectify import Rectified, rectify
from .settings import EngineSettings
from .vertebrae import Vertebra
from .volume import Volume


@dataclass
class Prepared:
    """Everything up to the 1-D signals (independent of the optimiser method)."""

    heatmaps: Volume  # the input, 26 channels
    combined: Volume  # Ĝ on the input grid
    centerline: Centerline | None  # None when no spine was found
    rectified: Rectified | None  # straightened maps and 1-D signals
    settings: EngineSettings = field(default_factory=EngineSettings)  # as applied (the evidence's own included)
    timings_s: dict = field(default_factory=dict)
    description: str = ""  # where the evidence came from (the evidence's description)


@dataclass
class Result:
    """Labelled vertebrae (RAS), the method and energy, and every intermediate (`prepared`)."""

    vertebrae: list[Vertebra]
    method: str
    energy: float
    prepared: Prepared
    timings_s: dict = field(default_factory=dict)

    @property
    def centerline(self) -> Centerline | None:
        return self.prepared.centerline

    @property
    def rectified(self) -> Rectified | None:
        return self.prepared.rectified


def as_evidence(evidence: Evidence | Volume) -> Evidence:
    """A bare Volume of 26 maps is evidence with nothing else."""
    return evidence if isinstance(evidence, Evidence) else Evidence(evidence)


def applied_settings(evidence: Evidence, settings: EngineSettings) -> EngineSettings:
    """`settings` with what the evidence fixes (its σ, a model's α...); anchor weights need level evidence."""
    return settings.updated(**evidence.settings).updated(weighted=settings.weighted and evidence.level_specific)


def prepare(
    evidence: Evidence | Volume,
    settings: EngineSettings = EngineSettings(),
    *,
    progress: ProgressCallback | None = None,
) -> Prepared:
    """Ĝ, centreline, straightened maps and 1-D signals (paper §3.2).

    The evidence's own Ĝ (`combined`) replaces Ĝ = Σ G_v when it defines one (rendered detector
    points, whose per-level maps need not sum to one blob per vertebra); its `level_evidence`
    (centreline -> (samples, 26), the level labeller's) is added to the maps' signals.
    """
    evidence = as_evidence(evidence)
    settings = applied_settings(evidence, settings)
    heatmaps = evidence.heatmaps
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    combined = evidence.combined
    combined_is_sum = combined is None
    if combined is None:
        combined = Volume(heatmaps.array.sum(axis=3, dtype=np.float32), heatmaps.affine)
    timings["combine"] = time.perf_counter() - t0
    report(progress, 0.1, "Tracing the spine centreline")

    t0 = time.perf_counter()
    step = settings.step_mm or float(min(heatmaps.spacing))
    given = evidence.centerline
    line = given or trace_centerline(combined, threshold=settings.centreline_threshold, min_peak=settings.min_peak,
                                     step_mm=step)
    timings["centerline"] = time.perf_counter() - t0
    if line is None:
        return Prepared(heatmaps, combined, None, None, settings, timings, evidence.description)

    marks = None
    if evidence.anatomy is not None and settings.anatomy_weight > 0:
        report(progress, 0.3, "Reading the spinal canal, the ribs and the sacrum")
        t0 = time.perf_counter()
        marks = checked_landmarks(evidence.anatomy(line), len(line))
        if given is None:
            line, marks = _follow_the_canal(line, marks)
        timings["landmarks"] = time.perf_counter() - t0
    report(progress, 0.4, "Straightening the activation maps")

    t0 = time.perf_counter()
    rect = rectify(heatmaps, combined, line, settings.window_mm, settings.sigma_mm, combined_is_sum)
    rect.landmarks = marks
    timings["rectify_and_signals"] = time.perf_counter() - t0
    if evidence.level_evidence is not None:
        report(progress, 0.6, "Naming the levels along the spine")
        t0 = time.perf_counter()
        rect.level_signals = checked_level_signals(evidence.level_evidence(line), len(line))
        timings["level_labeller"] = time.perf_counter() - t0
    return Prepared(heatmaps, combined, line, rect, settings, timings, evidence.description)


#: The canal must be seen on at least this share of the traced spine before the centreline follows it.
CANAL_FOUND_MIN = 0.5


def _follow_the_canal(line: Centerline, marks: Landmarks) -> tuple[Centerline, Landmarks]:
    """The centreline through the vertebral bodies as the spinal canal places them (the maps' own
    trace can stray onto the aorta or a kidney where the maps are weak); kept as traced where the
    canal was not found along most of it (a thin slab, a crop)."""
    if marks.body_points is None or np.mean(marks.canal_found[line.supported]) < CANAL_FOUND_MIN:
        return line, marks
    followed, t = curve_through_samples(marks.body_points, line.supported, line.step_mm)
    return followed, marks.at(t)


def solve(
    prepared: Prepared,
    settings: EngineSettings | None = None,
    constraints: list[Constraint] | None = None,
    *,
    progress: ProgressCallback | None = None,
) -> Result:
    """Label the vertebrae from the 1-D signals with the chosen method; back to 3-D.

    `settings` default to those `prepared` was made with (give others to try another method).
    """
    settings = prepared.settings if settings is None else settings
    constraints = constraints or []
    if constraints and settings.method != "exact":
        raise VertebraIDError("Fixed points (re-labelling) need the exact method.")
    if any(c.label in ("T13", "L6") for c in constraints) and not settings.transitional:
        settings = settings.updated(transitional=True)
    labels = settings.labels
    check_constraint_labels(constraints, labels)
    prepared = reaching_fixed_points(prepared, constraints)
    timings: dict[str, float] = {}
    rect = prepared.rectified
    if rect is None:
        if constraints:
            raise VertebraIDError("No spine was found, so fixed points cannot be used.")
        return Result([], settings.method, 0.0, prepared, timings)
    report(progress, 0.7, "Labelling the vertebrae")

    t0 = time.perf_counter()
    if settings.method == "base":
        vertebrae = _base_method(prepared)
        energy = float("nan")
    else:
        identity = None
        if rect.landmarks is not None and settings.anatomy_weight > 0:
            identity = level_log_likelihood(rect.landmarks, labels.levels)
        model = opt.build_energy(rect.evidence, labels, rect.step_mm, settings, identity)
        fixed = []
        if settings.method == "rect":
            chain = _rect_method(model)
        elif settings.method == "order":
            chain = opt.solve_order(model, rect.combined_signal)
        elif settings.method == "paper":
            chain = opt.solve_paper(model, rect.combined_signal)
        else:
            fixed = fixed_levels(rect.grid.centerline, labels, constraints)
            model = opt.exempt_fixed_gaps(model, fixed)
            try:
                chain = opt.solve_exact(model, fixed)
            except opt.InconsistentFixedPoints:
                # The user's points win over the shortest-gap bound: lower it just enough for them.
                relaxed = opt.gap_fraction_fitting(fixed, labels, rect.step_mm, settings.gap_fraction_min)
                if relaxed is None:
                    raise
                model = replace(model, params=model.params.updated(gap_fraction_min=relaxed))  # unary unchanged
                chain = opt.solve_exact(model, fixed)
        timings["optimize"] = time.perf_counter() - t0
        confidences = None
        if settings.method == "exact":
            t1 = time.perf_counter()
            prob = opt.marginals(model, fixed)
            radius = max(1, int(round(settings.confidence_radius_mm / rect.step_mm)))
            confidences = opt.chain_confidence(prob, chain, radius)
            timings["confidence"] = time.perf_counter() - t1
        t1 = time.perf_counter()
        vertebrae = chain_to_vertebrae(rect, chain, labels, confidences, model.params.gap_fraction_min)
        if confidences is not None and not constraints:
            doubt = _reason_to_doubt(rect, chain, labels)
            if doubt:
                vertebrae = [v.flagged(doubt) for v in vertebrae]
        pin_constraints(vertebrae, constraints)
        timings["to_3d"] = time.perf_counter() - t1
        energy = chain.energy
    timings.setdefault("optimize", time.perf_counter() - t0)
    report(progress, 1.0, "Done")
    return Result(vertebrae, settings.method, energy, prepared, timings)


#: Fixed points up to this far (mm) past an end of the traced spine extend it; farther ones are refused
#: (a point from another scan). Past the last fixed point the extension leaves this much room.
FIXED_POINT_REACH_MM = 180.0
EXTENSION_MARGIN_MM = 10.0


def reaching_fixed_points(prepared: Prepared, constraints: list[Constraint]) -> Prepared:
    """`prepared` with its centreline run on straight past either end to the user's fixed points beyond it.

    The traced spine ends where the evidence does (a detector that missed L5 and S1, a skeleton
    whose last disc was not seen); a user who places the missing vertebrae must be able to fix them
    there. The new samples hold no evidence (maps 0, ribs and sacrum unseen), so only the fixed points
    and the spacing prior place vertebrae on them.
    """
    line, rect = prepared.centerline, prepared.rectified
    if line is None or rect is None or not constraints:
        return prepared
    points = np.array([c.position for c in constraints], float)
    step = line.step_mm
    counts = []
    for beyond in ((line.points[0] - points) @ line.e3[0], (points - line.points[-1]) @ line.e3[-1]):
        reach = float(np.max(np.where(beyond <= FIXED_POINT_REACH_MM, beyond, 0.0)))
        counts.append(int(np.ceil((reach + EXTENSION_MARGIN_MM) / step)) if reach > 0.5 * step else 0)
    before, after = counts
    if before == after == 0:
        return prepared
    head = line.points[0] - np.outer(np.arange(before, 0, -1) * step, line.e3[0])
    tail = line.points[-1] + np.outer(np.arange(1, after + 1) * step, line.e3[-1])

    def pad(array, value=0.0, axis=0):
        width = [(0, 0)] * np.ndim(array)
        width[axis] = (before, after)
        if value is None:  # the end's own value (frames, distances)
            return np.pad(np.asarray(array), width, mode="edge")
        return np.pad(np.asarray(array), width, constant_values=value)

    extended = Centerline(np.concatenate([head, line.points, tail]), pad(line.e1, None), pad(line.e2, None),
                          pad(line.e3, None), step, pad(line.supported, False))
    marks = rect.landmarks
    if marks is not None:
        marks = Landmarks(pad(marks.rib, 0.5), pad(marks.sacrum, 0.5), pad(marks.rib_visible), pad(marks.sacrum_visible),
                          pad(marks.canal_offset_mm, None), seconds=marks.seconds)
    longer = replace(rect, grid=replace(rect.grid, centerline=extended),
                     maps_grid=replace(rect.maps_grid, centerline=extended), maps=pad(rect.maps, axis=2),
                     combined=pad(rect.combined, axis=2), signals=pad(rect.signals), combined_signal=pad(rect.combined_signal),
                     level_signals=None if rect.level_signals is None else pad(rect.level_signals), landmarks=marks)
    return replace(prepared, centerline=extended, rectified=longer)


#: Why a chain's labels are flagged when the CT was read but shows nothing to count the levels from.
UNANCHORED_REASON = "no first or lowest rib and no sacrum in view to count from"


def _reason_to_doubt(rect: Rectified, chain: opt.Chain, labels) -> str:
    """Why a whole chain's names are in doubt whatever its energy says, or '' (also without a CT read):
    the CT shows nothing to count the levels from (no rib end, no sacrum top: a chain's own C1 or C2
    is no anchor, its names are what is in doubt), or a name contradicts the ribs or the sacrum seen
    there (a chain shifted by a level or more)."""
    marks = rect.landmarks
    if marks is None or not chain.levels:
        return ""
    if not anchor_in_view(marks, rect.step_mm):
        return UNANCHORED_REASON
    return contradiction(marks, chain.positions, [labels.levels[lvl] for lvl in chain.levels])


def locate(
    evidence: Evidence | Volume,
    settings: EngineSettings = EngineSettings(),
    constraints: list[Constraint] | None = None,
    *,
    progress: ProgressCallback | None = None,
) -> Result:
    """The whole of steps 2-3: activation maps -> labelled vertebrae in RAS."""
    prepared = prepare(evidence, settings, progress=progress)
    result = solve(prepared, None, constraints, progress=progress)
    result.timings_s = {**prepared.timings_s, **result.timings_s}
    return result


# --------------------------------------------------------------------------- back to 3-D


def _refine_peak(signal: np.ndarray, k: int) -> float:
    """Sub-sample peak position near k by a parabola through the signal's local maximum."""
    lo, hi = max(0, k - 1), min(len(signal), k + 2)
    j = lo + int(np.argmax(signal[lo:hi]))
    if 0 < j < len(signal) - 1:
        a, b, c = signal[j - 1], signal[j], signal[j + 1]
        denom = a - 2 * b + c
        if denom < 0:
            return j + float(np.clip(0.5 * (a - c) / denom, -0.5, 0.5))
    return float(j)


def _in_plane_peak(plane: np.ndarray, half_width: int, step_mm: float, radius_mm: float = 20.0):
    """(x, y) of the activation peak in a normal plane, near the centreline."""
    n = plane.shape[0]
    xx, yy = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    near = np.hypot(xx - half_width, yy - half_width) * step_mm <= radius_mm
    masked = np.where(near, plane, -np.inf)
    top = float(masked.max())
    if not np.isfinite(top) or top <= 0:
        return float(half_width), float(half_width)
    i, j = np.unravel_index(int(np.argmax(masked)), plane.shape)
    box = max(1, int(round(6.0 / step_mm)))
    sl = (slice(max(0, i - box), i + box + 1), slice(max(0, j - box), j + box + 1))
    w = np.clip(plane[sl] - 0.5 * top, 0, None)
    if w.sum() <= 0:
        return float(i), float(j)
    return float((xx[sl] * w).sum() / w.sum()), float((yy[sl] * w).sum() / w.sum())


#: A chain position where its level's map is below this fraction of the chain's median has no blob of its
#: own (a missed or metal-hidden vertebra placed by the order and spacing).
OWN_BLOB_FRACTION = 0.3
#: Such a vertebra keeps its own plane's peak only within this distance of its neighbours' in-plane offset.
STRAY_PEAK_MM = 10.0


def _has_own_blob(heights: np.ndarray) -> np.ndarray:
    """Per chain vertebra: whether its height reaches OWN_BLOB_FRACTION of the chain's median."""
    typical = float(np.median(heights)) if heights.size else 0.0
    return heights >= OWN_BLOB_FRACTION * typical if typical > 0 else np.ones(heights.size, bool)


def _refined_axis(signal: np.ndarray, chain, labels, step_mm: float, gap_fraction_min: float | None) -> np.ndarray:
    """Each chain position moved to its Ĝ peak (sub-sample), except where that would bring two labels
    closer than the optimiser allowed (two labels drawn onto one blob): those keep the chain's."""
    positions = np.array(chain.positions, float)
    axis = np.array([_refine_peak(signal, int(k)) for k in chain.positions], float)
    if gap_fraction_min is None or len(axis) < 2:
        return axis
    shortest = np.array([gap_fraction_min * typical_gap_mm(labels.levels[lvl]) / step_mm for lvl in chain.levels[:-1]])
    for _ in range(len(axis)):
        too_close = np.flatnonzero(np.diff(axis) < np.minimum(shortest, np.diff(positions)) - 1e-6)
        if too_close.size == 0:
            break
        axis[too_close], axis[too_close + 1] = positions[too_close], positions[too_close + 1]
    return axis


def chain_to_vertebrae(rect, chain, labels, confidences=None, gap_fraction_min: float | None = None) -> list[Vertebra]:
    """Map each labelled position on the straightened axis back to RAS, refined in its plane.

    A vertebra the maps missed takes its in-plane offset from its neighbours': the brightest spot of
    its own plane would be a neighbour's tail or a false positive, often more than 20 mm off the body.
    With `gap_fraction_min`, the refinement along the axis keeps the optimiser's shortest-gap bound.
    """
    hw = rect.grid.half_width
    signal = rect.combined_signal
    at = np.asarray(chain.positions, int)
    combined_heights = signal[at]
    # each level's own map at its place (Ĝ for T13/L6, which have none): a stray blob lights Ĝ, not the level
    channels = [labels.channel(labels.levels[lvl]) for lvl in chain.levels]
    own_heights = np.array([g if c is None else rect.signals[k, c] for k, c, g in zip(at, channels, combined_heights)],
                           float)
    own_blob = _has_own_blob(own_heights) & _has_own_blob(combined_heights)
    axis = _refined_axis(signal, chain, labels, rect.step_mm, gap_fraction_min)
    offsets = np.array([_in_plane_peak(rect.combined[:, :, int(round(z))], hw, rect.step_mm) for z in axis],
                       float).reshape(-1, 2)
    if own_blob.any() and not own_blob.all():
        expected = np.stack([np.interp(axis, axis[own_blob], offsets[own_blob, d]) for d in range(2)], axis=1)
        seen_at = axis[own_blob]
        between = (axis > seen_at.min()) & (axis < seen_at.max())  # the ends' offsets cannot be interpolated
        astray = ~own_blob & between & (np.linalg.norm(offsets - expected, axis=1) * rect.step_mm > STRAY_PEAK_MM)
        offsets[astray] = expected[astray]
    out = []
    for i, (lvl, z, (x, y)) in enumerate(zip(chain.levels, axis, offsets)):
        position = rect.grid.to_world(np.array(x), np.array(y), np.array(z))
        conf = 1.0 if confidences is None else confidences[i]
        out.append(Vertebra(labels.levels[lvl], position, conf, extra={"axis_index": float(z)}))
    return out


# --------------------------------------------------------------------------- baselines


def _base_method(prepared: Prepared) -> list[Vertebra]:
    """Table 2's 'base': the argmax of each 3-D map, kept if it is a real peak."""
    maps = prepared.heatmaps
    peaks = maps.array.reshape(-1, NUM_CHANNELS).max(axis=0)
    keep = peaks >= 0.3 * peaks.max() if peaks.max() > 0 else np.zeros(NUM_CHANNELS, bool)
    out = []
    for c in np.nonzero(keep)[0]:
        ijk = np.unravel_index(int(np.argmax(maps.array[..., c])), maps.shape3)
        out.append(Vertebra(LEVELS_26[c], maps.voxel_to_world(np.array(ijk))))
    return out


def _rect_method(model: opt.EnergyModel) -> opt.Chain:
    """Table 2's 'base+rect': the argmax of each level's 1-D signal, kept above the floor."""
    levels, positions = [], []
    for lvl, name in enumerate(model.labels.levels):
        if name in ("T13", "L6"):
            continue
        k = int(np.argmin(model.unary[lvl]))
        if model.unary[lvl, k] < 0:
            levels.append(lvl)
            positions.append(k)
    return opt.Chain(levels, positions, float("nan"))
