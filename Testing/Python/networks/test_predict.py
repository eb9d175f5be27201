"""Inference: preprocessing, sliding window, progress/cancel, bad input, and `vertebraid detect`."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import REALCT
from VertebraIDLib.cli import main
from VertebraIDLib.engine.progress import Cancelled
from VertebraIDLib.engine.volume import Volume
from VertebraIDLib.errors import VertebraIDError
from VertebraIDLib.io.images import read_image
from VertebraIDLib.networks import bundle as net
from VertebraIDLib.networks import heatmap as heatmap_net
from VertebraIDLib.networks.predict import (
    SKELETON_DESCRIPTION,
    body_box,
    detect,
    predict_heatmaps,
)
from VertebraIDLib.networks.preprocess import preprocess, reduce_and_window
from VertebraIDLib.synthetic.phantom import generate_phantom, write_phantom

TINY = heatmap_net.NetworkConfig(channels=(4, 8, 16))


@pytest.fixture(scope="module")
def tiny_model_path(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    meta = net.make_metadata(TINY, spacing_mm=8.0, patch_size=32, sigma_mm=10.0, hu_window=(-250, 1250))
    net.save_model(heatmap_net.build_network(TINY), meta, path)
    return path


@pytest.fixture(scope="module")
def phantom():
    return generate_phantom(3, spacing=4.0, levels="T11..L4", orientation="LPS")


def test_preprocess_gives_a_ras_grid_at_the_model_spacing(phantom):
    image = preprocess(phantom.ct, 8.0, (-250, 1250))
    assert np.allclose(image.affine[:3, :3], np.diag([8.0, 8.0, 8.0]))  # RAS, axis-aligned
    assert 0.0 <= image.array.min() and image.array.max() <= 1.0 and image.array.max() > 0.35  # bone is bright
    extent_in = np.ptp(phantom.ct.corners_world(), axis=0)
    extent_out = np.ptp(image.corners_world(), axis=0)
    assert np.all(np.abs(extent_in - extent_out) <= 8.0 + 1e-6)


def test_a_fortran_ordered_ct_is_reduced_the_same_as_a_c_ordered_one():
    rng = np.random.default_rng(0)
    array = rng.normal(0, 300, (60, 62, 48)).astype(np.int16)
    affine = np.diag([0.8, 0.8, 1.0, 1.0])
    array[:4] = -1000  # air, so that the CT check passes
    c_order = reduce_and_window(Volume(np.ascontiguousarray(array), affine), (4.0, 4.0, 4.0), (-250, 1250))
    f_order = reduce_and_window(Volume(np.asfortranarray(array), affine), (4.0, 4.0, 4.0), (-250, 1250))
    assert c_order.array.shape == f_order.array.shape == (12, 12, 12)  # blocks of 5 x 5 x 4 voxels
    assert np.allclose(c_order.array, f_order.array) and np.allclose(c_order.affine, f_order.affine)


def test_the_body_box_keeps_the_patient_with_a_margin_and_everything_when_there_is_none():
    array = np.zeros((40, 30, 20), np.float32)
    array[10:20, 5:8, 12] = 0.4  # the patient
    array[0, 0, 0] = 0.01  # below the level: air with noise
    assert body_box(array, margin=2) == (slice(8, 22), slice(3, 10), slice(10, 15))
    assert body_box(np.zeros((5, 6, 7), np.float32)) == (slice(0, 5), slice(0, 6), slice(0, 7))


@pytest.mark.slow
def test_predict_heatmaps_shape_progress_and_orientation(tiny_model_path, phantom):
    model = net.load_model(tiny_model_path, "cpu")
    calls = []
    maps = predict_heatmaps(phantom.ct, model, "cpu", lambda f, m: calls.append(f), overlap=0.5)
    assert maps.array.dtype == np.float32 and maps.array.shape[3] == 26 and maps.array.min() >= 0
    assert np.allclose(maps.spacing, 8.0)
    assert calls == sorted(calls) and calls[-1] == pytest.approx(1.0) and len(calls) >= 3
    # the same scan stored with its first axis reversed gives the same maps (canonical RAS)
    flipped = Volume(phantom.ct.array[::-1].copy(), phantom.ct.affine @ _flip_affine(phantom.ct.array.shape[0]))
    again = predict_heatmaps(flipped, model, "cpu", overlap=0.5)
    assert np.allclose(again.affine, maps.affine, atol=1e-4)
    assert np.allclose(again.array, maps.array, atol=1e-4)
    compact = predict_heatmaps(phantom.ct, model, "cpu", overlap=0.5, compact=True)
    assert compact.array.dtype == np.float16 and np.allclose(compact.array, maps.array, atol=2e-2 * maps.array.max())


def _flip_affine(n):
    a = np.eye(4)
    a[0, 0] = -1
    a[0, 3] = n - 1
    return a


def test_cancel(tiny_model_path, phantom):
    model = net.load_model(tiny_model_path, "cpu")
    with pytest.raises(Cancelled):
        predict_heatmaps(phantom.ct, model, "cpu", lambda f, m: f > 0.1)


def test_bad_inputs_give_one_sentence(tiny_model_path, phantom):
    model = net.load_model(tiny_model_path, "cpu")
    ct = phantom.ct
    mri = Volume(np.random.default_rng(0).uniform(0, 800, (60, 60, 40)).astype(np.float32), ct.affine)
    cases = {
        "Hounsfield": mri,
        "2-D": Volume(ct.array[:, :, :1].copy(), ct.affine),
        "too small": Volume(ct.array[:5, :5, :5].copy(), ct.affine),
        "too large": Volume(ct.array[:20, :20, :20].copy(), np.diag([200.0, 200.0, 200.0, 1.0])),
        "NaN": Volume(np.where(ct.array > 500, np.nan, ct.array.astype(np.float32)), ct.affine),
    }
    for message, volume in cases.items():
        with pytest.raises(VertebraIDError, match=message):
            predict_heatmaps(volume, model, "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(VertebraIDError, match="no CUDA GPU"):
            predict_heatmaps(ct, model, "cuda")


@pytest.mark.slow
@pytest.mark.realdata
def test_detect_names_a_bone_only_ct_from_its_bone_without_the_network(tiny_model_path, shared_data):
    ct = read_image(REALCT / "ts_s0328_bone" / "ct.nrrd")  # a real skeleton: soft tissue set to 0
    messages = []
    result = detect(ct, net.load_model(tiny_model_path, "cpu"), progress=lambda f, m: messages.append(m))
    assert result.prepared.description == SKELETON_DESCRIPTION and messages[0].startswith("A bone-only CT")
    assert len(result.vertebrae) >= 5 and all(v.confidence < 0.5 for v in result.vertebrae)


@pytest.mark.slow
def test_detect_command(tiny_model_path, phantom, tmp_path, capsys):
    inputs = tmp_path / "in"
    write_phantom(phantom, inputs / "a", "case-a")
    (inputs / "b").mkdir()
    (inputs / "b" / "broken_ct.nii.gz").write_bytes(b"not a nifti")
    out = tmp_path / "out"
    code = main(["detect", str(inputs), "-o", str(out), "--model", str(tiny_model_path), "--device", "cpu",
                 "--save-heatmaps"])
    assert code == 2  # the broken case fails, the good one is done
    names = sorted(p.name for p in out.iterdir())
    assert names == ["case-a.mrk.json", "case-a.vertebrae.json", "case-a_ctd.json", "case-a_heatmaps.nii.gz",
                     "case-a_qc.png"]
    assert "broken" in capsys.readouterr().err
    stamp = (out / "case-a.vertebrae.json").stat().st_mtime_ns
    assert main(["detect", str(inputs / "a"), "-o", str(out), "--model", str(tiny_model_path)]) == 0
    assert (out / "case-a.vertebrae.json").stat().st_mtime_ns == stamp  # skipped: already done
    assert "skipping 1" in capsys.readouterr().out


def test_detect_without_a_model_says_so(tmp_path, phantom, capsys, monkeypatch):
    monkeypatch.setattr(net, "MODELS_DIR", tmp_path / "no-models")  # an installation without the model file
    monkeypatch.setattr(net, "INSTALLED_MODELS_DIR", tmp_path / "no-models")
    write_phantom(phantom, tmp_path / "in", "c")
    assert main(["detect", str(tmp_path / "in" / "c_ct.nii.gz"), "-o", str(tmp_path / "out")]) == 2
    assert "No bundled model is installed" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cases_are_named_after_their_folder_when_the_series_folder_is_generic(tmp_path):
    from VertebraIDLib.io.cases import find_cases

    for folder in ("chest/dicom", "abdomen/DICOM", "knee/series7"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "slice1.dcm").write_bytes(b"")
    (tmp_path / "spine_ct.nii.gz").write_bytes(b"")
    names = {name for name, _ in find_cases([tmp_path]).cases}
    assert names == {"chest", "abdomen", "series7", "spine"}
