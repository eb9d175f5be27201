"""The VertebraID Slicer module's Logic and its MRML glue, for real, on slicer-core.

Detect -> edit -> Re-label on a synthetic spine; the nodes of a run; files written by Slicer's
storage nodes read back and validated against the markups schema; bad input and cancels
leaving the scene as it was.
"""
from __future__ import annotations

import json
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("slicer-core is not installed", allow_module_level=True)

import spine_scene
import vtk  # noqa: E402
from conftest import MODULE_FILE, REPO
from spine_scene import nearest_index, node_ids, sh_item_count
from VertebraIDLib.engine import pipeline
from VertebraIDLib.engine.anatomy import LEVELS_26
from VertebraIDLib.engine.evidence import Evidence
from VertebraIDLib.engine.pipeline import locate
from VertebraIDLib.engine.progress import Cancelled
from VertebraIDLib.engine.settings import EngineSettings
from VertebraIDLib.engine.vertebrae import Vertebra
from VertebraIDLib.engine.volume import Volume
from VertebraIDLib.errors import VertebraIDError  # noqa: E402
from VertebraIDLib.slicer import logic as VID  # noqa: E402
from VertebraIDLib.slicer import mrml

SCHEMA = REPO.parent / "shared" / "docs" / "specs" / "markups-schema-v1.0.3.json"
spine, scene_with_ct = spine_scene.spine, spine_scene.scene_with_ct  # the shared fixtures, for pytest to find here



# --------------------------------------------------------------------------- helpers


def schema_validator():
    jsonschema = pytest.importorskip("jsonschema")
    if not SCHEMA.exists():
        pytest.skip("markups schema absent")
    return jsonschema.Draft7Validator(json.loads(SCHEMA.read_text()))


def point_table(points_node) -> list[tuple[str, np.ndarray, bool]]:
    return [
        (
            points_node.GetNthControlPointLabel(i),
            np.array(points_node.GetNthControlPointPositionWorld(i)),
            bool(points_node.GetNthControlPointLocked(i)),
        )
        for i in range(points_node.GetNumberOfControlPoints())
    ]


class ZeroMapsSource:
    """Evidence with no activation anywhere: a scan without a spine."""

    description = "empty maps"

    def detect(self, ct, settings, progress=None):
        grid = np.zeros((20, 20, 30, 26), np.float32)
        return locate(Evidence(Volume(grid, np.diag([2.0, 2.0, 2.0, 1.0])), description=self.description), settings)


# --------------------------------------------------------------------------- MRML glue


def test_volume_nodes_round_trip_geometry_and_files(tmp_path):
    context = mrml.SceneContext.create()
    scene = context.scene
    rng = np.random.default_rng(0)
    array = rng.normal(size=(7, 9, 11)).astype(np.float32)
    rotation = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # oblique-free but permuted
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([0.8, 1.2, 2.5])
    affine[:3, 3] = [10.0, -20.0, 30.0]
    node = mrml.add_scalar_volume(scene, Volume(array, affine), "Oblique")
    back = mrml.volume_from_node(node)
    np.testing.assert_array_equal(back.array, array)
    np.testing.assert_allclose(back.affine, affine, atol=1e-9)

    # A parent linear transform moves the volume in the world; the Volume follows.
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    shift = vtk.vtkMatrix4x4()
    shift.SetElement(2, 3, 15.0)
    transform.SetMatrixTransformToParent(shift)
    node.SetAndObserveTransformNodeID(transform.GetID())
    moved = mrml.volume_from_node(node)
    np.testing.assert_allclose(moved.affine[:3, 3], affine[:3, 3] + [0, 0, 15.0])
    node.SetAndObserveTransformNodeID(None)

    for name in ("copy.nrrd", "copy.nii.gz"):
        mrml.write_volume(node, tmp_path / name)
        loaded = mrml.read_volume(context, tmp_path / name)
        again = mrml.volume_from_node(loaded)
        np.testing.assert_allclose(again.array, array, atol=1e-6)
        np.testing.assert_allclose(again.affine, affine, atol=1e-4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy.nii.gz", "copy.nrrd"]  # no temporaries left

    maps = Volume(rng.random((5, 6, 7, 26)).astype(np.float32), affine)
    multi = mrml.add_multichannel_volume(scene, maps, "maps")
    restored = mrml.multichannel_volume_from_node(multi)
    assert restored.array.shape == (5, 6, 7, 26)
    assert np.abs(restored.array - maps.array).max() <= maps.array.max() / 255.0 * 0.51


@pytest.mark.slow
@pytest.mark.skipif(not (REPO.parent / "shared" / "data" / "realct" / "taichi_lumbar_mpr").exists(), reason="real data absent")
def test_dicom_folders_read_like_the_core_reader():
    """Real DICOM series (one with a stray slice, one reformatted) load with the right geometry."""
    from VertebraIDLib.io.images import read_image

    context = mrml.SceneContext.create()
    for folder in ("ts_dicom/dicom", "taichi_lumbar_mpr/series5"):
        path = REPO.parent / "shared" / "data" / "realct" / folder
        node = mrml.read_volume(context, path)
        loaded, reference = mrml.volume_from_node(node), read_image(path)
        assert loaded.shape3 == reference.shape3 and min(loaded.shape3) > 1
        np.testing.assert_allclose(loaded.affine, reference.affine, atol=1e-4)
        np.testing.assert_array_equal(loaded.array, reference.array)


def test_input_volume_checks_name_the_problem():
    context = mrml.SceneContext.create()
    scene = context.scene
    affine = np.eye(4)
    with pytest.raises(VertebraIDError, match="Select an input volume"):
        mrml.check_input_volume_node(None)

    flat = mrml.add_scalar_volume(scene, Volume(np.zeros((30, 40, 1), np.float32), affine), "Slice")
    with pytest.raises(VertebraIDError, match="2-D image"):
        mrml.check_input_volume_node(flat)

    rgb = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "Photo")
    slicer.util.updateVolumeFromArray(rgb, np.zeros((4, 5, 6, 3), np.uint8))
    with pytest.raises(VertebraIDError, match="not a scalar volume"):
        mrml.check_input_volume_node(rgb)

    labels = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "Labels")
    slicer.util.updateVolumeFromArray(labels, np.zeros((4, 5, 6), np.uint8))
    with pytest.raises(VertebraIDError, match="label map"):
        mrml.check_input_volume_node(labels)

    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "Empty")
    with pytest.raises(VertebraIDError, match="no image data"):
        mrml.check_input_volume_node(empty)

    with pytest.raises(VertebraIDError, match="not a readable volume"):
        bad = Path(__file__)  # a Python file is no image
        mrml.read_volume(context, bad)


def test_point_edits_are_read_back():
    context = mrml.SceneContext.create()
    vertebrae = [Vertebra("T12", [0, 0, 40], 0.7), Vertebra("L1", [0, 0, 10], 0.9), Vertebra("L2", [0, 0, -25], 0.8)]
    node = mrml.add_vertebrae_points(context.scene, vertebrae)
    assert [node.GetNthControlPointLabel(i) for i in range(3)] == ["T12", "L1", "L2"]
    assert node.GetNthControlPointDescription(1) == "confidence 0.90"
    low = mrml.add_vertebrae_points(context.scene, [Vertebra("T1", [0, 0, 0], 0.2), Vertebra("T2", [0, 0, -20], 0.6)])
    assert [bool(low.GetNthControlPointSelected(i)) for i in range(2)] == [False, True]  # red: the one to check
    assert low.GetNthControlPointDescription(0) == "confidence 0.20 (check)"
    edits = mrml.read_point_edits(node)
    assert not any(p.edited for p in edits.points) and edits.deleted == []

    node.SetNthControlPointLabel(0, " t11 ")  # renamed (normalised to T11)
    node.SetNthControlPointPosition(1, 0.0, 3.0, 10.0)  # moved 3 mm
    node.RemoveNthControlPoint(2)  # deleted
    node.AddControlPoint(vtk.vtkVector3d(5, 5, 5), "marker")  # added, not a vertebra label
    edits = mrml.read_point_edits(node)
    by_label = {p.label: p for p in edits.points}
    assert by_label["T11"].renamed and not by_label["T11"].moved
    assert by_label["L1"].moved and not by_label["L1"].renamed
    assert by_label["MARKER"].added and not by_label["MARKER"].is_vertebra_label
    assert [label for label, _ in edits.deleted] == ["L2"]
    np.testing.assert_allclose(edits.deleted[0][1], [0, 0, -25])


# --------------------------------------------------------------------------- Detect


@pytest.mark.slow
def test_detect_builds_a_complete_run_folder(scene_with_ct):
    context, ct_node, truth = scene_with_ct
    scene = context.scene
    logic = VID.VertebraIDLogic(context)
    messages = []
    run = logic.detect(ct_node, VID.PointsHeatmapSource([v.position for v in truth], None), progress=lambda f, m: messages.append((f, m)))
    fractions = [f for f, _ in messages]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0

    shn = scene.GetSubjectHierarchyNode()
    assert mrml.run_folders(scene) == [run.folder]
    assert shn.GetItemName(run.folder) == "VertebraID CT"
    info = logic.run_info(run.folder)
    assert info["input"] == ct_node.GetID() and info["settings"]["method"] == "exact"

    nodes = logic.run_nodes(run.folder)
    expected = {
        mrml.ROLE_POINTS: "vtkMRMLMarkupsFiducialNode",
        mrml.ROLE_CENTERLINE: "vtkMRMLMarkupsCurveNode",
        mrml.ROLE_REGIONS: "vtkMRMLModelNode",
        mrml.ROLE_COMBINED: "vtkMRMLScalarVolumeNode",
        mrml.ROLE_HEATMAPS: "vtkMRMLVectorVolumeNode",
        mrml.ROLE_STRAIGHT_CT: "vtkMRMLScalarVolumeNode",
        mrml.ROLE_STRAIGHT_COMBINED: "vtkMRMLScalarVolumeNode",
        mrml.ROLE_SIGNALS: "vtkMRMLTableNode",
        mrml.ROLE_PLOT: "vtkMRMLPlotChartNode",
        mrml.ROLE_SERIES: "vtkMRMLPlotSeriesNode",
    }
    assert {role: node.GetClassName() for role, node in nodes.items()} == expected

    # The points: one per true vertebra, labels in order, near the true centres, confidence shown.
    points = nodes[mrml.ROLE_POINTS]
    table = point_table(points)
    assert len(table) == len(truth)
    for (label, position, locked), v in zip(table, truth):
        assert np.linalg.norm(position - v.position) < 3.0
        assert not locked
    assert all(points.GetNthControlPointDescription(i).startswith("confidence ") for i in range(len(table)))
    # Unlabelled evidence: only the chain names them; the labels are consecutive levels.
    labels = [label for label, _, _ in table]
    start = LEVELS_26.index(labels[0])
    assert labels == LEVELS_26[start : start + len(labels)]

    # Region colours: one sphere per point, the region index as its scalar.
    regions = nodes[mrml.ROLE_REGIONS]
    scalars = vtk.util.numpy_support.vtk_to_numpy(regions.GetPolyData().GetPointData().GetArray("region"))
    assert set(np.unique(scalars)) == {mrml.REGION_ORDER.index(label[0]) for label in labels}
    assert regions.GetDisplayNode().GetColorNode().GetName() == "VertebraID regions"

    # The centreline runs through the vertebrae, cranial to caudal.
    curve = mrml.curve_points(nodes[mrml.ROLE_CENTERLINE])
    assert curve[0][2] > curve[-1][2]
    distances = [np.min(np.linalg.norm(curve - v.position, axis=1)) for v in truth]
    assert max(distances) < 12.0  # control points every ~10 mm along the curve
    assert nodes[mrml.ROLE_CENTERLINE].GetLocked()

    # Ĝ overlay: the activation colour table, zero hidden by the threshold, peak at a vertebra.
    combined = nodes[mrml.ROLE_COMBINED]
    display = combined.GetDisplayNode()
    assert display.GetColorNode().GetName() == "VertebraID activation"
    assert display.GetApplyThreshold() and display.GetLowerThreshold() > 0
    g = mrml.volume_from_node(combined)
    peak_ras = g.voxel_to_world(np.array(np.unravel_index(np.argmax(g.array), g.shape3)))
    assert min(np.linalg.norm(peak_ras - v.position) for v in truth) < 4.0

    # Straightened volumes share the straightened grid; the CT keeps the input's window.
    straight_ct = mrml.volume_from_node(nodes[mrml.ROLE_STRAIGHT_CT])
    straight_g = mrml.volume_from_node(nodes[mrml.ROLE_STRAIGHT_COMBINED])
    assert straight_ct.shape3 == straight_g.shape3 == tuple(run.result.rectified.combined.shape)
    assert nodes[mrml.ROLE_STRAIGHT_CT].GetDisplayNode().GetWindow() == pytest.approx(400.0)
    assert straight_ct.array.max() > 500  # bone along the middle of the straightened CT

    # The 1-D signals: distance, 26 levels and Q̂, one row per centreline sample; 27 plot series.
    columns = mrml.table_columns(nodes[mrml.ROLE_SIGNALS])
    assert list(columns) == ["distance_mm", *LEVELS_26, "combined"]
    np.testing.assert_allclose(columns["combined"], run.result.rectified.combined_signal, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(np.diff(columns["distance_mm"]), run.result.rectified.step_mm)
    assert nodes[mrml.ROLE_PLOT].GetNumberOfPlotSeriesNodes() == 27

    # Detect again: a second folder; the first is untouched.
    first_points = point_table(points)
    second = logic.detect(ct_node, VID.PointsHeatmapSource([v.position for v in truth], None))
    assert mrml.run_folders(scene) == [run.folder, second.folder]
    assert shn.GetItemName(second.folder) == "VertebraID CT (2)"
    assert [t[0] for t in point_table(points)] == [t[0] for t in first_points]


def test_detect_edit_relabel_fixes_a_shifted_labelling(scene_with_ct, tmp_path):
    """A shifted-by-one result, made on purpose; the user corrects one label; Re-label fixes the rest."""
    context, ct_node, truth = scene_with_ct
    logic = VID.VertebraIDLogic(context)
    run = logic.detect(ct_node, VID.shifted_points_source(truth, bias=0.05))
    true_labels = [v.label for v in truth]
    detected = [v.label for v in run.result.vertebrae]
    shifted = [LEVELS_26[LEVELS_26.index(label) + 1] for label in true_labels]
    assert detected == shifted  # every vertebra named one level too low

    points = run.nodes[mrml.ROLE_POINTS]
    middle = truth[len(truth) // 2]
    index = nearest_index(points, middle.position)
    assert points.GetNthControlPointLabel(index) != middle.label
    user_position = np.array(points.GetNthControlPointPositionWorld(index))
    points.SetNthControlPointLabel(index, middle.label)  # the user's one correction...
    points.SetNthControlPointLocked(index, True)  # ...which they lock

    report = logic.relabel(points)
    table = point_table(points)
    assert [label for label, _, _ in table] == true_labels
    for (label, position, locked), v in zip(table, truth):
        assert np.linalg.norm(position - v.position) < 3.0, label
    # The user's point is kept exactly, still locked; the others were free to move.
    kept = [t for t in table if t[0] == middle.label][0]
    np.testing.assert_allclose(kept[1], user_position)
    assert kept[2] and sum(locked for _, _, locked in table) == 1
    assert [c.label for c in report.constraints] == [middle.label]
    assert report.changed == len(truth) - 1
    # The region spheres follow the new labels.
    scalars = vtk.util.numpy_support.vtk_to_numpy(
        run.nodes[mrml.ROLE_REGIONS].GetPolyData().GetPointData().GetArray("region")
    )
    assert set(np.unique(scalars)) == {mrml.REGION_ORDER.index(label[0]) for label in true_labels}

    # Files written by Slicer's storage nodes: schema-valid, read back with the same labels.
    paths = logic.save_results(run.folder, tmp_path, "case")
    validator = schema_validator()
    for path in paths.values():
        document = json.loads(path.read_text())
        assert not list(validator.iter_errors(document)), path.name
    document = json.loads(paths["vertebrae"].read_text())
    markup = document["markups"][0]
    assert markup["type"] == "Fiducial" and markup["coordinateSystem"] == "LPS"
    assert [p["label"] for p in markup["controlPoints"]] == true_labels
    lps = np.array([p["position"] for p in markup["controlPoints"]])
    np.testing.assert_allclose(lps * [-1, -1, 1], [t[1] for t in table], atol=1e-3)
    assert json.loads(paths["centerline"].read_text())["markups"][0]["type"] == "Curve"

    other = mrml.SceneContext.create()
    reread = mrml.read_markups(other, paths["vertebrae"])
    assert [reread.GetNthControlPointLabel(i) for i in range(reread.GetNumberOfControlPoints())] == true_labels
    assert reread.GetNthControlPointLocked(true_labels.index(middle.label))


@pytest.mark.slow
def test_relabel_rules_for_moved_added_deleted_and_foreign_points(scene_with_ct):
    context, ct_node, truth = scene_with_ct
    logic = VID.VertebraIDLogic(context)
    source = VID.PointsHeatmapSource([v.position for v in truth], [{v.label: 1.0} for v in truth])
    run = logic.detect(ct_node, source)
    points = run.nodes[mrml.ROLE_POINTS]
    assert [t[0] for t in point_table(points)] == [v.label for v in truth]

    # Move T8 by 4 mm (a constraint, kept as placed); add a non-vertebra marker; delete the last point.
    t8 = [t[0] for t in point_table(points)].index("T8")
    moved_to = np.array(points.GetNthControlPointPositionWorld(t8)) + [0.0, 4.0, 0.0]
    points.SetNthControlPointPositionWorld(t8, *moved_to)
    points.AddControlPoint(vtk.vtkVector3d(0.0, 80.0, 0.0), "note")
    last = truth[-1]
    points.RemoveNthControlPoint(nearest_index(points, last.position))

    report = logic.relabel(points)
    table = point_table(points)
    labels = [t[0] for t in table]
    assert labels == [v.label for v in truth[:-1]] + ["note"]  # the deleted level stays deleted
    assert report.left_out == [last.label]
    assert report.ignored == ["note"]
    t8_after = table[labels.index("T8")]
    np.testing.assert_allclose(t8_after[1], moved_to)
    assert t8_after[2]  # an edited point becomes locked, so it stays a constraint
    np.testing.assert_allclose(table[-1][1], [0.0, 80.0, 0.0])

    # Re-label again without edits: nothing changes, the deletion is remembered.
    again = logic.relabel(points)
    assert [t[0] for t in point_table(points)] == labels and again.changed == 0

    # Two fixed points with one label: refused, and the list is left as it was.
    before = point_table(points)
    points.SetNthControlPointLabel(0, "T8")
    with pytest.raises(VertebraIDError, match="Several fixed points are labelled T8"):
        logic.relabel(points)
    assert [t[0] for t in point_table(points)] == ["T8"] + [t[0] for t in before[1:]]


def test_the_status_line_gives_each_reason_to_check_once():
    reason = pipeline.UNANCHORED_REASON
    found = [Vertebra(label, [0.0, 0.0, -30.0 * i], 0.3, extra={"flagged": reason})
             for i, label in enumerate(("T5", "T6", "T7"))]
    found.append(Vertebra("T8", [0.0, 0.0, -120.0], 0.95))
    run = VID.DetectRun(0, {}, SimpleNamespace(vertebrae=found), "bundled model", {"network": 1.0})
    assert run.to_check == [("T5", reason), ("T6", reason), ("T7", reason)]
    text = run.summary()
    assert text.count(reason) == 1 and f"check T5 T6 T7 ({reason})" in text and "T8 (" not in text


def test_relabel_with_vertebrae_placed_past_the_end_of_the_detected_spine(scene_with_ct):
    # The detector found T3..L2; the user places L3 and L4 below the last point and re-labels.
    context, ct_node, truth = scene_with_ct
    logic = VID.VertebraIDLogic(context)
    found, placed = truth[:-2], truth[-2:]
    run = logic.detect(ct_node, VID.PointsHeatmapSource([v.position for v in found], [{v.label: 1.0} for v in found]))
    points = run.nodes[mrml.ROLE_POINTS]
    assert [t[0] for t in point_table(points)] == [v.label for v in found]
    for v in placed:
        points.AddControlPoint(vtk.vtkVector3d(*v.position), v.label)
    logic.relabel(points)
    table = point_table(points)
    assert [t[0] for t in table] == [v.label for v in truth]
    for row, v in zip(table[-2:], placed):
        np.testing.assert_allclose(row[1], v.position)
        assert row[2]  # the user's points stay locked


@pytest.mark.slow
def test_relabel_after_reloading_the_scene_bundle(scene_with_ct, tmp_path):
    """Re-label needs no memory of Detect: the saved maps rebuild the signals."""
    context, ct_node, truth = scene_with_ct
    logic = VID.VertebraIDLogic(context)
    run = logic.detect(ct_node, VID.shifted_points_source(truth, bias=0.05))
    bundle = logic.save_scene(tmp_path / "case.mrb")
    names = zipfile.ZipFile(bundle).namelist()
    assert "case/case.mrml" in names
    assert any(n.endswith("Vertebrae.mrk.json") for n in names)
    assert any(n.endswith("Activation maps.nhdr") for n in names)

    fresh = mrml.SceneContext.create()
    mrml.read_scene_bundle(fresh.scene, bundle)
    [folder] = mrml.run_folders(fresh.scene)
    reloaded_logic = VID.VertebraIDLogic(fresh)
    nodes = reloaded_logic.run_nodes(folder)
    assert set(nodes) == set(run.nodes) | {mrml.ROLE_SERIES}
    points = nodes[mrml.ROLE_POINTS]
    assert [t[0] for t in point_table(points)] == [v.label for v in run.result.vertebrae]
    middle = truth[len(truth) // 2]
    index = nearest_index(points, middle.position)
    points.SetNthControlPointLabel(index, middle.label)
    reloaded_logic.relabel(points)
    assert [t[0] for t in point_table(points)] == [v.label for v in truth]


@pytest.mark.slow
def test_level_map_shows_one_vertebras_channel(scene_with_ct):
    context, ct_node, truth = scene_with_ct
    logic = VID.VertebraIDLogic(context)
    source = VID.PointsHeatmapSource([v.position for v in truth], [{v.label: 1.0} for v in truth])
    run = logic.detect(ct_node, source)
    node = logic.show_level_map(run.folder, "t10")
    assert node.GetName() == "CT: Activation map T10"
    level_map = mrml.volume_from_node(node)
    peak = level_map.voxel_to_world(np.array(np.unravel_index(np.argmax(level_map.array), level_map.shape3)))
    t10 = [v for v in truth if v.label == "T10"][0]
    assert np.linalg.norm(peak - t10.position) < 3.0
    again = logic.show_level_map(run.folder, "L2")  # the same node, now showing L2
    assert again.GetID() == node.GetID() and again.GetName() == "CT: Activation map L2"
    with pytest.raises(VertebraIDError, match="transitional"):
        logic.show_level_map(run.folder, "T13")
    with pytest.raises(VertebraIDError, match="not a vertebra label"):
        logic.show_level_map(run.folder, "X9")


# --------------------------------------------------------------------------- bad input, cancel


@pytest.mark.slow
def test_bad_input_and_cancel_leave_the_scene_as_it_was(scene_with_ct, monkeypatch):
    context, ct_node, truth = scene_with_ct
    scene = context.scene
    logic = VID.VertebraIDLogic(context)
    good = VID.PointsHeatmapSource([v.position for v in truth], None)
    before_nodes, before_items = node_ids(scene), sh_item_count(scene)

    def unchanged():
        return node_ids(scene) == before_nodes and sh_item_count(scene) == before_items

    with pytest.raises(VertebraIDError, match="Select an input volume"):
        logic.detect(None, good)
    flat = mrml.add_scalar_volume(scene, Volume(np.zeros((20, 20, 1), np.float32), np.eye(4)), "Flat")
    before_nodes, before_items = node_ids(scene), sh_item_count(scene)
    with pytest.raises(VertebraIDError, match="2-D image"):
        logic.detect(flat, good)
    with pytest.raises(VertebraIDError, match="No spine was found in 'CT'"):
        logic.detect(ct_node, ZeroMapsSource())
    assert unchanged()
    with pytest.raises(VertebraIDError, match="hold no point"):
        logic.detect(ct_node, VID.PointsHeatmapSource(np.zeros((0, 3))))
    assert unchanged()

    # The network: a clear sentence whatever is missing (packages, model file, inference).
    monkeypatch.setattr(VID.NetworkHeatmapSource, "_bundled_model", staticmethod(lambda: None))  # an install without it
    with pytest.raises(VertebraIDError) as missing_model:
        logic.detect(ct_node, VID.NetworkHeatmapSource(None))
    assert any(word in str(missing_model.value) for word in ("model file", "not installed", "no network inference"))
    with pytest.raises(VertebraIDError):
        logic.detect(ct_node, VID.NetworkHeatmapSource("/no/such/model.safetensors"))
    monkeypatch.setattr(VID.NetworkHeatmapSource, "missing_packages", staticmethod(lambda: ["torch", "monai"]))
    with pytest.raises(VID.MissingDependencies, match="needs torch and monai, which are not installed"):
        logic.detect(ct_node, VID.NetworkHeatmapSource("model.safetensors"))
    monkeypatch.undo()
    assert unchanged()

    # Cancel at each reported step: Cancelled, and nothing added.
    steps = []
    logic.detect(ct_node, good, progress=lambda f, m: steps.append(m))
    before_nodes, before_items = node_ids(scene), sh_item_count(scene)
    for stop_at in range(len(steps) - 1):  # the last report is "Done", after the nodes exist
        calls = []

        def cancel_at(fraction, message, calls=calls, stop_at=stop_at):
            calls.append(message)
            return len(calls) > stop_at

        with pytest.raises(Cancelled):
            logic.detect(ct_node, good, progress=cancel_at)
        assert unchanged(), steps[stop_at]

    # A failure while the nodes are being made removes the ones already made.
    def broken_table(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(mrml, "add_signals_table", broken_table)
    with pytest.raises(RuntimeError, match="disk full"):
        logic.detect(ct_node, good)
    assert unchanged()


@pytest.mark.slow
def test_relabel_needs_a_run_and_the_exact_solver_options_are_kept(scene_with_ct):
    context, ct_node, truth = scene_with_ct
    logic = VID.VertebraIDLogic(context)
    with pytest.raises(VertebraIDError, match="Select the 'Vertebrae' point list"):
        logic.relabel(ct_node)
    run = logic.detect(ct_node, VID.PointsHeatmapSource([v.position for v in truth], [{v.label[0]: 1.0} for v in truth]), EngineSettings(method="paper"))
    assert logic.run_info(run.folder)["settings"]["method"] == "paper"
    report = logic.relabel(run.nodes[mrml.ROLE_POINTS])  # no edits: the exact solver, no constraints
    assert report.constraints == [] and report.result.method == "exact"
    assert logic.run_info(run.folder)["relabelled"]["constraints"] == []


@pytest.mark.slow
def test_the_bundled_network_detects_and_relabelling_keeps_its_settings(scene_with_ct):
    """Detect with the default (bundled) model; re-labelling without edits repeats the same chain."""
    pytest.importorskip("torch")
    from VertebraIDLib.networks.bundle import bundled_model_path, load_model

    context, ct_node, _ = scene_with_ct
    logic = VID.VertebraIDLogic(context)
    run = logic.detect(ct_node, VID.NetworkHeatmapSource(None, device="cpu"))
    model = load_model(bundled_model_path(), "cpu")
    assert "vertebraid.safetensors with its level labeller" in run.evidence and model.metadata["status"] in run.evidence
    stored = logic.run_info(run.folder)["settings"]
    assert {key: stored[key] for key in model.engine_settings} == model.engine_settings
    detected = [v.label for v in run.result.vertebrae]
    assert detected
    # the model's level labeller was used, and its evidence is stored for Re-label (which has no CT at hand)
    stored_levels = np.array(logic.run_info(run.folder)["level_signals"])
    assert stored_levels.shape == (len(run.result.centerline), 26)
    np.testing.assert_allclose(stored_levels, run.result.rectified.level_signals, atol=1e-4)
    logic._prepared.clear()  # Re-label as after reopening the scene: rebuilt from the stored nodes
    report = logic.relabel(run.nodes[mrml.ROLE_POINTS])
    assert [v.label for v in report.result.vertebrae] == detected and report.changed == 0


def test_points_source_reads_files(tmp_path, spine):
    ct, truth = spine
    context = mrml.SceneContext.create()
    positions = np.array([v.position for v in truth])
    node = mrml.add_vertebrae_points(context.scene, truth)
    mrml.write_markups(node, tmp_path / "case.mrk.json")
    count = context.scene.GetNumberOfNodes()
    source = VID.PointsHeatmapSource.from_file(tmp_path / "case.mrk.json", context, None, "region")
    assert context.scene.GetNumberOfNodes() == count  # the loaded list is not left behind
    np.testing.assert_allclose(source.positions, positions, atol=1e-3)
    assert source.probabilities == [{v.label[0]: 1.0} for v in truth]

    (tmp_path / "points.json").write_text(
        json.dumps({"coordinate_system": "RAS", "points": [{"position": list(map(float, p))} for p in positions]})
    )
    plain = VID.PointsHeatmapSource.from_file(tmp_path / "points.json", context)
    np.testing.assert_allclose(plain.positions, positions)
    assert plain.probabilities == [None] * len(positions)
    with pytest.raises(VertebraIDError, match="no such file"):
        VID.PointsHeatmapSource.from_file(tmp_path / "absent.mrk.json", context)
    with pytest.raises(VertebraIDError, match="Unknown point label mode"):
        VID.PointsHeatmapSource.probabilities_from_labels(["L1"], "colour")


# --------------------------------------------------------------------------- module files


def load_module_file():
    """The scripted module file, executed as Slicer would import it (here without Qt)."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("VertebraID", MODULE_FILE)
    module = importlib.util.module_from_spec(spec)
    sys.modules["VertebraID"] = module
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop("VertebraID", None)
    return module


def test_the_module_file_takes_its_logic_from_the_library():
    module = load_module_file()
    assert module.VertebraIDLogic is VID.VertebraIDLogic
    assert {"VertebraID", "VertebraIDWidget", "VertebraIDTest", "VertebraIDParameterNode"} <= set(vars(module))


def test_widget_ui_and_parameter_node_agree():
    """The Widget cannot run here; check that its .ui, parameter node and code name the same things."""
    import re
    import xml.etree.ElementTree as ET

    module_dir = REPO / "VertebraID"
    tree = ET.parse(module_dir / "Resources" / "UI" / "VertebraID.ui")
    widgets = {w.get("name"): w.get("class") for w in tree.iter("widget")}
    bound = {}
    for w in tree.iter("widget"):
        for p in w.findall("property"):
            if p.get("name") == "SlicerParameterName":
                bound[p.find("string").text] = w.get("class")
    parameters = load_module_file().VertebraIDParameterNode.__annotations__
    assert set(bound) == set(parameters)
    # Choice-typed strings need combo boxes; nodes need node selectors; bools check boxes.
    for name, cls in bound.items():
        annotation = str(parameters[name])
        if "Choice" in annotation:
            assert cls == "QComboBox", name
        elif "vtkMRML" in annotation:
            assert cls == "qMRMLNodeComboBox", name
        elif annotation in ("bool", "<class 'bool'>"):
            assert cls == "QCheckBox", name
    used = set(re.findall(r"self\.ui\.(\w+)", (module_dir / "VertebraID.py").read_text()))
    assert used <= set(widgets), used - set(widgets)

    from PIL import Image

    with Image.open(module_dir / "Resources" / "Icons" / "VertebraID.png") as icon:
        assert icon.size == (128, 128)
    cmake = (module_dir / "CMakeLists.txt").read_text()
    for resource in ("Resources/Icons/${MODULE_NAME}.png", "Resources/UI/${MODULE_NAME}.ui", "VertebraIDLib/*.py"):
        assert resource in cmake
    top = (REPO / "CMakeLists.txt").read_text()
    assert "add_subdirectory(VertebraID)" in top and "add_subdirectory(VertebraIDTrain)" in top
    s4ext = dict(
        line.split(" ", 1) if " " in line else (line, "")
        for line in (REPO / "VertebraID.s4ext").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    )
    for key in ("scm", "scmurl", "depends", "homepage", "category", "iconurl", "status", "description", "enabled"):
        assert s4ext.get(key, "").strip(), key
