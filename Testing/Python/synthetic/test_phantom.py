"""Synthetic spine CT phantoms: ground truth consistent with the rendered anatomy, options,
conditions, determinism and files (small, coarse phantoms keep this fast)."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from VertebraIDLib.engine.anatomy import LABEL_IDS, VERSE_IDS
from VertebraIDLib.errors import VertebraIDError
from VertebraIDLib.io.formats import read_verse_ctd, read_vertebrae_json
from VertebraIDLib.io.images import read_nifti
from VertebraIDLib.synthetic.phantom import (
    PhantomOptions,
    generate_phantom,
    parse_levels,
    write_phantom,
)
from VertebraIDLib.synthetic.phantom.morphometry import PUBLISHED

SMALL = dict(spacing=2.5, matrix=72)


def _voxel(volume, position):
    return tuple(np.round(volume.world_to_voxel(position)).astype(int))


def _labels(phantom):
    return [v.label for v in phantom.truth]


@pytest.fixture(scope="module")
def clean():
    """Lumbar phantom without noise or blur, with the body mask, in an unusual orientation."""
    return generate_phantom(11, levels="T11..L4", cut=False, spacing=1.5, matrix=150, noise_hu=0, blur_mm=0,
                            orientation="PIR", pathologies=[], with_body_mask=True, transitional="none")


@pytest.mark.slow
def test_types_shapes_and_hu_range(clean):
    assert clean.ct.array.dtype == np.int16 and clean.mask.array.dtype == np.uint8
    assert clean.ct.shape3 == clean.mask.shape3 == clean.body_mask.shape3
    assert np.allclose(clean.ct.affine, clean.mask.affine)
    assert clean.ct.array.min() >= -1024 and clean.ct.array.max() <= 3071
    assert "".join(__import__("nibabel").aff2axcodes(clean.ct.affine)) == "PIR"
    assert np.allclose(clean.ct.spacing, [1.5, 1.5, 1.5])


def test_requested_levels_are_in_the_image_in_order(clean):
    assert _labels(clean) == ["T11", "T12", "L1", "L2", "L3", "L4"]
    shape = np.array(clean.ct.shape3)
    for v in clean.truth:
        ijk = clean.ct.world_to_voxel(v.position)
        assert np.all(ijk >= -0.5) and np.all(ijk <= shape - 0.5)
    z = [v.position[2] for v in clean.truth]
    assert all(a > b for a, b in zip(z, z[1:])), "cranial to caudal means decreasing S coordinate"


def test_truth_is_the_centre_of_the_rendered_body(clean):
    """The ground truth is the centroid of the rendered body, and lies inside its own label."""
    body = clean.body_mask.array
    for v in clean.truth:
        voxels = np.argwhere(body == LABEL_IDS[v.label])
        assert len(voxels) > 500, v.label
        centroid = clean.body_mask.voxel_to_world(voxels.mean(0))
        assert np.linalg.norm(centroid - v.position) < 1.0, (v.label, centroid - v.position)
        assert clean.mask.array[_voxel(clean.mask, v.position)] == VERSE_IDS[v.label]


def test_c2_truth_is_the_centroid_of_its_body_and_dens():
    """C2 is annotated with its dens (as in VerSe / VID), so its truth sits above the body's centre,
    and the C2 -> C3 distance is near the measured typical gap rather than 0.6-0.77 of it."""
    from VertebraIDLib.engine.anatomy import TYPICAL_GAP_MM

    p = generate_phantom(5, levels="C1..C5", cut=False, spacing=1.0, matrix=120, noise_hu=0, blur_mm=0,
                         pathologies=[], with_body_mask=True, transitional="none")
    truth = {v.label: v.position for v in p.truth}
    body = p.body_mask.voxel_to_world(np.argwhere(p.body_mask.array == LABEL_IDS["C2"]).mean(0))
    up = truth["C2"] - truth["C3"]
    lift = float(np.dot(truth["C2"] - body, up / np.linalg.norm(up)))
    assert 2.5 < lift < 5.5
    assert p.mask.array[_voxel(p.mask, truth["C2"])] == VERSE_IDS["C2"]
    assert 0.78 < np.linalg.norm(up) / TYPICAL_GAP_MM["C2"] < 1.0


def test_bone_and_soft_tissue_hu_are_realistic(clean):
    ct = clean.ct.array.astype(float)
    def block(v):  # mean of 5x5x5 voxels around the centre (the trabecular texture averages out)
        i, j, k = _voxel(clean.ct, v.position)
        return ct[i - 2:i + 3, j - 2:j + 3, k - 2:k + 3].mean()

    cancellous = clean.meta["patient"]["cancellous_hu"]
    assert all(abs(block(v) - cancellous) < 30 for v in clean.truth)
    assert np.std([ct[_voxel(clean.ct, v.position)] for v in clean.truth]) > 5, "trabecular texture"
    vert = clean.mask.array > 0
    assert np.percentile(ct[vert], 99) > 600  # cortex
    assert (ct < -900).mean() > 0.05  # air around the body
    fat = ((ct > -130) & (ct < -70)).mean()
    muscle = ((ct > 20) & (ct < 70)).mean()
    assert fat > 0.03 and muscle > 0.05


@pytest.mark.slow
def test_deterministic_from_seed_and_varied_across_seeds():
    a = generate_phantom(5, **SMALL)
    b = generate_phantom(5, **SMALL)
    c = generate_phantom(6, **SMALL)
    assert np.array_equal(a.ct.array, b.ct.array) and np.array_equal(a.mask.array, b.mask.array)
    assert np.allclose(a.ct.affine, b.ct.affine)
    assert [(v.label, tuple(v.position)) for v in a.truth] == [(v.label, tuple(v.position)) for v in b.truth]
    assert a.meta["patient"] != c.meta["patient"] or a.ct.shape3 != c.ct.shape3


@pytest.mark.slow
def test_orientation_and_oblique_axes_keep_the_anatomy():
    kw = dict(levels="L1..L3", cut=False, spacing=2.0, matrix=96, noise_hu=0, pathologies=[], transitional="none")
    ras = generate_phantom(3, orientation="RAS", **kw)
    lps = generate_phantom(3, orientation="LPS", **kw)
    assert [tuple(v.position) for v in ras.truth] == [tuple(v.position) for v in lps.truth]
    for v in ras.truth:
        assert ras.ct.array[_voxel(ras.ct, v.position)] == lps.ct.array[_voxel(lps.ct, v.position)]
    obl = generate_phantom(3, orientation="RAS", oblique_deg=35, **kw)
    rotation = obl.ct.affine[:3, :3] / obl.ct.spacing
    assert np.abs(rotation - np.round(rotation)).max() > 0.05, "the axes should be oblique"
    for v in obl.truth:
        assert obl.mask.array[_voxel(obl.mask, v.position)] == VERSE_IDS[v.label]


@pytest.mark.slow
def test_transitional_anatomy():
    t13 = generate_phantom(2, levels="T11..L2", cut=False, transitional="13_ribs", **SMALL)
    assert _labels(t13) == ["T11", "T12", "T13", "L1", "L2"]
    assert 28 in np.unique(t13.mask.array)
    assert t13.meta["patient"]["rib_pairs"] == 13
    l6 = generate_phantom(2, levels="L4..S1", cut=False, transitional="L6", **SMALL)
    assert _labels(l6) == ["L4", "L5", "L6", "S1"]
    assert 25 in np.unique(l6.mask.array)
    eleven = generate_phantom(2, levels="T10..L1", transitional="11_ribs", **SMALL)
    assert eleven.meta["patient"]["rib_pairs"] == 11
    # asking for T13 implies the transitional anatomy that has it
    assert "T13" in _labels(generate_phantom(2, levels="T13..L2", cut=False, **SMALL))


@pytest.mark.slow
def test_fractures_lower_the_body_and_narrow_the_gap():
    kw = dict(levels="T11..L3", cut=False, spacing=1.5, matrix=110, noise_hu=0, orientation="RAS", tilt_deg=0,
              with_body_mask=True, transitional="none", sex="male", age=50, size=1.0)
    normal = generate_phantom(4, pathologies=[], **kw)
    broken = generate_phantom(4, pathologies=["fracture"], fractures=1, fracture_grade="severe", **kw)
    (level, kind), = broken.meta["patient"]["fractures"].items()
    assert "severe" in kind
    entry = [v for v in broken.truth if v.label == level][0]
    assert "fracture" in entry.extra

    def height(p):
        vox = np.argwhere(p.body_mask.array == LABEL_IDS[level])
        return np.ptp(vox[:, 2]) * p.ct.spacing[2]

    assert height(broken) < 0.92 * height(normal)


@pytest.mark.slow
def test_metal_is_clipped_and_streaks_are_recorded():
    p = generate_phantom(8, levels="L2..S1", cut=False, pathologies=["screws"], spacing=2.0, matrix=128, hu_max=3071)
    assert p.meta["implants"]["pedicle_screws"]
    assert (p.ct.array >= 3071).sum() > 50
    assert p.meta["scan"]["streak_slices"] > 0
    hip = generate_phantom(8, levels="L4..S2", pathologies=["hip_prosthesis"], spacing=2.5, shape=(160, 160, 100), hu_max=4000)
    assert hip.meta["implants"]["hip_prosthesis"] and hip.ct.array.max() == 4000


@pytest.mark.slow
def test_scoliosis_moves_the_spine_sideways():
    kw = dict(levels="T4..L4", cut=False, spacing=3.0, matrix=96, orientation="RAS", tilt_deg=0, noise_hu=0)
    straight = generate_phantom(9, pathologies=[], **kw)
    curved = generate_phantom(9, pathologies=["scoliosis"], scoliosis_deg=45, **kw)

    def lateral(p):
        x = np.array([v.position[0] for v in p.truth])
        return np.ptp(x)

    assert lateral(curved) > lateral(straight) + 15


@pytest.mark.slow
def test_thick_slices_and_anisotropic_spacing():
    p = generate_phantom(12, levels="L1..L4", spacing=(0.8, 5.0), matrix=160, noise_hu=0)
    assert np.allclose(p.ct.spacing[:2].tolist() + [p.ct.spacing[2]], [0.8, 0.8, 5.0]) or np.allclose(
        sorted(p.ct.spacing), [0.8, 0.8, 5.0])
    assert len(p.truth) >= 3


def test_vertebral_bodies_grow_caudally():
    widths = [PUBLISHED[n].width for n in ["C3", "C7", "T4", "T8", "T12", "L3", "L5"]]
    heights = [PUBLISHED[n].height for n in ["C3", "C7", "T4", "T8", "T12", "L3"]]
    assert widths == sorted(widths) and heights == sorted(heights)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(fractures=-1), "negative"),
        (dict(levels="L5..T3"), "upwards"),
        (dict(levels="X9"), "Unknown level"),
        (dict(levels="T13..L1", transitional="none"), "transitional"),
        (dict(pathologies=["fracture", "broken_leg"]), "Unknown pathology"),
        (dict(transitional="T14"), "Unknown transitional"),
        (dict(spacing=0.01), "out of range"),
        (dict(shape=(64, 0, 10)), "positive"),
        (dict(orientation="XYZ"), "orientation"),
        (dict(sex="robot"), "sex"),
        (dict(hu_max=50), "hu_max"),
        (dict(colour="blue"), "Unknown phantom option"),
    ],
)
def test_invalid_options_raise_one_clear_sentence(kwargs, words):
    with pytest.raises(VertebraIDError) as err:
        generate_phantom(0, **kwargs)
    message = str(err.value)
    assert words.lower() in message.lower()
    assert message.endswith(".") and "\n" not in message


def test_negative_seed_and_level_parsing():
    with pytest.raises(VertebraIDError):
        generate_phantom(-3)
    assert parse_levels("t10-s2") == ("T10", "S2")
    assert parse_levels("lumbar") == ("L1", "L5")
    assert parse_levels(("C1", "C7")) == ("C1", "C7")
    assert parse_levels("random") is None
    assert PhantomOptions(levels="T1..T12").validated().levels == ("T1", "T12")


def test_write_phantom_files_round_trip(tmp_path):
    p = generate_phantom(21, levels="L1..L3", cut=False, spacing=2.5, matrix=72, orientation="LPS", with_body_mask=True)
    paths = write_phantom(p, tmp_path, "case7")
    names = sorted(f.name for f in tmp_path.iterdir())
    assert names == sorted(["case7_ct.nii.gz", "case7_seg-vert_msk.nii.gz", "case7_seg-subreg_ctd.json",
                            "case7.vertebrae.json", "case7_phantom.json", "case7_seg-body_msk.nii.gz"])
    img = nib.load(str(paths["ct"]))
    assert img.get_data_dtype() == np.int16 and nib.load(str(paths["mask"])).get_data_dtype() == np.uint8
    ct = read_nifti(paths["ct"])
    assert np.array_equal(ct.array, p.ct.array) and np.allclose(ct.affine, p.ct.affine, atol=1e-4)
    truth = {v.label: v.position for v in p.truth}
    for v in read_vertebrae_json(paths["vertebrae"]):
        assert np.allclose(v.position, truth[v.label], atol=1e-3)
    ctd = read_verse_ctd(paths["verse_ctd"], ct)
    assert [v.label for v in ctd] == [v.label for v in p.truth if v.label in VERSE_IDS]
    for v in ctd:
        assert np.allclose(v.position, truth[v.label], atol=0.05)
    meta = json.loads(paths["meta"].read_text())
    assert meta["seed"] == 21 and meta["levels_in_image"] == [v.label for v in p.truth]
    with pytest.raises(VertebraIDError):
        write_phantom(p, tmp_path, "../escape")
    assert not any(f.name.startswith(".") for f in tmp_path.iterdir()), "no temporary files left behind"


@pytest.mark.slow
def test_contrast_strength_varies_from_late_to_arterial_phase(monkeypatch):
    from VertebraIDLib.synthetic.phantom import soft_tissue

    made = []
    original = soft_tissue.organ_solids

    def recording(*args, **kwargs):
        solids = original(*args, **kwargs)
        made.append((args[3].contrast_scale, {s.name: s.core_hu for s in solids}))
        return solids

    monkeypatch.setattr(soft_tissue, "organ_solids", recording)
    scales = []
    for seed in (3, 4, 5):
        p = generate_phantom(seed, levels="T8..L2", spacing=5.0, pathologies=["contrast"])
        scale, core = made[-1]
        assert p.meta["patient"]["contrast_scale"] == pytest.approx(scale, abs=0.01)
        assert 0.6 <= scale <= 2.0
        assert core["aorta"] == pytest.approx(40.0 + 180.0 * scale)  # blood 40 HU, portal venous phase 220 HU
        scales.append(scale)
    assert len(set(scales)) == 3
    plain = generate_phantom(3, levels="T8..L2", spacing=5.0, pathologies=[])
    assert made[-1][1]["aorta"] == 40.0 and plain.meta["patient"]["contrast_scale"] is None
