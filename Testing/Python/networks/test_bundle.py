"""The heatmap network and its model files: round trip, checksum, refusing pickles, devices."""
from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from conftest import REPO
from VertebraIDLib.engine.anatomy import LEVELS_26
from VertebraIDLib.errors import VertebraIDError
from VertebraIDLib.io.weights import sha256_file
from VertebraIDLib.networks import bundle as net
from VertebraIDLib.networks import heatmap as heatmap_net

TINY = heatmap_net.NetworkConfig(channels=(4, 8, 16))


def _save_tiny(path, seed=0):
    torch.manual_seed(seed)
    model = heatmap_net.build_network(TINY)
    meta = net.make_metadata(TINY, spacing_mm=8.0, patch_size=32, sigma_mm=10.0, hu_window=(-250, 1250),
                             training={"what": "test"}, metrics={"id_rate": 0.5})
    net.save_model(model, meta, path)
    return model


def test_network_maps_ct_to_26_channels():
    model = heatmap_net.build_network(TINY).eval()
    with torch.no_grad():
        out = model(torch.rand(1, 1, 16, 16, 16))
    assert out.shape == (1, 26, 16, 16, 16)
    default = heatmap_net.build_network(heatmap_net.NetworkConfig())
    assert 500_000 < heatmap_net.count_parameters(default) < 3_000_000  # small enough to train on a CPU


def test_save_load_round_trip(tmp_path):
    model = _save_tiny(tmp_path / "m.safetensors").eval()
    meta = json.loads((tmp_path / "m.json").read_text())
    assert meta["labels"] == list(LEVELS_26) and meta["spacing_mm"] == [8.0, 8.0, 8.0]
    assert meta["weights_sha256"] == sha256_file(tmp_path / "m.safetensors")
    loaded = net.load_model(tmp_path / "m.json", "cpu")  # either file of the pair names the model
    x = torch.rand(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(x), loaded.network(x))
    assert loaded.patch_size == (32, 32, 32) and loaded.sigma_mm == 10.0 and loaded.hu_window == (-250.0, 1250.0)
    assert loaded.metadata["metrics"]["id_rate"] == 0.5


def test_tampered_or_corrupt_weights_are_refused(tmp_path):
    path = tmp_path / "m.safetensors"
    _save_tiny(path)
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF  # one weight changed
    path.write_bytes(bytes(data))
    with pytest.raises(VertebraIDError, match="checksum"):
        net.load_model(path, "cpu")
    # garbage with a matching checksum: still one clear sentence
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header")
    meta = json.loads((tmp_path / "m.json").read_text())
    meta["weights_sha256"] = sha256_file(path)
    (tmp_path / "m.json").write_text(json.dumps(meta))
    with pytest.raises(VertebraIDError, match="not a readable safetensors"):
        net.load_model(path, "cpu")


class _Exploit:
    marker = None

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickles_are_never_unpickled(tmp_path):
    _save_tiny(tmp_path / "m.safetensors")
    marker = tmp_path / "unpickled.txt"
    _Exploit.marker = marker
    (tmp_path / "m.safetensors").write_bytes(pickle.dumps(_Exploit(), protocol=4))
    with pytest.raises(VertebraIDError, match="pickle"):
        net.load_model(tmp_path / "m.safetensors", "cpu")
    assert not marker.exists()
    torch.save({"w": torch.zeros(2)}, tmp_path / "ckpt.safetensors")  # a PyTorch zip checkpoint
    with pytest.raises(VertebraIDError, match="never unpickles"):
        net.load_model(tmp_path / "ckpt.safetensors", "cpu")


def test_missing_or_malformed_metadata(tmp_path):
    with pytest.raises(VertebraIDError, match="does not exist"):
        net.load_model(tmp_path / "none.safetensors", "cpu")
    _save_tiny(tmp_path / "m.safetensors")
    (tmp_path / "m.json").write_text("{not json")
    with pytest.raises(VertebraIDError, match="not valid JSON"):
        net.load_model(tmp_path / "m.safetensors", "cpu")
    (tmp_path / "m.json").unlink()
    with pytest.raises(VertebraIDError, match="no metadata"):
        net.load_model(tmp_path / "m.safetensors", "cpu")


def test_weights_must_fit_the_described_network(tmp_path):
    _save_tiny(tmp_path / "m.safetensors")
    meta = json.loads((tmp_path / "m.json").read_text())
    meta["network"]["channels"] = [4, 8, 32]
    (tmp_path / "m.json").write_text(json.dumps(meta))
    with pytest.raises(VertebraIDError, match="do not fit"):
        net.load_model(tmp_path / "m.safetensors", "cpu")


def test_devices():
    assert net.resolve_device("cpu").type == "cpu"
    assert net.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(VertebraIDError, match="Unknown device"):
        net.resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(VertebraIDError, match="no CUDA GPU"):
            net.resolve_device("cuda")


def test_no_bundled_model_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(net, "MODELS_DIR", tmp_path)  # an installation without the model file
    monkeypatch.setattr(net, "INSTALLED_MODELS_DIR", tmp_path)
    with pytest.raises(VertebraIDError, match="No bundled model"):
        net.load_model(None, "cpu")


def test_a_wheel_installation_finds_the_bundled_model_in_its_data_folder(tmp_path, monkeypatch):
    installed = tmp_path / "share" / "vertebraid" / "models"
    installed.mkdir(parents=True)
    (installed / net.BUNDLED_MODEL_NAME).write_bytes(b"weights")
    monkeypatch.setattr(net, "MODELS_DIR", tmp_path / "no-source-tree")
    monkeypatch.setattr(net, "INSTALLED_MODELS_DIR", installed)
    assert net.default_model_path() == installed / net.BUNDLED_MODEL_NAME


def test_the_wheel_ships_the_bundled_model_files():

    import tomllib

    root = REPO
    data_files = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["data-files"]
    shipped = data_files["share/vertebraid/models"]
    assert f"VertebraID/Resources/Models/{net.BUNDLED_MODEL_NAME}" in shipped
    bundled_meta = json.loads((net.MODELS_DIR / "vertebraid.json").read_text())
    assert f"VertebraID/Resources/Models/{bundled_meta['level_labeller']['weights_file']}" in shipped
    assert all((root / f).is_file() for f in shipped), shipped
    assert net.INSTALLED_MODELS_DIR.parts[-3:] == ("share", "vertebraid", "models")


def test_config_errors():
    with pytest.raises(VertebraIDError, match="Unknown network kind"):
        heatmap_net.NetworkConfig(kind="resnet")
    with pytest.raises(VertebraIDError, match="at least 3 levels"):
        heatmap_net.NetworkConfig(channels=(8, 16))
    assert np.array_equal(heatmap_net.NetworkConfig.from_dict(TINY.to_dict()).channels, TINY.channels)
