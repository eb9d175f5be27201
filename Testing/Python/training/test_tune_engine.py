"""tune-engine: the grid picks settings from validation cases of two kinds and stores them in the model."""
from __future__ import annotations

import json

import pytest
from VertebraIDLib.cli import main as cli_main
from VertebraIDLib.engine.evidence import Evidence
from VertebraIDLib.engine.settings import EngineSettings
from VertebraIDLib.networks import bundle as net
from VertebraIDLib.networks import heatmap as heatmap_net
from VertebraIDLib.synthetic.simulate import simulate_case
from VertebraIDLib.training import tune_engine as tuning


def _tiny_model(tmp_path):
    config = heatmap_net.NetworkConfig(channels=(4, 8, 16))
    meta = net.make_metadata(config, spacing_mm=3.0, patch_size=32, sigma_mm=6.0, hu_window=(-250, 1250))
    net.save_model(heatmap_net.build_network(config), meta, tmp_path / "m.safetensors")
    return tmp_path / "m.safetensors"


@pytest.mark.slow
def test_tuning_scores_both_kinds_of_case_and_stores_what_it_chose(tmp_path, monkeypatch):
    """Simulated maps stand in for the network's (the grid, not the network, is under test here)."""
    def cases(model, phantoms, seed, labelmaps, renders, log):
        out = []
        for i, kind in enumerate(("phantoms", "phantoms", "real anatomy", "real anatomy")):
            case = simulate_case(seed + i, spacing_mm=3.0, difficulty="typical", levels=("T8", "S1"))
            out.append((kind, case.truth, Evidence(case.heatmaps)))
        return out

    monkeypatch.setattr(tuning, "validation_cases", cases)
    model = _tiny_model(tmp_path)
    report = tuning.tune_engine(model, phantoms=2, seed=7, write=True, log=lambda m: None,
                                labelmaps=["unused"], renders=2)
    assert "2 phantoms, 2 real anatomy" in report and "| spacing prior | anatomy weight |" in report
    engine = json.loads((tmp_path / "m.json").read_text())["engine"]
    assert engine["spacing_prior"] in ("paper", "lognormal") and engine["anatomy_weight"] in tuning.ANATOMY_WEIGHTS
    assert set(engine["validation_id_rate"]) == {"phantoms", "real anatomy"}
    assert min(engine["validation_id_rate"].values()) > 0.8  # typical simulated maps are easy
    settings = EngineSettings().with_metadata(net.load_model(model, "cpu").metadata)  # read back as detect does
    assert settings.confidence_temperature == engine["confidence_temperature"] and settings.spacing_prior == engine["spacing_prior"]


def test_tune_engine_command_refuses_bad_counts(tmp_path, capsys):
    model = _tiny_model(tmp_path)
    assert cli_main(["tune-engine", "--model", str(model), "--phantoms", "0"]) != 0
    assert "--phantoms must be at least 1" in capsys.readouterr().err
    assert cli_main(["tune-engine", "--model", str(model), "--labelmaps", "x.nii.gz", "--renders", "0"]) != 0
    assert "--renders must be at least 1" in capsys.readouterr().err
    assert "engine" not in json.loads((tmp_path / "m.json").read_text())
