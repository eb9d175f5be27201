"""What makes a scan hard (Wang et al. 2021, Figs. 1 and 5): compression fractures, metal
implants with streak artefacts, low-dose noise and blur, a limited field of view, and the
image geometry (spacing, orientation).
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from .render import F32, Capsule, Ellipsoid, Solid
from .spine_shape import Segment, SpineShape

#: Genant grades: remaining fraction of the collapsed height.
FRACTURE_GRADES = {"mild": 0.78, "moderate": 0.65, "severe": 0.48}
FRACTURE_TYPES = ("wedge", "biconcave", "crush")

HU_TITANIUM = 7000.0
HU_COBALT_CHROME = 14000.0
METAL_THRESHOLD_HU = 3500.0  # above anything bone reaches; marks metal for the streaks


# --------------------------------------------------------------------------- fractures


def fracture(kind: str, grade: str) -> dict:
    """Height factors of a collapsed body: anterior, posterior, overall (for the stacking)."""
    f = FRACTURE_GRADES[grade]
    if kind == "wedge":
        return {"kind": kind, "grade": grade, "anterior_factor": f, "posterior_factor": 1.0 - 0.1 * (1 - f),
                "height_factor": 0.5 * (1 + f), "extra_concavity": 0.0}
    if kind == "biconcave":
        return {"kind": kind, "grade": grade, "anterior_factor": 1.0 - 0.2 * (1 - f), "posterior_factor": 1.0 - 0.2 * (1 - f),
                "height_factor": 1.0 - 0.25 * (1 - f), "extra_concavity": 10.0 * (1 - f)}
    return {"kind": kind, "grade": grade, "anterior_factor": f, "posterior_factor": f * 1.05,
            "height_factor": f * 1.02, "extra_concavity": 1.0}


def choose_fracture_levels(names: list[str], count: int, rng) -> list[str]:
    """Osteoporotic fractures cluster at the thoracolumbar junction and mid-thoracic spine."""
    candidates = [n for n in names if n[0] in "TL" and n not in ("T1", "T2", "T3")]
    if not candidates or count <= 0:
        return []
    weight = np.array([3.0 if n in ("T11", "T12", "T13", "L1", "L2") else 1.5 if n in ("T7", "T8", "T9") else 1.0
                       for n in candidates])
    count = min(count, len(candidates))
    return list(rng.choice(candidates, size=count, replace=False, p=weight / weight.sum()))


# --------------------------------------------------------------------------- metal


def pedicle_screws(spine: SpineShape, levels: list[str], rng, rods: bool = True) -> list[Solid]:
    """Bilateral pedicle screws (titanium, 6.5 mm) with tulip heads, joined by rods."""
    out = []
    heads = {-1.0: [], 1.0: []}
    for name in levels:
        seg = spine.segment(name)
        if seg is None:
            continue
        d = seg.dims
        from .skeleton import (
            _body,  # local import: skeleton imports this module's users
        )

        _, offset = _body(seg)
        y_wall = -d.depth / 2 - offset
        xp = d.canal_width / 2 + d.pedicle_width / 2
        z_p = 0.12 * d.height
        converge = np.radians(rng.uniform(8, 18) if name[0] == "L" else rng.uniform(4, 10))
        length = min(0.85 * d.depth + (y_wall * -1 - d.depth / 2) + 18, 55.0)
        for side in (-1.0, 1.0):
            entry = np.array([side * (xp + 3.0), y_wall - 0.6 * d.canal_depth - 6.0, z_p])
            direction = np.array([-side * np.sin(converge), np.cos(converge), 0.0])
            tip = entry + direction * length
            tip[1] = min(tip[1], d.depth / 2 - offset - 3.0)
            head = entry - direction * 9.0
            parts = [Capsule(seg.to_patient(entry), seg.to_patient(tip), (3.25, 3.25), (2.6, 2.6), None, 0.5),
                     Ellipsoid(seg.to_patient(head), seg.frame, (6.5, 6.0, 7.0), shell=0.5)]
            out.append(Solid(f"screw {name} {side:+.0f}", parts, HU_TITANIUM, HU_TITANIUM, metal=True))
            heads[side].append(seg.to_patient(head - np.array([0.0, 2.0, 0.0])))
    if rods:
        for side, pts in heads.items():
            if len(pts) >= 2:
                pts = np.array(pts)
                a = pts[0] + (pts[0] - pts[1]) / np.linalg.norm(pts[0] - pts[1]) * 8.0
                b = pts[-1] + (pts[-1] - pts[-2]) / np.linalg.norm(pts[-1] - pts[-2]) * 8.0
                path = np.vstack([a, pts, b])
                caps = [Capsule(p, q, (2.75, 2.75), (2.75, 2.75), None, 0.5) for p, q in zip(path[:-1], path[1:])]
                out.append(Solid(f"rod {side:+.0f}", caps, HU_TITANIUM, HU_TITANIUM, metal=True))
    return out


def hip_prosthesis(hip: np.ndarray, neck_end: np.ndarray, shaft_low: np.ndarray, head_radius: float, rng) -> list[Solid]:
    """Total hip: cobalt-chrome ball in a metal cup, titanium stem down the femoral canal."""
    ball = rng.uniform(14.0, 18.0)
    cup_out = head_radius + rng.uniform(2.0, 5.0)
    medial = -np.sign(neck_end[0] - hip[0])
    cup_axis = np.array([medial * 0.7, 0.0, 0.7]) / np.sqrt(0.98)  # opening faces lateral-inferior
    cup = Ellipsoid(hip, np.eye(3), (cup_out,) * 3, shell=0.5, hollow=3.0)
    cup.planes = [(hip - cup_axis * 2.0, -cup_axis)]
    stem = Capsule(neck_end + (hip - neck_end) * 0.15, shaft_low, (9.0, 6.0), (5.0, 4.5), None, 0.5)
    neck = Capsule(hip, neck_end, (6.5, 6.5), (8.0, 8.0), None, 0.5)
    return [
        Solid("prosthesis cup", [cup], HU_TITANIUM, HU_TITANIUM, metal=True),
        Solid("prosthesis head", [Ellipsoid(hip, np.eye(3), (ball,) * 3, shell=0.5)], HU_COBALT_CHROME,
              HU_COBALT_CHROME, metal=True),
        Solid("prosthesis stem", [neck, stem], HU_TITANIUM, HU_TITANIUM, metal=True),
    ]


def metal_streaks(ct: np.ndarray, spacing: np.ndarray, rng, strength: float = 1.0) -> int:
    """Add streak artefacts in every axial slice holding metal (in place); returns the count.

    A fast analytic stand-in for beam hardening and photon starvation: dark bands along the
    lines joining metal objects (and continuing past them), and alternating bright/dark rays
    fanning out from each object, fading with distance. Amplitudes grow with the metal area.
    The pattern of a slice is reused for the next one (metal changes little from slice to
    slice), which halves the cost.
    """
    metal = ct > METAL_THRESHOLD_HU
    slices = np.flatnonzero(metal.any(axis=(0, 1)))
    if slices.size == 0:
        return 0
    nx, ny = ct.shape[:2]
    X = (np.arange(nx, dtype=F32) * F32(spacing[0]))[:, None]
    Y = (np.arange(ny, dtype=F32) * F32(spacing[1]))[None, :]
    # ray pattern as a lookup table over the angle (three angular frequencies)
    phases = rng.uniform(0, 2 * np.pi, size=3)
    freqs = rng.integers(9, 17, size=3)
    lut_angles = np.linspace(-np.pi, np.pi, 2048, endpoint=False)
    lut = (sum(np.cos(f * lut_angles + p) for f, p in zip(freqs, phases)) / 3.0).astype(F32)
    lut_scale = F32(2048 / (2 * np.pi))
    streak = None
    previous = None
    for k in slices:
        if previous is not None and k == previous + 1 and streak is not None and (k - slices[0]) % 2 == 1:
            pattern = streak  # reuse the neighbour's pattern
        else:
            pattern = _streak_pattern(metal[:, :, k], X, Y, spacing, strength, lut, lut_scale)
        streak = pattern
        previous = k
        if pattern is not None:
            slab = ct[:, :, k]
            slab += np.where(metal[:, :, k], F32(0), pattern)
    return int(slices.size)


def _streak_pattern(metal_slice, X, Y, spacing, strength, lut, lut_scale):
    labels, n = ndimage.label(metal_slice)
    if n == 0:
        return None
    idx = np.arange(1, n + 1)
    ones = np.ones_like(labels)
    area = ndimage.sum(ones, labels, idx) * spacing[0] * spacing[1]
    centres = np.array(ndimage.center_of_mass(ones, labels, idx)) * spacing[:2]
    keep = area > 4.0
    centres, area = centres[keep], area[keep]
    if len(area) == 0:
        return None
    streak = np.zeros(metal_slice.shape, F32)
    for (cx, cy), a in zip(centres, area):
        dx, dy = X - F32(cx), Y - F32(cy)
        r = np.sqrt(dx * dx + dy * dy) + F32(1.0)
        index = ((np.arctan2(dy, dx) + F32(np.pi)) * lut_scale).astype(np.int32) % len(lut)
        amp = F32(strength * min(a, 400.0) ** 0.5 * 18.0)
        streak += amp * lut[index] / (F32(1.0) + r / F32(120.0)) * np.minimum(F32(1.0), F32(36.0) / r)
    for i in range(len(area)):
        for j in range(i + 1, len(area)):
            (x1, y1), (x2, y2) = centres[i], centres[j]
            length = np.hypot(x2 - x1, y2 - y1)
            if length < 3:
                continue
            nxv, nyv = -(y2 - y1) / length, (x2 - x1) / length
            dist = (X - F32(x1)) * F32(nxv) + (Y - F32(y1)) * F32(nyv)
            amp = F32(strength * min(area[i], area[j], 300.0) ** 0.5 * 40.0)
            width = F32(4.0 + 0.02 * length)
            streak -= amp * np.exp(-((dist / width) ** 2))
    return streak


# --------------------------------------------------------------------------- noise and blur


def _kernel(sigma: float) -> np.ndarray:
    radius = max(int(np.ceil(3 * sigma)), 1)
    x = np.arange(-radius, radius + 1)
    w = np.exp(-0.5 * (x / sigma) ** 2)
    return w / w.sum()


def noise_and_blur(ct: np.ndarray, spacing, sigma_mm, noise_hu: float, rng, slice_scale=None) -> None:
    """Add noise of final standard deviation `noise_hu` and blur with a Gaussian PSF (in place).

    The noise is added before the blur so it is correlated like real CT noise; its amplitude is
    raised by the blur's attenuation of white noise. `slice_scale` (nz,) varies it per slice.
    """
    sigma_vox = [s / sp for s, sp in zip(sigma_mm, spacing)]
    gain = 1.0
    for s in sigma_vox:
        if s >= 0.2:
            gain *= float(np.sqrt((_kernel(s) ** 2).sum()))
    if noise_hu > 0:
        white = rng.standard_normal(ct.shape, dtype=F32)
        white *= F32(noise_hu / gain)
        if slice_scale is not None:
            white *= slice_scale.astype(F32).reshape(1, 1, -1)
        ct += white
        del white
    for axis, s in enumerate(sigma_vox):
        if s >= 0.2:
            ndimage.correlate1d(ct, _kernel(s).astype(F32), axis=axis, output=ct, mode="nearest")


# --------------------------------------------------------------------------- geometry


def random_rotation(max_deg: float, rng, exact: bool = False) -> np.ndarray:
    """A rotation about a random axis by up to `max_deg` degrees (exactly, with `exact`)."""
    if max_deg <= 0:
        return np.eye(3)
    axis = rng.standard_normal(3)
    axis /= np.linalg.norm(axis)
    angle = np.radians(max_deg if exact else rng.uniform(0, max_deg))
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * (k @ k)


def body_extent_along(seg: Segment, axis: np.ndarray) -> tuple[float, float]:
    """Lowest and highest coordinate of a segment's body along `axis` (approximately)."""
    d = seg.dims
    half = np.abs(seg.frame.T @ axis) @ np.array([d.width / 2, d.depth / 2, d.height / 2])
    c = float(seg.centre @ axis)
    return c - half, c + half
