"""The heatmap simulator: reproducible, anatomically plausible, any orientation, and it fails as promised."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import REPO
from VertebraIDLib.engine.anatomy import LEVELS_26, NUM_CHANNELS
from VertebraIDLib.engine.points import render_gaussians
from VertebraIDLib.engine.volume import Volume
from VertebraIDLib.errors import VertebraIDError
from VertebraIDLib.synthetic.simulate import DIFFICULTIES, LEVEL_GAPS_MM, simulate_case


def _value_at(volume: Volume, ras, channel: int) -> float | None:
    ijk = np.rint(volume.world_to_voxel(ras)).astype(int)
    if np.any(ijk < 0) or np.any(ijk >= np.array(volume.shape3)):
        return None
    return float(volume.array[tuple(ijk) + (channel,)])


def test_same_seed_same_case_other_seed_other_case():
    a = simulate_case(5, difficulty="hard", spacing_mm=3.0)
    b = simulate_case(5, difficulty="hard", spacing_mm=3.0)
    c = simulate_case(6, difficulty="hard", spacing_mm=3.0)
    assert np.array_equal(a.heatmaps.array, b.heatmaps.array)
    assert np.array_equal(a.heatmaps.affine, b.heatmaps.affine)
    assert a.labels == b.labels and a.meta == b.meta
    assert all(np.array_equal(x.position, y.position) for x, y in zip(a.truth, b.truth))
    assert a.heatmaps.array.shape != c.heatmaps.array.shape or not np.array_equal(a.heatmaps.array, c.heatmaps.array)


def test_anatomy_does_not_depend_on_spacing():
    a = simulate_case(3, difficulty="typical", spacing_mm=2.0, levels=("T1", "L5"))
    b = simulate_case(3, difficulty="typical", spacing_mm=(1.5, 3.0, 2.5), levels=("T1", "L5"))
    assert a.labels == b.labels
    np.testing.assert_allclose([v.position for v in a.truth], [v.position for v in b.truth])
    np.testing.assert_allclose(b.heatmaps.spacing, [1.5, 3.0, 2.5])
    assert b.heatmaps.array.dtype == np.float32 and b.heatmaps.array.shape[3] == NUM_CHANNELS


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_clean_case_channel_maxima_sit_on_the_truth(seed):
    spacing = 2.0
    case = simulate_case(seed, difficulty="clean", spacing_mm=spacing)
    maps = case.heatmaps
    blob_centres = np.array(case.meta["blob_centres_ras"])
    assert len(case.truth) >= 3
    for vertebra in case.truth:
        c = vertebra.index - 1
        flat = int(np.argmax(maps.array[..., c]))
        peak_ras = maps.voxel_to_world(np.array(np.unravel_index(flat, maps.shape3)))
        offset = np.linalg.norm(blob_centres[c] - vertebra.position)  # the simulated blob displacement
        # within one voxel diagonal of the blob centre, itself a small offset from the truth
        assert np.linalg.norm(peak_ras - vertebra.position) <= np.sqrt(3) * spacing + offset
        assert offset < 3.0
        assert maps.array[..., c].max() > 0.5


@pytest.mark.slow
def test_spacing_between_levels_is_realistic():
    for seed in range(6):
        case = simulate_case(seed, difficulty="clean", levels=("C1", "S2"), spacing_mm=3.0)
        assert case.labels == LEVELS_26
        positions = np.array([v.position for v in case.truth])
        gaps = np.linalg.norm(np.diff(positions, axis=0), axis=1)
        assert np.all((gaps[:6] > 11) & (gaps[:6] < 21)), gaps[:6]  # cervical
        assert np.all((gaps[7:18] > 15) & (gaps[7:18] < 33)), gaps[7:18]  # thoracic
        assert gaps[17] > gaps[7]  # thoracic gaps grow
        assert np.all((gaps[19:23] > 27) & (gaps[19:23] < 45)), gaps[19:23]  # lumbar
        assert 20 < gaps[24] < 36  # S1-S2
        # sagittal curvature: the centres do not lie on a straight line
        chord = positions[-1] - positions[0]
        chord /= np.linalg.norm(chord)
        rel = positions - positions[0]
        off_line = np.linalg.norm(rel - np.outer(rel @ chord, chord), axis=1)
        assert off_line.max() > 15


def test_orientation_varies_and_oblique_is_oblique():
    superior_axes, signs = set(), set()
    for seed in range(12):
        case = simulate_case(seed, difficulty="clean", spacing_mm=4.0)
        axis, sign = case.heatmaps.axis_most_along([0, 0, 1])
        superior_axes.add(axis)
        signs.add(sign)
        direction = case.heatmaps.affine[:3, :3] / case.heatmaps.spacing
        assert np.abs(direction).max(axis=0).min() < 0.9999  # rotated off the scanner axes
    assert len(superior_axes) >= 2 and signs == {-1.0, 1.0}

    straight = simulate_case(4, difficulty="clean", spacing_mm=4.0, oblique=False)
    direction = straight.heatmaps.affine[:3, :3] / straight.heatmaps.spacing
    np.testing.assert_allclose(np.sort(np.abs(direction), axis=None), [0] * 6 + [1] * 3, atol=1e-12)


@pytest.mark.parametrize("levels", [("C1", "C7"), ("C3", "T2"), ("T3", "L1"), ("T6", "S2"), ("L2", "L4"), ("C1", "S2")])
def test_requested_field_of_view_is_exactly_visible(levels):
    first, last = LEVELS_26.index(levels[0]), LEVELS_26.index(levels[1])
    for seed in range(4):
        case = simulate_case(seed, difficulty="hard", levels=levels, spacing_mm=3.0)
        assert case.labels == LEVELS_26[first : last + 1]
        maps = case.heatmaps
        for v in case.truth:
            ijk = maps.world_to_voxel(v.position)
            assert np.all(ijk >= -1e-6) and np.all(ijk <= np.array(maps.shape3) - 1 + 1e-6)
        outside = [c for i, c in enumerate(case.meta["all_centres_ras"]) if not first <= i <= last]
        for ras in outside:
            ijk = maps.world_to_voxel(np.array(ras))
            assert np.any(ijk < -1e-6) or np.any(ijk > np.array(maps.shape3) - 1 + 1e-6)


def test_random_fields_of_view_are_contiguous_and_varied():
    ranges = set()
    for seed in range(20):
        case = simulate_case(seed, difficulty="typical", spacing_mm=4.0, partial_fov=True)
        idx = [v.index for v in case.truth]
        assert len(idx) >= 3 and idx == list(range(idx[0], idx[-1] + 1))
        assert not case.meta["whole_spine"]
        ranges.add((case.labels[0], case.labels[-1]))
    assert len(ranges) >= 8
    whole = simulate_case(0, difficulty="typical", spacing_mm=4.0, partial_fov=False)
    assert whole.labels == LEVELS_26


@pytest.mark.slow
def test_hard_cases_contain_the_promised_failure_modes():
    kinds: dict[str, int] = {}
    checked = {"confusion": 0, "false_positive": 0, "missing": 0}
    scoliotic = straight = fractured = 0
    for seed in range(10):
        case = simulate_case(seed, difficulty="hard", levels=("C1", "S2"), spacing_mm=3.0)
        maps = case.heatmaps
        centres = np.array(case.meta["blob_centres_ras"])
        events = case.meta["events"]
        for e in events:
            kinds[e["kind"]] = kinds.get(e["kind"], 0) + 1
        dimmed = {e["label"] for e in events if e["kind"] in ("missing", "weak", "edge_weak")}
        dimmed |= {lab for e in events if e["kind"] == "metal" for lab in e["levels"]}
        for e in events:
            if e["kind"] == "confusion":
                for label in e["levels"]:
                    v = LEVELS_26.index(label)
                    if label in dimmed:
                        continue
                    # the shifted channel fires on this vertebra more than its own channel does
                    assert _value_at(maps, centres[v], v + e["shift"]) > _value_at(maps, centres[v], v)
                    checked["confusion"] += 1
            elif e["kind"] == "false_positive":
                value = _value_at(maps, np.array(e["position"]), e["channels"][0])
                if value is not None:
                    assert value >= 0.5 * e["weight"]
                    checked["false_positive"] += 1
            elif e["kind"] == "missing":
                v = LEVELS_26.index(e["label"])
                assert maps.array[..., v].max() > 0 and _value_at(maps, centres[v], v) < 0.2
                checked["missing"] += 1
        # off-plane centres exactly when there is a scoliosis (sagittal curves lie in one plane)
        positions = np.array([v.position for v in case.truth])
        residual = np.linalg.svd(positions - positions.mean(0), compute_uv=False)[2] / np.sqrt(len(positions))
        if case.meta["scoliosis"]:
            scoliotic += 1
            assert residual > 2.0
        else:
            straight += 1
            assert residual < 1e-6
        for f in case.meta["fractures"]:
            fractured += 1
            v = LEVELS_26.index(f["label"])
            gaps = np.linalg.norm(np.diff(positions[v - 1 : v + 2], axis=0), axis=1)
            nominal = np.array(case.meta["gaps_mm"])  # the shortened gaps that were simulated
            assert np.all(gaps < LEVEL_GAPS_MM[v - 1 : v + 1] * case.meta["scale"] * 0.93)
            assert np.allclose(gaps, nominal[v - 1 : v + 1], rtol=0.02)
        assert case.meta["noise_amplitude"] >= DIFFICULTIES["hard"].noise[0]
    for kind in ("confusion", "bleed", "missing", "weak", "false_positive", "metal"):
        assert kinds.get(kind, 0) > 0, f"no '{kind}' in 10 hard cases: {kinds}"
    assert all(n > 0 for n in checked.values()), checked
    assert scoliotic > 0 and straight > 0 and fractured > 0


def test_clean_cases_have_no_failures():
    for seed in range(5):
        case = simulate_case(seed, difficulty="clean", spacing_mm=4.0)
        assert case.meta["events"] == [] and case.meta["scoliosis"] is None and case.meta["fractures"] == []
        # every channel's own blob is its strongest activation
        for v in case.truth:
            assert case.heatmaps.array[..., v.index - 1].max() > 0.5


def test_render_gaussians_on_an_oblique_anisotropic_grid():
    rotation = np.linalg.qr(np.random.default_rng(0).standard_normal((3, 3)))[0]
    affine = np.eye(4)
    affine[:3, :3] = rotation * np.array([1.0, 2.0, 1.5])
    affine[:3, 3] = [10.0, -20.0, 5.0]
    grid = Volume(np.zeros((40, 30, 40), np.float32), affine)
    centre_ijk = np.array([20.0, 15.0, 20.0])
    centre = grid.voxel_to_world(centre_ijk)
    weights = np.zeros((1, 3), np.float32)
    weights[0, 1] = 0.8
    out = render_gaussians(centre[None], weights, grid, 4.0)
    assert out.shape == (40, 30, 40, 3) and out.dtype == np.float32
    assert out[..., 0].max() == 0 and out[..., 2].max() == 0
    assert out[20, 15, 20, 1] == pytest.approx(0.8)
    probe = np.array([23, 14, 22])
    d = np.linalg.norm(grid.voxel_to_world(probe) - centre)
    assert out[tuple(probe) + (1,)] == pytest.approx(0.8 * np.exp(-(d**2) / 32.0), rel=1e-5)
    assert out[0, 0, 0, 1] == 0  # beyond 4 sigma: untouched
    # two overlapping blobs: max keeps the peak, sum adds
    two = np.array([centre, centre])
    both = np.array([[0, 0.5, 0], [0, 0.5, 0]], np.float32)
    assert render_gaussians(two, both, grid, 4.0)[20, 15, 20, 1] == pytest.approx(0.5)
    assert render_gaussians(two, both, grid, 4.0, combine="sum")[20, 15, 20, 1] == pytest.approx(1.0)
    # a blob centred outside the grid leaves only its tail
    outside = grid.voxel_to_world(np.array([-3.0, 15.0, 20.0]))
    tail = render_gaussians(outside[None], weights, grid, 4.0)
    assert 0 < tail.max() < 0.8


def test_user_errors_are_one_sentence():
    with pytest.raises(VertebraIDError):
        simulate_case(0, difficulty="impossible")
    with pytest.raises(VertebraIDError):
        simulate_case(0, levels=("L1", "T1"))
    with pytest.raises(VertebraIDError):
        simulate_case(0, levels=("T13", "L1"))
    with pytest.raises(VertebraIDError):
        simulate_case(0, spacing_mm=0)


def test_bundled_example_matches_the_simulator():

    from VertebraIDLib.io.formats import read_vertebrae_json
    from VertebraIDLib.io.images import read_nifti

    examples = REPO / "VertebraID" / "Resources" / "Examples"
    maps_path = examples / "example_heatmaps.nii.gz"
    assert maps_path.stat().st_size < 1.5e6
    maps = read_nifti(maps_path)
    truth = read_vertebrae_json(examples / "example_truth.vertebrae.json")
    assert maps.array.shape[3] == NUM_CHANNELS
    np.testing.assert_allclose(maps.spacing, 3.0, rtol=1e-5)
    direction = maps.affine[:3, :3] / maps.spacing
    assert np.abs(direction).max(axis=0).min() < 0.99  # oblique
    # the same case as bench/make_example.py draws (regenerate the files if the simulator changed)
    case = simulate_case(2021, spacing_mm=3.0, difficulty="typical", levels=("T6", "S2"), max_oblique_deg=15.0)
    assert [v.label for v in truth] == case.labels == LEVELS_26[LEVELS_26.index("T6") :]
    np.testing.assert_allclose([v.position for v in truth], [v.position for v in case.truth], atol=1e-3)
    np.testing.assert_allclose(maps.affine, case.heatmaps.affine, atol=1e-5)
    step = case.heatmaps.array.max() / 255
    assert np.abs(maps.array - case.heatmaps.array).max() <= 0.51 * step + 1e-6
