"""Bones and their neighbours as `Solid`s in the patient frame: vertebrae (body + posterior
elements), discs, spinal canal, sacrum and coccyx, ribs with costal cartilage, sternum,
clavicles, scapulae, pelvis and femurs.

Everything is placed from the segment poses of `spine_shape` and the per-level dimensions of
`morphometry`; a vertebra's local origin is the centroid of its body, so the ground-truth
position of every level is exactly the rendered body's centre (C1, which has no body: the
centre of its ring, midway between the lateral masses).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...engine.anatomy import LABEL_IDS, VERSE_IDS
from .render import Capsule, Ellipsoid, FunnelShell, Solid, VertebralBody, tube
from .spine_shape import Segment, SpineShape

Z_UP = np.array([0.0, 0.0, 1.0])


@dataclass
class BoneDensity:
    """HU of bone tissues for one patient (age and osteoporosis lower the cancellous value)."""

    cortex: float = 1300.0
    cancellous: float = 220.0
    rib_core: float = 180.0
    disc_annulus: float = 95.0
    disc_nucleus: float = 75.0


def _unit(v):
    v = np.asarray(v, float)
    return v / np.linalg.norm(v)


def _rib_count(spine: SpineShape, options) -> list[str]:
    names = [s.name for s in spine.segments if s.name.startswith("T")]
    if options.get("rib_pairs", 12) == 11 and names:
        names = names[:-1]
    return names


# --------------------------------------------------------------------------- vertebrae


def _body(seg: Segment) -> tuple[VertebralBody, float]:
    """The body primitive in the segment's local frame and its centroid offset along y."""
    d = seg.dims
    region = seg.name[0]
    h_ant, h_post = d.height_ant, d.height_post
    concavity = {"C": 0.6, "T": 1.0, "L": 1.5, "S": 0.8}.get(region, 0.8)
    if seg.fracture:
        f = seg.fracture
        h_ant *= f["anterior_factor"]
        h_post *= f["posterior_factor"]
        concavity += f.get("extra_concavity", 0.0)
    exponent = {"C": 2.6, "T": 2.2, "L": 2.5, "S": 2.4}.get(region, 2.3)
    post = {"C": 0.5, "T": 1.5, "L": 3.0, "S": 2.0}.get(region, 1.0)
    # the rounded rims and the waist make the rendered extremes ~2 % (width) and ~6 % (depth)
    # smaller than the nominal box; compensate so that the rendered body has the published size
    body = VertebralBody(
        np.zeros(3), np.eye(3), d.width * 1.02, d.depth * 1.06, h_ant, h_post, concavity=concavity,
        waist={"T": 0.07, "L": 0.07, "S": 0.0}.get(region, 0.04), exponent=exponent, posterior_concavity=post,
        rounding={"C": 1.2, "S": 1.0}.get(region, 1.8), shell=0.8 if region != "C" else 0.7,
        endplate={"C": 1.0, "T": 1.3, "L": 1.5, "S": 1.2}.get(region, 1.2),
    )
    offset = body.centroid_offset()
    body.centre = -offset
    return body, float(offset[1])


def _local_solid(seg: Segment, parts_local, name, shell_hu, core_hu, label=0, body=(), carve=()) -> Solid:
    """Solid whose primitives were built in the segment frame, moved into the patient frame."""
    parts = [p.transformed(seg.frame, seg.centre) for p in parts_local]
    carved = [p.transformed(seg.frame, seg.centre) for p in carve]
    solid = Solid(name, parts, shell_hu, core_hu, label=label, carve=carved, texture=0.3)
    solid.body = list(body)
    return solid


def _posterior_elements(seg: Segment, y_wall: float, options) -> list:
    """Pedicles, laminae, spinous and transverse processes, articular processes (local frame)."""
    d = seg.dims
    region = seg.name[0]
    level = int(seg.name[1:]) if seg.name[1:].isdigit() else 0
    h = d.height
    cw, cd = d.canal_width, d.canal_depth
    pw, ph = d.pedicle_width, d.pedicle_height
    parts = []
    xp = cw / 2 + pw / 2  # pedicle axis: its medial wall borders the canal
    y_j = y_wall - 0.6 * cd  # pedicle-lamina junction
    z_p = 0.12 * h if region != "C" else 0.0
    x_start = min(xp, d.width / 2 - pw / 3)
    lam_t = {"C": 2.6, "T": 3.0, "L": 3.6}[region]
    lam_h = {"C": 0.45, "T": 0.55, "L": 0.5}[region] * h + (4 if region == "L" else 2)
    y_lam = y_wall - cd - lam_t
    z_lam = -0.05 * h
    shell = {"C": 0.9, "T": 1.0, "L": 1.1}[region]
    for side in (-1.0, 1.0):
        # pedicle
        parts.append(Capsule([side * x_start, y_wall + 3, z_p], [side * xp, y_j, z_p],
                             (ph / 2, pw / 2), (ph / 2, pw / 2 * 1.1), Z_UP, shell))
        # lamina (a tilted plate from the junction to the midline)
        up = _unit([0.0, -0.45, 1.0])
        parts.append(Capsule([side * xp, y_j - 1, z_lam], [side * 2.0, y_lam, z_lam],
                             (lam_h / 2, lam_t), (lam_h / 2, lam_t), up, shell))
        # articular processes
        if region == "C":
            # articular pillar: one column per side, facets sloping ~45 degrees
            col_x = xp + 2.5
            parts.append(Capsule([side * col_x, y_j + 1, 0.45 * h + 2.5], [side * col_x, y_j - 3, -0.45 * h - 2.5],
                                 (5.0, 5.0), (5.0, 5.0), None, shell))
        else:
            sup_len = 0.5 * h + 0.6 * d.disc_below + 2
            x_sup = xp + (1.5 if region == "L" else 0.5)
            y_sup = y_j + (0.0 if region == "L" else 1.0)
            r_sup = 4.5 if region == "L" else 3.5
            parts.append(Capsule([side * x_sup, y_sup, z_p], [side * x_sup, y_sup - 2, sup_len],
                                 (r_sup, r_sup), (r_sup, r_sup * 0.8), None, shell))
            x_inf = xp - (2.5 if region == "L" else 0.5)
            y_inf = y_j - (5.0 if region == "L" else 3.5)
            parts.append(Capsule([side * x_inf, y_inf + 1, -0.1 * h], [side * x_inf, y_inf - 1, -0.5 * h - 0.6 * d.disc_below],
                                 (r_sup, r_sup), (r_sup * 0.9, r_sup * 0.7), None, shell))
        # transverse process
        tip_x = d.tp_span / 2
        if region == "L":
            tp_a = [side * xp, y_j + 1, z_p - 1]
            tp_b = [side * tip_x, y_j - 4, z_p - 2]
            r_a, r_b = (5.5, 3.5), (3.5, 2.5)
            if seg.name == options.get("sacralized") or (seg.name == "L5" and options.get("sacralized") == "L5"):
                tp_b = [side * (tip_x + 6), y_j - 2, z_p - 0.45 * h]
                r_a, r_b = (9.0, 6.0), (13.0, 9.0)
        elif region == "T":
            back = 0.45 if level <= 10 else 0.25
            tp_a = [side * xp, y_j + 1, z_p]
            tp_b = [side * tip_x, y_j - back * (tip_x - xp), z_p + 3]
            r_a, r_b = (5.0, 4.0), (5.5, 4.5)
            if level >= 12 or seg.name == "T13":
                tp_b = [side * min(tip_x, xp + 14), y_j - 6, z_p]
                r_a, r_b = (4.5, 3.5), (3.5, 3.0)
        else:  # cervical: anterior and posterior roots around the transverse foramen
            tp_a = [side * (xp + 1), y_j + 1, 0.0]
            tp_b = [side * tip_x, y_wall + 1, -1.0]
            r_a, r_b = (3.5, 2.8), (3.5, 3.2)
            parts.append(Capsule([side * (d.width / 2 - 1), 1.0, -0.5], [side * tip_x, y_wall + 4, -1.5],
                                 (3.0, 2.5), (3.2, 3.0), Z_UP, shell))
        parts.append(Capsule(tp_a, tp_b, r_a, r_b, Z_UP, shell))
    # spinous process
    base = np.array([0.0, y_lam + 1, z_lam])
    if region == "L":
        angle, r_base, r_tip = 12.0, (10.0, 3.5), (9.0, 4.0)
    elif region == "T":
        angle = {1: 25, 2: 35, 3: 45, 4: 55, 5: 60, 6: 62, 7: 62, 8: 58, 9: 50, 10: 40, 11: 30, 12: 20}.get(level, 20)
        r_base, r_tip = (5.5, 3.0), (5.0, 3.5)
    else:
        angle = 30.0 if level in (2, 7) else 20.0
        r_base, r_tip = (4.0, 2.5), ((6.0, 4.5) if level == 7 else (3.5, 2.5))
        if level == 2:
            r_base, r_tip = (7.0, 4.0), (6.0, 5.0)
    a = np.radians(angle)
    tip = base + d.spinous_length * np.array([0.0, -np.cos(a), -np.sin(a)])
    parts.append(Capsule(base, tip, r_base, r_tip, _unit([0.0, -np.sin(a), np.cos(a)]), shell))
    if region == "C" and level not in (1, 7):  # bifid tips
        for side in (-1.0, 1.0):
            parts.append(Ellipsoid(tip + [side * 2.5, 1.0, 0.0], np.eye(3), (2.5, 3.0, 3.0), shell=0.8))
    return parts


def _dens(seg: Segment, offset: float) -> Capsule:
    """C2's odontoid process, rising ~15 mm above the body (local frame)."""
    top = seg.dims.height / 2
    return Capsule([0, 1.0 - offset, top - 3], [0, 1.5 - offset, top + 15.0], (5.0, 5.0), (4.0, 4.0), None, 0.9)


def c2_centre_offset(seg: Segment, step_mm: float = 0.5) -> np.ndarray:
    """Local offset of the centroid of C2's body and dens from the body centre.

    Annotations place C2 there rather than at the body's own centre (in VID's ground truth the
    C2 -> C3 distance is 24 mm against 17-18 mm between the cervical bodies below), so the
    phantoms' C2 truth follows them.
    """
    body, offset = _body(seg)
    parts = [body, _dens(seg, offset)]
    boxes = [part.bbox() for part in parts]
    lo = np.min([b[0] for b in boxes], axis=0)
    hi = np.max([b[1] for b in boxes], axis=0)
    axes = [np.arange(lo[a], hi[a] + step_mm, step_mm, dtype=np.float32) for a in range(3)]
    X, Y, Z = np.meshgrid(*axes, indexing="ij")
    inside = np.zeros(X.shape, bool)
    for part in parts:
        inside |= part.sdf(X, Y, Z) <= 0
    return np.array([X[inside].mean(), Y[inside].mean(), Z[inside].mean()], float)


def vertebra_solid(seg: Segment, density: BoneDensity, options) -> Solid:
    """A C2..L6 vertebra (body first) with its VerSe label."""
    body, offset = _body(seg)
    y_wall = -seg.dims.depth / 2 - offset
    parts = [body] + _posterior_elements(seg, y_wall, options)
    if seg.name == "C2":
        top = seg.dims.height / 2
        parts.append(_dens(seg, offset))
        for side in (-1.0, 1.0):  # superior facets bearing C1's lateral masses
            parts.append(Ellipsoid([side * 12.5, -2.0 - offset, top - 2], np.eye(3), (6.0, 7.0, 4.0), shell=0.9))
    core = density.cancellous
    if seg.fracture:
        core = core * 1.15 + 15  # compacted trabeculae in a collapsed body
    solid = _local_solid(seg, parts, seg.name, density.cortex, core, label=VERSE_IDS.get(seg.name, 0),
                         body=[(0, LABEL_IDS[seg.name])])
    return solid


def atlas_solid(seg: Segment, density: BoneDensity) -> Solid:
    """C1: anterior and posterior arches, lateral masses and transverse processes (no body)."""
    s = seg.dims.width / 78.0  # ring scale
    lm = [Ellipsoid([side * 17 * s, 1.0 * s, 0.0], np.eye(3), (7.0 * s, 9.0 * s, 7.5 * s), shell=1.0) for side in (-1, 1)]
    ant = tube(np.array([[-15, 7, 0], [-9, 13, 0], [0, 15.5, 0], [9, 13, 0], [15, 7, 0]], float) * s,
               [(5.0, 3.0)] * 5, Z_UP, shell=1.0)
    post_pts = np.array([[-17, -5, 0], [-15, -17, 1], [-8, -25, 1.5], [0, -28, 1.5], [8, -25, 1.5], [15, -17, 1], [17, -5, 0]], float) * s
    post = tube(post_pts, [(3.5, 3.0)] * 7, Z_UP, shell=1.0)
    tps = [Capsule([side * 22 * s, -1.0 * s, 0.0], [side * 37 * s, -3.0 * s, -1.0], (4.5, 3.5), (4.0, 4.0), Z_UP, 1.0)
           for side in (-1, 1)]
    tubercle = [Ellipsoid([0, 16.5 * s, 0], np.eye(3), (5.0, 3.0, 6.0), shell=1.0),
                Ellipsoid([0, -29 * s, 1.5], np.eye(3), (4.0, 3.5, 5.0), shell=1.0)]
    parts = lm + ant + post + tps + tubercle
    return _local_solid(seg, parts, "C1", density.cortex, density.cancellous, label=VERSE_IDS["C1"], body=[])


def sacrum_solid(segments: list[Segment], density: BoneDensity) -> Solid:
    """S1-S5 fused with the alae, the dorsal wall over the sacral canal and the median crest."""
    parts, body = [], []
    s1 = segments[0]
    for seg in segments:
        b, offset = _body(seg)
        parts.append(b.transformed(seg.frame, seg.centre))
        if seg.name in LABEL_IDS:
            body.append((len(parts) - 1, LABEL_IDS[seg.name]))
    d1 = s1.dims
    scale = d1.width / 50.0
    s3 = segments[2] if len(segments) > 2 else segments[-1]
    moved = []
    for side in (-1.0, 1.0):
        # lateral mass: a wedge from the wide alae at S1 to the narrow S3-S4 level
        top = s1.to_patient(np.array([side * 30.0, -8.0, 2.0]) * scale)
        bottom = s3.to_patient(np.array([side * 13.0, -9.0, -4.0]) * scale)
        moved.append(Capsule(top, bottom, (15.0 * scale, 19.0 * scale), (9.0 * scale, 8.0 * scale), s1.y, 1.0))
        # the ala's upper surface, flaring to the sacroiliac joint
        moved.append(Ellipsoid(s1.to_patient(np.array([side * 33.0, -8.0, 0.0]) * scale), s1.frame,
                               (21 * scale, 15 * scale, 14 * scale), exponent=2.5, shell=1.0))
    # dorsal wall and median crest along the segments
    back = []
    for seg in segments[:4]:
        y_wall = -seg.dims.depth / 2 - seg.dims.canal_depth - 2
        back.append(seg.to_patient([0.0, y_wall, 0.0]))
    back = np.array(back)
    widths = [(seg.dims.canal_width / 2 + 6, 3.5) for seg in segments[:4]]
    dorsal = tube(back, widths, s1.x, shell=1.2)
    crest = tube(back + np.array([s1.y * -4.0]), [(2.5, 4.0)] * len(back), s1.x, shell=1.0)
    walls = []
    for seg in segments[:4]:
        y_wall = -seg.dims.depth / 2
        for side in (-1.0, 1.0):
            x = seg.dims.canal_width / 2 + 3
            walls.append(Capsule(seg.to_patient([side * x * 0.8, y_wall + 2, 0]),
                                 seg.to_patient([side * x, y_wall - seg.dims.canal_depth - 2, 0]),
                                 (seg.dims.height * 0.45, 4.0), (seg.dims.height * 0.45, 4.0), seg.z, 1.0))
    all_parts = parts + moved + dorsal + crest + walls
    # anterior sacral foramina (four pairs) carved through the lateral masses
    foramina = []
    for k, seg in enumerate(segments[:4]):
        nxt = segments[k + 1] if k + 1 < len(segments) else seg
        mid = 0.5 * (seg.centre + nxt.centre)
        frame = seg.frame
        for side in (-1.0, 1.0):
            x = seg.dims.width / 2 + 4
            a = mid + frame @ np.array([side * x, 8.0, 0.0])
            b = mid + frame @ np.array([side * (x - 2), -25.0, 0.0])
            foramina.append(Capsule(a, b, (3.5 * scale, 3.0 * scale), (3.0, 2.5), None, 0.8))
    solid = Solid("sacrum", all_parts, density.cortex, density.cancellous, label=VERSE_IDS["S1"], carve=foramina,
                  texture=0.3)
    solid.body = body
    return solid


def coccyx_solid(segments: list[Segment], density: BoneDensity) -> Solid:
    """The coccyx as one solid of small segments."""
    parts = [Ellipsoid(seg.centre, seg.frame, (seg.dims.width / 2, seg.dims.depth / 2, seg.dims.height / 2), shell=1.0)
             for seg in segments]
    solid = Solid("coccyx", parts, density.cortex * 0.8, density.cancellous, label=0)
    solid.body = []
    return solid


# --------------------------------------------------------------------------- discs and canal


def disc_solids(spine: SpineShape, density: BoneDensity, degeneration: float = 0.0, rng=None) -> list[Solid]:
    """Discs between consecutive bodies (C2-C3 ... L5-S1, plus the residual S1-S2 disc)."""
    out = []
    segs = spine.segments
    for upper, lower in zip(segs[:-1], segs[1:]):
        if upper.name == "C1" or upper.name.startswith("Co") or (upper.name.startswith("S") and upper.name != "S1"):
            continue
        bu, ou = _body(upper)
        bl, ol = _body(lower)
        frame = _mean_frame(upper.frame, lower.frame)
        # disc: between the two endplate planes, a bit wider than the bodies (bulge)
        cu = upper.to_patient(bu.centre)
        cl = lower.to_patient(bl.centre)
        centre = 0.5 * (cu + cl)
        width = 0.5 * (bu.width + bl.width) * 1.02
        depth = 0.5 * (bu.depth + bl.depth) * 1.02
        gap = np.linalg.norm(cu - cl)
        height = gap  # spans both body centres; bodies are drawn over it
        disc = VertebralBody(centre, frame, width, depth, height, height, concavity=0.0, waist=0.0,
                             exponent=bu.exponent, posterior_concavity=bu.posterior_concavity, rounding=1.0, shell=4.0)
        ov = 0.6 + bu.concavity
        top_plane = (cu - upper.z * (_half_height(bu) - ov), upper.z)  # keep below the upper endplate
        bottom_plane = (cl + lower.z * (_half_height(bl) - ov), -lower.z)
        disc.planes = [top_plane, bottom_plane]
        annulus, nucleus = density.disc_annulus, density.disc_nucleus
        if upper.name == "S1":
            annulus = nucleus = 0.5 * (density.cancellous + density.disc_annulus)
        solid = Solid(f"disc {upper.name}-{lower.name}", [disc], annulus, nucleus)
        out.append(solid)
        if rng is not None and degeneration > 0 and upper.name[0] in "L" and rng.random() < degeneration * 0.5:
            # vacuum phenomenon: gas in a degenerated disc
            gas = Ellipsoid(centre + frame[:, 1] * depth * 0.1, frame, (width * 0.25, depth * 0.2, 1.5), shell=0.0)
            out.append(Solid(f"vacuum {upper.name}", [gas], -700.0, -700.0))
    return out


def _half_height(body: VertebralBody) -> float:
    return min(body.height_ant, body.height_post) / 2


def _mean_frame(a, b):
    z = _unit(a[:, 2] + b[:, 2])
    y = a[:, 1] + b[:, 1]
    y = _unit(y - z * (y @ z))
    return np.stack([np.cross(y, z), y, z], axis=1)


def canal_solids(spine: SpineShape) -> list[Solid]:
    """Epidural fat, thecal sac (CSF) and the cord (down to L1) along the spinal canal."""
    pts, radii = [], []
    for seg in spine.segments:
        if seg.name.startswith("Co") or seg.name in ("S4", "S5"):
            continue
        d = seg.dims
        if seg.name == "C1":
            centre = seg.to_patient([0.0, -9.0, 0.0])
        else:
            _, offset = _body(seg)
            centre = seg.to_patient([0.0, -d.depth / 2 - offset - d.canal_depth / 2, 0.0])
        pts.append(centre)
        radii.append((d.canal_depth / 2 + 1, d.canal_width / 2 + 1))
    pts, radii = np.array(pts), np.array(radii)
    out = [Solid("epidural fat", tube(pts, radii, None, shell=2.0), -60.0, -90.0, partitioned=True)]
    sac = radii * np.array([0.7, 0.62])
    out.append(Solid("thecal sac", tube(pts, sac, None, shell=0.5), 12.0, 10.0, partitioned=True))
    names = [s.name for s in spine.segments if not s.name.startswith("Co") and s.name not in ("S4", "S5")]
    end = names.index("L2") if "L2" in names else len(names) - 1
    cord_r = np.array([[6.0 if n[0] == "C" else 4.5, 7.5 if n[0] == "C" else 5.0] for n in names[: end + 1]])
    out.append(Solid("cord", tube(pts[: end + 1], cord_r, None, shell=0.5), 32.0, 34.0, partitioned=True))
    return out


# --------------------------------------------------------------------------- thorax


#: Rib-cage ellipse (outer rib surface) per rib: half-width, half-depth (adult male, mm), and
#: how far the anterior end drops below the tubercle.
RIB_HALF_WIDTH = [60, 85, 102, 115, 124, 130, 134, 136, 136, 134, 128, 120, 112]
RIB_HALF_DEPTH = [42, 55, 65, 72, 78, 82, 85, 87, 88, 88, 86, 84, 82]
RIB_DROP = [35, 55, 68, 76, 82, 86, 88, 84, 74, 58, 36, 24, 18]
RIB_END_DEG = [150, 152, 154, 155, 155, 154, 152, 142, 130, 118, 100, 78, 60]


@dataclass
class RibCage:
    """Where the chest wall is: per rib level the ellipse the ribs follow (patient frame)."""

    centres: np.ndarray  # (n, 3) ellipse centres
    half_width: np.ndarray
    half_depth: np.ndarray
    levels: list[str]


def rib_solids(spine: SpineShape, density: BoneDensity, size: float, options) -> tuple[list[Solid], RibCage | None]:
    """Rib pairs as solids, and the rib cage they outline (None without thoracic levels)."""
    names = _rib_count(spine, options)
    if not names:
        return [], None
    solids, centres, hw, hd = [], [], [], []
    for n, name in enumerate(names):
        seg = spine.segment(name)
        d = seg.dims
        k = min(n, len(RIB_HALF_WIDTH) - 1)
        rx = RIB_HALF_WIDTH[k] * size * options.get("chest_width", 1.0)
        ry = RIB_HALF_DEPTH[k] * size * options.get("chest_depth", 1.0)
        _, offset = _body(seg)
        # rib frame: patient vertical, lateral axis from the (possibly rotated) vertebra
        ex = seg.x - Z_UP * (seg.x @ Z_UP)
        ex = _unit(ex)
        ey = np.cross(Z_UP, ex)
        frame = np.stack([ex, ey, Z_UP], axis=1)
        y_post = -(d.depth / 2 + offset + 22 * size)
        yc = y_post + ry
        centres.append(seg.centre + frame @ np.array([0.0, yc, 0.0]))
        hw.append(rx)
        hd.append(ry)
        y_wall = -d.depth / 2 - offset
        xp = d.canal_width / 2 + d.pedicle_width / 2
        y_j = y_wall - 0.6 * d.canal_depth
        tip_x = d.tp_span / 2
        y_tp = y_j - 0.45 * (tip_x - xp)
        z_tp = 0.12 * d.height + 3
        drop = RIB_DROP[k] * size
        end = np.radians(RIB_END_DEG[k])
        for side in (-1.0, 1.0):
            head = np.array([side * (d.width / 2 + 1.0), y_wall + 0.25 * d.depth, 0.45 * d.height])
            tubercle = np.array([side * (tip_x - 2), y_tp + 3.5, z_tp])
            x0 = min(tip_x + 8, rx * 0.95)
            phi0 = np.arcsin(x0 / rx)
            phis = np.linspace(phi0, end, 12)
            frac = (phis - phi0) / (end - phi0)
            arc = np.stack([side * rx * np.sin(phis), yc - ry * np.cos(phis), z_tp - drop * frac**1.4], -1)
            arc[0, 1] = min(arc[0, 1], tubercle[1] - 3)
            pts_local = np.vstack([head, tubercle, arc])
            pts = pts_local @ frame.T + seg.centre
            n_pts = len(pts)
            radii = np.array([(5.0, 5.0), (5.5, 4.5)] + [(6.0 * size, 3.2 * size)] * (n_pts - 2))
            radii[-1] = (6.5 * size, 3.5 * size)
            if k == 0:
                radii[2:] = (3.5 * size, 7.0 * size)  # the first rib is flat and broad
            solids.append(Solid(f"rib {name} {'R' if side > 0 else 'L'}", tube(pts, radii, Z_UP, shell=1.1),
                                density.cortex * 0.95, density.rib_core, partitioned=True))
            # costal cartilage towards the sternum (ribs 1-10)
            if k <= 9:
                start = pts_local[-1]
                if k <= 6:
                    target = np.array([side * (18.0 + 3 * k) * size, yc + ry - 6 * size, z_tp - drop - 4 + 6 * max(k - 2, 0)])
                else:
                    target = np.array([side * (40 + 18 * (k - 6)) * size, yc + ry * 0.9, z_tp - drop + 25])
                mid = 0.5 * (start + target) + np.array([0.0, 6.0, -6.0 if k < 5 else 6.0])
                cart = np.array([start, mid, target]) @ frame.T + seg.centre
                solids.append(Solid(f"cartilage {name} {'R' if side > 0 else 'L'}",
                                    tube(cart, [(5.5 * size, 3.5 * size)] * 3, Z_UP, shell=0.8),
                                    150.0, 110.0, partitioned=True))
    cage = RibCage(np.array(centres), np.array(hw), np.array(hd), names)
    return solids, cage


def sternum_solids(spine: SpineShape, cage: RibCage, density: BoneDensity, size: float) -> list[Solid]:
    """Manubrium, body and xiphoid on the anterior chest wall (T2-T10 heights)."""
    def front(level_index, dz=0.0):
        k = min(level_index, len(cage.centres) - 1)
        c = cage.centres[k]
        return np.array([c[0], c[1] + cage.half_depth[k] - 4 * size, c[2] + dz])

    if len(cage.centres) < 10:
        return []
    top = front(1, -20 * size)
    angle = front(2, -45 * size)
    low = front(6, -75 * size)
    xiph = front(7, -85 * size)
    man_c = 0.5 * (top + angle)
    man_frame = np.stack([[1.0, 0, 0], _unit(np.cross(_unit(top - angle), [1.0, 0, 0])), _unit(top - angle)], 1)
    manubrium = Ellipsoid(man_c, man_frame, (26 * size, 6.5 * size, np.linalg.norm(top - angle) / 2 + 4), exponent=2.6, shell=1.0)
    body_c = 0.5 * (angle + low)
    body_frame = np.stack([[1.0, 0, 0], _unit(np.cross(_unit(angle - low), [1.0, 0, 0])), _unit(angle - low)], 1)
    body = Ellipsoid(body_c, body_frame, (15 * size, 5.5 * size, np.linalg.norm(angle - low) / 2 + 3), exponent=2.8, shell=1.0)
    xiphoid = Capsule(low, xiph, (3.0, 8.0 * size), (2.0, 4.0 * size), [0, 1.0, 0], 0.8)
    solid = Solid("sternum", [manubrium, body, xiphoid], density.cortex * 0.8, density.cancellous * 0.9)
    solid.body = []
    # clavicles: from the manubrium's upper corners out to the shoulders, curving back
    out = [solid]
    for side in (-1.0, 1.0):
        a = top + np.array([side * 22 * size, -4 * size, 2 * size])
        pts = np.array([a, a + [side * 45 * size, 8 * size, 10 * size], a + [side * 95 * size, -10 * size, 18 * size],
                        a + [side * 140 * size, -50 * size, 22 * size]])
        out.append(Solid(f"clavicle {'R' if side > 0 else 'L'}", tube(pts, [(7 * size, 6 * size)] * 4, Z_UP, shell=1.6),
                         density.cortex, density.cancellous, partitioned=True))
    return out


def scapula_solids(spine: SpineShape, cage: RibCage, density: BoneDensity, size: float) -> list[Solid]:
    """Flat scapular blades on the posterior chest wall (ribs 2-7) with spine and glenoid."""
    if len(cage.centres) < 8:
        return []
    out = []
    top, bottom = cage.centres[1], cage.centres[7]
    centre = 0.5 * (top + bottom)
    rx = float(np.mean(cage.half_width[1:8])) + 12 * size
    ry = float(np.mean(cage.half_depth[1:8])) + 12 * size
    height = top[2] - bottom[2]
    for side in (-1.0, 1.0):
        frame = np.eye(3) if side > 0 else np.diag([-1.0, 1.0, 1.0])
        blade = FunnelShell(centre, frame, (rx, rx), (ry, ry), (0.0, 0.0), (-height / 2 - 10, height / 2 + 5),
                            (22.0, 62.0), thickness=2.5, rim=5.0, root=3.0, crest_rise=0.0, shell=1.0)
        spine_start = centre + frame @ np.array([rx * np.sin(np.radians(25)), -ry * np.cos(np.radians(25)), height / 2 - 8])
        spine_end = centre + frame @ np.array([rx * np.sin(np.radians(68)) + 5, -ry * np.cos(np.radians(68)) - 10, height / 2 + 12])
        spine_bar = Capsule(spine_start, spine_end, (4.0, 3.0), (8.0, 5.0), Z_UP, 1.2)
        glenoid = Ellipsoid(centre + frame @ np.array([rx * 0.98, -ry * 0.15, height / 2 - 5]), np.eye(3),
                            (9 * size, 12 * size, 16 * size), shell=1.2)
        solid = Solid(f"scapula {'R' if side > 0 else 'L'}", [blade, spine_bar, glenoid], density.cortex * 0.9,
                      density.cancellous)
        solid.body = []
        out.append(solid)
    return out


# --------------------------------------------------------------------------- pelvis


@dataclass
class PelvisGeometry:
    """Where the pelvis is: hip centres, femoral head radius and the iliac frame."""

    hip_centres: np.ndarray  # (2, 3) femoral head centres (right, left)
    head_radius: float
    frame: np.ndarray
    origin: np.ndarray


def pelvis_geometry(spine: SpineShape, size: float, sex: str, pelvic_tilt_deg: float = 0.0) -> PelvisGeometry:
    """The pelvis placed on the sacrum for this patient (size, sex, tilt)."""
    s1 = spine.segment("S1")
    t = np.radians(pelvic_tilt_deg)
    frame = np.array([[1, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]], float)
    half = (88.0 if sex == "female" else 84.0) * size
    hips = np.array([s1.centre + frame @ np.array([side * half, 32.0 * size, -88.0 * size]) for side in (1.0, -1.0)])
    head = (21.5 if sex == "female" else 24.0) * size
    return PelvisGeometry(hips, head, frame, s1.centre.copy())


def pelvis_solids(geom: PelvisGeometry, density: BoneDensity, size: float, sex: str, prosthesis_sides=()) -> list[Solid]:
    """Iliac bones, pubis and femora as solids (a prosthesis side has no femoral head)."""
    out = []
    wide = 1.08 if sex == "female" else 1.0
    for k, side in enumerate((1.0, -1.0)):
        hip = geom.hip_centres[k]
        mirror = np.diag([side, 1.0, 1.0])
        frame = geom.frame @ mirror
        o = geom.origin

        def P(x, y, z):
            return o + frame @ (np.array([x, y, z], float) * size)

        ilium = FunnelShell(
            o + frame @ (np.array([0.0, 0.0, 0.0]) * size), frame,
            radius_x=(92 * wide * size, 150 * wide * size), radius_y=(110 * size, 180 * size),
            centre_y=(95 * size, 150 * size), z_range=(-62 * size, 30 * size), angle_range=(15.0, 68.0),
            thickness=2.5 * size, rim=9.0 * size, root=16.0 * size, crest_rise=18 * size, shell=1.3,
            start_angle_bottom=40.0,
        )
        acetabulum = Ellipsoid(hip + frame @ np.array([4.0, 0.0, 6.0]) * size, frame,
                               (geom.head_radius + 9 * size, geom.head_radius + 10 * size, geom.head_radius + 10 * size), shell=1.5)
        iliac_body = Capsule(P(62, 4, -35), hip + frame @ np.array([6.0, -4.0, 12.0]) * size, (14.0, 11.0), (18.0, 14.0), None, 1.5)
        si_block = Capsule(P(48, -22, 6), P(58, -10, -30), (14.0, 9.0), (12.0, 10.0), None, 1.5)
        pubic_sup = Capsule(hip + frame @ np.array([-6.0, 18.0, -6.0]) * size, P(8, 118, -112), (9.0, 7.0), (11.0, 6.0), None, 1.4)
        ischium = Capsule(hip + frame @ np.array([-4.0, -14.0, -10.0]) * size, P(52, 12, -150), (12.0, 10.0), (13.0, 11.0), None, 1.6)
        pubic_inf = Capsule(P(50, 20, -152), P(8, 108, -128), (7.0, 6.0), (9.0, 6.0), None, 1.3)
        symphysis = Ellipsoid(P(7, 114, -120), frame, (6.0 * size, 9.0 * size, 19.0 * size), shell=1.4)
        socket = Ellipsoid(hip, np.eye(3), (geom.head_radius + 1.5,) * 3, shell=1.2)
        side_name = "R" if side > 0 else "L"
        solid = Solid(f"hip bone {side_name}", [ilium, acetabulum, iliac_body, si_block, pubic_sup, ischium, pubic_inf, symphysis],
                      density.cortex, density.cancellous * 0.95, carve=[socket])
        solid.body = []
        out.append(solid)
        # femur: head, neck, greater trochanter and shaft
        neck_dir = frame @ _unit([1.0, -0.25, -0.8])
        neck_end = hip + neck_dir * 48 * size
        troch = neck_end + frame @ np.array([8.0, -6.0, 10.0]) * size
        shaft_top = neck_end + frame @ np.array([2.0, 0.0, -12.0]) * size
        shaft_bottom = shaft_top + frame @ np.array([-18.0, 6.0, -380.0]) * size
        parts = [
            Capsule(shaft_top, shaft_bottom, (15.5 * size,) * 2, (13.0 * size,) * 2, None, 5.0),
            Capsule(hip, neck_end, (15.0 * size, 13.0 * size), (18.0 * size, 16.0 * size), None, 1.8),
            Ellipsoid(troch, frame, (12 * size, 14 * size, 18 * size), shell=1.5),
            Ellipsoid(shaft_top + frame @ np.array([-12.0, -8.0, -8.0]) * size, frame, (9 * size, 8 * size, 10 * size), shell=1.5),
        ]
        if side_name not in prosthesis_sides:
            parts.append(Ellipsoid(hip, np.eye(3), (geom.head_radius,) * 3, shell=1.0))
        solid = Solid(f"femur {side_name}", parts, density.cortex * 1.05, density.cancellous * 0.8)
        solid.body = []
        out.append(solid)
    return out


def femur_axis(geom: PelvisGeometry, side_index: int, size: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Head centre, neck end and a point 150 mm down the shaft (for implants)."""
    hip = geom.hip_centres[side_index]
    side = 1.0 if side_index == 0 else -1.0
    frame = geom.frame @ np.diag([side, 1.0, 1.0])
    neck_end = hip + frame @ _unit([1.0, -0.25, -0.8]) * 48 * size
    shaft_top = neck_end + frame @ np.array([2.0, 0.0, -12.0]) * size
    shaft_low = shaft_top + frame @ np.array([-7.0, 2.4, -150.0]) * size
    return hip, neck_end, shaft_low


# --------------------------------------------------------------------------- head


def skull_solids(spine: SpineShape, density: BoneDensity, size: float) -> list[Solid]:
    """Skull (vault with diploe, skull base with the foramen magnum and condyles), brain and
    mandible, placed on C1 so that cervical scans end in a head as real ones do."""
    c1 = spine.segment("C1")
    if c1 is None:
        return []
    s = size
    up = Z_UP
    o = c1.centre
    eye = np.eye(3)
    centre = o + np.array([0.0, 14.0, 98.0]) * s
    radii = np.array([70.0, 90.0, 76.0]) * s
    brain = Solid("brain", [Ellipsoid(centre, eye, tuple(radii - 7 * s), shell=2.0)], 25.0, 35.0)
    vault = Ellipsoid(centre, eye, tuple(radii), shell=1.8, hollow=7.0 * s)
    # skull base: occipital plate sloping down to the foramen magnum, clivus rising in front of it
    occiput = Capsule(o + np.array([0.0, -55.0, 52.0]) * s, o + np.array([0.0, -14.0, 24.0]) * s,
                      (6 * s, 48 * s), (5 * s, 30 * s), [1.0, 0, 0], 1.5)
    clivus = Capsule(o + np.array([0.0, 14.0, 24.0]) * s, o + np.array([0.0, 42.0, 58.0]) * s,
                     (9 * s, 14 * s), (12 * s, 18 * s), [1.0, 0, 0], 1.5)
    petrous = [Capsule(o + np.array([side * 45.0, -5.0, 32.0]) * s, o + np.array([side * 14.0, 30.0, 48.0]) * s,
                       (9 * s, 9 * s), (6 * s, 6 * s), None, 1.5) for side in (-1.0, 1.0)]
    condyles = [Ellipsoid(o + np.array([side * 14.0, 3.0, 11.0]) * s, eye, (7 * s, 10 * s, 6 * s), shell=1.0)
                for side in (-1.0, 1.0)]
    mastoids = [Ellipsoid(o + np.array([side * 50.0, -4.0, 24.0]) * s, eye, (10 * s, 12 * s, 15 * s), shell=1.5)
                for side in (-1.0, 1.0)]
    magnum = Capsule(o + np.array([0.0, -2.0, 8.0]) * s, o + np.array([0.0, -4.0, 45.0]) * s,
                     (16 * s, 14 * s), (16 * s, 14 * s), [0, 1.0, 0], 1.2)
    skull = Solid("skull", [vault, occiput, clivus] + petrous + condyles + mastoids, density.cortex * 1.05,
                  density.cancellous * 2.0, carve=[magnum], texture=0.2)
    skull.body = []
    out = [brain, skull]
    # face: maxilla with air sinuses, mandible (rami up to the jaw joints, body to the chin), teeth
    maxilla = Ellipsoid(o + np.array([0.0, 68.0, 32.0]) * s, eye, (34 * s, 24 * s, 24 * s), shell=2.0, hollow=4.0 * s)
    out.append(Solid("maxilla", [maxilla], density.cortex, density.cancellous * 1.5))
    out.append(Solid("sinus air", [Ellipsoid(o + np.array([0.0, 68.0, 34.0]) * s, eye, (28 * s, 18 * s, 18 * s), shell=0.5)],
                     -900.0, -950.0))
    jaw_pts = [(-48, 10, 42), (-47, 14, 8), (-42, 26, -12), (-28, 55, -20), (0, 74, -24),
               (28, 55, -20), (42, 26, -12), (47, 14, 8), (48, 10, 42)]
    pts = np.array([o + np.array(q, float) * s for q in jaw_pts])
    out.append(Solid("mandible", tube(pts, [(13 * s, 5 * s)] * len(pts), up, shell=2.0),
                     density.cortex * 1.05, density.cancellous * 1.2, partitioned=True))
    teeth = []
    for arch_z, arch_y in ((-10.0, 0.0), (14.0, 4.0)):
        for ang in np.linspace(-70, 70, 12):
            a = np.radians(ang)
            teeth.append(Ellipsoid(o + np.array([36 * np.sin(a), 30 + 36 * np.cos(a) + arch_y, arch_z]) * s, eye,
                                   (3.5 * s, 3.5 * s, 5.0 * s), shell=1.0))
    out.append(Solid("teeth", teeth, 2600.0, 1500.0, partitioned=True))
    return out
