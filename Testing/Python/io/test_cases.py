"""Dataset readers: every real case in ../shared/data/realct loads with the right levels, body
centres from label masks agree with expert centroids, phantom folders and the VerSe layout."""
from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
from conftest import REALCT
from VertebraIDLib.engine.anatomy import VERSE_IDS
from VertebraIDLib.engine.volume import Volume
from VertebraIDLib.errors import VertebraIDError
from VertebraIDLib.io.cases import (
    centroids_from_mask,
    find_cases,
    iter_cases,
    load_case,
    read_label_mask,
)
from VertebraIDLib.io.formats import read_verse_ctd
from VertebraIDLib.synthetic.phantom import generate_phantom, write_phantom

needs_data = pytest.mark.skipif(not REALCT.is_dir(), reason="shared real CT data not present")

EXPECTED = {
    "cmbcrc_chest": (["C7"] + [f"T{i}" for i in range(1, 11)], (512, 512, 100), "vertebrae_json"),
    "ts_lumbar": (["T12", "L1", "L2", "L3", "L4", "L5", "S1"], (122, 101, 112), "totalseg_mask"),
    "ts_dicom": (["T11", "T12"], (512, 512, 20), "totalseg_mask"),
    "tptbox_lumbar": (["L2", "L3", "L4"], (73, 47, 73), "verse_mask+subregions"),
    "verse004_labels": ([f"T{i}" for i in range(9, 13)] + [f"L{i}" for i in range(1, 6)], None, "verse_ctd"),
    "tcia_lung_thick": (None, (512, 512, 30), "none"),
    "taichi_lumbar_mpr": (None, None, "none"),
}


@pytest.mark.realdata
@pytest.mark.slow
@needs_data
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_real_case_loads_with_its_levels(name):
    levels, shape, source = EXPECTED[name]
    case = load_case(REALCT / name)
    assert case.source == source
    if levels is None:
        assert case.truth is None
    else:
        assert [v.label for v in case.truth] == levels
        assert all(np.isfinite(v.position).all() for v in case.truth)
    if shape is not None:
        assert case.image.shape3 == shape
    if name == "verse004_labels":
        assert case.image is None
    else:
        assert case.image is not None and np.isfinite(case.image.array).all()


@pytest.mark.realdata
@pytest.mark.slow
@needs_data
def test_iter_cases_covers_the_real_folder():
    names = {c.name: c for c in iter_cases(REALCT)}
    assert set(EXPECTED) - {"taichi_lumbar_mpr"} <= set(names)
    # the two reformatted series are separate cases, each in its own plane
    series = sorted(n for n in names if n.startswith("taichi_lumbar_mpr/"))
    assert series == ["taichi_lumbar_mpr/series5", "taichi_lumbar_mpr/series6"]
    normals = []
    for n in series:
        image = names[n].image
        k_axis = image.affine[:3, 2] / np.linalg.norm(image.affine[:3, 2])
        normals.append(np.argmax(np.abs(k_axis)))
        assert image.shape3[2] in (33, 38)  # the reference slice in the other plane was dropped
    assert normals[0] != normals[1] and 2 not in normals, "neither series is axial"


@pytest.mark.realdata
@needs_data
def test_body_centres_from_a_whole_vertebra_mask_match_the_expert_centroids():
    folder = REALCT / "verse004_labels"
    mask = read_label_mask(folder / "sub-verse004_seg-vert_msk.nii.gz")
    expert = {v.label: v.position for v in read_verse_ctd(folder / "sub-verse004_seg-subreg_ctd.json", mask)}
    estimated = {v.label: v.position for v in centroids_from_mask(mask, "verse")}
    assert set(expert) == set(estimated)
    errors = [np.linalg.norm(expert[k] - estimated[k]) for k in expert]
    assert np.mean(errors) < 2.5 and max(errors) < 5.0
    # the whole-vertebra centroid lies ~1 cm behind the body centre
    for label, pos in expert.items():
        whole = mask.voxel_to_world(np.argwhere(mask.array == VERSE_IDS[label]).mean(0))
        assert np.linalg.norm(whole - pos) > 6.0


@pytest.mark.realdata
@needs_data
def test_subregion_body_and_anterior_estimate_agree():
    folder = REALCT / "tptbox_lumbar"
    vert = read_label_mask(folder / "seg_vert.nii.gz")
    sub = read_label_mask(folder / "seg_subreg.nii.gz")
    with_sub = {v.label: v for v in centroids_from_mask(vert, "verse", sub)}
    without = {v.label: v for v in centroids_from_mask(vert, "verse")}
    assert all(v.extra["method"] == "subregion" for v in with_sub.values())
    for label in with_sub:
        assert np.linalg.norm(with_sub[label].position - without[label].position) < 2.0


@pytest.mark.realdata
@needs_data
def test_totalsegmentator_slivers_are_dropped_and_cut_vertebrae_flagged():
    case = load_case(REALCT / "ts_lumbar" / "ct.nii.gz")
    labels = {v.label: v for v in case.truth}
    assert "T11" not in labels  # a few voxels at the top border
    assert labels["T12"].extra.get("partial") and not labels["L3"].extra.get("partial")
    # S1 sits above and in front of the rest of the sacrum; L5 above S1
    assert labels["L5"].position[2] > labels["S1"].position[2]


@pytest.fixture(scope="module")
def phantom_folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantoms")
    kept = {}
    for seed in (1, 2):
        p = generate_phantom(seed, levels="T12..L3", cut=False, spacing=2.5, matrix=72, orientation="LPS")
        write_phantom(p, out, f"ph{seed}")
        kept[f"ph{seed}"] = p
    return out, kept


@pytest.mark.slow
def test_phantom_cases_load_from_the_image_or_the_folder(phantom_folder):
    out, kept = phantom_folder
    case = load_case(out / "ph1_ct.nii.gz")
    assert case.name == "ph1" and case.source == "vertebrae_json"
    truth = kept["ph1"].truth
    assert [v.label for v in case.truth] == [v.label for v in truth]
    for a, b in zip(case.truth, truth):
        assert np.allclose(a.position, b.position, atol=1e-3)
    cases = list(iter_cases(out))
    assert sorted(c.name for c in cases) == ["ph1", "ph2"]
    with pytest.raises(VertebraIDError, match="holds 2 images"):
        load_case(out)


def test_mask_only_phantom_gives_body_centres(phantom_folder, tmp_path):
    out, kept = phantom_folder
    shutil.copy(out / "ph2_seg-vert_msk.nii.gz", tmp_path / "ph2_seg-vert_msk.nii.gz")
    case = load_case(tmp_path)
    assert case.image is None and case.source == "verse_mask"
    truth = {v.label: v.position for v in kept["ph2"].truth}
    for v in case.truth:
        assert np.linalg.norm(v.position - truth[v.label]) < 4.0, v.label


def test_verse_layout(phantom_folder, tmp_path):
    out, kept = phantom_folder
    for sub in ("rawdata/sub-ph1", "derivatives/sub-ph1"):
        (tmp_path / sub).mkdir(parents=True)
    shutil.copy(out / "ph1_ct.nii.gz", tmp_path / "rawdata/sub-ph1/sub-ph1_ct.nii.gz")
    shutil.copy(out / "ph1_seg-vert_msk.nii.gz", tmp_path / "derivatives/sub-ph1/sub-ph1_seg-vert_msk.nii.gz")
    shutil.copy(out / "ph1_seg-subreg_ctd.json", tmp_path / "derivatives/sub-ph1/sub-ph1_seg-subreg_ctd.json")
    (case,) = list(iter_cases(tmp_path))
    assert case.name == "sub-ph1" and case.source == "verse_ctd"
    truth = {v.label: v.position for v in kept["ph1"].truth}
    for v in case.truth:
        assert np.allclose(v.position, truth[v.label], atol=0.05)


def test_bad_inputs_fail_with_one_sentence(phantom_folder, tmp_path):
    out, _ = phantom_folder
    with pytest.raises(VertebraIDError, match="no such file"):
        load_case(tmp_path / "missing.nii.gz")
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(out / "ph1_ct.nii.gz", bad / "x_ct.nii.gz")
    (bad / "x.vertebrae.json").write_text("{not json")
    with pytest.raises(VertebraIDError, match="not valid JSON"):
        load_case(bad / "x_ct.nii.gz")
    (bad / "x.vertebrae.json").unlink()
    nib.save(nib.Nifti1Image(np.full((4, 4, 4), 2.5, np.float32), np.eye(4)), str(bad / "x_seg-vert_msk.nii.gz"))
    with pytest.raises(VertebraIDError, match="not a label mask"):
        load_case(bad / "x_ct.nii.gz")
    (bad / "notes.txt").write_text("hello")
    with pytest.raises(VertebraIDError, match="not an image"):
        load_case(bad / "notes.txt")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(VertebraIDError, match="Found no image"):
        load_case(empty)


def test_centroids_from_mask_refuses_a_subregion_mask_on_another_grid():
    mask = Volume(np.zeros((5, 5, 5), np.int32), np.eye(4))
    mask.array[1:3, 1:3, 1:3] = 20
    other = Volume(np.zeros((6, 5, 5), np.int32), np.eye(4))
    with pytest.raises(VertebraIDError, match="same grid"):
        centroids_from_mask(mask, "verse", other)
    assert [v.label for v in centroids_from_mask(mask, "verse")] == ["L1"]
    assert json.dumps([v.label for v in centroids_from_mask(Volume(np.zeros((3, 3, 3), np.int32), np.eye(4)))]) == "[]"


def test_one_case_finder_for_every_face(tmp_path):
    """detect and slicer-batch find the same cases: images, DICOM series folders, label images passed over."""
    (tmp_path / "a.nii.gz").write_bytes(b"")
    (tmp_path / "b_ct.nrrd").write_bytes(b"")
    (tmp_path / "a_mask.nii.gz").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("x")
    series = tmp_path / "patient7"
    series.mkdir()
    (series / "IM0001").write_bytes(b"\0" * 128 + b"DICM")  # the DICOM magic, no .dcm name
    (tmp_path / "empty").mkdir()
    found = find_cases([tmp_path])
    assert [(name, path.name) for name, path in found.cases] == [("a", "a.nii.gz"), ("b", "b_ct.nrrd"),
                                                                  ("patient7", "patient7")]
    assert [p.name for p in found.passed_over] == ["a_mask.nii.gz"]
    with pytest.raises(VertebraIDError, match="Found no CT"):
        find_cases([tmp_path / "empty"])
    with pytest.raises(VertebraIDError, match="no such file"):
        find_cases([tmp_path / "absent"])

