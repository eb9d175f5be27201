"""CT-like training volumes from whole-body anatomy label maps ("training images from real anatomy").

One call of `render_ct` draws one random CT-like volume from a label map (TotalSegmentator-style
names such as ``vertebrae_L1``, ``rib_left_3``, ``liver``): a random affine + smooth elastic
deformation and field of view, a tissue model (body outline, fat, organs with contrast phase,
lungs with vessels, bowel gas, bone with cortex and trabecular texture, discs, optional metal)
and an acquisition model (partial volume / point spread function, slice thickness, resampling,
correlated noise, calibration offset). Only numpy and scipy are used.

Main entry points
-----------------
render_ct(labels, affine, names, rng, spacing_mm=None, **options) -> (hu, affine_out, labels_out)
structure_classes(names) -> {id: class}
vertebra_centres(labels, affine, names) -> {"L1": ras, ...}
SpatialTransform.input_to_output(points)   (render_ct(..., return_info=True)[3]["transform"])

Coordinates are RAS millimetres; affines map voxel indices (i, j, k) to RAS.
A label map on disk (`read_labelmap`) is a NIfTI with a `<stem>_labels.json` beside it
({"labels": {"vertebrae_L1": 100, ...}}), as in ../shared/data/labelmaps.
"""
from __future__ import annotations

import json
import re
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
from scipy import ndimage as ndi

from ..errors import VertebraIDError
from ..io.images import read_nifti

__all__ = [
    "LEVELS", "CLASSES", "RenderOptions", "SpatialTransform", "PreparedMap", "LabelMap",
    "structure_classes", "vertebra_level", "vertebra_centres", "prepare_labelmap", "render_ct", "read_labelmap",
]

# ----------------------------------------------------------------------------- names and classes

LEVELS = ([f"C{i}" for i in range(1, 8)] + [f"T{i}" for i in range(1, 14)]
          + [f"L{i}" for i in range(1, 7)] + ["S1"])
"""Vertebral levels from cranial to caudal (T13 and L6 only exist in some spines)."""

CLASSES = ("background", "vertebra", "sacrum", "rib", "other_bone", "cartilage", "disc", "lung",
           "airway", "fat", "muscle", "liver", "kidney", "spleen", "pancreas", "artery", "vein",
           "heart", "bowel", "bladder", "gallbladder", "gland", "spinal_cord", "other_soft")
_CI = {c: i for i, c in enumerate(CLASSES)}
BONE_CLASSES = ("vertebra", "sacrum", "rib", "other_bone")

_CLASS_RULES = [  # (regex on the lower-case name, class); the first match wins
    (r"vertebra.*_s\d|^s\d$", "vertebra"),
    (r"sacrum|coccyx", "sacrum"),
    (r"vertebra|^[ctl]\d{1,2}$", "vertebra"),
    (r"costal_cartilage|cartilage", "cartilage"),
    (r"^rib|_rib", "rib"),
    (r"sternum|clavic|scapula|humerus|hip|femur|skull|pelvi|ilium|ischium|pubis|patella|tibia|"
     r"fibula|radius|ulna|mandible|bone", "other_bone"),
    (r"intervertebral|disc", "disc"),
    (r"lung", "lung"),
    (r"trachea|bronch|airway", "airway"),
    (r"fat", "fat"),
    (r"autochthon|gluteus|iliopsoas|psoas|muscle|diaphragm", "muscle"),
    (r"liver", "liver"),
    (r"kidney", "kidney"),
    (r"spleen", "spleen"),
    (r"pancrea", "pancreas"),
    (r"heart|atrial_appendage|myocard|ventricle|atrium", "heart"),
    (r"vena|vein", "vein"),
    (r"aorta|arter|trunk", "artery"),
    (r"esophag|stomach|duoden|bowel|colon|rectum|intestin", "bowel"),
    (r"gallbladder", "gallbladder"),
    (r"bladder", "bladder"),
    (r"thyroid|adrenal|prostate|gland", "gland"),
    (r"spinal_cord|spinal_canal", "spinal_cord"),
]


def structure_classes(names: dict) -> dict:
    """Map label id -> tissue class (one of CLASSES) from TotalSegmentator-style names."""
    out = {}
    for lid, name in names.items():
        n = str(name).lower()
        out[int(lid)] = next((c for pat, c in _CLASS_RULES if re.search(pat, n)), "other_soft")
    return out


def vertebra_level(name: str) -> Optional[str]:
    """'vertebrae_L1' -> 'L1', 'vertebrae_S1' -> 'S1'; None for anything that is not a vertebra."""
    n = str(name)
    if "vertebra" not in n.lower() and not re.fullmatch(r"[CTLS]\d{1,2}", n):
        return None
    m = re.search(r"([CTLS])(\d{1,2})$", n)
    if not m:
        return None
    lev = m.group(1) + str(int(m.group(2)))
    return lev if lev in LEVELS else None


# ----------------------------------------------------------------------------- small helpers

def _apply(aff: np.ndarray, pts: np.ndarray) -> np.ndarray:
    pts = np.asarray(pts, float)
    return pts @ aff[:3, :3].T + aff[:3, 3]


def _spacing(aff: np.ndarray) -> np.ndarray:
    return np.linalg.norm(aff[:3, :3], axis=0)


def _axis_along(aff: np.ndarray, ras_axis: int) -> tuple[int, float]:
    """Voxel axis most aligned with RAS axis `ras_axis` and the sign of that alignment."""
    cols = aff[:3, :3] / _spacing(aff)
    ax = int(np.argmax(np.abs(cols[ras_axis])))
    return ax, float(np.sign(cols[ras_axis, ax]))


def _world_coord(aff: np.ndarray, sl: tuple, ras_axis: int) -> np.ndarray:
    """RAS coordinate `ras_axis` of every voxel of the box `sl`, as a broadcastable float32 array."""
    out = np.float32(aff[ras_axis, 3])
    for a in range(3):
        idx = np.arange(sl[a].start, sl[a].stop, dtype=np.float32)
        shp = [1, 1, 1]
        shp[a] = idx.size
        out = out + np.float32(aff[ras_axis, a]) * idx.reshape(shp)
    return out


def _smooth_noise(rng, shape, sigma, dtype=np.float32) -> np.ndarray:
    """Gaussian-smoothed white noise with unit standard deviation (sigma in voxels).

    Wide kernels are computed on a coarser grid and upsampled linearly (same look, much faster)."""
    sig = np.broadcast_to(np.asarray(sigma, float), (len(shape),))
    f = int(min(sig) // 1.0) if min(sig) >= 2.0 else 1
    if f >= 2:
        cshape = tuple(int(np.ceil(s / f)) + 1 for s in shape)
        n = ndi.gaussian_filter(rng.standard_normal(cshape, dtype=np.float32), sig / f, mode="wrap", truncate=3.0)
        for ax in range(len(shape)):  # repeat + box filter = piecewise-linear upsampling, fast
            n = ndi.uniform_filter1d(np.repeat(n, f, axis=ax), f, axis=ax, mode="nearest")
        n = n[tuple(slice(0, s) for s in shape)]
        s = float(n[::3, ::3, ::3].std())
        n /= s if s > 0 else 1.0
        return n.astype(dtype, copy=False)
    n = rng.standard_normal(shape, dtype=np.float32)
    n = ndi.gaussian_filter(n, sigma, mode="wrap", truncate=3.0)
    s = float(n[::3, ::3, ::3].std()) if n.ndim == 3 else float(n.std())
    return (n / (s if s > 0 else 1.0)).astype(dtype, copy=False)


def _boundary(lab: np.ndarray) -> np.ndarray:
    """Voxels with a 6-neighbour of another label (array edges do not count)."""
    b = np.zeros(lab.shape, bool)
    for ax in range(lab.ndim):
        d = np.diff(lab, axis=ax) != 0
        lo = [slice(None)] * lab.ndim
        hi = [slice(None)] * lab.ndim
        lo[ax] = slice(0, -1)
        hi[ax] = slice(1, None)
        b[tuple(lo)] |= d
        b[tuple(hi)] |= d
    return b


def _layers(lab: np.ndarray, mask: np.ndarray, nmax: int, bnd: Optional[np.ndarray] = None) -> np.ndarray:
    """Depth of each voxel of `mask` in voxel layers from its own label's surface (1 = surface)."""
    depth = np.zeros(lab.shape, np.uint8)
    if bnd is None:
        bnd = _boundary(lab)
    surf = mask & bnd
    depth[surf] = 1
    inner = mask & ~surf
    for d in range(2, nmax + 1):
        if not inner.any():
            break
        er = ndi.binary_erosion(inner, border_value=1)
        depth[inner & ~er] = d
        inner = er
    depth[inner] = nmax + 1
    return depth


def _interp_matrix(coords: np.ndarray, m: int) -> np.ndarray:
    """Linear-interpolation weights (len(coords) x m), edges clamped (= map_coordinates order 1, 'nearest')."""
    c = np.clip(np.asarray(coords, float), 0, m - 1)
    i0 = np.minimum(np.floor(c).astype(int), max(m - 2, 0))
    f = c - i0
    W = np.zeros((c.size, m))
    r = np.arange(c.size)
    if m == 1:
        W[:, 0] = 1.0
        return W
    W[r, i0] += 1.0 - f
    W[r, i0 + 1] += f
    return W


def _upsample_repeat(arr: np.ndarray, factor: int, shape: tuple, sigma: float) -> np.ndarray:
    """Block-upsample a coarse field by `factor`, crop/pad to `shape`, smooth (sigma in fine voxels)."""
    up = arr
    for ax in range(3):
        up = np.repeat(up, factor, axis=ax)
    up = up[tuple(slice(0, s) for s in shape)]
    pad = [(0, max(0, s - u)) for s, u in zip(shape, up.shape)]
    if any(p[1] for p in pad):
        up = np.pad(up, pad, mode="edge")
    return ndi.gaussian_filter(up.astype(np.float32), sigma) if sigma > 0 else up.astype(np.float32)


def _block_any(mask: np.ndarray, f: int) -> np.ndarray:
    pad = [(0, (-s) % f) for s in mask.shape]
    m = np.pad(mask, pad)
    s = m.shape
    return m.reshape(s[0] // f, f, s[1] // f, f, s[2] // f, f).any(axis=(1, 3, 5))


def _fill_axial(mask: np.ndarray, zax: int) -> np.ndarray:
    """Fill holes slice by slice in the planes perpendicular to voxel axis `zax`."""
    st = np.zeros((3, 3, 3), bool)
    idx = [slice(None)] * 3
    idx[zax] = 1
    st[tuple(idx)] = ndi.generate_binary_structure(2, 1)
    return ndi.binary_fill_holes(mask, structure=st)


# ----------------------------------------------------------------------------- vertebra centres

@dataclass
class _Vert:
    level: str
    lid: int
    centroid: np.ndarray          # whole-vertebra centroid (RAS)
    axis: np.ndarray = None        # local superior spine axis (unit, RAS)
    anterior: np.ndarray = None    # anterior direction perpendicular to the axis
    cut: float = 0.0               # body = voxels with (p - centroid) . anterior >= cut
    body_centre: np.ndarray = None


def _label_points(labels, aff, lid, bbox) -> np.ndarray:
    sub = labels[bbox] == lid
    ijk = np.argwhere(sub).astype(float) + [s.start for s in bbox]
    return _apply(aff, ijk)


def _spine_model(labels, affine, names, bboxes, body_fraction=0.42, s1_top_mm=28.0) -> dict:
    """Per vertebral level: centroid, local axis, anterior direction, body cut and body centre."""
    sup = np.array([0.0, 0.0, 1.0])
    ant = np.array([0.0, 1.0, 0.0])
    verts, pts = {}, {}
    sacrum_ids = [lid for lid, n in names.items() if "sacrum" in str(n).lower()]
    for lid, n in names.items():
        lev = vertebra_level(n)
        lid = int(lid)
        if lev is None or lid >= len(bboxes) or bboxes[lid] is None:
            continue
        p = _label_points(labels, affine, lid, bboxes[lid])
        if len(p) < 10:
            continue
        verts[lev] = _Vert(lev, lid, p.mean(0))
        pts[lev] = p
    if "S1" not in verts:  # S1 from the top of the sacrum
        sp = [_label_points(labels, affine, s, bboxes[s]) for s in sacrum_ids
              if s < len(bboxes) and bboxes[s] is not None]
        sp = np.concatenate(sp) if sp else np.zeros((0, 3))
        if len(sp) > 50:
            above = [verts[l] for l in LEVELS if l in verts]
            u = sup
            if above:
                u = above[-1].centroid - sp.mean(0)
                u = u / np.linalg.norm(u)
            h = sp @ u
            top = sp[h >= h.max() - s1_top_mm]
            verts["S1"] = _Vert("S1", -1, top.mean(0))
            pts["S1"] = top
    order = [l for l in LEVELS if l in verts]
    for it in range(2):
        cen = {l: (verts[l].centroid if it == 0 else verts[l].body_centre) for l in order}
        for i, l in enumerate(order):
            up = cen[order[i - 1]] if i > 0 else None
            dn = cen[order[i + 1]] if i + 1 < len(order) else None
            if up is not None and dn is not None:
                a = up - dn
            elif up is not None:
                a = up - cen[l]
            elif dn is not None:
                a = cen[l] - dn
            else:
                a = sup
            a = a / (np.linalg.norm(a) + 1e-9)
            if a @ sup < 0:
                a = -a
            an = ant - (ant @ a) * a
            an /= np.linalg.norm(an)
            v = verts[l]
            s = (pts[l] - v.centroid) @ an
            cut = s.max() - body_fraction * (s.max() - s.min())
            v.axis, v.anterior, v.cut = a, an, float(cut)
            v.body_centre = pts[l][s >= cut].mean(0)
    return verts


def vertebra_centres(labels: np.ndarray, affine: np.ndarray, names: dict, *, body_fraction: float = 0.42,
                     s1_top_mm: float = 28.0) -> dict:
    """Centre of each vertebral BODY in RAS mm: {"C7": xyz, ..., "L5": xyz, "S1": xyz}.

    The body is the anterior `body_fraction` of the vertebra's extent along the anterior direction
    perpendicular to the local spine axis (from neighbouring vertebrae). S1 comes from
    "vertebrae_S1" when present, else from the top `s1_top_mm` of "sacrum" (along the spine axis).
    """
    labels = np.asarray(labels)
    lab_i = np.rint(labels).astype(np.int32) if labels.dtype.kind == "f" else labels
    bboxes = [None] + list(ndi.find_objects(lab_i))  # bboxes[label id]
    names = {int(k): v for k, v in names.items()}
    verts = _spine_model(lab_i, np.asarray(affine, float), names, bboxes, body_fraction, s1_top_mm)
    return {l: verts[l].body_centre.copy() for l in LEVELS if l in verts}


# ----------------------------------------------------------------------------- spatial transform

@dataclass
class SpatialTransform:
    """Backward map from output RAS y to input RAS x:  x = centre_in + matrix (y - centre_out) + d(y).

    d is a smooth displacement (mm) sampled on a grid in the output frame
    (frame coordinates e = frame.T (y - centre_out)), interpolated trilinearly.
    """
    centre_in: np.ndarray
    centre_out: np.ndarray
    matrix: np.ndarray
    frame: np.ndarray            # 3x3, columns = output axes (unit vectors in RAS)
    field: np.ndarray            # (3, m0, m1, m2) displacement in RAS mm
    field_origin: np.ndarray     # frame coordinate of field voxel (0, 0, 0)
    field_spacing: np.ndarray    # (3,) mm

    def displacement(self, y: np.ndarray) -> np.ndarray:
        y = np.atleast_2d(np.asarray(y, float))
        e = (y - self.centre_out) @ self.frame
        c = ((e - self.field_origin) / self.field_spacing).T
        return np.stack([ndi.map_coordinates(self.field[a], c, order=1, mode="nearest") for a in range(3)], 1)

    def output_to_input(self, y: np.ndarray) -> np.ndarray:
        """Output RAS points (N, 3) -> input RAS points."""
        y = np.atleast_2d(np.asarray(y, float))
        return self.centre_in + (y - self.centre_out) @ self.matrix.T + self.displacement(y)

    def input_to_output(self, x: np.ndarray, tol: float = 1e-4, max_iter: int = 200) -> np.ndarray:
        """Input RAS points (N, 3) -> output RAS points (inverse by fixed-point iteration)."""
        x = np.atleast_2d(np.asarray(x, float))
        minv = np.linalg.inv(self.matrix)
        y = self.centre_out + (x - self.centre_in) @ minv.T
        for _ in range(max_iter):
            y_new = self.centre_out + (x - self.centre_in - self.displacement(y)) @ minv.T
            done = np.abs(y_new - y).max() < tol
            y = y_new
            if done:
                break
        return y

    def map_points(self, points) -> "np.ndarray | dict":
        """Input RAS -> output RAS for an (N, 3) array or a {name: xyz} dict."""
        if isinstance(points, dict):
            keys = list(points)
            if not keys:
                return {}
            out = self.input_to_output(np.array([points[k] for k in keys], float))
            return {k: out[i] for i, k in enumerate(keys)}
        return self.input_to_output(points)


def _rotation(rng, max_deg: float, max_tilt_deg: Optional[float] = None) -> np.ndarray:
    """Rotation by three small Euler angles; the two tilts (about R and A) limited to max_tilt_deg."""
    R = np.eye(3)
    for ax in range(3):
        lim = max_deg if (ax == 2 or max_tilt_deg is None) else min(max_deg, max_tilt_deg)
        t = np.deg2rad(rng.uniform(-lim, lim))
        c, s = np.cos(t), np.sin(t)
        i, j = [a for a in range(3) if a != ax]
        G = np.eye(3)
        G[i, i], G[i, j], G[j, i], G[j, j] = c, -s, s, c
        R = R @ G
    return R


# ----------------------------------------------------------------------------- options

@dataclass
class RenderOptions:
    """Parameter ranges of the generator (see README.md for their sources)."""
    # geometry
    scale_range: tuple = (0.85, 1.15)       # global scale (input mm per output mm)
    axis_scale_jitter: float = 0.05         # extra independent scale per axis (+-)
    max_rotation_deg: float = 10.0          # per Euler angle
    max_shift_mm: float = 20.0
    elastic_amplitude_mm: tuple = (0.0, 8.0)
    elastic_length_mm: tuple = (30.0, 60.0)
    fov: str = "random"                     # random | whole | chest | abdomen | slab | spine
    fov_probs: dict = field(default_factory=lambda: {"whole": 0.15, "chest": 0.2, "abdomen": 0.2,
                                                     "slab": 0.3, "spine": 0.15})
    slab_length_mm: tuple = (100.0, 300.0)
    inplane_pad_mm: float = 45.0            # the field of view may extend this far beyond the map in-plane
    max_voxels: int = 40_000_000            # caps the output size when spacing is drawn
    # tissue
    phase: Optional[str] = None             # none | arterial | portal | delayed (None: drawn)
    phase_probs: dict = field(default_factory=lambda: {"none": 0.35, "arterial": 0.2, "portal": 0.38,
                                                       "delayed": 0.07})
    body_margin_mm: tuple = (5.0, 40.0)
    trabecular_hu: tuple = (80.0, 350.0)
    cortex_hu: tuple = (500.0, 1500.0)
    cortex_thickness: tuple = (0.7, 1.4)    # factor on the cortical depth profiles
    disc_hu: tuple = (60.0, 110.0)
    p_oral_contrast: float = 0.15
    p_metal: float = 0.05
    p_table: float = 0.5
    p_random_intensity: float = 0.0         # SynthSeg-style random HU per structure
    # acquisition
    slice_thickness_mm: Optional[float] = None
    psf_inplane_mm: tuple = (0.4, 1.0)      # Gaussian sigma; soft kernels draw the upper part
    kernel_probs: dict = field(default_factory=lambda: {"soft": 0.3, "standard": 0.45, "sharp": 0.25})
    p_fov_circle: float = 0.2
    noise_std: tuple = (5.0, 80.0)          # drawn log-uniformly
    p_calibration: float = 0.3
    calibration_offset: float = 30.0


def _pick(rng, probs: dict) -> str:
    keys = list(probs)
    p = np.array([probs[k] for k in keys], float)
    return keys[int(rng.choice(len(keys), p=p / p.sum()))]


# ----------------------------------------------------------------------------- prepared label map

@dataclass
class PreparedMap:
    """What render_ct needs to know about one label map (computed once; pass as `prepared=`)."""
    labels: np.ndarray
    affine: np.ndarray
    names: dict
    classes: dict
    class_lut: np.ndarray
    bboxes: list
    verts: dict
    extent_min: np.ndarray = None  # voxel bbox of all labels
    extent_max: np.ndarray = None


def prepare_labelmap(labels: np.ndarray, affine: np.ndarray, names: dict) -> PreparedMap:
    """Classes, bounding boxes and the spine model of a label map (about 0.5 s for a whole body)."""
    labels = np.asarray(labels)
    if labels.dtype.kind not in "iu":
        labels = np.rint(labels).astype(np.int32)
    if labels.min() < 0:
        raise ValueError("labels must be non-negative")
    names = {int(k): str(v) for k, v in names.items()}
    affine = np.asarray(affine, float)
    classes = structure_classes(names)
    labels = connect_ribs(labels, affine, names)
    maxid = int(labels.max())
    lut = np.zeros(max(maxid, max(names, default=0)) + 1, np.uint8)
    for lid, c in classes.items():
        if lid < lut.size:
            lut[lid] = _CI[c]
    bboxes = [None] + list(ndi.find_objects(labels))  # bboxes[label id]
    bboxes = bboxes + [None] * (lut.size - len(bboxes))
    for lid in range(1, maxid + 1):  # unnamed labels: other soft tissue
        if bboxes[lid] is not None and lid not in classes:
            classes[lid] = "other_soft"
            lut[lid] = _CI["other_soft"]
    verts = _spine_model(labels, affine, names, bboxes)
    nz = [b for b in bboxes if b is not None]
    lo = np.array([min(b[a].start for b in nz) for a in range(3)]) if nz else np.zeros(3, int)
    hi = np.array([max(b[a].stop for b in nz) for a in range(3)]) if nz else np.array(labels.shape)
    return PreparedMap(labels, affine, names, classes, lut, bboxes, verts, lo, hi - 1)


#: Rib masks of segmentations often stop short of their vertebra (the head and neck carry no rib
#: label); a neck this thick bridges the gap, as real ribs articulate with their vertebra.
RIB_NECK_RADIUS_MM = 3.5
RIB_GAP_MAX_MM = 25.0


def connect_ribs(labels: np.ndarray, affine: np.ndarray, names: dict) -> np.ndarray:
    """The label map with each rib joined to its vertebra (rib_left_7 to vertebrae_T7) by a neck.

    A tube of RIB_NECK_RADIUS_MM from the rib voxel nearest the vertebra to the vertebra voxel
    nearest it, labelled as the rib, drawn over unlabelled voxels and soft tissue (not over bone);
    ribs farther than RIB_GAP_MAX_MM from their vertebra (cut by the map's border) are left alone.
    """
    by_name = {v: k for k, v in names.items()}
    spacing = _spacing(affine)
    classes = structure_classes(names)
    bone = {lid for lid, c in classes.items() if c in BONE_CLASSES}
    out = None
    for name, rib_id in sorted(by_name.items()):
        m = re.fullmatch(r"rib_(left|right)_(\d+)", name)
        vert_id = by_name.get(f"vertebrae_T{m.group(2)}") if m else None
        if vert_id is None:
            continue
        vert = np.argwhere(labels == vert_id)
        rib = np.argwhere(labels == rib_id)
        if len(vert) == 0 or len(rib) == 0:
            continue
        # the rib voxel nearest the vertebra, then the vertebra voxel nearest that (in mm)
        centre = vert.mean(0)
        near = rib[np.argsort(np.linalg.norm((rib - centre) * spacing, axis=1))[:200]]
        d = np.linalg.norm((near[:, None, :] - vert[None, ::7, :]) * spacing, axis=2)
        i, j = np.unravel_index(int(np.argmin(d)), d.shape)
        start = near[i]
        end = vert[::7][j]
        if d[i, j] > RIB_GAP_MAX_MM:
            continue
        if out is None:
            out = labels.copy()
        n = max(int(np.ceil(np.linalg.norm((end - start) * spacing) / (0.5 * spacing.min()))), 2)
        reach = np.ceil(RIB_NECK_RADIUS_MM / spacing).astype(int)
        for point in np.linspace(start, end, n):
            lo = np.maximum(np.floor(point - reach).astype(int), 0)
            hi = np.minimum(np.ceil(point + reach).astype(int) + 1, np.array(labels.shape))
            grid = np.stack(np.meshgrid(*[np.arange(lo[a], hi[a]) for a in range(3)], indexing="ij"), -1)
            inside = np.linalg.norm((grid - point) * spacing, axis=-1) <= RIB_NECK_RADIUS_MM
            box = out[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
            paint = inside & ~np.isin(box, list(bone))
            box[paint] = rib_id
    return labels if out is None else out


# ----------------------------------------------------------------------------- field of view

def _output_frame(affine: np.ndarray) -> np.ndarray:
    """Output axes: the input's voxel directions, reordered and signed to be closest to R, A, S."""
    cols = affine[:3, :3] / _spacing(affine)
    frame = np.zeros((3, 3))
    used = set()
    for r in (2, 0, 1):
        order = np.argsort(-np.abs(cols[r]))
        a = next(int(x) for x in order if int(x) not in used)
        used.add(a)
        frame[:, r] = cols[:, a] * np.sign(cols[r, a])
    return frame


def _choose_fov(pm: PreparedMap, rng, opts: RenderOptions, frame: np.ndarray, mode: str):
    """Centre (input RAS) and half-extents (mm along the output axes) of the field of view."""
    aff = pm.affine
    lo, hi = pm.extent_min.astype(float), pm.extent_max.astype(float)
    corners = _apply(aff, np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1])
                                    for z in (lo[2], hi[2])]))
    e = corners @ frame
    emin, emax = e.min(0), e.max(0)
    margin = float(rng.uniform(30.0, 60.0))
    verts = [pm.verts[l] for l in LEVELS if l in pm.verts]
    spine_s = {v.level: v.body_centre @ frame[:, 2] for v in verts}

    def lvl(names_, default):
        for n in names_:
            if n in spine_s:
                return spine_s[n]
        return default

    def organ_range(word):
        ids = [lid for lid, n in pm.names.items() if word in n and lid < len(pm.bboxes) and pm.bboxes[lid] is not None]
        if not ids:
            return None
        pts = []
        for lid in ids:
            b = pm.bboxes[lid]
            pts += [[b[0].start, b[1].start, b[2].start], [b[0].stop - 1, b[1].stop - 1, b[2].stop - 1]]
        s = _apply(aff, np.array(pts, float)) @ frame[:, 2]
        return s.min(), s.max()

    zlo, zhi = emin[2], emax[2]
    xlo, xhi, ylo, yhi = emin[0] - margin, emax[0] + margin, emin[1] - margin, emax[1] + margin
    if mode == "chest":
        lung = organ_range("lung")
        if lung is None and not any(l.startswith("T") for l in spine_s):
            mode = "slab"
        else:
            top = lung[1] + 20 if lung else lvl(["C7", "T1"], zhi)
            bot = lung[0] - 10 if lung else lvl(["L1", "T12"], zlo)
            zlo, zhi = bot + rng.uniform(-30, 40), top + rng.uniform(-30, 30)
    if mode == "abdomen":
        top = lvl(["T10", "T11", "T12"], None)
        liver = organ_range("liver")
        if top is None and liver is not None:
            top = liver[1]
        if top is None:
            mode = "slab"
        else:
            hips = organ_range("hip") or organ_range("sacrum")
            bot = hips[0] if hips else lvl(["S1", "L5"], zlo) - 60
            zlo, zhi = bot + rng.uniform(-20, 60), top + rng.uniform(-20, 60)
    if mode in ("slab", "spine"):
        length = rng.uniform(*opts.slab_length_mm)
        if verts:
            c = verts[int(rng.integers(len(verts)))].body_centre @ frame
        else:
            c = (emin + emax) / 2
        zc = c[2] + rng.uniform(-30, 30)
        zlo, zhi = zc - length / 2, zc + length / 2
        if mode == "spine":  # tight in-plane field of view around the spine
            w = rng.uniform(100, 260)
            d = rng.uniform(110, 260)
            xc, yc = c[0] + rng.uniform(-15, 15), c[1] + rng.uniform(-50, 30)
            xlo, xhi, ylo, yhi = xc - w / 2, xc + w / 2, yc - d / 2, yc + d / 2
    # keep the length: shift the range into the map before clipping it
    if zhi > emax[2]:
        zlo, zhi = zlo - (zhi - emax[2]), emax[2]
    if zlo < emin[2]:
        zlo, zhi = emin[2], zhi + (emin[2] - zlo)
    zlo, zhi = max(zlo, emin[2]), min(zhi, emax[2])
    if zhi - zlo < 40:
        zc = (zlo + zhi) / 2
        zlo, zhi = zc - 20, zc + 20
    lo3 = np.array([xlo, ylo, zlo])
    hi3 = np.array([xhi, yhi, zhi])
    centre_e = (lo3 + hi3) / 2
    half = (hi3 - lo3) / 2
    return frame @ centre_e, half, mode


# ----------------------------------------------------------------------------- tissue parameters

def _u(rng, a, b):
    return float(rng.uniform(a, b))


def _draw_tissue(rng, pm: PreparedMap, opts: RenderOptions) -> dict:
    """Per-sample tissue parameters: per-label mean HU and texture, bone, fat, phase, etc."""
    phase = opts.phase or _pick(rng, opts.phase_probs)
    age = _u(rng, 0, 1)  # 0 young .. 1 old: drives bone density, calcification, fat in muscle
    t_lo, t_hi = opts.trabecular_hu
    trab = float(np.clip(t_hi - (t_hi - t_lo) * age + rng.normal(0, 25), t_lo, t_hi))
    c_lo, c_hi = opts.cortex_hu
    cort = float(np.clip(rng.uniform(c_lo, c_hi) - 150 * (age - 0.5), c_lo, c_hi))
    enh = phase != "none"
    p = dict(phase=phase, age=age, trabecular=trab, cortex=cort,
             fat=_u(rng, -120, -60), skin=_u(rng, 20, 60), soft=_u(rng, 15, 50),
             muscle=_u(rng, 35, 55) - 15 * age * _u(rng, 0, 1) + (_u(rng, 3, 12) if enh else 0),
             disc=_u(rng, *opts.disc_hu), csf=_u(rng, 0, 15),
             lung=_u(rng, -900, -770), lung_gradient=_u(rng, 0, 100),
             body_margin=_u(rng, *opts.body_margin_mm), fat_fraction_margin=_u(rng, 0.45, 0.85),
             visceral_fat=_u(rng, 0.25, 0.85), oral_contrast=rng.random() < opts.p_oral_contrast,
             cartilage_calcified=rng.random() < 0.1 + 0.8 * age, cartilage_calc_fraction=_u(rng, 0.05, 0.6),
             aortic_calcification=rng.random() < age ** 1.5, vacuum_disc=rng.random() < 0.25 * age,
             cortex_thickness=_u(rng, *opts.cortex_thickness), trab_texture=_u(rng, 0.15, 0.3),
             metal=rng.random() < opts.p_metal, table=rng.random() < opts.p_table)
    blood = _u(rng, 35, 50)
    art = {"none": blood, "arterial": _u(rng, 180, 380), "portal": _u(rng, 130, 200),
           "delayed": _u(rng, 90, 130)}[phase]
    ven = {"none": blood, "arterial": _u(rng, 45, 110), "portal": _u(rng, 120, 190),
           "delayed": _u(rng, 90, 130)}[phase]
    p["blood_art"], p["blood_ven"] = art, ven
    organ = {  # class -> (mean HU, texture std)
        "liver": ({"none": (45, 65), "arterial": (60, 85), "portal": (90, 130), "delayed": (70, 100)}, 5),
        "spleen": ({"none": (38, 55), "arterial": (100, 150), "portal": (100, 140), "delayed": (80, 110)}, 5),
        "kidney": ({"none": (25, 40), "arterial": (150, 240), "portal": (140, 210), "delayed": (100, 160)}, 5),
        "pancreas": ({"none": (30, 50), "arterial": (90, 130), "portal": (80, 110), "delayed": (60, 90)}, 8),
        "gland": ({"none": (25, 50), "arterial": (60, 100), "portal": (60, 100), "delayed": (50, 80)}, 6),
        "bladder": ({"none": (0, 15), "arterial": (0, 15), "portal": (0, 15), "delayed": (0, 15)}, 3),
        "gallbladder": ({"none": (0, 20), "arterial": (0, 20), "portal": (0, 20), "delayed": (0, 20)}, 3),
        "spinal_cord": ({k: (20, 40) for k in ("none", "arterial", "portal", "delayed")}, 4),
        "other_soft": ({"none": (20, 50), "arterial": (40, 80), "portal": (50, 90), "delayed": (40, 80)}, 6),
        "bowel": ({"none": (25, 45), "arterial": (50, 100), "portal": (60, 110), "delayed": (45, 80)}, 5),
        "cartilage": ({k: (70, 120) for k in ("none", "arterial", "portal", "delayed")}, 6),
        "fat": ({k: (-110, -70) for k in ("none", "arterial", "portal", "delayed")}, 6),
    }
    n = pm.class_lut.size
    mean = np.zeros(n, np.float32)
    tex = np.zeros(n, np.float32)
    klass = {}
    for lid in range(1, n):
        c = pm.classes.get(lid)
        if c is None:
            continue
        klass[lid] = c
        name = pm.names.get(lid, "")
        if c in organ:
            (rngs, t) = organ[c]
            lo_, hi_ = rngs[phase]
            mean[lid], tex[lid] = _u(rng, lo_, hi_), t
            if "thyroid" in name:
                mean[lid] = _u(rng, 80, 120) if not enh else _u(rng, 120, 200)
            if "adrenal" in name:
                mean[lid] = _u(rng, 10, 40) if not enh else _u(rng, 40, 80)
        elif c == "muscle":
            mean[lid], tex[lid] = p["muscle"] + rng.normal(0, 3), 7
        elif c == "artery":
            mean[lid], tex[lid] = art + rng.normal(0, 8 if enh else 2), 4
        elif c == "vein":
            v = ven
            if phase == "arterial" and ("brachiocephalic_vein" in name or "superior_vena" in name or "subclavian_vein" in name):
                v = _u(rng, 100, 1200)  # dense inflow of contrast on the injection side
            if "pulmonary_vein" in name:
                v = art
            if "portal" in name and phase == "arterial":
                v = _u(rng, 80, 150)
            mean[lid], tex[lid] = v + rng.normal(0, 5), 4
        elif c == "heart":
            mean[lid], tex[lid] = (art if enh else blood) + rng.normal(0, 5), 4
        elif c == "lung":
            mean[lid], tex[lid] = p["lung"] + rng.normal(0, 10), 10
        elif c == "airway":
            mean[lid], tex[lid] = _u(rng, -1000, -950), 5
        elif c == "disc":
            mean[lid], tex[lid] = p["disc"], 6
        elif c in BONE_CLASSES:
            mean[lid], tex[lid] = trab, 0
        else:
            mean[lid], tex[lid] = p["soft"], 5
    p["mean"], p["tex"], p["klass"] = mean, tex, klass
    p["myocardium"] = _u(rng, 40, 55) if not enh else _u(rng, 80, 130)
    p["kidney_medulla"] = _u(rng, 60, 100) if phase == "arterial" else None
    p["collecting"] = _u(rng, 300, 1200) if phase == "delayed" else None
    p["bladder_contrast"] = _u(rng, 200, 800) if phase == "delayed" and rng.random() < 0.7 else None
    return p


# ----------------------------------------------------------------------------- composition

def _compose(lab: np.ndarray, caff: np.ndarray, start, pm: PreparedMap, tp: dict, rng,
             random_intensity: bool) -> np.ndarray:
    """HU on the (cropped) label grid: body, fat, organs, lungs, bowel, bone, discs."""
    shape = lab.shape
    sp = _spacing(caff)
    svox = float(sp.mean())
    zax, _ = _axis_along(caff, 2)
    cls = pm.class_lut[lab]
    hu = np.take(tp["mean"], lab)

    # ---- texture fields (unit std)
    tex_fine = _smooth_noise(rng, shape, 0.7)
    tex_mid = _smooth_noise(rng, shape, 2.0)
    hu += tp["tex"][lab] * tex_mid

    # ---- body outline on a coarse grid (signed depth in mm, > 0 inside)
    def members(ids):  # boolean mask of a set of labels via a lookup table (faster than np.isin)
        t = np.zeros(pm.class_lut.size, bool)
        t[[i for i in ids if i < t.size]] = True
        return t[lab]
    f = 2
    occ = _block_any(lab > 0, f)
    csp = sp * f
    r_body = tp["body_margin"]
    # closing on a 4x coarser grid: the skin does not follow every organ's bump
    r_close = _u(rng, 15, 45)
    occ4 = _block_any(occ, 2)
    occ4 = ndi.distance_transform_edt(~occ4, sampling=2 * csp) <= r_close
    occ4 = ndi.distance_transform_edt(occ4, sampling=2 * csp) > r_close
    occ |= np.repeat(np.repeat(np.repeat(occ4, 2, 0), 2, 1), 2, 2)[:occ.shape[0], :occ.shape[1], :occ.shape[2]]
    body = ndi.distance_transform_edt(~occ, sampling=csp) <= r_body
    limb_names = ("humerus", "femur", "scapula", "clavic")
    limb_ids = [lid for lid, n in pm.names.items() if any(w in n for w in limb_names)]
    limb_muscle = None
    if limb_ids:
        limb = _block_any(members(limb_ids), f)
        if limb.any():
            d_limb = ndi.distance_transform_edt(~limb, sampling=csp)
            r_lm = _u(rng, 15, 35)
            body |= d_limb <= r_lm + r_body
            lm_c = d_limb <= r_lm
            limb_muscle = np.repeat(np.repeat(np.repeat(lm_c, f, 0), f, 1), f, 2)[:shape[0], :shape[1], :shape[2]]
    body = _fill_axial(body, zax)
    body = ndi.gaussian_filter(body.astype(np.float32), 1.5) > 0.5
    body = _fill_axial(body, zax)
    sd = np.where(body, ndi.distance_transform_edt(body, sampling=csp) - 0.5 * csp.mean(), -1.0 * csp.mean())
    sd = _upsample_repeat(sd.astype(np.float32), f, shape, 1.0)

    # ---- unlabelled tissue: air, skin, subcutaneous fat, muscle wall, visceral fat/soft mix
    un = lab == 0
    t_fat = max(2.0, tp["fat_fraction_margin"] * r_body)
    t_wall = float(np.clip(r_body - t_fat, 3.0, 20.0))
    skin_t = _u(rng, 1.0, 2.5)
    hu[un] = -1000.0
    flat = np.flatnonzero(un & (sd > 0))  # unlabelled voxels inside the body (1-D for speed)
    sdv, tm, tf = sd.ravel()[flat], tex_mid.ravel()[flat], tex_fine.ravel()[flat]
    vis_thr = np.quantile(tex_mid[::4, ::4, ::4], 1 - tp["visceral_fat"])
    fatfrac = 1.0 / (1.0 + np.exp(-(tm - vis_thr) * 4.0))
    val = fatfrac * (tp["fat"] + 15) + (1 - fatfrac) * (tp["soft"] + 8 * tf)   # visceral fat / soft mix
    wall = (sdv <= t_fat + t_wall)
    if limb_muscle is not None:
        wall |= limb_muscle.ravel()[flat] & (sdv > t_fat)
    val[wall] = tp["muscle"] + 6 * tm[wall]                                     # muscle layer
    fat = sdv <= t_fat
    val[fat] = tp["fat"] + 8 * tm[fat]                                          # subcutaneous fat
    val[sdv <= skin_t] = tp["skin"]                                             # skin
    hu.ravel()[flat] = val
    del flat, sdv, tm, tf, val, fatfrac, wall, fat
    # canal: unlabelled voxels near the spinal cord are CSF / epidural tissue
    cord_ids = [l for l, c in tp["klass"].items() if c == "spinal_cord"]
    if cord_ids:
        cord = members(cord_ids)
        if cord.any():
            near = ndi.binary_dilation(cord, iterations=2) & un
            hu[near] = tp["csf"] + 5 * tex_fine[near]

    bnd = _boundary(lab)

    # ---- lungs: parenchyma with a dependent gradient, vessels, fissures
    lung_ids = [l for l, c in tp["klass"].items() if c == "lung"]
    lung = members(lung_ids) if lung_ids else np.zeros(shape, bool)
    if lung.any():
        bb = ndi.find_objects(lung.astype(np.uint8))[0]
        lm = lung[bb]
        a = _world_coord(caff, bb, 1)
        x = _world_coord(caff, bb, 0)
        amax, amin = float(np.max(a)), float(np.min(a))
        post = (amax - a) / max(amax - amin, 1.0)
        x_mid = np.mean([v.body_centre[0] for v in pm.verts.values()]) if pm.verts else float(np.mean(x))
        base = hu[bb] + tp["lung_gradient"] * post ** 2
        # faint small-vessel background: curves where two smooth random fields are both near zero
        na = _smooth_noise(rng, lm.shape, 3.5 / svox)
        nb = _smooth_noise(rng, lm.shape, 3.5 / svox)
        ves = 0.35 * np.exp(-(na * na + nb * nb) / (2 * 0.05 ** 2))
        del na, nb
        vessel_hu = 0.5 * (tp["blood_art"] + tp["blood_ven"])
        val = base + ves * (vessel_hu - base)
        # fissures: faint lines where two lung lobes touch
        fissure = np.zeros_like(lm)
        l0 = lab[bb]
        for ax in range(3):
            lo_ = tuple(slice(0, -1) if i == ax else slice(None) for i in range(3))
            hi_ = tuple(slice(1, None) if i == ax else slice(None) for i in range(3))
            fissure[lo_] |= (np.diff(l0, axis=ax) != 0) & lm[lo_] & lm[hi_]
        val = np.where(fissure, val + _u(rng, 80, 250), val)
        sub = hu[bb]
        sub[lm] = val[lm]
        hu[bb] = sub
        # branching pulmonary vessel trees from each hilum
        for side in ("left", "right"):
            ids = [l for l in lung_ids if side in pm.names.get(l, "")] or (lung_ids if side == "left" else [])
            m = members(ids)
            if m.sum() < 1000:
                continue
            pts = np.argwhere(m[::3, ::3, ::3]) * 3
            w = _apply(caff, pts.astype(float))
            c = w.mean(0)
            medial = np.sign(x_mid - c[0]) or 1.0
            zq = np.quantile(w[:, 2], [0.3, 0.45, 0.6])
            roots = []
            for z in zq:  # roots on the mediastinal surface at three heights
                band = w[np.abs(w[:, 2] - z) < 8]
                if len(band) == 0:
                    continue
                xm = np.quantile(band[:, 0] * medial, 0.9)
                cand = band[band[:, 0] * medial >= xm - 5]
                roots.append(cand[np.argmin(np.abs(cand[:, 1] - np.median(band[:, 1])))])
            if not roots:
                continue
            vol_ml = m.sum() * float(np.prod(sp)) / 1000.0  # budget ~1 segment per ml of lung
            segs = _grow_tree(m, caff, roots, rng, r0=_u(rng, 3.5, 5.5), n_main=int(rng.integers(10, 16)),
                              r_min=0.6, max_segments=int(np.clip(vol_ml, 20, 2500)), targets=w)
            _draw_segments(hu, m, caff, segs, lambda base: np.float32(vessel_hu))

    # ---- hepatic / portal vessel tree in the liver (portal vein entry)
    liver_ids = [l for l, c in tp["klass"].items() if c == "liver"]
    if liver_ids:
        m = members(liver_ids)
        if m.sum() > 5000:
            pts = np.argwhere(m[::3, ::3, ::3]) * 3
            w = _apply(caff, pts.astype(float))
            pv = [l for l, n in pm.names.items() if "portal" in n and l < pm.class_lut.size]
            sl = _crop_bbox(shape, pm, pv[0], start) if pv else None
            if sl is not None and (lab[sl] == pv[0]).any():
                q = _apply(caff, (np.argwhere(lab[sl] == pv[0]) + [s_.start for s_ in sl]).mean(0)[None])[0]
            else:
                q = w.mean(0) + np.array([-40.0, -20.0, -20.0])
            root = w[np.argmin(np.linalg.norm(w - q, axis=1))]
            vol_ml = m.sum() * float(np.prod(sp)) / 1000.0
            segs = _grow_tree(m, caff, root, rng, r0=_u(rng, 4.0, 6.5), n_main=int(rng.integers(4, 7)),
                              seg_mm=(15.0, 28.0), r_min=1.0, max_segments=int(np.clip(vol_ml / 3, 10, 500)),
                              targets=w)
            vhu = tp["blood_ven"] if tp["phase"] != "arterial" else _u(rng, 60, 120)
            _draw_segments(hu, m, caff, segs, lambda base: np.float32(vhu) + 0 * base)

    # ---- per-structure special cases
    for lid, c in tp["klass"].items():
        if c not in ("airway", "bowel", "kidney", "heart", "artery", "cartilage", "bladder"):
            continue
        sl = _crop_bbox(shape, pm, lid, start)
        if sl is None:
            continue
        lsub = lab[sl]
        m = lsub == lid
        if not m.any():
            continue
        sub = hu[sl]
        name = pm.names.get(lid, "")
        if c == "airway":
            d = _layers(lsub, m, 1, bnd[sl])
            sub[d == 1] = 0.5 * (tp["skin"] + sub[d == 1])
        elif c == "bowel":
            _render_bowel(sub, lsub, m, bnd[sl], tex_mid[sl], tex_fine[sl], caff, sl, name, tp, rng)
        elif c == "kidney":
            d = _layers(lsub, m, 6, bnd[sl])
            if tp["kidney_medulla"] is not None:
                sub[m & (d >= 3)] = tp["kidney_medulla"] + 6 * tex_mid[sl][m & (d >= 3)]
            if tp["collecting"] is not None:
                core = m & (d >= 6)
                sub[core] = tp["collecting"] + 50 * tex_mid[sl][core]
        elif c == "heart":
            d = _layers(lsub, m, 4, bnd[sl])
            shell = m & (d >= 1) & (d <= 3)
            sub[shell] = tp["myocardium"] + 6 * tex_mid[sl][shell]
        elif c == "artery" and tp["aortic_calcification"]:
            d = _layers(lsub, m, 1, bnd[sl])
            calc = (d == 1) & (tex_fine[sl] > _u(rng, 2.0, 2.8))
            sub[calc] = _u(rng, 300, 900)
        elif c == "cartilage" and tp["cartilage_calcified"]:
            calc = m & (tex_fine[sl] > np.quantile(tex_fine[sl][m], 1 - tp["cartilage_calc_fraction"]))
            sub[calc] = _u(rng, 180, 600) + 60 * tex_fine[sl][calc]
        elif c == "bladder" and tp["bladder_contrast"] is not None:
            a = np.broadcast_to(_world_coord(caff, sl, 1), m.shape)
            lvl = np.quantile(a[m], _u(rng, 0.2, 0.6))
            sub[m & (a < lvl)] = tp["bladder_contrast"]
        hu[sl] = sub

    # ---- bone: cortex (outer layers) + trabecular interior with texture
    _render_bone(hu, lab, cls, bnd, tex_fine, tex_mid, caff, start, pm, tp, rng)

    # ---- intervertebral discs
    _render_discs(hu, lab, caff, start, pm, tp, rng, tex_fine)

    # ---- random intensities (SynthSeg style): replace by random means per region
    if random_intensity:
        hu = _randomise(hu, lab, sd, rng, tex_mid)

    # ---- metal implant and patient table
    if tp["metal"]:
        _render_metal(hu, lab, caff, pm, rng)
    if tp["table"]:
        _render_table(hu, sd, caff, rng)
    return hu


def _crop_bbox(shape, pm: PreparedMap, lid: int, start) -> Optional[tuple]:
    """Bounding box of label `lid` inside a crop that starts at input voxel `start`."""
    b = pm.bboxes[lid] if 0 < lid < len(pm.bboxes) else None
    if b is None:
        return None
    out = []
    for a in range(3):
        lo = max(b[a].start - int(start[a]), 0)
        hi = min(b[a].stop - int(start[a]), shape[a])
        if hi <= lo:
            return None
        out.append(slice(lo, hi))
    return tuple(out)


def _grow_tree(inside, caff, roots, rng, r0, n_main, seg_mm=(10.0, 22.0), r_min=0.5, max_depth=24,
               max_segments=1500, targets=None):
    """Random branching vessel tree from the `roots` (RAS) staying inside the boolean mask `inside`.

    Each branch steers towards a random target point of the organ (`targets`, RAS), children pick new
    targets ahead of them, so the tree spreads over the whole organ. Returns (p0, p1, radius) segments."""
    inv = np.linalg.inv(caff)
    shp = np.array(inside.shape)

    def ok(p):
        v = np.rint(_apply(inv, p[None])[0]).astype(int)
        return bool(np.all(v >= 0) and np.all(v < shp) and inside[tuple(v)])

    def pick_target(p, d):
        if targets is None or len(targets) == 0:
            return p + d * 50.0
        cand = targets[rng.integers(0, len(targets), 24)]
        v = cand - p
        dist = np.linalg.norm(v, axis=1) + 1e-6
        score = (v @ d) / dist - np.abs(dist - 60.0) / 120.0 + rng.uniform(0, 0.3, len(cand))
        return cand[int(np.argmax(score))]
    segs = []
    queue = deque()
    roots = np.atleast_2d(np.asarray(roots, float))
    for i in range(n_main):
        p = roots[i % len(roots)]
        t = targets[rng.integers(len(targets))] if targets is not None and len(targets) else p + rng.normal(size=3)
        d = (t - p) / (np.linalg.norm(t - p) + 1e-9)
        queue.append((p, d, r0 * rng.uniform(0.8, 1.1), 0, t))
    while queue and len(segs) < max_segments:
        p, d, r, depth, t = queue.popleft()  # breadth first: every branch grows
        if r < r_min or depth > max_depth:
            continue
        length = rng.uniform(*seg_mm) * (0.5 + 0.5 * min(r / r0, 1.0))
        to_t = t - p
        dist_t = np.linalg.norm(to_t)
        if dist_t < 10:
            t = pick_target(p, d)
            to_t = t - p
            dist_t = np.linalg.norm(to_t) + 1e-9
        d = 0.55 * d + 0.45 * to_t / dist_t
        q = None
        for attempt in range(6):  # retry with more and more deviation when the step leaves the organ
            dt = d + rng.normal(scale=0.2 + 0.35 * attempt, size=3)
            dt /= np.linalg.norm(dt)
            for f in (1.0, 0.5):
                if ok(p + dt * length * f):
                    q = p + dt * length * f
                    break
            if q is not None:
                d = dt
                break
        if q is None:
            continue
        segs.append((p, q, r))
        if rng.random() < 0.7:  # bifurcation (Murray: child radius ~ 0.79 r)
            queue.append((q, d, r * rng.uniform(0.8, 0.92), depth + 1, t))
            queue.append((q, d, r * rng.uniform(0.7, 0.86), depth + 1, pick_target(q, d)))
        else:
            queue.append((q, d, r * rng.uniform(0.93, 0.99), depth + 1, t))
    return segs


def _draw_segments(hu, mask, caff, segs, value_fn):
    """Paint vessel segments inside `mask`; value_fn(base HU) -> vessel HU.

    Vessels thicker than ~a voxel are soft-edged capsules; thinner ones are rasterised as lines whose
    voxel coverage is their cross-section (partial volume), all at once."""
    inv = np.linalg.inv(caff)
    shp = np.array(hu.shape)
    vs = float(_spacing(caff).mean())
    thin = [sg for sg in segs if sg[2] < 0.6 * vs]
    thick = [sg for sg in segs if sg[2] >= 0.6 * vs]
    if thin:
        pts, cov = [], []
        for p0, p1, r in thin:
            n = int(np.ceil(np.linalg.norm(p1 - p0) / (0.5 * vs))) + 1
            t = np.linspace(0, 1, n)[:, None]
            pts.append(p0 + t * (p1 - p0))
            cov.append(np.full(n, min(1.0, np.pi * r * r / (vs * vs))))
        v = np.rint(_apply(inv, np.concatenate(pts))).astype(int)
        cov = np.concatenate(cov).astype(np.float32)
        ok = np.all((v >= 0) & (v < shp), axis=1)
        v, cov = v[ok], cov[ok]
        flat = np.ravel_multi_index(v.T, hu.shape)
        order = np.argsort(-cov)
        flat, cov = flat[order], cov[order]
        flat, first = np.unique(flat, return_index=True)
        cov = cov[first]
        keep = mask.ravel()[flat]
        flat, cov = flat[keep], cov[keep]
        h = hu.reshape(-1)
        b0 = h[flat]
        h[flat] = b0 + cov * (value_fn(b0) - b0)
    for p0, p1, r in thick:
        lo = np.minimum(p0, p1) - r - vs
        hi = np.maximum(p0, p1) + r + vs
        corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
        v = _apply(inv, corners)
        a = np.clip(np.floor(v.min(0)).astype(int), 0, shp)
        b = np.clip(np.ceil(v.max(0)).astype(int) + 1, 0, shp)
        if np.any(b <= a):
            continue
        sl = tuple(slice(a[i], b[i]) for i in range(3))
        P = [_world_coord(caff, sl, k) for k in range(3)]
        d = p1 - p0
        dd = max(float(d @ d), 1e-9)
        t = np.clip(((P[0] - p0[0]) * d[0] + (P[1] - p0[1]) * d[1] + (P[2] - p0[2]) * d[2]) / dd, 0, 1)
        dist = np.sqrt(sum((P[k] - p0[k] - t * d[k]) ** 2 for k in range(3)))
        frac = np.clip((r + 0.5 * vs - dist) / vs, 0, 1)
        m = mask[sl] & (frac > 0)
        if not m.any():
            continue
        sub = hu[sl]
        f = np.broadcast_to(frac, m.shape)[m]
        b0 = sub[m]
        sub[m] = b0 + f * (value_fn(b0) - b0)
        hu[sl] = sub


def _render_bowel(sub, lsub, m, bnd, tmid, tfine, caff, sl, name, tp, rng):
    """Bowel wall, fluid or oral contrast, gas rising anteriorly (air-fluid level in the stomach)."""
    d = _layers(lsub, m, 2, bnd)
    inner = m & (d >= 2)
    if not inner.any():
        return
    n = name.lower()
    gas_frac = {"colon": _u(rng, 0.05, 0.5), "stomach": _u(rng, 0.0, 0.5), "small_bowel": _u(rng, 0.0, 0.2),
                "duodenum": _u(rng, 0.0, 0.3), "esophagus": _u(rng, 0.0, 0.1)}
    g = next((v for k, v in gas_frac.items() if k in n), _u(rng, 0, 0.2))
    if tp["oral_contrast"] and "esophagus" not in n and rng.random() < 0.85:
        content = _u(rng, 150, 600)
    elif "colon" in n or "rectum" in n:
        content = _u(rng, -80, 40)  # faeces: mottled
    else:
        content = _u(rng, 0, 30)
    a = np.broadcast_to(_world_coord(caff, sl, 1), m.shape)
    if "stomach" in n:
        score = a + 0.0 * tmid  # air-fluid level: gas is anterior (non-dependent)
    else:
        score = tmid + 0.01 * a
    thr = np.quantile(score[inner], 1 - g) if g > 0 else np.inf
    gas = inner & (score >= thr)
    vals = content + (60 if "colon" in n else 8) * tfine[inner]
    if "colon" in n:  # small gas bubbles in faeces
        vals = np.where(tfine[inner] > 1.8, -700.0, vals)
    sub[inner] = vals
    sub[gas] = -1000.0 + 10 * tfine[gas]


# Cortical weight by depth layer (1 = label surface ... 5) and trabecular factor per bone region.
# Fitted to the real bone HU of TotalSegmentator subject s0328 at 1.5 mm (see README): the bright
# shell peaks one voxel inside the label surface; posterior vertebral elements are far denser than
# vertebral bodies; the sacrum is sparse; femoral heads are dense.
_BONE_PROFILES = {  # name: ((w1, w2, w3, w4, w5), trabecular factor)
    "body": ((0.20, 0.24, 0.10, 0.04, 0.0), 1.0),
    "post": ((0.32, 0.52, 0.34, 0.18, 0.05), 1.0),
    "rib": ((0.32, 0.26, 0.03, 0.0, 0.0), 0.8),
    "flat": ((0.20, 0.52, 0.34, 0.13, 0.04), 1.0),
    "long": ((0.12, 0.42, 0.38, 0.20, 0.10), 1.5),
    "sacrum": ((0.16, 0.18, 0.06, 0.0, 0.0), 0.75),
    "s1": ((0.20, 0.28, 0.18, 0.08, 0.03), 1.5),
    "skull": ((0.40, 0.70, 0.65, 0.45, 0.25), 2.0),
}
_PROFILE_IDS = {k: i for i, k in enumerate(_BONE_PROFILES)}


def _bone_profile(name: str, c: str) -> str:
    n = name.lower()
    if c == "vertebra":
        return "s1" if vertebra_level(name) == "S1" else "body"
    if c == "sacrum":
        return "sacrum"
    if c == "rib":
        return "rib"
    if "femur" in n or "humerus" in n:
        return "long"
    if "skull" in n:
        return "skull"
    return "flat"


def _render_bone(hu, lab, cls, bnd, tex_fine, tex_mid, caff, start, pm, tp, rng):
    """Bone = trabecular interior (textured) blended towards cortex by a per-region depth profile."""
    bone_ci = [_CI[c] for c in BONE_CLASSES]
    bone_t = np.zeros(len(CLASSES), bool)
    bone_t[bone_ci] = True
    bone = bone_t[cls]
    if not bone.any():
        return
    bb = ndi.find_objects(bone.astype(np.uint8))[0]
    lsub, msub = lab[bb], bone[bb]
    depth = np.minimum(_layers(lsub, msub, 5, bnd[bb]), 6)
    trab, cort = tp["trabecular"], tp["cortex"]
    n = pm.class_lut.size
    prof_lut = np.zeros(n, np.uint8)
    tfac = np.ones(n, np.float32)
    for lid, c in tp["klass"].items():
        if c in BONE_CLASSES:
            prof_lut[lid] = _PROFILE_IDS[_bone_profile(pm.names.get(lid, ""), c)]
            tfac[lid] = rng.normal(1.0, 0.06)
    prof = prof_lut[lsub]
    # posterior elements of each vertebra (behind the body cut plane)
    start_bb = np.asarray(start) + [s.start for s in bb]
    for v in pm.verts.values():
        if v.lid <= 0 or v.level == "S1":
            continue
        sl = _crop_bbox(lsub.shape, pm, v.lid, start_bb)
        if sl is None:
            continue
        m = lsub[sl] == v.lid
        s = sum((_world_coord(caff, tuple(slice(a.start + o.start, a.stop + o.start) for a, o in zip(sl, bb)), r)
                 - v.centroid[r]) * v.anterior[r] for r in range(3))
        p = prof[sl]
        p[m & (s < v.cut)] = _PROFILE_IDS["post"]
        prof[sl] = p
    W = np.zeros((len(_BONE_PROFILES), 7), np.float32)
    T = np.zeros(len(_BONE_PROFILES), np.float32)
    k = tp["cortex_thickness"]
    for name, (w, t) in _BONE_PROFILES.items():
        W[_PROFILE_IDS[name], 1:6] = np.clip(np.array(w) * k, 0, 1)
        T[_PROFILE_IDS[name]] = t
    # local cortical thickness varies along the surface: log-normal modulation of the weights
    thick = ndi.gaussian_filter(tex_mid[bb], 2.0)
    thick *= 1.0 / max(float(thick.std()), 1e-3)
    wc = np.minimum(W[prof, depth] * np.exp(0.6 * thick + 0.15 * tex_fine[bb] - 0.19), 1.0)
    tmean = trab * tfac[lsub] * T[prof]
    tr = tmean * (1.0 + tp["trab_texture"] * tex_fine[bb])
    # cortical density varies too (log-normal, smooth along the surface)
    val = tr + wc * (cort * np.exp(0.15 * thick - 0.01) - tr)
    sub = hu[bb]
    sub[msub] = val[msub]
    hu[bb] = sub


def _render_discs(hu, lab, caff, start, pm, tp, rng, tex_fine):
    """Soft tissue (tp['disc'] HU) in the unlabelled gap between consecutive vertebral bodies."""
    order = [l for l in LEVELS if l in pm.verts and pm.verts[l].lid > 0]
    zax, zsign = _axis_along(caff, 2)
    sp = _spacing(caff)
    L = int(np.ceil(18.0 / sp[zax]))
    for up, dn in zip(order[:-1], order[1:]):
        vu, vd = pm.verts[up], pm.verts[dn]
        between = LEVELS[LEVELS.index(up) + 1:LEVELS.index(dn)]
        if any(b not in ("T13", "L6") for b in between):  # not neighbours (a level is missing)
            continue
        su, sd_ = _crop_bbox(lab.shape, pm, vu.lid, start), _crop_bbox(lab.shape, pm, vd.lid, start)
        if su is None or sd_ is None:
            continue
        sl = tuple(slice(max(min(a.start, b.start) - 2, 0), min(max(a.stop, b.stop) + 2, lab.shape[i]))
                   for i, (a, b) in enumerate(zip(su, sd_)))
        lsub = lab[sl]

        def body(v):
            m = lsub == v.lid
            s = sum((_world_coord(caff, sl, r) - v.centroid[r]) * v.anterior[r] for r in range(3))
            return m & (s >= v.cut)
        bu, bd = body(vu), body(vd)
        if not bu.any() or not bd.any():
            continue
        # one-sided searches along the voxel axis closest to superior
        sup_of = _within(bu, zax, zsign, L)     # an upper-body voxel lies above within L
        inf_of = _within(bd, zax, -zsign, L)    # a lower-body voxel lies below within L
        gap = sup_of & inf_of & (lsub == 0)
        if not gap.any():
            continue
        st = np.ones((3, 3, 3), bool)
        idx = [slice(None)] * 3
        idx[zax] = [0, 2]
        st[tuple(idx)] = False
        gap |= ndi.binary_dilation(gap, structure=st) & (lsub == 0)
        sub = hu[sl]
        sub[gap] = tp["disc"] + 6 * tex_fine[sl][gap]
        if tp["vacuum_disc"] and rng.random() < 0.3:
            core = gap & (tex_fine[sl] > 1.6)
            sub[core] = _u(rng, -900, -400)
        hu[sl] = sub


def _within(mask, ax, sign, L):
    """True where `mask` has a voxel within (0, L] voxels in direction `sign` along axis `ax`."""
    m = np.moveaxis(mask, ax, -1).astype(np.int32)
    if sign < 0:
        m = m[..., ::-1]
    cs = np.concatenate([np.zeros(m.shape[:-1] + (1,), np.int32), np.cumsum(m, axis=-1)], -1)
    n = m.shape[-1]
    i = np.arange(n)
    hi = np.minimum(i + L, n)
    cnt = cs[..., hi] - cs[..., i + 1]
    out = cnt > 0
    if sign < 0:
        out = out[..., ::-1]
    return np.moveaxis(out, -1, ax)


def _randomise(hu, lab, sd, rng, tex):
    """SynthSeg-style: every label and synthetic region gets a random mean and texture."""
    n = int(lab.max()) + 1
    mean = rng.uniform(-1000, 1500, n + 4).astype(np.float32)
    std = rng.uniform(0, 60, n + 4).astype(np.float32)
    out = mean[lab] + std[lab] * tex
    un = lab == 0
    # keep a synthetic split of the unlabelled space into air / body / bright structure edges
    reg = np.where(sd > 0, n + 1, n).astype(np.int32)
    out[un] = (mean[reg] + std[reg] * tex)[un]
    return out.astype(np.float32)


def _render_metal(hu, lab, caff, pm, rng):
    """Pedicle screws + rods (spine) or a hip prosthesis, 2000-3000 HU."""
    metal_hu = _u(rng, 2000, 3000)
    inv = np.linalg.inv(caff)
    shp = np.array(hu.shape)

    def in_crop(p, margin=5):
        v = _apply(inv, np.asarray(p, float)[None])[0]
        return bool(np.all(v >= margin) and np.all(v < shp - margin))
    order = [l for l in LEVELS if l in pm.verts and pm.verts[l].lid > 0 and not l.startswith("C")
             and in_crop(pm.verts[l].body_centre)]
    hips = []
    for lid, n in pm.names.items():
        if "femur" in n and lid < len(pm.bboxes) and pm.bboxes[lid] is not None:
            b = pm.bboxes[lid]
            top = _apply(pm.affine, np.array([[(b[0].start + b[0].stop) / 2, (b[1].start + b[1].stop) / 2,
                                               b[2].stop - 10]], float))[0]
            if in_crop(top):
                hips.append(lid)
    if not order and not hips:
        return
    kind = "spine" if (order and (not hips or rng.random() < 0.6)) else "hip"

    def capsule(p0, p1, r):
        lo = np.minimum(p0, p1) - r - 2
        hi = np.maximum(p0, p1) + r + 2
        corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
        v = _apply(inv, corners)
        a = np.clip(np.floor(v.min(0)).astype(int), 0, np.array(hu.shape))
        b = np.clip(np.ceil(v.max(0)).astype(int) + 1, 0, np.array(hu.shape))
        if np.any(b <= a):
            return
        sl = tuple(slice(a[i], b[i]) for i in range(3))
        P = np.stack(np.broadcast_arrays(*[_world_coord(caff, sl, r_) for r_ in range(3)]), -1)
        d = p1 - p0
        t = np.clip(((P - p0) @ d) / max(d @ d, 1e-9), 0, 1)
        dist = np.linalg.norm(P - (p0 + t[..., None] * d), axis=-1)
        sub = hu[sl]
        sub[dist <= r] = metal_hu
        hu[sl] = sub

    if kind == "spine":
        n = int(rng.integers(2, 5))
        i0 = int(rng.integers(0, max(1, len(order) - n + 1)))
        heads = {-1: [], 1: []}
        for l in order[i0:i0 + n]:
            v = pm.verts[l]
            lat = np.cross(v.axis, v.anterior)
            for s in (-1, 1):
                tip = v.body_centre + v.anterior * 8 + s * lat * 4
                entry = v.body_centre - v.anterior * _u(rng, 38, 48) + s * lat * _u(rng, 18, 26)
                capsule(entry, tip, _u(rng, 2.5, 3.5))
                head = entry - (tip - entry) / np.linalg.norm(tip - entry) * 6
                capsule(entry, head, 5.0)
                heads[s].append(head)
        for s in (-1, 1):
            for a, b in zip(heads[s][:-1], heads[s][1:]):
                capsule(a, b, 2.75)
    else:
        lid = hips[int(rng.integers(len(hips)))]
        b = pm.bboxes[lid]
        if b is None:
            return
        p = _label_points(pm.labels, pm.affine, lid, b)
        top = p[p[:, 2] >= p[:, 2].max() - 25]
        head = top.mean(0)
        shaft = p[p[:, 2] <= np.quantile(p[:, 2], 0.4)]
        if len(shaft) < 10:
            return
        sc = shaft.mean(0)
        r = _u(rng, 14, 24)
        capsule(head, head, r)
        neck_end = sc + np.array([0, 0, 30.0])
        capsule(head, neck_end, 8)
        capsule(neck_end, sc - np.array([0, 0, 60.0]), _u(rng, 6, 9))


def _render_table(hu, sd, caff, rng):
    """A curved patient table (two thin shells around foam) behind the patient's back.

    Computed in one plane perpendicular to the slice axis and repeated along it."""
    zax, _ = _axis_along(caff, 2)
    body2 = (sd > 0).any(axis=zax)
    if not body2.any():
        return
    sl = [slice(0, n) for n in hu.shape]
    sl[zax] = slice(hu.shape[zax] // 2, hu.shape[zax] // 2 + 1)
    a = np.squeeze(np.broadcast_to(_world_coord(caff, tuple(sl), 1), [1 if i == zax else n for i, n in enumerate(hu.shape)]), zax)
    x = np.squeeze(np.broadcast_to(_world_coord(caff, tuple(sl), 0), [1 if i == zax else n for i, n in enumerate(hu.shape)]), zax)
    xc = float(x[body2].mean())
    a0 = float(a[body2].min()) - _u(rng, 0, 15)
    curv, th = _u(rng, 0.0, 0.0015), _u(rng, 8, 20)
    depth = a0 + curv * (x - xc) ** 2 - a  # > 0 below the table's top surface
    inside = (np.abs(x - xc) < _u(rng, 180, 260)) & ~body2
    sh = np.exp(-0.5 * ((depth - 1.0) / 1.2) ** 2) + np.exp(-0.5 * ((depth - th - 1.0) / 1.2) ** 2)
    core = np.clip(np.minimum(depth - 1.0, th + 1.0 - depth) / 1.5 + 0.5, 0, 1)
    shell_hu, core_hu = _u(rng, 250, 700), _u(rng, -950, -800)
    val2 = -1000.0 + core * (core_hu + 1000.0) + np.minimum(sh, 1.0) * (shell_hu - core_hu)
    m2 = inside & ((sh > 0.02) | (core > 0))
    m = np.expand_dims(m2, zax) & (sd <= 0)
    hu[m] = np.broadcast_to(np.expand_dims(val2, zax), hu.shape)[m]


# ----------------------------------------------------------------------------- warping

def _warp(src, start, tr: SpatialTransform, in_affine, grid_origin_e, grid_spacing, grid_shape, order,
          cval, out_dtype, chunk=24) -> np.ndarray:
    """Sample `src` (input grid sub-box starting at voxel `start`) on an output-frame grid."""
    inv = np.linalg.inv(in_affine)
    Ainv = inv[:3, :3]
    s = np.asarray(grid_spacing, float)
    Q = Ainv @ tr.matrix @ tr.frame @ np.diag(s)
    r = Ainv @ (tr.centre_in + tr.matrix @ tr.frame @ grid_origin_e) + inv[:3, 3] - np.asarray(start, float)
    Ws = []
    for a in range(3):
        e = grid_origin_e[a] + s[a] * np.arange(grid_shape[a])
        Ws.append(_interp_matrix((e - tr.field_origin[a]) / tr.field_spacing[a], tr.field.shape[a + 1]))
    F = tr.field  # (3, m0, m1, m2) RAS mm
    Fv = np.einsum("ij,jabc->iabc", Ainv, F)  # displacement in input voxels
    out = np.empty(grid_shape, out_dtype)
    n0, n1, n2 = grid_shape
    i0 = np.arange(n0, dtype=np.float32)[:, None, None]
    i1 = np.arange(n1, dtype=np.float32)[None, :, None]
    tmp = np.einsum("iabc,xa->ixbc", Fv, Ws[0])
    tmp = np.einsum("ixbc,yb->ixyc", tmp, Ws[1]).astype(np.float32)  # (3, n0, n1, m2)
    for k0 in range(0, n2, chunk):
        k1 = min(n2, k0 + chunk)
        i2 = np.arange(k0, k1, dtype=np.float32)[None, None, :]
        d = np.einsum("ixyc,zc->ixyz", tmp, Ws[2][k0:k1].astype(np.float32))
        coords = np.empty((3, n0, n1, k1 - k0), np.float32)
        for c in range(3):
            coords[c] = Q[c, 0] * i0 + Q[c, 1] * i1 + Q[c, 2] * i2 + r[c] + d[c]
        out[:, :, k0:k1] = ndi.map_coordinates(src, coords, order=order, mode="constant", cval=cval,
                                               prefilter=False)
    return out


# ----------------------------------------------------------------------------- acquisition helpers

def _metal_streaks(img, thr, spacing, rng):
    """Beam-hardening streaks in axial slices that contain metal (> thr HU)."""
    n0, n1 = img.shape[:2]
    X = (np.arange(n0)[:, None] * spacing[0]).astype(np.float32)
    Y = (np.arange(n1)[None, :] * spacing[1]).astype(np.float32)
    amp = _u(rng, 60, 250)
    nang = int(rng.integers(3, 8))
    angs = rng.uniform(0, np.pi, nang)
    sgn = rng.choice([-1.0, 1.0], nang) * rng.uniform(0.3, 1.0, nang)
    decay = _u(rng, 20, 70)
    for k in range(img.shape[2]):
        m = img[:, :, k] > thr
        if m.sum() < 2:
            continue
        lab2, nc = ndi.label(m)
        cen = np.array(ndi.center_of_mass(m, lab2, range(1, nc + 1))) * spacing[:2]
        add = np.zeros((n0, n1), np.float32)
        cen = cen[np.argsort(-np.bincount(lab2.ravel())[1:])][:4]  # the largest pieces only
        for cx, cy in cen:
            dx, dy = X - cx, Y - cy
            r = np.sqrt(dx * dx + dy * dy) + 1e-3
            for t, s in zip(angs, sgn):
                perp = np.abs(dx * np.sin(t) - dy * np.cos(t))
                add += s * amp * np.exp(-perp ** 2 / (2 * 1.5 ** 2)) * np.exp(-r / decay)
        for i in range(len(cen)):  # dark band between metal objects
            for j in range(i + 1, len(cen)):
                p, q = cen[i], cen[j]
                d = q - p
                L = np.linalg.norm(d) + 1e-6
                t = np.clip(((X - p[0]) * d[0] + (Y - p[1]) * d[1]) / L ** 2, 0, 1)
                dist = np.sqrt((X - p[0] - t * d[0]) ** 2 + (Y - p[1] - t * d[1]) ** 2)
                add -= amp * 0.6 * np.exp(-dist ** 2 / (2 * 4.0 ** 2))
        img[:, :, k] += np.where(m, 0, add)


# ----------------------------------------------------------------------------- main entry point

def render_ct(labels: np.ndarray, affine: np.ndarray, names: dict, rng: np.random.Generator, *,
              spacing_mm=None, return_info: bool = False, prepared: Optional[PreparedMap] = None, **options):
    """Draw one random CT-like volume from a label map.

    labels: (I, J, K) non-negative ints; affine: voxel -> RAS mm; names: {id: name}.
    spacing_mm: output voxel size (scalar or (x, y, z) along the output axes, which are the input's
    axes reordered to be closest to R, A, S); None draws a clinical spacing.
    options: fields of RenderOptions (e.g. fov="chest", phase="portal", p_metal=0.2).
    Returns (hu float32, affine_out, labels_out on the same grid) and, with return_info=True,
    a dict with the SpatialTransform ("transform") and the drawn parameters.
    """
    opts = RenderOptions(**options)
    t0 = time.perf_counter()
    timing = {}
    pm = prepared if prepared is not None else prepare_labelmap(labels, affine, names)
    aff = pm.affine
    lab_full = pm.labels
    sp_in = _spacing(aff)
    frame = _output_frame(aff)

    # ---- acquisition / output spacing
    if opts.slice_thickness_mm is not None:
        T = float(opts.slice_thickness_mm)
    else:
        T = float(rng.choice([1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0], p=[.12, .1, .1, .14, .14, .2, .08, .12]))
        if rng.random() < 0.03:
            T = 8.0
    if spacing_mm is None:
        pix = _u(rng, 0.6, 1.0) if rng.random() < 0.75 else _u(rng, 1.0, 1.5)
        inc = T * (1.0 if rng.random() < 0.7 else _u(rng, 0.5, 1.0))
        out_sp = np.array([pix, pix, inc])
        acq_z = inc
    else:
        out_sp = np.broadcast_to(np.asarray(spacing_mm, float), (3,)).copy()
        inc = T * (1.0 if rng.random() < 0.7 else _u(rng, 0.5, 1.0))
        acq_z = max(out_sp[2], inc)

    # ---- geometry
    mode = opts.fov if opts.fov != "random" else _pick(rng, opts.fov_probs)
    c_in, half, mode = _choose_fov(pm, rng, opts, frame, mode)
    c_in = _apply(aff, np.rint(_apply(np.linalg.inv(aff), c_in[None]))[0:1])[0]  # on an input voxel
    g = _u(rng, *opts.scale_range)
    scales = g * rng.uniform(1 - opts.axis_scale_jitter, 1 + opts.axis_scale_jitter, 3)
    tilt = np.rad2deg(np.arcsin(min(1.0, 25.0 / max(half[2], 1.0))))
    R = frame @ _rotation(rng, opts.max_rotation_deg, tilt) @ frame.T
    M = R @ frame @ np.diag(scales) @ frame.T
    shift_out = rng.uniform(-opts.max_shift_mm, opts.max_shift_mm, 3)
    half = half / scales  # keep roughly the chosen anatomy in view
    amp = _u(rng, *opts.elastic_amplitude_mm)
    Lc = _u(rng, *opts.elastic_length_mm)
    # shrink the field of view until its preimage lies inside the label map
    inv_in = np.linalg.inv(aff)
    Pmat = inv_in[:3, :3] @ M @ frame
    zax_in, _ = _axis_along(aff, 2)
    pad_vox = np.full(3, opts.inplane_pad_mm) / sp_in  # in-plane the body may extend beyond the map
    pad_vox[zax_in] = 0.0
    lo_ok = -pad_vox
    hi_ok = np.array(lab_full.shape, float) - 1 + pad_vox
    marg_vox = (amp + 1.0) / sp_in
    for _ in range(200):
        ctr = inv_in[:3, :3] @ c_in + inv_in[:3, 3]
        ext = np.abs(Pmat) @ half
        lo_v, hi_v = ctr - ext - marg_vox, ctr + ext + marg_vox
        # first slide the field of view back into the map where the other side has room
        shift = np.zeros(3)
        for b in range(3):
            under, over = lo_ok[b] - lo_v[b], hi_v[b] - hi_ok[b]
            if under > 0 and over < 0:
                shift[b] = min(under, -over)
            elif over > 0 and under < 0:
                shift[b] = -min(over, -under)
        if np.any(shift != 0):
            c_in = c_in + aff[:3, :3] @ shift
            continue
        viol = np.maximum(lo_ok - lo_v, 0) + np.maximum(hi_v - hi_ok, 0)
        if not np.any(viol > 0):
            break
        for b in np.nonzero(viol > 0)[0]:
            a = int(np.argmax(np.abs(Pmat[b]) * half))
            half[a] *= 0.97
    half = np.maximum(half, 5.0)
    c_out = c_in + shift_out
    # output grid (frame coordinates relative to c_out)
    def grid_shape():  # odd sizes: the field-of-view centre is a voxel centre
        return np.maximum(2 * np.floor(half / out_sp).astype(int) + 1, 3)
    shape = grid_shape()
    if spacing_mm is None:
        while np.prod(shape.astype(float)) > opts.max_voxels:
            out_sp[:2] *= 1.1
            shape = grid_shape()
    e0 = -(shape - 1) * out_sp / 2
    # elastic field on a coarse grid in the output frame
    gs = np.full(3, max(Lc / 3.0, 8.0))
    m = np.ceil((2 * half + 4 * gs) / gs).astype(int) + 1
    f0 = -(m - 1) * gs / 2
    fld = rng.standard_normal((3, *m))
    for a in range(3):
        fld[a] = ndi.gaussian_filter(fld[a], Lc / 2.0 / gs, mode="nearest")
    mx = np.abs(fld).max()
    fld = fld / (mx if mx > 0 else 1.0) * amp
    grad = max(np.abs(np.gradient(fld[a], *gs)).max() for a in range(3)) if amp > 0 else 0.0
    if grad > 0.4:
        fld *= 0.4 / grad
    tr = SpatialTransform(c_in, c_out, M, frame, fld.astype(np.float32), f0, gs)

    # ---- crop of the input that the output needs (+ margin for the body outline)
    tp = _draw_tissue(rng, pm, opts)
    cr = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)]) * half
    pts_in = tr.output_to_input(c_out + cr @ frame.T)
    vox = _apply(inv_in, pts_in)
    mvox = (amp + tp["body_margin"] + 12.0) / sp_in + 2
    start = np.maximum(np.floor(vox.min(0) - mvox).astype(int), np.floor(lo_ok).astype(int))
    stop = np.minimum(np.ceil(vox.max(0) + mvox).astype(int) + 1, np.ceil(hi_ok).astype(int) + 1)
    lab = np.zeros(tuple(int(b - a) for a, b in zip(start, stop)), lab_full.dtype)
    src = tuple(slice(max(int(a), 0), min(int(b), n)) for a, b, n in zip(start, stop, lab_full.shape))
    dst = tuple(slice(s_.start - int(a), s_.stop - int(a)) for s_, a in zip(src, start))
    lab[dst] = lab_full[src]
    caff = aff.copy()
    caff[:3, 3] = _apply(aff, start[None].astype(float))[0]
    random_int = rng.random() < opts.p_random_intensity
    timing["prepare_geometry"] = time.perf_counter() - t0
    hu_in = _compose(lab, caff, start, pm, tp, rng, random_int)
    timing["tissue"] = time.perf_counter() - t0 - sum(timing.values())

    # ---- point spread function (in input voxels, z = input axis closest to the output slice axis)
    zax, _ = _axis_along(aff, 2)
    kernel = _pick(rng, opts.kernel_probs)
    lo_p, hi_p = opts.psf_inplane_mm
    k_lo, k_hi = {"soft": (0.55, 1.0), "standard": (0.3, 0.75), "sharp": (0.0, 0.4)}[kernel]
    psf_xy = lo_p + (hi_p - lo_p) * _u(rng, k_lo, k_hi)
    aa_xy = 0.3 * max(out_sp[0] - sp_in.min(), 0)
    sig_mm = np.full(3, np.hypot(psf_xy, aa_xy))
    sig_mm[zax] = max(T / 2.355, 0.2)
    # only the part that the output samples (+ the blur's reach) needs blurring
    reach = (amp + 2.0) / sp_in + 3.0 * sig_mm / sp_in + 2
    lo_s = np.maximum(np.floor(vox.min(0) - reach).astype(int) - start, 0)
    hi_s = np.minimum(np.ceil(vox.max(0) + reach).astype(int) + 1 - start, np.array(hu_in.shape))
    hu_in = hu_in[tuple(slice(int(a), int(b)) for a, b in zip(lo_s, hi_s))]
    start_hu = start + lo_s
    hu_in = ndi.gaussian_filter(hu_in, sig_mm / sp_in, truncate=3.0)

    # ---- sample on the acquisition grid (output in-plane, slices every acq_z mm)
    z_lo, z_hi = e0[2], e0[2] + (shape[2] - 1) * out_sp[2]
    nz_acq = int(np.ceil((z_hi - z_lo) / acq_z)) + 1
    acq_e0 = np.array([e0[0], e0[1], (z_lo + z_hi) / 2 - (nz_acq - 1) * acq_z / 2])
    acq_shape = (int(shape[0]), int(shape[1]), nz_acq)
    acq_sp = np.array([out_sp[0], out_sp[1], acq_z])
    img = _warp(hu_in, start_hu, tr, aff, acq_e0, acq_sp, acq_shape, 1, -1000.0, np.float32)
    del hu_in
    timing["blur_warp"] = time.perf_counter() - t0 - sum(timing.values())

    # ---- metal streaks, kernel, noise, calibration
    if tp["metal"]:
        _metal_streaks(img, 1900.0, acq_sp, rng)
    if kernel == "sharp":  # edge enhancement (overshoot) of sharp / bone / lung kernels
        sig_px = (1.0 / acq_sp[0], 1.0 / acq_sp[1], 0.0)
        img += np.float32(_u(rng, 0.4, 1.2)) * (img - ndi.gaussian_filter(img, sig_px, truncate=3.0))
    lo_n, hi_n = opts.noise_std
    nstd = float(np.exp(rng.uniform(np.log(lo_n), np.log(hi_n))))
    c_lo, c_hi = {"soft": (0.9, 1.4), "standard": (0.6, 1.0), "sharp": (0.3, 0.6)}[kernel]
    nsig = (_u(rng, c_lo, c_hi), _u(rng, c_lo, c_hi), _u(rng, 0.0, 0.5))
    noise = _smooth_noise(rng, img.shape, nsig)
    area = (img > -500).sum(axis=(0, 1)).astype(float)
    fac = np.clip(np.sqrt(area / max(np.median(area[area > 0]) if np.any(area > 0) else 1, 1)), 0.7, 1.6)
    img += noise * (nstd * fac)[None, None, :].astype(np.float32)
    del noise
    offset = _u(rng, -opts.calibration_offset, opts.calibration_offset) if rng.random() < opts.p_calibration else 0.0
    img += np.float32(offset)

    # ---- resample slices to the output spacing (linear along z)
    if nz_acq != shape[2] or not np.isclose(acq_z, out_sp[2]):
        zo = (e0[2] + out_sp[2] * np.arange(shape[2]) - acq_e0[2]) / acq_z
        W = _interp_matrix(zo, nz_acq).astype(np.float32)
        img = np.einsum("ijk,zk->ijz", img, W, optimize=True)
    if rng.random() < opts.p_fov_circle:  # outside the reconstruction circle
        rad = min(shape[0] * out_sp[0], shape[1] * out_sp[1]) / 2 * _u(rng, 1.0, 1.2)
        xx = (np.arange(shape[0]) - (shape[0] - 1) / 2) * out_sp[0]
        yy = (np.arange(shape[1]) - (shape[1] - 1) / 2) * out_sp[1]
        img[(xx[:, None] ** 2 + yy[None, :] ** 2) > rad ** 2] = -1024.0
    hu = np.clip(img, -1024, 3071).astype(np.float32)

    timing["acquisition"] = time.perf_counter() - t0 - sum(timing.values())
    # ---- labels on the output grid
    lab_out = _warp(lab, start, tr, aff, e0, out_sp, tuple(int(s) for s in shape), 0, 0, lab_full.dtype)
    timing["labels"] = time.perf_counter() - t0 - sum(timing.values())
    aff_out = np.eye(4)
    aff_out[:3, :3] = frame @ np.diag(out_sp)
    aff_out[:3, 3] = c_out + frame @ e0
    if not return_info:
        return hu, aff_out, lab_out
    info = dict(transform=tr, fov=mode, phase=tp["phase"], age=tp["age"], trabecular_hu=tp["trabecular"],
                cortex_hu=tp["cortex"], disc_hu=tp["disc"], body_margin_mm=tp["body_margin"],
                slice_thickness_mm=T, acquisition_z_mm=acq_z, spacing_mm=tuple(out_sp), psf_inplane_mm=psf_xy,
                kernel=kernel,
                noise_std=nstd, calibration_offset=offset, metal=tp["metal"], table=tp["table"],
                oral_contrast=tp["oral_contrast"], random_intensity=random_int, elastic_amplitude_mm=amp,
                elastic_length_mm=Lc, scales=scales, rotation=R,
                timing={k: round(v, 3) for k, v in timing.items()})
    return hu, aff_out, lab_out, info


# ----------------------------------------------------------------------------- label maps on disk


@dataclass
class LabelMap:
    """A label map read from disk, prepared once for many renders."""

    name: str
    prepared: PreparedMap

    def render(self, rng: np.random.Generator, **options):
        """`render_ct` of this map: (hu, affine, labels, info)."""
        pm = self.prepared
        return render_ct(pm.labels, pm.affine, pm.names, rng, prepared=pm, return_info=True, **options)


def read_labelmap(path) -> LabelMap:
    """A NIfTI label map with its names (`<stem>_labels.json` beside it: {"labels": {name: id}})."""
    path = Path(path)
    stem = path.name.split(".")[0]
    names_path = path.with_name(f"{stem}_labels.json")
    if not names_path.is_file():
        raise VertebraIDError(f"The label map '{path.name}' has no names file '{names_path.name}' beside it.")
    try:
        table = json.loads(names_path.read_text())["labels"]
        names = {int(i): str(n) for n, i in table.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise VertebraIDError(f"'{names_path}' is not a table of label names ({{\"labels\": {{name: id}}}}).") from None
    volume = read_nifti(path, dtype=np.float32)
    labels = np.rint(volume.array).astype(np.int32)
    return LabelMap(stem, prepare_labelmap(labels, volume.affine, names))
