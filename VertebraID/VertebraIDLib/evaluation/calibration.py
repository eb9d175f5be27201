"""Are the confidences worth reading? Each placed label's confidence against whether it is right.

    hits = confidence_outcomes(vertebrae, evaluate_case(vertebrae, truth))   # [(confidence, right)]
    print(confidence_table(hits))
    print(calibration_summary(hits))                 # >= 0.9: share right; wrong: share flagged; ECE
    save_figure(reliability_figure(hits), "reliability.png")
"""
from __future__ import annotations

import numpy as np

from ..engine.vertebrae import CHECK_BELOW_CONFIDENCE, Vertebra
from .metrics import CaseEvaluation
from .qc import figure_class


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


def reliability_bins(hits: list[tuple[float, bool]], bins: int = 10) -> list[tuple[float, float, float, float, int]]:
    """Equal-width confidence bins: (low, high, mean confidence, share right, count) for each bin holding labels."""
    if bins < 1:
        raise ValueError("bins must be at least 1")
    conf = np.array([c for c, _ in hits], float)
    right = np.array([ok for _, ok in hits], float)
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.digitize(conf, edges[1:-1]), 0, bins - 1)
    out = []
    for b in range(bins):
        inside = index == b
        if inside.any():
            out.append((edges[b], edges[b + 1], float(conf[inside].mean()), float(right[inside].mean()),
                        int(inside.sum())))
    return out


def expected_calibration_error(hits: list[tuple[float, bool]], bins: int = 10) -> float:
    """ECE: the count-weighted mean gap between confidence and share right over equal-width bins (0 = calibrated)."""
    if not hits:
        return float("nan")
    total = len(hits)
    return float(sum(n * abs(mean_conf - share) for _, _, mean_conf, share, n in reliability_bins(hits, bins)) / total)


def calibration_summary(hits: list[tuple[float, bool]], flag_below: float = CHECK_BELOW_CONFIDENCE) -> str:
    """One sentence: confident labels and the share right, wrong labels and the share flagged, the ECE."""
    confident = [ok for c, ok in hits if c >= 0.9]
    flagged = [c < flag_below for c, ok in hits if not ok]
    parts = [f"{len(confident)} labels with confidence >= 0.9"
             + (f", {100 * np.mean(confident):.0f} % right" if confident else ""),
             f"{len(flagged)} wrong labels, {sum(flagged)} flagged (confidence < {flag_below:g})"
             + (f", {100 * np.mean(flagged):.0f} %" if flagged else ""),
             f"expected calibration error {expected_calibration_error(hits):.3f}" if hits else "no labels"]
    return "; ".join(parts) + "."


def reliability_figure(hits: list[tuple[float, bool]], title: str = "Confidence against share right", bins: int = 10):
    """A reliability diagram: share right per confidence bin (bars, with counts) against the diagonal."""
    fig = figure_class()(figsize=(4.2, 4.2))
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1, label="calibrated")
    for low, high, _, share, n in reliability_bins(hits, bins):
        ax.bar((low + high) / 2, share, width=(high - low) * 0.9, color="#4c72b0", alpha=0.8)
        ax.text((low + high) / 2, min(share + 0.02, 0.95), str(n), ha="center", fontsize=7)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence")
    ax.set_ylabel("share of labels right (number of labels on each bar)")
    ece = expected_calibration_error(hits) if hits else float("nan")
    ax.set_title(f"{title}\nECE {ece:.3f}, {len(hits)} labels", fontsize=9)
    return fig
