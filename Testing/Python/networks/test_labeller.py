"""The level labeller: straightening, targets, training, model files and its evidence in the engine."""
from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from conftest import REPO
from VertebraIDLib.cli import main as cli_main
from VertebraIDLib.engine.anatomy import LEVELS_26
from VertebraIDLib.engine.centerline import centerline_through
from VertebraIDLib.engine.evidence import Evidence
from VertebraIDLib.engine.pipeline import locate, prepare
from VertebraIDLib.engine.settings import EngineSettings
from VertebraIDLib.engine.vertebrae import Vertebra
from VertebraIDLib.errors import VertebraIDError
from VertebraIDLib.evaluation.metrics import evaluate_case
from VertebraIDLib.io.weights import sha256_file
from VertebraIDLib.networks import bundle as net
from VertebraIDLib.networks import heatmap as heatmap_net
from VertebraIDLib.networks import labeller as lab
from VertebraIDLib.synthetic.simulate import simulate_case
from VertebraIDLib.training import labeller as labeller_training

SMALL = lab.LabellerConfig(half_width=6, features=(4, 8), hidden=16, dilations=(1, 2))


def _truth(labels=("T11", "T12", "L1", "L2", "L3"), gap=30.0):
    return [Vertebra(name, np.array([5.0 * np.sin(i / 2), 3.0 * i, -gap * i])) for i, name in enumerate(labels)]


def test_a_truth_centreline_passes_through_the_centres_and_targets_peak_on_them():
    truth = _truth()
    line = centerline_through(truth, 4.0, extend_mm=(20.0, 12.0))
    assert line.step_mm == 4.0
    for v in truth:
        assert np.linalg.norm(line.points - v.position, axis=1).min() < 2.5
    # extended past both ends by about the asked lengths
    assert np.linalg.norm(line.points[0] - truth[0].position) == pytest.approx(20.0, abs=4.0)
    assert np.linalg.norm(line.points[-1] - truth[-1].position) == pytest.approx(12.0, abs=4.0)
    pairs = np.array([(LEVELS_26.index(v.label), line.project(v.position[None])[0]) for v in truth])
    assert np.all(np.diff(pairs[:, 1]) > 5)  # cranial first, ~30 mm apart
    target = labeller_training.target_signals(pairs, len(line), lab.LabellerConfig())
    assert target.shape == (26, len(line))
    for channel, where in pairs:
        k = int(round(where))
        assert target[int(channel), k] > 0.8 and target[int(channel)].argmax() == k
    unused = [c for c in range(26) if c not in pairs[:, 0]]
    assert target[unused].max() == 0.0


@pytest.mark.slow
def test_a_phantom_sample_is_the_straightened_spine_with_its_levels_in_order():
    x, pairs = labeller_training.phantom_sample(3, lab.LabellerConfig(), (-250.0, 1250.0), 4.0)
    assert x.dtype == np.uint8 and x.shape[:2] == (49, 49) and x.shape[2] > 20
    assert np.all(np.diff(pairs[:, 0]) == 1) and np.all(np.diff(pairs[:, 1]) > 0)
    # bone on the centreline (the bodies), much less at the planes' corners
    assert x[24, 24].mean() > x[0, 0].mean() + 20


def test_the_labeller_maps_any_spine_length_to_26_signals():
    network = lab.build_labeller(SMALL).eval()
    with torch.no_grad():
        for length in (1, 3, 40):
            assert network(torch.rand(1, 1, 13, 13, length)).shape == (1, 26, length)
    with pytest.raises(VertebraIDError, match="configuration is invalid"):
        lab.LabellerConfig(hidden=0)
    with pytest.raises(VertebraIDError, match="unknown settings"):
        lab.LabellerConfig.from_dict({"depth": 3})


def test_a_bone_only_labeller_reads_bone_alone_and_its_floor_is_stored():
    config = lab.LabellerConfig(bone_floor=0.3)
    x = np.array([0.0, 0.2, 0.3, 0.65, 1.0], np.float32)  # outside, soft tissue, bone floor, bone, dense bone
    assert np.allclose(lab.bone_view(x, config), [0.0, 0.0, 0.0, 0.5, 1.0])
    assert lab.bone_view(x, lab.LabellerConfig()) is x
    assert lab.LabellerConfig.from_dict(config.to_dict()) == config
    assert lab.LabellerConfig.from_dict({k: v for k, v in config.to_dict().items() if k != "bone_floor"}).bone_floor == 0
    with pytest.raises(VertebraIDError, match="configuration is invalid"):
        lab.LabellerConfig(bone_floor=1.0)


@pytest.mark.slow
def test_training_fits_its_samples(tmp_path):
    """A few hundred steps on two phantoms lower the loss on them (steps, not time, end this run)."""
    files = labeller_training.prepare_samples(tmp_path / "samples", [3, 5], SMALL, (-250.0, 1250.0), 4.0)
    assert [f.name for f in files] == ["3.npz", "5.npz"]
    modified = files[0].stat().st_mtime_ns
    labeller_training.prepare_samples(tmp_path / "samples", [3], SMALL, (-250.0, 1250.0), 4.0)
    assert files[0].stat().st_mtime_ns == modified  # kept, not generated again

    def loss(network):
        total = 0.0
        for f in files:
            with np.load(f) as d:
                x = torch.from_numpy(d["x"].astype(np.float32) / 255)[None, None]
                t = torch.from_numpy(labeller_training.target_signals(d["pairs"], d["x"].shape[2], SMALL))[None]
            with torch.no_grad():
                total += float(torch.nn.functional.binary_cross_entropy_with_logits(network(x), t))
        return total

    torch.manual_seed(0)
    before = loss(lab.build_labeller(SMALL).eval())
    network, record = labeller_training.train_labeller(files, SMALL, minutes=60, seed=0, max_steps=200, log=lambda m: None)
    assert record["steps"] == 200 and record["samples"] == {"samples": 2}
    assert loss(network) < 0.5 * before


def _sample_file(path, length=30, pairs=((10, 5.0), (11, 12.0))):
    rng = np.random.default_rng(len(str(path)))
    x = rng.integers(0, 255, (13, 13, length), dtype=np.uint8)
    np.savez_compressed(path, x=x, pairs=np.array(pairs, np.float32).reshape(-1, 2))
    return path


def test_training_mixes_sources_at_their_shares_and_can_continue_from_a_labeller(tmp_path):
    phantom = _sample_file(tmp_path / "phantom.npz")
    rendered = _sample_file(tmp_path / "rendered.npz", 40)
    empty = _sample_file(tmp_path / "empty.npz", 0, ())
    torch.manual_seed(3)
    start = lab.build_labeller(SMALL).eval()
    groups = {"phantoms": ([phantom], 1.0), "ts": ([rendered], 0.5), "none": ([empty], 0.5)}
    network, record = labeller_training.train_labeller(None, SMALL, 60, max_steps=0, groups=groups,
                                                       start_from=start, log=lambda m: None)
    # a source without usable samples is dropped and the shares renormalised
    assert record["samples"] == {"phantoms": 1, "ts": 1}
    assert record["shares"] == {"phantoms": pytest.approx(2 / 3, abs=1e-3), "ts": pytest.approx(1 / 3, abs=1e-3)}
    assert record["fine_tuned"]
    for a, b in zip(start.parameters(), network.parameters()):  # no step yet: the starting weights
        assert torch.equal(a, b)
    network, record = labeller_training.train_labeller(None, SMALL, 60, max_steps=3, groups=groups,
                                                       start_from=start, log=lambda m: None)
    assert record["steps"] == 3 and any(not torch.equal(a, b) for a, b in zip(start.parameters(), network.parameters()))
    with pytest.raises(VertebraIDError, match="No training samples"):
        labeller_training.train_labeller(None, SMALL, 60, max_steps=1, groups={"none": ([empty], 1.0)})


def _tiny_model(tmp_path):
    config = heatmap_net.NetworkConfig(channels=(4, 8, 16))
    meta = net.make_metadata(config, spacing_mm=4.0, patch_size=32, sigma_mm=6.0, hu_window=(-250, 1250))
    net.save_model(heatmap_net.build_network(config), meta, tmp_path / "m.safetensors")
    return tmp_path / "m.safetensors"


def test_a_model_brings_its_labeller_checksummed_and_never_unpickled(tmp_path):
    model_path = _tiny_model(tmp_path)
    torch.manual_seed(1)
    labeller = lab.build_labeller(SMALL).eval()
    entry = net.save_labeller(labeller, SMALL, tmp_path / "m_labeller.safetensors", {"steps": 1})
    assert entry["weights_sha256"] == sha256_file(tmp_path / "m_labeller.safetensors")
    assert net.load_model(model_path, "cpu").labeller is None  # not attached yet
    net.attach_labeller(model_path, entry)
    model = net.load_model(model_path, "cpu")
    loaded, config = model.labeller
    assert config == SMALL
    x = torch.rand(1, 1, 13, 13, 9)
    with torch.no_grad():  # stored in float16: half the file, the same outputs to ~1e-3
        assert torch.allclose(torch.sigmoid(labeller(x)), torch.sigmoid(loaded(x)), atol=5e-3)
    assert next(loaded.parameters()).dtype == torch.float32

    weights = tmp_path / "m_labeller.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(VertebraIDError, match="does not match its checksum"):
        net.load_model(model_path, "cpu")
    weights.write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    with pytest.raises(VertebraIDError, match="never unpickles"):
        net.load_model(model_path, "cpu")
    weights.unlink()
    with pytest.raises(VertebraIDError, match="labeller 'm_labeller.safetensors' is missing"):
        net.load_model(model_path, "cpu")
    meta = json.loads((tmp_path / "m.json").read_text())
    meta["level_labeller"]["weights_file"] = "../elsewhere.safetensors"
    (tmp_path / "m.json").write_text(json.dumps(meta))
    with pytest.raises(VertebraIDError, match="is missing"):
        net.load_model(model_path, "cpu")


def test_level_evidence_can_rename_the_chain():
    """Positions come from the maps; strong level evidence one level lower renames every vertebra."""
    case = simulate_case(4, spacing_mm=3.0, difficulty="clean", levels=("T10", "L3"))
    options = EngineSettings()
    plain = locate(case.heatmaps, options)
    assert evaluate_case(plain.vertebrae, case.truth).all_correct

    def shifted(line):
        signals = prepare(case.heatmaps, options).rectified.signals
        return 5.0 * np.roll(signals, 1, axis=1)  # each level's evidence moved to the next level

    moved = locate(Evidence(case.heatmaps, level_evidence=shifted), options)
    assert moved.rectified.level_signals is not None
    by_position = {round(float(v.position[2])): v.label for v in plain.vertebrae}
    renamed = {round(float(v.position[2])): v.label for v in moved.vertebrae}
    common = set(by_position) & set(renamed)
    assert len(common) >= 5
    assert all(LEVELS_26.index(renamed[z]) == LEVELS_26.index(by_position[z]) + 1 for z in common)


def test_level_evidence_of_the_wrong_shape_is_one_sentence():
    case = simulate_case(4, spacing_mm=3.0, difficulty="clean", levels=("T10", "L3"))
    with pytest.raises(VertebraIDError, match="one row of 26 per centreline sample"):
        prepare(Evidence(case.heatmaps, level_evidence=lambda line: np.zeros((len(line) + 1, 26))))
    with pytest.raises(VertebraIDError, match="finite"):
        prepare(Evidence(case.heatmaps, level_evidence=lambda line: np.full((len(line), 26), np.nan)))


def test_train_labeller_command_refuses_bad_input(tmp_path, capsys):
    assert cli_main(["train-labeller", "--model", str(tmp_path / "none.safetensors"), "--samples",
                     str(tmp_path / "s")]) != 0
    assert "does not exist" in capsys.readouterr().err
    model_path = _tiny_model(tmp_path)
    assert cli_main(["train-labeller", "--model", str(model_path), "--samples", str(tmp_path / "s"),
                     "--minutes", "0"]) != 0
    assert "must be positive" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()
    (tmp_path / "file").write_text("not a folder")
    assert cli_main(["train-labeller", "--model", str(model_path), "--samples", str(tmp_path / "file"),
                     "--phantoms", "1", "--minutes", "0.01"]) != 0
    assert "is a file; give a folder" in capsys.readouterr().err
    assert cli_main(["train-labeller", "--model", str(model_path), "--samples", str(tmp_path / "s"),
                     "--labelmaps", str(tmp_path / "map.nii.gz"), "--renders", "0"]) != 0
    assert "positive number of renders" in capsys.readouterr().err
    assert cli_main(["train-labeller", "--model", str(model_path), "--samples", str(tmp_path / "s"),
                     "--fine-tune"]) != 0
    assert "has no level labeller to fine-tune" in capsys.readouterr().err
    assert cli_main(["train-labeller", "--model", str(model_path), "--samples", str(tmp_path / "s"),
                     "--bone-floor", "5000"]) != 0
    assert "bone floor must lie inside the model's HU window" in capsys.readouterr().err
    assert cli_main(["train-labeller", "--model", str(model_path), "--samples", str(tmp_path / "s"),
                     "--phantom-share", "0"]) != 0
    assert "share of the training steps" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_the_headless_training_module_trains_the_labeller_through_the_same_recipe(tmp_path):
    import importlib.util

    path = REPO / "VertebraIDTrain" / "VertebraIDTrain.py"
    spec = importlib.util.spec_from_file_location("VertebraIDTrain", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    logic = module.VertebraIDTrainLogic()
    with pytest.raises(VertebraIDError, match="does not exist"):
        logic.train_labeller(tmp_path / "none.safetensors", tmp_path / "samples")
    with pytest.raises(VertebraIDError, match="must be positive"):
        logic.train_labeller(_tiny_model(tmp_path), tmp_path / "samples", phantoms=0)
    assert not (tmp_path / "samples").exists()


@pytest.mark.slow
def test_level_signals_follow_the_centreline_at_any_step():
    """The labeller reads at its own 4 mm; a 2 mm centreline gets the same signals, interpolated
    (away from the end, where the curves' last frames differ slightly)."""
    from VertebraIDLib.networks.preprocess import preprocess
    from VertebraIDLib.synthetic.phantom import generate_phantom

    phantom = generate_phantom(3, spacing=4.0)
    image = preprocess(phantom.ct, 4.0, (-250.0, 1250.0))
    torch.manual_seed(0)
    network = lab.build_labeller(SMALL).eval()
    coarse = centerline_through(phantom.truth, 4.0)
    fine = centerline_through(phantom.truth, 2.0)
    at_4 = lab.level_signals(network, image, coarse, SMALL)
    at_2 = lab.level_signals(network, image, fine, SMALL)
    assert at_4.shape == (len(coarse), 26) and at_2.shape == (len(fine), 26)
    assert np.all((at_4 > 0) & (at_4 < 1))
    n = min(len(coarse), (len(fine) + 1) // 2) - 5  # the last samples' frames differ slightly
    np.testing.assert_allclose(at_2[: 2 * n : 2], at_4[:n], atol=0.05)
