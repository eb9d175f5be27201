"""`vertebraid evaluate` on temporary files: single files, folders, VerSe with a reference, bad input."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED_DATA
from VertebraIDLib import cli
from VertebraIDLib.engine.vertebrae import Vertebra
from VertebraIDLib.io import formats
from VertebraIDLib.io.cases import annotation_case_name as case_name

VERSE_DIR = SHARED_DATA / "realct" / "verse004_labels"


@pytest.fixture
def run_cli(monkeypatch, capsys):
    # Only this sub-command is needed; the others may not be importable in this test's scope.
    monkeypatch.setattr(cli, "COMMAND_MODULES", ["evaluate"])

    def run(*args):
        code = cli.main(["evaluate", *map(str, args)])
        out, err = capsys.readouterr()
        return code, out, err

    return run


def spine(labels, gap=25.0, start=0.0):
    return [Vertebra(label, [0.0, 0.0, start - k * gap]) for k, label in enumerate(labels)]


def moved(vertebrae, offset):
    return [Vertebra(v.label, v.position + np.asarray(offset, float)) for v in vertebrae]


def test_case_names():
    assert case_name(Path("sub-verse004_seg-subreg_ctd.json")) == "sub-verse004"
    assert case_name(Path("case1.vertebrae.json")) == "case1"
    assert case_name(Path("case1.mrk.json")) == "case1"
    assert case_name(Path("case1_ctd.json")) == "case1"
    assert case_name(Path("case1.csv")) == "case1"
    assert case_name(Path("00Y57c9D9aoO.json")) == "00Y57c9D9aoO"


def test_single_files_table_and_json(tmp_path, run_cli):
    gt = spine(["T12", "L1", "L2", "L3"])
    pred = moved(gt, [0, 3, 0])
    pred[3] = Vertebra("L3", gt[3].position + [0, 30, 0])  # too far
    formats.write_vertebrae_json(tmp_path / "p.vertebrae.json", pred)
    formats.write_markups_json(tmp_path / "g.mrk.json", gt)

    code, out, err = run_cli("--pred", tmp_path / "p.vertebrae.json", "--gt", tmp_path / "g.mrk.json")
    assert code == 0 and err == ""
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.strip()}
    assert rows["L"][1:4] == ["3", "2", "66.7"]
    assert rows["all"][1:4] == ["4", "3", "75.0"]
    assert rows["all"][5] == "3.00"  # mean error over identified vertebrae

    code, out, err = run_cli("--pred", tmp_path / "p.vertebrae.json", "--gt", tmp_path / "g.mrk.json",
                             "--json", "--max-dist", "35", "--metric", "verse")
    result = json.loads(out)
    # 30 mm is within 35 and the L3 prediction's nearest GT is L3 (spineweb would still refuse it:
    # GT L3's nearest prediction is L2's).
    assert code == 0 and result["max_dist_mm"] == 35.0 and result["metric"] == "verse"
    assert result["regions"]["all"]["identified"] == 4 and result["all_correct"]["scans"] == 1
    assert result["cases"][0]["name"] == "g"


def test_folders_pair_by_case_name(tmp_path, run_cli):
    pred_dir, gt_dir = tmp_path / "pred", tmp_path / "gt"
    gt_a, gt_b, gt_c = spine(["C5", "C6", "C7"], gap=16.0), spine(["L4", "L5", "S1"]), spine(["T5", "T6"])
    formats.write_vertebrae_csv(gt_dir / "a.csv", gt_a)
    formats.write_vertebrae_json(gt_dir / "b.json", gt_b, coordinate_system="LPS")
    formats.write_markups_json(gt_dir / "c.mrk.json", gt_c)
    formats.write_vertebrae_json(pred_dir / "a.vertebrae.json", moved(gt_a, [1, 0, 0]))
    shifted_b = [Vertebra(lbl, v.position) for lbl, v in zip(["L5", "S1", "S2"], gt_b)]
    formats.write_vertebrae_json(pred_dir / "b.vertebrae.json", shifted_b)
    formats.write_vertebrae_json(pred_dir / "z.vertebrae.json", gt_c)  # no ground truth: ignored
    (pred_dir / "readme.txt").write_text("not a case")

    code, out, err = run_cli("--pred", pred_dir, "--gt", gt_dir, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert [c["name"] for c in result["cases"]] == ["a", "b", "c"]
    assert result["cases_without_prediction"] == ["c"]
    assert result["predictions_without_ground_truth"] == ["z"]
    assert result["regions"]["C"]["identified"] == 3 and result["regions"]["S"] == {
        "n": 1, "identified": 0, "id_rate": 0.0, "error_mean_mm": None, "error_std_mm": None}
    assert result["regions"]["all"]["n"] == 8 and result["regions"]["all"]["identified"] == 3
    assert result["all_correct"]["scans"] == 1 and result["extra_predictions"] == 1

    code, out, err = run_cli("--pred", pred_dir, "--gt", gt_dir, "--per-case", "--metric", "verse")
    assert code == 0
    assert "Identification (verse, 20 mm)" in out
    assert any(line.startswith("b ") and "extra S2" in line for line in out.splitlines())
    assert "note: 1 ground-truth case(s) without prediction" in out


def test_verse_ground_truth_needs_a_reference(tmp_path, run_cli):
    ctd = VERSE_DIR / "sub-verse004_seg-subreg_ctd.json"
    mask = VERSE_DIR / "sub-verse004_seg-vert_msk.nii.gz"
    if not ctd.exists():
        pytest.skip("shared data absent")
    from VertebraIDLib.io.images import read_nifti

    truth = formats.read_verse_ctd(ctd, read_nifti(mask))
    pred = moved(truth, [2.0, 0.0, 0.0])
    pred = [v for v in pred if v.label != "L5"]
    formats.write_vertebrae_json(tmp_path / "pred" / "sub-verse004.vertebrae.json", pred)
    (tmp_path / "gt").mkdir()
    shutil.copy(ctd, tmp_path / "gt" / ctd.name)
    (tmp_path / "images").mkdir()
    shutil.copy(mask, tmp_path / "images" / "sub-verse004_ct.nii.gz")

    code, out, err = run_cli("--pred", tmp_path / "pred", "--gt", tmp_path / "gt", "--reference-dir",
                             tmp_path / "images", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["regions"]["all"]["n"] == 9 and result["regions"]["all"]["identified"] == 8
    assert result["regions"]["all"]["error_mean_mm"] == pytest.approx(2.0, abs=0.01)

    code, out, err = run_cli("--pred", tmp_path / "pred", "--gt", tmp_path / "gt")
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and "--reference" in err

    # Single files take the image itself.
    code, out, err = run_cli("--pred", tmp_path / "pred" / "sub-verse004.vertebrae.json", "--gt", ctd,
                             "--reference", mask, "--json")
    assert code == 0 and json.loads(out)["regions"]["all"]["identified"] == 8


def test_bad_input_exits_2_with_one_line(tmp_path, run_cli):
    good = tmp_path / "good.vertebrae.json"
    formats.write_vertebrae_json(good, spine(["L1", "L2"]))
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({"vertebrae": [{"label": "Q1", "position": [0, 0, 0]}]}))
    (tmp_path / "empty").mkdir()
    (tmp_path / "other").mkdir()
    formats.write_vertebrae_json(tmp_path / "other" / "x.vertebrae.json", spine(["L1"]))
    formats.write_vertebrae_json(tmp_path / "gtdir" / "y.json", spine(["L1"]))

    cases = [
        (["--pred", tmp_path / "absent.json", "--gt", good], "does not exist"),
        (["--pred", good, "--gt", broken], "not valid JSON"),
        (["--pred", unknown, "--gt", good], "Q1"),
        (["--pred", good, "--gt", tmp_path / "other"], "both be files or both be folders"),
        (["--pred", tmp_path / "other", "--gt", tmp_path / "empty"], "no .json or .csv"),
        (["--pred", tmp_path / "other", "--gt", tmp_path / "gtdir"], "pairs"),
        (["--pred", good, "--gt", good, "--max-dist", "-5"], "distance"),
        (["--pred", good, "--gt", good, "--reference", tmp_path / "nope.nii.gz"], "does not exist"),
    ]
    for args, fragment in cases:
        code, out, err = run_cli(*args)
        assert code == 2, (args, err)
        assert out == ""
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("vertebraid evaluate: error:"), err
        assert fragment in lines[0], (fragment, lines[0])
