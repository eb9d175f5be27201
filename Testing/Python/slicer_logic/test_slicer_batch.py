"""`vertebraid slicer-batch`: the module's Logic over a folder of CTs, for real, on slicer-core."""
from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("slicer-core is not installed", allow_module_level=True)

from conftest import MARKUPS_SCHEMA as SCHEMA
from conftest import SHARED_DATA
from VertebraIDLib import cli
from VertebraIDLib.cli import slicer_batch  # noqa: E402
from VertebraIDLib.io.images import write_nifti
from VertebraIDLib.slicer import logic as VID
from VertebraIDLib.slicer import mrml

#: TotalSegmentator v2 vertebra ids present (whole) in ts_lumbar's segmentation.
TS_LEVELS = {32: "T12", 31: "L1", 30: "L2", 29: "L3", 28: "L4", 27: "L5", 26: "S1"}


@pytest.fixture(autouse=True)
def only_this_command(monkeypatch):
    """Build the parser with this command alone, so other sub-commands cannot interfere."""
    monkeypatch.setattr(cli, "COMMAND_MODULES", ["slicer_batch"])


def run_batch(*argv) -> int:
    return cli.main(["slicer-batch", *map(str, argv)])


def validator():
    jsonschema = pytest.importorskip("jsonschema")
    if not SCHEMA.exists():
        pytest.skip("markups schema absent")
    return jsonschema.Draft7Validator(json.loads(SCHEMA.read_text()))


def markups_labels(path: Path) -> list[str]:
    document = json.loads(path.read_text())
    assert not list(validator().iter_errors(document)), path.name
    return [p["label"] for p in document["markups"][0]["controlPoints"]]


def markups_positions_ras(path: Path) -> np.ndarray:
    points = json.loads(path.read_text())["markups"][0]["controlPoints"]
    return np.array([p["position"] for p in points]) * [-1, -1, 1]  # files are LPS


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Two synthetic CTs (NIfTI), a label image to pass over, and a points file per CT."""
    root = tmp_path_factory.mktemp("batch")
    cts, points = root / "cts", root / "points"
    cts.mkdir()
    points.mkdir()
    truths = {}
    for case, seed, levels in (("spineA", 3, ("T3", "L4")), ("spineB", 5, ("T9", "L3"))):
        ct, truth = VID.synthetic_spine_case(seed, levels)
        write_nifti(ct, cts / f"{case}.nii.gz")
        truths[case] = truth
    write_nifti(ct, cts / "spineB_seg.nii.gz", dtype=np.int16)  # a label image, by its name
    # spineA: a Slicer markups file with the true labels; spineB: unlabelled points with regions.
    context = mrml.SceneContext.create()
    mrml.write_markups(mrml.add_vertebrae_points(context.scene, truths["spineA"]), points / "spineA.mrk.json")
    (points / "spineB.json").write_text(json.dumps({
        "coordinate_system": "RAS",
        "points": [{"position": list(map(float, v.position)), "probabilities": {v.label[0]: 1.0}} for v in truths["spineB"]],
    }))
    return cts, points, truths


@pytest.mark.slow
def test_batch_writes_valid_files_and_skips_done_cases(folders, tmp_path, capsys):
    cts, points, truths = folders
    out = tmp_path / "out"
    assert run_batch(cts, "-o", out, "--points-dir", points) == 0
    printed = capsys.readouterr().out
    assert "spineB_seg.nii.gz: passed over" in printed
    assert "2 done, 0 skipped, 0 failed, of 2 case(s)" in printed
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"{case}{suffix}" for case in truths for suffix in (".vertebrae.mrk.json", ".centerline.mrk.json", ".mrb")
    )
    for case, truth in truths.items():
        assert markups_labels(out / f"{case}.vertebrae.mrk.json") == [v.label for v in truth]
        positions = markups_positions_ras(out / f"{case}.vertebrae.mrk.json")
        assert np.max(np.linalg.norm(positions - [v.position for v in truth], axis=1)) < 3.0
        assert markups_labels(out / f"{case}.centerline.mrk.json")  # schema-valid curve with points
        names = zipfile.ZipFile(out / f"{case}.mrb").namelist()
        assert f"{case}/{case}.mrml" in names and any(n.endswith(".nii.gz") or n.endswith(".nrrd") for n in names)
        assert f"{case}: {len(truth)} vertebrae {truth[0].label}-{truth[-1].label}" in printed

    # The bundle reopens with the run folder and its labelled points.
    scene = mrml.SceneContext.create().scene
    mrml.read_scene_bundle(scene, out / "spineA.mrb")
    [folder] = mrml.run_folders(scene)
    assert scene.GetSubjectHierarchyNode().GetItemName(folder) == "VertebraID spineA"
    points_node = mrml.folder_node_by_role(scene, folder, mrml.ROLE_POINTS)
    assert points_node.GetNumberOfControlPoints() == len(truths["spineA"])

    stamp = (out / "spineA.mrb").stat().st_mtime_ns
    assert run_batch(cts, "-o", out, "--points-dir", points) == 0
    assert "0 done, 2 skipped" in capsys.readouterr().out
    assert (out / "spineA.mrb").stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_batch_failures_exit_non_zero_with_one_sentence(folders, tmp_path, capsys):
    cts, points, truths = folders
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "spineA.mrk.json").write_bytes((points / "spineA.mrk.json").read_bytes())
    (partial / "spineB.json").write_text(json.dumps({"points": []}))  # no evidence: nothing to find
    out = tmp_path / "out"
    assert run_batch(cts, "-o", out, "--points-dir", partial) == 1
    captured = capsys.readouterr()
    assert "spineB: error: The points from spineB.json hold no point." in captured.err
    assert captured.err.strip().endswith("1 case(s) failed: spineB.")
    assert (out / "spineA.mrb").is_file() and not (out / "spineB.mrb").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no half-written files

    empty = tmp_path / "no_points"
    empty.mkdir()
    assert run_batch(cts, "-o", tmp_path / "out2", "--points-dir", empty, "--overwrite") == 1
    assert "No points file for case 'spineA'" in capsys.readouterr().err

    # Usage errors: exit 2 and one sentence, before any work.
    assert run_batch(cts, "-o", tmp_path / "o3", "--model", tmp_path / "absent.safetensors") == 2
    assert "does not exist" in capsys.readouterr().err
    assert run_batch(tmp_path / "nowhere", "-o", tmp_path / "o3", "--points-dir", points) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert run_batch(partial, "-o", tmp_path / "o3", "--points-dir", points) == 2
    assert "Found no CT" in capsys.readouterr().err
    assert not (tmp_path / "o3").exists()
    # The script form (Slicer --python-script, python -m) answers the same way.
    assert slicer_batch.main([str(cts), "-o", str(tmp_path / "o3"), "--model", str(tmp_path / "absent.safetensors")]) == 2
    assert capsys.readouterr().err.startswith("vertebraid slicer-batch: error: The model file")


@pytest.mark.realdata
@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_DATA / "realct" / "ts_lumbar" / "ct.nii.gz").exists(), reason="real data absent")
def test_batch_on_a_real_lumbar_ct(tmp_path, capsys):
    """ts_lumbar (3 mm, hip prosthesis): points at the TotalSegmentator vertebrae, region evidence only."""
    import nibabel as nib

    source = SHARED_DATA / "realct" / "ts_lumbar"
    cts = tmp_path / "cts"
    cts.mkdir()
    (cts / "ts_lumbar.nii.gz").symlink_to(source / "ct.nii.gz")
    seg = nib.load(source / "seg_totalseg.nii.gz")
    labels = np.asarray(seg.dataobj)
    points, expected = [], []
    for ts_id, level in TS_LEVELS.items():
        centre = nib.affines.apply_affine(seg.affine, np.argwhere(labels == ts_id).mean(axis=0))
        points.append({"position": list(map(float, centre)), "probabilities": {level[0]: 1.0}})
        expected.append(level)
    points_dir = tmp_path / "points"
    points_dir.mkdir()
    (points_dir / "ts_lumbar.json").write_text(json.dumps({"coordinate_system": "RAS", "points": points}))
    out = tmp_path / "out"
    assert run_batch(cts, "-o", out, "--points-dir", points_dir) == 0
    assert markups_labels(out / "ts_lumbar.vertebrae.mrk.json") == expected
    scene = mrml.SceneContext.create().scene
    mrml.read_scene_bundle(scene, out / "ts_lumbar.mrb")
    ct = mrml.volume_from_node(scene.GetFirstNodeByName("ts_lumbar"))
    assert ct.shape3 == (122, 101, 112)
    np.testing.assert_allclose(ct.affine, nib.load(source / "ct.nii.gz").affine, atol=1e-3)


# --------------------------------------------------------------------------- no options: the bundled model


def identified(predicted: list[tuple[str, np.ndarray]], truth: list[tuple[str, np.ndarray]], radius_mm=20.0) -> int:
    """True vertebrae whose nearest prediction (within radius) carries their label."""
    hits = 0
    for label, position in truth:
        d = [np.linalg.norm(p - position) for _, p in predicted]
        if d and min(d) < radius_mm and predicted[int(np.argmin(d))][0] == label:
            hits += 1
    return hits


@pytest.mark.slow
@pytest.mark.torch
def test_no_options_uses_the_bundled_model_on_a_phantom(tmp_path, capsys):
    """Issue 17, item 7: `slicer-batch IN -o OUT` with no --model and no --points-dir, as `detect` does."""
    pytest.importorskip("torch")
    from VertebraIDLib.synthetic.phantom import generate_phantom

    phantom = generate_phantom(3_000_017, levels="T11..S1", spacing=2.0, matrix=96, cut=False)
    cts = tmp_path / "cts"
    cts.mkdir()
    write_nifti(phantom.ct, cts / "phantom.nii.gz")
    out = tmp_path / "out"
    assert run_batch(cts, "-o", out, "--screenshots") == 0
    printed = capsys.readouterr().out
    assert "1 done, 0 skipped, 0 failed, of 1 case(s)" in printed
    labels = markups_labels(out / "phantom.vertebrae.mrk.json")
    predicted = list(zip(labels, markups_positions_ras(out / "phantom.vertebrae.mrk.json")))
    truth = [(v.label, v.position) for v in phantom.truth]
    assert identified(predicted, truth) >= len(truth) - 1, (labels, [t for t, _ in truth])
    scene = mrml.SceneContext.create().scene
    mrml.read_scene_bundle(scene, out / "phantom.mrb")
    [folder] = mrml.run_folders(scene)
    evidence = json.loads(scene.GetSubjectHierarchyNode().GetItemAttribute(folder, mrml.ATTR_RUN))["evidence"]
    assert "vertebraid.safetensors" in evidence  # the bundled model, as `vertebraid detect` uses
    from PIL import Image

    with Image.open(out / "phantom.png") as picture:  # --screenshots: two slice views side by side
        assert picture.size[0] > picture.size[1] > 300


@pytest.mark.realdata
@pytest.mark.slow
@pytest.mark.torch
@pytest.mark.skipif(not (SHARED_DATA / "realct" / "ts_lumbar" / "ct.nii.gz").exists(), reason="real data absent")
def test_no_options_on_a_real_ct(tmp_path, capsys):
    """The bundled model on ts_lumbar: the vertebrae are found where TotalSegmentator has them; a research
    preview on real CT, so only most labels are expected right (bench: 5 of 7)."""
    pytest.importorskip("torch")
    import nibabel as nib

    source = SHARED_DATA / "realct" / "ts_lumbar"
    cts = tmp_path / "cts"
    cts.mkdir()
    (cts / "ts_lumbar.nii.gz").symlink_to(source / "ct.nii.gz")
    out = tmp_path / "out"
    assert run_batch(cts, "-o", out) == 0
    printed = capsys.readouterr().out
    assert re.search(r"ts_lumbar: \d+ vertebrae \w+-\w+ in [\d.]+ s", printed), printed
    seg = nib.load(source / "seg_totalseg.nii.gz")
    labels = np.asarray(seg.dataobj)
    truth = []
    for ts_id, level in TS_LEVELS.items():
        if level in ("L1", "L2", "L3", "L4", "L5"):  # whole in the scan
            truth.append((level, nib.affines.apply_affine(seg.affine, np.argwhere(labels == ts_id).mean(axis=0))))
    predicted = list(zip(markups_labels(out / "ts_lumbar.vertebrae.mrk.json"),
                         markups_positions_ras(out / "ts_lumbar.vertebrae.mrk.json")))
    found = [min(np.linalg.norm(p - position) for _, p in predicted) for _, position in truth]
    assert max(found) < 25.0, found  # every lumbar vertebra found (centroids of whole vertebrae vs bodies)
    assert identified(predicted, truth, 25.0) >= 3
