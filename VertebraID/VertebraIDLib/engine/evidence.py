"""What the engine weighs for one scan: activation maps, and where they came from.

Every source of evidence ends as one `Evidence`: the heatmap network's 26 maps (with its level
labeller's signals along the centreline), any detector's points rendered into maps
(`points.py`), or maps read from a file. The pipeline takes it as it is.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..errors import VertebraIDError
from .anatomy import NUM_CHANNELS
from .landmarks import Landmarks, spine_landmarks
from .volume import Volume, check_finite

#: centreline -> (its samples, 26): more per-level evidence along the traced spine (the level labeller's)
LevelEvidence = Callable[[object], np.ndarray]
#: centreline -> Landmarks: ribs and sacrum read from the CT along the traced spine
AnatomyEvidence = Callable[[object], Landmarks]


@dataclass
class Evidence:
    """The 26 activation maps of one scan and what comes with them."""

    heatmaps: Volume  # (I, J, K, 26), channel c = level c + 1 (C1..S2)
    combined: Volume | None = None  # Ĝ when the source defines it (rendered points); None: the maps' sum
    description: str = "activation maps"
    settings: dict = field(default_factory=dict)  # EngineSettings the source fixes (σ, a model's α...)
    level_specific: bool = True  # False: the evidence names regions only, so the anchor weights are off
    level_evidence: LevelEvidence | None = None
    anatomy: AnatomyEvidence | None = None  # needs the CT: `anatomy_from_ct(ct)`
    centerline: object | None = None  # a Centerline to use as it is (a stored run's), instead of tracing one

    def __post_init__(self):
        validate_heatmaps(self.heatmaps)


def anatomy_from_ct(ct: Volume) -> AnatomyEvidence:
    """The ribs and sacrum of a CT (in HU), read along whatever centreline the engine traces."""
    return lambda centerline: spine_landmarks(ct, centerline)


def checked_landmarks(marks: Landmarks, length: int) -> Landmarks:
    """Landmarks must have one finite value in [0, 1] per centreline sample."""
    for name in ("rib", "sacrum", "rib_visible", "sacrum_visible"):
        values = np.asarray(getattr(marks, name), float)
        if values.shape != (length,) or not np.all(np.isfinite(values)) or values.min() < 0 or values.max() > 1:
            raise VertebraIDError(f"The anatomy evidence ({name}) must hold one value in [0, 1] per centreline "
                                  f"sample ({length}).")
    return marks


def validate_heatmaps(heatmaps: Volume) -> None:
    """26 finite channels on the last axis of a 4-D image, or one clear sentence."""
    if heatmaps.array.ndim != 4:
        raise VertebraIDError(
            f"Activation maps must be 4-D ({NUM_CHANNELS} channels on the last axis); got a {heatmaps.array.ndim}-D image."
        )
    if heatmaps.array.shape[3] != NUM_CHANNELS:
        raise VertebraIDError(
            f"Activation maps must have {NUM_CHANNELS} channels (C1..S2); got {heatmaps.array.shape[3]}."
        )
    check_finite(heatmaps.array, "The activation maps")


def checked_level_signals(signals, length: int) -> np.ndarray:
    """Level evidence must be finite, (centreline samples, 26)."""
    signals = np.asarray(signals, dtype=float)
    if signals.shape != (length, NUM_CHANNELS) or not np.all(np.isfinite(signals)):
        raise VertebraIDError(f"Level evidence must be finite numbers, one row of {NUM_CHANNELS} per centreline "
                              f"sample ({length}), got shape {signals.shape}.")
    return signals
