"""What the correction panel shows and does, without any GUI: rows, reasons, shifts, added points.

- `vertebra_rows`: one row per vertebra of a run's point list (label, confidence, lock, where),
  the labels to check first, each with the reason a radiologist would look there.
- `check_reason`: why a label may be wrong, from where it sits in the spine: the lowest
  rib-bearing level (T12/L1), the lumbosacral junction (L5/S1), the first rib (C7/T1).
- `shift_label`: a label one (or more) levels up or down the spine.
- `solve_with_anchors`: points the user added without a label ("a vertebra here"): each is
  given the level that makes the best chain through it (the exact solver's lowest energy among
  the levels it could be), with a confidence from those energies.

The Widget only draws these; the Logic (`logic.py`) applies them to the MRML nodes.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from ..engine import pipeline
from ..engine.anatomy import LabelSet
from ..engine.corrections import MAX_FIXED_POINT_OFF_SPINE_MM, Constraint
from ..engine.progress import ProgressCallback, report
from ..engine.settings import EngineSettings
from ..engine.vertebrae import CHECK_BELOW_CONFIDENCE
from ..errors import VertebraIDError

#: Where a doubtful label sits, and what to look at there (first match wins).
CHECK_REASONS = (
    (("T11", "T12", "T13", "L1", "L2"), "lowest rib?"),
    (("L4", "L5", "L6", "S1", "S2"), "sacrum?"),
    (("C6", "C7", "T1", "T2"), "first rib?"),
)
WEAK_EVIDENCE = "weak evidence"
#: The reason shown for a point added without a label (Re-label gives it one).
UNNAMED_REASON = "added: Re-label names it"
#: An added point is tried as this many levels either side of the nearest solved vertebra's level.
ANCHOR_SEARCH_LEVELS = 4


def check_reason(label: str) -> str:
    """Why a label to check may be wrong: 'lowest rib?', 'sacrum?', 'first rib?' or 'weak evidence'."""
    for levels, reason in CHECK_REASONS:
        if label in levels:
            return reason
    return WEAK_EVIDENCE


def all_levels() -> tuple[str, ...]:
    """Every level a label may name, transitional ones included, cranial to caudal."""
    return tuple(LabelSet.standard(transitional=True).levels)


def shift_label(label: str, steps: int, transitional: bool = False) -> str:
    """`label` moved `steps` levels caudally (negative: cranially): shift_label('T12', 1) == 'L1'.

    Transitional levels (T13, L6) count only with `transitional` (or when `label` is one).
    """
    levels = list(LabelSet.standard(transitional=transitional or label in ("T13", "L6")).levels)
    if label not in levels:
        raise VertebraIDError(f"'{label}' is not a vertebra label (C1..C7, T1..T12, L1..L5, S1, S2).")
    k = levels.index(label) + steps
    if not 0 <= k < len(levels):
        end = levels[0] if steps < 0 else levels[-1]
        raise VertebraIDError(f"Cannot move the labels {'up' if steps < 0 else 'down'}: {label} would go past {end}.")
    return levels[k]


@dataclass
class VertebraRow:
    """One line of the correction panel's table."""

    index: int  # control point index in the point list
    point_id: str
    label: str
    confidence: float | None  # None: fixed by the user (no solver confidence)
    locked: bool
    position: np.ndarray  # world RAS mm
    reason: str = ""  # why to check it ("" when it needs no check)
    added: bool = False  # a point the user added without a label (its level was solved)

    @property
    def needs_check(self) -> bool:
        return bool(self.reason)

    @property
    def confidence_text(self) -> str:
        if not self.label:
            return ""
        if self.confidence is None:
            return "fixed"
        return f"{self.confidence:.2f}"


def order_rows(rows: list[VertebraRow]) -> list[VertebraRow]:
    """Labels to check first (least confident first), then the others cranial to caudal."""
    levels = all_levels()

    def level_key(row):
        return levels.index(row.label) if row.label in levels else len(levels)

    to_check = sorted((r for r in rows if r.needs_check),
                      key=lambda r: (r.label != "", r.confidence or 0.0, level_key(r)))  # unnamed points first
    others = sorted((r for r in rows if not r.needs_check), key=level_key)
    return to_check + others


def row_reason(label: str, confidence: float | None, locked: bool, description: str = "") -> str:
    """A row's reason to check, or '' (locked points and confident labels need none): the one its
    description gives ('confidence 0.49 (check: <reason>)'), else where the label sits."""
    if locked or confidence is None or confidence >= CHECK_BELOW_CONFIDENCE:
        return ""
    given = re.search(r"\(check: (.+)\)\s*$", description or "")
    return given.group(1) if given else check_reason(label)


# --------------------------------------------------------------------------- added points


@dataclass
class AnchorLabel:
    """The level solved for a point the user added without a label."""

    position: np.ndarray
    label: str
    confidence: float  # P(this level | a vertebra here), from the chains' energies


def _anchor_order(prepared: pipeline.Prepared, anchors: list[np.ndarray]) -> list[int]:
    line = prepared.rectified.grid.centerline
    along = [float(line.project(np.asarray(a, float))[0]) for a in anchors]
    return list(np.argsort(along))


def _check_on_spine(prepared: pipeline.Prepared, anchor: np.ndarray) -> None:
    line = prepared.rectified.grid.centerline
    k = float(line.project(anchor)[0])
    off = float(np.linalg.norm(anchor - line.interpolate(k)[0]))
    if off > MAX_FIXED_POINT_OFF_SPINE_MM:
        x, y, z = (float(v) for v in anchor)
        raise VertebraIDError(f"The point you added at ({x:.0f}, {y:.0f}, {z:.0f}) lies {off:.0f} mm from the "
                              "traced spine; move it onto a vertebral body or delete it.")


def solve_with_anchors(
    prepared: pipeline.Prepared,
    settings: EngineSettings,
    constraints: list[Constraint],
    anchors: list,
    progress: ProgressCallback | None = None,
) -> tuple[pipeline.Result, list[AnchorLabel]]:
    """The exact solve around the user's fixed points, with a vertebra at each anchor whose level is solved.

    Anchors are taken cranial to caudal; each tries the levels near the one the solver would
    put there (±ANCHOR_SEARCH_LEVELS, not taken by a fixed point) and keeps the level of the
    lowest-energy chain, which then stays fixed for the next anchors. Its confidence is the
    Gibbs weight exp(-E/T) of that chain among the chains tried (T: the engine's confidence temperature).
    """
    if prepared.rectified is None:
        raise VertebraIDError("No spine was found, so added points cannot be labelled.")
    anchors = [np.asarray(a, float).reshape(3) for a in anchors]
    fixed = list(constraints)
    base = pipeline.solve(prepared, settings, fixed)
    if not anchors:
        return base, []
    for anchor in anchors:
        _check_on_spine(prepared, anchor)
    labels = list(settings.labels.levels)
    temperature = float(settings.confidence_temperature) or 1.0
    solved: list[AnchorLabel] = []
    order = _anchor_order(prepared, anchors)
    for done, i in enumerate(order):
        anchor = anchors[i]
        report(progress, 0.1 + 0.8 * done / len(order), "Naming the points you added")
        used = {c.label for c in fixed}
        if base.vertebrae:
            nearest = min(base.vertebrae, key=lambda v: float(np.linalg.norm(v.position - anchor)))
            centre = labels.index(nearest.label) if nearest.label in labels else len(labels) // 2
        else:
            centre = len(labels) // 2
        candidates = [labels[k] for k in range(max(0, centre - ANCHOR_SEARCH_LEVELS),
                                                min(len(labels), centre + ANCHOR_SEARCH_LEVELS + 1))
                      if labels[k] not in used]
        energies: dict[str, float] = {}
        for label in candidates:
            try:
                result = pipeline.solve(prepared, settings, fixed + [Constraint(label, anchor)])
            except VertebraIDError:  # no chain of consecutive levels fits it with the fixed points
                continue
            if np.isfinite(result.energy):
                energies[label] = float(result.energy)
        if not energies:
            x, y, z = (float(v) for v in anchor)
            raise VertebraIDError(f"No level fits the point you added at ({x:.0f}, {y:.0f}, {z:.0f}) together with "
                                  "your other points; move or delete it.")
        best = min(energies, key=energies.get)
        weights = {k: np.exp(-(e - energies[best]) / temperature) for k, e in energies.items()}
        solved.append(AnchorLabel(anchor, best, float(weights[best] / sum(weights.values()))))
        fixed.append(Constraint(best, anchor))
        base = pipeline.solve(prepared, settings, fixed)
    return base, solved
