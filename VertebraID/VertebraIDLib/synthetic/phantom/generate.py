"""One phantom: draw a patient and a scan from the seed, build the anatomy, render, and return
the CT with its label mask and ground truth (the rendered body centres; C2's with its dens)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from ...engine.anatomy import LABEL_IDS
from ...engine.vertebrae import Vertebra
from ...engine.volume import Volume
from ...errors import VertebraIDError
from ...io.images import reorient_arrays
from . import conditions as cond
from . import skeleton as sk
from . import soft_tissue as soft
from .morphometry import FEMALE_SCALE, LevelDims, level_dims
from .options import MAX_VOXELS, PATHOLOGIES, PhantomOptions, level_chain
from .render import F32, Grid, composite
from .spine_shape import Curvature, ScoliosisCurve, Segment, SpineShape, build_spine

GENERATOR_VERSION = 1
HU_MIN = -1024


@dataclass
class Phantom:
    """A synthetic CT: HU image, VerSe label mask, ground truth (RAS mm) and what was drawn."""

    ct: Volume
    mask: Volume
    truth: list[Vertebra]
    meta: dict
    body_mask: Volume | None = None  # vertebral bodies only, project label ids (with_body_mask)


@dataclass
class _Patient:
    sex: str
    age: float
    size: float
    transitional: str
    pathologies: tuple
    curvature: Curvature
    scoliosis: list = field(default_factory=list)
    fractures: dict = field(default_factory=dict)
    density: sk.BoneDensity = field(default_factory=sk.BoneDensity)
    habitus: soft.Habitus = field(default_factory=soft.Habitus)
    screw_levels: list = field(default_factory=list)
    prosthesis_sides: tuple = ()
    pelvic_tilt: float = 0.0


# --------------------------------------------------------------------------- drawing the patient


_RANDOM_PATHOLOGY_PROB = {
    "fracture": 0.18, "screws": 0.08, "hip_prosthesis": 0.07, "scoliosis": 0.12, "osteoporosis": 0.15,
    "degeneration": 0.3, "low_dose": 0.2, "blur": 0.1, "contrast": 0.4,
}


def _draw_patient(opts: PhantomOptions, rng) -> _Patient:
    sex = opts.sex or ("female" if rng.random() < 0.5 else "male")
    age = opts.age if opts.age is not None else float(np.clip(rng.normal(58, 17), 18, 95))  # clinical CT population
    size = opts.size if opts.size is not None else float(np.clip(rng.normal(1.0, 0.05), 0.85, 1.15))
    levels = opts.levels or ()
    transitional = opts.transitional
    if "T13" in levels:
        transitional = "13_ribs"
    elif "L6" in levels:
        transitional = "L6"
    if transitional is None:
        u = rng.random()
        transitional = "11_ribs" if u < 0.03 else "13_ribs" if u < 0.05 else "L6" if u < 0.08 else \
            "sacralized_L5" if u < 0.12 else "none"
    if opts.pathologies is None:
        old = np.clip((age - 40) / 40, 0, 1)
        probs = dict(_RANDOM_PATHOLOGY_PROB)
        probs["fracture"] *= 0.5 + old
        probs["osteoporosis"] *= 0.3 + 1.5 * old
        probs["degeneration"] = 0.1 + 0.7 * old
        pathologies = tuple(p for p in PATHOLOGIES if rng.random() < probs[p])
    else:
        pathologies = tuple(opts.pathologies)
    if opts.fractures:
        pathologies = tuple(dict.fromkeys(pathologies + ("fracture",)))
    if opts.scoliosis_deg:
        pathologies = tuple(dict.fromkeys(pathologies + ("scoliosis",)))
    kyph_age = 8.0 * np.clip((age - 55) / 30, 0, 1)
    curvature = Curvature(
        lumbar_lordosis=float(np.clip(rng.normal(48, 10), 20, 75)),
        thoracic_kyphosis=float(np.clip(rng.normal(36 + kyph_age, 9), 12, 75)),
        upper_thoracic_kyphosis=float(np.clip(rng.normal(8, 3), 0, 18)),
        cervical_lordosis=float(np.clip(rng.normal(18, 10), -10, 45)),
        sacral_kyphosis=float(np.clip(rng.normal(30, 8), 10, 50)),
        sagittal_tilt=float(rng.normal(0, 3)),
    )
    scoliosis = []
    if "scoliosis" in pathologies:
        cobb = opts.scoliosis_deg if opts.scoliosis_deg else float(rng.uniform(15, 55) * rng.choice([-1, 1], p=[0.3, 0.7]))
        kind = rng.choice(["thoracic", "thoracolumbar", "lumbar", "double"])
        ends = {"thoracic": ("T4", "T12"), "thoracolumbar": ("T8", "L3"), "lumbar": ("T12", "L4"), "double": ("T4", "T11")}
        upper, lower = ends[kind]
        scoliosis.append(ScoliosisCurve(cobb, upper, lower))
        if kind == "double":
            scoliosis.append(ScoliosisCurve(-cobb * rng.uniform(0.6, 0.9), "T11", "L4"))
        elif kind == "thoracic" and rng.random() < 0.5:
            scoliosis.append(ScoliosisCurve(-cobb * rng.uniform(0.3, 0.5), "T12", "L4"))
    density = sk.BoneDensity()
    young = np.clip((age - 25) / 60, 0, 1)
    density.cancellous = float(rng.normal(250 - 160 * young, 20))  # QCT: ~230 HU at 25 y, ~120 at 70 y
    if "osteoporosis" in pathologies:
        density.cancellous = float(rng.uniform(40, 110))
    density.cancellous = float(np.clip(density.cancellous, 30, 350))
    density.cortex = float(rng.normal(1250 - 200 * young, 80))
    density.rib_core = density.cancellous * 0.8
    habitus = soft.Habitus(
        sex=sex, size=size * (0.94 if sex == "female" else 1.0),
        fat_mm=float(np.clip(rng.gamma(4.0, 5.0) + (6 if sex == "female" else 0), 4, 60)),
        visceral=float(rng.uniform(0.2, 0.9)),
        muscle=float(np.clip(rng.normal(1.0 - 0.25 * young, 0.1), 0.6, 1.3)),
        contrast="contrast" in pathologies,
        muscle_hu=float(rng.normal(50 - 12 * young, 5)),
    )
    patient = _Patient(sex, age, size, transitional, pathologies, curvature, scoliosis, {}, density, habitus)
    patient.pelvic_tilt = float(rng.normal(0, 4))
    return patient


def _segments(patient: _Patient, opts: PhantomOptions, rng) -> list[Segment]:
    chain = level_chain("13_ribs" if patient.transitional == "13_ribs" else "L6" if patient.transitional == "L6" else "none")
    names = chain + ["S3", "S4", "S5"]
    female = patient.sex == "female"
    lat = patient.size * (FEMALE_SCALE[0] if female else 1.0)
    vert = patient.size * (FEMALE_SCALE[1] if female else 1.0)
    degenerate = "degeneration" in patient.pathologies
    segs = []
    for name in names:
        jitter = rng.normal(1.0, 0.025, size=2)
        dims = level_dims(name).scaled(lat * jitter[0], vert * jitter[1])
        if degenerate and name[0] in "CL":
            from dataclasses import replace

            dims = replace(dims, disc_below=dims.disc_below * rng.uniform(0.5, 0.85))
        if name == "L5" and patient.transitional == "sacralized_L5":
            from dataclasses import replace

            dims = replace(dims, disc_below=dims.disc_below * 0.45)
        segs.append(Segment(name, dims))
    for k in range(3):
        segs.append(Segment(f"Co{k + 1}", LevelDims(14 - 3 * k, 10 - 2 * k, 10 - 2 * k, 10 - 2 * k, 0, 0, 0, 0, 0, 0, 0)
                            .scaled(lat, vert)))
    if "fracture" in patient.pathologies:
        count = opts.fractures if opts.fractures is not None else int(rng.integers(1, 4))
        for name in cond.choose_fracture_levels([s.name for s in segs], count, rng):
            kind = str(rng.choice(cond.FRACTURE_TYPES, p=[0.55, 0.25, 0.2]))
            grade = opts.fracture_grade or str(rng.choice(list(cond.FRACTURE_GRADES), p=[0.35, 0.4, 0.25]))
            patient.fractures[name] = cond.fracture(kind, grade)
        for s in segs:
            s.fracture = patient.fractures.get(s.name)
    return segs


# --------------------------------------------------------------------------- scan geometry


def _choose_levels(opts: PhantomOptions, chain: list[str], rng) -> tuple[str, str]:
    if opts.levels is not None:
        return opts.levels
    u = rng.random()
    pick = lambda lo, hi: chain[int(rng.integers(chain.index(lo), chain.index(hi) + 1))]  # noqa: E731
    last_l = "L6" if "L6" in chain else "L5"
    if u < 0.25:
        return pick("T9", "L1"), pick(last_l, "S2")  # lumbar / abdomen-pelvis
    if u < 0.5:
        return pick("C6", "T2"), pick("T10", "L1")  # chest
    if u < 0.6:
        return pick("C1", "C2"), pick("C6", "T2")  # neck
    if u < 0.78:
        return pick("T3", "T8"), pick("L2", last_l)  # thoracolumbar
    if u < 0.92:
        return pick("C3", "T2"), pick("L4", "S2")  # long
    return "C1", "S2"  # whole spine


def _draw_spacing(opts: PhantomOptions, rng) -> np.ndarray:
    if opts.spacing is not None:
        return np.array(opts.spacing, float)
    u = rng.random()
    inplane = rng.uniform(0.6, 1.0) if u < 0.45 else rng.uniform(1.0, 1.6) if u < 0.85 else rng.uniform(1.6, 3.0)
    v = rng.random()
    thick = rng.choice([1.0, 1.25, 1.5]) if v < 0.45 else rng.uniform(2.0, 3.0) if v < 0.85 else rng.choice([4.0, 5.0])
    return np.array([inplane, inplane, float(thick)])


_COMMON_ORIENTATIONS = ["LPS", "RAS", "LAS", "RPS", "LPI", "PIR", "ASL", "RSA", "LIP"]


def _draw_orientation(opts: PhantomOptions, rng) -> str:
    if opts.orientation.lower() != "random":
        return opts.orientation
    u = rng.random()
    if u < 0.4:
        return "LPS"
    if u < 0.6:
        return "RAS"
    if u < 0.75:
        return "LAS"
    return str(rng.choice(_COMMON_ORIENTATIONS))


def _transform_spine(spine: SpineShape, rotation: np.ndarray) -> SpineShape:
    segs = []
    for s in spine.segments:
        t = Segment(s.name, s.dims, rotation @ s.centre, rotation @ s.frame, s.arc, s.fracture, s.axial_rotation)
        segs.append(t)
    return SpineShape(segs, spine.curve_arc, spine.curve_points @ rotation.T)


# --------------------------------------------------------------------------- main


@dataclass
class _Streams:
    """Independent random streams: appending one leaves the others (every earlier phantom's draws) unchanged."""

    patient: np.random.Generator
    anatomy: np.random.Generator
    scan: np.random.Generator
    tissue: np.random.Generator
    noise: np.random.Generator
    metal: np.random.Generator
    contrast: np.random.Generator

    @classmethod
    def from_seed(cls, seed: int) -> "_Streams":
        return cls(*[np.random.default_rng(s) for s in np.random.SeedSequence(int(seed)).spawn(7)])


@dataclass
class _Anatomy:
    """The patient's solids in the patient frame."""

    labelled: list  # vertebrae and sacrum (drawn into the label mask)
    bones: list
    discs: list
    canal: list
    organs: list
    metal: list
    cage: object  # sk.RibCage or None
    pelvis: object
    rib_pairs: int


@dataclass
class _Scan:
    """Where the scanner looked: the grid (and its finer sub-slice grid), the levels and the reconstruction."""

    rotation: np.ndarray  # patient -> grid frame (a small tilt)
    spine: SpineShape  # in the grid frame
    top: str
    bottom: str
    cut: bool
    spacing: np.ndarray
    grid: Grid
    fine: Grid  # thick slices are rendered as `sub` thin sub-slices each
    sub: int
    centre_xy: tuple
    fov_xy: tuple
    targeted: bool  # a reconstruction narrower than the body, centred on the spine


def generate_phantom(seed: int, options: PhantomOptions | None = None, **kwargs) -> Phantom:
    """A synthetic spine CT, reproducible from `seed`; keyword options as in `PhantomOptions`.

    Raises VertebraIDError (one sentence) for any invalid option.
    """
    opts = _checked_options(seed, options, kwargs)
    timings = {}
    t0 = time.perf_counter()
    rng = _Streams.from_seed(seed)
    patient = _draw_patient(opts, rng.patient)
    if patient.habitus.contrast:
        patient.habitus.contrast_scale = float(rng.contrast.uniform(0.6, 2.0))
    spine = build_spine(_segments(patient, opts, rng.anatomy), patient.curvature, patient.scoliosis)
    c1 = spine.segment("C1")
    c1.centre = c1.centre - c1.y * 5.0 * patient.size  # the ring sits behind the dens
    chain = [s.name for s in spine.segments if s.name in LABEL_IDS]
    anatomy = _build_anatomy(spine, chain, patient, rng)
    timings["anatomy"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    scan = _scan_geometry(opts, patient, spine, chain, rng.scan)
    timings["geometry"] = time.perf_counter() - t1

    ct, mask, body_mask, model_width = _render(scan, anatomy, patient, opts.with_body_mask, rng, timings)

    t4 = time.perf_counter()
    ct_i16, formation = _form_image(ct, scan, anatomy, patient, opts, model_width, rng)
    del ct
    timings["image"] = time.perf_counter() - t4

    arrays, affine, to_world, orientation = _output_geometry(scan, opts, ct_i16, mask, body_mask, rng.scan)
    ct_vol = Volume(arrays["ct"], affine)
    truth, partial = _ground_truth(scan, ct_vol, to_world)
    timings["total"] = time.perf_counter() - t0
    meta = {
        "generator": "VertebraIDLib.phantom",
        "version": GENERATOR_VERSION,
        "seed": int(seed),
        "options": opts.to_dict(),
        "patient": _patient_summary(patient, spine, anatomy),
        "pathologies": list(patient.pathologies),
        "implants": {"pedicle_screws": patient.screw_levels, "hip_prosthesis": list(patient.prosthesis_sides)},
        "scan": {
            "levels_requested": [scan.top, scan.bottom], "cut_mid_vertebra": scan.cut,
            "spacing_mm": [round(float(v), 4) for v in scan.spacing], "shape": list(arrays["ct"].shape),
            "orientation": orientation, "oblique_deg": opts.oblique_deg, **formation,
            "targeted_reconstruction": bool(scan.targeted), "hu_range": [HU_MIN, opts.hu_max],
        },
        "levels_in_image": [v.label for v in truth],
        "levels_partly_in_image": partial,
        "mask_ids": "VerSe (1-7 C1-C7, 8-19 T1-T12, 28 T13, 20-25 L1-L6, 26 sacrum)",
        "body_mask_ids": "project LABEL_IDS (1-26 C1..S2, 27 L6, 28 T13)" if body_mask is not None else None,
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
    }
    body = Volume(arrays["body"], affine) if body_mask is not None else None
    return Phantom(ct_vol, Volume(arrays["mask"], affine), truth, meta, body)


def _checked_options(seed, options: PhantomOptions | None, kwargs: dict) -> PhantomOptions:
    if options is not None and kwargs:
        raise VertebraIDError("Give phantom options either as a PhantomOptions or as keywords, not both.")
    if options is None:
        known = set(PhantomOptions.__dataclass_fields__)
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise VertebraIDError(f"Unknown phantom option '{unknown[0]}'; known options: {', '.join(sorted(known))}.")
        options = PhantomOptions(**kwargs)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise VertebraIDError(f"The seed must be a non-negative whole number, got {seed!r}.")
    return options.validated()


def _build_anatomy(spine: SpineShape, chain: list[str], patient: _Patient, rng: _Streams) -> _Anatomy:
    """Vertebrae, discs, canal, ribs, sternum, scapulae, pelvis, skull, implants and organs as solids."""
    sk_opts = {"rib_pairs": 11 if patient.transitional == "11_ribs" else 12,
               "sacralized": "L5" if patient.transitional == "sacralized_L5" else None}
    dens = patient.density
    bones, labelled = [], []
    for seg in spine.segments:
        if seg.name == "C1":
            labelled.append(sk.atlas_solid(seg, dens))
        elif seg.name[0] in "CTL" and not seg.name.startswith("Co"):
            labelled.append(sk.vertebra_solid(seg, dens, sk_opts))
    sacral = [s for s in spine.segments if s.name.startswith("S")]
    labelled.append(sk.sacrum_solid(sacral, dens))
    bones.append(sk.coccyx_solid([s for s in spine.segments if s.name.startswith("Co")], dens))
    discs = sk.disc_solids(spine, dens, degeneration=1.0 if "degeneration" in patient.pathologies else 0.0,
                           rng=rng.anatomy)
    canal = sk.canal_solids(spine)
    ribs, cage = sk.rib_solids(spine, dens, patient.habitus.size, sk_opts)
    bones += ribs
    if cage is not None:
        bones += sk.sternum_solids(spine, cage, dens, patient.habitus.size)
        bones += sk.scapula_solids(spine, cage, dens, patient.habitus.size)
    pelvis = sk.pelvis_geometry(spine, patient.habitus.size, patient.sex, patient.pelvic_tilt)
    metal = []
    if "hip_prosthesis" in patient.pathologies:
        u = rng.metal.random()
        patient.prosthesis_sides = ("R",) if u < 0.4 else ("L",) if u < 0.8 else ("R", "L")
        for k, side in enumerate(("R", "L")):
            if side in patient.prosthesis_sides:
                hip, neck_end, shaft_low = sk.femur_axis(pelvis, k, patient.habitus.size)
                metal += cond.hip_prosthesis(hip, neck_end, shaft_low, pelvis.head_radius, rng.metal)
    bones += sk.pelvis_solids(pelvis, dens, patient.habitus.size, patient.sex, patient.prosthesis_sides)
    bones += sk.skull_solids(spine, dens, patient.habitus.size)
    if "screws" in patient.pathologies:
        lumbar = [n for n in chain if n[0] in "TL" and n not in ("T1", "T2", "T3", "T4", "T5", "T6")] + ["S1"]
        count = int(rng.metal.integers(2, 6))
        start = int(rng.metal.integers(max(0, len(lumbar) - 8), len(lumbar) - count + 1))
        patient.screw_levels = lumbar[start:start + count]
        metal += cond.pedicle_screws(spine, patient.screw_levels, rng.metal)
    organs = soft.organ_solids(spine, cage, pelvis.hip_centres, patient.habitus, rng.tissue)
    return _Anatomy(labelled, bones, discs, canal, organs, metal, cage, pelvis, sk_opts["rib_pairs"])


def _field_of_view_along_spine(opts: PhantomOptions, patient: _Patient, spine_g: SpineShape, top: str, bottom: str,
                               cut: bool, rng: np.random.Generator) -> tuple[float, float]:
    """(lowest, highest) height of the scan: ends inside the end vertebrae (cut) or just past them."""
    axis = np.array([0.0, 0.0, 1.0])
    seg_top, seg_bottom = spine_g.segment(top), spine_g.segment(bottom)
    if cut:
        z_hi = seg_top.centre[2] + (rng.uniform(-0.45, 0.45) * seg_top.dims.height)
        z_lo = seg_bottom.centre[2] + (rng.uniform(-0.45, 0.45) * seg_bottom.dims.height)
    else:
        # the end vertebrae whole, the neighbours' centres outside
        z_hi = cond.body_extent_along(seg_top, axis)[1] + rng.uniform(2, 20)
        z_lo = cond.body_extent_along(seg_bottom, axis)[0] - rng.uniform(2, 20)
        names_g = [s.name for s in spine_g.segments]
        above = spine_g.segments[names_g.index(top) - 1] if names_g.index(top) > 0 else None
        below = spine_g.segments[names_g.index(bottom) + 1]
        if above is not None:
            z_hi = min(z_hi, max(above.centre[2] - 0.3 * above.dims.height, cond.body_extent_along(seg_top, axis)[1]))
        z_lo = max(z_lo, min(below.centre[2] + 0.3 * below.dims.height, cond.body_extent_along(seg_bottom, axis)[0]))
        if bottom == "S2":  # pelvic scans often reach the hips and below
            z_lo -= rng.uniform(0, 130) * patient.size
        if top == "C1":  # and neck scans the skull base
            z_hi += rng.uniform(0, 60) * patient.size
    return min(z_lo, z_hi), max(z_lo, z_hi)


def _scan_geometry(opts: PhantomOptions, patient: _Patient, spine: SpineShape, chain: list[str],
                   rng: np.random.Generator) -> _Scan:
    """The grid frame (patient rotated by a small tilt), levels, slices, matrix and reconstruction centre."""
    tilt = opts.tilt_deg if opts.tilt_deg is not None else 3.0
    rot = cond.random_rotation(tilt, rng)
    spine_g = _transform_spine(spine, rot)
    top, bottom = _choose_levels(opts, chain, rng)
    cut = opts.cut if opts.cut is not None else bool(rng.random() < 0.4)
    spacing = _draw_spacing(opts, rng)
    z_lo, z_hi = _field_of_view_along_spine(opts, patient, spine_g, top, bottom, cut, rng)
    if opts.shape is not None:
        nx, ny, nz = opts.shape
        centre_z = 0.5 * (z_lo + z_hi)
        z_lo = centre_z - 0.5 * (nz - 1) * spacing[2]
    else:
        nz = int(np.ceil((z_hi - z_lo) / spacing[2])) + 1
        if nz > opts.max_slices:
            if opts.spacing is not None:
                raise VertebraIDError(
                    f"Levels {top}..{bottom} need {nz} slices at {spacing[2]:g} mm, more than max_slices={opts.max_slices}; "
                    "raise max_slices or the slice spacing."
                )
            spacing[2] = (z_hi - z_lo) / (opts.max_slices - 1)
            nz = opts.max_slices
        nz = max(nz, 2)
    # in-plane: the body (or, for a targeted reconstruction, the spine) in the middle
    zmid = 0.5 * (z_lo + z_lo + (nz - 1) * spacing[2])
    model_centre = spine_g.centre_at_height(np.array([zmid]))[0]
    body_width = 2 * 165.0 * patient.habitus.size + 2 * patient.habitus.fat_mm
    if opts.shape is None:
        if opts.matrix is not None:
            nx = ny = opts.matrix
        else:
            if rng.random() < 0.7:
                fov = body_width + rng.uniform(10, 80)
            else:
                fov = rng.uniform(160, 280)
            nx = ny = int(np.clip(np.round(fov / spacing[0]), 64, 512))
    fov_x, fov_y = nx * spacing[0], ny * spacing[1]
    targeted = fov_x < 0.8 * body_width
    if targeted:
        cx, cy = model_centre[0], model_centre[1] + rng.uniform(-10, 30)
    else:
        cx = model_centre[0] + rng.uniform(-15, 15)
        cy = model_centre[1] + 35.0 * patient.habitus.size + rng.uniform(-15, 15)
    if nx * ny * nz > MAX_VOXELS and opts.shape is None and opts.matrix is None:
        nx = ny = int(np.sqrt(MAX_VOXELS / nz))  # a drawn matrix shrinks to fit; a requested one is an error
    if nx * ny * nz > MAX_VOXELS:
        raise VertebraIDError(f"A phantom of {nx}x{ny}x{nz} voxels is too large (at most {MAX_VOXELS:,}).")
    origin = np.array([cx - 0.5 * (nx - 1) * spacing[0], cy - 0.5 * (ny - 1) * spacing[1], z_lo])
    grid = Grid(origin, spacing, (nx, ny, nz))
    # thick slices: render k thin sub-slices per slice and average them (the slice profile)
    ratio = spacing[2] / spacing[0]
    sub = 1 if ratio < 2.0 else int(np.ceil(ratio / 1.5))
    sub = sub + 1 if sub % 2 == 0 else sub  # odd: the middle sub-slice is the slice centre (for the masks)
    fine_spacing = np.array([spacing[0], spacing[1], spacing[2] / sub])
    fine = Grid(origin - np.array([0, 0, (sub - 1) / 2 * fine_spacing[2]]), fine_spacing, (nx, ny, nz * sub))
    return _Scan(rot, spine_g, top, bottom, cut, spacing, grid, fine, sub, (cx, cy), (fov_x, fov_y), targeted)


def _render(scan: _Scan, anatomy: _Anatomy, patient: _Patient, with_body_mask: bool, rng: _Streams, timings: dict):
    """(CT in HU on the grid, VerSe mask, body mask or None, body half-width per slice): soft tissue,
    table, then every solid composited in the grid frame; sub-slices averaged into thick slices."""
    t2 = time.perf_counter()
    fine, rot, sub = scan.fine, scan.rotation, scan.sub
    nx, ny, nz = scan.grid.shape
    cage_g = None
    if anatomy.cage is not None:
        cage = anatomy.cage
        cage_g = sk.RibCage(cage.centres @ rot.T, cage.half_width, cage.half_depth, cage.levels)
    hips_g = anatomy.pelvis.hip_centres @ rot.T
    model = soft.slice_model(fine, scan.spine, cage_g, float(hips_g[:, 2].mean()), patient.habitus)
    ct = soft.render_soft_tissue(fine, model, patient.habitus, rng.tissue)
    timings["soft_tissue"] = time.perf_counter() - t2
    t3 = time.perf_counter()
    back_y = float(np.min(model.cy - model.post))
    table = soft.table_hu(fine, back_y, rng.tissue)
    if table is not None:
        foam, skins = table
        plane = F32(-850.0) * foam + F32(300.0) * skins
        occupancy = np.maximum(foam, skins)[:, :, None]
        ct *= 1 - occupancy
        ct += plane[:, :, None]
    mask = np.zeros(fine.shape, np.uint8)
    body_mask = np.zeros(fine.shape, np.uint8) if with_body_mask else None
    zero = np.zeros(3)
    for solid in anatomy.organs + anatomy.canal + anatomy.discs:
        composite(solid.transformed(rot, zero), fine, ct)
    rng_texture = np.random.default_rng(rng.noise.integers(2**63))
    for solid in anatomy.bones:
        composite(solid.transformed(rot, zero), fine, ct, rng=rng_texture)
    for solid in anatomy.labelled:
        composite(solid.transformed(rot, zero), fine, ct, mask, body_mask, rng=rng_texture)
    for solid in anatomy.metal:
        composite(solid.transformed(rot, zero), fine, ct)
    if sub > 1:
        ct = ct.reshape(nx, ny, nz, sub).mean(axis=3, dtype=F32)
        mask = np.ascontiguousarray(mask[:, :, sub // 2::sub])
        if body_mask is not None:
            body_mask = np.ascontiguousarray(body_mask[:, :, sub // 2::sub])
        model_width = model.half_width[sub // 2::sub]
    else:
        model_width = model.half_width
    timings["bones"] = time.perf_counter() - t3
    return ct, mask, body_mask, model_width


def _form_image(ct: np.ndarray, scan: _Scan, anatomy: _Anatomy, patient: _Patient, opts: PhantomOptions,
                model_width: np.ndarray, rng: _Streams):
    """Metal streaks, noise and blur, the reconstruction circle; the CT as int16 HU and what was drawn."""
    spacing = scan.spacing
    nx, ny, _ = scan.grid.shape
    streak_slices = cond.metal_streaks(ct, spacing, rng.noise) if anatomy.metal else 0
    low_dose = "low_dose" in patient.pathologies
    if opts.noise_hu is not None:
        noise = opts.noise_hu
    else:
        noise = rng.noise.uniform(35, 75) if low_dose else rng.noise.uniform(8, 28)
        noise *= float(np.clip((1.5 / np.sqrt(spacing[0] * spacing[1] * spacing[2] / 1.5)), 0.6, 1.4))
    if opts.blur_mm is not None:
        blur = opts.blur_mm
    else:
        blur = rng.noise.uniform(1.0, 2.0) if "blur" in patient.pathologies else rng.noise.uniform(0.35, 0.8)
    width_scale = np.clip(model_width / max(float(np.median(model_width)), 1.0), 0.5, 2.0) ** 1.5
    cond.noise_and_blur(ct, spacing, (blur, blur, blur), noise, rng.noise, slice_scale=width_scale)
    if not scan.targeted and rng.scan.random() < 0.5:
        # outside the reconstruction circle scanners write a constant
        X, Y, _ = scan.grid.axes((slice(0, nx), slice(0, ny), slice(0, 1)))
        r = min(scan.fov_xy) / 2
        cx, cy = scan.centre_xy
        outside = ((X - F32(cx)) ** 2 + (Y - F32(cy)) ** 2)[:, :, 0] > F32(r * r)
        ct[outside] = HU_MIN
    np.clip(ct, HU_MIN, opts.hu_max, out=ct)
    formation = {"noise_hu": round(float(noise), 1), "blur_mm": round(float(blur), 2), "streak_slices": streak_slices}
    return np.rint(ct).astype(np.int16), formation


def _output_geometry(scan: _Scan, opts: PhantomOptions, ct_i16, mask, body_mask, rng: np.random.Generator):
    """Optional oblique axes and a placement in the world, then the array orientation."""
    grid = scan.grid
    oblique = cond.random_rotation(opts.oblique_deg, rng, exact=True)
    world_centre = np.array([rng.uniform(-30, 30), rng.uniform(-60, 20), rng.uniform(-900, 100)])
    grid_centre = grid.origin + 0.5 * (np.array(grid.shape) - 1) * grid.spacing
    to_world = np.eye(4)
    to_world[:3, :3] = oblique
    to_world[:3, 3] = world_centre - oblique @ grid_centre
    affine = to_world @ np.block([[np.diag(grid.spacing), grid.origin[:, None]], [np.zeros((1, 3)), np.ones((1, 1))]])
    orientation = _draw_orientation(opts, rng)
    arrays = {"ct": ct_i16, "mask": mask}
    if body_mask is not None:
        arrays["body"] = body_mask
    arrays, affine = reorient_arrays(arrays, affine, orientation)
    return arrays, affine, to_world, orientation


def _ground_truth(scan: _Scan, ct_vol: Volume, to_world: np.ndarray) -> tuple[list[Vertebra], list[str]]:
    """Body centres inside the image (grid frame -> world; C2's includes the dens), and the levels only partly in it."""
    grid, axis = scan.grid, np.array([0.0, 0.0, 1.0])
    nz = grid.shape[2]
    truth, partial = [], []
    for seg in scan.spine.segments:
        if seg.name not in LABEL_IDS:
            continue
        centre = seg.to_patient(sk.c2_centre_offset(seg)) if seg.name == "C2" else seg.centre
        world = to_world[:3, :3] @ centre + to_world[:3, 3]
        ijk = ct_vol.world_to_voxel(world)
        inside = bool(np.all(ijk >= -0.5) and np.all(ijk <= np.array(ct_vol.shape3) - 0.5))
        lo, hi = cond.body_extent_along(seg, axis)
        top_z = grid.origin[2] + (nz - 1) * scan.spacing[2]
        visible = float(np.clip((min(hi, top_z) - max(lo, grid.origin[2])) / (hi - lo), 0, 1))
        if inside:
            extra = {"visible_fraction": round(visible, 3)}
            if seg.fracture:
                extra["fracture"] = f"{seg.fracture['grade']} {seg.fracture['kind']}"
            truth.append(Vertebra(seg.name, world, 1.0, extra=extra))
        elif visible > 0:
            partial.append(seg.name)
    return truth, partial


def _patient_summary(patient: _Patient, spine: SpineShape, anatomy: _Anatomy) -> dict:
    dens = patient.density
    return {
        "sex": patient.sex, "age": round(patient.age, 1), "size": round(patient.size, 3),
        "transitional": patient.transitional,
        "rib_pairs": anatomy.rib_pairs + (1 if patient.transitional == "13_ribs" else 0),
        "curvature_deg": {**{k: round(v, 1) for k, v in vars(patient.curvature).items() if k != "sacral_slope"},
                          "sacral_slope_measured": round(float(np.degrees(np.arctan2(
                              spine.segment("S1").z[1], spine.segment("S1").z[2]))), 1)},
        "scoliosis": [{"cobb_deg": round(c.cobb_deg, 1), "upper": c.upper, "lower": c.lower} for c in patient.scoliosis],
        "fractures": {k: f"{v['grade']} {v['kind']}" for k, v in patient.fractures.items()},
        "cancellous_hu": round(dens.cancellous, 1), "cortex_hu": round(dens.cortex, 1),
        "fat_mm": round(patient.habitus.fat_mm, 1), "contrast": patient.habitus.contrast,
        "contrast_scale": round(patient.habitus.contrast_scale, 2) if patient.habitus.contrast else None,
    }
