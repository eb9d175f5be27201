"""`vertebraid locate` and `vertebraid label-points`: outputs, and one clear sentence for bad input."""
from __future__ import annotations

import json
import subprocess
import sys

import jsonschema
import nibabel as nib
import numpy as np
import pytest
from conftest import EXAMPLES, MARKUPS_SCHEMA
from VertebraIDLib.cli import main
from VertebraIDLib.engine.points import label_points
from VertebraIDLib.engine.settings import EngineSettings
from VertebraIDLib.evaluation.metrics import evaluate_case
from VertebraIDLib.io.formats import (
    read_vertebrae_json,
    read_vid_detections,
    read_vid_ground_truth,
)

EXAMPLE_MAPS = EXAMPLES / "example_heatmaps.nii.gz"
EXAMPLE_TRUTH = EXAMPLES / "example_truth.vertebrae.json"


@pytest.mark.realdata
@pytest.mark.slow
def test_locate_on_the_bundled_example_writes_every_output(tmp_path):
    out = tmp_path / "out.json"
    rc = main(["locate", str(EXAMPLE_MAPS), "-o", str(out), "--markups", str(tmp_path / "v.mrk.json"),
               "--ctd", str(tmp_path / "v_ctd.json"), "--picture", str(tmp_path / "v.png")])
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["coordinate_system"] == "RAS" and data["method"] == "exact"
    assert {"label", "index", "position", "confidence"} <= set(data["vertebrae"][0])
    assert evaluate_case(read_vertebrae_json(out), read_vertebrae_json(EXAMPLE_TRUTH)).all_correct
    markups = json.loads((tmp_path / "v.mrk.json").read_text())
    jsonschema.validate(markups, json.loads(MARKUPS_SCHEMA.read_text()))
    assert (tmp_path / "v.png").stat().st_size > 10_000
    ctd = json.loads((tmp_path / "v_ctd.json").read_text())
    assert "direction" in ctd[0] and len(ctd) > 5


@pytest.mark.parametrize("method", ["paper", "order", "rect", "base"])
def test_locate_methods_and_no_weights(tmp_path, method):
    out = tmp_path / "out.json"
    assert main(["locate", str(EXAMPLE_MAPS), "-o", str(out), "--method", method, "--no-weights"]) == 0
    assert json.loads(out.read_text())["method"] == method


def _run_cli(*args):
    return subprocess.run([sys.executable, "-m", "VertebraIDLib.cli", *args], capture_output=True, text=True)


def _write_bytes(path, data):
    path.write_bytes(data)
    return path


def _write_nifti(path, array):
    nib.save(nib.Nifti1Image(array, np.eye(4)), str(path))
    return path


@pytest.mark.parametrize(
    "make_input, message",
    [
        (lambda d: d / "missing.nii.gz", "no such file"),
        (lambda d: _write_bytes(d / "junk.nii.gz", b"not an image"), "not a readable NIfTI"),
        (lambda d: _write_nifti(d / "three_d.nii.gz", np.zeros((8, 8, 8), np.float32)), "4-D"),
        (lambda d: _write_nifti(d / "five.nii.gz", np.zeros((8, 8, 8, 5), np.float32)), "26 channels"),
        (lambda d: _write_nifti(d / "nan.nii.gz", np.full((8, 8, 8, 26), np.nan, np.float32)), "NaN"),
    ],
)
@pytest.mark.slow
def test_locate_bad_input_is_one_sentence_and_exit_2(tmp_path, make_input, message):
    out = tmp_path / "out.json"
    proc = _run_cli("locate", str(make_input(tmp_path)), "-o", str(out))
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not out.exists() and not list(tmp_path.glob(".out*"))  # nothing half-written


def test_all_zero_maps_give_zero_vertebrae(tmp_path):
    out = tmp_path / "out.json"
    maps = _write_nifti(tmp_path / "zero.nii.gz", np.zeros((10, 10, 12, 26), np.float32))
    assert main(["locate", str(maps), "-o", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["vertebrae"] == [] and data["spine_found"] is False


@pytest.mark.realdata
def test_label_points_cli_keeps_lps_points_and_accounts_for_every_one(tmp_path, shared_data):
    for path in sorted((shared_data / "vid" / "train" / "pred").glob("*.json"))[:3]:
        positions, probabilities = read_vid_detections(path)
        lps = positions * np.array([-1, -1, 1])
        points = {"coordinate_system": "LPS",
                  "points": [{"position": p.tolist(), "probabilities": q} for p, q in zip(lps, probabilities)]}
        src = tmp_path / f"{path.stem}.points.json"
        src.write_text(json.dumps(points))
        out = tmp_path / f"{path.stem}.json"
        assert main(["label-points", str(src), "-o", str(out), "--transitional"]) == 0
        data = json.loads(out.read_text())
        assert data["coordinate_system"] == "LPS"
        for v in data["vertebrae"]:  # a labelled input point keeps its position
            if v.get("source_index") is not None:
                assert np.allclose(v["position"], lps[v["source_index"]], atol=1e-3)
        labelled = {v["source_index"] for v in data["vertebrae"] if v.get("source_index") is not None}
        assert labelled.isdisjoint(data["rejected"]) and labelled | set(data["rejected"]) == set(range(len(lps)))


@pytest.mark.realdata
@pytest.mark.slow
def test_label_points_identifies_real_detections(shared_data):
    identified = total = 0
    for path in sorted((shared_data / "vid" / "train" / "pred").glob("*.json"))[:40]:
        positions, probabilities = read_vid_detections(path)
        labelling = label_points(positions, probabilities, EngineSettings(transitional=True))
        evaluation = evaluate_case(labelling.vertebrae, read_vid_ground_truth(path.parent.parent / "gt" / path.name))
        identified += evaluation.num_identified
        total += evaluation.num_gt
    assert identified / total > 0.88  # measured 93.9 % on the whole split (bench/vid_label_points.py)


@pytest.mark.slow
def test_label_points_rejects_malformed_json(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    proc = _run_cli("label-points", str(bad), "-o", str(tmp_path / "o.json"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"coordinate_system": "RAS", "points": [{"position": [1, 2]}]}))
    proc = _run_cli("label-points", str(wrong), "-o", str(tmp_path / "o.json"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
