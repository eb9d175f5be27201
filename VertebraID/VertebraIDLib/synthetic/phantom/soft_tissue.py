"""Soft tissue around the skeleton: body outline with subcutaneous fat and a muscle wall, the
abdominal and pelvic contents (organs, bowel with gas and fat), the lungs with vessels, the
mediastinum, airway, aorta, psoas and paraspinal muscles, and the scanner table.

The body outline, its layers, the lungs and the bowel texture are per-slice 2-D shapes whose
parameters vary along the scan axis (evaluated with broadcasting, one pass over the volume);
organs and vessels are `Solid`s rendered in local boxes like the bones.

HU follow what real scans show (ts_lumbar, TotalSegmentator labels, median over organs): fat
-100, muscle 45-55, liver 55, spleen 45, kidney 30 (no contrast), blood 40, bowel 20-40 with
gas, bladder 10, lung -850, air -1000.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .render import F32, Ellipsoid, Grid, Solid, tube
from .spine_shape import SpineShape

HU_AIR = -1000.0
HU_FAT = -100.0
HU_MUSCLE = 50.0
HU_LUNG = -860.0


@dataclass
class Habitus:
    """Body build: sex, overall size, subcutaneous fat (mm at the abdomen), muscle, contrast."""

    sex: str = "male"
    size: float = 1.0
    fat_mm: float = 18.0
    visceral: float = 0.5  # 0..1 share of fat between the bowel loops
    muscle: float = 1.0
    contrast: bool = False  # intravenous contrast
    # enhancement relative to a portal venous phase (aorta ~220 HU): 0.6 = late, 2 = arterial (~400 HU)
    contrast_scale: float = 1.0
    muscle_hu: float = HU_MUSCLE


#: Outline per landmark (adult male, normal weight): (half width, anterior and posterior
#: distance from the body-centre line to the skin), mm.
_OUTLINE = {
    "above": (0.1, 0.1, 0.1),
    "vertex": (25.0, 30.0, 30.0),
    "head": (78.0, 100.0, 98.0),
    "skullbase": (68.0, 95.0, 90.0),
    "C1": (60.0, 75.0, 78.0),
    "C3": (57.0, 58.0, 84.0),
    "C6": (62.0, 58.0, 86.0),
    "T1": (135.0, 70.0, 80.0),
    "T3": (158.0, 118.0, 72.0),
    "T6": (165.0, 150.0, 68.0),
    "T10": (160.0, 160.0, 72.0),
    "L1": (152.0, 148.0, 76.0),
    "L3": (150.0, 128.0, 80.0),
    "L5": (160.0, 128.0, 82.0),
    "S2": (172.0, 150.0, 92.0),
    "hip": (178.0, 160.0, 110.0),
    "thigh": (175.0, 150.0, 110.0),
}


@dataclass
class SliceModel:
    """Per-slice parameters (arrays of length nz) in the grid frame."""

    cx: np.ndarray
    cy: np.ndarray
    half_width: np.ndarray
    ant: np.ndarray
    post: np.ndarray
    fat: np.ndarray
    muscle: np.ndarray
    spine_x: np.ndarray
    spine_y: np.ndarray
    thorax: np.ndarray  # 1 where the slice is within the lungs' height range
    abdomen: np.ndarray  # 1 where the cavity holds bowel (abdomen and pelvis)
    head: np.ndarray  # 1 inside the skull's height range
    cage_cx: np.ndarray
    cage_cy: np.ndarray
    cage_rx: np.ndarray
    cage_ry: np.ndarray
    diaphragm_z: float
    lung_top_z: float


def _landmark_heights(spine: SpineShape, pelvis_hip_z: float) -> dict:
    def z(name, fallback=None):
        s = spine.segment(name)
        return fallback if s is None else float(s.centre[2])

    c1 = z("C1")
    heights = {
        "above": c1 + 172.0,
        "vertex": c1 + 165.0,
        "head": c1 + 85.0,
        "skullbase": c1 + 30.0,
        "C1": c1,
        "C3": z("C3"),
        "C6": z("C6"),
        "T1": z("T1"),
        "T3": z("T3"),
        "T6": z("T6"),
        "T10": z("T10"),
        "L1": z("L1"),
        "L3": z("L3"),
        "L5": z("L5"),
        "S2": z("S2"),
        "hip": pelvis_hip_z,
        "thigh": pelvis_hip_z - 120.0,
    }
    return heights


def slice_model(grid: Grid, spine: SpineShape, cage, hip_z: float, habitus: Habitus) -> SliceModel:
    """Interpolate the outline landmarks and the rib cage to every slice of the grid.

    `spine`, `cage` and `hip_z` are in the grid frame (the patient's long axis is within a few
    degrees of the grid's z axis, so slices are treated as axial).
    """
    nz = grid.shape[2]
    z = grid.origin[2] + grid.spacing[2] * np.arange(nz)
    marks = _landmark_heights(spine, hip_z)
    keys = list(_OUTLINE)
    heights = np.array([marks[k] for k in keys])
    order = np.argsort(heights)
    values = np.array([_OUTLINE[k] for k in keys])[order]
    heights = heights[order]
    s = habitus.size
    female = habitus.sex == "female"
    width_factor = np.ones(len(keys))
    if female:
        for k, name in enumerate(np.array(keys)[order]):
            width_factor[k] = {"T3": 0.92, "T6": 0.92, "T10": 0.94, "L5": 1.05, "S2": 1.08, "hip": 1.08}.get(name, 0.97)
    hw = np.interp(z, heights, values[:, 0] * width_factor) * s
    ant = np.interp(z, heights, values[:, 1]) * s
    post = np.interp(z, heights, values[:, 2]) * s
    centre = spine.centre_at_height(z)
    # fat: thin on the neck and head, thickest on the belly and hips
    fat_profile = np.interp(z, heights, [{"above": 0.1, "vertex": 0.1, "head": 0.15, "skullbase": 0.2, "C1": 0.25, "C3": 0.3, "C6": 0.35}.get(k, 1.0)
                                         for k in np.array(keys)[order]])
    fat = habitus.fat_mm * fat_profile
    extra = np.maximum(fat - 12.0 * fat_profile, 0)
    hw = hw + extra
    ant = ant + 1.3 * extra
    post = post + 0.5 * extra
    muscle = np.interp(z, heights, [{"above": 1, "vertex": 2, "head": 3, "skullbase": 8, "C1": 10, "C3": 10, "C6": 12}.get(k, 14.0)
                                    for k in np.array(keys)[order]]) * habitus.muscle * s
    # rib cage ellipse per slice (lungs live inside it)
    if cage is not None:
        cz = cage.centres[:, 2]
        o = np.argsort(cz)
        cage_cx = np.interp(z, cz[o], cage.centres[o, 0])
        cage_cy = np.interp(z, cz[o], cage.centres[o, 1])
        cage_rx = np.interp(z, cz[o], cage.half_width[o])
        cage_ry = np.interp(z, cz[o], cage.half_depth[o])
        lung_top = float(cz.max() + 25 * s)
        t10 = spine.segment("T10") or spine.segment("T9")
        diaphragm = float(t10.centre[2]) if t10 is not None else float(cz.min())
    else:
        cage_cx = cage_cy = cage_rx = cage_ry = np.zeros(nz)
        lung_top, diaphragm = -np.inf, np.inf
    thorax = ((z > diaphragm - 60 * s) & (z < lung_top)).astype(float)
    l1 = spine.segment("L1")
    upper_abdomen = float(l1.centre[2]) + 60 * s if l1 is not None else diaphragm
    abdomen = ((z < upper_abdomen + 40 * s) & (z > hip_z - 100 * s)).astype(float)
    head = (z > marks["skullbase"] - 10).astype(float)
    return SliceModel(
        cx=centre[:, 0], cy=centre[:, 1], half_width=hw, ant=ant, post=post, fat=fat, muscle=muscle,
        spine_x=centre[:, 0], spine_y=centre[:, 1], thorax=thorax, abdomen=abdomen, head=head,
        cage_cx=cage_cx, cage_cy=cage_cy, cage_rx=cage_rx, cage_ry=cage_ry,
        diaphragm_z=diaphragm, lung_top_z=lung_top,
    )


class SmoothNoise:
    """A smooth random field: a coarse Gaussian grid, linearly interpolated on demand.

    `chunk(k0, k1)` gives the field on slices k0..k1 of a (nx, ny, nz) volume, so large
    volumes are filled slab by slab (the interpolation is separable).
    """

    def __init__(self, shape, cell_vox, rng):
        self.shape = tuple(shape)
        self.cell = [max(float(c), 1.0) for c in cell_vox]
        coarse = [int(np.ceil(n / c)) + 3 for n, c in zip(self.shape, self.cell)]
        field = rng.standard_normal(coarse).astype(F32)
        # upsample x and y once (coarse in z), z per chunk
        for axis in (0, 1):
            field = self._lerp(field, axis, np.arange(self.shape[axis]))
        self._xy = field

    def _lerp(self, field, axis, index):
        pos = index / self.cell[axis] + 0.5
        i0 = np.floor(pos).astype(int)
        w = (pos - i0).astype(F32)
        shp = [1, 1, 1]
        shp[axis] = len(index)
        w = w.reshape(shp)
        a = np.take(field, i0, axis=axis)
        b = np.take(field, i0 + 1, axis=axis)
        return a + (b - a) * w

    def chunk(self, k0, k1):
        """The noise on one block of the grid (deterministic per block)."""
        return self._lerp(self._xy, 2, np.arange(k0, k1))


def _step(d, aa):
    """Partial-volume occupancy of the inside (d < 0) of a distance field."""
    return np.clip(F32(0.5) - d / F32(aa), 0, 1)


_CHUNK_VOXELS = 2_000_000  # voxels per slab: keeps temporaries in cache


def render_soft_tissue(grid: Grid, model: SliceModel, habitus: Habitus, rng) -> np.ndarray:
    """The CT volume before bones: air, body with fat / muscle wall / cavity, lungs, bowel."""
    nx, ny, nz = grid.shape
    ct = np.empty(grid.shape, F32)
    bowel = lung_tex = None
    if model.abdomen.any():
        bowel = SmoothNoise(grid.shape, np.round(11.0 / grid.spacing), rng)
    if model.thorax.any():
        lung_tex = SmoothNoise(grid.shape, np.round(5.0 / grid.spacing), rng)
    chunk = max(1, _CHUNK_VOXELS // (nx * ny))
    for k0 in range(0, nz, chunk):
        k1 = min(k0 + chunk, nz)
        ct[:, :, k0:k1] = _soft_chunk(grid, model, habitus, k0, k1, bowel, lung_tex)
    return ct


def _soft_chunk(grid, model, habitus, k0, k1, bowel, lung_tex):
    nx, ny, _ = grid.shape
    box = (slice(0, nx), slice(0, ny), slice(k0, k1))
    X, Y, Z = grid.axes(box)
    aa = max(grid.antialias_mm, 0.7)

    def p(a):
        return a[k0:k1].astype(F32).reshape(1, 1, -1)

    x = X - p(model.cx)
    y = Y - p(model.cy)
    anterior = y > 0
    half_depth = np.where(anterior, p(model.ant), p(model.post))
    t = (x / p(model.half_width)) ** 2
    u = (y / half_depth) ** 2
    # anterior: ellipse; posterior: flatter (p = 4), as the back rests on the table
    rho = np.where(anterior, np.sqrt(t + u), np.sqrt(np.sqrt(t * t + u * u)))
    r = np.sqrt(x * x + y * y)
    d = r - r / np.maximum(rho, F32(1e-3))
    ct = _step(d, aa) * (F32(HU_FAT) - F32(HU_AIR)) + F32(HU_AIR)
    d += p(model.fat) * np.where(anterior, F32(1.0), F32(0.7))
    ct += (F32(habitus.muscle_hu) - F32(HU_FAT)) * _step(d, aa)
    d += p(model.muscle) * np.where(anterior, F32(1.0), F32(1.6))
    cavity = _step(d, aa)
    ct += (F32(35.0) - F32(habitus.muscle_hu)) * cavity
    if bowel is not None and model.abdomen[k0:k1].any():
        field = bowel.chunk(k0, k1)
        theta = F32(1.1 * habitus.visceral - 0.55)  # more visceral fat -> fewer, thinner loops
        inside = np.clip((field - theta) * 4, 0, 1)  # 0 in the fat between loops, 1 in a loop
        wall = np.clip(1 - np.abs(field - theta - F32(0.12)) * 6, 0, 1)  # bowel wall ridge
        tissue = F32(HU_FAT) + (F32(18.0) - F32(HU_FAT)) * inside + F32(25.0) * wall
        tissue += (F32(HU_AIR) - tissue) * np.clip((field - theta - F32(1.05)) * 5, 0, 1)  # gas in the lumen
        ct += (tissue - F32(35.0)) * cavity * p(model.abdomen)
    if lung_tex is not None and model.thorax[k0:k1].any():
        lx = X - p(model.cage_cx)
        ly = Y - p(model.cage_cy)
        rx, ry = p(model.cage_rx) - 9, p(model.cage_ry) - 9
        inner = np.sqrt((lx / rx) ** 2 + (ly / ry) ** 2)
        d_cage = (inner - 1) * rx * 0.8
        # mediastinum: a band in front of the spine, widest at the heart
        sx = X - p(model.spine_x)
        sy = Y - p(model.spine_y)
        zrel = (Z - F32(model.diaphragm_z)) / F32(max(model.lung_top_z - model.diaphragm_z, 1.0))
        heart = np.clip(1 - np.abs(zrel - 0.25) / 0.35, 0, 1)
        med_w = F32(22) + F32(50) * heart * F32(habitus.size)
        front = np.clip(sy / F32(40), 0, 1)
        d_med = np.abs(sx + F32(18) * heart) - med_w * front - F32(14) * (1 - front)  # heart bulges left (-x)
        d_med = np.maximum(d_med, -(sy + F32(25)))
        # diaphragm: domes lower at the back and sides (costophrenic recesses), right one higher
        dome = (F32(model.diaphragm_z + 25) - F32(0.0025) * lx * lx - F32(0.004) * np.maximum(-ly, 0) ** 2
                + F32(12) * (lx > 0))
        d_lung = np.maximum(np.maximum(d_cage, -d_med), np.maximum(dome - Z, Z - F32(model.lung_top_z) + F32(0.002) * lx * lx))
        lung = _step(d_lung, aa) * cavity * p(model.thorax)
        lung_hu = F32(HU_LUNG) + F32(60) * np.clip(lung_tex.chunk(k0, k1), -1, 1)
        ct += (lung_hu - ct) * lung
    return ct


def table_hu(grid: Grid, back_y: float, rng) -> np.ndarray | None:
    """A 2-D (nx, ny) carbon-fibre table profile below the patient's back, or None if outside."""
    nx, ny, _ = grid.shape
    X, Y, _ = grid.axes((slice(0, nx), slice(0, ny), slice(0, 1)))
    X, Y = X[:, :, 0], Y[:, :, 0]
    top = back_y - 4.0
    curve = top - 0.0012 * X**2
    skin1 = np.abs(Y - curve) - 1.5
    skin2 = np.abs(Y - (curve - 45.0)) - 1.5
    foam = np.abs(Y - (curve - 22.5)) - 21.0
    width = np.abs(X) - 230.0
    aa = max(grid.antialias_mm, 0.7)
    f = _step(np.maximum(foam, width), aa)
    s = np.maximum(_step(np.maximum(skin1, width), aa), _step(np.maximum(skin2, width), aa))
    if not (f.any() or s.any()):
        return None
    return np.stack([f, s])  # occupancies of foam and skins


def organ_solids(spine: SpineShape, cage, hip_centres, habitus: Habitus, rng) -> list[Solid]:
    """Organs and vessels as solids (patient frame): liver, spleen, kidneys, heart, aorta,
    airway, bladder, psoas and paraspinal muscles. (`rng` is kept for the callers' stream order.)"""
    return (_muscle_solids(spine, hip_centres, habitus) + _abdominal_solids(spine, hip_centres, habitus)
            + _heart_and_aorta(spine, cage, habitus) + _airway_solids(spine, habitus))


def _enhanced(habitus: Habitus, plain: float, portal_venous: float) -> float:
    """HU of a tissue: plain without contrast, else scaled from its portal venous value."""
    return plain if not habitus.contrast else plain + (portal_venous - plain) * habitus.contrast_scale


def _muscle_solids(spine: SpineShape, hip_centres, habitus: Habitus) -> list[Solid]:
    """Paraspinal muscles along the whole spine, behind the laminae, and the psoas from L1 to the pelvis."""
    s, seg, muscle = habitus.size, spine.segment, habitus.muscle_hu
    out = []
    pts, radii = [], []
    for g in spine.segments:
        if g.name.startswith("Co") or g.name in ("S4", "S5"):
            continue
        d = g.dims
        region = g.name[0]
        back = d.depth / 2 + d.canal_depth + (20 if region == "L" else 15 if region == "T" else 22)
        pts.append(g.centre - g.y * back)
        width = {"C": 30, "T": 30, "L": 36, "S": 26}[region] * s
        depth = {"C": 24, "T": 20, "L": 26, "S": 14}[region] * s
        radii.append((depth * habitus.muscle, width * habitus.muscle))
    pts = np.array(pts)
    for side in (-1.0, 1.0):
        shifted = pts + np.array([side * 30.0 * s, 0, 0])
        out.append(Solid(f"erector spinae {side:+.0f}", tube(shifted, radii, [0, 1.0, 0], shell=1.5),
                         -40.0, muscle - 5, partitioned=True))
    # psoas: from T12/L1 to the pelvis, growing
    ps = [n for n in ["L1", "L2", "L3", "L4", "L5", "S1"] if seg(n) is not None]
    if len(ps) >= 3:
        for side in (-1.0, 1.0):
            path, widths = [], []
            for k, n in enumerate(ps):
                g = seg(n)
                r = (6 + 4.5 * k) * s * habitus.muscle
                path.append(g.centre + np.array([side * (g.dims.width / 2 + r * 0.8), 0.0, 0.0]) + g.y * (k * 2.0))
                widths.append((r, r * 0.85))
            if hip_centres is not None:
                hip = hip_centres[0 if side > 0 else 1]
                path.append(hip + np.array([-side * 12.0, 28.0, 25.0]) * s)
                widths.append((20 * s, 15 * s))
            out.append(Solid(f"psoas {side:+.0f}", tube(np.array(path), widths, [0, 0, 1.0], shell=1.5),
                             -60.0, muscle, partitioned=True))
    return out


def _abdominal_solids(spine: SpineShape, hip_centres, habitus: Habitus) -> list[Solid]:
    """Liver, spleen, stomach, kidneys (with perirenal fat and sinus) and the bladder above the symphysis."""
    s, seg, eye = habitus.size, spine.segment, np.eye(3)
    out = []
    t11, l1 = seg("T11"), seg("L1")
    if t11 is not None and l1 is not None:
        liver_c = t11.centre + np.array([62.0, 68.0, -5.0]) * s
        out.append(Solid("liver", [Ellipsoid(liver_c, eye, (85 * s, 82 * s, 80 * s), exponent=2.3, shell=2.0)],
                         _enhanced(habitus, 60.0, 105.0), _enhanced(habitus, 58.0, 110.0)))
        out.append(Solid("spleen", [Ellipsoid(t11.centre + np.array([-85.0, 15.0, -10.0]) * s, eye,
                                              (28 * s, 45 * s, 55 * s), shell=2.0)], 45.0, _enhanced(habitus, 45.0, 120.0)))
        out.append(Solid("stomach", [Ellipsoid(t11.centre + np.array([-55.0, 95.0, 0.0]) * s, eye, (45 * s, 35 * s, 55 * s),
                                               shell=4.0)], 40.0, 10.0))
        for side, name in ((1.0, "right"), (-1.0, "left")):
            base = l1 if side > 0 else t11
            c = base.centre + np.array([side * 62.0, 2.0, -15.0 if side > 0 else -20.0]) * s
            frame = _rot_z(np.radians(15) * side)
            kid = Ellipsoid(c, frame, (28 * s, 22 * s, 55 * s), shell=5.0)
            out.append(Solid(f"perirenal fat {name}", [Ellipsoid(c, frame, (40 * s, 33 * s, 68 * s), shell=3.0)], -90.0, -85.0))
            out.append(Solid(f"kidney {name}", [kid], _enhanced(habitus, 32.0, 190.0), _enhanced(habitus, 25.0, 140.0)))
            out.append(Solid(f"renal sinus {name}", [Ellipsoid(c + np.array([-side * 14.0, 8.0, 0.0]) * s, frame,
                                                               (9 * s, 8 * s, 22 * s), shell=0.5)], -60.0, -80.0))
    if hip_centres is not None:
        mid = hip_centres.mean(0)
        out.append(Solid("bladder", [Ellipsoid(mid + np.array([0.0, 55.0, 10.0]) * s, eye, (40 * s, 35 * s, 32 * s),
                                               shell=3.0)], 35.0, 10.0))
    return out


def _heart_and_aorta(spine: SpineShape, cage, habitus: Habitus) -> list[Solid]:
    """The heart in its pericardial fat, and the aorta from its root over the arch down to the bifurcation."""
    s, seg = habitus.size, spine.segment
    out = []
    t4, t8 = seg("T4"), seg("T8")
    if t8 is not None and cage is not None:
        heart_c = t8.centre + np.array([-15.0, 75.0, 0.0]) * s
        frame = _rot_z(np.radians(-35)) @ _rot_x(np.radians(25))
        out.append(Solid("pericardial fat", [Ellipsoid(heart_c, frame, (68 * s, 52 * s, 58 * s), shell=4.0)], -90.0, -90.0))
        out.append(Solid("heart", [Ellipsoid(heart_c, frame, (62 * s, 47 * s, 53 * s), shell=4.0)],
                         45.0, _enhanced(habitus, 40.0, 180.0)))
    if t4 is None:
        return out
    path, radii = [], []
    if t8 is not None:
        path.append(t8.centre + np.array([5.0, 70.0, 20.0]) * s)
        radii.append((14 * s, 14 * s))
        path.append(t4.centre + np.array([5.0, 65.0, -10.0]) * s)
        radii.append((14 * s, 14 * s))
    path.append(t4.centre + np.array([-5.0, 40.0, 12.0]) * s)
    radii.append((12 * s, 12 * s))
    g4 = seg("T5") or t4
    path.append(g4.centre + np.array([-22.0, 14.0, 5.0]) * s)
    radii.append((12 * s, 12 * s))
    for n in ["T7", "T9", "T11", "L1", "L3", "L4"]:
        g = seg(n)
        if g is None:
            continue
        anterior = 14.0 if n[0] == "T" else 22.0
        path.append(g.centre + np.array([-18.0 + (6.0 if n[0] == "L" else 0.0), anterior, 0.0]) * s +
                    g.y * (g.dims.depth / 2 - 12))
        radii.append(((11 if n[0] == "T" else 9) * s,) * 2)
    if len(path) >= 2:
        out.append(Solid("aorta", tube(np.array(path), radii, [0, 0, 1.0], shell=1.2), 45.0,
                         _enhanced(habitus, 40.0, 220.0), partitioned=True))
    return out


def _airway_solids(spine: SpineShape, habitus: Habitus) -> list[Solid]:
    """Pharynx and trachea in front of the cervical spine down to the carina, and the main bronchi."""
    s, seg = habitus.size, spine.segment
    if seg("C2") is None or seg("T5") is None:
        return []
    path = []
    for n in ["C2", "C4", "C6", "T1", "T3", "T5"]:
        g = seg(n)
        if g is not None:
            lead = {"C2": 14.0, "C4": 16.0, "C6": 24.0}.get(n, 30.0)
            path.append(g.centre + g.y * (g.dims.depth / 2 + lead * s))
    path = np.array(path)
    radii = [(9 * s, 12 * s)] * len(path)
    out = [Solid("airway", tube(path, radii, [0, 1.0, 0], shell=2.5), 20.0, HU_AIR, partitioned=True)]
    for side in (-1.0, 1.0):
        b = np.array([path[-1], path[-1] + np.array([side * 45.0, 5.0, -30.0]) * s])
        out.append(Solid("bronchus", tube(b, [(7 * s, 7 * s), (5 * s, 5 * s)], None, shell=2.0), 20.0, HU_AIR,
                         partitioned=True))
    return out


def _rot_z(a):
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])


def _rot_x(a):
    c, s = np.cos(a), np.sin(a)
    return np.array([[1.0, 0, 0], [0, c, -s], [0, s, c]])
