"""Scene hygiene and Detect in a background process, for real, on slicer-core.

- Every run's outputs are named after the input ("CT: Vertebrae", then "CT (2): Vertebrae"),
  the intermediates sit in a collapsed "details" sub-folder, and the Logic lists its own
  volumes so that the input selector can hide them.
- Saving the scene leaves it pointing at a real folder, and work goes on after it.
- The Logic's cache of maps empties when the scene closes and forgets deleted runs.
- Detect in a child process gives the in-process result, streams its progress, and a cancel
  at any moment ends the process, removes its folder and leaves the scene as it was.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("slicer-core is not installed", allow_module_level=True)

import spine_scene  # noqa: E402
from spine_scene import node_ids, sh_item_count  # noqa: E402
from VertebraIDLib.engine.progress import Cancelled  # noqa: E402
from VertebraIDLib.errors import VertebraIDError  # noqa: E402
from VertebraIDLib.slicer import background, mrml  # noqa: E402
from VertebraIDLib.slicer import logic as VID  # noqa: E402

spine, scene_with_ct = spine_scene.spine, spine_scene.scene_with_ct  # the shared fixtures, for pytest to find here


def points_source(truth):
    return VID.PointsHeatmapSource([v.position for v in truth], None)


@pytest.fixture(autouse=True)
def private_temp_folder(tmp_path, monkeypatch):
    """Jobs' folders go to this test's own temporary folder: tests running beside it make their own."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))


def job_folders() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("VertebraID-*")}


# --------------------------------------------------------------------------- names and folders


def test_two_runs_have_distinct_names_and_a_collapsed_details_folder(scene_with_ct):
    """Issue 17, item 4: two runs give two distinguishable entries; outputs stay out of the input selector."""
    context, ct_node, truth = scene_with_ct
    scene = context.scene
    shn = scene.GetSubjectHierarchyNode()
    logic = VID.VertebraIDLogic(context)
    first = logic.detect(ct_node, points_source(truth))
    second = logic.detect(ct_node, points_source(truth))

    assert first.nodes[mrml.ROLE_POINTS].GetName() == "CT: Vertebrae"
    assert second.nodes[mrml.ROLE_POINTS].GetName() == "CT (2): Vertebrae"
    assert [shn.GetItemName(f) for f in mrml.run_folders(scene)] == ["VertebraID CT", "VertebraID CT (2)"]
    names = [scene.GetNthNode(i).GetName() for i in range(scene.GetNumberOfNodes())
             if scene.GetNthNode(i).IsA("vtkMRMLDisplayableNode") or scene.GetNthNode(i).IsA("vtkMRMLTableNode")]
    assert len(names) == len(set(names)), "two nodes share a name"
    for run in (first, second):
        prefix = "CT" if run is first else "CT (2)"
        assert all(node.GetName().startswith(prefix + ": ") for node in run.nodes.values())
        # The intermediates in a collapsed "details" sub-folder; points, centreline, regions and Ĝ on top.
        top = {n.GetAttribute(mrml.ATTR_ROLE) for n in mrml.folder_nodes(scene, run.folder)}
        assert top == {mrml.ROLE_POINTS, mrml.ROLE_CENTERLINE, mrml.ROLE_REGIONS, mrml.ROLE_COMBINED}
        details = shn.GetItemParent(shn.GetItemByDataNode(run.nodes[mrml.ROLE_HEATMAPS]))
        assert shn.GetItemName(details) == "details" and shn.GetItemParent(details) == run.folder
        assert not shn.GetItemExpanded(details)
        assert logic.run_of(run.nodes[mrml.ROLE_STRAIGHT_CT]) == run.folder  # found through the sub-folder

    # Every volume a run made is listed for the input selector to hide; the CT is not.
    hidden = set(logic.output_node_ids())
    volumes = {scene.GetNthNodeByClass(i, "vtkMRMLVolumeNode").GetID()
               for i in range(scene.GetNumberOfNodesByClass("vtkMRMLVolumeNode"))}
    assert hidden == volumes - {ct_node.GetID()}
    # A level map made on demand joins the run's details, named after the run.
    level_map = logic.show_level_map(second.folder, "T8")
    assert level_map.GetName() == "CT (2): Activation map T8" and level_map.GetID() in logic.output_node_ids()
    assert shn.GetItemName(shn.GetItemParent(shn.GetItemByDataNode(level_map))) == "details"


# --------------------------------------------------------------------------- save, then keep working


def test_save_then_keep_working(scene_with_ct, tmp_path):
    """Issue 17, item 5: after saving, the scene's root directory is where it was saved, and it exists."""
    context, ct_node, truth = scene_with_ct
    scene = context.scene
    logic = VID.VertebraIDLogic(context)
    run = logic.detect(ct_node, VID.shifted_points_source(truth, bias=0.05))
    bundle = logic.save_scene(tmp_path / "first" / "case.mrb")
    root = Path(scene.GetRootDirectory())
    assert root == (tmp_path / "first").resolve() and root.is_dir()
    assert scene.GetURL() == str(bundle.resolve())
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no staging folder left

    # Work goes on: correct, re-label, detect again, save the files and the scene again.
    points = run.nodes[mrml.ROLE_POINTS]
    middle = truth[len(truth) // 2]
    index = int(np.argmin([np.linalg.norm(np.array(points.GetNthControlPointPositionWorld(i)) - middle.position)
                           for i in range(points.GetNumberOfControlPoints())]))
    points.SetNthControlPointLabel(index, middle.label)
    logic.relabel(points)
    logic.detect(ct_node, points_source(truth))
    paths = logic.save_results(run.folder, tmp_path / "files", "case")
    assert all(p.is_file() for p in paths.values())
    again = logic.save_scene(tmp_path / "second" / "case.mrb")
    assert Path(scene.GetRootDirectory()).is_dir() and again.is_file()

    fresh = mrml.SceneContext.create()
    mrml.read_scene_bundle(fresh.scene, again)
    assert len(mrml.run_folders(fresh.scene)) == 2
    reread = mrml.folder_node_by_role(fresh.scene, mrml.run_folders(fresh.scene)[0], mrml.ROLE_POINTS)
    assert [reread.GetNthControlPointLabel(i) for i in range(reread.GetNumberOfControlPoints())] == \
        [v.label for v in truth]

    # A failed save leaves the root directory as it was.
    blocker = tmp_path / "blocked"
    blocker.write_text("a file where a folder should be")
    before = scene.GetRootDirectory()
    with pytest.raises((VertebraIDError, OSError)):
        logic.save_scene(blocker / "case.mrb")
    assert scene.GetRootDirectory() == before


# --------------------------------------------------------------------------- the cache


def test_the_cache_empties_when_the_scene_closes_and_forgets_deleted_runs(scene_with_ct):
    """Issue 17, item 6."""
    context, ct_node, truth = scene_with_ct
    scene = context.scene
    logic = VID.VertebraIDLogic(context)
    runs = [logic.detect(ct_node, points_source(truth)) for _ in range(3)]
    assert list(logic._prepared) == [r.folder for r in runs[-VID.CACHED_RUNS:]]  # bounded, newest kept
    logic.relabel(runs[0].nodes[mrml.ROLE_POINTS])  # rebuilt from its nodes, then cached again
    assert runs[0].folder in logic._prepared and len(logic._prepared) == VID.CACHED_RUNS

    mrml.remove_folder(scene, runs[0].folder)  # the user deletes the run's folder in the Data module
    assert runs[0].folder not in logic._prepared
    newest = runs[-1]
    assert newest.folder in logic._prepared
    mrml.remove_node_with_dependents(scene, newest.nodes[mrml.ROLE_POINTS])  # or only its point list
    assert newest.folder not in logic._prepared

    scene.Clear(0)  # File > Close scene
    assert len(logic._prepared) == 0
    # The Logic goes on in the closed scene.
    ct_node = mrml.add_scalar_volume(scene, VID.synthetic_spine_case()[0], "CT")
    run = logic.detect(ct_node, points_source(truth))
    assert list(logic._prepared) == [run.folder]
    logic.cleanup()
    assert len(logic._prepared) == 0


# --------------------------------------------------------------------------- background


def test_detect_in_a_background_process_matches_detect_here(scene_with_ct):
    context, ct_node, truth = scene_with_ct
    logic = VID.VertebraIDLogic(context)
    before = job_folders()
    steps = []
    run = logic.detect_in_background(ct_node, VID.shifted_points_source(truth, 0.05),
                                     progress=lambda f, m: steps.append((f, m)))
    here = logic.detect(ct_node, VID.shifted_points_source(truth, 0.05))
    assert [v.label for v in run.result.vertebrae] == [v.label for v in here.result.vertebrae]
    for a, b in zip(run.result.vertebrae, here.result.vertebrae):
        np.testing.assert_allclose(a.position, b.position, atol=1e-6)
        assert a.confidence == pytest.approx(b.confidence, abs=1e-6)
    fractions = [f for f, _ in steps]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and len(steps) >= 3
    assert set(run.nodes) == set(here.nodes)
    np.testing.assert_allclose(mrml.table_columns(run.nodes[mrml.ROLE_SIGNALS])["combined"],
                               mrml.table_columns(here.nodes[mrml.ROLE_SIGNALS])["combined"], atol=1e-4)
    straight = mrml.volume_from_node(run.nodes[mrml.ROLE_STRAIGHT_CT])
    np.testing.assert_allclose(straight.array, mrml.volume_from_node(here.nodes[mrml.ROLE_STRAIGHT_CT]).array,
                               atol=1e-3)
    assert job_folders() == before  # the job's folder is gone
    assert run.nodes[mrml.ROLE_POINTS].GetName() == "CT: Vertebrae"
    logic.relabel(run.nodes[mrml.ROLE_POINTS])  # Re-label works on a background run


def test_cancel_mid_run_leaves_the_scene_as_it_was(scene_with_ct):
    """Issue 17, must show: cancel mid-run leaves the scene as it was (and no process, no folder behind)."""
    context, ct_node, truth = scene_with_ct
    scene = context.scene
    logic = VID.VertebraIDLogic(context)
    nodes, items, folders = node_ids(scene), sh_item_count(scene), job_folders()

    # Cancel as soon as the child itself reports (it is then importing or computing).
    job = logic.start_detect(ct_node, points_source(truth))
    with pytest.raises(Cancelled):
        job.wait(lambda fraction, message: message != "Starting")
    assert job.state == "cancelled" and job.process.poll() is not None and not job.folder.exists()

    # Cancel at every progress report of a whole run, through the Logic's blocking form.
    messages = []
    logic.detect_in_background(ct_node, points_source(truth), progress=lambda f, m: messages.append(m))
    nodes, items = node_ids(scene), sh_item_count(scene)
    for stop_at in range(len(messages) - 2):  # the last reports come after the child has finished
        calls = []

        def cancel_at(fraction, message, calls=calls, stop_at=stop_at):
            calls.append(message)
            return len(calls) > stop_at

        with pytest.raises(Cancelled):
            logic.detect_in_background(ct_node, points_source(truth), progress=cancel_at)
        assert node_ids(scene) == nodes and sh_item_count(scene) == items, messages[stop_at]
    assert job_folders() == folders

    # A Widget's cancel: the job is ended from outside while it runs.
    job = logic.start_detect(ct_node, points_source(truth))
    job.cancel()
    assert not job.poll() and job.state == "cancelled"
    with pytest.raises(Cancelled):
        logic.finish_detect(job)
    assert node_ids(scene) == nodes and job_folders() == folders


def test_a_failure_in_the_background_is_one_sentence(scene_with_ct):
    context, ct_node, truth = scene_with_ct
    scene = context.scene
    logic = VID.VertebraIDLogic(context)
    nodes = node_ids(scene)

    class Mystery(VID.PointsHeatmapSource):
        def to_spec(self):
            return {"kind": "mystery"}

    with pytest.raises(VertebraIDError, match="^Unknown evidence source 'mystery'.$"):
        logic.detect_in_background(ct_node, Mystery([v.position for v in truth]))
    with pytest.raises(VertebraIDError, match="hold no point"):  # checked before any process starts
        logic.start_detect(ct_node, VID.PointsHeatmapSource(np.zeros((0, 3))))
    with pytest.raises(VertebraIDError, match="Cannot start the background process"):
        logic.start_detect(ct_node, points_source(truth), python="/no/such/python")
    assert node_ids(scene) == nodes

    # The child crashing (here: killed from outside) is a sentence too, never a traceback.
    job = logic.start_detect(ct_node, points_source(truth))
    job.process.kill()
    with pytest.raises(VertebraIDError, match="stopped unexpectedly"):
        job.wait()
    assert not job.folder.exists()


def test_the_child_reads_and_writes_plain_files(tmp_path, spine):
    """The job's files: numpy arrays without pickles and JSON; a stray line from a library is only logged."""
    ct, truth = spine
    job = background.DetectJob.start(ct, points_source(truth).to_spec(), VID.EngineSettings(), input_name="CT")
    job.wait()
    assert sorted(p.name for p in job.folder.iterdir()) == sorted([background.JOB_FILE, background.CT_FILE,
                                                                  background.RESULT_FILE, background.ARRAYS_FILE])
    output = job.output()
    assert [v.label for v in output.result.vertebrae] and not job.folder.exists()
    job._take("a warning printed by some library")
    job._take(background.MARK + '{"progress": 0.5, "message": "half"}')
    assert job.log[-1] == "a warning printed by some library" and (job.fraction, job.message) == (0.5, "half")


@pytest.mark.slow
@pytest.mark.torch
def test_the_bundled_network_in_the_background(scene_with_ct):
    pytest.importorskip("torch")
    context, ct_node, _ = scene_with_ct
    logic = VID.VertebraIDLogic(context)
    run = logic.detect_in_background(ct_node, VID.NetworkHeatmapSource(None, device="cpu"))
    assert run.result.vertebrae and "vertebraid.safetensors" in run.evidence
    info = logic.run_info(run.folder)
    assert np.array(info["level_signals"]).shape == (len(run.result.centerline), 26)
    assert info["combined_is_sum"] is True
    report = logic.relabel(run.nodes[mrml.ROLE_POINTS])
    assert [v.label for v in report.result.vertebrae] == [v.label for v in run.result.vertebrae]


def test_a_picture_of_a_run_is_rendered_off_screen_and_leaves_the_scene_clean(scene_with_ct, tmp_path):
    """Slicer's own slice-view code (slice logic, displayable managers) draws the CT, Ĝ and the points."""
    from PIL import Image

    from VertebraIDLib.slicer import snapshot

    context, ct_node, truth = scene_with_ct
    scene = context.scene
    logic = VID.VertebraIDLogic(context)
    run = logic.detect(ct_node, points_source(truth))
    points = run.nodes[mrml.ROLE_POINTS]
    before = node_ids(scene)
    display = points.GetDisplayNode()
    state = (display.GetVisibility(), display.GetSliceProjection(), display.GetPropertiesLabelVisibility())
    path = snapshot.run_picture(logic, run.folder, tmp_path / "run.png", size=(200, 320))
    assert node_ids(scene) == before  # no slice node, composite node or picture list left behind
    assert (display.GetVisibility(), display.GetSliceProjection(), display.GetPropertiesLabelVisibility()) == state
    with Image.open(path) as picture:
        assert picture.size == (400, 320)
        pixels = np.asarray(picture.convert("RGB"), float)
    left, right = pixels[:, :200], pixels[:, 200:]
    for view in (left, right):
        assert view.std() > 20  # an image, not an empty view
    hot = (pixels[..., 0] > 180) & (pixels[..., 2] < 120)  # Ĝ's hot colours and the yellow/red points
    assert hot.sum() > 200
