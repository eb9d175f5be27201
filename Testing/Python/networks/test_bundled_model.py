"""The bundled model: installed, documented, loadable, and the default of `vertebraid detect`."""
from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import REALCT, REPO
from VertebraIDLib.cli import main
from VertebraIDLib.engine.settings import EngineSettings
from VertebraIDLib.evaluation.metrics import evaluate_case
from VertebraIDLib.io.cases import load_case
from VertebraIDLib.io.formats import read_vertebrae_json, write_markups_json
from VertebraIDLib.networks import bundle as net
from VertebraIDLib.networks import heatmap as heatmap_net
from VertebraIDLib.synthetic.phantom import generate_phantom, write_phantom

MAX_MODEL_MB = 20.0


@pytest.fixture(scope="module")
def bundled():
    path = net.bundled_model_path()
    assert path is not None, f"no {net.BUNDLED_MODEL_NAME} in {net.MODELS_DIR}"
    return path


def test_bundled_model_is_small_checked_and_documented(bundled):
    assert sum(f.stat().st_size for f in bundled.parent.glob("*.safetensors")) <= MAX_MODEL_MB * 1e6  # both networks
    model = net.load_model(None, "cpu")  # the default: verifies the checksum before reading weights
    assert model.path == bundled
    assert model.metadata["labels"][0] == "C1" and model.metadata["labels"][-1] == "S2"
    settings = EngineSettings().with_metadata(model.metadata)  # the engine table holds valid settings
    assert settings.sigma_mm == model.sigma_mm and settings.evidence_weight > 0
    labeller, config = model.labeller  # its level labeller comes with it, checksum verified
    assert config.step_mm == min(model.spacing_mm)
    card = (net.MODELS_DIR / "README.md").read_text()
    assert "How it was trained" in card and "Measured" in card


def test_engine_settings_of_a_model_reach_the_options(tmp_path):
    config = heatmap_net.NetworkConfig(channels=(4, 8, 16))
    meta = net.make_metadata(config, spacing_mm=8.0, patch_size=32, sigma_mm=10.0, hu_window=(-250, 1250))
    meta["engine"] = {"evidence_weight": 80.0, "evidence_floor": 0.0, "centreline_threshold": 0.2,
                      "confidence_temperature": 8.0, "gap_fraction_min": 0.7}
    net.save_model(heatmap_net.build_network(config), meta, tmp_path / "m.safetensors")
    model = net.load_model(tmp_path / "m.safetensors", "cpu")
    settings = EngineSettings(method="paper").updated(**model.engine_settings)
    assert (settings.centreline_threshold, settings.evidence_weight, settings.evidence_floor,
            settings.confidence_temperature, settings.gap_fraction_min, settings.sigma_mm,
            settings.method) == (0.2, 80.0, 0.0, 8.0, 0.7, 10.0, "paper")
    stored = json.loads((tmp_path / "m.json").read_text())
    stored["engine"]["centreline_threshold"] = 1.5
    (tmp_path / "m.json").write_text(json.dumps(stored))
    with pytest.raises(Exception, match="threshold must be a fraction"):
        EngineSettings().with_metadata(net.load_model(tmp_path / "m.safetensors", "cpu").metadata)


@pytest.mark.slow
def test_detect_uses_the_bundled_model_and_finds_the_spine(bundled, tmp_path, capsys):
    """A held-out phantom (a seed no training, validation or test set uses), lumbar region.

    What the bundled model must do reliably is find the spine: most of the vertebrae it
    places lie on a true vertebral body (within 10 mm). Naming them right is measured by
    bench/network_eval.py, not asserted here.
    """
    phantom = generate_phantom(3_000_001, spacing=3.0, levels="T9..S1", orientation="LPS", transitional="none")
    write_phantom(phantom, tmp_path / "in", "case")
    assert main(["detect", str(tmp_path / "in" / "case_ct.nii.gz"), "-o", str(tmp_path / "out"), "--no-picture"]) == 0
    written = json.loads((tmp_path / "out" / "case.vertebrae.json").read_text())
    assert written["model"] == bundled.name and written["spine_found"] is True
    assert written["level_labeller"] == "vertebraid_labeller.safetensors"
    placed = read_vertebrae_json(tmp_path / "out" / "case.vertebrae.json")
    truth = np.array([v.position for v in phantom.truth])
    on_a_body = [np.min(np.linalg.norm(truth - v.position, axis=1)) <= 10.0 for v in placed]
    assert len(placed) >= 3 and np.mean(on_a_body) >= 0.75


@pytest.mark.realdata
@pytest.mark.slow
def test_detect_with_a_users_correction_relabels_a_real_scan(bundled, tmp_path, capsys):
    """The headless Re-label on ts_lumbar (real, T12..S1): detect, then the user vouches for T12.

    On its own the bundled model names L2..S1 right but puts L1 on T12 (bench/network_eval.py); with
    T12 fixed at its true centre the rest must follow: at least 6 of the 7 vertebrae identified,
    T12 kept exactly where the user put it and marked locked. Bad uses are refused before anything
    is written.
    """
    case = load_case(REALCT / "ts_lumbar")
    ct_path = REALCT / "ts_lumbar" / "ct.nii.gz"
    t12 = next(v for v in case.truth if v.label == "T12")
    write_markups_json(tmp_path / "fix.mrk.json", [t12])

    assert main(["detect", str(ct_path), "-o", str(tmp_path / "auto"), "--no-picture"]) == 0
    assert main(["detect", str(ct_path), "-o", str(tmp_path / "fixed"), "--no-picture",
                 "--fixed", str(tmp_path / "fix.mrk.json")]) == 0
    assert "1 kept as fixed" in capsys.readouterr().out
    result = read_vertebrae_json(tmp_path / "fixed" / "ts_lumbar.vertebrae.json")
    kept = next(v for v in result if v.label == "T12")
    assert np.allclose(kept.position, t12.position, atol=1e-3) and kept.locked
    assert evaluate_case(result, case.truth).num_identified >= 6

    auto_markups = tmp_path / "auto" / "ts_lumbar.mrk.json"
    refused = [
        ["--fixed", str(auto_markups), "-o", str(tmp_path / "auto"), "--overwrite"],  # would overwrite the user's file
        ["--fixed", str(tmp_path / "fix.mrk.json"), "-o", str(tmp_path / "fixed")],  # already done, no --overwrite
        ["--fixed", str(tmp_path / "fix.mrk.json"), "-o", str(tmp_path / "paper"), "--method", "paper"],
        ["--fixed", str(tmp_path / "missing.json"), "-o", str(tmp_path / "missing")],
    ]
    for extra in refused:
        assert main(["detect", str(ct_path), *extra]) == 2
        assert "error:" in capsys.readouterr().err
    assert main(["detect", str(ct_path), str(REALCT / "tptbox_lumbar"), "-o", str(tmp_path / "two"),
                 "--fixed", str(tmp_path / "fix.mrk.json")]) == 2
    assert "one CT" in capsys.readouterr().err
    assert not (tmp_path / "paper").exists() and not (tmp_path / "missing").exists() and not (tmp_path / "two").exists()


@pytest.mark.slow
def test_the_main_job_names_every_vertebra_of_the_shipped_real_ct(tmp_path, capsys):
    """`make run`'s input: the real sample CT shipped with the extension (licence and truth beside it).

    The bundled model must name all of its vertebrae (T12..S1) right, as the README promises a new
    user; the files Slicer's Sample Data module and CMake install must be there.
    """
    folder = net.MODELS_DIR.parent / "SampleData"
    ct, truth_file = folder / "VertebraIDSampleSpineCT.nii.gz", folder / "VertebraIDSampleSpineCT.vertebrae.json"
    assert "Apache License" in (folder / "LICENSE.txt").read_text()
    assert main(["detect", str(ct), "-o", str(tmp_path), "--no-picture"]) == 0
    truth = read_vertebrae_json(truth_file)
    assert [v.label for v in truth] == ["T12", "L1", "L2", "L3", "L4", "L5", "S1"]
    evaluation = evaluate_case(read_vertebrae_json(tmp_path / "VertebraIDSampleSpineCT.vertebrae.json"), truth)
    assert evaluation.num_identified == len(truth)


@pytest.mark.realdata
@pytest.mark.slow
def test_the_bundled_labeller_names_a_real_lumbar_mpr_from_its_bone(tmp_path):
    """taichi series 6 (real, T10..S1, an MPR slab with soft tissue; truth read in bench/realct_labels).

    The bone-only labeller names at least 7 of its 9 vertebrae (8 when it was bundled; the whole-window
    labeller before it: 4, with S1 and S2 names wrong at 0.99 and 0.95), and none of its labels at
    confidence >= 0.9 is wrong.
    """
    truth = read_vertebrae_json(REPO / "bench" / "realct_labels" / "taichi_lumbar_mpr_series6" / "vertebrae_gt.json")
    assert main(["detect", str(REALCT / "taichi_lumbar_mpr" / "series6"), "-o", str(tmp_path), "--no-picture"]) == 0
    (written,) = tmp_path.glob("*.vertebrae.json")
    placed = read_vertebrae_json(written)
    evaluation = evaluate_case(placed, truth)
    assert evaluation.num_identified >= 7
    right = {o.label for o in evaluation.outcomes if o.identified}
    assert all(v.label in right for v in placed if v.confidence is not None and v.confidence >= 0.9)
