"""Identification metrics on hand-made cases that exercise each rule, and on real VID ground truth."""
from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import SHARED_DATA
from VertebraIDLib.engine.anatomy import LEVELS_26
from VertebraIDLib.engine.vertebrae import Vertebra
from VertebraIDLib.errors import VertebraIDError
from VertebraIDLib.evaluation.metrics import evaluate_case, format_table, name_offsets, summarize
from VertebraIDLib.io import formats


def column(labels, gap=25.0, start=0.0, x=0.0):
    """Vertebrae on a vertical line, `gap` mm apart, cranial first."""
    return [Vertebra(label, [x, 0.0, start - k * gap]) for k, label in enumerate(labels)]


def at(label, z, x=0.0):
    return Vertebra(label, [x, 0.0, z])


def flags(case):
    return {o.label: o.identified for o in case.outcomes}


@pytest.mark.parametrize("metric", ["spineweb", "verse"])
def test_perfect_and_jittered_predictions(metric):
    gt = column(["T11", "T12", "L1", "L2"])
    rng = np.random.default_rng(0)
    pred = [Vertebra(v.label, v.position + rng.normal(0, 2.0, 3)) for v in gt]
    case = evaluate_case(pred, gt, metric)
    assert case.num_identified == 4 and case.all_correct and case.extra_labels == []
    expected = [np.linalg.norm(p.position - g.position) for p, g in zip(pred, gt)]
    np.testing.assert_allclose([o.error_mm for o in case.outcomes], expected)


@pytest.mark.parametrize("metric", ["spineweb", "verse"])
def test_labelling_shifted_by_one_identifies_nothing(metric):
    # 15 mm apart: each same-label prediction is within 20 mm, but another GT is closer.
    labels = ["C3", "C4", "C5", "C6", "C7"]
    gt = column(labels, gap=15.0)
    pred = [Vertebra(labels[k + 1], g.position) for k, g in enumerate(gt[:-1])]
    case = evaluate_case(pred, gt, metric)
    assert [o.error_mm for o in case.outcomes] == [None, 15.0, 15.0, 15.0, 15.0]
    assert not case.all_correct
    if metric == "spineweb":
        assert case.num_identified == 0
    else:
        # VerSe's quirk: C3 is not predicted, so GT C3 does not compete for the C4 prediction
        # sitting on it, and C4 counts as identified.
        assert flags(case) == {"C3": False, "C4": True, "C5": False, "C6": False, "C7": False}


@pytest.mark.parametrize("metric", ["spineweb", "verse"])
def test_distance_threshold(metric):
    gt = [at("L3", 0.0)]
    assert flags(evaluate_case([at("L3", 19.9)], gt, metric)) == {"L3": True}
    assert flags(evaluate_case([at("L3", 20.1)], gt, metric)) == {"L3": False}
    assert flags(evaluate_case([at("L3", 20.1)], gt, metric, max_dist_mm=25.0)) == {"L3": True}
    assert evaluate_case([at("L3", 20.1)], gt, metric).outcomes[0].error_mm == pytest.approx(20.1)


@pytest.mark.parametrize("metric", ["spineweb", "verse"])
def test_missing_predictions_and_extras(metric):
    gt = column(["T10", "T11", "T12", "L1", "L2"])
    pred = [v for v in column(["T10", "T11", "T12", "L1", "L2"]) if v.label in ("T11", "L1", "L2")]
    pred.append(at("S1", -400.0))  # no S1 in the ground truth, far from everything
    case = evaluate_case(pred, gt, metric)
    assert flags(case) == {"T10": False, "T11": True, "T12": False, "L1": True, "L2": True}
    assert [o.error_mm for o in case.outcomes if o.label in ("T10", "T12")] == [None, None]
    assert case.extra_labels == ["S1"] and not case.all_correct
    assert evaluate_case([], gt, metric).num_identified == 0


def test_prediction_closer_to_another_ground_truth_differs_between_metrics():
    # Pred L1 sits 6 mm from GT L1 but only 4 mm from GT T12, and T12 is not predicted.
    gt = [at("T12", 0.0), at("L1", -10.0)]
    pred = [at("L1", -4.0)]
    # spineweb: the prediction's closest GT must be L1 -> not identified.
    assert flags(evaluate_case(pred, gt, "spineweb"))["L1"] is False
    # verse: only GT whose label is predicted compete (VerSe's get_hits) -> identified.
    assert flags(evaluate_case(pred, gt, "verse"))["L1"] is True
    # Once T12 is predicted too, it competes under both rules.
    pred_both = pred + [at("T12", 30.0)]
    assert flags(evaluate_case(pred_both, gt, "verse"))["L1"] is False


def test_ground_truth_with_a_closer_other_prediction_differs_between_metrics():
    # GT L1's nearest prediction is an (extra) T12 prediction; the L1 prediction is 8 mm away.
    gt = [at("L1", 0.0), at("L2", -30.0)]
    pred = [at("L1", -8.0), at("T12", 3.0), at("L2", -30.0)]
    spineweb = evaluate_case(pred, gt, "spineweb")
    verse = evaluate_case(pred, gt, "verse")
    assert flags(spineweb) == {"L1": False, "L2": True}  # not mutually closest
    assert flags(verse) == {"L1": True, "L2": True}  # the L1 prediction's nearest GT is L1
    assert spineweb.extra_labels == verse.extra_labels == ["T12"]
    assert verse.all_correct and not spineweb.all_correct


@pytest.mark.parametrize("metric", ["spineweb", "verse"])
def test_one_prediction_between_two_ground_truths_tie(metric):
    gt = [at("L4", 0.0), at("L5", -20.0)]
    case = evaluate_case([at("L4", -10.0)], gt, metric)  # equally far from L4 and L5
    assert flags(case)["L4"] is (metric == "verse")  # under verse L5 is not predicted, so it does not compete
    # With L5 predicted 20 mm below its GT: L4's prediction is tied under both rules; L5's
    # prediction has GT L5 as its nearest (verse) but GT L5's nearest prediction is L4's (spineweb).
    case = evaluate_case([at("L4", -10.0), at("L5", -40.0)], gt, metric)
    assert flags(case) == {"L4": False, "L5": metric == "verse"}


def test_invalid_arguments():
    gt = column(["L1", "L2"])
    with pytest.raises(VertebraIDError, match="metric"):
        evaluate_case(gt, gt, "dice")
    with pytest.raises(VertebraIDError, match="distance"):
        evaluate_case(gt, gt, max_dist_mm=0.0)
    with pytest.raises(VertebraIDError, match="L1"):
        evaluate_case(gt + [at("L1", 5.0)], gt, name="case7")
    with pytest.raises(VertebraIDError):
        summarize([])
    with pytest.raises(VertebraIDError, match="pooled"):
        summarize([evaluate_case(gt, gt, "spineweb"), evaluate_case(gt, gt, "verse")])


def test_summary_per_region_and_table():
    gt_a = column(["C6", "C7", "T1", "T2"], gap=18.0)
    pred_a = [Vertebra(v.label, v.position + [3.0, 0.0, 0.0]) for v in gt_a]  # all within 3 mm
    pred_a[1] = Vertebra("C7", gt_a[1].position + [0.0, 25.0, 0.0])  # C7 too far
    gt_b = column(["L4", "L5", "S1"], gap=30.0, start=-500.0)
    pred_b = [Vertebra(v.label, v.position + [0.0, 4.0, 0.0]) for v in gt_b] + [at("S2", -600.0)]
    gt_c = column(["T11", "T12"], start=-300.0)
    cases = [
        evaluate_case(pred_a, gt_a, name="a"),
        evaluate_case(pred_b, gt_b, name="b"),
        evaluate_case(column(["T11", "T12"], start=-300.0), gt_c, name="c"),
    ]
    summary = summarize(cases)
    assert list(summary.regions) == ["C", "T", "L", "S", "all"]
    counts = {k: (r.num_gt, r.num_identified) for k, r in summary.regions.items()}
    assert counts == {"C": (2, 1), "T": (4, 4), "L": (2, 2), "S": (1, 1), "all": (9, 8)}
    assert summary.regions["C"].id_rate == pytest.approx(0.5)
    identified_errors = [3.0, 3.0, 3.0, 0.0, 0.0, 4.0, 4.0, 4.0]  # C7's 25 mm is not counted
    assert summary.regions["all"].error_mean_mm == pytest.approx(np.mean(identified_errors))
    assert summary.regions["all"].error_std_mm == pytest.approx(np.std(identified_errors))
    assert summary.regions["T"].error_mean_mm == pytest.approx(1.5)
    assert (summary.num_scans, summary.num_all_correct, summary.num_extra) == (3, 2, 1)
    assert summary.all_correct_rate == pytest.approx(2 / 3)

    as_dict = json.loads(json.dumps(summary.to_dict()))
    assert as_dict["regions"]["all"] == {
        "n": 9, "identified": 8, "id_rate": round(8 / 9, 4),
        "error_mean_mm": round(float(np.mean(identified_errors)), 2),
        "error_std_mm": round(float(np.std(identified_errors)), 2),
    }
    assert as_dict["all_correct"]["scans"] == 2 and as_dict["extra_predictions"] == 1
    assert [c["name"] for c in as_dict["cases"]] == ["a", "b", "c"]
    assert as_dict["cases"][0]["vertebrae"][1] == {"label": "C7", "identified": False, "error_mm": 25.0}

    table = format_table(summary)
    lines = table.splitlines()
    assert lines[0] == "Identification (spineweb, 20 mm)"
    row = {line.split()[0]: line.split() for line in lines if line.split() and line.split()[0] in summary.regions}
    assert row["C"][1:4] == ["2", "1", "50.0"]
    assert row["all"][1:4] == ["9", "8", "88.9"]
    assert "all correct: 2 (66.7 %)" in lines[-1] and "extra predictions: 1" in lines[-1]


def test_summary_without_sacrum_has_no_s_row():
    gt = column(["L1", "L2"])
    summary = summarize([evaluate_case(gt, gt)])
    assert list(summary.regions) == ["C", "T", "L", "all"]
    assert summary.regions["C"].num_gt == 0 and summary.regions["C"].id_rate is None
    c_row = next(line for line in format_table(summary).splitlines() if line.startswith("C "))
    assert c_row.split() == ["C", "0", "0", "-", "-", "-"]


@pytest.mark.realdata
def test_real_ground_truth_shifted_and_jittered():
    """On real VID ground truth: jitter keeps every vertebra, a shift by one level loses all."""
    gt_dir = SHARED_DATA / "vid" / "train" / "gt"
    if not gt_dir.exists():
        pytest.skip("shared data absent")
    paths = sorted(gt_dir.glob("*.json"))[:20]
    rng = np.random.default_rng(1)
    order = list(LEVELS_26[:24]) + ["L6"]
    jitter_cases, shifted_cases = [], []
    for path in paths:
        gt = formats.read_vid_ground_truth(path)
        jittered = [Vertebra(v.label, v.position + rng.normal(0, 1.5, 3)) for v in gt]
        shifted = [Vertebra(order[order.index(v.label) + 1], v.position) for v in gt if v.label != "L6"]
        jitter_cases.append(evaluate_case(jittered, gt, name=path.stem))
        shifted_cases.append(evaluate_case(shifted, gt, name=path.stem))
    jitter, shifted = summarize(jitter_cases), summarize(shifted_cases)
    assert jitter.regions["all"].id_rate == 1.0 and jitter.num_all_correct == len(paths)
    assert jitter.regions["all"].error_mean_mm < 4.0
    assert shifted.regions["all"].num_identified == 0 and shifted.num_all_correct == 0


def test_name_offsets_count_levels_between_a_points_name_and_the_truth():
    truth = [Vertebra(label, np.array([0.0, 0.0, -30.0 * i])) for i, label in enumerate(("T12", "L1", "L2", "L3"))]
    shifted = [Vertebra(label, v.position + 2.0) for label, v in zip(("L1", "L2", "L3", "L4"), truth)]
    assert name_offsets(shifted, truth) == [1, 1, 1, 1]  # the whole chain one level too caudal
    far = [Vertebra("T11", truth[0].position + [0, 0, 25.0])]  # beyond 20 mm: no point there
    assert name_offsets(far, truth) == [None] * 4 and name_offsets([], truth) == [None] * 4
    assert name_offsets([Vertebra("T11", truth[0].position)], truth) == [-1, None, None, None]
