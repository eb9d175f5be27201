"""The spine's 3-D course: sagittal curvature, scoliosis, and a pose (centre + frame) per segment.

Segments are stacked along a curve by their body heights and disc heights, so the
centre-to-centre distances follow the morphometry (and shrink where a fracture lowers a body).
The sagittal profile is a curvature function of arc length made of smooth bumps whose
integrals are the clinical angles: lumbar lordosis (L1-S1), thoracic kyphosis (T4-T12),
upper thoracic kyphosis (T1-T4), cervical lordosis (C2-C7) and sacral kyphosis (S1-S5).
Scoliosis adds lateral sine bumps whose end tangents differ by the Cobb angle, with the
vertebrae of the curve rotated axially towards the convex side.

Frame convention (patient RAS): each segment's frame has columns x (patient right when
unrotated), y (anterior), z (superior along the spine).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .morphometry import LevelDims

#: Distance (mm, adult male) from the C2 body centre to the C1 ring's centre (midpoint of the
#: lateral masses, which rest on C2's superior facets beside the dens).
C1_ABOVE_C2_MM = 18.0


@dataclass
class Curvature:
    """Sagittal angles (degrees). Positive kyphosis / lordosis are the normal directions."""

    sacral_slope: float = 45.0  # start angle of the integration; the final pose is set by the S2-T7 chord
    lumbar_lordosis: float = 50.0
    thoracic_kyphosis: float = 38.0
    upper_thoracic_kyphosis: float = 8.0
    cervical_lordosis: float = 20.0
    sacral_kyphosis: float = 30.0
    sagittal_tilt: float = 0.0  # whole-spine lean relative to the patient's long axis


@dataclass
class ScoliosisCurve:
    """One lateral curve: its Cobb angle and the levels it spans."""

    cobb_deg: float  # > 0: convex to the patient's right
    upper: str  # end vertebrae of the curve
    lower: str
    rotation_per_cobb: float = 0.35  # apical axial rotation (deg) per degree of Cobb angle


@dataclass
class Segment:
    """One vertebra or sacral/coccygeal segment placed in the patient frame."""

    name: str
    dims: LevelDims
    centre: np.ndarray = field(default_factory=lambda: np.zeros(3))  # body centre (C1: ring centre)
    frame: np.ndarray = field(default_factory=lambda: np.eye(3))
    arc: float = 0.0
    fracture: dict | None = None
    axial_rotation: float = 0.0  # degrees (scoliosis)

    @property
    def x(self):
        return self.frame[:, 0]

    @property
    def y(self):
        return self.frame[:, 1]

    @property
    def z(self):
        return self.frame[:, 2]

    def to_patient(self, local) -> np.ndarray:
        """Patient coordinates of local offsets (..., 3)."""
        return np.asarray(local, float) @ self.frame.T + self.centre


@dataclass
class SpineShape:
    """The spine as segments (one per level) with frames and a centreline."""

    segments: list[Segment]
    curve_arc: np.ndarray  # dense arc samples (M,)
    curve_points: np.ndarray  # (M, 3) patient mm, the body-centre line

    def segment(self, name: str) -> Segment | None:
        """The segment of a level (None when the spine has none)."""
        for s in self.segments:
            if s.name == name:
                return s
        return None

    def centre_at_height(self, z: np.ndarray) -> np.ndarray:
        """(x, y) of the body-centre line at patient heights z (clamped to its ends)."""
        order = np.argsort(self.curve_points[:, 2])
        zc = self.curve_points[order, 2]
        x = np.interp(z, zc, self.curve_points[order, 0])
        y = np.interp(z, zc, self.curve_points[order, 1])
        return np.stack([x, y], -1)


def _bump(s, a, b, total):
    """Raised-cosine curvature on [a, b] integrating to `total` (radians)."""
    lo, hi = min(a, b), max(a, b)
    width = max(hi - lo, 1e-6)
    inside = (s >= lo) & (s <= hi)
    return np.where(inside, total * (1 - np.cos(2 * np.pi * (s - lo) / width)) / width, 0.0)


def _gap(upper: Segment, lower: Segment) -> float:
    """Centre-to-centre arc distance between consecutive segments."""
    if upper.name == "C1":
        return C1_ABOVE_C2_MM * lower.dims.width / 17.0
    hu = _body_height(upper)
    hl = _body_height(lower)
    if upper.name.startswith("S") or upper.name.startswith("Co"):
        return 0.5 * (hu + hl) + (1.0 if upper.name == "S1" else -2.5)  # fused; a residual S1-S2 disc
    return 0.5 * (hu + hl) + upper.dims.disc_below


def _body_height(seg: Segment) -> float:
    h = seg.dims.height
    if seg.fracture:
        h *= seg.fracture["height_factor"]
    return h


def build_spine(segments: list[Segment], curvature: Curvature, scoliosis: list[ScoliosisCurve] = ()) -> SpineShape:
    """Place `segments` (cranial to caudal, containing S1) along the curve; fills centre/frame."""
    names = [s.name for s in segments]
    if "S1" not in names:
        raise ValueError("The spine needs an S1 segment as its anchor.")
    # arc length: 0 at S1, increasing upwards
    i_s1 = names.index("S1")
    arc = np.zeros(len(segments))
    for i in range(i_s1 - 1, -1, -1):
        arc[i] = arc[i + 1] + _gap(segments[i], segments[i + 1])
    for i in range(i_s1 + 1, len(segments)):
        arc[i] = arc[i - 1] - _gap(segments[i - 1], segments[i])
    pos = {n: a for n, a in zip(names, arc)}

    def at(name, default):
        return pos.get(name, default)

    top_lumbar = "L1"
    last_thoracic = "T13" if "T13" in pos else "T12"
    s_dense = np.arange(arc[-1] - 40.0, arc[0] + 60.0, 0.5)
    rad = np.radians
    kappa = np.zeros_like(s_dense)
    # lordosis is concentrated caudally (about two thirds at L4-S1)
    mid_lumbar = at("L3", pos["S1"] + 100)
    kappa -= _bump(s_dense, pos["S1"] - 8, mid_lumbar, 0.62 * rad(curvature.lumbar_lordosis))
    kappa -= _bump(s_dense, mid_lumbar - 10, at(top_lumbar, pos["S1"] + 180) + 10, 0.38 * rad(curvature.lumbar_lordosis))
    kappa += _bump(s_dense, at(last_thoracic, 200), at("T4", 330), rad(curvature.thoracic_kyphosis))
    kappa += _bump(s_dense, at("T4", 330), at("T1", 400), rad(curvature.upper_thoracic_kyphosis))
    kappa -= _bump(s_dense, at("C7", 430), at("C2", 500), rad(curvature.cervical_lordosis))
    kappa += _bump(s_dense, arc[-1] - 20, pos.get("S2", pos["S1"] - 25), rad(curvature.sacral_kyphosis))
    # superior-direction angle (positive: leaning anteriorly), anchored at S1 by the sacral slope
    theta = np.cumsum(kappa) * 0.5
    theta += rad(curvature.sacral_slope) - np.interp(pos["S1"], s_dense, theta)
    dy = np.sin(theta) * 0.5
    dz = np.cos(theta) * 0.5
    y = np.cumsum(dy)
    z = np.cumsum(dz)
    y -= np.interp(pos["S1"], s_dense, y)
    z -= np.interp(pos["S1"], s_dense, z)
    x = np.zeros_like(y)
    rotation = np.zeros_like(y)
    for curve in scoliosis:
        a, b = pos.get(curve.lower), pos.get(curve.upper)
        if a is None or b is None or b <= a:
            continue
        length = b - a
        amp = length / np.pi * np.tan(np.radians(abs(curve.cobb_deg)) / 2) * np.sign(curve.cobb_deg)
        inside = (s_dense >= a) & (s_dense <= b)
        shape = np.where(inside, np.sin(np.pi * (s_dense - a) / length), 0.0)
        x += amp * shape
        rotation += curve.rotation_per_cobb * curve.cobb_deg * shape
    points = np.stack([x, y, z], -1)
    # patient long axis: supine, the back rests on the sacrum and the thoracic kyphosis, so
    # the chord from S2 to T7 lies along the table (plus a lean)
    top_point = points[np.argmin(np.abs(s_dense - at("T7", pos["S1"] + 300)))]
    chord = top_point - points[np.argmin(np.abs(s_dense - at("S2", pos["S1"] - 25)))]
    tilt = np.arctan2(chord[1], chord[2]) - rad(curvature.sagittal_tilt)
    c, s = np.cos(tilt), np.sin(tilt)
    rot_x = np.array([[1, 0, 0], [0, c, -s], [0, s, c]])  # rotates the chord onto +z
    points = points @ rot_x.T
    tangents = np.gradient(points, axis=0)
    tangents /= np.linalg.norm(tangents, axis=1, keepdims=True)
    for seg, a in zip(segments, arc):
        k = int(np.clip(np.round((a - s_dense[0]) / 0.5), 0, len(s_dense) - 1))
        seg.arc = float(a)
        seg.centre = points[k].copy()
        ez = tangents[k]
        ey = np.array([0.0, 1.0, 0.0]) - ez * ez[1]
        ey /= np.linalg.norm(ey)
        ex = np.cross(ey, ez)
        seg.axial_rotation = float(rotation[k])
        ang = np.radians(-seg.axial_rotation)  # body turns towards the convex side
        ca, sa = np.cos(ang), np.sin(ang)
        ex, ey = ca * ex + sa * ey, -sa * ex + ca * ey
        seg.frame = np.stack([ex, ey, ez], axis=1)
    return SpineShape(segments, s_dense, points)
