"""The anatomically constrained optimisation of paper §3.3 (Eqs. 4-9) and its baselines.

Energy of a chain of consecutive levels ℓ_0 < ℓ_1 < ... at positions k_0 < k_1 < ... on the
straightened axis (samples, cranial to caudal):

    L = Σ_i U(ℓ_i, k_i) + Σ_{interior i} R(k_i − k_{i−1}, k_{i+1} − k_i),
    U(ℓ, k) = −α λ_ℓ (Q_ℓ(k) − f),        R(a, b) = exp(max(a/b, b/a)).

α and f are the project's choices that the paper leaves open (see METHOD.md): Q is in units
of blob height (rectify.py), α scales it against R, and evidence below the floor f costs
instead of rewarding, so chains do not grow into empty stretches or noise. Gaps between
consecutive centres are bounded to [gap_min_mm, gap_max_mm]: a hard anatomical limit that
every method shares, so energies are comparable. The gap between two consecutive levels that a
user fixed is exempt from the bounds below 90 mm (`exempt_fixed_gaps`): the user's points win.

Solvers:
- `solve_exact`: dynamic programming over (level, position, previous gap): the global minimum.
- `solve_paper`: Algorithm 1 (local maxima of Q̂, offset, hill-climbing fine-tune, expansion).
- `solve_order`: local maxima of Q̂ with the offset step only (Table 2's base+rect+order).

How we read Algorithm 1 (checked against Table 2's ordering in `bench/ablation.py`):
- initial centres: the local maxima of Q̂ that rise above the floor by the floor (a prominence
  test; the paper names none, and without one every ripple of a noisy Q̂ starts a vertebra);
- its search space is v_l in [1, 26], k_i in [0, L]: no gap bounds. Ours are a project choice; when
  Algorithm 1 searched inside them, one spurious or missed maximum made every offset infinite
  and it stopped where it started (Table 2 showed paper < base). It now searches without them
  and its chain is scored under the bounded energy, so exact and paper compare on one energy;
- it returns the lowest state it visited whatever its sign (the paper has no empty chain; we
  had returned nothing when every state cost more than it gained);
- the loop stops when an offset step no longer lowers the energy.
- `marginals`: sum-product on the same lattice; per-vertebra confidence.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
from scipy.special import logsumexp

from ..errors import VertebraIDError
from .anatomy import LabelSet, expected_gap_ratio, typical_gap_mm
from .settings import EngineSettings

INF = np.inf


@dataclass
class Chain:
    """A labelled chain: level indices (into LabelSet.levels) and sample positions."""

    levels: list[int]
    positions: list[int]
    energy: float

    def __len__(self) -> int:
        return len(self.levels)


@dataclass
class EnergyModel:
    """The energy of paper Eqs. 4-5 on one straightened spine: unary costs per (level, sample) and the gap bounds."""

    unary: np.ndarray  # (n_levels, Z): U(ℓ, k)
    labels: LabelSet
    gap_min: int
    gap_max: int
    params: EngineSettings = field(default_factory=EngineSettings)
    step_mm: float = 2.0
    # (level, gap in samples) allowed whatever the gap fractions say: the gap between two
    # consecutive levels the user fixed (a point on a vertebra cut by the scan's edge, say).
    exempt_gaps: frozenset = frozenset()

    @property
    def length(self) -> int:
        return self.unary.shape[1]

    @property
    def gaps(self) -> np.ndarray:
        return np.arange(self.gap_min, self.gap_max + 1)

    def growth(self) -> np.ndarray:
        """Expected (next gap / previous gap) per level; all ones for the paper's R."""
        if not self.params.level_spacing:
            return np.ones(len(self.labels))
        return np.array([expected_gap_ratio(name) for name in self.labels.levels])

    def gap_allowed(self) -> np.ndarray:
        """(n_levels, n_gaps) bool: may level ℓ be followed by the next one at this gap?"""
        g = self.gaps.astype(float) * self.step_mm
        typical = np.array([typical_gap_mm(name) for name in self.labels.levels])
        lo = self.params.gap_fraction_min * typical
        hi = self.params.gap_fraction_max * typical
        absolute_min, absolute_max = gap_index_range(self.params, self.step_mm)
        within = (self.gaps >= absolute_min) & (self.gaps <= absolute_max)  # the range may hold exempt gaps
        allowed = (g[None, :] >= lo[:, None]) & (g[None, :] <= hi[:, None]) & within[None, :]
        for level, gap in self.exempt_gaps:
            if self.gap_min <= gap <= self.gap_max:
                allowed[level, gap - self.gap_min] = True
        return allowed

    def pair_cost(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """R(a, b) of consecutive gaps (a already scaled by the expected growth); inf where a gap is 0.

        "paper": exp(max(a/b, b/a)) (paper Eq. 5). "lognormal": a log-likelihood in nats times
        spacing_weight x α: log(b/a) ~ N(0, spacing_sigma), so a halved gap costs what it should.
        """
        a, b = np.asarray(a, float), np.asarray(b, float)
        with np.errstate(divide="ignore", invalid="ignore"):
            if self.params.spacing_prior == "paper":
                out = np.exp(np.minimum(np.maximum(a / b, b / a), 700))
            else:
                nats = np.log(b / a) ** 2 / (2 * self.params.spacing_sigma ** 2)
                out = self.params.spacing_weight * self.params.evidence_weight * nats
        return np.where((a > 0) & (b > 0), out, INF)

    def spacing_matrix(self, growth: float = 1.0) -> np.ndarray:
        """R(a, b) for every (previous gap a, next gap b), a scaled by the expected growth."""
        return self.pair_cost(self.gaps.astype(float)[:, None] * growth, self.gaps.astype(float)[None, :])

    def gap_cost(self) -> np.ndarray:
        """(n_levels, n_gaps) cost of each gap after each level against the level's typical gap.

        Zero for the paper's prior. "lognormal": log(gap / typical) ~ N(0, gap_sigma) in nats times
        spacing_weight x α (adult spines differ in size by ~+-20 %): packing two labels onto one body
        or stretching one gap over two bodies costs even where the neighbouring gaps agree.
        """
        if self.params.spacing_prior == "paper":
            return np.zeros((len(self.labels), len(self.gaps)))
        typical = np.array([typical_gap_mm(name) for name in self.labels.levels])
        g = self.gaps.astype(float) * self.step_mm
        nats = np.log(g[None, :] / typical[:, None]) ** 2 / (2 * self.params.gap_sigma ** 2)
        return self.params.spacing_weight * self.params.evidence_weight * nats

    def chain_energy(self, levels, positions) -> float:
        """Energy of one chain (inf when a gap is out of bounds)."""
        return float(self.batch_energy(np.asarray(levels), np.asarray(positions)[None, :])[0])

    def batch_energy(self, levels: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Energies of B chains sharing the same levels; positions (B, N) integer samples."""
        positions = np.asarray(positions)
        if positions.shape[1] == 0:
            return np.zeros(len(positions))
        inside = (positions >= 0) & (positions < self.length)
        k = np.clip(positions, 0, self.length - 1)
        energy = self.unary[np.asarray(levels)[None, :], k].sum(axis=1)
        energy = np.where(inside.all(axis=1), energy, INF)
        if positions.shape[1] >= 2:
            gaps = np.diff(positions, axis=1).astype(float)
            bad = ((gaps < self.gap_min) | (gaps > self.gap_max)).any(axis=1)
            allowed = self.gap_allowed()
            upper = np.asarray(levels)[:-1][None, :]
            j = np.clip(gaps.astype(int) - self.gap_min, 0, allowed.shape[1] - 1)
            bad |= ~allowed[upper, j].all(axis=1)
            energy = np.where(bad, INF, energy + self.gap_cost()[upper, j].sum(axis=1))
        if positions.shape[1] >= 3:
            a, b = gaps[:, :-1] * self.growth()[np.asarray(levels)[1:-1]][None, :], gaps[:, 1:]
            energy = energy + self.pair_cost(a, b).sum(axis=1)
        return energy


def build_energy(
    signals: np.ndarray,
    labels: LabelSet,
    step_mm: float,
    params: EngineSettings = EngineSettings(),
    identity: np.ndarray | None = None,
) -> EnergyModel:
    """Unary costs for every level of `labels` from the 26 per-channel signals Q (Z, 26).

    Transitional levels have no channel of their own: a T13 is one more thoracic vertebra and
    an L6 one more lumbar one, so they take the evidence of T12 and L5, plus a prior cost
    (they are rare) that keeps a normal spine from being relabelled through them.
    `identity` (Z, levels): a log-likelihood in nats of each level at each sample (the ribs and
    sacrum seen on the CT, `landmarks.level_log_likelihood`), weighed as -anatomy_weight x α x it: in
    units of the maps' evidence, so that α and the temperature can be tuned without changing its share.
    """
    z = signals.shape[0]
    unary = np.empty((len(labels), z))
    for i, name in enumerate(labels.levels):
        c = labels.channel(name)
        if c is None:
            q = signals[:, labels.channel({"T13": "T12", "L6": "L5"}[name])]
            extra = params.transitional_cost
        else:
            q = signals[:, c]
            extra = 0.0
        unary[i] = -params.evidence_weight * labels.weight(name) * (q - params.evidence_floor) + extra
    if identity is not None:
        unary -= params.anatomy_weight * params.evidence_weight * np.asarray(identity, float).T
    gap_min, gap_max = gap_index_range(params, step_mm)
    return EnergyModel(unary, labels, gap_min, gap_max, params, step_mm)


def gap_index_range(params: EngineSettings, step_mm: float) -> tuple[int, int]:
    """The hard gap bounds [gap_min_mm, gap_max_mm] in samples."""
    gap_min = max(1, int(np.ceil(params.gap_min_mm / step_mm)))
    return gap_min, max(gap_min + 1, int(np.floor(params.gap_max_mm / step_mm)))


# --------------------------------------------------------------------------- constraints


@dataclass(frozen=True)
class FixedLevel:
    """A hard constraint: level index `level` sits at sample `position`."""

    level: int
    position: int


class InconsistentFixedPoints(VertebraIDError):
    """No chain of consecutive levels fits the fixed points under the gap bounds."""


def _neighbouring_fixed(fixed: list[FixedLevel]):
    """Pairs of fixed levels that follow each other in level order (no fixed level between them)."""
    by_level = sorted(fixed, key=lambda f: f.level)
    return zip(by_level, by_level[1:])


def exempt_fixed_gaps(model: EnergyModel, fixed: list[FixedLevel]) -> EnergyModel:
    """`model` with the gaps between consecutively fixed levels allowed: the user's points win."""
    exempt = {
        (a.level, b.position - a.position)
        for a, b in _neighbouring_fixed(fixed)
        if b.level in model.labels.successors(a.level) and b.position > a.position
    }
    if not exempt:
        return model
    # Even below the hard lower bound (a point on a vertebra the centreline's end cuts short, say)
    # the gap index widens to hold them; every other gap keeps the bound (gap_allowed). Above the
    # hard upper bound no two consecutive vertebrae lie: such points are refused, not exempted.
    return replace(model, exempt_gaps=frozenset(exempt), gap_min=min(model.gap_min, *(g for _, g in exempt)))


def fixed_points_problem(model: EnergyModel, fixed: list[FixedLevel]) -> str:
    """Why no chain fits the fixed points, in one sentence a user can act on."""
    names = model.labels.levels
    gap_max_mm = model.params.gap_max_mm
    for a, b in _neighbouring_fixed(fixed):
        span_mm = (b.position - a.position) * model.step_mm
        if span_mm <= 0:
            return (f"No vertebra order fits the fixed points: {names[b.level]} lies at or above {names[a.level]} "
                    "along the traced spine; check their names.")
        gaps = b.level - a.level
        if span_mm > gaps * gap_max_mm:
            return (f"No vertebra order fits the fixed points: {names[a.level]} and {names[b.level]} lie "
                    f"{span_mm:.0f} mm apart along the traced spine, more than {gaps} gap(s) between neighbours can "
                    f"span ({gap_max_mm:g} mm each); check their names, or where the traced spine leaves the vertebrae.")
    return "No vertebra order is consistent with the fixed points."


def gap_fraction_fitting(fixed: list[FixedLevel], labels: LabelSet, step_mm: float, fraction: float) -> float | None:
    """A shortest-gap fraction below `fraction` that leaves room between the fixed levels, or None.

    Between two fixed levels a and b the chain needs b - a gaps; each must reach the fraction of
    its level's typical gap, so the span between them bounds the fraction. A margin of one
    sample per gap absorbs the rounding of positions to samples.
    """
    needed = fraction
    for a, b in _neighbouring_fixed(fixed):
        between = labels.levels[a.level:b.level]
        typical = sum(typical_gap_mm(name) for name in between)
        span = (b.position - a.position - len(between)) * step_mm
        if typical > 0 and span > 0:
            needed = min(needed, span / typical)
    return needed if needed < fraction else None


def _apply_constraints(model: EnergyModel, fixed: list[FixedLevel]):
    """Unary with fixed levels pinned; allowed start/end levels; forbidden skips."""
    unary = model.unary.copy()
    n = len(model.labels)
    can_start = np.ones(n, bool)
    can_end = np.ones(n, bool)
    must_visit = set()
    if fixed:
        seen = {}
        for f in fixed:
            if f.level in seen and seen[f.level] != f.position:
                raise VertebraIDError(f"Level {model.labels.levels[f.level]} is fixed at two different places.")
            seen[f.level] = f.position
            if not 0 <= f.position < model.length:
                raise VertebraIDError(f"A fixed {model.labels.levels[f.level]} lies outside the traced spine.")
            row = np.full(model.length, INF)
            row[f.position] = unary[f.level, f.position]
            unary[f.level] = row
            must_visit.add(f.level)
        lo, hi = min(seen), max(seen)
        can_start[lo + 1 :] = False
        can_end[:hi] = False
    return unary, can_start, can_end, must_visit


def _successors(labels: LabelSet, level: int, must_visit: set[int]) -> list[int]:
    out = []
    for s in labels.successors(level):
        skipped = range(level + 1, s)
        if any(k in must_visit for k in skipped):
            continue
        out.append(s)
    return out


# --------------------------------------------------------------------------- exact


def solve_exact(model: EnergyModel, fixed: list[FixedLevel] | None = None) -> Chain:
    """Global minimum of the energy by dynamic programming.

    State: (level ℓ, position k, gap j to the previous vertebra). The spacing term couples
    three consecutive vertebrae, so carrying the previous gap makes the chain Markov. The
    empty chain (energy 0) is allowed unless a level is fixed.
    """
    fixed = fixed or []
    unary, can_start, can_end, must_visit = _apply_constraints(model, fixed)
    labels = model.labels
    n, z = unary.shape
    gaps = model.gaps
    ng = len(gaps)
    growth = model.growth()
    allowed = model.gap_allowed()
    gap_cost = model.gap_cost().astype(np.float32)
    unary = unary.astype(np.float32)
    src = np.arange(z)[:, None] - gaps[None, :]  # position of the previous vertebra
    src_ok = src >= 0
    src = np.clip(src, 0, z - 1)

    incoming = [np.full((z, ng), INF, np.float32) for _ in range(n)]
    incoming_from = [np.full((z, ng), -1, np.int16) for _ in range(n)]
    end_with_gap = [None] * n  # E[ℓ] (z, ng)
    # what M[ℓ] was made of (start costs, the previous gaps used, R): the backtrack recomputes the
    # few argmins it needs instead of the forward pass storing one per state
    continuation = [None] * n

    best = (0.0 if not fixed else INF, None)  # (energy, (level, k, j or -1))
    for lvl in range(n):
        start = unary[lvl] if can_start[lvl] else np.full(z, INF, np.float32)
        e = unary[lvl][:, None] + incoming[lvl]
        end_with_gap[lvl] = e
        if can_end[lvl]:
            k0 = int(np.argmin(start))
            if start[k0] < best[0]:
                best = (float(start[k0]), (lvl, k0, -1))
            flat = int(np.argmin(e))
            if e.flat[flat] < best[0]:
                best = (float(e.flat[flat]), (lvl, *np.unravel_index(flat, e.shape)))
        succ = _successors(labels, lvl, must_visit)
        if not succ:
            continue
        # M[k, j_next] = min(start[k], min_j' E[k, j'] + R[j', j_next])
        # Only gaps that can occur: previous gaps that reached this level, next gaps it allows.
        prev = np.nonzero(np.isfinite(e).any(axis=0))[0]
        nxt = np.nonzero(allowed[lvl])[0]
        # (position, next gap, previous gap): the reductions run along the contiguous last axis
        spacing = model.spacing_matrix(growth[lvl]).astype(np.float32)
        continuation[lvl] = (start, prev, spacing)
        if len(prev):
            # (position, next gap, previous gap): the minimum runs along the contiguous last axis
            r = np.ascontiguousarray(spacing[np.ix_(prev, nxt)].T)
            best_via = (e[:, prev][:, None, :] + r[None, :, :]).min(axis=2)
        else:
            best_via = np.full((z, len(nxt)), INF, np.float32)
        m = np.full((z, ng), INF, np.float32)
        m[:, nxt] = np.minimum(start[:, None], best_via)
        m += gap_cost[lvl][None, :]  # the gap to the next vertebra, against this level's typical gap
        shifted = np.where(src_ok, m[src, np.arange(ng)[None, :]], INF)
        for s in succ:
            better = shifted < incoming[s]
            incoming[s] = np.where(better, shifted, incoming[s])
            incoming_from[s] = np.where(better, lvl, incoming_from[s]).astype(np.int16)

    energy, state = best
    if state is None:
        if fixed:
            raise InconsistentFixedPoints(fixed_points_problem(model, fixed))
        return Chain([], [], 0.0)
    if not np.isfinite(energy):
        raise InconsistentFixedPoints(fixed_points_problem(model, fixed))
    levels, positions = [], []
    lvl, k, j = state
    while True:
        levels.append(int(lvl))
        positions.append(int(k))
        if j == -1:
            break
        prev_lvl = int(incoming_from[lvl][k, j])
        prev_k = int(k - gaps[j])
        j = _previous_gap(end_with_gap[prev_lvl], *continuation[prev_lvl], prev_k, j)
        lvl, k = prev_lvl, prev_k
    levels, positions = levels[::-1], positions[::-1]
    # the DP runs in float32; report the chain's energy in float64 like every other solver
    return Chain(levels, positions, model.chain_energy(levels, positions))


def _previous_gap(end_with_gap, start, prev, spacing, k: int, j: int) -> int:
    """Backtrack step: the gap before the vertebra at k whose next gap is j (-1: the chain starts there)."""
    if len(prev) == 0:
        return -1
    via = end_with_gap[k, prev] + spacing[prev, j]
    i = int(np.argmin(via))
    return -1 if start[k] <= via[i] else int(prev[i])


# --------------------------------------------------------------------------- confidence


def _log_matmul(log_a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """log(exp(log_a) @ b) for b >= 0, stable row-wise (a max-shifted matrix product)."""
    top = log_a.max(axis=1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):
        return np.log(np.exp(log_a - top) @ b) + top


def marginals(model: EnergyModel, fixed: list[FixedLevel] | None = None) -> np.ndarray:
    """P(level ℓ is at sample k) under the Gibbs distribution exp(−L / T) over all chains.

    Same lattice as `solve_exact` with (log-sum-exp, +) instead of (min, +); the sum over the
    previous gap is a matrix product with exp(−R/T). Returns (n_levels, Z).
    """
    fixed = fixed or []
    unary, can_start, can_end, must_visit = _apply_constraints(model, fixed)
    t = model.params.confidence_temperature
    labels = model.labels
    n, z = unary.shape
    gaps = model.gaps
    ng = len(gaps)
    weights = [np.exp(-model.spacing_matrix(g) / t) for g in model.growth()]  # (prev gap, next gap)
    allowed = model.gap_allowed()
    log_gap = -model.gap_cost() / t
    lu = -unary / t
    cols = np.arange(ng)[None, :]
    src = np.arange(z)[:, None] - gaps[None, :]
    src_ok = src >= 0
    src = np.clip(src, 0, z - 1)
    dst = np.arange(z)[:, None] + gaps[None, :]
    dst_ok = dst < z
    dst = np.clip(dst, 0, z - 1)
    succ = [_successors(labels, lvl, must_visit) for lvl in range(n)]

    with np.errstate(invalid="ignore", divide="ignore"):
        f_start = [np.where(can_start[lvl], lu[lvl], -INF) for lvl in range(n)]
        incoming = [np.full((z, ng), -INF) for _ in range(n)]
        f_end = [None] * n
        for lvl in range(n):
            f_end[lvl] = lu[lvl][:, None] + incoming[lvl]
            m = np.logaddexp(f_start[lvl][:, None], _log_matmul(f_end[lvl], weights[lvl]))
            m = np.where(allowed[lvl][None, :], m + log_gap[lvl][None, :], -INF)
            shifted = np.where(src_ok, m[src, cols], -INF)
            for s in succ[lvl]:
                incoming[s] = np.logaddexp(incoming[s], shifted)
        b_end = [None] * n
        b_start = [None] * n
        for lvl in reversed(range(n)):
            stop = 0.0 if can_end[lvl] else -INF
            cont = np.full((z, ng), -INF)  # continue to a successor with next gap j
            for s in succ[lvl]:
                val = lu[s][dst] + b_end[s][dst, cols] + log_gap[lvl][None, :]
                cont = np.logaddexp(cont, np.where(dst_ok & allowed[lvl][None, :], val, -INF))
            b_end[lvl] = np.logaddexp(stop, _log_matmul(cont, weights[lvl].T))
            b_start[lvl] = np.logaddexp(stop, logsumexp(cont, axis=1))
        log_start = np.array([f_start[lvl] + b_start[lvl] for lvl in range(n)])
        log_z = logsumexp(log_start)
        if not fixed:
            log_z = np.logaddexp(log_z, 0.0)
        out = np.empty((n, z))
        for lvl in range(n):
            out[lvl] = np.logaddexp(log_start[lvl], logsumexp(f_end[lvl] + b_end[lvl], axis=1)) - log_z
    return np.nan_to_num(np.exp(out), nan=0.0)


def chain_confidence(prob: np.ndarray, chain: Chain, radius: int) -> list[float]:
    """For each vertebra: probability that its level lies within ±radius samples of it."""
    out = []
    for lvl, k in zip(chain.levels, chain.positions):
        lo, hi = max(0, k - radius), min(prob.shape[1], k + radius + 1)
        out.append(float(np.clip(prob[lvl, lo:hi].sum(), 0.0, 1.0)))
    return out


# --------------------------------------------------------------------------- paper / order


def _initial_positions(model: EnergyModel, combined_signal: np.ndarray) -> np.ndarray:
    """The paper's initialisation: the local maxima of Q̂, in order along the spine.

    A maximum counts when it rises above the floor by at least the floor (its prominence) and
    is at least the shortest allowed gap from a higher one; without this, every ripple of a
    noisy Q̂ would start a vertebra.
    """
    from scipy.signal import find_peaks

    peaks, _ = find_peaks(
        combined_signal, height=model.params.evidence_floor, prominence=model.params.evidence_floor, distance=model.gap_min
    )
    n_max = len(LabelSet.standard().levels)
    if len(peaks) > n_max:  # more maxima than levels: keep the strongest
        peaks = np.sort(peaks[np.argsort(combined_signal[peaks])[::-1][:n_max]])
    return peaks


def unbounded(model: EnergyModel) -> EnergyModel:
    """The same energy over Algorithm 1's search space (v_l in [1, 26], k_i in [0, L]): no gap bounds.

    The hard gap bounds are the project's (every exact chain keeps them). Algorithm 1 moves one
    centre by one sample or inserts a midpoint, so from an initial chain that breaks a bound (one
    spurious or one missed maximum of Q̂) every offset has infinite energy and it could never move:
    it searches without them, as the paper does, and R alone keeps the gaps even.
    """
    length = model.length
    params = model.params.updated(gap_min_mm=model.step_mm, gap_max_mm=max(length, 2) * model.step_mm,
                                  gap_fraction_min=1e-9, gap_fraction_max=1e9)
    gap_min, gap_max = gap_index_range(params, model.step_mm)
    return replace(model, params=params, gap_min=gap_min, gap_max=gap_max)


def _standard_levels(model: EnergyModel) -> np.ndarray:
    """Level indices of the 26 standard levels (the paper has no transitional vertebrae)."""
    return np.array([i for i, name in enumerate(model.labels.levels) if name not in ("T13", "L6")])


def _offset(model: EnergyModel, ks: np.ndarray, standard: np.ndarray):
    """Best lowest level for fixed positions (Eq. 6): returns (start, energy)."""
    n = len(ks)
    best = (0, INF)
    for start in range(len(standard) - n + 1):
        e = model.chain_energy(standard[start : start + n], ks)
        if e < best[1]:
            best = (start, e)
    return best


def _fine_tune(model: EnergyModel, levels: np.ndarray, ks: np.ndarray, max_iter: int = 10000):
    """Hill climbing (Eq. 7): move one centre by ±1 sample, the best move each step."""
    ks = ks.copy()
    energy = model.chain_energy(levels, ks)
    n = len(ks)
    moves = np.concatenate([np.eye(n, dtype=int), -np.eye(n, dtype=int)])
    for _ in range(max_iter):
        candidates = ks[None, :] + moves
        energies = model.batch_energy(levels, candidates)
        i = int(np.argmin(energies))
        if not energies[i] < energy - 1e-12:
            break
        ks, energy = candidates[i], float(energies[i])
    return ks, energy


def _expand(model: EnergyModel, levels_for, ks: np.ndarray):
    """Insert a centre at the midpoint of the pair where it lowers the energy most (Eqs. 8-9)."""
    best = (None, INF)
    for u in range(len(ks) - 1):
        new = np.insert(ks, u + 1, (ks[u] + ks[u + 1]) // 2)
        e = model.chain_energy(levels_for(len(new)), new)
        if e < best[1]:
            best = (new, e)
    return best[0]


def solve_paper(model: EnergyModel, combined_signal: np.ndarray) -> Chain:
    """Algorithm 1 of the paper: the lowest-energy state it visits.

    It searches without the gap bounds (`unbounded`), and the chain it returns carries its energy
    under `model` (infinite where it breaks a bound), so that it compares with the exact solver's.
    """
    ks = _initial_positions(model, combined_signal)
    if len(ks) == 0:
        return Chain([], [], 0.0)
    return _rescored(model, _algorithm_1(unbounded(model), ks))


def _algorithm_1(model: EnergyModel, ks: np.ndarray) -> Chain:
    """Offset, fine-tune and expansion from the initial centres `ks` until the offset's energy stops falling."""
    standard = _standard_levels(model)
    best = Chain([], [], INF)  # the lowest state visited, whatever its sign: the paper has no empty chain
    lowest = INF

    def record(start, ks, energy):
        nonlocal best
        if energy < best.energy:
            best = Chain([int(v) for v in standard[start : start + len(ks)]], [int(k) for k in ks], float(energy))

    while True:
        start, energy = _offset(model, ks, standard)
        record(start, ks, energy)
        if not energy < lowest:
            return best
        lowest = energy
        levels = standard[start : start + len(ks)]
        ks, energy = _fine_tune(model, levels, ks)
        record(start, ks, energy)
        if len(ks) >= len(standard) or len(ks) < 2:
            return best
        start = min(start, len(standard) - len(ks) - 1)
        expanded = _expand(model, lambda m: standard[start : start + m], ks)
        if expanded is None:
            return best
        ks = expanded


def _rescored(model: EnergyModel, chain: Chain) -> Chain:
    """`chain` with its energy under `model` (the bounded energy every solver is compared on)."""
    if not chain.levels:
        return chain
    return replace(chain, energy=model.chain_energy(chain.levels, chain.positions))


def solve_order(model: EnergyModel, combined_signal: np.ndarray) -> Chain:
    """Local maxima of Q̂ labelled consecutively, the lowest level chosen by Eq. 6 only (Algorithm 1's
    first offset, in its search space)."""
    standard = _standard_levels(model)
    ks = _initial_positions(model, combined_signal)
    if len(ks) == 0:
        return Chain([], [], 0.0)
    start, _ = _offset(unbounded(model), ks, standard)
    return _rescored(model, Chain([int(v) for v in standard[start : start + len(ks)]], [int(k) for k in ks], 0.0))