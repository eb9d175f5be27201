"""Anatomy that names vertebrae on any CT, read from bone: ribs and the sacrum (beyond the paper).

    marks = spine_landmarks(ct, centerline)        # Landmarks: per-sample arrays along the centreline
    marks.rib       P(a vertebra whose body centre is at this sample carries a rib pair)
    marks.sacrum    P(this sample is at the S1 body or below)
    marks.rib_visible, marks.sacrum_visible  0..1; where 0 the probability is 0.5 (not imaged)
    ll = level_log_likelihood(marks, labels)       # (samples, levels): what it says of each level

T1..T12 carry ribs (the lowest pair marks T12, the first T1); C7 and the lumbar vertebrae carry
none; S1 is the top of the sacrum, wedged between the iliac bones. Bone is bone on every CT, so
unlike the networks' evidence this does not depend on what the training images looked like.
`ct` is a Volume in HU (any orientation, 0.5-8 mm voxels, bone-only or with contrast);
`centerline` runs cranial -> caudal and may be several mm off the bodies. Method:

1. Own frame: the centreline is smoothed, then moved onto the spinal canal, found in every
   normal plane as a round dark hole enclosed by bone (black top-hat, weighted by the
   distance to bright tissue and by how many of 8 directions meet bone). The canal is
   visible on any CT (contrast, osteoporosis, bone-only), unlike the bodies' own HU.
2. The CT is straightened around the canal (normal planes, 2 mm, +-150 mm lateral). A 1-D
   grey opening along the spine removes what is taller than a rib at a fixed position
   (bodies, scapulae, kidneys, aorta); the rest, projected over the posterior half (u from
   -55 to +8 mm of the canal), is a coronal map of thin bone.
3. Ribs: for every plane and side, dynamic programming finds the laterally running path from
   30 to 70 mm beside the canal that maximises its weakest link (thin-bone intensity);
   ribs give ~1, transverse processes (ending < 55 mm) and rib tails passing beside a
   lumbar vertebra give ~0. Left/right are aligned (frame tilt), averaged, and read in a
   window 2-14 mm cranial of each body centre (where rib necks leave the column).
4. Sacrum: a level path of trabecular-level bone (scaled between the paraspinal muscles and
   the bodies' own trabecular HU) from the column to 70 mm on both sides (the alae and the
   sacroiliac joints), gated by bone plates 45-100 mm lateral (iliac wings); made monotone
   down the spine. Rib evidence is suppressed from 60 mm above the sacrum downwards.
5. Raw features -> probabilities by logistic maps with a floor (CALIBRATION: fitted on the
   labelled real scans; the floor, 0.04, covers anatomical variants: 11 or 13 rib pairs, lumbar
   and cervical ribs, lumbosacral transitional vertebrae).
Measured on the real scans: `bench/landmarks.py`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

ANTERIOR = np.array([0.0, 1.0, 0.0])


# --------------------------------------------------------------------------- frame


@dataclass
class Frame:
    """A smooth curve every `step` mm (cranial -> caudal) with unit frames.

    u: normal closest to anterior, v = w x u (lateral), w: tangent (caudal).
    """

    points: np.ndarray
    u: np.ndarray
    v: np.ndarray
    w: np.ndarray
    step: float

    def __len__(self):
        return len(self.points)


def _frames(points):
    w = np.gradient(points, axis=0)
    w /= np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-9)
    u = ANTERIOR - (w @ ANTERIOR)[:, None] * w
    n = np.linalg.norm(u, axis=1)
    u = np.where(n[:, None] > 1e-6, u / np.maximum(n, 1e-9)[:, None], np.array([0.0, 0.0, 1.0]))
    v = np.cross(w, u)
    return u, v, w


def smooth_frame(points: np.ndarray, step: float = 2.0, smooth_mm: float = 20.0, tangent_mm: float = 25.0) -> Frame:
    """Resample a polyline by arc length every `step` mm and smooth it (sigma `smooth_mm`).

    The ends are extended linearly before smoothing so that they do not shrink inwards.
    """
    points = np.asarray(points, float)
    seg = np.linalg.norm(np.diff(points, axis=0), axis=1)
    s = np.concatenate([[0.0], np.cumsum(seg)])
    n = max(int(np.floor(s[-1] / step)) + 1, 2)
    sn = np.arange(n) * step
    p = np.stack([np.interp(sn, s, points[:, d]) for d in range(3)], 1)
    sig = smooth_mm / step
    pad = int(3 * sig) + 1
    m = min(len(p) - 1, max(int(round(30.0 / step)), 1))
    head_dir = (p[0] - p[m]) / m
    tail_dir = (p[-1] - p[-1 - m]) / m
    k = np.arange(1, pad + 1)[:, None]
    ext = np.concatenate([p[0] + k[::-1] * head_dir, p, p[-1] + k * tail_dir])
    sm = ndimage.gaussian_filter1d(ext, sig, axis=0, mode="nearest")
    p = sm[pad:pad + len(p)]
    # orientation from a smoother curve: a wobbly tangent swings far lateral points along the spine
    tsig = max(tangent_mm, smooth_mm) / step
    pad2 = int(3 * tsig) + 1
    k2 = np.arange(1, pad2 + 1)[:, None]
    ext2 = np.concatenate([p[0] + k2[::-1] * head_dir, p, p[-1] + k2 * tail_dir])
    pt = ndimage.gaussian_filter1d(ext2, tsig, axis=0, mode="nearest")[pad2:pad2 + len(p)]
    u, v, w = _frames(pt)
    return Frame(p, u, v, w, step)


# --------------------------------------------------------------------------- straightening


@dataclass
class Straight:
    """CT resampled in the normal planes: array (A, L, Z) = (along u, along v, along the curve)."""

    array: np.ndarray
    frame: Frame
    u0: float  # u (mm) of index 0 along axis 0
    v0: float
    plane: float  # in-plane step (mm)

    def u_mm(self):
        return self.u0 + self.plane * np.arange(self.array.shape[0])

    def v_mm(self):
        return self.v0 + self.plane * np.arange(self.array.shape[1])

    def world(self, a, lat, z):
        """RAS of fractional indices (a: along u, lat: along v, z: along the curve)."""
        z = np.clip(np.asarray(z, float), 0, len(self.frame) - 1)
        i0 = np.floor(z).astype(int)
        i1 = np.minimum(i0 + 1, len(self.frame) - 1)
        f = (z - i0)[..., None]
        fr = self.frame

        def lerp(x):
            return x[i0] * (1 - f) + x[i1] * f

        uu = (self.u0 + self.plane * np.asarray(a, float))[..., None]
        vv = (self.v0 + self.plane * np.asarray(lat, float))[..., None]
        return lerp(fr.points) + uu * lerp(fr.u) + vv * lerp(fr.v)


def _affine_of(ct):
    return np.asarray(ct.affine, float)


def straighten(ct, frame: Frame, u_range=(-90.0, 70.0), v_half=150.0, plane=2.0, cval=-1024.0,
               labels=False) -> Straight:
    """Resample `ct` (array + voxel->RAS affine) on the normal planes of `frame`.

    The CT is first cropped to the region sampled and blurred to about `plane` mm resolution
    (anti-aliasing; also tames noise of sharp kernels).
    """
    arr = np.asarray(ct.array)
    aff = _affine_of(ct)
    spacing = np.linalg.norm(aff[:3, :3], axis=0)
    uu = np.arange(u_range[0], u_range[1] + 1e-6, plane)
    vv = np.arange(-v_half, v_half + 1e-6, plane)
    inv = np.linalg.inv(aff)
    # voxel coordinates directly: ijk = M p + t is linear, so transform the frame first
    M, t = inv[:3, :3], inv[:3, 3]
    pc = (frame.points @ M.T + t).astype(np.float32)
    uc = (frame.u @ M.T).astype(np.float32)
    vc = (frame.v @ M.T).astype(np.float32)
    ijk = (pc[None, None] + uu.astype(np.float32)[:, None, None, None] * uc[None, None]
           + vv.astype(np.float32)[None, :, None, None] * vc[None, None]).reshape(-1, 3)
    lo = np.maximum(np.floor(ijk.min(0)).astype(int) - 2, 0)
    hi = np.minimum(np.ceil(ijk.max(0)).astype(int) + 3, np.array(arr.shape[:3]))
    if np.any(hi <= lo):
        out = np.full((len(uu), len(vv), len(frame)), cval, np.float32)
        return Straight(out, frame, float(uu[0]), float(vv[0]), plane)
    crop = np.asarray(arr[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]], np.float32)
    if labels:  # a label map: nearest neighbour, no blurring
        out = ndimage.map_coordinates(crop, (ijk - lo).T, order=0, mode="constant", cval=0, prefilter=False)
        return Straight(out.reshape(len(uu), len(vv), len(frame)), frame, float(uu[0]), float(vv[0]), plane)
    # decimate fine axes (block means) and blur to ~plane resolution
    fac = np.maximum(np.floor(plane / spacing / 1.5).astype(int), 1)
    if np.any(fac > 1):
        sh = (np.array(crop.shape) // fac) * fac
        crop = crop[:sh[0], :sh[1], :sh[2]]
        crop = crop.reshape(sh[0] // fac[0], fac[0], sh[1] // fac[1], fac[1], sh[2] // fac[2], fac[2]).mean((1, 3, 5))
    sp = spacing * fac
    sig = 0.5 * np.sqrt(np.maximum((plane / sp) ** 2 - 1.0, 0.0))
    if np.any(sig > 0.2):
        crop = ndimage.gaussian_filter(crop, np.where(sig > 0.2, sig, 0.0), mode="nearest")
    ijk = (ijk - lo - (fac - 1) / 2.0) / fac
    out = ndimage.map_coordinates(crop, ijk.T, order=1, mode="constant", cval=cval, prefilter=False)
    return Straight(out.reshape(len(uu), len(vv), len(frame)).astype(np.float32), frame, float(uu[0]), float(vv[0]), plane)


# --------------------------------------------------------------------------- the column


def _disk(radius_px):
    r = int(np.ceil(radius_px))
    y, x = np.mgrid[-r:r + 1, -r:r + 1]
    return (x * x + y * y <= radius_px * radius_px).astype(np.float32)


def bone_level(st: Straight, radius=25.0):
    """Robust HU of bright bone near the curve: the 97th percentile of HU within `radius` of it,
    median over the planes that hold bone (cortex and endplates; robust to osteoporosis)."""
    u, v = st.u_mm(), st.v_mm()
    near = (u[:, None] ** 2 + v[None, :] ** 2) <= radius ** 2
    vals = st.array[near]  # (n, Z)
    p97 = np.percentile(vals, 97, axis=0)
    good = p97 > 150
    return float(np.median(p97[good])) if good.any() else float(np.median(p97))


def _enclosure(bright, reach):
    """Per voxel: in how many of 8 in-plane directions a ray meets `bright` within `reach` px."""
    count = np.zeros(bright.shape, np.float32)
    n = int(np.ceil(reach))
    for dx, dy in [(1, 0), (-1, 0), (0, 1), (0, -1), (1, 1), (1, -1), (-1, 1), (-1, -1)]:
        hit = np.zeros_like(bright)
        steps = max(int(round(n / np.hypot(dx, dy))), 1)
        for k in range(1, steps + 1):
            sx, sy = k * dx, k * dy
            src = bright[max(sx, 0):bright.shape[0] + min(sx, 0), max(sy, 0):bright.shape[1] + min(sy, 0)]
            hit[max(-sx, 0):bright.shape[0] + min(-sx, 0), max(-sy, 0):bright.shape[1] + min(-sy, 0)] |= src
        count += hit
    return count


def find_canal(ct, frame: Frame, search=35.0, plane=2.0, smooth_mm=12.0, level=None):
    """Track the spinal canal: the dark tube (CSF/cord, or 0 in bone-only CT) enclosed by bone.

    Per normal plane the black top-hat of HU (clipped to [-100, 0.6 x bone level]; a grey
    closing with a 9 mm disk) is high where a small dark hole is surrounded by bone; lung and
    air (< -200 HU) are excluded. Its maximum within `search` mm of the curve, median- and
    Gaussian-smoothed along the spine (weighted by the top-hat's strength), is the canal.
    Returns (offsets (Z, 2) in (u, v) mm, strength (Z,) in units of the bone level, level).
    """
    half = search + 12.0
    st = straighten(ct, frame, (-half, half), half, plane)
    if level is None:
        level = bone_level(st)
    a = st.array
    B = np.clip(a, -100, 0.6 * level)
    fp = _disk(9.0 / plane).astype(bool)
    C = ndimage.grey_closing(B, footprint=fp[:, :, None]) - B
    C[(a < -200) | (a > 0.3 * level + 60)] = 0
    # a canal is round (>= 10 mm across); the soft-tissue sliver between a body and a
    # contrast-filled aorta also fills under closing but is thin: weight by the distance to bright
    dist = ndimage.distance_transform_edt(B < 0.5 * B.max(), sampling=(plane, plane, 1e4))
    C *= np.clip(dist / 6.0, 0, 1)
    C *= np.clip((_enclosure(B >= 0.5 * B.max(), 18.0 / plane) - 3.0) / 3.0, 0, 1)
    C = ndimage.gaussian_filter(C, (0.7, 0.7, 4.0 / frame.step))
    u, v = st.u_mm(), st.v_mm()
    prior = ((u[:, None] ** 2 + v[None, :] ** 2) < search ** 2)
    flat = (C * prior[:, :, None]).reshape(-1, C.shape[2])
    best = flat.argmax(0)
    ia, il = np.unravel_index(best, C.shape[:2])
    strength = flat[best, np.arange(len(best))] / (0.6 * level + 100)
    cu, cv = u[ia], v[il]
    # robust smoothing: running median, then weighted Gaussian
    w = np.clip((strength - 0.25) / 0.25, 0, 1)
    k = max(int(round(16.0 / frame.step)) | 1, 3)
    cu_m = ndimage.median_filter(cu, k, mode="nearest")
    cv_m = ndimage.median_filter(cv, k, mode="nearest")
    w = w * (np.hypot(cu - cu_m, cv - cv_m) < 8.0)
    sig = smooth_mm / frame.step
    den = ndimage.gaussian_filter1d(w, sig, mode="nearest")
    ou = ndimage.gaussian_filter1d(cu * w, sig, mode="nearest") / np.maximum(den, 1e-6)
    ov = ndimage.gaussian_filter1d(cv * w, sig, mode="nearest") / np.maximum(den, 1e-6)
    good = den > 0.05
    if good.any():  # planes with no canal nearby: hold the nearest good offset (canal_frame extrapolates)
        gi = np.nonzero(good)[0]
        idx = np.arange(len(den))
        ou = np.interp(idx, gi, ou[gi])
        ov = np.interp(idx, gi, ov[gi])
    else:
        ou[:] = 0.0
        ov[:] = 0.0
    return np.stack([ou, ov], 1), strength, level, good


def canal_frame(ct, frame: Frame, plane=2.0, iterations=3):
    """A frame whose curve runs down the spinal canal (see find_canal), plus its strength, the bone
    level and where the canal was found (per sample of the returned frame)."""
    level = None
    search = 35.0
    for _ in range(iterations):
        off, strength, level, good = find_canal(ct, frame, search, plane, level=level)
        pts = frame.points + off[:, :1] * frame.u + off[:, 1:] * frame.v
        pts = _extrapolate_ends(pts, good, frame.step)
        new = smooth_frame(pts, frame.step, 6.0)
        # smoothing resamples by arc length: carry the per-sample results over by position
        where = np.clip(np.round(np.linspace(0, len(frame) - 1, len(new))).astype(int), 0, len(frame) - 1)
        strength, good = strength[where], good[where]
        frame = new
        search = 15.0
    return frame, strength, level, good


def _extrapolate_ends(pts, good, step, fit_mm=30.0):
    """Beyond the planes where the canal was found, continue the canal curve straight along
    its own end direction (not the input centreline's, which past the spine's ends is only an
    extrapolation itself and may be tilted: a tilted frame shifts left ribs against right)."""
    gi = np.nonzero(good)[0]
    if len(gi) < 3:
        return pts
    g0, g1 = gi[0], gi[-1]
    m = max(int(round(fit_mm / step)), 2)
    out = pts.copy()
    if g0 > 0 and g1 - g0 >= m:
        d = pts[g0] - pts[g0 + m]
        d /= max(np.linalg.norm(d), 1e-9)
        k = np.arange(g0, 0, -1)[:, None]  # planes 0..g0-1 lie k steps before g0
        out[:g0] = pts[g0] + k * step * d
    if g1 < len(pts) - 1 and g1 - g0 >= m:
        d = pts[g1] - pts[g1 - m]
        d /= max(np.linalg.norm(d), 1e-9)
        k = np.arange(1, len(pts) - g1)[:, None]
        out[g1 + 1:] = pts[g1] + k * step * d
    return out


# --------------------------------------------------------------------------- lateral bone maps


def lateral_maps(ct, frame: Frame, level: float, plane=2.0, u_range=(-55.0, 40.0), v_half=150.0,
                 open_mm=24.0, rib_u=(-55.0, 8.0), ala_u=(-5.0, 40.0), ala_open_mm=16.0):
    """Coronal maps of the bone beside the canal (u: anterior of the canal, v: lateral).

    The CT is straightened around the canal curve. Thin bone: a 1-D grey opening along the
    spine (`open_mm`) removes whatever is taller than a rib at a fixed (u, v) (vertebral
    bodies, scapulae, kidneys, the aorta); the white top-hat left (ribs, processes,
    endplates) is projected (max) over `rib_u`, and what still projects to broad areas (the
    iliac wings) is removed by the same opening in 2-D. Broad bone: the plain projection
    opened along the spine (bone taller than a rib: alae, iliac wings, scapulae), over all u
    and over `ala_u` (in front of the canal, level with the bodies: the sacral alae).
    Values are HU above a floor (0.3 x bone level, 100-200 HU).
    """
    st = straighten(ct, frame, u_range, v_half, plane, cval=-2000.0)
    a = st.array
    u = st.u_mm()
    in3 = a > -1999.0
    inside = in3.mean(0)
    a = np.where(in3, a, -1000.0)
    floor = float(np.clip(0.3 * level, 100.0, 200.0))
    a = np.clip(a, floor, 1.5 * level) - floor
    n = max(int(round(open_mm / frame.step)), 3)
    ru = (u >= rib_u[0]) & (u <= rib_u[1])
    # Outside the scan counts as bone for the openings: a structure cut by the scan's edge
    # must not look short (thin) there; ribs next to an edge are simply not seen.
    big = float(a.max()) + 1.0
    opened = ndimage.grey_opening(np.where(in3, a, big), size=(1, 1, n))
    thin3 = np.where(in3[ru], a[ru] - opened[ru], 0.0).max(0)
    thin = thin3 - ndimage.grey_opening(np.where(inside > 0.5, thin3, big), size=(1, n))
    thin = np.clip(np.where(inside > 0.5, thin, 0.0), 0, None)
    # (Masking bone plates out of the thin map removed the iliac crests, but also ribs behind
    # scapular remnants in the upper thorax; the pelvis is handled in analyse() instead.)
    # the iliac wings for the sacrum's gate: any bone projecting to a plate (all u)
    solid_all = ndimage.binary_closing(a.max(0) > 0.15 * level, structure=np.ones((3, 3), bool))
    plate_all = ndimage.binary_opening(solid_all, structure=np.ones((3, n), bool))
    opened = np.where(in3, opened, 0.0)
    mip = a.max(0)
    # Sacral alae: trabecular bone (osteoporotic alae are barely above muscle; their cortex is
    # faint), so scaled between the paraspinal muscles and the bodies' own trabecular bone;
    # taller than a rib neck (opening along the spine), level with the bodies.
    raw = np.where(st.array > -1999.0, st.array, -1000.0)
    v = st.v_mm()
    soft, trab = soft_and_trabecular(raw, u, v)
    b = np.clip((raw - soft) / max(trab - soft, 80.0), 0.0, 1.5)
    n2 = max(int(round(ala_open_mm / frame.step)), 3)
    au = (u >= ala_u[0]) & (u <= ala_u[1])
    ala = ndimage.grey_opening(b[au], size=(1, 1, n2)).max(0)
    return dict(thin=thin, mip=mip, ala=ala, plate=plate_all.astype(np.float32), inside=inside, v=v, st=st,
                soft=soft, trab=trab)


def soft_and_trabecular(raw, u, v):
    """Robust HU of the paraspinal muscles (behind the canal, beside the spinous processes) and
    of the bodies' trabecular bone (in front of the canal, on the midline), from a straightened
    array (A, L, Z) around the canal. Bone-only CT (soft tissue set to 0) gives soft = 0."""
    mus = ((u >= -45) & (u <= -20))[:, None] & ((np.abs(v) >= 25) & (np.abs(v) <= 45))[None, :]
    body = ((u >= 14) & (u <= 30))[:, None] & (np.abs(v) <= 8)[None, :]
    m = raw[mus]
    m = m[(m > -300) & (m < 300)]
    soft = float(np.median(m)) if m.size else 40.0
    bvals = raw[body]
    if np.mean(bvals == 0) > 0.2:  # bone-only: body interiors partly blanked
        bvals = bvals[bvals > 0]
        soft = 0.0
    per_plane = np.median(raw[body], axis=0)
    good = per_plane > soft + 30
    trab = float(np.median(per_plane[good])) if good.sum() >= 3 else float(np.median(bvals)) if bvals.size else soft + 150
    return soft, max(trab, soft + 40.0)


def rib_paths(thin, inside, v, level, step, d_start=30.0, d_end=70.0, plane=2.0, bridge_mm=6.0, moves=(0, 1, -1), vis_band=True):
    """Weakest link of the best laterally running thin-bone path from the column, per start plane.

    For each side and each start plane z0 at |v| = d_start, dynamic programming finds the path
    to |v| = d_end that moves one in-plane sample outwards per step and -1..+1 samples along
    the spine (ribs run laterally and downwards; thoracic ribs near the spine almost level),
    maximising its weakest link min(T / t_ref, 1) (T: thin-bone map, t_ref = 0.3 x bone level).
    Breaks shorter than `bridge_mm` (ribs broken up by partial volume) are closed first.
    A rib gives ~1; a transverse process (ends before d_end) or a start beside a rib ~0.
    Returns score (2, Z) (left = -v side first), end plane (2, Z), visible fraction (2, Z).
    """
    t_ref = 0.3 * level
    Z = thin.shape[1]
    out = np.zeros((2, Z))
    end = np.zeros((2, Z), int)
    vis = np.zeros((2, Z))
    nb = max(int(round(bridge_mm / plane)) + 1, 1)
    closed = ndimage.grey_closing(thin, size=(nb, 1)) if nb > 1 else thin
    for side, sign in enumerate((-1, 1)):
        ds = np.arange(d_start, d_end + 1e-6, plane)
        cols = [int(np.argmin(np.abs(v - sign * d))) for d in ds]
        f = np.clip(closed[cols] / t_ref, 0.0, 1.0)  # (n, Z)
        ins = inside[cols]
        n = len(cols)
        V = f[-1].copy()
        E = np.arange(Z)
        VIS = ins[-1].copy()
        for i in range(n - 2, -1, -1):
            best = np.full(Z, -np.inf)
            bE = np.zeros(Z, int)
            bVIS = np.zeros(Z)
            for dz in moves:
                idx = np.clip(np.arange(Z) + dz, 0, Z - 1)
                cand = V[idx]
                better = cand > best + 1e-9
                best = np.where(better, cand, best)
                bE = np.where(better, E[idx], bE)
                bVIS = np.where(better, VIS[idx], bVIS)
            V = np.minimum(f[i], best)
            E = bE
            VIS = ins[i] + bVIS
        out[side] = V
        end[side] = E
        # seen: the band a rib starting here could occupy (6 mm up, 24 mm down) is in the scan
        band = _window_min(ins, -int(round(12.0 / step)), int(round(24.0 / step)))
        vis[side] = band.mean(0) if vis_band else VIS / n
    return out, end, vis


def lateral_fill(mip, v, level, d_range, thr_frac=0.15):
    """Fraction of |v| in d_range (mm) where the plain projection holds bone, per side: (2, Z)."""
    thr = thr_frac * level
    out = []
    for sign in (-1, 1):
        sel = (sign * v >= d_range[0]) & (sign * v <= d_range[1])
        out.append((mip[sel] > thr).mean(0))
    return np.array(out)


def _window_max(x, lo, hi):
    """y[z] = max(x[z+lo .. z+hi]) (sample offsets, clipped at the ends)."""
    Z = x.shape[-1]
    y = np.full(x.shape, -np.inf)
    for o in range(lo, hi + 1):
        idx = np.clip(np.arange(Z) + o, 0, Z - 1)
        y = np.maximum(y, x[..., idx])
    return y


def _window_min(x, lo, hi):
    return -_window_max(-x, lo, hi)


# --------------------------------------------------------------------------- helpers


def to_samples(frame: Frame, points: np.ndarray) -> np.ndarray:
    """Fractional index along `frame` of each RAS point (nearest point, refined along the tangent)."""
    points = np.atleast_2d(np.asarray(points, float))
    d = np.linalg.norm(points[:, None, :] - frame.points[None], axis=2)
    k = np.argmin(d, axis=1)
    off = np.einsum("nj,nj->n", points - frame.points[k], frame.w[k]) / frame.step
    return np.clip(k + np.clip(off, -1, 1), 0, len(frame) - 1)


def sample_at(x: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Linear interpolation of per-sample values x (..., Z) at fractional indices t."""
    Z = x.shape[-1]
    t = np.clip(np.asarray(t, float), 0, Z - 1)
    i0 = np.floor(t).astype(int)
    i1 = np.minimum(i0 + 1, Z - 1)
    f = t - i0
    return x[..., i0] * (1 - f) + x[..., i1] * f


def _shift(x, s):
    """x(z + s) for a fractional shift s (linear interpolation, clamped at the ends)."""
    Z = x.shape[-1]
    return sample_at(x, np.arange(Z) + s)


def side_shift(thin, v, level, step, d_range=(30.0, 70.0), max_mm=10.0, sigma_mm=20.0, penalty=0.01):
    """Relative shift D (samples, per plane) between the left and right thin-bone maps.

    A rib pair leaves its vertebra at one level on both sides; a frame tilted in the coronal
    plane (a jittered or extrapolated centreline end, a rotated patient) moves the left ribs
    up and the right ribs down. D maximises the Gaussian-windowed correlation of the left map
    shifted by -D/2 with the right map shifted by +D/2 (limited to `max_mm`: the rib pitch is
    ~20 mm, larger shifts would alias to the next rib)."""
    t = np.clip(thin / (0.3 * level), 0, 1)
    left = t[(v <= -d_range[0]) & (v >= -d_range[1])][::-1]
    right = t[(v >= d_range[0]) & (v <= d_range[1])]
    m = min(len(left), len(right))
    left, right = left[:m], right[:m]
    n = int(round(max_mm / step))
    shifts = np.arange(-n, n + 1)
    sig = sigma_mm / step
    C = []
    for D in shifts:
        a = _shift(left, -D / 2.0)
        b = _shift(right, D / 2.0)
        C.append(ndimage.gaussian_filter1d((a * b).sum(0), sig, mode="nearest") / m - penalty * abs(D))
    C = np.array(C)
    D = shifts[np.argmax(C, axis=0)].astype(float)
    D = ndimage.median_filter(D, max(int(round(sig)) | 1, 3), mode="nearest")
    return ndimage.gaussian_filter1d(D, sig / 2, mode="nearest")


# --------------------------------------------------------------------------- analysis

#: Calibration: P = eps + (1 - 2 eps) * sigmoid(a * (feature - b)), fitted on the labelled real scans.
CALIBRATION = {
    "rib": (11.85, 0.39, 0.04),
    "sacrum": (11.0, 0.59, 0.04),
}
#: Rib starts (where the path leaves the column at 30 mm) relative to the body centre that
#: carries them, in mm along the spine (negative = cranial): measured on the labelled scans.
RIB_WINDOW_MM = (-14.0, -2.0)
SACRUM_WINDOW_MM = (-4.0, 4.0)


@dataclass
class Analysis:
    """Everything computed along the detector's own (canal) curve, one entry per 2 mm sample."""

    frame: Frame
    level: float
    canal_strength: np.ndarray
    canal_found: np.ndarray  # (Z,) bool: the canal was seen in this plane (elsewhere the curve is extrapolated)
    rib_side: np.ndarray  # (2, Z) weakest link of the best rib path starting here, left/right
    rib_end: np.ndarray  # (2, Z) end plane of that path
    rib_visible: np.ndarray  # (2, Z) fraction of the path inside the scan
    tilt: np.ndarray  # (Z,) left/right shift (samples) applied to align the sides
    rib_start: np.ndarray  # (Z,) combined rib-start profile
    rib_feature: np.ndarray  # (Z,) best rib start in RIB_WINDOW_MM of a body centre here
    rib_vis: np.ndarray  # (Z,) how much of that window was imaged, 0..1
    sacrum_side: np.ndarray  # (2, Z) level bridge of trabecular-level bone from the column to 70 mm
    ilium: np.ndarray  # (2, Z) fraction of 45-100 mm lateral covered by projected bone plates
    sacrum_feature: np.ndarray  # (Z,)
    sacrum_vis: np.ndarray
    pelvis: np.ndarray  # (Z,) 0..1: within 60 mm above the sacral bridge, or below it
    thin: np.ndarray  # (L, Z) thin-bone map (for pictures)
    mip: np.ndarray  # (L, Z)
    v: np.ndarray
    seconds: float = 0.0


def analyse(ct, centerline_points, plane=2.0, step=2.0) -> Analysis:
    """Canal curve, coronal bone maps, rib paths and the sacral bridge along a centreline."""
    t0 = time.perf_counter()
    # a heavily smoothed start: a centreline's ends can be wild (a spline through jittered
    # points, an extrapolation); the canal search corrects positions within 35 mm
    fr = smooth_frame(np.asarray(centerline_points, float), step, 30.0, 40.0)
    fr, strength, level, found = canal_frame(ct, fr, plane)
    L = lateral_maps(ct, fr, level, plane)
    R, E, VIS = rib_paths(L["thin"], L["inside"], L["v"], level, fr.step, plane=plane)
    tilt = side_shift(L["thin"], L["v"], level, fr.step)
    Zn = len(tilt)
    Ra = np.stack([sample_at(R[0], np.arange(Zn) - tilt / 2), sample_at(R[1], np.arange(Zn) + tilt / 2)])
    VISa = np.stack([sample_at(VIS[0], np.arange(len(tilt)) - tilt / 2), sample_at(VIS[1], np.arange(len(tilt)) + tilt / 2)])
    seen = (VISa > 0.85).astype(float)  # (nearly) the whole path region, its lateral end included
    # both sides seen: their mean (a rib pair); one side: that side
    w = seen + 1e-3
    rib_start = (Ra * w).sum(0) / w.sum(0)
    lo, hi = (int(round(x / fr.step)) for x in RIB_WINDOW_MM)
    rib_feature = _window_max(rib_start, lo, hi)
    rib_vis = _window_min(seen.max(0), lo, hi)
    # sacrum: the alae bridge the column and the iliac bones on both sides
    ala = ndimage.grey_dilation(L["ala"], size=(1, 3))
    B, _, BVIS = rib_paths(ala, L["inside"], L["v"], 1.0 / 0.6, fr.step, d_start=24.0, d_end=70.0, plane=plane, moves=(0,))
    # ...and the iliac bones beside them are plates with a bright cortex (contrast-filled organs
    # can reach osteoporotic trabecular HU, but not cortical HU)
    ilium = lateral_fill(L["plate"], L["v"], 1.0, (45.0, 100.0), thr_frac=0.5)
    ilium = _window_max(ilium, -5, 5)
    gate = np.clip(ilium.min(0) / 0.3, 0, 1)
    bridge = (0.75 * B.min(0) + 0.25 * B.max(0)) * gate  # both sacroiliac sides, mostly
    lo, hi = (int(round(x / fr.step)) for x in SACRUM_WINDOW_MM)
    sac_local = _window_max(bridge, lo, hi)
    sacrum_feature = np.maximum.accumulate(sac_local)  # "S1 or below": monotone down the spine
    # seen: the bridge region and the iliac region beside it inside the scan on both sides
    ilium_in = np.stack([(L["inside"][(sg * L["v"] >= 45) & (sg * L["v"] <= 100)] > 0.5).mean(0) for sg in (-1, 1)])
    sacrum_vis = ((BVIS.min(0) > 0.85) & (ilium_in.min(0) > 0.5)).astype(float)
    sacrum_vis = np.maximum.accumulate(_window_max(sacrum_vis, lo, hi))
    # No ribs at the pelvis: paths from the alae or the lowest transverse processes into the
    # iliac wings and crests look like ribs. Suppress rib starts from 60 mm above the sacrum's
    # top (the crests reach L4) downwards.
    pelvis = np.maximum.accumulate(_window_max(sac_local, 0, int(round(60.0 / fr.step))))
    rib_feature = rib_feature * (1.0 - np.clip(pelvis, 0, 1))
    return Analysis(fr, level, strength, found, R, E, VIS, tilt, rib_start, rib_feature, rib_vis, B, ilium,
                    sacrum_feature, sacrum_vis, np.clip(pelvis, 0, 1), L["thin"], L["mip"], L["v"], time.perf_counter() - t0)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def calibrated(A: Analysis, calibration=None):
    """Per internal sample probabilities from an Analysis: dict rib, sacrum (Z,)."""
    cal = calibration or CALIBRATION
    a, b, eps = cal["sacrum"]
    p_sac = eps + (1 - 2 * eps) * _sigmoid(a * (A.sacrum_feature - b))
    p_sac = A.sacrum_vis * p_sac + (1 - A.sacrum_vis) * 0.5
    a, b, eps = cal["rib"]
    p_rib = eps + (1 - 2 * eps) * _sigmoid(a * (A.rib_feature - b))
    p_rib = A.rib_vis * p_rib + (1 - A.rib_vis) * 0.5  # not imaged: no evidence either way
    return dict(rib=p_rib, sacrum=p_sac)


#: The vertebral body centres lie this far in front of the spinal canal (17-28 mm measured on the
#: labelled real scans: thoracic ~19, lumbar ~25).
BODY_OFFSET_MM = 21.0


@dataclass
class Landmarks:
    """Rib and sacrum evidence, one value per sample of the centreline it was read along."""

    rib: np.ndarray  # P(a vertebra whose body centre is here carries a rib pair); 0.5 where not seen
    sacrum: np.ndarray  # P(here is the S1 body or below); 0.5 where not seen
    rib_visible: np.ndarray  # 0..1: how much of the rib evidence was inside the scan
    sacrum_visible: np.ndarray
    canal_offset_mm: np.ndarray  # distance from each sample to the detector's own canal curve
    # where the vertebral bodies are, per sample: BODY_OFFSET_MM in front of the canal (RAS mm),
    # and whether the canal was seen in that sample's plane
    body_points: np.ndarray | None = None
    canal_found: np.ndarray | None = None
    seconds: float = 0.0

    _ARRAYS = ("rib", "sacrum", "rib_visible", "sacrum_visible", "canal_offset_mm")

    def __len__(self) -> int:
        return len(self.rib)

    def to_dict(self) -> dict:
        """Plain lists (stored with a Slicer run, so that Re-label has them without the CT)."""
        return {k: np.round(np.asarray(getattr(self, k), float), 4).tolist() for k in self._ARRAYS}

    @classmethod
    def from_dict(cls, data: dict) -> "Landmarks":
        return cls(**{k: np.asarray(data[k], float) for k in cls._ARRAYS})

    def at(self, t: np.ndarray) -> "Landmarks":
        """The evidence read at fractional sample indices `t` (another centreline over the same spine)."""
        return Landmarks(*(sample_at(np.asarray(getattr(self, k), float), t) for k in self._ARRAYS),
                         seconds=self.seconds)


def spine_landmarks(ct, centerline, calibration: dict | None = None) -> Landmarks:
    """Rib and sacrum evidence at every sample of `centerline` (cranial -> caudal, RAS mm).

    `ct`: a Volume in HU. Where the evidence lies outside the scan, the probabilities are 0.5
    (no evidence either way) and the visibility 0.
    """
    pts = np.asarray(centerline.points, float)
    A = analyse(ct, pts)
    P = calibrated(A, calibration)
    t = to_samples(A.frame, pts)
    canal = np.stack([sample_at(A.frame.points[:, d], t) for d in range(3)], 1)
    anterior = np.stack([sample_at(A.frame.u[:, d], t) for d in range(3)], 1)
    found = sample_at(A.canal_found.astype(float), t) > 0.5
    return Landmarks(sample_at(P["rib"], t), sample_at(P["sacrum"], t), sample_at(A.rib_vis, t),
                     sample_at(A.sacrum_vis, t), np.linalg.norm(pts - canal, axis=1),
                     canal + BODY_OFFSET_MM * anterior, found, A.seconds)


# --------------------------------------------------------------------------- an anchor in view

#: A change of the rib or sacrum evidence from below ANCHOR_LOW to above ANCHOR_HIGH (or back) within
#: ANCHOR_WITHIN_MM, seen all the way: the end of the rib-bearing spine or the top of the sacrum is in view.
ANCHOR_LOW, ANCHOR_HIGH = 0.3, 0.7
ANCHOR_WITHIN_MM = 60.0


def _seen_change(p: np.ndarray, visible: np.ndarray, reach: int, rising_only: bool) -> bool:
    seen = visible > 0.5
    for a in np.flatnonzero(seen & ((p < ANCHOR_LOW) | ((p > ANCHOR_HIGH) & (not rising_only)))):
        for b in range(a + 1, min(a + reach + 1, len(p))):
            if not seen[b]:
                break
            if (p[a] < ANCHOR_LOW and p[b] > ANCHOR_HIGH) or (p[a] > ANCHOR_HIGH and p[b] < ANCHOR_LOW):
                return True
    return False


def anchor_in_view(marks: Landmarks, step_mm: float) -> bool:
    """Whether the spine's names can be counted from the CT: a first or lowest rib pair (ribs begin or
    end along the traced spine, both sides of the change seen) or the top of the sacrum is in view.

    Without one, the names rest on the networks' reading of the CT alone: on the real scans of
    bench/realct.py that named 7 of 30 vertebrae right (five scans, none all right), so they are flagged.
    """
    reach = max(int(round(ANCHOR_WITHIN_MM / step_mm)), 1)
    return (_seen_change(np.asarray(marks.rib, float), np.asarray(marks.rib_visible, float), reach, False)
            or _seen_change(np.asarray(marks.sacrum, float), np.asarray(marks.sacrum_visible, float), reach, True))


# --------------------------------------------------------------------------- what it says of each level

#: P(a level carries a rib pair): T1..T12 do (T13 too: a 13th pair); rib-count variants
#: (11 pairs ~8 %, a hypoplastic 12th rib ~13 %, lumbar ribs 1-6 %, cervical ribs ~1 %; REALCT.md).
RIB_PROBABILITY = {"T": 0.95, "T12": 0.88, "T13": 0.85, "C7": 0.03, "L1": 0.05, "L": 0.02, "C": 0.01, "S": 0.02}
#: P(a level is the S1 body or below): S1/S2 are; a sacralised L5 (transitional, 10-25 %) can look so.
SACRUM_PROBABILITY = {"S": 0.97, "L5": 0.08, "L6": 0.3, "L": 0.02, "T": 0.01, "C": 0.01}


def _level_probability(table: dict, name: str) -> float:
    return table.get(name, table[name[0]])


def level_log_likelihood(marks: Landmarks, levels) -> np.ndarray:
    """(samples, levels) log-likelihood (nats) of the landmarks if level `levels[j]` sat at sample k.

    Each observation is read as a noisy test: log(2 (p P_l + (1 - p)(1 - P_l))), where p is the
    detector's probability and P_l the level's own (RIB_PROBABILITY, SACRUM_PROBABILITY): 0 where
    the evidence was not seen (p = 0.5), positive where it agrees with the level, negative where not.
    """
    out = np.zeros((len(marks), len(levels)))
    for j, name in enumerate(levels):
        for p, table in ((marks.rib, RIB_PROBABILITY), (marks.sacrum, SACRUM_PROBABILITY)):
            q = _level_probability(table, name)
            out[:, j] += np.log(2.0 * (p * q + (1.0 - p) * (1.0 - q)))
    return out


#: Levels whose names the bone reading can contradict (validated on real scans, bench/landmarks.py):
#: a rib missing on T3..T12 (T1 and T2 are read poorly: their ribs curve forward at once), a rib or the
#: sacrum on a lumbar vertebra, no sacrum under S1.
NEEDS_RIB = tuple(f"T{i}" for i in range(3, 13))
NO_RIB = ("L1", "L2", "L3", "L4", "L5")
NO_SACRUM = ("L1", "L2", "L3", "L4")
NEEDS_SACRUM = ("S1", "S2")
#: The reading contradicts a name when it is below this where the level must show it, or above 1 - it
#: where the level must not.
CONTRADICTS_BELOW = 0.2


def contradiction(marks: Landmarks, samples, names) -> str:
    """What to check when a chain's names contradict the ribs or the sacrum seen on the CT, or ''.

    `samples`: each named vertebra's (fractional) sample along the centreline the marks were read on.
    No rib seen on a T11, a rib on an L1, the sacrum under an L4, none under an S1: the whole chain is
    likely shifted, so it is checked at that landmark. Where the reading was not seen it says nothing.
    """
    k = np.clip(np.round(np.asarray(samples, float)).astype(int), 0, len(marks) - 1)
    low, high = CONTRADICTS_BELOW, 1.0 - CONTRADICTS_BELOW
    for i, name in zip(k, names):
        rib, sacrum = marks.rib[i], marks.sacrum[i]
        if marks.rib_visible[i] > 0.5:
            if name in NEEDS_RIB and rib < low:
                return f"{name} has no rib on the CT: check the lowest rib"
            if name in NO_RIB and rib > high:
                return f"{name} carries a rib on the CT: check the lowest rib"
        if marks.sacrum_visible[i] > 0.5:
            if name in NO_SACRUM and sacrum > high:
                return f"{name} lies on the sacrum on the CT: check the sacrum"
            if name in NEEDS_SACRUM and sacrum < low:
                return f"{name} is not on the sacrum on the CT: check the sacrum"
    return ""
