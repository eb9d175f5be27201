"""Bone-only CTs: a skeleton whose every other voxel holds one value (bone exports, skeletons cut
out of a CT). The heatmap network needs soft tissue around the bones; the bone alone still shows
where the vertebrae are and, through the ribs and the sacrum, which they are.

    if is_bone_only(ct):
        result = locate_in_skeleton(ct, settings)     # pipeline.Result, every label flagged

1. The spinal canal: in every slice across the body axis, the small round holes that bone
   encloses (vertebral foramina, but also sacral and pelvic foramina, femoral canals); those near
   the midline that line up along the body axis, fitted robustly, start the landmarks' own
   canal tracking (`landmarks.canal_frame`).
2. The bodies: along the canal, the share of bone in the cross-section in front of it. In a
   skeleton a disc is empty, so it is a narrow dip between two endplates; a body centre is the
   midpoint of two consecutive discs (and one body length past the first and last disc where
   bone goes on).
3. Their names: the ribs and the sacrum read at each body (`landmarks.spine_landmarks`) give it a
   region (rib-bearing: T; sacrum: S; neither: C above the ribs, L below), and `points.label_points`
   chains them under the engine's order and spacing priors.

The path is validated on two real skeletons only, so every label is flagged for checking (its
confidence is capped below 0.5).
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from ..errors import VertebraIDError
from . import landmarks
from .centerline import polyline_centerline
from .corrections import Constraint
from .points import label_points
from .settings import EngineSettings
from .volume import Volume

#: HU above which a voxel is bone; a skeleton keeps (nearly) only such voxels besides its background.
BONE_HU = 100.0
#: A skeleton: this share of the voxels holds the background value, the rest is bone and fills little.
MIN_BACKGROUND_SHARE = 0.5
MAX_BONE_SHARE = 0.15
#: Why every label of a skeleton is flagged (its confidence capped, `Vertebra.flagged`).
SKELETON_REASON = "read from a bone-only CT"

#: Holes that can be a spinal canal: area (mm^2), width and height (mm), and how full their box is.
CANAL_AREA_MM2 = (60.0, 600.0)
CANAL_SIZE_MM = (8.0, 32.0)
CANAL_FILL = 0.45
MIDLINE_MM = 25.0
MAX_CANDIDATES = 3000
#: The cross-section in front of the canal where the bodies lie (mm anterior, mm to each side).
BODY_U_MM = (5.0, 50.0)
BODY_V_MM = 22.0
BODY_LENGTH_MM = (12.0, 55.0)  # consecutive discs this far apart enclose one body


def _sample(array: np.ndarray, size: int = 64) -> np.ndarray:
    return array[tuple(slice(None, None, max(1, n // size)) for n in array.shape)]


def is_bone_only(ct: Volume) -> bool:
    """Whether `ct` is a skeleton: one background value in most voxels, and the rest bone that fills little.

    A CT has air, fat and soft tissue; an MRI's non-background values spread far below bone's; a raw
    (unscaled) CT fills the body with values above BONE_HU, far more than bone fills.
    """
    if ct.array.ndim != 3:
        return False
    sample = np.asarray(_sample(ct.array), dtype=np.float32)
    values, counts = np.unique(sample, return_counts=True)
    background = values[np.argmax(counts)]
    if counts.max() < MIN_BACKGROUND_SHARE * sample.size:
        return False
    rest = sample[sample != background]
    if rest.size < 100 or rest.size > MAX_BONE_SHARE * sample.size:
        return False
    return bool(np.mean(rest >= BONE_HU) > 0.97 and background < BONE_HU)


def canal_candidates(ct: Volume) -> np.ndarray:
    """(N, 3) RAS centres of the small round holes that bone encloses, slice by slice across the body axis."""
    array = np.asarray(ct.array)
    linear = ct.affine[:3, :3]
    axis = int(np.argmax(np.abs(linear[2])))  # the voxel axis closest to superior
    others = [a for a in range(3) if a != axis]
    pixel = np.linalg.norm(linear[:, others], axis=0)
    out = []
    for k in range(array.shape[axis]):
        bone = np.take(array, k, axis=axis) > BONE_HU
        if bone.sum() < 50:
            continue
        holes = ndimage.binary_fill_holes(bone) & ~bone
        labels, n = ndimage.label(holes)
        if n == 0:
            continue
        index = np.arange(1, n + 1)
        areas = ndimage.sum(holes, labels, index) * pixel[0] * pixel[1]
        centres = ndimage.center_of_mass(holes, labels, index)
        for area, centre, box in zip(areas, centres, ndimage.find_objects(labels)):
            width = (box[0].stop - box[0].start) * pixel[0]
            height = (box[1].stop - box[1].start) * pixel[1]
            if not (CANAL_AREA_MM2[0] <= area <= CANAL_AREA_MM2[1]):
                continue
            if not (CANAL_SIZE_MM[0] <= width <= CANAL_SIZE_MM[1] and CANAL_SIZE_MM[0] <= height <= CANAL_SIZE_MM[1]):
                continue
            if area / (width * height) < CANAL_FILL:
                continue
            ijk = np.empty(3)
            ijk[axis], ijk[others[0]], ijk[others[1]] = k, centre[0], centre[1]
            out.append(ct.voxel_to_world(ijk[None])[0])
    return np.array(out, float).reshape(-1, 3)


def canal_curve(candidates: np.ndarray, midline_x: float, step_mm: float = 2.0) -> np.ndarray | None:
    """A smooth curve (cranial -> caudal) through the candidates that line up as a tube near the midline."""
    points = candidates[np.abs(candidates[:, 0] - midline_x) < MIDLINE_MM]
    if len(points) < 6:
        return None
    if len(points) > MAX_CANDIDATES:  # the support below compares every pair: keep it bounded
        points = points[np.linspace(0, len(points) - 1, MAX_CANDIDATES).astype(int)]
    # support: candidates within a cone of each other along the body axis (a tube, not scattered holes)
    dz = np.abs(points[:, None, 2] - points[None, :, 2])
    dxy = np.hypot(points[:, None, 0] - points[None, :, 0], points[:, None, 1] - points[None, :, 1])
    support = ((dz < 60.0) & (dxy < 0.3 * dz + 8.0)).sum(1) - 1
    keep = support >= 0.5 * support.max()
    z = points[:, 2]
    scale = max(float(np.ptp(z)), 1.0)
    for _ in range(6):  # robust polynomial fit: drop candidates far from the fit, refit
        if keep.sum() < 6:
            return None
        zc = (z - z[keep].mean()) / scale
        degree = int(min(4, keep.sum() - 2))
        fit_x, fit_y = (np.polyfit(zc[keep], points[keep, d], degree) for d in (0, 1))
        residual = np.hypot(points[:, 0] - np.polyval(fit_x, zc), points[:, 1] - np.polyval(fit_y, zc))
        keep = residual < max(12.0, 3.0 * float(np.median(residual[keep])))
    top, bottom = float(z[keep].max()), float(z[keep].min())
    if top - bottom < 40.0:
        return None
    zs = np.arange(top, bottom - 1e-6, -step_mm)
    zc = (zs - z[keep].mean()) / scale
    return np.stack([np.polyval(fit_x, zc), np.polyval(fit_y, zc), zs], axis=1)


def body_centres(ct: Volume, frame: landmarks.Frame) -> np.ndarray:
    """(N, 3) RAS centres of the vertebral bodies in front of the canal `frame`, from the empty discs between them."""
    straight = landmarks.straighten(ct, frame, BODY_U_MM, BODY_V_MM, 1.0, cval=0.0)
    bone = straight.array > BONE_HU  # (u, v, samples)
    share = ndimage.gaussian_filter1d(bone.mean(axis=(0, 1)), 0.7)
    reach = max(int(round(8.0 / frame.step)), 2)
    padded = np.pad(share, reach, mode="edge")
    before = np.array([padded[i:i + reach].max() for i in range(len(share))])
    after = np.array([padded[i + reach + 1:i + 2 * reach + 1].max() for i in range(len(share))])
    walls = np.minimum(before, after)
    dip = np.where(share <= 0.6 * walls, walls - share, 0.0)
    # imported here: scipy.signal takes ~0.6 s to import, and most CTs are no skeleton
    from scipy.signal import find_peaks

    discs, _ = find_peaks(dip, height=0.1, distance=max(int(round(10.0 / frame.step)), 1))
    samples = []
    lo, hi = (length / frame.step for length in BODY_LENGTH_MM)
    for a, b in zip(discs[:-1], discs[1:]):
        if lo <= b - a <= hi:
            samples.append(0.5 * (a + b))
    if len(samples) >= 2:  # one body past each end disc where bone goes on that far
        half = 0.5 * float(np.median(np.diff(discs)))
        for disc, sign in ((discs[0], -1), (discs[-1], 1)):
            centre = disc + sign * half
            span = share[int(min(disc, centre)):int(max(disc, centre)) + 1]
            if 0 <= centre < len(share) and span.size and np.mean(span > 0.3 * share.max()) > 0.6:
                samples.append(centre)
    samples = np.sort(np.array(samples, float))
    if samples.size == 0:
        return np.zeros((0, 3))
    # each body's own depth: the bone-weighted mean distance in front of the canal at its centre
    u = straight.u_mm()
    k = np.clip(np.round(samples).astype(int), 0, len(share) - 1)
    weight = bone[:, :, k].sum(axis=1)  # (u, bodies)
    depth = (u[:, None] * weight).sum(0) / np.maximum(weight.sum(0), 1)
    return frame.points[k] + depth[:, None] * frame.u[k]


def region_probabilities(marks: landmarks.Landmarks, samples: np.ndarray) -> list[dict]:
    """Per body: its region from the ribs and the sacrum read there (C above the ribs, L below them)."""
    k = np.clip(np.round(samples).astype(int), 0, len(marks) - 1)
    rib, sacrum = marks.rib[k], marks.sacrum[k]
    rib_bearing = np.flatnonzero(rib > 0.5)
    out = []
    for i in range(len(k)):
        above_ribs = rib_bearing.size > 0 and i < rib_bearing[0]
        other = (1.0 - rib[i]) * (1.0 - sacrum[i])
        out.append({"T": float(rib[i]), "S": float(sacrum[i]),
                    "C": float(other if above_ribs else 0.02), "L": float(0.02 if above_ribs else other)})
    return out


def locate_in_skeleton(ct: Volume, settings: EngineSettings = EngineSettings(),
                       constraints: list[Constraint] | None = None):
    """A bone-only CT -> labelled vertebrae (pipeline.Result), every label flagged; one clear sentence if it cannot."""
    mask = np.asarray(ct.array) > BONE_HU
    ijk = np.argwhere(mask[tuple(slice(None, None, 2) for _ in range(3))]) * 2
    if len(ijk) < 100:
        raise VertebraIDError("This bone-only CT holds too little bone to find a spine in.")
    midline_x = float(np.median(ct.voxel_to_world(ijk)[:, 0]))
    curve = canal_curve(canal_candidates(ct), midline_x)
    if curve is None:
        raise VertebraIDError("This bone-only CT (no soft tissue) shows no spinal canal that could be traced; "
                              "VertebraID needs a CT with soft tissue, or a skeleton with its vertebral arches.")
    frame, _, _, _ = landmarks.canal_frame(ct, landmarks.smooth_frame(curve, 2.0, 20.0, 25.0), 2.0)
    centres = body_centres(ct, frame)
    if len(centres) < 2:
        raise VertebraIDError("This bone-only CT (no soft tissue) shows too few vertebral bodies to name.")
    line = polyline_centerline(centres, 2.0)
    marks = landmarks.spine_landmarks(ct, line)
    probabilities = region_probabilities(marks, line.project(centres))
    labelling = label_points(centres, probabilities, settings, constraints, include_inferred=False)
    flagged = [v if v.locked else v.flagged(SKELETON_REASON) for v in labelling.vertebrae]
    result = labelling.result
    result.vertebrae = flagged
    return result
