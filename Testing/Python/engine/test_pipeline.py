"""The whole engine on simulated activation maps: partial fields of view, orientations, methods."""
from __future__ import annotations

import numpy as np
import pytest
from VertebraIDLib.engine.anatomy import LEVELS_26
from VertebraIDLib.engine.corrections import Constraint
from VertebraIDLib.engine.evidence import Evidence
from VertebraIDLib.engine.landmarks import Landmarks
from VertebraIDLib.engine.optimize import Chain
from VertebraIDLib.engine.pipeline import (
    UNANCHORED_REASON,
    _refined_axis,
    locate,
    prepare,
    solve,
)
from VertebraIDLib.engine.progress import Cancelled
from VertebraIDLib.engine.settings import EngineSettings
from VertebraIDLib.engine.volume import Volume
from VertebraIDLib.errors import VertebraIDError
from VertebraIDLib.evaluation.metrics import evaluate_case
from VertebraIDLib.synthetic.simulate import simulate_case


@pytest.mark.parametrize("seed,levels", [(1, ("C1", "S2")), (2, ("C3", "T6")), (3, ("T9", "S2")), (4, ("L1", "L5"))])
def test_clean_maps_are_labelled_exactly_whatever_field_of_view(seed, levels):
    case = simulate_case(seed, spacing_mm=3.0, difficulty="clean", levels=levels)
    result = locate(case.heatmaps)
    evaluation = evaluate_case(result.vertebrae, case.truth)
    assert evaluation.all_correct
    assert [v.label for v in result.vertebrae] == [v.label for v in case.truth]
    errors = [np.linalg.norm(p.position - t.position) for p, t in zip(result.vertebrae, case.truth)]
    assert max(errors) < 4.0


@pytest.mark.slow
def test_typical_network_failures_are_repaired_better_than_argmax():
    found = {"exact": 0, "base": 0}
    total = 0
    for seed in range(10):
        case = simulate_case(100 + seed, spacing_mm=3.0, difficulty="typical")
        prepared = prepare(case.heatmaps)
        for method in found:
            found[method] += evaluate_case(solve(prepared, EngineSettings(method=method)).vertebrae, case.truth).num_identified
        total += len(case.truth)
    assert found["exact"] / total > 0.85
    assert found["exact"] > found["base"]


def test_all_methods_run_and_exact_has_the_lowest_energy():
    case = simulate_case(11, spacing_mm=3.0, difficulty="typical")
    prepared = prepare(case.heatmaps)
    energies = {}
    for method in ("exact", "paper", "order", "rect", "base"):
        for weighted in (True, False):
            result = solve(prepared, EngineSettings(method=method, weighted=weighted))
            assert all(np.isfinite(v.position).all() for v in result.vertebrae)
            energies[method, weighted] = result.energy
    for weighted in (True, False):
        slack = 1e-6 * abs(energies["paper", weighted])
        assert energies["exact", weighted] <= energies["paper", weighted] + slack
        assert energies["exact", weighted] <= energies["order", weighted] + slack


def test_all_zero_maps_give_zero_vertebrae():
    result = locate(Volume(np.zeros((20, 20, 30, 26), np.float32), np.diag([2.0, 2.0, 2.0, 1.0])))
    assert result.vertebrae == [] and result.centerline is None


def test_bad_maps_are_refused_with_one_sentence():
    with pytest.raises(VertebraIDError, match="26 channels"):
        locate(Volume(np.zeros((5, 5, 5, 3), np.float32), np.eye(4)))
    with pytest.raises(VertebraIDError, match="4-D"):
        locate(Volume(np.zeros((5, 5, 5), np.float32), np.eye(4)))
    bad = np.zeros((5, 5, 5, 26), np.float32)
    bad[1, 1, 1, 1] = np.nan
    with pytest.raises(VertebraIDError, match="NaN"):
        locate(Volume(bad, np.eye(4)))


def test_a_users_fixed_label_relabels_the_whole_chain():
    # A result shifted by one on purpose: every vertebra also fires, more strongly, in the channel
    # of the level above it, so the optimiser names each one level too high. The user fixes one
    # vertebra's label; all the others must follow.
    case = simulate_case(21, spacing_mm=3.0, difficulty="clean", levels=("T3", "T11"))
    own = case.heatmaps.array
    shifted = 0.85 * own
    shifted[..., :-1] = np.maximum(shifted[..., :-1], own[..., 1:])
    maps = Volume(shifted, case.heatmaps.affine)
    prepared = prepare(maps)
    first = solve(prepared)
    assert evaluate_case(first.vertebrae, case.truth).num_identified == 0
    t7 = next(v for v in case.truth if v.label == "T7")
    fixed = solve(prepared, constraints=[Constraint("T7", t7.position)])
    evaluation = evaluate_case(fixed.vertebrae, case.truth)
    assert evaluation.all_correct
    assert next(v for v in fixed.vertebrae if v.label == "T7").locked


def test_fixed_points_no_chain_can_hold_are_refused_with_the_reason():
    # Swapped names (T8 above T6) and neighbours put 5 vertebrae apart: one sentence naming them.
    case = simulate_case(21, spacing_mm=3.0, difficulty="clean", levels=("T3", "T11"))
    prepared = prepare(case.heatmaps)
    at = {v.label: v.position for v in case.truth}
    with pytest.raises(VertebraIDError, match="T8 lies at or above T6 along the traced spine"):
        solve(prepared, constraints=[Constraint("T6", at["T8"]), Constraint("T8", at["T6"])])
    with pytest.raises(VertebraIDError, match=r"T4 and T5 lie \d+ mm apart .* more than 1 gap"):
        solve(prepared, constraints=[Constraint("T4", at["T4"]), Constraint("T5", at["T10"])])


def test_progress_can_cancel():
    case = simulate_case(5, spacing_mm=4.0, difficulty="clean", levels=("L1", "S2"))
    seen = []

    def progress(fraction, message):
        seen.append(fraction)
        return fraction >= 0.4

    with pytest.raises(Cancelled):
        locate(case.heatmaps, progress=progress)
    assert seen and max(seen) < 0.7


@pytest.mark.parametrize("setting", [{"centreline_threshold": 0.0}, {"centreline_threshold": 1.2}, {"evidence_weight": -1.0},
                                     {"evidence_floor": float("nan")}, {"confidence_temperature": 0.0},
                                     {"evidence_weight": True}, {"gap_fraction_min": 0.0}, {"gap_fraction_min": 1.5},
                                     {"gap_fraction_min": "0.7"}])
def test_out_of_range_optimiser_settings_are_refused(setting):
    with pytest.raises(VertebraIDError):
        EngineSettings(**setting)


def test_a_higher_temperature_makes_confidences_less_certain_not_the_labels_different():
    prepared = prepare(simulate_case(11, spacing_mm=3.0, difficulty="hard").heatmaps, EngineSettings())
    sharp = solve(prepared, EngineSettings(confidence_temperature=1.0)).vertebrae
    soft = solve(prepared, EngineSettings(confidence_temperature=50.0)).vertebrae
    assert [v.label for v in sharp] == [v.label for v in soft] and sharp
    assert np.mean([v.confidence for v in soft]) < np.mean([v.confidence for v in sharp])


def test_fixed_points_closer_than_a_models_tighter_gap_bound_still_relabel():
    # A model may forbid gaps below 0.9 of the typical one (gap_fraction_min); the user's points
    # win: T5 and T7 fixed closer than that still give T5, T6, T7, with the user's positions kept.
    case = simulate_case(4, spacing_mm=3.0, difficulty="clean", levels=("T2", "T10"))
    truth = {v.label: np.asarray(v.position, float) for v in case.truth}
    t7 = truth["T5"] + 0.75 * (truth["T7"] - truth["T5"])
    options = EngineSettings(gap_fraction_min=0.9)
    prepared = prepare(case.heatmaps, options)
    result = solve(prepared, options, constraints=[Constraint("T5", truth["T5"]), Constraint("T7", t7)])
    names = [v.label for v in result.vertebrae]
    assert {"T5", "T6", "T7"} <= set(names)
    assert [LEVELS_26.index(n) for n in names] == sorted(LEVELS_26.index(n) for n in names)
    assert np.allclose(next(v for v in result.vertebrae if v.label == "T7").position, t7)


def test_fixed_points_past_the_end_of_the_maps_extend_the_traced_spine():
    # The maps stop at T11 (a detector that missed the rest); the user places T12 and L1 below it.
    case = simulate_case(21, spacing_mm=3.0, difficulty="clean", levels=("T3", "T11"))
    prepared = prepare(case.heatmaps)
    at = {v.label: np.asarray(v.position, float) for v in case.truth}
    step = at["T11"] - at["T10"]
    below = {"T12": at["T11"] + step, "L1": at["T11"] + 2.1 * step}
    result = solve(prepared, constraints=[Constraint(name, position) for name, position in below.items()])
    named = {v.label: v for v in result.vertebrae}
    for name, position in below.items():
        assert named[name].locked
        np.testing.assert_allclose(named[name].position, position)
    assert evaluate_case(result.vertebrae, case.truth).all_correct
    assert len(result.centerline) > len(prepared.centerline)
    assert len(result.rectified.signals) == len(result.centerline)


def test_a_read_ct_that_gives_nothing_to_count_from_or_contradicts_the_names_flags_every_label():
    # Clean maps of T3..T11 (confident labels), with the CT's anatomy read along the spine: ribs all
    # along (mid-thorax, neither rib end in view) flags every label; the lowest rib pair in view where
    # the names put T12 does not, one on T8 does (a shifted chain); a user's fixed point anchors the chain.
    case = simulate_case(21, spacing_mm=3.0, difficulty="clean", levels=("T3", "T11"))
    at = {v.label: v.position for v in case.truth}

    def ribs(last_rib_bearing):
        def read(line):
            n = len(line)
            rib = np.full(n, 0.96)
            if last_rib_bearing:
                rib[int(np.ceil(line.project(at[last_rib_bearing])[0] + 10.0 / line.step_mm)):] = 0.04
            return Landmarks(rib, np.full(n, 0.04), np.ones(n), np.ones(n), np.zeros(n))
        return read

    assert max(v.confidence for v in locate(case.heatmaps).vertebrae) > 0.9
    unanchored = locate(Evidence(case.heatmaps, anatomy=ribs(None)))
    assert unanchored.vertebrae
    assert all(v.needs_check and v.extra["flagged"] == UNANCHORED_REASON for v in unanchored.vertebrae)
    anchored = locate(Evidence(case.heatmaps, anatomy=ribs("T11")))
    assert anchored.vertebrae and not any("flagged" in v.extra for v in anchored.vertebrae)
    contradicted = locate(Evidence(case.heatmaps, anatomy=ribs("T8")))
    assert all(v.needs_check and "check the lowest rib" in v.extra["flagged"] for v in contradicted.vertebrae)
    fixed = locate(Evidence(case.heatmaps, anatomy=ribs(None)), constraints=[Constraint("T7", at["T7"])])
    assert not any("flagged" in v.extra for v in fixed.vertebrae)


def test_a_fixed_point_far_from_the_spine_is_refused_with_one_sentence():
    case = simulate_case(4, spacing_mm=3.0, difficulty="clean", levels=("T2", "T10"))
    t5 = next(v for v in case.truth if v.label == "T5").position
    prepared = prepare(case.heatmaps)
    assert solve(prepared, constraints=[Constraint("T5", t5 + [20.0, 0.0, 0.0])]).vertebrae  # near: used
    with pytest.raises(VertebraIDError, match="from the traced spine"):
        solve(prepared, constraints=[Constraint("T5", t5 + [0.0, 200.0, 0.0])])


def test_engine_settings_have_one_name_each_and_read_a_models_table():
    """A model's "engine" table uses the settings' own names; files of earlier versions read too."""
    meta = {"sigma_mm": 6.0, "engine": {"centreline_threshold": 0.05, "evidence_weight": 5120.0, "evidence_floor": 0.1,
                                        "gap_fraction_min": 0.5, "confidence_temperature": 2048.0, "tuned_on": "x"}}
    settings = EngineSettings(method="paper").with_metadata(meta)
    assert (settings.method, settings.sigma_mm, settings.centreline_threshold, settings.evidence_weight,
            settings.confidence_temperature) == ("paper", 6.0, 0.05, 5120.0, 2048.0)
    assert EngineSettings.from_dict(settings.to_dict()) == settings
    legacy = EngineSettings.from_dict({"threshold": 0.2, "floor": 0.0, "temperature": 8.0, "gone": 1})
    assert (legacy.centreline_threshold, legacy.evidence_floor, legacy.confidence_temperature) == (0.2, 0.0, 8.0)
    with pytest.raises(VertebraIDError, match="Unknown engine setting 'alpha'"):
        settings.updated(alpha=1.0)
    with pytest.raises(VertebraIDError):
        EngineSettings().with_metadata({"engine": {"evidence_weight": -5.0}})


def test_a_vertebra_the_maps_missed_is_placed_between_its_neighbours_not_on_a_stray_blob():
    case = simulate_case(5, spacing_mm=2.0, difficulty="clean", levels=("T6", "S1"))
    maps = case.heatmaps
    array = maps.array.copy()
    missed = next(v for v in case.truth if v.label == "L1")
    array[..., LEVELS_26.index("L1")] = 0.0
    # a faint stray blob (a rib head, a screw) 14 mm beside the missed body, too faint to bend the centreline
    above, below = (v.position for v in case.truth if v.label in ("T12", "L2"))
    along = (below - above) / np.linalg.norm(below - above)
    aside = np.cross(along, [0.0, 1.0, 0.0])
    stray = missed.position + 14.0 * aside / np.linalg.norm(aside)
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in maps.shape3], indexing="ij"), axis=-1).reshape(-1, 3)
    distance = np.linalg.norm(maps.voxel_to_world(ijk) - stray, axis=1).reshape(maps.shape3)
    array[..., LEVELS_26.index("T9")] += 0.15 * np.exp(-0.5 * (distance / 4.0) ** 2).astype(np.float32)
    result = locate(Volume(array, maps.affine))
    placed = {v.label: v.position for v in result.vertebrae}
    assert [v.label for v in result.vertebrae] == case.labels
    assert np.linalg.norm(placed["L1"] - missed.position) < 8.0


def test_refining_positions_to_the_peaks_never_draws_two_labels_closer_than_the_optimiser_allowed():
    labels = EngineSettings().labels
    # one broad blob between two labels the optimiser put 4 samples (16 mm) apart, at its bound for T3-T4
    signal = np.exp(-0.5 * ((np.arange(30) - 10.0) / 2.5) ** 2)
    chain = Chain([labels.index("T3"), labels.index("T4")], [8, 12], 0.0)
    assert np.ptp(_refined_axis(signal, chain, labels, 4.0, None)) < 3.0  # both drawn onto the blob
    axis = _refined_axis(signal, chain, labels, 4.0, 0.7)
    assert list(axis) == [8.0, 12.0]
    # a lone label still moves onto its peak
    single = Chain([labels.index("T3")], [9], 0.0)
    assert abs(_refined_axis(signal, single, labels, 4.0, 0.7)[0] - 10.0) < 0.6
