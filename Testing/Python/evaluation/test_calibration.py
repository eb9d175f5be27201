"""Calibration measures: the ECE, reliability bins, the one-line summary and the diagram."""
import numpy as np
import pytest
from VertebraIDLib.evaluation.calibration import (
    calibration_summary,
    expected_calibration_error,
    reliability_bins,
    reliability_figure,
)
from VertebraIDLib.evaluation.qc import save_figure


def test_a_calibrated_set_has_no_calibration_error_and_an_overconfident_one_has_the_gap():
    # 10 labels at 0.8, 8 right: calibrated; 10 labels at 0.95, 5 right: 0.45 too sure
    calibrated = [(0.8, i < 8) for i in range(10)]
    assert expected_calibration_error(calibrated) == pytest.approx(0.0)
    overconfident = [(0.95, i < 5) for i in range(10)]
    assert expected_calibration_error(overconfident) == pytest.approx(0.45)
    # mixed: weighted by the count of each bin
    assert expected_calibration_error(calibrated + overconfident) == pytest.approx(0.225)


def test_reliability_bins_hold_the_counts_and_shares_of_each_band():
    hits = [(0.05, False), (0.15, True), (0.12, False), (0.99, True), (1.0, True)]
    bins = reliability_bins(hits, bins=10)
    assert [(round(lo, 1), n) for lo, _, _, _, n in bins] == [(0.0, 1), (0.1, 2), (0.9, 2)]
    assert bins[1][3] == pytest.approx(0.5)
    assert bins[2][2] == pytest.approx(0.995)
    assert sum(n for *_, n in bins) == len(hits)


def test_summary_counts_confident_labels_and_flagged_wrong_ones():
    hits = [(0.95, True)] * 9 + [(0.95, False), (0.3, False), (0.2, True)]
    text = calibration_summary(hits, flag_below=0.5)
    assert "10 labels with confidence >= 0.9, 90 % right" in text
    assert "2 wrong labels, 1 flagged (confidence < 0.5), 50 %" in text
    assert f"expected calibration error {expected_calibration_error(hits):.3f}" in text


def test_reliability_diagram_is_written(tmp_path):
    rng = np.random.default_rng(0)
    hits = [(float(c), bool(rng.random() < c)) for c in rng.random(200)]
    path = tmp_path / "reliability.png"
    save_figure(reliability_figure(hits), path)
    assert path.stat().st_size > 1000
