"""Activation maps -> labelled vertebrae: the paper's steps 2-3, with every intermediate kept.

    prepared = prepare(heatmaps, options)     # Ĝ, centreline, rectified maps, 1-D signals
    result = solve(prepared, options)         # optimiser + back to 3-D
    result = locate(heatmaps, options)        # both

`Result` keeps the intermediates so that a viewer (the Slicer module, QC pictures) shows
them without recomputing.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np

from .anatomy import LEVELS_26, NUM_CHANNELS, LabelSet
from .errors import VertebraIDError
from .vertebrae import Vertebra
from .volume import Volume, check_finite

METHODS = ("exact", "paper", "order", "rect", "base")

ProgressCallback = Callable[[float, str], None]
#: centreline -> (its samples, 26) more per-level evidence (e.g. `inference.level_evidence`)
LevelEvidence = Callable[["object"], np.ndarray]


class Cancelled(Exception):
    """Raised when a progress callback asks to stop (it returned True)."""


@dataclass(frozen=True)
class LocateOptions:
    method: str = "exact"
    weighted: bool = True  # the paper's anchor weights (lambda = 2 for C1, C2, S1, S2)
    transitional: bool = False  # allow T13 and L6
    step_mm: float | None = None  # rectification sampling (delta); default: the maps' spacing
    window_mm: float = 25.0  # half-width of the sampled normal plane (centreline error + blob tails)
    threshold: float = 0.5  # centreline: voxels above this fraction of Ĝ's peak
    min_peak: float = 0.05  # Ĝ peak below this (absolute) means "no spine"
    sigma_mm: float | None = None  # blob width of the maps; estimated from them when None
    # The energy's α and floor f (optimize.EnergyParams) when the maps need their own: a model's
    # metadata sets them for its outputs' height. None: the engine's defaults.
    evidence_weight: float | None = None
    evidence_floor: float | None = None
    # Gibbs temperature of the confidences; it scales with α, so a model with its own α brings its own.
    confidence_temperature: float | None = None
    # Shortest gap between consecutive centres, as a fraction of the level's typical gap (the
    # engine's 0.5 tolerates any evidence; a model whose maps ripple between vertebrae sets more).
    gap_fraction_min: float | None = None

    def __post_init__(self):
        if self.method not in METHODS:
            raise VertebraIDError(f"Unknown method '{self.method}'; choose one of {', '.join(METHODS)}.")
        if not (isinstance(self.threshold, (int, float)) and 0.0 < self.threshold < 1.0):
            raise VertebraIDError(f"The centreline threshold must be a fraction between 0 and 1, got {self.threshold!r}.")
        for name in ("evidence_weight", "evidence_floor", "confidence_temperature"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value) or value < 0):
                raise VertebraIDError(f"The optimiser setting {name} must be a non-negative number, got {value!r}.")
        if self.confidence_temperature == 0:
            raise VertebraIDError("The optimiser setting confidence_temperature must be above 0.")
        if self.gap_fraction_min is not None and not (
            isinstance(self.gap_fraction_min, (int, float)) and not isinstance(self.gap_fraction_min, bool)
            and 0.0 < self.gap_fraction_min < 1.0
        ):
            raise VertebraIDError(f"The optimiser setting gap_fraction_min must be a fraction between 0 and 1, "
                                  f"got {self.gap_fraction_min!r}.")

    def energy_params(self, base=None):
        """`base` (default: the engine's EnergyParams) with this run's α, floor, temperature and shortest gap."""
        from .optimize import EnergyParams

        own = {"evidence_weight": self.evidence_weight, "floor": self.evidence_floor,
               "temperature": self.confidence_temperature, "gap_fraction_min": self.gap_fraction_min}
        return replace(base or EnergyParams(), **{k: float(v) for k, v in own.items() if v is not None})

    @property
    def labels(self) -> LabelSet:
        return LabelSet.standard(self.transitional, self.weighted)


@dataclass
class Constraint:
    """A user's fixed point: this label, here (RAS mm). The optimiser must keep it."""

    label: str
    position: np.ndarray


@dataclass
class Prepared:
    """Everything up to the 1-D signals (independent of the optimiser method)."""

    heatmaps: Volume  # the input, 26 channels
    combined: Volume  # Ĝ on the input grid
    centerline: "object | None"  # centerline.Centerline, None when no spine was found
    rectified: "object | None"  # rectify.Rectified: straightened maps and 1-D signals
    timings_s: dict = field(default_factory=dict)


@dataclass
class Result:
    vertebrae: list[Vertebra]
    method: str
    energy: float
    prepared: Prepared
    timings_s: dict = field(default_factory=dict)

    @property
    def centerline(self):
        return self.prepared.centerline

    @property
    def rectified(self):
        return self.prepared.rectified


def validate_heatmaps(heatmaps: Volume) -> None:
    if heatmaps.array.ndim != 4:
        raise VertebraIDError(
            f"Activation maps must be 4-D ({NUM_CHANNELS} channels on the last axis); got a {heatmaps.array.ndim}-D image."
        )
    if heatmaps.array.shape[3] != NUM_CHANNELS:
        raise VertebraIDError(
            f"Activation maps must have {NUM_CHANNELS} channels (C1..S2); got {heatmaps.array.shape[3]}."
        )
    check_finite(heatmaps.array, "The activation maps")


def _report(progress: ProgressCallback | None, fraction: float, message: str) -> None:
    if progress is not None and progress(fraction, message):
        raise Cancelled(message)


def prepare(
    heatmaps: Volume,
    options: LocateOptions = LocateOptions(),
    *,
    combined: Volume | None = None,
    progress: ProgressCallback | None = None,
    level_evidence: LevelEvidence | None = None,
) -> Prepared:
    """Ĝ, centreline, straightened maps and 1-D signals (paper §3.2).

    `combined` overrides Ĝ = Σ G_v when the evidence defines its own "any vertebra" map
    (rendered detector points, whose per-level maps need not sum to one blob per vertebra).
    `level_evidence(centerline)` -> (samples, 26): more per-level evidence along the traced
    centreline (the level labeller's), added to the maps' signals.
    """
    from .centerline import trace_centerline
    from .rectify import rectify

    validate_heatmaps(heatmaps)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    combined_is_sum = combined is None
    if combined is None:
        combined = Volume(heatmaps.array.sum(axis=3, dtype=np.float32), heatmaps.affine)
    timings["combine"] = time.perf_counter() - t0
    _report(progress, 0.1, "Tracing the spine centreline")

    t0 = time.perf_counter()
    step = options.step_mm or float(min(heatmaps.spacing))
    line = trace_centerline(combined, threshold=options.threshold, min_peak=options.min_peak, step_mm=step)
    timings["centerline"] = time.perf_counter() - t0
    if line is None:
        return Prepared(heatmaps, combined, None, None, timings)
    _report(progress, 0.4, "Straightening the activation maps")

    t0 = time.perf_counter()
    rect = rectify(heatmaps, combined, line, options.window_mm, options.sigma_mm, combined_is_sum)
    timings["rectify_and_signals"] = time.perf_counter() - t0
    if level_evidence is not None:
        _report(progress, 0.6, "Naming the levels along the spine")
        t0 = time.perf_counter()
        rect.level_signals = checked_level_signals(level_evidence(line), len(line))
        timings["level_labeller"] = time.perf_counter() - t0
    return Prepared(heatmaps, combined, line, rect, timings)


def checked_level_signals(signals, length: int) -> np.ndarray:
    """Level evidence must be finite, (centreline samples, 26)."""
    signals = np.asarray(signals, dtype=float)
    if signals.shape != (length, NUM_CHANNELS) or not np.all(np.isfinite(signals)):
        raise VertebraIDError(f"Level evidence must be finite numbers, one row of {NUM_CHANNELS} per centreline "
                              f"sample ({length}), got shape {signals.shape}.")
    return signals


def solve(
    prepared: Prepared,
    options: LocateOptions = LocateOptions(),
    constraints: list[Constraint] | None = None,
    *,
    energy_params=None,
    progress: ProgressCallback | None = None,
) -> Result:
    """Label the vertebrae from the 1-D signals with the chosen method; back to 3-D."""
    from . import optimize as opt

    params = options.energy_params(energy_params)
    constraints = constraints or []
    if constraints and options.method != "exact":
        raise VertebraIDError("Fixed points (re-labelling) need the exact method.")
    if any(c.label in ("T13", "L6") for c in constraints) and not options.transitional:
        options = replace(options, transitional=True)
    labels = options.labels
    for c in constraints:
        if c.label not in labels.levels:
            raise VertebraIDError(f"'{c.label}' is not a vertebra label (C1..C7, T1..T13, L1..L6, S1, S2).")
    timings: dict[str, float] = {}
    rect = prepared.rectified
    if rect is None:
        if constraints:
            raise VertebraIDError("No spine was found, so fixed points cannot be used.")
        return Result([], options.method, 0.0, prepared, timings)
    _report(progress, 0.7, "Labelling the vertebrae")

    t0 = time.perf_counter()
    if options.method == "base":
        vertebrae = _base_method(prepared)
        energy = float("nan")
    else:
        model = opt.build_energy(rect.evidence, labels, rect.step_mm, params)
        if options.method == "rect":
            chain = _rect_method(model)
        elif options.method == "order":
            chain = opt.solve_order(model, rect.combined_signal)
        elif options.method == "paper":
            chain = opt.solve_paper(model, rect.combined_signal)
        else:
            fixed = _fixed_levels(rect.grid.centerline, labels, constraints)
            model = opt.exempt_fixed_gaps(model, fixed)
            try:
                chain = opt.solve_exact(model, fixed)
            except opt.InconsistentFixedPoints:
                # The user's points win over the shortest-gap bound: lower it just enough for them.
                relaxed = opt.gap_fraction_fitting(fixed, labels, rect.step_mm, params.gap_fraction_min)
                if relaxed is None:
                    raise
                model = replace(model, params=replace(model.params, gap_fraction_min=relaxed))  # unary unchanged
                chain = opt.solve_exact(model, fixed)
        timings["optimize"] = time.perf_counter() - t0
        confidences = None
        if options.method == "exact":
            t1 = time.perf_counter()
            prob = opt.marginals(model, fixed)
            radius = max(1, int(round(8.0 / rect.step_mm)))
            confidences = opt.chain_confidence(prob, chain, radius)
            timings["confidence"] = time.perf_counter() - t1
        t1 = time.perf_counter()
        vertebrae = chain_to_vertebrae(rect, chain, labels, confidences)
        _pin_constraints(vertebrae, constraints)
        timings["to_3d"] = time.perf_counter() - t1
        energy = chain.energy
    timings.setdefault("optimize", time.perf_counter() - t0)
    _report(progress, 1.0, "Done")
    return Result(vertebrae, options.method, energy, prepared, timings)


#: A fixed point farther than this from the traced centreline is not on this spine (a point from
#: another scan, or a file read in the wrong coordinate system). True body centres lie within ~25 mm.
MAX_FIXED_POINT_OFF_SPINE_MM = 50.0


def _fixed_levels(centerline, labels: LabelSet, constraints: list[Constraint]) -> list:
    """The user's points as levels fixed at samples of the straightened axis."""
    from .optimize import FixedLevel

    fixed = []
    for c in constraints:
        k = float(centerline.project(c.position)[0])
        off = float(np.linalg.norm(np.asarray(c.position, float) - centerline.interpolate(k)[0]))
        if off > MAX_FIXED_POINT_OFF_SPINE_MM:
            raise VertebraIDError(
                f"The fixed {c.label} lies {off:.0f} mm from the traced spine; check its position "
                "(and, for a file, its coordinate system)."
            )
        fixed.append(FixedLevel(labels.index(c.label), int(round(k))))
    return fixed


def locate(
    heatmaps: Volume,
    options: LocateOptions = LocateOptions(),
    constraints: list[Constraint] | None = None,
    *,
    combined: Volume | None = None,
    energy_params=None,
    progress: ProgressCallback | None = None,
    level_evidence: LevelEvidence | None = None,
) -> Result:
    """The whole of steps 2-3: activation maps -> labelled vertebrae in RAS."""
    prepared = prepare(heatmaps, options, combined=combined, progress=progress, level_evidence=level_evidence)
    result = solve(prepared, options, constraints, energy_params=energy_params, progress=progress)
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


def chain_to_vertebrae(rect, chain, labels, confidences=None) -> list[Vertebra]:
    """Map each labelled position on the straightened axis back to RAS, refined in its plane."""
    out = []
    hw = rect.grid.half_width
    for i, (lvl, k) in enumerate(zip(chain.levels, chain.positions)):
        z = _refine_peak(rect.combined_signal, int(k))
        plane = rect.combined[:, :, int(round(z))]
        x, y = _in_plane_peak(plane, hw, rect.step_mm)
        position = rect.grid.to_world(np.array(x), np.array(y), np.array(z))
        conf = 1.0 if confidences is None else confidences[i]
        out.append(Vertebra(labels.levels[lvl], position, conf, extra={"axis_index": float(z)}))
    return out


def _pin_constraints(vertebrae: list[Vertebra], constraints: list[Constraint]) -> None:
    """A fixed level keeps the user's exact position, marked locked."""
    by_label = {v.label: v for v in vertebrae}
    for c in constraints:
        v = by_label.get(c.label)
        if v is not None:
            v.position = np.asarray(c.position, float)
            v.confidence = 1.0
            v.locked = True


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


def _rect_method(model) -> "object":
    """Table 2's 'base+rect': the argmax of each level's 1-D signal, kept above the floor."""
    from .optimize import Chain

    levels, positions = [], []
    for lvl, name in enumerate(model.labels.levels):
        if name in ("T13", "L6"):
            continue
        k = int(np.argmin(model.unary[lvl]))
        if model.unary[lvl, k] < 0:
            levels.append(lvl)
            positions.append(k)
    return Chain(levels, positions, float("nan"))
