"""Simulated output of a 26-channel heatmap network, with the ground truth that produced it.

A case is: a spine (body centres C1..S2 on a smooth 3-D curve with realistic spacing, sagittal
curvature, optional scoliosis and compression fractures) placed somewhere in a scanner; a field
of view over a contiguous range of levels on a grid of any orientation; and activation maps
with the failures a real network shows (Wang et al. 2021, §3.1, Fig. 2 and 5): channels that
also fire on neighbouring vertebrae, stretches labelled one or two levels off, weak or missing
vertebrae (fractures, metal), false positives off the spine, a smooth noise floor and blobs
slightly off the true centre.

    case = simulate_case(7, difficulty="hard", levels=("T6", "S2"))
    case.heatmaps      # Volume, float32 (I, J, K, 26)
    case.truth         # list[Vertebra]: the vertebrae whose centres lie in the grid
    case.meta          # what was simulated (geometry, orientation, every failure applied)

Everything is drawn from `np.random.default_rng` streams derived from the seed, so a case is
reproducible; anatomy does not depend on the grid spacing or the failure model.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.ndimage import gaussian_filter, gaussian_filter1d

from ..engine.anatomy import CHANNEL_OF, LEVELS_26, NUM_CHANNELS, region
from ..engine.points import render_gaussians
from ..engine.vertebrae import Vertebra
from ..engine.volume import Volume
from ..errors import VertebraIDError

#: Centre-to-centre distance (mm) from each level to the next, C1->C2 ... S1->S2 (adult means).
LEVEL_GAPS_MM = np.array(
    [14.0, 17.0, 15.5, 15.5, 15.5, 16.0, 17.0]  # C1-C2 ... C7-T1
    + [19.0, 19.5, 20.0, 20.5, 21.0, 22.0, 23.0, 24.0, 25.0, 26.0, 27.0, 29.0]  # T1-T2 ... T12-L1
    + [33.0, 35.0, 36.0, 37.0, 37.0, 27.0]  # L1-L2 ... L5-S1, S1-S2
)
assert len(LEVEL_GAPS_MM) == NUM_CHANNELS - 1

_STEP_MM = 0.5  # sampling of the dense spine curve


@dataclass(frozen=True)
class FailureModel:
    """How often and how strongly the simulated network fails (per case or per vertebra)."""

    displacement_sd_mm: float  # blob centre offset from the true centre, per axis
    sigma_mm: tuple[float, float]  # blob width (case-level range)
    peak: tuple[float, float]  # blob peak (case-level base, drawn per vertebra within)
    bleed1_prob: float  # per vertebra and side: the blob also in channel +-1
    bleed1_weight: tuple[float, float]  # ... at this fraction of the peak
    bleed2_prob: float  # per vertebra and side: also in channel +-2
    bleed2_weight: tuple[float, float]
    confusion_runs: float  # expected number of stretches labelled 1-2 levels off (Poisson)
    confusion_max_length: int  # vertebrae per stretch
    missing_prob: float  # per vertebra: (almost) no activation
    weak_prob: float  # per vertebra: weak activation
    false_positives: float  # expected number of blobs off the vertebral bodies (Poisson)
    noise: tuple[float, float]  # amplitude range of the smooth noise floor
    scoliosis_prob: float
    cobb_deg: tuple[float, float]
    fracture_prob: float  # per case: at least one compression fracture
    max_fractures: int
    metal_prob: float  # per case: a run of vertebrae hidden by metal, with screw-like false positives
    prone_prob: float  # patient lying prone
    edge_weak_prob: float  # per vertebra near the FOV border: weaker activation
    partial_fov_prob: float  # when no levels are given: a partial (not whole-spine) field of view


DIFFICULTIES: dict[str, FailureModel] = {
    "clean": FailureModel(
        displacement_sd_mm=0.5, sigma_mm=(3.0, 5.0), peak=(0.8, 1.0),
        bleed1_prob=0.0, bleed1_weight=(0.1, 0.3), bleed2_prob=0.0, bleed2_weight=(0.05, 0.2),
        confusion_runs=0.0, confusion_max_length=1, missing_prob=0.0, weak_prob=0.0,
        false_positives=0.0, noise=(0.0, 0.01), scoliosis_prob=0.0, cobb_deg=(10.0, 20.0),
        fracture_prob=0.0, max_fractures=0, metal_prob=0.0, prone_prob=0.0, edge_weak_prob=0.0,
        partial_fov_prob=0.8,
    ),
    "typical": FailureModel(
        displacement_sd_mm=1.5, sigma_mm=(3.0, 5.0), peak=(0.6, 1.0),
        bleed1_prob=0.3, bleed1_weight=(0.1, 0.5), bleed2_prob=0.1, bleed2_weight=(0.05, 0.3),
        confusion_runs=0.6, confusion_max_length=4, missing_prob=0.03, weak_prob=0.07,
        false_positives=1.0, noise=(0.005, 0.03), scoliosis_prob=0.15, cobb_deg=(10.0, 30.0),
        fracture_prob=0.15, max_fractures=1, metal_prob=0.05, prone_prob=0.05, edge_weak_prob=0.5,
        partial_fov_prob=0.8,
    ),
    "hard": FailureModel(
        displacement_sd_mm=2.5, sigma_mm=(3.0, 5.5), peak=(0.5, 1.0),
        bleed1_prob=0.6, bleed1_weight=(0.2, 0.8), bleed2_prob=0.3, bleed2_weight=(0.1, 0.5),
        confusion_runs=1.5, confusion_max_length=6, missing_prob=0.08, weak_prob=0.15,
        false_positives=3.0, noise=(0.02, 0.05), scoliosis_prob=0.4, cobb_deg=(15.0, 40.0),
        fracture_prob=0.4, max_fractures=3, metal_prob=0.3, prone_prob=0.1, edge_weak_prob=0.8,
        partial_fov_prob=0.8,
    ),
}


@dataclass
class SimulatedCase:
    """A simulated network output: 26 maps, the truth, and the failures drawn."""

    heatmaps: Volume  # float32 (I, J, K, 26)
    truth: list[Vertebra]  # visible vertebrae (centre inside the grid), cranial to caudal
    meta: dict = field(default_factory=dict)

    @property
    def labels(self) -> list[str]:
        return [v.label for v in self.truth]


# --------------------------------------------------------------------------- rendering


def _smooth_noise(rng, shape, spacing, channels, amplitude, cell_mm=12.0) -> np.ndarray:
    """Sparse non-negative smooth noise in [0, amplitude]: a coarse random field, trilinearly upsampled."""
    out = np.zeros(tuple(shape) + (channels,), dtype=np.float32)
    if amplitude <= 0:
        return out
    coords, coarse_shape = [], []
    for n, sp in zip(shape, spacing):
        x = np.arange(n) * sp / cell_mm + rng.uniform(0, 1)
        coords.append(x)
        coarse_shape.append(int(np.floor(x[-1])) + 2)
    coarse = rng.standard_normal(tuple(coarse_shape) + (channels,)).astype(np.float32)
    coarse = gaussian_filter(coarse, sigma=(0.6, 0.6, 0.6, 0))
    coarse /= coarse.std() or 1.0
    # sparse: about a third of the volume is above zero, so that the 26 channels summed (the
    # combined map) stay low too
    coarse = np.clip((coarse - 0.5) / 2.5, 0.0, 1.0) * np.float32(amplitude)
    # separable linear interpolation; the last (largest) pass is written into `out` slab by slab
    for axis in (2, 1):
        x = coords[axis]
        i0 = np.floor(x).astype(int)
        f = (x - i0).astype(np.float32)
        shp = [1, 1, 1, 1]
        shp[axis] = -1
        f = f.reshape(shp)
        coarse = np.take(coarse, i0, axis=axis) * (1 - f) + np.take(coarse, i0 + 1, axis=axis) * f
    x = coords[0]
    i0 = np.floor(x).astype(int)
    f = (x - i0).astype(np.float32)
    for i in range(shape[0]):
        np.add(coarse[i0[i]] * (1 - f[i]), coarse[i0[i] + 1] * f[i], out=out[i])
    return out


# --------------------------------------------------------------------------- anatomy


def _rotation(axis, angle_rad) -> np.ndarray:
    axis = np.asarray(axis, float)
    axis = axis / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle_rad) * k + (1 - np.cos(angle_rad)) * (k @ k)


def _region_span(arc, first, last):
    return arc[CHANNEL_OF[first]], arc[CHANNEL_OF[last]]


def _spine_geometry(rng, model: FailureModel) -> dict:
    """Body centres C1..S2 in a patient frame (R, A, S mm, C1 at the origin) plus a dense curve."""
    scale = rng.uniform(0.87, 1.15)
    gaps = LEVEL_GAPS_MM * scale * np.clip(rng.normal(1.0, 0.03, LEVEL_GAPS_MM.size), 0.92, 1.08)
    # every random number is drawn whatever the model, so that a seed gives the same anatomy
    # (fractures and scoliosis aside) in every difficulty
    fractures = []
    fracture_draw = rng.random()
    candidates = [CHANNEL_OF[f"T{i}"] for i in range(4, 13)] + [CHANNEL_OF[f"L{i}"] for i in range(1, 6)]
    fractured = rng.permutation(candidates)
    losses = rng.uniform(0.2, 0.6, len(candidates))  # fraction of the body height lost
    if model.max_fractures > 0 and fracture_draw < model.fracture_prob:
        count = 1 + int(fracture_draw / model.fracture_prob * model.max_fractures)
        for v, loss in zip(fractured[:count], losses):
            height = 0.75 * 0.5 * (gaps[v - 1] + gaps[v])  # body height ~ 3/4 of the pitch
            gaps[v - 1] -= 0.5 * loss * height
            gaps[v] -= 0.5 * loss * height
            fractures.append({"label": LEVELS_26[v], "height_loss": round(float(loss), 3)})

    arc = np.concatenate([[0.0], np.cumsum(gaps)])  # approximate arc length of each centre
    pad = 120.0
    s = np.arange(-pad, arc[-1] + pad, _STEP_MM)

    # sagittal tangent angle theta (walking inferiorly; positive = heading anterior)
    cervical = rng.uniform(10, 45)
    kyphosis = rng.uniform(20, 60)
    lordosis = rng.uniform(30, 70)
    sacral = rng.uniform(10, 25)
    curvature = np.zeros_like(s)
    for (a, b), total in (
        (_region_span(arc, "C2", "C7"), -cervical),
        (_region_span(arc, "T1", "T12"), kyphosis),
        (_region_span(arc, "L1", "S1"), -lordosis),
        (_region_span(arc, "L5", "S2"), -sacral),
    ):
        curvature[(s >= a) & (s < b)] += np.deg2rad(total) / (b - a)
    curvature = gaussian_filter1d(curvature, 15.0 / _STEP_MM, mode="constant")
    theta = np.cumsum(curvature) * _STEP_MM

    # lateral tangent angle phi: a main scoliotic curve with compensating curves above and below
    phi = np.zeros_like(s)
    scoliosis = None
    scoliosis_draw, cobb_fraction = rng.random(), rng.random()
    apex = int(rng.integers(CHANNEL_OF["T6"], CHANNEL_OF["L2"] + 1))
    half = int(rng.integers(3, 6))
    side = rng.choice([-1.0, 1.0])
    if scoliosis_draw < model.scoliosis_prob:
        cobb = model.cobb_deg[0] + cobb_fraction * (model.cobb_deg[1] - model.cobb_deg[0])
        top, bottom = max(apex - half, 1), min(apex + half, NUM_CHANNELS - 2)
        a, b = arc[top], arc[bottom]
        above, below = (max(arc[0], a - 0.6 * (b - a)), a), (b, min(arc[-1], b + 0.6 * (b - a)))
        lateral = np.zeros_like(s)
        lateral[(s >= above[0]) & (s < above[1])] += np.deg2rad(cobb / 2) / max(above[1] - above[0], 1.0)
        lateral[(s >= a) & (s < b)] -= np.deg2rad(cobb) / (b - a)
        lateral[(s >= below[0]) & (s < below[1])] += np.deg2rad(cobb / 2) / max(below[1] - below[0], 1.0)
        lateral = gaussian_filter1d(side * lateral, 15.0 / _STEP_MM, mode="constant")
        phi = np.cumsum(lateral) * _STEP_MM
        scoliosis = {"cobb_deg": round(float(cobb), 2), "apex": LEVELS_26[apex], "side": "right" if side > 0 else "left",
                     "from": LEVELS_26[top], "to": LEVELS_26[bottom]}

    tangent = np.stack([np.sin(phi), np.sin(theta) * np.cos(phi), -np.cos(theta) * np.cos(phi)], axis=1)
    curve = np.cumsum(tangent, axis=0) * _STEP_MM
    curve -= curve[np.searchsorted(s, 0.0)]

    # centres: walk the curve so that consecutive centres are `gap` apart (chord length)
    start = int(np.searchsorted(s, 0.0))
    idx = [start]
    centres = [curve[start]]
    centre_arc = [s[start]]
    for g in gaps:
        d = np.linalg.norm(curve[idx[-1]:] - centres[-1], axis=1)
        j = int(np.argmax(d >= g))
        k = idx[-1] + j
        # linear interpolation between samples k-1 and k for the exact distance
        d0, d1 = d[j - 1], d[j]
        t = (g - d0) / (d1 - d0) if d1 > d0 else 0.0
        centres.append(curve[k - 1] + t * (curve[k] - curve[k - 1]))
        centre_arc.append(s[k - 1] + t * _STEP_MM)
        idx.append(k)
    centres = np.array(centres)
    centre_arc = np.array(centre_arc)

    # stand the spine up: chord C1 -> S1 vertical, then a random lean
    chord = centres[CHANNEL_OF["S1"]] - centres[0]
    tilt_sagittal = np.arctan2(chord[1], -chord[2])
    upright = _rotation([1, 0, 0], -tilt_sagittal)
    chord = upright @ chord
    tilt_coronal = np.arctan2(chord[0], -chord[2])
    upright = _rotation([0, 1, 0], tilt_coronal) @ upright
    lean = np.deg2rad(rng.uniform(-8, 8))
    upright = _rotation([1, 0, 0], lean) @ upright
    return {
        "centres": centres @ upright.T,
        "curve": curve @ upright.T,
        "s": s,
        "centre_arc": centre_arc,
        "gaps": gaps,
        "meta": {
            "scale": round(float(scale), 4),
            "gaps_mm": [round(float(g), 2) for g in gaps],
            "cervical_lordosis_deg": round(float(cervical), 2),
            "thoracic_kyphosis_deg": round(float(kyphosis), 2),
            "lumbar_lordosis_deg": round(float(lordosis), 2),
            "sacral_tilt_deg": round(float(sacral), 2),
            "lean_deg": round(float(np.rad2deg(lean)), 2),
            "scoliosis": scoliosis,
            "fractures": fractures,
        },
    }


def _patient_pose(rng, model: FailureModel):
    """Rotation (patient frame -> RAS) and translation of C1: small tilts, sometimes prone."""
    prone = bool(rng.random() < model.prone_prob)
    rot = _rotation([0, 0, 1], np.deg2rad(rng.uniform(-10, 10)))
    rot = rot @ _rotation([0, 1, 0], np.deg2rad(rng.uniform(-5, 5)))
    rot = rot @ _rotation([1, 0, 0], np.deg2rad(rng.uniform(-5, 5)))
    if prone:
        rot = rot @ _rotation([0, 0, 1], np.pi)
    offset = np.array([rng.uniform(-60, 60), rng.uniform(-120, 40), rng.uniform(-200, 600)])
    return rot, offset, prone


# --------------------------------------------------------------------------- field of view


def _parse_levels(levels) -> tuple[int, int]:
    try:
        first, last = levels
    except (TypeError, ValueError):
        raise VertebraIDError("levels must be a pair of level names such as ('T6', 'S2').") from None
    for name in (first, last):
        if name not in CHANNEL_OF:
            raise VertebraIDError(f"Unknown level '{name}'; use one of C1..C7, T1..T12, L1..L5, S1, S2.")
    a, b = CHANNEL_OF[first], CHANNEL_OF[last]
    if a > b:
        raise VertebraIDError(f"levels must go from cranial to caudal; got {first}..{last}.")
    return a, b


def _random_levels(rng) -> tuple[int, int]:
    kind = rng.choice(["cervical", "cervicothoracic", "thoracic", "thoracolumbar", "lumbar", "any"],
                      p=[0.15, 0.07, 0.2, 0.2, 0.23, 0.15])
    pick = lambda a, b: int(rng.integers(CHANNEL_OF[a], CHANNEL_OF[b] + 1))  # noqa: E731
    if kind == "cervical":
        return (0 if rng.random() < 0.7 else pick("C2", "C3")), pick("C6", "T2")
    if kind == "cervicothoracic":
        return pick("C1", "C3"), pick("T4", "T12")
    if kind == "thoracic":
        return pick("C6", "T3"), pick("T10", "L2")
    if kind == "thoracolumbar":
        return pick("T1", "T8"), (CHANNEL_OF["S2"] if rng.random() < 0.8 else CHANNEL_OF["S1"])
    if kind == "lumbar":
        return pick("T9", "L1"), (CHANNEL_OF["S2"] if rng.random() < 0.8 else CHANNEL_OF["S1"])
    first = int(rng.integers(0, NUM_CHANNELS - 3))
    return first, int(rng.integers(first + 3, NUM_CHANNELS))


def _orientation(rng, oblique: bool, max_oblique_deg: float):
    """Directions of the array axes in RAS (columns): random permutation and flips, maybe oblique."""
    perm = rng.permutation(3)
    signs = rng.choice([-1.0, 1.0], size=3)
    direction = np.zeros((3, 3))
    for j in range(3):
        direction[perm[j], j] = signs[j]
    angle = 0.0
    if oblique and max_oblique_deg > 0:
        angle = rng.uniform(min(2.0, max_oblique_deg), max_oblique_deg)
        axis = rng.standard_normal(3)
        direction = _rotation(axis, np.deg2rad(angle)) @ direction
    return direction, perm, signs, angle


def _grid(direction, spacing, segment, first_pt, last_pt, rng, centres, wanted):
    """Grid bounds (mm along each array axis) holding `segment` with lateral margins.

    Along the array axis closest to the spine the grid ends where the segment ends; afterwards
    the bounds are trimmed or grown until exactly the `wanted` centres lie inside.
    """
    u_seg = segment @ direction
    chord = (last_pt - first_pt) @ direction
    along = int(np.argmax(np.abs(chord)))
    lo = u_seg.min(0).copy()
    hi = u_seg.max(0).copy()
    for a in range(3):
        if a != along:
            lo[a] -= rng.uniform(20, 45)
            hi[a] += rng.uniform(20, 45)
    u_c = centres @ direction

    def discretised():
        shape = np.floor((hi - lo) / spacing + 1e-9).astype(int) + 1
        last = lo + (shape - 1) * spacing  # the grid ends at its last voxel centre
        inside = np.all((u_c >= lo - 1e-6) & (u_c <= last + 1e-6), axis=1)
        return shape, inside

    for _ in range(10):
        shape, inside = discretised()
        extra = np.flatnonzero(inside & ~wanted)
        missing = np.flatnonzero(~inside & wanted)
        if extra.size == 0 and missing.size == 0:
            break
        for m in missing:
            lo = np.minimum(lo, u_c[m] - 0.5 * spacing)
            hi = np.maximum(hi, u_c[m] + spacing)
        wanted_u = u_c[wanted, along]
        for e in extra:
            x = u_c[e, along]
            below, above = wanted_u[wanted_u < x], wanted_u[wanted_u > x]
            if below.size and not above.size:
                hi[along] = min(hi[along], 0.5 * (x + below.max()))
            elif above.size and not below.size:
                lo[along] = max(lo[along], 0.5 * (x + above.min()))
    shape, _ = discretised()
    shape = tuple(int(n) for n in shape)
    return lo, shape


# --------------------------------------------------------------------------- the case


def simulate_case(
    seed: int,
    *,
    spacing_mm=2.0,
    difficulty: str = "typical",
    levels: tuple[str, str] | None = None,
    oblique: bool = True,
    partial_fov: bool | None = None,
    max_oblique_deg: float = 15.0,
    failures: FailureModel | None = None,
) -> SimulatedCase:
    """One simulated case (maps + ground truth), reproducible from `seed`.

    spacing_mm: grid spacing, a number or one per array axis. difficulty: "clean", "typical" or
    "hard" (see DIFFICULTIES), or give a FailureModel in `failures`. levels: first and last level
    in the field of view, e.g. ("T6", "S2"); None draws one (whole spine unless `partial_fov`,
    which None draws with the model's probability). oblique: rotate the grid off the scanner axes
    (up to `max_oblique_deg`) on top of the random axis permutation and flips.
    """
    if failures is None:
        if difficulty not in DIFFICULTIES:
            raise VertebraIDError(f"Unknown difficulty '{difficulty}'; choose one of {', '.join(DIFFICULTIES)}.")
        failures = DIFFICULTIES[difficulty]
    spacing = np.broadcast_to(np.asarray(spacing_mm, dtype=float), (3,)).copy()
    if not np.all(spacing > 0):
        raise VertebraIDError("spacing_mm must be positive.")
    rng_geom, rng_pose, rng_fov, rng_orient, rng_maps, rng_noise = (
        np.random.default_rng(s) for s in np.random.SeedSequence(int(seed)).spawn(6)
    )

    geom = _spine_geometry(rng_geom, failures)
    rot, offset, prone = _patient_pose(rng_pose, failures)
    centres = geom["centres"] @ rot.T + offset
    curve = geom["curve"] @ rot.T + offset
    s, centre_arc, gaps = geom["s"], geom["centre_arc"], geom["gaps"]

    # field of view: an arc-length interval of the curve around the chosen levels
    if levels is not None:
        first, last = _parse_levels(levels)
    else:
        partial = rng_fov.random() < failures.partial_fov_prob if partial_fov is None else partial_fov
        first, last = _random_levels(rng_fov) if partial else (0, NUM_CHANNELS - 1)
    top = centre_arc[first] - (rng_fov.uniform(10, 50) if first == 0 else rng_fov.uniform(0.1, 0.85) * gaps[first - 1])
    bottom = centre_arc[last] + (
        rng_fov.uniform(10, 40) if last == NUM_CHANNELS - 1 else rng_fov.uniform(0.1, 0.85) * gaps[last]
    )
    segment = curve[(s >= top) & (s <= bottom)]
    wanted = np.zeros(NUM_CHANNELS, bool)
    wanted[first : last + 1] = True

    direction, perm, signs, oblique_deg = _orientation(rng_orient, oblique, max_oblique_deg)
    lo, shape = _grid(direction, spacing, segment, segment[0], segment[-1], rng_fov, centres, wanted)
    affine = np.eye(4)
    affine[:3, :3] = direction * spacing
    affine[:3, 3] = direction @ lo
    grid = Volume(np.zeros(shape + (0,), np.float32), affine)
    ijk = grid.world_to_voxel(centres)
    dims = np.array(shape)
    visible = np.all((ijk >= -1e-6) & (ijk <= dims - 1 + 1e-6), axis=1)
    border_mm = np.min(np.minimum(ijk, dims - 1 - ijk) * spacing, axis=1)

    # patient axes in RAS, for placing false positives
    right, anterior, superior = rot[:, 0], rot[:, 1], rot[:, 2]
    blob_centres, blob_weights, blob_sigmas, events = _draw_blobs(
        rng_maps, failures, centres, visible, border_mm, geom["meta"]["fractures"], grid, right, anterior, superior
    )
    noise_amplitude = float(rng_noise.uniform(*failures.noise))
    array = _smooth_noise(rng_noise, shape, spacing, NUM_CHANNELS, noise_amplitude)
    render_gaussians(blob_centres, blob_weights, grid, blob_sigmas, out=array)
    heatmaps = Volume(array, affine)

    fractured = {f["label"] for f in geom["meta"]["fractures"]}
    truth = [
        Vertebra(
            LEVELS_26[v], centres[v], 1.0,
            extra={"fractured": LEVELS_26[v] in fractured, "border_mm": round(float(border_mm[v]), 2)},
        )
        for v in np.flatnonzero(visible)
    ]
    superior_axis, superior_sign = heatmaps.axis_most_along([0, 0, 1])
    meta = {
        "seed": int(seed),
        "difficulty": difficulty if failures is DIFFICULTIES.get(difficulty) else "custom",
        "spacing_mm": [float(x) for x in spacing],
        "shape": list(shape),
        "levels_requested": [LEVELS_26[first], LEVELS_26[last]],
        "levels_visible": [t.label for t in truth],
        "whole_spine": bool(first == 0 and last == NUM_CHANNELS - 1),
        "prone": prone,
        "axis_permutation": [int(p) for p in perm],
        "axis_signs": [float(x) for x in signs],
        "oblique_deg": round(float(oblique_deg), 2),
        "superior_axis": superior_axis,
        "superior_sign": superior_sign,
        "noise_amplitude": round(noise_amplitude, 4),
        "all_centres_ras": np.round(centres, 3).tolist(),
        "blob_centres_ras": np.round(blob_centres[:NUM_CHANNELS], 3).tolist(),
        "blob_sigma_mm": np.round(blob_sigmas[:NUM_CHANNELS], 3).tolist(),
        "events": events,
        **geom["meta"],
    }
    return SimulatedCase(heatmaps, truth, meta)


def _draw_blobs(rng, model, centres, visible, border_mm, fractures, grid, right, anterior, superior):
    """Blob centres, channel weights and widths: the 26 vertebrae first, then false positives."""
    n = NUM_CHANNELS
    events: list[dict] = []
    base_peak = rng.uniform(*model.peak)
    peaks = np.clip(base_peak * rng.uniform(0.85, 1.0, n) + rng.normal(0, 0.03, n), 0.3, 1.0)
    sigma = rng.uniform(*model.sigma_mm)
    sigmas = sigma * rng.uniform(0.9, 1.1, n)
    displacement = rng.normal(0.0, model.displacement_sd_mm, (n, 3))
    weights = np.diag(peaks).astype(np.float64)
    vis = np.flatnonzero(visible)
    _confuse_runs(rng, model, weights, peaks, visible, vis, events)
    _bleed_into_neighbours(rng, model, weights, visible, events)
    _weaken(rng, model, weights, vis, border_mm, fractures, events)
    fps = _FalsePositives(rng, sigma, events)
    fps.metal(model, weights, centres, visible, vis, right, anterior)
    fps.off_the_bodies(model, centres, vis, grid, right, anterior, superior)
    all_centres = np.concatenate([centres + displacement, np.reshape(fps.centres, (-1, 3))])
    all_weights = np.concatenate([weights, np.reshape(fps.weights, (-1, n))]).astype(np.float32)
    all_sigmas = np.concatenate([sigmas, np.asarray(fps.sigmas, float)])
    return all_centres, all_weights, all_sigmas, events


def _confuse_runs(rng, model, weights, peaks, visible, vis, events) -> None:
    """Stretches labelled off by one or two levels (the repetitive-pattern failure)."""
    n = NUM_CHANNELS
    for _ in range(rng.poisson(model.confusion_runs) if vis.size else 0):
        start = int(rng.choice(vis))
        length = int(rng.integers(1, model.confusion_max_length + 1))
        run = [v for v in range(start, min(start + length, n)) if visible[v]]
        if rng.random() < 0.8:  # mostly within one region
            run = [v for v in run if region(LEVELS_26[v]) == region(LEVELS_26[start])]
        shift = int(rng.choice([-1, 1])) * (1 if rng.random() < 0.8 else 2)
        run = [v for v in run if 0 <= v + shift < n]
        if not run:
            continue
        for v in run:
            weights[v, v + shift] = max(weights[v, v + shift], peaks[v] * rng.uniform(0.6, 1.0))
            weights[v, v] *= rng.uniform(0.0, 0.4)
        events.append({"kind": "confusion", "levels": [LEVELS_26[v] for v in run], "shift": shift})


def _bleed_into_neighbours(rng, model, weights, visible, events) -> None:
    """The same blob, weaker, in neighbouring channels."""
    n = NUM_CHANNELS
    for v in range(n):
        main = int(np.argmax(weights[v]))
        for step, prob, span in ((1, model.bleed1_prob, model.bleed1_weight), (2, model.bleed2_prob, model.bleed2_weight)):
            for side in (-1, 1):
                c = main + side * step
                if 0 <= c < n and rng.random() < prob:
                    w = weights[v, main] * rng.uniform(*span)
                    if w > weights[v, c]:
                        weights[v, c] = w
                        if visible[v]:
                            events.append({"kind": "bleed", "label": LEVELS_26[v], "channel": c, "weight": round(float(w), 3)})


def _weaken(rng, model, weights, vis, border_mm, fractures, events) -> None:
    """Weak or missing vertebrae; fractured bodies are often weak, and so are bodies cut by the border."""
    fractured = {CHANNEL_OF[f["label"]] for f in fractures}
    for v in vis:
        r = rng.random()
        if r < model.missing_prob:
            weights[v] *= rng.uniform(0.0, 0.1)
            events.append({"kind": "missing", "label": LEVELS_26[v]})
        elif r < model.missing_prob + model.weak_prob or (v in fractured and rng.random() < 0.5):
            weights[v] *= rng.uniform(0.15, 0.45)
            events.append({"kind": "weak", "label": LEVELS_26[v]})
        elif border_mm[v] < 10.0 and rng.random() < model.edge_weak_prob:
            weights[v] *= rng.uniform(0.4, 0.9)
            events.append({"kind": "edge_weak", "label": LEVELS_26[v]})


class _FalsePositives:
    """Blobs where no vertebral body is: screws, rib heads, the pelvis, discs, anywhere."""

    def __init__(self, rng, sigma: float, events: list):
        self.rng, self.sigma, self.events = rng, sigma, events
        self.centres, self.weights, self.sigmas = [], [], []

    def add(self, kind, position, channels, weight, **info) -> None:
        n = NUM_CHANNELS
        w = np.zeros(n)
        for c in channels:
            if 0 <= c < n:
                w[c] = weight
        if not w.any():
            return
        self.centres.append(position)
        self.weights.append(w)
        self.sigmas.append(self.sigma * self.rng.uniform(0.8, 1.2))
        self.events.append({"kind": "false_positive", "type": kind, "channels": [int(c) for c in np.flatnonzero(w)],
                            "weight": round(float(weight), 3), "position": np.round(position, 2).tolist(), **info})

    def metal(self, model, weights, centres, visible, vis, right, anterior) -> None:
        """Fixation: a run of hidden vertebrae with screw-like blobs beside them."""
        rng, n = self.rng, NUM_CHANNELS
        lumbar_vis = [v for v in vis if CHANNEL_OF["T10"] <= v <= CHANNEL_OF["S1"]]
        if not (lumbar_vis and rng.random() < model.metal_prob):
            return
        start = int(rng.choice(lumbar_vis))
        run = [v for v in range(start, min(start + int(rng.integers(1, 4)), n)) if visible[v]]
        for v in run:
            weights[v] *= rng.uniform(0.0, 0.3)
        self.events.append({"kind": "metal", "levels": [LEVELS_26[v] for v in run]})
        for v in run:
            if rng.random() < 0.6:
                pos = centres[v] + rng.choice([-1, 1]) * rng.uniform(10, 30) * right - rng.uniform(10, 25) * anterior
                self.add("screw", pos, [v + int(rng.integers(-1, 2))], rng.uniform(0.2, 0.6))

    def off_the_bodies(self, model, centres, vis, grid, right, anterior, superior) -> None:
        """Rib heads, the pelvis, discs and anywhere in the scan, in their usual proportions."""
        rng, n = self.rng, NUM_CHANNELS
        thoracic_vis = [v for v in vis if region(LEVELS_26[v]) == "T"]
        pelvic_vis = [v for v in vis if v >= CHANNEL_OF["L4"]]
        for _ in range(rng.poisson(model.false_positives)):
            kind = rng.choice(["rib", "pelvis", "anywhere", "disc"], p=[0.4, 0.2, 0.25, 0.15])
            weight = rng.uniform(0.2, 0.7)
            if kind == "rib" and thoracic_vis:
                v = int(rng.choice(thoracic_vis))
                pos = (centres[v] + rng.choice([-1, 1]) * rng.uniform(30, 50) * right
                       - rng.uniform(5, 20) * anterior + rng.uniform(-5, 5) * superior)
                self.add("rib", pos, [v + int(rng.integers(-1, 2))], weight, near=LEVELS_26[v])
            elif kind == "pelvis" and pelvic_vis:
                v = int(rng.choice(pelvic_vis))
                pos = (centres[v] + rng.choice([-1, 1]) * rng.uniform(40, 80) * right
                       + rng.uniform(-30, 30) * anterior - rng.uniform(0, 40) * superior)
                self.add("pelvis", pos, [int(rng.integers(CHANNEL_OF["L5"], n))], weight, near=LEVELS_26[v])
            elif kind == "disc" and vis.size >= 2:
                v = int(rng.choice(vis[:-1]))
                pos = 0.5 * (centres[v] + centres[v + 1])
                self.add("disc", pos, [v + int(rng.integers(0, 2))], weight * 0.7, near=LEVELS_26[v])
            else:
                pos = grid.voxel_to_world(rng.uniform(0, 1, 3) * (np.array(grid.shape3) - 1))
                self.add("anywhere", pos, [int(rng.integers(0, n))], weight)
