"""CT rendered from anatomy label maps (synthetic/labelmap_ct.py): a small synthetic map, and the real ones."""
from __future__ import annotations


import numpy as np
import pytest
from scipy import ndimage as ndi

from VertebraIDLib.synthetic import labelmap_ct as L

SP = 1.5  # mm
SHAPE = (110, 90, 120)
NAMES = {1: "vertebrae_T12", 2: "vertebrae_L1", 3: "vertebrae_L2", 4: "vertebrae_L3", 5: "rib_left_12",
         6: "lung_lower_lobe_left", 7: "liver", 8: "autochthon_left", 9: "autochthon_right", 10: "aorta",
         11: "kidney_right", 12: "spinal_cord"}
BODY_Z = [150.0, 118.0, 86.0, 54.0]  # body centres (RAS z, mm) of T12..L3: 32 mm apart
BODY_H = 24.0                        # body height -> 8 mm discs


def _grid():
    aff = np.diag([SP, SP, SP, 1.0])
    aff[:3, 3] = [-82.5, -60.0, 0.0]
    ijk = np.indices(SHAPE).reshape(3, -1).T.astype(float)
    xyz = ijk @ aff[:3, :3].T + aff[:3, 3]
    return aff, xyz[:, 0].reshape(SHAPE), xyz[:, 1].reshape(SHAPE), xyz[:, 2].reshape(SHAPE)


def synthetic_map():
    """Four vertebrae (elliptic body + posterior arch), a rib, lung, liver, muscles, aorta, kidney, cord."""
    aff, x, y, z = _grid()
    lab = np.zeros(SHAPE, np.uint8)

    def ell(c, r):
        return ((x - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((z - c[2]) / r[2]) ** 2 <= 1

    for i, zc in enumerate(BODY_Z):
        body = (((x / 22.0) ** 2 + ((y - 10.0) / 16.0) ** 2) <= 1) & (np.abs(z - zc) <= BODY_H / 2)
        ring = (((x / 13.0) ** 2 + ((y + 18.0) / 10.0) ** 2) <= 1) & (((x / 8.0) ** 2 + ((y + 18.0) / 6.0) ** 2) > 1)
        arch = (ring | ((np.abs(x) <= 3.5) & (y <= -26) & (y >= -52))) & (np.abs(z - zc + 3) <= 9)
        lab[body | arch] = i + 1
    lab[ell((0, -18, 100), (6, 5, 90)) & (lab == 0)] = 12                       # cord in the canal
    t = np.clip((x - 20) / 70.0, 0, 1)                                          # rib: a thin curved tube
    rib = (x > 18) & (x < 95) & (np.hypot(y - (-15 + 60 * np.sin(t * 2.2)), z - 150) <= 3.5)
    lab[rib & (lab == 0)] = 5
    lab[ell((45, 10, 165), (35, 35, 22)) & (lab == 0)] = 6                     # lung (left, upper)
    lab[ell((-45, 15, 130), (35, 30, 30)) & (lab == 0)] = 7                    # liver (right)
    lab[ell((18, -50, 100), (10, 12, 80)) & (lab == 0)] = 8
    lab[ell((-18, -50, 100), (10, 12, 80)) & (lab == 0)] = 9
    lab[ell((-6, 38, 100), (7, 7, 90)) & (lab == 0)] = 10                      # aorta
    lab[ell((-50, -20, 90), (18, 14, 28)) & (lab == 0)] = 11
    return lab, aff


@pytest.fixture(scope="module")
def data():
    lab, aff = synthetic_map()
    return lab, aff, L.prepare_labelmap(lab, aff, NAMES)


IDENT = dict(scale_range=(1, 1), axis_scale_jitter=0.0, max_rotation_deg=0.0, max_shift_mm=0.0,
             elastic_amplitude_mm=(0.0, 0.0), fov="whole", phase="none", p_metal=0.0, p_table=0.0,
             noise_std=(5.0, 5.0), p_calibration=0.0, slice_thickness_mm=1.5, p_fov_circle=0.0,
             kernel_probs={"standard": 1.0})


def test_structure_classes():
    c = L.structure_classes({1: "vertebrae_L1", 2: "vertebrae_S1", 3: "sacrum", 4: "rib_left_3",
                             5: "costal_cartilages", 6: "lung_upper_lobe_left", 7: "trachea", 8: "liver",
                             9: "kidney_left", 10: "spleen", 11: "aorta", 12: "inferior_vena_cava",
                             13: "heart", 14: "colon", 15: "urinary_bladder", 16: "gluteus_maximus_left",
                             17: "femur_left", 18: "hip_right", 19: "spinal_cord", 20: "something_else",
                             21: "portal_vein_and_splenic_vein", 22: "iliac_artery_left", 23: "sternum"})
    assert c[1] == "vertebra" and c[2] == "vertebra" and c[3] == "sacrum" and c[4] == "rib"
    assert c[5] == "cartilage" and c[6] == "lung" and c[7] == "airway" and c[8] == "liver"
    assert c[9] == "kidney" and c[10] == "spleen" and c[11] == "artery" and c[12] == "vein"
    assert c[13] == "heart" and c[14] == "bowel" and c[15] == "bladder" and c[16] == "muscle"
    assert c[17] == "other_bone" and c[18] == "other_bone" and c[19] == "spinal_cord"
    assert c[20] == "other_soft" and c[21] == "vein" and c[22] == "artery" and c[23] == "other_bone"
    assert set(c.values()) <= set(L.CLASSES)
    assert L.vertebra_level("vertebrae_T12") == "T12" and L.vertebra_level("liver") is None


def test_vertebra_centres_are_body_centres(data):
    lab, aff, _ = data
    cen = L.vertebra_centres(lab, aff, NAMES)
    assert list(cen) == ["T12", "L1", "L2", "L3"]
    for lev, zc in zip(cen, BODY_Z):
        # body ellipse centre (0, 10, zc); the anterior 42 % of the vertebra is (nearly) the body
        assert np.allclose(cen[lev], [0.0, 10.0, zc], atol=3.0), (lev, cen[lev])


def test_shapes_spacing_and_determinism(data):
    lab, aff, pm = data
    out1 = L.render_ct(lab, aff, NAMES, np.random.default_rng(7), spacing_mm=(1.0, 1.2, 2.5), prepared=pm)
    out2 = L.render_ct(lab, aff, NAMES, np.random.default_rng(7), spacing_mm=(1.0, 1.2, 2.5), prepared=pm)
    hu, a, lo = out1
    assert hu.dtype == np.float32 and hu.shape == lo.shape and hu.ndim == 3
    assert np.allclose(np.linalg.norm(a[:3, :3], axis=0), [1.0, 1.2, 2.5])
    cols = a[:3, :3] / np.linalg.norm(a[:3, :3], axis=0)
    assert np.allclose(cols.T @ cols, np.eye(3), atol=1e-9)
    assert np.array_equal(hu, out2[0]) and np.array_equal(lo, out2[2]) and np.array_equal(a, out2[1])
    hu3 = L.render_ct(lab, aff, NAMES, np.random.default_rng(8), spacing_mm=(1.0, 1.2, 2.5), prepared=pm)[0]
    assert hu3.shape != hu.shape or not np.array_equal(hu3, hu)
    assert hu.min() >= -1024 and hu.max() <= 3071 and np.isfinite(hu).all()
    # scalar spacing and drawn spacing
    hu4, a4, _, info = L.render_ct(lab, aff, NAMES, np.random.default_rng(1), spacing_mm=2.0, prepared=pm,
                                   return_info=True)
    assert np.allclose(np.linalg.norm(a4[:3, :3], axis=0), 2.0)
    hu5, a5, _, info5 = L.render_ct(lab, aff, NAMES, np.random.default_rng(2), prepared=pm, return_info=True)
    assert np.allclose(np.linalg.norm(a5[:3, :3], axis=0), info5["spacing_mm"])


def test_hu_ranges_per_class(data):
    lab, aff, pm = data
    hu, a, lo = L.render_ct(lab, aff, NAMES, np.random.default_rng(3), spacing_mm=1.5, prepared=pm, **IDENT)

    def inner(lid, it=2):
        return ndi.binary_erosion(lo == lid, iterations=it)
    med = {n: float(np.median(hu[inner(i)])) for i, n in NAMES.items() if inner(i).any()}
    assert 35 <= med["liver"] <= 75
    assert 15 <= med["autochthon_left"] <= 65
    assert 15 <= med["aorta"] <= 65                      # unenhanced blood
    assert 10 <= med["kidney_right"] <= 60
    assert med["lung_lower_lobe_left"] < -600
    # vertebrae: grey trabecular interior, brighter rim (cortex / endplates)
    for i in (1, 2, 3, 4):
        m = lo == i
        interior = np.median(hu[inner(i, 3)])
        rim = np.percentile(hu[m & ~ndi.binary_erosion(m, iterations=2)], 75)
        assert 50 <= interior <= 450 and rim > interior + 60, (i, interior, rim)
    # outside the body is air; inside the body there is subcutaneous fat
    assert np.median(hu[:3, :3, :]) < -900
    body_unlabelled = (lo == 0) & (hu > -900)
    fat = np.mean((hu[body_unlabelled] > -150) & (hu[body_unlabelled] < -40))
    assert fat > 0.1


def test_discs_are_soft_tissue(data):
    lab, aff, pm = data
    hu, a, lo, info = L.render_ct(lab, aff, NAMES, np.random.default_rng(4), spacing_mm=1.0, prepared=pm,
                                  return_info=True, **IDENT)
    inv = np.linalg.inv(a)
    for z0, z1 in zip(BODY_Z[:-1], BODY_Z[1:]):
        mid = info["transform"].input_to_output(np.array([[0.0, 10.0, (z0 + z1) / 2]]))[0]
        v = np.rint(mid @ inv[:3, :3].T + inv[:3, 3]).astype(int)
        patch = hu[v[0] - 4:v[0] + 5, v[1] - 3:v[1] + 4, v[2]]
        assert 40 <= np.median(patch) <= 130, (z0, np.median(patch))
        assert lo[tuple(v)] == 0


def test_transform_maps_truth_points(data):
    lab, aff, pm = data
    opts = dict(elastic_amplitude_mm=(8.0, 8.0), elastic_length_mm=(30.0, 40.0), max_rotation_deg=10.0,
                fov="whole", p_metal=0.0)
    hu, a, lo, info = L.render_ct(lab, aff, NAMES, np.random.default_rng(11), spacing_mm=1.5, prepared=pm,
                                  return_info=True, **opts)
    tr = info["transform"]
    assert info["elastic_amplitude_mm"] == 8.0
    # the inverse is exact to numerical precision
    y = a[:3, 3] + np.array([[30.0, 40.0, 60.0], [50.0, 20.0, 120.0]])
    assert np.allclose(tr.input_to_output(tr.output_to_input(y)), y, atol=1e-3)
    # a structure's centroid maps onto the deformed structure's centroid (within a voxel or two)
    inside = np.ones(lo.shape, bool)
    inside[1:-1, 1:-1, 1:-1] = False  # the output border
    checked = 0
    for lid in (1, 2, 3, 4, 7, 10, 11):
        if (lo[inside] == lid).any():
            continue  # cut by the field of view: its centroid moved
        checked += 1
        c_in = (np.argwhere(lab == lid).mean(0)) @ aff[:3, :3].T + aff[:3, 3]
        c_out = np.argwhere(lo == lid).mean(0) @ a[:3, :3].T + a[:3, 3]
        err = np.linalg.norm(tr.input_to_output(c_in[None])[0] - c_out)
        assert err < 3.0, (lid, err)  # within two 1.5 mm voxels
    assert checked >= 3
    # body centres computed on the output agree with the mapped input centres
    cin = L.vertebra_centres(lab, aff, NAMES)
    cout = L.vertebra_centres(lo, a, NAMES)
    mapped = tr.map_points(cin)
    lid_of = {L.vertebra_level(n): i for i, n in NAMES.items() if L.vertebra_level(n)}
    whole = [lev for lev in cout if not (lo[inside] == lid_of[lev]).any()]
    assert len(whole) >= 2
    for lev in whole:
        assert np.linalg.norm(mapped[lev] - cout[lev]) < 3.0, lev


def test_phases_metal_and_random_intensity(data):
    lab, aff, pm = data
    base = {**IDENT}
    base.pop("phase")
    hu, a, lo = L.render_ct(lab, aff, NAMES, np.random.default_rng(5), spacing_mm=1.5, prepared=pm,
                            phase="arterial", **base)
    assert np.median(hu[ndi.binary_erosion(lo == 10, iterations=2)]) > 150
    hu, a, lo = L.render_ct(lab, aff, NAMES, np.random.default_rng(5), spacing_mm=1.5, prepared=pm,
                            **{**IDENT, "p_metal": 1.0})
    assert (hu > 1900).sum() > 50
    hu_r, _, lo_r, info = L.render_ct(lab, aff, NAMES, np.random.default_rng(6), spacing_mm=2.0, prepared=pm,
                                      p_random_intensity=1.0, return_info=True)
    assert info["random_intensity"] and np.isfinite(hu_r).all()


def test_orientation_independent(data):
    """Permuted / flipped voxel axes (e.g. LPS or PIR arrays) give the same anatomy in RAS."""
    lab, aff, _ = data
    perm = (2, 0, 1)
    lab2 = np.transpose(lab, perm)[::-1, :, ::-1]
    aff2 = np.eye(4)
    cols = aff[:3, :3][:, perm]
    n = np.array(lab2.shape) - 1
    aff2[:3, :3] = cols * np.array([-1, 1, -1])
    aff2[:3, 3] = aff[:3, 3] + cols[:, 0] * n[0] + cols[:, 2] * n[2]
    assert np.allclose(L.vertebra_centres(lab2, aff2, NAMES)["L1"], L.vertebra_centres(lab, aff, NAMES)["L1"])
    hu, a, lo = L.render_ct(lab2, aff2, NAMES, np.random.default_rng(3), spacing_mm=2.0, **IDENT)
    assert np.all(np.diag(a[:3, :3]) > 0)  # output axes closest to R, A, S
    med = float(np.median(hu[ndi.binary_erosion(lo == 7, iterations=2)]))
    assert 35 <= med <= 75


def test_ribs_are_joined_to_their_vertebra():
    """A rib mask that stops short of its vertebra (as segmentations' do) gets a neck over soft tissue."""
    spacing = 1.5
    lab = np.zeros((60, 40, 30), np.int32)
    lab[25:35, 15:25, 10:20] = 1  # vertebra T7
    lab[45:58, 18:22, 13:17] = 2  # rib 7, 15 mm lateral of it
    lab[40:44, 15:25, 10:20] = 3  # muscle in the gap: painted over
    names = {1: "vertebrae_T7", 2: "rib_left_7", 3: "autochthon_left"}
    joined = L.connect_ribs(lab, np.diag([spacing, spacing, spacing, 1.0]), names)
    assert (joined[35:45, 18:22, 13:17] == 2).any(axis=(1, 2)).all()  # a continuous neck along x
    assert (joined[25:35, 15:25, 10:20] == 1).all()  # the vertebra keeps its label
    far = np.zeros((80, 40, 30), np.int32)  # a rib 35 mm away (cut by the map's border): left alone
    far[25:35, 15:25, 10:20] = 1
    far[70:78, 18:22, 13:17] = 2
    np.testing.assert_array_equal(L.connect_ribs(far, np.eye(4), names), far)


@pytest.mark.realdata
@pytest.mark.slow
def test_a_real_label_map_renders_with_its_vertebrae():
    from conftest import LABELMAPS

    path = LABELMAPS / "ts_s0328.nii.gz"
    if not path.exists():
        pytest.skip("../shared/data/labelmaps is absent")
    labelmap = L.read_labelmap(path)
    hu, affine, labels, info = labelmap.render(np.random.default_rng(3), spacing_mm=3.0, fov="abdomen")
    centres = L.vertebra_centres(labels, affine, labelmap.prepared.names)
    assert {"L1", "L5"} <= set(centres) and hu.shape == labels.shape
    assert np.median(hu[labels == 0]) < -500 or np.median(hu) < 100  # air or soft tissue around the body
    with pytest.raises(Exception, match="names file"):
        L.read_labelmap(path.parent / "missing.nii.gz")

