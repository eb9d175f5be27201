"""`vertebraid phantom` and `vertebraid show`: outputs, clear errors, nothing half-written."""
from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import REALCT
from VertebraIDLib.cli import main
from VertebraIDLib.io.cases import load_case

SMALL = ["--spacing", "3", "--matrix", "64", "--levels", "L1..L3", "--no-cut"]


@pytest.mark.slow
def test_phantom_writes_cases_reproducibly(tmp_path, capsys):
    assert main(["phantom", "--n", "2", "--seed", "4", "-o", str(tmp_path / "a"), *SMALL]) == 0
    out = capsys.readouterr().out
    assert "phantom_000004: L1..L3 (3)" in out and "phantom_000005" in out
    files = sorted(f.name for f in (tmp_path / "a").iterdir())
    assert len(files) == 10 and "phantom_000005_ct.nii.gz" in files
    assert main(["phantom", "--n", "1", "--seed", "5", "-o", str(tmp_path / "b"), "-q", *SMALL]) == 0
    assert capsys.readouterr().out == ""
    again = load_case(tmp_path / "b" / "phantom_000005_ct.nii.gz")
    first = load_case(tmp_path / "a" / "phantom_000005_ct.nii.gz")
    assert np.array_equal(again.image.array, first.image.array)
    assert [v.label for v in again.truth] == ["L1", "L2", "L3"]
    meta = json.loads((tmp_path / "a" / "phantom_000004_phantom.json").read_text())
    assert meta["seed"] == 4 and meta["scan"]["spacing_mm"] == [3.0, 3.0, 3.0]


@pytest.mark.slow
def test_phantom_options_reach_the_generator(tmp_path):
    args = ["phantom", "--seed", "1", "-o", str(tmp_path), "--levels", "T12..L2", "--no-cut", "--spacing", "2,4",
            "--shape", "64x64x40", "--orientation", "PIR", "--pathologies", "fracture", "--fractures", "1",
            "--transitional", "13_ribs", "--body-mask", "--preview", "--noise", "0", "--prefix", "c"]
    assert main(args) == 0
    meta = json.loads((tmp_path / "c000001_phantom.json").read_text())
    assert meta["scan"]["orientation"] == "PIR" and meta["scan"]["shape"] == [64, 40, 64]  # P, I, R
    assert meta["patient"]["transitional"] == "13_ribs" and len(meta["patient"]["fractures"]) == 1
    assert (tmp_path / "c000001_seg-body_msk.nii.gz").is_file() and (tmp_path / "c000001_views.png").is_file()


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--n", "-2"], "--n must be at least 1"),
        (["--levels", "L5..T3"], "runs upwards"),
        (["--levels", "X9"], "Unknown level 'X9'"),
        (["--pathologies", "fracture,werewolf"], "Unknown pathology 'werewolf'"),
        (["--fractures", "-1"], "must not be negative"),
        (["--spacing", "0.01"], "out of range"),
        (["--shape", "64x64"], "NXxNYxNZ"),
        (["--seed", "-1"], "--seed must not be negative"),
        (["--prefix", "../x"], "not usable as a file name"),
    ],
)
def test_phantom_bad_options_exit_2_and_write_nothing(tmp_path, capsys, extra, words):
    out = tmp_path / "out"
    assert main(["phantom", "-o", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and len(err.splitlines()) == 1 and err.startswith("vertebraid phantom: error:")
    assert not out.exists() or not any(out.iterdir())


def test_phantom_refuses_a_file_as_output(tmp_path, capsys):
    target = tmp_path / "file.txt"
    target.write_text("x")
    assert main(["phantom", "-o", str(target), *SMALL]) == 2
    assert "is a file" in capsys.readouterr().err


@pytest.mark.slow
def test_show_draws_a_phantom_with_its_vertebrae(tmp_path, capsys):
    assert main(["phantom", "--seed", "2", "-o", str(tmp_path), "-q", *SMALL]) == 0
    png = tmp_path / "views.png"
    assert main(["show", str(tmp_path / "phantom_000002_ct.nii.gz"), "-o", str(png)]) == 0
    assert "(3 vertebrae)" in capsys.readouterr().out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    points = tmp_path / "phantom_000002.vertebrae.json"
    png2 = tmp_path / "views2.png"
    assert main(["show", str(tmp_path / "phantom_000002_ct.nii.gz"), "--points", str(points), "-o", str(png2)]) == 0
    assert png2.is_file()


def test_show_errors(tmp_path, capsys):
    assert main(["show", str(tmp_path / "nothing.nii.gz"), "-o", str(tmp_path / "x.png")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["show", str(tmp_path), "-o", str(tmp_path / "x.png")]) == 2
    assert main(["phantom", "--seed", "2", "-o", str(tmp_path / "p"), "-q", *SMALL]) == 0
    assert main(["show", str(tmp_path / "p" / "phantom_000002_ct.nii.gz"), "-o", str(tmp_path / "x.bmp")]) == 2
    assert ".png" in capsys.readouterr().err
    assert not (tmp_path / "x.bmp").exists()


@pytest.mark.realdata
@pytest.mark.slow
@pytest.mark.skipif(not (REALCT / "cmbcrc_chest").is_dir(), reason="shared real CT data not present")
def test_show_a_dicom_case(tmp_path, capsys):
    png = tmp_path / "chest.png"
    assert main(["show", str(REALCT / "cmbcrc_chest" / "dicom"), "-o", str(png)]) == 0
    assert "(11 vertebrae)" in capsys.readouterr().out
    assert png.stat().st_size > 10_000
