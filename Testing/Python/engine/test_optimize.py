"""The optimiser: exactness against brute force, the paper's algorithm, constraints, confidences."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
from VertebraIDLib.engine.anatomy import LabelSet
from VertebraIDLib.engine.optimize import (
    EnergyModel,
    FixedLevel,
    InconsistentFixedPoints,
    build_energy,
    chain_confidence,
    exempt_fixed_gaps,
    gap_fraction_fitting,
    marginals,
    solve_exact,
    solve_order,
    solve_paper,
)
from VertebraIDLib.engine.settings import EngineSettings
from VertebraIDLib.errors import VertebraIDError

SMALL_LABELS = LabelSet(("C3", "C4", "C5", "C6"))


def small_model(seed: int, z: int = 16, gap_min: int = 2, gap_max: int = 6, temperature: float = 2.0,
                prior: str = "paper") -> EnergyModel:
    rng = np.random.default_rng(seed)
    unary = rng.normal(0.0, 6.0, size=(len(SMALL_LABELS), z))
    # 4 mm samples: the shortest gaps (8 mm) fall below half the cervical typical gap and are
    # forbidden, so the brute force also checks the per-level gap bounds.
    settings = EngineSettings(confidence_temperature=temperature, spacing_prior=prior)
    return EnergyModel(unary, SMALL_LABELS, gap_min, gap_max, settings, step_mm=4.0)


def all_chains(model: EnergyModel):
    """Every labelled chain the energy admits (consecutive levels, gaps within bounds)."""
    n, z = model.unary.shape
    yield [], []
    for start in range(n):
        for length in range(1, n - start + 1):
            levels = list(range(start, start + length))
            for first in range(z):
                for gaps in itertools.product(range(model.gap_min, model.gap_max + 1), repeat=length - 1):
                    ks = np.cumsum([first, *gaps])
                    if ks[-1] < z:
                        yield levels, list(ks)


@pytest.mark.parametrize("prior", ["paper", "lognormal"])
@pytest.mark.parametrize("seed", range(6))
def test_exact_finds_the_brute_force_minimum(seed, prior):
    model = small_model(seed, prior=prior)
    energies = [model.chain_energy(lv, ks) if lv else 0.0 for lv, ks in all_chains(model)]
    chain = solve_exact(model)
    assert chain.energy == pytest.approx(min(energies), abs=1e-3)
    if chain.levels:
        assert model.chain_energy(chain.levels, chain.positions) == pytest.approx(chain.energy, abs=1e-3)


@pytest.mark.parametrize("prior", ["paper", "lognormal"])
@pytest.mark.parametrize("seed", range(3))
def test_marginals_match_brute_force_gibbs_distribution(seed, prior):
    model = small_model(seed, z=12, temperature=4.0, prior=prior)
    prob = np.zeros_like(model.unary)
    total = 0.0
    for levels, ks in all_chains(model):
        e = model.chain_energy(levels, ks) if levels else 0.0
        w = np.exp(-e / model.params.confidence_temperature)
        total += w
        for lvl, k in zip(levels, ks):
            prob[lvl, k] += w
    prob /= total
    assert np.allclose(marginals(model), prob, atol=1e-6)


def test_fixed_level_is_obeyed_and_others_follow():
    model = small_model(1)
    free = solve_exact(model)
    pin = FixedLevel(level=2, position=9)
    chain = solve_exact(model, [pin])
    assert 2 in chain.levels and chain.positions[chain.levels.index(2)] == 9
    assert chain.energy >= free.energy - 1e-6
    probs = marginals(model, [pin])
    assert probs[2, 9] == pytest.approx(1.0, abs=1e-6)


def test_contradictory_fixed_levels_are_a_clear_error():
    model = small_model(2)
    with pytest.raises(VertebraIDError):
        solve_exact(model, [FixedLevel(0, 10), FixedLevel(1, 4)])  # C3 below C4: order violated


def _peaks_signal(z: int, centres: dict[int, float], sigma: float = 2.0) -> np.ndarray:
    """26 channels with unit-height Gaussian peaks: channel -> position (samples)."""
    signals = np.zeros((z, 26))
    k = np.arange(z)
    for c, mu in centres.items():
        signals[:, c] += np.exp(-0.5 * ((k - mu) / sigma) ** 2)
    return signals


def test_chain_bridges_a_missing_vertebra_and_stops_at_the_field_of_view():
    # T5..T12 every 12 samples (24 mm at 2 mm), T9 missing entirely.
    centres = {c: 10 + 12 * i for i, c in enumerate(range(11, 19)) if c != 15}
    signals = _peaks_signal(110, centres)
    model = build_energy(signals, LabelSet.standard(), 2.0)
    chain = solve_exact(model)
    names = [model.labels.levels[lvl] for lvl in chain.levels]
    assert names == [f"T{i}" for i in range(5, 13)]
    t9 = chain.positions[names.index("T9")]
    assert abs(t9 - (10 + 12 * 4)) <= 2


@pytest.mark.parametrize("seed", range(20))
def test_exact_is_never_worse_than_the_papers_algorithm(seed):
    rng = np.random.default_rng(seed)
    first = int(rng.integers(0, 18))
    centres = {c: 8 + 13 * i + rng.normal(0, 1.5) for i, c in enumerate(range(first, min(26, first + 8)))}
    signals = _peaks_signal(120, centres) * rng.uniform(0.3, 1.0, size=26)
    signals += rng.normal(0, 0.05, size=signals.shape)
    # label confusion: a channel also fires one vertebra away
    c = int(rng.choice(list(centres)))
    signals[:, c] += 0.8 * _peaks_signal(120, {c: centres[c] + 13})[:, c]
    model = build_energy(signals, LabelSet.standard(), 2.0)
    combined = signals.sum(axis=1)
    exact, paper = solve_exact(model), solve_paper(model, combined)
    assert exact.energy <= paper.energy + 1e-6
    assert solve_order(model, combined).levels is not None


def test_the_papers_algorithm_recovers_from_a_spurious_maximum_that_breaks_the_gap_bounds():
    # L1..S1 every 18 samples (36 mm), and a spurious maximum of Q̂ 7 samples below L3: the
    # initial chain has a 14 mm gap, which no lumbar level allows. Algorithm 1 searches without the
    # bounds (as the paper does) and still names the lumbar spine; its energy is the bounded one.
    centres = {c: 10 + 18 * i for i, c in enumerate(range(19, 25))}
    signals = _peaks_signal(120, centres)
    combined = signals.sum(axis=1)
    combined += 0.6 * np.exp(-0.5 * ((np.arange(120) - (centres[21] + 7)) / 2.0) ** 2)
    model = build_energy(signals, LabelSet.standard(), 2.0, EngineSettings(spacing_prior="paper", evidence_floor=0.1))
    paper, order = solve_paper(model, combined), solve_order(model, combined)
    assert len(paper.levels) >= 5, "Algorithm 1 stopped at its infeasible start"
    names = [model.labels.levels[lvl] for lvl in paper.levels]
    assert {"L1", "L2", "L5"} <= set(names)
    assert paper.energy == pytest.approx(model.chain_energy(paper.levels, paper.positions))
    assert solve_exact(model).energy <= paper.energy + 1e-6
    assert len(order.levels) == 7  # one label per maximum, whatever the gaps


def test_the_papers_algorithm_returns_its_lowest_state_even_above_zero():
    # Three weak, unevenly spaced maxima: every chain through them costs more (R >= e) than it gains,
    # but Algorithm 1 (which has no empty chain) still returns the best state it visited, not nothing.
    signals = _peaks_signal(120, {10: 20, 11: 40, 12: 90})
    model = build_energy(signals, LabelSet.standard(), 2.0,
                         EngineSettings(spacing_prior="paper", evidence_floor=0.9, evidence_weight=1.0))
    paper = solve_paper(model, signals.sum(axis=1))
    assert paper.levels and paper.energy > 0
    assert solve_exact(model).energy <= 0.0


def test_transitional_level_used_only_when_the_evidence_asks_for_it():
    # Five lumbar-looking peaks after T12 (L1..L5 channels all fire on each): without the
    # transitional option they are L1..L5; with it an L6 needs its own evidence.
    lumbar = list(range(19, 24))
    signals = _peaks_signal(140, {18: 10})
    for i in range(6):
        for c in lumbar:
            signals[:, c] += _peaks_signal(140, {c: 27 + 17 * i})[:, c]
    plain = build_energy(signals, LabelSet.standard(), 2.0)
    names = [plain.labels.levels[lvl] for lvl in solve_exact(plain).levels]
    assert names[:6] == ["T12", "L1", "L2", "L3", "L4", "L5"]
    transitional = build_energy(signals, LabelSet.standard(transitional=True), 2.0)
    names_t = [transitional.labels.levels[lvl] for lvl in solve_exact(transitional).levels]
    assert names_t == ["T12", "L1", "L2", "L3", "L4", "L5", "L6"]


def test_confidence_is_a_probability_and_lower_for_ambiguous_labels():
    clean = _peaks_signal(110, {c: 10 + 12 * i for i, c in enumerate(range(11, 19))})
    model = build_energy(clean, LabelSet.standard(), 2.0)
    chain = solve_exact(model)
    conf = chain_confidence(marginals(model), chain, radius=4)
    assert all(0.0 <= c <= 1.0 for c in conf)
    assert min(conf) > 0.9
    # every thoracic channel fires on every vertebra: the labels are a guess
    ambiguous = np.zeros_like(clean)
    for i in range(8):
        ambiguous[:, 8:19] += _peaks_signal(110, {0: 10 + 12 * i})[:, [0]]
    model_a = build_energy(ambiguous, LabelSet.standard(), 2.0)
    chain_a = solve_exact(model_a)
    conf_a = chain_confidence(marginals(model_a), chain_a, radius=4)
    assert max(conf_a) < 0.6


def test_empty_signals_give_no_vertebrae():
    model = build_energy(np.zeros((50, 26)), LabelSet.standard(), 2.0)
    assert solve_exact(model).levels == []
    assert solve_paper(model, np.zeros(50)).levels == []


def test_two_fixed_consecutive_levels_may_be_closer_than_the_gap_bound():
    # T11 cut by the scan's edge: its visible part's centre lies 12 mm above T12's, below half the
    # typical T11-T12 gap. The user fixed both: their gap is allowed, every other one is not.
    labels = LabelSet.standard()
    t11, t12 = labels.index("T11"), labels.index("T12")
    model = build_energy(_peaks_signal(60, {17: 10, 18: 16}), labels, 2.0)
    fixed = [FixedLevel(t11, 10), FixedLevel(t12, 16)]
    with pytest.raises(InconsistentFixedPoints):
        solve_exact(model, fixed)
    exempt = exempt_fixed_gaps(model, fixed)
    chain = solve_exact(exempt, fixed)
    assert chain.positions[chain.levels.index(t11)] == 10 and chain.positions[chain.levels.index(t12)] == 16
    assert np.isfinite(chain.energy)
    assert marginals(exempt, fixed)[t12, 16] == pytest.approx(1.0, abs=1e-6)
    assert not exempt.gap_allowed()[labels.index("T10"), 6 - exempt.gap_min]  # only the fixed pair is exempt


def test_two_fixed_consecutive_levels_may_be_closer_than_the_hard_gap_limit():
    # C1 fixed beyond the traced centreline's top end lands on its first sample, 8 mm above the
    # fixed C2: below the 10 mm that bounds every gap. The pair is still kept; other gaps are not freed.
    labels = LabelSet.standard()
    c1, c2, c3 = labels.index("C1"), labels.index("C2"), labels.index("C3")
    signal = _peaks_signal(60, {0: 0, 1: 4, 2: 14, 3: 22})
    # fractions alone would allow 2-sample gaps; the paper's R: a log-normal one would also weigh
    # the next gap against the fixed pair's 8 mm
    params = EngineSettings(gap_fraction_min=0.05, spacing_prior="paper")
    model = build_energy(signal, labels, 2.0, params)
    fixed = [FixedLevel(c1, 0), FixedLevel(c2, 4)]
    with pytest.raises(InconsistentFixedPoints):
        solve_exact(model, fixed)
    exempt = exempt_fixed_gaps(model, fixed)
    chain = solve_exact(exempt, fixed)
    assert chain.levels[:3] == [c1, c2, c3] and chain.positions[:3] == [0, 4, 14]
    assert marginals(exempt, fixed)[c2, 4] == pytest.approx(1.0, abs=1e-6)
    allowed = exempt.gap_allowed()
    assert allowed[c1, 4 - exempt.gap_min] and not allowed[c2, 4 - exempt.gap_min]
    assert not allowed[:, : model.gap_min - exempt.gap_min][np.arange(len(labels)) != c1].any()
    assert np.isfinite(exempt.chain_energy([c1, c2, c3], [0, 4, 14]))
    assert not np.isfinite(exempt.chain_energy([c2, c3], [4, 8]))  # 8 mm for C2-C3: still refused
    far = [FixedLevel(c1, 0), FixedLevel(c2, model.gap_max + 1)]  # beyond the 90 mm limit: refused
    with pytest.raises(InconsistentFixedPoints):
        solve_exact(exempt_fixed_gaps(build_energy(_peaks_signal(60, {}), labels, 2.0, params), far), far)


def test_the_gap_bound_is_lowered_just_enough_for_fixed_points():
    labels = LabelSet.standard()
    t5, t7 = labels.index("T5"), labels.index("T7")
    fixed = [FixedLevel(t5, 10), FixedLevel(t7, 30)]  # 40 mm for two gaps of ~23 mm each: ~0.8 of typical
    params = EngineSettings(gap_fraction_min=0.95)
    model = build_energy(_peaks_signal(60, {11: 10, 12: 20, 13: 30}), labels, 2.0, params)
    with pytest.raises(InconsistentFixedPoints):
        solve_exact(model, fixed)
    relaxed = gap_fraction_fitting(fixed, labels, 2.0, params.gap_fraction_min)
    assert relaxed is not None and 0.5 < relaxed < 0.95
    chain = solve_exact(build_energy(_peaks_signal(60, {11: 10, 12: 20, 13: 30}), labels, 2.0,
                                     EngineSettings(gap_fraction_min=relaxed)), fixed)
    assert [labels.levels[lvl] for lvl in chain.levels] == ["T5", "T6", "T7"] and chain.positions[1] == 20
    assert gap_fraction_fitting(fixed, labels, 2.0, 0.5) is None  # nothing to lower: the bound already fits


def test_the_lognormal_prior_makes_packing_two_labels_onto_one_body_cost():
    """Evidence peaks 20 mm apart with one extra peak in between: the paper's R barely minds a
    10 mm gap, the likelihood prior does (in nats times the temperature)."""
    labels = LabelSet(("T4", "T5", "T6", "T7", "T8"))
    z = 60
    signals = np.zeros((z, 26))
    for i, name in enumerate(labels.levels):
        signals[8 + 10 * i, labels.channel(name)] = 1.0  # every 20 mm at 2 mm samples
    signals[14, labels.channel("T5")] = 1.5  # a stronger T5 blob 12 mm below T4
    model = build_energy(signals, labels, 2.0, EngineSettings(evidence_weight=20.0, confidence_temperature=2.0,
                                                              spacing_prior="paper"))
    packed = model.chain_energy([0, 1, 2], [8, 14, 28])
    even = model.chain_energy([0, 1, 2], [8, 18, 28])
    lognormal = build_energy(signals, labels, 2.0, EngineSettings(evidence_weight=20.0, confidence_temperature=2.0,
                                                                    spacing_prior="lognormal"))
    assert packed < even  # the paper's R: packing wins on evidence
    assert lognormal.chain_energy([0, 1, 2], [8, 14, 28]) > lognormal.chain_energy([0, 1, 2], [8, 18, 28])
    assert [int(k) for k in solve_exact(lognormal).positions] == [8, 18, 28, 38, 48]

