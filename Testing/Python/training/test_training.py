"""Training: configuration, patches and targets, the loop, checkpoints/resume, DDP with gloo."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO
from VertebraIDLib.engine.anatomy import CHANNEL_OF
from VertebraIDLib.engine.vertebrae import Vertebra
from VertebraIDLib.engine.volume import Volume
from VertebraIDLib.errors import VertebraIDError
from VertebraIDLib.networks import bundle as net
from VertebraIDLib.networks import heatmap as heatmap_net
from VertebraIDLib.training import heatmap as heatmap_training
from VertebraIDLib.training.checkpoints import latest_checkpoint
from VertebraIDLib.training.config import TrainConfig, config_from_dict, load_config
from VertebraIDLib.training.data import (
    TrainingCase,
    _intensity_transforms,
    centre_vertebra,
    sample_patch,
    weighted_l2,
)
from VertebraIDLib.training.heatmap import train
from VertebraIDLib.training.validate import (
    level_peak_errors,
    strongest_channel_rates,
    strongest_levels,
    validate,
    validation_cases,
)

PHANTOM = {"spacing": 4.0, "levels": "T12..L3", "matrix": 64}


def tiny_config(out, epochs=2, **data) -> TrainConfig:
    return config_from_dict({
        "output_dir": str(out), "threads": 1,
        "model": {"channels": [4, 8, 16], "spacing_mm": 8.0, "patch_size": 32, "sigma_mm": 10.0},
        "data": {"phantoms_per_epoch": 2, "patches_per_case": 1, "phantom_options": PHANTOM, **data},
        "train": {"epochs": epochs, "batch_size": 1, "warmup_steps": 1},
        "validation": {"phantoms": 1, "phantom_options": PHANTOM},
    })


def test_example_config_and_errors(tmp_path):
    config = load_config(REPO / "VertebraIDTrain" / "configs" / "phantoms_cpu.toml")
    assert config.model.patch_size % config.network_config.downsampling == 0
    assert Path(config.output_dir).is_absolute()
    bad = {
        "Unknown setting 'lr'": {"train": {"lr": 1}},
        "multiple of 4": {"model": {"channels": [4, 8, 16], "patch_size": 30}},
        "reorder the spine": {"augment": {"rotate_deg": [10, 10, 90]}},
        "overlaps": {"validation": {"seed": 3}},
        "whole number": {"train": {"epochs": 1.5}},
        "does not exist": {"data": {"folders": [str(tmp_path / "missing")], "folder_cases_per_epoch": 1}},
    }
    for message, data in bad.items():
        with pytest.raises(VertebraIDError, match=message):
            config_from_dict(data)
    (tmp_path / "c.toml").write_text("[model\n")
    with pytest.raises(VertebraIDError, match="Cannot read the configuration"):
        load_config(tmp_path / "c.toml")
    (tmp_path / "c.json").write_text(json.dumps({"train": {"epochs": 3}}))
    assert load_config(tmp_path / "c.json").train.epochs == 3


def _ball_case():
    """A synthetic windowed image with bright balls exactly at three 'vertebrae'."""
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = [-60, -60, -100]
    image = Volume(np.zeros((60, 60, 100), np.float32), affine)
    labels = ["L1", "L2", "L3"]
    positions = np.array([[5.0, -10.0, 40.0], [3.0, -8.0, 5.0], [1.0, -6.0, -30.0]])
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in image.shape3], indexing="ij"), -1)
    world = ijk @ affine[:3, :3].T + affine[:3, 3]
    for p in positions:
        image.array[np.linalg.norm(world - p, axis=-1) < 6] = 1.0
    truth = [Vertebra(lab, p) for lab, p in zip(labels, positions)]
    case = TrainingCase(image, positions, np.array([CHANNEL_OF[lab] for lab in labels]), "balls")
    return case, truth


def test_patches_and_targets_agree_under_augmentation(tmp_path):
    config = tiny_config(tmp_path)
    config.model.patch_size, config.model.spacing_mm, config.model.sigma_mm = 32, 3.0, 4.0
    config.data.spine_fraction = 1.0
    config.augment.flip_lr = 0.5
    case, _ = _ball_case()
    flips = 0
    for seed in range(12):
        rng = np.random.default_rng(seed)
        image, target, affine = sample_patch(case, config, rng, intensity=None)
        assert image.shape == (1, 32, 32, 32) and target.shape == (26, 32, 32, 32)
        flips += np.linalg.det(affine[:3, :3]) < 0
        assert target.max() > 0.5  # spine-biased: every patch holds a vertebra
        for channel, p in zip(case.channels, case.positions):
            if target[channel].max() < 0.99:
                continue  # this vertebra is not inside the patch
            peak = np.array(np.unravel_index(np.argmax(target[channel]), target.shape[1:]))
            peak_world = affine[:3, :3] @ peak + affine[:3, 3]
            assert np.linalg.norm(peak_world - p) < 3.0  # the target sits on the true centre
            assert image[0][tuple(peak)] > 0.5  # and on the ball in the image
        others = [c for c in range(26) if c not in case.channels]
        assert target[others].max() == 0.0
    assert 0 < flips < 12  # mirrored and plain patches both occur


def test_intensity_augmentation_keeps_shape_and_is_seeded(tmp_path):
    config = tiny_config(tmp_path)
    case, _ = _ball_case()
    a = sample_patch(case, config, np.random.default_rng(5), _intensity_transforms(config))[0]
    b = sample_patch(case, config, np.random.default_rng(5), _intensity_transforms(config))[0]
    assert a.shape == (1, 32, 32, 32) and np.array_equal(a, b)


@pytest.mark.slow
def test_loss_decreases_on_a_fixed_patch(tmp_path):
    config = tiny_config(tmp_path)
    config.model.patch_size, config.model.spacing_mm = 16, 6.0
    case, _ = _ball_case()
    image, target, _ = sample_patch(case, config, np.random.default_rng(0), augment=False)
    torch.manual_seed(0)
    model = heatmap_net.build_network(config.network_config)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    x, y = torch.from_numpy(image)[None], torch.from_numpy(target)[None]
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.slow
def test_train_writes_model_checkpoints_logs_and_resumes(tmp_path):
    config = tiny_config(tmp_path / "run", epochs=2)
    result = train(config, show_progress=False, log=lambda m: None)
    assert result.resumed_from is None and len(result.history) == 2
    model = net.load_model(result.model_path, "cpu")
    val = model.metadata["metrics"]["validation"]
    assert 0.0 <= val["id_rate"] <= 1.0 and val["num_scans"] == 1
    assert model.metadata["training"]["phantoms_seen"] == 4
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == [
        "epoch-0001.json", "epoch-0001.safetensors", "epoch-0002.json", "epoch-0002.safetensors"]
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    with pytest.raises(VertebraIDError, match="already holds checkpoints"):
        train(config, show_progress=False, log=lambda m: None)
    config.train.epochs = 3
    again = train(config, resume=True, show_progress=False, log=lambda m: None)
    assert again.resumed_from == 2 and [h["epoch"] for h in again.history] == [1, 2, 3]
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("*.json")) == [
        "epoch-0002.json", "epoch-0003.json"]  # checkpoints_kept = 2


_KILL_SCRIPT = """
import sys, json
from VertebraIDLib.training.config import config_from_dict
from VertebraIDLib.training.heatmap import train
config = config_from_dict(json.loads(sys.argv[1]))
train(config, resume=len(sys.argv) > 2, show_progress=False)
"""


@pytest.mark.slow
def test_resume_after_sigkill_loses_at_most_one_epoch(tmp_path):
    config = tiny_config(tmp_path / "run", epochs=4)
    config.validation.phantoms = 0
    data = config.to_dict()
    proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, json.dumps(data)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    first = tmp_path / "run" / "checkpoints" / "epoch-0001.json"
    deadline = time.time() + 120
    while not first.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    found = latest_checkpoint(config)
    assert found is not None
    done = int(found[0]["epoch"])
    assert 1 <= done < 4
    result = train(config, resume=True, show_progress=False, log=lambda m: None)
    assert result.resumed_from == done
    assert [h["epoch"] for h in result.history] == [1, 2, 3, 4]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, config_dict, out):
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank)})
    torch.set_num_threads(1)
    config = config_from_dict(config_dict)
    captured = {}
    original = heatmap_training.build_network

    def keep(cfg):
        captured["net"] = original(cfg)
        return captured["net"]

    heatmap_training.build_network = keep  # see the network each rank trained
    train(config, show_progress=False, log=lambda m: None)
    flat = torch.cat([p.detach().flatten() for p in captured["net"].parameters()])
    np.save(Path(out) / f"rank{rank}.npy", flat.numpy())


@pytest.mark.slow
def test_distributed_two_processes_gloo(tmp_path):
    config = tiny_config(tmp_path / "run", epochs=1)
    config.validation.phantoms = 0
    torch.multiprocessing.spawn(_ddp_worker, args=(2, _free_port(), config.to_dict(), str(tmp_path)), nprocs=2,
                                join=True)
    a, b = np.load(tmp_path / "rank0.npy"), np.load(tmp_path / "rank1.npy")
    assert np.array_equal(a, b)  # gradients were averaged: both ranks hold the same weights
    torch.manual_seed(0)
    initial = torch.cat([p.detach().flatten() for p in heatmap_net.build_network(config.network_config).parameters()])
    assert not np.allclose(a, initial.numpy())  # and they trained
    assert (tmp_path / "run" / "checkpoints" / "epoch-0001.json").exists()


def test_weighted_l2_counts_the_blobs_more_than_the_background():
    import torch
    from VertebraIDLib.training.data import weighted_l2

    target = torch.zeros(1, 1, 4, 4, 4)
    target[0, 0, 1, 1, 1] = 1.0
    zeros = torch.zeros_like(target)
    assert float(weighted_l2(zeros, target)) == pytest.approx(1 / 64)  # the paper's plain L2
    assert float(weighted_l2(zeros, target, 50.0)) == pytest.approx(51 / 64)
    # a wrong background voxel costs the same with or without the weight
    off = zeros.clone()
    off[0, 0, 3, 3, 3] = 1.0
    assert float(weighted_l2(off, torch.zeros_like(target), 50.0)) == pytest.approx(1 / 64)


def test_region_loss_weights_scale_their_channels_errors():
    from VertebraIDLib.training.data import channel_loss_weights, weighted_l2

    assert channel_loss_weights({}) is None and channel_loss_weights({"C": 1.0}) is None
    weights = channel_loss_weights({"C": 2.0, "S": 3.0})
    assert weights[CHANNEL_OF["C4"]] == 2.0 and weights[CHANNEL_OF["T4"]] == 1.0
    assert weights[CHANNEL_OF["S2"]] == 3.0 and weights[CHANNEL_OF["L5"]] == 1.0
    target = torch.zeros(1, 26, 2, 2, 2)
    miss = torch.zeros_like(target)
    miss[0, CHANNEL_OF["C4"], 0, 0, 0] = 1.0  # one wrong voxel in a cervical channel
    plain = float(weighted_l2(miss, target))
    assert float(weighted_l2(miss, target, channel_weights=torch.from_numpy(weights))) == pytest.approx(2 * plain)
    for bad in ({"X": 2.0}, {"C": 0.0}, {"C": True}):
        with pytest.raises(VertebraIDError, match="region_loss_weights"):
            config_from_dict({"train": {"region_loss_weights": bad}})


def test_heatmap_height_scales_targets_and_the_foreground_weight(tmp_path):
    config = tiny_config(tmp_path)
    config.model.patch_size, config.model.spacing_mm, config.model.sigma_mm = 32, 3.0, 4.0
    case, _ = _ball_case()
    unit = sample_patch(case, config, np.random.default_rng(3), augment=False)[1]
    config.model.heatmap_height = 100.0
    tall = sample_patch(case, config, np.random.default_rng(3), augment=False)[1]
    assert tall.max() > 50 and np.allclose(tall, 100.0 * unit, atol=1e-3)
    zeros = torch.zeros((1, *unit.shape))
    plain = float(weighted_l2(zeros, torch.from_numpy(unit)[None], 50.0))
    scaled = float(weighted_l2(zeros, torch.from_numpy(tall)[None], 50.0, 100.0))
    assert scaled == pytest.approx(1e4 * plain, rel=1e-3)  # the weight follows the blob's shape, not its height


def test_inference_divides_outputs_by_the_heatmap_height(tmp_path):
    from VertebraIDLib.networks.predict import predict_heatmaps

    config = tiny_config(tmp_path)
    torch.manual_seed(0)
    network = heatmap_net.build_network(config.network_config)
    array = np.full((24, 24, 24), -1000.0, np.float32)  # air around a block of bone
    array[6:18, 6:18, 4:20] = 300.0
    ct = Volume(array, np.diag([8.0, 8.0, 8.0, 1.0]))
    maps = {}
    for height in (1.0, 10.0):
        meta = net.make_metadata(config.network_config, spacing_mm=8.0, patch_size=32, sigma_mm=10.0,
                                 hu_window=(-250, 1250), heatmap_height=height)
        maps[height] = predict_heatmaps(ct, net.Model(network.eval(), meta, torch.device("cpu")), "cpu").array
    positive = maps[1.0] > 1e-3
    assert positive.any() and np.allclose(maps[10.0][positive], maps[1.0][positive] / 10.0, rtol=1e-3)


@pytest.mark.slow
def test_max_minutes_stops_with_a_saved_validated_model(tmp_path):
    config = tiny_config(tmp_path / "run", epochs=50, balance_regions=True)
    config.train.max_minutes = 1e-4  # passes within the first epoch
    config.train.region_loss_weights = {"C": 2.0, "S": 2.0}
    messages = []
    result = train(config, show_progress=False, log=messages.append)
    assert result.epochs_done == 1 and len(result.history) == 1
    meta = net.load_model(result.model_path, "cpu").metadata
    validation = meta["metrics"]["validation"]
    assert "id_rate" in validation and "level_peak_within_10mm" in validation
    assert 0.0 <= validation["channel_level_right"] <= 1.0 and validation["channel_region_right_C"] is None
    assert any("strongest channel on a vertebra" in m for m in messages)
    assert meta["training"]["balance_regions"] is True
    assert meta["training"]["train"]["region_loss_weights"] == {"C": 2.0, "S": 2.0}
    assert meta["training"]["patches_seen"] == 2 and meta["training"]["phantoms_seen"] == 2


@pytest.mark.slow
def test_init_from_starts_from_a_model_and_refuses_a_different_one(tmp_path):
    first = train(tiny_config(tmp_path / "a", epochs=1), show_progress=False, log=lambda m: None)
    config = tiny_config(tmp_path / "b", epochs=1)
    config.train.init_from = str(first.model_path)
    config.train.learning_rate = 1e-12  # next to no update: the weights must be the first model's
    second = train(config, show_progress=False, log=lambda m: None)
    a = net.weights_state(net.load_model(first.model_path, "cpu").network)
    b = net.weights_state(net.load_model(second.model_path, "cpu").network)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert net.load_model(second.model_path, "cpu").metadata["training"]["init_from"] == str(first.model_path)
    other = tiny_config(tmp_path / "c", epochs=1)
    other.model.sigma_mm = 12.0
    other.train.init_from = str(first.model_path)
    with pytest.raises(VertebraIDError, match="differs in sigma_mm"):
        train(other, show_progress=False, log=lambda m: None)
    with pytest.raises(VertebraIDError, match="does not exist"):
        config_from_dict({"train": {"init_from": str(tmp_path / "none.safetensors")}})


def test_level_peak_errors_measure_each_levels_own_map():
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    maps = Volume(np.zeros((20, 20, 20, 26), np.float32), affine)
    maps.array[5, 5, 5, CHANNEL_OF["L1"]] = 1.0
    maps.array[15, 15, 15, CHANNEL_OF["L2"]] = 1.0
    truth = [Vertebra("L1", np.array([10.0, 10.0, 10.0])), Vertebra("L2", np.array([10.0, 10.0, 10.0])),
             Vertebra("T13", np.array([0.0, 0.0, 0.0]))]
    errors = level_peak_errors(maps, truth)
    assert errors == pytest.approx([0.0, np.sqrt(3) * 20.0])  # T13 has no channel


def test_strongest_levels_name_the_channel_that_fires_on_each_vertebra():
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    maps = Volume(np.zeros((20, 20, 20, 26), np.float32), affine)
    maps.array[5, 5, 5, CHANNEL_OF["T11"]] = 0.9  # an L1 that the T11 channel claims
    maps.array[5, 5, 6, CHANNEL_OF["L1"]] = 0.4
    maps.array[15, 15, 15, CHANNEL_OF["L2"]] = 1.0  # L2 answered by its own channel
    maps.array[15, 15, 19, CHANNEL_OF["C3"]] = 5.0  # 8 mm away: outside the 6 mm sphere
    truth = [Vertebra("L1", np.array([10.0, 10.0, 10.0])), Vertebra("L2", np.array([30.0, 30.0, 30.0])),
             Vertebra("T13", np.array([10.0, 10.0, 10.0])), Vertebra("S1", np.array([500.0, 0.0, 0.0]))]
    pairs = strongest_levels(maps, truth)
    assert pairs == [("L1", "T11"), ("L2", "L2")]  # T13 has no channel; S1 lies outside the maps
    rates = strongest_channel_rates(pairs)
    assert rates["channel_level_right"] == 0.5 and rates["channel_region_right_L"] == 0.5
    assert rates["channel_region_right_C"] is None and strongest_channel_rates([])["channel_level_right"] is None


def test_balanced_regions_centre_patches_evenly_over_the_regions_in_view():
    channels = np.array([CHANNEL_OF[name] for name in
                         ["T4", "T5", "T6", "T7", "T8", "T9", "T10", "T11", "T12", "L1", "L2", "S1"]])
    def sacral_share(balanced):
        rng = np.random.default_rng(0)
        picks = [centre_vertebra(channels, rng, balanced) for _ in range(3000)]
        return np.mean([channels[i] == CHANNEL_OF["S1"] for i in picks])
    assert sacral_share(False) == pytest.approx(1 / 12, abs=0.02)
    assert sacral_share(True) == pytest.approx(1 / 3, abs=0.03)  # T, L and S each a third
    config = config_from_dict({"data": {"balance_regions": True}})
    assert config.data.balance_regions is True
    with pytest.raises(VertebraIDError):
        config_from_dict({"data": {"balance_regions": "often"}})


def test_blob_targets_match_render_gaussians_on_an_augmented_grid(tmp_path):
    from types import SimpleNamespace

    from VertebraIDLib.engine.points import render_gaussians

    config = tiny_config(tmp_path)
    config.model.patch_size, config.model.spacing_mm, config.model.sigma_mm = 32, 3.0, 4.0
    config.model.heatmap_height = 7.0
    config.augment.flip_lr = 1.0
    case, _ = _ball_case()
    for seed in range(4):
        image, target, affine = sample_patch(case, config, np.random.default_rng(seed))
        weights = np.zeros((len(case.positions), 26), np.float32)
        weights[np.arange(len(case.positions)), case.channels] = 7.0
        grid = SimpleNamespace(affine=affine, shape3=(32, 32, 32))
        reference = np.moveaxis(render_gaussians(case.positions, weights, grid, 4.0, truncate=10.0), -1, 0)
        assert target.max() > 3.0
        np.testing.assert_allclose(target, reference, atol=1e-3)


@pytest.mark.slow
def test_train_cli_overrides_time_budget_and_start(tmp_path, capsys):
    from VertebraIDLib.cli import main

    first = train(tiny_config(tmp_path / "a", epochs=1), show_progress=False, log=lambda m: None)
    config = tiny_config(tmp_path / "unused", epochs=50).to_dict()
    (tmp_path / "c.json").write_text(json.dumps(config))
    code = main(["train", str(tmp_path / "c.json"), "--output-dir", str(tmp_path / "b"), "--max-minutes", "0.0001",
                 "--init-from", str(first.model_path)])
    assert code == 0 and "model ->" in capsys.readouterr().out
    meta = net.load_model(tmp_path / "b" / "model.safetensors", "cpu").metadata
    assert meta["training"]["epochs"] == 1 and meta["training"]["init_from"] == str(first.model_path)
    assert main(["train", str(tmp_path / "c.json"), "--output-dir", str(tmp_path / "d"),
                 "--init-from", str(tmp_path / "missing.safetensors")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.slow
def test_validation_measures_what_detect_gives(tmp_path):
    """Training's validation and `vertebraid detect` take one path: same maps, labeller and settings,
    so the same vertebrae are identified on the same phantoms (here with the bundled model)."""
    from VertebraIDLib.cli import main
    from VertebraIDLib.evaluation.compare import compare
    from VertebraIDLib.io.formats import write_vertebrae_json
    from VertebraIDLib.io.images import write_nifti

    model = net.load_model(None, "cpu")
    config = tiny_config(tmp_path / "run")
    config.validation.phantoms = 2
    config.validation.phantom_options = {"spacing": 3.0, "levels": "T8..S1"}
    cases = validation_cases(config)
    measured = validate(model.network, model.metadata, cases, config, "cpu", model.path.parent)
    for name, ct, truth in cases:
        write_nifti(ct, tmp_path / "cts" / f"{name}_ct.nii.gz")
        write_vertebrae_json(tmp_path / "truth" / f"{name}.vertebrae.json", truth)
    assert main(["detect", str(tmp_path / "cts"), "-o", str(tmp_path / "out"), "--no-picture"]) == 0
    scored = compare(tmp_path / "out", tmp_path / "truth")
    assert scored.summary.regions["all"].num_gt == measured["num_vertebrae"]
    assert scored.summary.regions["all"].id_rate == pytest.approx(measured["id_rate"])
    assert measured["id_rate"] > 0.5  # the bundled model on phantoms: a real result, not two zeros

