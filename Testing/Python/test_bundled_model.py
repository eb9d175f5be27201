"""The bundled model: installed, documented, loadable, and the default of `vertebraid detect`."""
from __future__ import annotations

import json

import numpy as np
import pytest

from VertebraIDLib import network as net
from VertebraIDLib.cli import main
from VertebraIDLib.formats import read_vertebrae_json
from VertebraIDLib.phantom import generate_phantom, write_phantom
from VertebraIDLib.pipeline import LocateOptions

MAX_MODEL_MB = 20.0


@pytest.fixture(scope="module")
def bundled():
    path = net.bundled_model_path()
    assert path is not None, f"no {net.BUNDLED_MODEL_NAME} in {net.MODELS_DIR}"
    return path


def test_bundled_model_is_small_checked_and_documented(bundled):
    assert bundled.stat().st_size <= MAX_MODEL_MB * 1e6
    model = net.load_model(None, "cpu")  # the default: verifies the checksum before reading weights
    assert model.path == bundled
    assert model.metadata["labels"][0] == "C1" and model.metadata["labels"][-1] == "S2"
    settings = model.locate_settings
    assert settings["sigma_mm"] == model.sigma_mm
    options = LocateOptions(**settings)  # the metadata's engine table holds valid settings
    assert options.evidence_weight is None or options.evidence_weight > 0
    card = (net.MODELS_DIR / "README.md").read_text()
    assert "How it was trained" in card and "Measured" in card


def test_engine_settings_of_a_model_reach_the_options(tmp_path):
    config = net.NetworkConfig(channels=(4, 8, 16))
    meta = net.make_metadata(config, spacing_mm=8.0, patch_size=32, sigma_mm=10.0, hu_window=(-250, 1250))
    meta["engine"] = {"evidence_weight": 80.0, "evidence_floor": 0.0, "centreline_threshold": 0.2,
                      "confidence_temperature": 8.0, "gap_fraction_min": 0.7}
    net.save_model(net.build_network(config), meta, tmp_path / "m.safetensors")
    model = net.load_model(tmp_path / "m.safetensors", "cpu")
    options = LocateOptions(**model.locate_settings)
    params = options.energy_params()
    assert (options.threshold, params.evidence_weight, params.floor, params.temperature, params.gap_fraction_min,
            options.sigma_mm) == (0.2, 80.0, 0.0, 8.0, 0.7, 10.0)
    stored = json.loads((tmp_path / "m.json").read_text())
    stored["engine"]["centreline_threshold"] = 1.5
    (tmp_path / "m.json").write_text(json.dumps(stored))
    with pytest.raises(Exception, match="threshold must be a fraction"):
        LocateOptions(**net.load_model(tmp_path / "m.safetensors", "cpu").locate_settings)


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
    placed = read_vertebrae_json(tmp_path / "out" / "case.vertebrae.json")
    truth = np.array([v.position for v in phantom.truth])
    on_a_body = [np.min(np.linalg.norm(truth - v.position, axis=1)) <= 10.0 for v in placed]
    assert len(placed) >= 3 and np.mean(on_a_body) >= 0.75
