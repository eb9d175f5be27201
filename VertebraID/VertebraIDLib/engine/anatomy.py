"""Vertebra labels, regions, anchor weights and the label order the optimiser follows.

The project's label ids follow the paper: 1..26 = C1..C7, T1..T12, L1..L5, S1, S2.
The transitional vertebrae are optional extra levels: T13 (id 28, as in VerSe) between
T12 and L1, and L6 (id 27; VerSe's 25 is our S1) between L5 and S1.
"""
from __future__ import annotations

from dataclasses import dataclass

LEVELS_26 = (
    [f"C{i}" for i in range(1, 8)]
    + [f"T{i}" for i in range(1, 13)]
    + [f"L{i}" for i in range(1, 6)]
    + ["S1", "S2"]
)
NUM_CHANNELS = 26

#: label name -> project id (1-based). Channel of a 26-channel map = id - 1.
LABEL_IDS = {name: i + 1 for i, name in enumerate(LEVELS_26)}
#: level name -> channel of a 26-channel map (the transitional levels have none)
CHANNEL_OF = {name: c for c, name in enumerate(LEVELS_26)}
LABEL_IDS.update({"T13": 28, "L6": 27})

#: VerSe ids: 1..7 C, 8..19 T, 20..25 L1..L6, 26 sacrum (taken as S1), 28 T13.
VERSE_IDS = {f"C{i}": i for i in range(1, 8)}
VERSE_IDS.update({f"T{i}": 7 + i for i in range(1, 13)})
VERSE_IDS.update({f"L{i}": 19 + i for i in range(1, 7)})
VERSE_IDS.update({"S1": 26, "T13": 28})
VERSE_NAMES = {v: k for k, v in VERSE_IDS.items()}

#: Anchors (the paper: the two vertebrae at each end of the spine get weight 2).
ANCHOR_LEVELS = ("C1", "C2", "S1", "S2")

#: Typical distance (mm) from each level's body centre to the next level's, adults.
#: C1..L4: medians over the ground truth of the first half (by file name) of the VID training
#: split (../shared/data/vid, 800+ scans for T10..L4, 34+ for the cervical levels); L5 and S1
#: (no sacrum there): the lumbosacral disc is the thickest and S1-S2 is a fused segment.
TYPICAL_GAP_MM = {
    "C1": 17.2, "C2": 24.1, "C3": 17.6, "C4": 17.0, "C5": 16.5, "C6": 17.5, "C7": 19.8,
    "T1": 20.9, "T2": 20.7, "T3": 20.9, "T4": 21.9, "T5": 22.1, "T6": 22.7, "T7": 23.5,
    "T8": 24.2, "T9": 25.2, "T10": 27.3, "T11": 29.6, "T12": 32.4,
    "L1": 34.6, "L2": 35.7, "L3": 36.5, "L4": 36.3, "L5": 36.0, "S1": 25.0,
    "T13": 32.4, "L6": 36.0,
}


#: Display colour (RGB 0..1) of each spine region: markups, Slicer views, QC pictures.
REGION_COLORS = {
    "C": (0.95, 0.75, 0.2),
    "T": (0.3, 0.8, 0.3),
    "L": (0.3, 0.6, 1.0),
    "S": (0.85, 0.4, 0.85),
}
#: Colour of a point whose label is more likely wrong than right (Vertebra.needs_check).
CHECK_COLOR = (1.0, 0.25, 0.25)


def region(label: str) -> str:
    """Region letter of a level name: 'C', 'T', 'L' or 'S'."""
    return label[0]


def is_known_label(label: str) -> bool:
    """Whether `label` names a level (C1..S2, T13 or L6)."""
    return label in LABEL_IDS


@dataclass(frozen=True)
class LabelSet:
    """The ordered levels the optimiser may use, with the allowed successor of each.

    The spine is a chain; with transitional levels it is a chain with two optional
    detours (T12 -> T13 -> L1 and L5 -> L6 -> S1).
    """

    levels: tuple[str, ...]
    transitional: bool = False
    weighted: bool = True

    @staticmethod
    def standard(transitional: bool = False, weighted: bool = True) -> "LabelSet":
        """C1..S2, with the optional T13 and L6 when `transitional`; anchor weights on unless `weighted` is False."""
        levels = list(LEVELS_26)
        if transitional:
            levels.insert(levels.index("L1"), "T13")
            levels.insert(levels.index("S1"), "L6")
        return LabelSet(tuple(levels), transitional, weighted)

    def __len__(self) -> int:
        return len(self.levels)

    def index(self, label: str) -> int:
        """Position of a level in this set's order."""
        return self.levels.index(label)

    def successors(self, position: int) -> list[int]:
        """Indices (into `levels`) that may follow level `position` in a spine."""
        nxt = position + 1
        if nxt >= len(self.levels):
            return []
        out = [nxt]
        if self.levels[nxt] in ("T13", "L6"):
            out.append(nxt + 1)  # the transitional level is optional
        return out

    def weight(self, label: str) -> float:
        """The paper's anchor weight lambda (1 when weights are switched off)."""
        if self.weighted and label in ANCHOR_LEVELS:
            return 2.0
        return 1.0

    def channel(self, label: str) -> int | None:
        """Channel of a 26-channel activation map, or None for a transitional level."""
        if label in ("T13", "L6"):
            return None
        return LABEL_IDS[label] - 1


def typical_gap_mm(label: str) -> float:
    """Typical distance (mm) from the centre of `label` to the centre of the next level."""
    return TYPICAL_GAP_MM.get(label, TYPICAL_GAP_MM["S1"])


def expected_gap_ratio(label: str) -> float:
    """Typical (gap below `label`) / (gap above it): how the spacing grows at this level."""
    order = LabelSet.standard(transitional=False).levels
    base = {"T13": "T12", "L6": "L5"}.get(label, label)
    i = order.index(base)
    if i == 0:
        return 1.0
    return typical_gap_mm(base) / typical_gap_mm(order[i - 1])
