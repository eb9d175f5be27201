"""Are the confidences worth reading? Each placed label's confidence against whether it is right.

    hits = confidence_outcomes(vertebrae, evaluate_case(vertebrae, truth))   # [(confidence, right)]
    print(confidence_table(hits))
"""
from __future__ import annotations

import numpy as np

from ..engine.vertebrae import Vertebra
from .metrics import CaseEvaluation


def confidence_outcomes(vertebrae: list[Vertebra], evaluation: CaseEvaluation) -> list[tuple[float, bool]]:
    """(confidence, identified) of every placed vertebra; a label the scan lacks counts as wrong."""
    identified = {o.label for o in evaluation.outcomes if o.identified}
    return [(float(v.confidence), v.label in identified) for v in vertebrae]


def confidence_table(hits: list[tuple[float, bool]]) -> str:
    """Markdown: how many labels fall in each confidence band, and the share of them that is right."""
    lines = ["| exact: confidence | vertebrae placed | identified |", "|---|---|---|"]
    for lo, hi in ((0.0, 0.5), (0.5, 0.9), (0.9, 1.01)):
        band = [ok for c, ok in hits if lo <= c < hi]
        share = f"{100 * np.mean(band):.1f} %" if band else "-"
        lines.append(f"| {lo:g}–{min(hi, 1.0):g} | {len(band)} | {share} |")
    return "\n".join(lines)
