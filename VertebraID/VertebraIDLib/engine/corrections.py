"""A user's corrections as hard constraints of the optimiser (Re-label, `detect --fixed`).

A `Constraint` says "this level is here": the exact optimiser keeps it, and the rest of the
spine is solved around it. The user's points keep their exact positions in the result.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import VertebraIDError
from .anatomy import LabelSet
from .optimize import FixedLevel
from .vertebrae import Vertebra

#: A fixed point farther than this from the traced centreline is not on this spine (a point from
#: another scan, or a file read in the wrong coordinate system). True body centres lie within ~25 mm.
MAX_FIXED_POINT_OFF_SPINE_MM = 50.0


@dataclass
class Constraint:
    """A user's fixed point: this label, here (RAS mm). The optimiser must keep it."""

    label: str
    position: np.ndarray


def check_constraint_labels(constraints: list[Constraint], labels: LabelSet) -> None:
    """Every fixed label must be a level of `labels`."""
    for c in constraints:
        if c.label not in labels.levels:
            raise VertebraIDError(f"'{c.label}' is not a vertebra label (C1..C7, T1..T13, L1..L6, S1, S2).")


def fixed_levels(centerline, labels: LabelSet, constraints: list[Constraint]) -> list[FixedLevel]:
    """The user's points as levels fixed at samples of the straightened axis."""
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


def pin_constraints(vertebrae: list[Vertebra], constraints: list[Constraint]) -> None:
    """A fixed level keeps the user's exact position, marked locked."""
    by_label = {v.label: v for v in vertebrae}
    for c in constraints:
        v = by_label.get(c.label)
        if v is not None:
            v.position = np.asarray(c.position, float)
            v.confidence = 1.0
            v.locked = True
