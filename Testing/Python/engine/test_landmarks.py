"""The rib and sacrum evidence (engine/landmarks.py) on small synthetic CTs, and what it says of each level.

The phantom: a column of vertebrae along z (bodies: cylinders; arches: rings of bone around a
dark canal), some carrying tube-like ribs that leave the column laterally and run down and
out to 130 mm, some carrying short transverse processes (45 mm), and at the bottom a sacrum:
alae bridging the column to two broad iliac plates.
"""
import numpy as np
import pytest
from VertebraIDLib.engine.anatomy import LabelSet
from VertebraIDLib.engine.centerline import polyline_centerline
from VertebraIDLib.engine.landmarks import (
    Landmarks,
    anchor_in_view,
    contradiction,
    level_log_likelihood,
    spine_landmarks,
)
from VertebraIDLib.engine.volume import Volume

VOX = 2.0
PITCH = 30.0  # mm between vertebrae


def _blob(a, x, y, z, cx, cy, cz, radii, value):
    """Set an axis-aligned ellipsoid (radii mm) around (cx, cy, cz) mm to `value` (only its box)."""
    sl = []
    for c, r, g in zip((cx, cy, cz), radii, (x, y, z)):
        lo = max(int(np.searchsorted(g, c - r)), 0)
        hi = min(int(np.searchsorted(g, c + r)) + 1, len(g))
        sl.append(slice(lo, hi))
    if any(s.stop <= s.start for s in sl):
        return
    gx, gy, gz = np.meshgrid(x[sl[0]], y[sl[1]], z[sl[2]], indexing="ij")
    m = ((gx - cx) / radii[0]) ** 2 + ((gy - cy) / radii[1]) ** 2 + ((gz - cz) / radii[2]) ** 2 <= 1
    a[sl[0], sl[1], sl[2]][m] = value


def make_phantom(n_rib=4, n_tp=3, n_sac=2, lateral_fov=160.0, hu_bone=700.0, seed=0):
    rng = np.random.default_rng(seed)
    nx, ny = int(2 * lateral_fov / VOX), 100
    n = n_rib + n_tp + n_sac
    nz = int((n + 2) * PITCH / VOX)
    x = (np.arange(nx) - nx / 2) * VOX
    y = (np.arange(ny) - ny / 2) * VOX
    z = np.arange(nz) * VOX
    X, Y, Z = np.meshgrid(x, y, z, indexing="ij")
    a = np.full(X.shape, -1000.0, np.float32)
    a[(X / 170) ** 2 + (Y / 95) ** 2 < 1] = 40.0  # body outline: soft tissue
    centres = []  # (label kind, z of the body centre), cranial first
    top = z[-1] - PITCH
    for i in range(n):
        zc = top - i * PITCH
        kind = "rib" if i < n_rib else ("tp" if i < n_rib + n_tp else "sac")
        centres.append((kind, zc))
        h = 11.0 if kind != "sac" else PITCH / 2 + 1
        slab = np.abs(Z - zc) < h
        yb = 20.0  # body centre 20 mm in front of the canal (canal at y = 0)
        r_body = np.hypot(X, Y - yb)
        a[slab & (r_body < 15)] = 250.0
        a[slab & (r_body >= 13) & (r_body < 15)] = hu_bone  # cortex
        r_c = np.hypot(X, Y)
        ring = slab & (r_c >= 7) & (r_c < 12) & (Y < 6)
        a[ring] = hu_bone
        a[slab & (np.abs(X) < 3) & (Y < -8) & (Y > -35)] = hu_bone  # spinous process
        if kind in ("rib", "tp"):
            for sign in (-1, 1):
                length = 130.0 if kind == "rib" else 45.0
                # a tube (4 x 6 mm) from the arch outwards; ribs run down and curve forwards
                for s in np.arange(10.0, length, 1.0):
                    if kind == "rib":
                        cz = zc - 0.3 * max(s - 30.0, 0.0)
                        cy = -5.0 - 0.15 * max(s - 10.0, 0.0) + 0.5 * max(s - 70.0, 0.0)
                    else:
                        cz, cy = zc, -3.0
                    _blob(a, x, y, z, sign * s, cy, cz, (1.5, 4.0, 5.0), hu_bone)
        if kind == "sac":
            ala = slab & (np.abs(X) < 55) & (Y > -5) & (Y < 35)
            a[ala] = np.maximum(a[ala], 300.0)
            for sign in (-1, 1):  # iliac plates, tall and broad, beside the alae
                plate = (np.abs(Z - zc) < 0.7 * PITCH) & (sign * X > 50) & (sign * X < 130) & (np.abs(Y - 5 - 0.3 * (sign * X - 50)) < 4)
                a[plate] = hu_bone
    a += rng.normal(0, 15, a.shape).astype(np.float32)
    affine = np.diag([VOX, VOX, VOX, 1.0])
    affine[:3, 3] = [x[0], y[0], z[0]]
    ct = Volume(a, affine)
    return ct, centres


def line_through(centres, offset=(0.0, 20.0), extend=40.0, step=2.0):
    ztop = centres[0][1] + extend
    zbot = centres[-1][1] - extend
    zs = np.arange(ztop, zbot, -step)
    pts = np.stack([np.full_like(zs, offset[0]), np.full_like(zs, offset[1]), zs], 1)
    return polyline_centerline(pts, step)


@pytest.fixture(scope="module")
def phantom():
    return make_phantom()


@pytest.fixture(scope="module")
def evidence(phantom):
    ct, centres = phantom
    line = line_through(centres)
    return spine_landmarks(ct, line), line, centres


def scores_at(marks: Landmarks, line, positions) -> dict:
    """The landmarks read at RAS positions (nearest centreline sample)."""
    k = np.round(line.project(np.asarray(positions, float))).astype(int)
    return {name: getattr(marks, name)[k] for name in ("rib", "sacrum", "rib_visible", "sacrum_visible")}


def _at(evidence, centres, kinds):
    ev, line, _ = evidence
    pos = np.array([[0.0, 20.0, zc] for kind, zc in centres if kind in kinds])
    return scores_at(ev, line, pos)


def test_shapes_and_ranges(evidence):
    ev, line, _ = evidence
    for key in ("rib", "sacrum", "rib_visible", "sacrum_visible"):
        values = getattr(ev, key)
        assert values.shape == (len(line.points),)
        assert np.all((values >= 0) & (values <= 1))


def test_canal_found(evidence):
    ev, line, _ = evidence
    # the line runs through the bodies, 20 mm in front of the canal
    mid = ev.canal_offset_mm[len(line.points) // 4: 3 * len(line.points) // 4]
    assert np.median(mid) == pytest.approx(20.0, abs=4.0)


def test_ribs_separate_from_transverse_processes(evidence):
    ev, line, centres = evidence
    ribbed = _at(evidence, centres, ("rib",))["rib"]
    tps = _at(evidence, centres, ("tp",))["rib"]
    # the first rib-bearing vertebra sits next to the scan's top edge: allow it to be unseen
    assert np.all(ribbed[1:] > 0.8), ribbed
    assert np.all(tps < 0.2), tps


def test_sacrum(evidence):
    ev, line, centres = evidence
    sac = _at(evidence, centres, ("sac",))["sacrum"]
    above = _at(evidence, centres, ("rib", "tp"))["sacrum"]
    assert np.all(sac > 0.8), sac
    assert np.all(above < 0.2), above
    # no rib evidence at the sacrum although the alae run into the iliac plates
    assert np.all(_at(evidence, centres, ("sac",))["rib"] < 0.2)


def test_offset_centreline(phantom):
    """A centreline 12 mm off the bodies (as a traced one may be) gives the same answer."""
    ct, centres = phantom
    line = line_through(centres, offset=(8.0, 30.0))
    ev = spine_landmarks(ct, line)
    pos = np.array([[0.0, 20.0, zc] for kind, zc in centres])
    p = scores_at(ev, line, pos)["rib"]
    kinds = [k for k, _ in centres]
    assert all(p[i] > 0.8 for i, k in enumerate(kinds) if k == "rib" and i > 0)
    assert all(p[i] < 0.2 for i, k in enumerate(kinds) if k == "tp")


def test_narrow_slab_is_not_evidence():
    """A slab 80 mm wide shows no rib ends: the detector must say 'not seen' (0.5), not 'no rib'."""
    ct, centres = make_phantom(n_rib=3, n_tp=2, n_sac=0, lateral_fov=40.0)
    line = line_through(centres)
    ev = spine_landmarks(ct, line)
    pos = np.array([[0.0, 20.0, zc] for kind, zc in centres])
    sc = scores_at(ev, line, pos)
    assert np.all(sc["rib_visible"] < 0.5)
    assert np.all(np.abs(sc["rib"] - 0.5) < 0.05)


def test_what_the_landmarks_say_of_each_level():
    """Ribs seen: T levels gain, C and L lose; a sacrum seen: S1 gains; nothing seen: no preference."""
    levels = LabelSet.standard(transitional=True).levels
    seen_rib = Landmarks(np.array([0.96]), np.array([0.04]), np.ones(1), np.ones(1), np.zeros(1))
    ll = dict(zip(levels, level_log_likelihood(seen_rib, levels)[0]))
    assert ll["T6"] > 0.5 and ll["T13"] > 0 and ll["L1"] < -1.0 and ll["C7"] < -1.0 and ll["S1"] < -1.0
    sacrum = Landmarks(np.array([0.04]), np.array([0.95]), np.ones(1), np.ones(1), np.zeros(1))
    ll = dict(zip(levels, level_log_likelihood(sacrum, levels)[0]))
    assert ll["S1"] > 0.5 and ll["L4"] < -1.0 and ll["L5"] < ll["S1"] - 1.0
    unseen = Landmarks(np.array([0.5]), np.array([0.5]), np.zeros(1), np.zeros(1), np.zeros(1))
    np.testing.assert_allclose(level_log_likelihood(unseen, levels), 0.0, atol=1e-12)
    assert Landmarks.from_dict(sacrum.to_dict()).sacrum[0] == pytest.approx(0.95)


def _marks(rib, rib_seen, sacrum=None, sacrum_seen=None):
    n = len(rib)
    sacrum = np.full(n, 0.04) if sacrum is None else np.asarray(sacrum, float)
    sacrum_seen = np.ones(n) if sacrum_seen is None else np.asarray(sacrum_seen, float)
    return Landmarks(np.asarray(rib, float), sacrum, np.asarray(rib_seen, float), sacrum_seen, np.zeros(n))


def test_an_anchor_is_the_end_of_the_ribs_or_the_top_of_the_sacrum_seen_in_full():
    ribs_then_none = [0.96] * 10 + [0.5] * 3 + [0.04] * 10  # lowest rib pair in view (4 mm samples)
    assert anchor_in_view(_marks(ribs_then_none, np.ones(23)), 4.0)
    assert anchor_in_view(_marks(ribs_then_none[::-1], np.ones(23)), 4.0)  # the first rib pair
    assert not anchor_in_view(_marks([0.96] * 23, np.ones(23)), 4.0)  # mid-thorax: ribs all along
    hidden = np.r_[np.ones(11), np.zeros(2), np.ones(10)]  # the change itself not seen
    assert not anchor_in_view(_marks(ribs_then_none, hidden), 4.0)
    slow = [0.96] * 5 + list(np.linspace(0.9, 0.1, 40)) + [0.04] * 5  # 0.7 to 0.3 over 80 mm: no single end
    assert not anchor_in_view(_marks(slow, np.ones(50)), 4.0)
    sacrum_top = [0.04] * 10 + [0.96] * 10
    assert anchor_in_view(_marks([0.04] * 20, np.ones(20), sacrum_top), 4.0)
    assert not anchor_in_view(_marks([0.04] * 20, np.ones(20), sacrum_top[::-1]), 4.0)  # not a sacrum's top
    assert not anchor_in_view(_marks([0.5] * 20, np.zeros(20), [0.5] * 20, np.zeros(20)), 4.0)  # nothing seen


def test_the_synthetic_column_shows_its_lowest_rib_and_a_narrow_slab_does_not():
    ct, centres = make_phantom(n_rib=3, n_tp=2, n_sac=0)
    line = line_through(centres)
    assert anchor_in_view(spine_landmarks(ct, line), line.step_mm)
    ct, centres = make_phantom(n_rib=3, n_tp=2, n_sac=0, lateral_fov=40.0)
    line = line_through(centres)
    assert not anchor_in_view(spine_landmarks(ct, line), line.step_mm)


def test_names_that_contradict_the_ribs_or_the_sacrum_seen_say_what_to_check():
    ribs_then_sacrum = _marks([0.96, 0.96, 0.04, 0.04, 0.04], np.ones(5), [0.04, 0.04, 0.04, 0.04, 0.95])
    assert contradiction(ribs_then_sacrum, [0, 1, 2, 3, 4], ["T11", "T12", "L1", "L2", "S1"]) == ""
    shifted_up = contradiction(ribs_then_sacrum, [0, 1, 2, 3, 4], ["T10", "T11", "T12", "L1", "L2"])
    assert shifted_up == "T12 has no rib on the CT: check the lowest rib"
    shifted_down = contradiction(ribs_then_sacrum, [0, 1, 2, 3, 4], ["T12", "L1", "L2", "L3", "L4"])
    assert shifted_down == "L1 carries a rib on the CT: check the lowest rib"
    assert contradiction(ribs_then_sacrum, [2, 3, 4], ["L2", "L3", "L4"]) == "L4 lies on the sacrum on the CT: check the sacrum"
    assert contradiction(ribs_then_sacrum, [2, 3], ["L5", "S1"]) == "S1 is not on the sacrum on the CT: check the sacrum"
    assert contradiction(ribs_then_sacrum, [2], ["T1"]) == ""  # T1's rib is read poorly: no verdict
    unseen = _marks([0.96, 0.04], np.zeros(2))
    assert contradiction(unseen, [0, 1], ["L1", "T12"]) == ""
