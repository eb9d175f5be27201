"""A labelled vertebra: the unit every output format and metric works with."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .anatomy import LABEL_IDS, LabelSet, region

#: Below this confidence a label is more likely wrong than right: shown as one to check.
CHECK_BELOW_CONFIDENCE = 0.5
#: The most a label may claim when its names cannot be checked against the anatomy (a skeleton read
#: from its bone, a crop without a first or lowest rib or the sacrum): it stays one to check.
FLAGGED_CONFIDENCE = 0.49


@dataclass
class Vertebra:
    """One vertebra: level name, body centre in RAS mm, and how sure we are of its label."""

    label: str
    position: np.ndarray  # RAS millimetres, shape (3,)
    confidence: float = 1.0
    source_index: int | None = None  # the input point it labels (label-points)
    locked: bool = False  # fixed by a user: the optimiser keeps it as a hard constraint
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self.position = np.asarray(self.position, dtype=float).reshape(3)

    @property
    def index(self) -> int:
        return LABEL_IDS[self.label]

    @property
    def region(self) -> str:
        return region(self.label)

    @property
    def needs_check(self) -> bool:
        """A solver's label that is more likely wrong than right (a user's fixed point never is)."""
        return not self.locked and self.confidence < CHECK_BELOW_CONFIDENCE

    def flagged(self, reason: str) -> "Vertebra":
        """This vertebra with its confidence capped below the check threshold, and why (`extra["flagged"]`)."""
        confidence = None if self.confidence is None else min(float(self.confidence), FLAGGED_CONFIDENCE)
        return Vertebra(self.label, self.position, confidence, self.source_index, self.locked,
                        {**self.extra, "flagged": reason})

    @property
    def flag_reason(self) -> str:
        """Why this label was flagged with its whole chain (`flagged`), or '' (not flagged, or a user's point)."""
        return self.extra.get("flagged", "") if self.needs_check else ""

    @property
    def confidence_text(self) -> str:
        """What markups descriptions say: 'confidence 0.32 (check)', with the reason when it was flagged."""
        if not self.needs_check:
            return f"confidence {float(self.confidence):.2f}"
        reason = self.flag_reason
        return f"confidence {float(self.confidence):.2f} (check{': ' + reason if reason else ''})"


def sort_by_level(vertebrae: list[Vertebra]) -> list[Vertebra]:
    """Cranial to caudal by anatomical order (T13 after T12, L6 after L5)."""
    order = LabelSet.standard(transitional=True).levels
    return sorted(vertebrae, key=lambda v: order.index(v.label))
