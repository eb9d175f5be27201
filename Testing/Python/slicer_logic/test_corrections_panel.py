"""The correction panel's Logic on slicer-core: added points, shifting every label, the table's rows.

What the Widget shows and does (VertebraID.py draws it, in the application only) is computed
here, on real MRML nodes: an added point named "CT: Vertebrae-15" by the Markups toolbar is a
vertebra whose level Re-label solves; "move every label up" fixes a whole spine named one
level off; the rows put the labels to check first, each with its reason.
"""
from __future__ import annotations

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("slicer-core is not installed", allow_module_level=True)

import spine_scene  # noqa: E402
import vtk  # noqa: E402
from VertebraIDLib.engine.vertebrae import Vertebra  # noqa: E402
from VertebraIDLib.errors import VertebraIDError  # noqa: E402
from VertebraIDLib.slicer import logic as VID  # noqa: E402
from VertebraIDLib.slicer import mrml, review  # noqa: E402

spine, scene_with_ct = spine_scene.spine, spine_scene.scene_with_ct  # the shared fixtures, for pytest to find here


def labels_of(points) -> list[str]:
    return [points.GetNthControlPointLabel(i) for i in range(points.GetNumberOfControlPoints())]


# --------------------------------------------------------------------------- pure parts


def test_check_reasons_name_where_labelling_goes_wrong():
    assert review.check_reason("T12") == review.check_reason("L1") == "lowest rib?"
    assert review.check_reason("L5") == review.check_reason("S1") == "sacrum?"
    assert review.check_reason("C7") == review.check_reason("T1") == "first rib?"
    assert review.check_reason("T6") == "weak evidence"
    assert review.row_reason("L1", 0.3, False) == "lowest rib?"
    assert review.row_reason("L1", 0.3, True) == "" and review.row_reason("L1", 0.9, False) == ""
    # a flagged label's description carries its own reason, and the row shows it
    flagged = Vertebra("T6", [0.0, 0.0, 0.0], 0.8).flagged("L1 carries a rib on the CT: check the lowest rib")
    assert flagged.confidence_text == "confidence 0.49 (check: L1 carries a rib on the CT: check the lowest rib)"
    assert mrml.parse_confidence(flagged.confidence_text) == 0.49
    assert review.row_reason("T6", 0.49, False, flagged.confidence_text) == "L1 carries a rib on the CT: check the lowest rib"
    assert review.row_reason("T6", 0.3, False, "confidence 0.30 (check)") == "weak evidence"


def test_shifting_one_label():
    assert review.shift_label("T12", 1) == "L1" and review.shift_label("L1", -1) == "T12"
    assert review.shift_label("T12", 1, transitional=True) == "T13"
    assert review.shift_label("C1", 2) == "C3"
    with pytest.raises(VertebraIDError, match="Cannot move the labels down: S2 would go past S2"):
        review.shift_label("S2", 1)
    with pytest.raises(VertebraIDError, match="not a vertebra label"):
        review.shift_label("X1", 1)


def test_rows_put_the_labels_to_check_first():
    rows = [review.VertebraRow(i, str(i), label, conf, False, np.zeros(3), review.row_reason(label, conf, False))
            for i, (label, conf) in enumerate([("T11", 0.9), ("T12", 0.3), ("L1", 0.45), ("L5", 0.2), ("L2", 0.8)])]
    ordered = review.order_rows(rows)
    assert [r.label for r in ordered] == ["L5", "T12", "L1", "T11", "L2"]
    assert [r.reason for r in ordered[:3]] == ["sacrum?", "lowest rib?", "lowest rib?"]


# --------------------------------------------------------------------------- on MRML


def test_an_added_unnamed_point_is_solved_as_a_vertebra(scene_with_ct):
    """Issue 17, item 3: a point added with the Markups toolbar ('CT: Vertebrae-14') is a vertebra here."""
    context, ct_node, truth = scene_with_ct
    logic = VID.VertebraIDLogic(context)
    seen = truth[:-1]  # the detector missed the last vertebra (L4)
    run = logic.detect(ct_node, VID.PointsHeatmapSource([v.position for v in seen], [{v.label: 1.0} for v in seen]))
    points = run.nodes[mrml.ROLE_POINTS]
    assert labels_of(points) == [v.label for v in seen]

    index = points.AddControlPoint(vtk.vtkVector3d(*truth[-1].position))  # as the Markups toolbar adds it
    assert points.GetNthControlPointLabel(index) == f"CT: Vertebrae-{index + 1}"
    assert mrml.is_unnamed_label(points.GetNthControlPointLabel(index), points)
    report = logic.relabel(points)
    assert labels_of(points) == [v.label for v in truth]
    assert report.added == ["L4"] and "the point(s) you added named L4" in report.summary()
    l4 = labels_of(points).index("L4")
    np.testing.assert_allclose(points.GetNthControlPointPositionWorld(l4), truth[-1].position)  # kept where placed
    assert not points.GetNthControlPointLocked(l4)
    assert points.GetNthControlPointDescription(l4).startswith("added point, confidence ")

    # Later Re-labels name it again (it is remembered); deleting it means "no vertebra here".
    again = logic.relabel(points)
    assert labels_of(points) == [v.label for v in truth] and again.added == ["L4"]
    rows = logic.vertebra_rows(points)
    assert [r.added for r in rows if r.label == "L4"] == [True]
    points.RemoveNthControlPoint(labels_of(points).index("L4"))
    after = logic.relabel(points)
    assert labels_of(points) == [v.label for v in seen] and after.added == []

    # A point the user names freely stays a note; an empty label is a vertebra too.
    points.AddControlPoint(vtk.vtkVector3d(0.0, 80.0, 0.0), "note")
    blank = points.AddControlPoint(vtk.vtkVector3d(*truth[-1].position))
    points.SetNthControlPointLabel(blank, "")
    report = logic.relabel(points)
    assert labels_of(points) == [v.label for v in truth] + ["note"] and report.ignored == ["note"]


def test_an_added_point_off_the_spine_is_one_sentence(scene_with_ct):
    context, ct_node, truth = scene_with_ct
    logic = VID.VertebraIDLogic(context)
    run = logic.detect(ct_node, VID.PointsHeatmapSource([v.position for v in truth], None))
    points = run.nodes[mrml.ROLE_POINTS]
    before = labels_of(points)
    points.AddControlPoint(vtk.vtkVector3d(*(truth[3].position + [0.0, 120.0, 0.0])))
    with pytest.raises(VertebraIDError, match=r"The point you added at \(.*\) lies \d+ mm from the traced spine"):
        logic.relabel(points)
    assert labels_of(points)[:-1] == before  # nothing rewritten


def test_moving_every_label_fixes_a_spine_named_one_level_off(scene_with_ct):
    context, ct_node, truth = scene_with_ct
    logic = VID.VertebraIDLogic(context)
    run = logic.detect(ct_node, VID.shifted_points_source(truth, bias=0.05))
    points = run.nodes[mrml.ROLE_POINTS]
    true_labels = [v.label for v in truth]
    assert labels_of(points) != true_labels
    report = logic.shift_labels(points, -1)  # every label one level up: T4 -> T3
    assert labels_of(points) == true_labels
    assert report.shifted == -1 and report.changed == len(truth)
    assert report.summary().startswith("Moved every label up by 1 level; ")
    assert sum(points.GetNthControlPointLocked(i) for i in range(len(truth))) == 1  # the anchor only
    for i, v in enumerate(truth):  # positions unchanged
        assert np.linalg.norm(np.array(points.GetNthControlPointPositionWorld(i)) - v.position) < 3.0

    # Past the end of the spine: refused before anything changes.
    points.SetNthControlPointLabel(len(truth) - 1, "S2")
    with pytest.raises(VertebraIDError, match="would go past S2"):
        logic.shift_labels(points, 1)
    assert labels_of(points)[-1] == "S2"


def test_table_rows_label_and_lock_from_the_panel(scene_with_ct):
    context, ct_node, truth = scene_with_ct
    logic = VID.VertebraIDLogic(context)
    run = logic.detect(ct_node, VID.PointsHeatmapSource([v.position for v in truth], None))
    points = run.nodes[mrml.ROLE_POINTS]
    rows = logic.vertebra_rows(points)
    assert sorted(r.label for r in rows) == sorted(labels_of(points))
    checks = [r for r in rows if r.needs_check]
    assert rows[: len(checks)] == checks  # the labels to check come first
    for r in checks:
        assert r.reason == review.check_reason(r.label) and r.confidence < 0.5
    for r in rows:
        np.testing.assert_allclose(r.position, points.GetNthControlPointPositionWorld(r.index))

    first = rows[-1]
    logic.set_point_label(points, first.point_id, "l2 ")
    logic.set_point_locked(points, first.point_id, True)
    row = [r for r in logic.vertebra_rows(points) if r.point_id == first.point_id][0]
    assert row.label == "L2" and row.locked and row.confidence_text == "fixed" and not row.needs_check
    with pytest.raises(VertebraIDError, match="not a vertebra label"):
        logic.set_point_label(points, first.point_id, "Z9")
    if checks:
        assert logic.check_summary(points).startswith("Check ")


def test_descriptions_round_trip_confidences():
    from VertebraIDLib.engine.vertebrae import Vertebra

    assert mrml.parse_confidence("confidence 0.42 (check)") == pytest.approx(0.42)
    assert mrml.parse_confidence("added point, confidence 0.80") == pytest.approx(0.80)
    assert mrml.parse_confidence("fixed by user") == 1.0
    assert mrml._format_description(Vertebra("L1", [0, 0, 0], 0.3, extra={"added": True})) == \
        "added point, confidence 0.30 (check)"
