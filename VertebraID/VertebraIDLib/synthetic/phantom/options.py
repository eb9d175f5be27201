"""Phantom options: what a caller may ask for, with one-sentence errors for anything invalid.

Every option left as None is drawn from the seed (a realistic mix for training data); an
explicit value is used as given.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, fields

from ...errors import VertebraIDError

#: Conditions a caller can ask for (or exclude by leaving them out of an explicit list).
PATHOLOGIES = (
    "fracture",  # vertebral compression fractures (wedge, biconcave, crush)
    "screws",  # pedicle screws and rods
    "hip_prosthesis",  # total hip replacement (metal ball, cup, stem)
    "scoliosis",  # lateral curvature with vertebral rotation
    "osteoporosis",  # low cancellous density
    "degeneration",  # narrowed discs, vacuum phenomenon
    "low_dose",  # strong noise
    "blur",  # soft kernel / thick slab
    "contrast",  # intravenous contrast
)

#: Transitional anatomy: 11 or 13 rib pairs (13 = an extra thoracic vertebra, T13), an extra
#: lumbar vertebra (L6), or an L5 with broad transverse processes fused to the sacrum.
TRANSITIONAL = ("none", "11_ribs", "13_ribs", "L6", "sacralized_L5")
_TRANSITIONAL_ALIASES = {"t13": "13_ribs", "13": "13_ribs", "11": "11_ribs", "l6": "L6", "sacralised_l5": "sacralized_L5",
                         "sacralized_l5": "sacralized_L5", "none": "none", "11_ribs": "11_ribs", "13_ribs": "13_ribs"}

REGION_PRESETS = {
    "cervical": ("C1", "C7"),
    "thoracic": ("T1", "T12"),
    "lumbar": ("L1", "L5"),
    "thoracolumbar": ("T10", "L3"),
    "lumbosacral": ("L1", "S2"),
    "full": ("C1", "S2"),
}

ORIENTATION_CODES = re.compile(r"^[LR][AP][IS]$|^[LR][IS][AP]$|^[AP][LR][IS]$|^[AP][IS][LR]$|^[IS][LR][AP]$|^[IS][AP][LR]$")

MAX_VOXELS = 200_000_000


def level_chain(transitional: str = "none") -> list[str]:
    """All labelled levels cranial to caudal for this anatomy (project names)."""
    levels = [f"C{i}" for i in range(1, 8)] + [f"T{i}" for i in range(1, 13)]
    if transitional == "13_ribs":
        levels.append("T13")
    levels += [f"L{i}" for i in range(1, 6)]
    if transitional == "L6":
        levels.append("L6")
    return levels + ["S1", "S2"]


def _clean_level(name: str) -> str:
    name = str(name).strip().upper()
    if not re.fullmatch(r"[CTLS]\d{1,2}", name):
        raise VertebraIDError(
            f"Unknown level '{name}'; use C1..C7, T1..T12, L1..L5, S1 or S2 (T13 and L6 with transitional anatomy)."
        )
    return name


def parse_levels(value, transitional: str = "none") -> tuple[str, str] | None:
    """('T10', 'S2') from 'T10..S2', 'T10-S2', 'T10:S2', a region preset or a pair; None = random."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "random")):
        return None
    if isinstance(value, str):
        text = value.strip()
        if text.lower() in REGION_PRESETS:
            top, bottom = REGION_PRESETS[text.lower()]
        else:
            parts = [p for p in re.split(r"\.\.|:|-|–|,|\s+to\s+", text) if p.strip()]
            if len(parts) == 1:
                parts = parts * 2
            if len(parts) != 2:
                raise VertebraIDError(
                    f"Cannot read the level range '{value}'; write it as TOP..BOTTOM (e.g. T10..S2) or one of "
                    f"{', '.join(REGION_PRESETS)}."
                )
            top, bottom = parts
    else:
        try:
            top, bottom = value
        except (TypeError, ValueError):
            raise VertebraIDError(f"A level range is two level names, got {value!r}.") from None
    top, bottom = _clean_level(top), _clean_level(bottom)
    chain = level_chain(transitional)
    for name in (top, bottom):
        if name not in chain:
            if name in ("T13", "L6"):
                need = "13_ribs" if name == "T13" else "L6"
                raise VertebraIDError(f"Level {name} exists only with transitional anatomy '{need}'.")
            raise VertebraIDError(
                f"Unknown level '{name}'; use C1..C7, T1..T12, L1..L5, S1 or S2 (T13 and L6 with transitional anatomy)."
            )
    if chain.index(top) > chain.index(bottom):
        raise VertebraIDError(
            f"The level range {top}..{bottom} runs upwards; write it cranial to caudal ({bottom}..{top})."
        )
    return top, bottom


def parse_transitional(value) -> str | None:
    """The transitional anatomy option: none, random, or one of TRANSITIONAL."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "random"):
        return None
    key = str(value).strip().lower()
    if key not in _TRANSITIONAL_ALIASES:
        raise VertebraIDError(f"Unknown transitional anatomy '{value}'; choose one of {', '.join(TRANSITIONAL)} or random.")
    return _TRANSITIONAL_ALIASES[key]


def parse_pathologies(value) -> tuple[str, ...] | None:
    """A tuple of known names from a list or a comma-separated string; None = random."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "random"):
        return None
    if isinstance(value, str):
        items = [v.strip() for v in value.split(",") if v.strip()]
        if [v.lower() for v in items] == ["none"]:
            return ()
    else:
        items = list(value)
    out = []
    for item in items:
        name = str(item).strip().lower().replace("-", "_")
        if name not in PATHOLOGIES:
            raise VertebraIDError(f"Unknown pathology '{item}'; choose from {', '.join(PATHOLOGIES)}.")
        if name not in out:
            out.append(name)
    return tuple(out)


def _positive(name, value, allow_zero=False):
    if value is None:
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise VertebraIDError(f"Option {name} must be a number, got {value!r}.") from None
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        raise VertebraIDError(f"Option {name} must be {'non-negative' if allow_zero else 'positive'}, got {value!r}.")
    return v


def _count(name, value):
    if value is None:
        return None
    try:
        whole = not isinstance(value, bool) and float(value).is_integer()
    except (TypeError, ValueError):
        whole = False
    if not whole:
        raise VertebraIDError(f"Option {name} must be a whole number, got {value!r}.")
    if int(value) < 0:
        raise VertebraIDError(f"Option {name} must not be negative, got {value!r}.")
    return int(value)


@dataclass
class PhantomOptions:
    """How to generate a phantom. None means: drawn at random from the seed."""

    levels: object = None  # visible range: 'T10..S2', ('T10', 'S2'), a preset, or None
    cut: bool | None = None  # let the field of view end inside a vertebra
    spacing: object = None  # mm: one number, (in-plane, slice) or (x, y, z)
    shape: tuple | None = None  # (nx, ny, nz) voxels; default: fit the levels
    matrix: int | None = None  # in-plane voxels (square), when shape is not given
    max_slices: int = 1000
    orientation: str = "random"  # axis codes of the array ('RAS', 'LPS', 'PIR'...) or 'random'
    oblique_deg: float = 0.0  # rotate the image axes by this angle about a random axis (an oblique scan)
    tilt_deg: float | None = None  # the patient's tilt in the scanner (default: up to 3 degrees)
    sex: str | None = None
    age: float | None = None
    size: float | None = None  # overall scale of the anatomy (1 = average adult male)
    pathologies: object = None  # names from PATHOLOGIES, or None for a random mix
    fractures: int | None = None  # number of fractured vertebrae (implies 'fracture')
    fracture_grade: str | None = None  # mild, moderate, severe
    scoliosis_deg: float | None = None  # Cobb angle (implies 'scoliosis' when > 0)
    transitional: str | None = None  # see TRANSITIONAL; None: random (rare)
    noise_hu: float | None = None  # standard deviation of the image noise
    blur_mm: float | None = None  # Gaussian PSF sigma in-plane
    hu_max: int = 3071  # metal is clipped here (12-bit CT); max 32767
    with_body_mask: bool = False  # also return the vertebral-body mask (project label ids)

    def validated(self) -> "PhantomOptions":
        """The options checked and normalised (one sentence for any invalid value)."""
        o = PhantomOptions(**{f.name: getattr(self, f.name) for f in fields(self)})
        o.transitional = parse_transitional(o.transitional)
        o.levels = parse_levels(o.levels, o.transitional or "none") if o.transitional is not None or o.levels is None \
            else _parse_levels_any_anatomy(o.levels)
        o.pathologies = parse_pathologies(o.pathologies)
        o.fractures = _count("fractures", o.fractures)
        o.max_slices = _count("max_slices", o.max_slices)
        if o.max_slices == 0:
            raise VertebraIDError("Option max_slices must be at least 1.")
        if o.fracture_grade is not None and o.fracture_grade not in ("mild", "moderate", "severe"):
            raise VertebraIDError(f"Unknown fracture grade '{o.fracture_grade}'; choose mild, moderate or severe.")
        if o.scoliosis_deg is not None:
            try:
                o.scoliosis_deg = float(o.scoliosis_deg)
            except (TypeError, ValueError):
                raise VertebraIDError(f"Option scoliosis_deg must be a number, got {o.scoliosis_deg!r}.") from None
            if not math.isfinite(o.scoliosis_deg) or abs(o.scoliosis_deg) > 90:
                raise VertebraIDError("Option scoliosis_deg must be a Cobb angle between -90 and 90 degrees.")
        if o.sex is not None:
            o.sex = str(o.sex).strip().lower()
            o.sex = {"m": "male", "f": "female"}.get(o.sex, o.sex)
            if o.sex not in ("male", "female"):
                raise VertebraIDError(f"Option sex must be 'male' or 'female', got {self.sex!r}.")
        o.age = _positive("age", o.age)
        if o.age is not None and not 15 <= o.age <= 110:
            raise VertebraIDError(f"Option age must be between 15 and 110 years (an adult skeleton), got {o.age:g}.")
        o.size = _positive("size", o.size)
        if o.size is not None and not 0.6 <= o.size <= 1.5:
            raise VertebraIDError(f"Option size must be between 0.6 and 1.5, got {o.size:g}.")
        o.noise_hu = _positive("noise_hu", o.noise_hu, allow_zero=True)
        o.blur_mm = _positive("blur_mm", o.blur_mm, allow_zero=True)
        o.oblique_deg = _positive("oblique_deg", o.oblique_deg, allow_zero=True)
        o.tilt_deg = _positive("tilt_deg", o.tilt_deg, allow_zero=True)
        if o.oblique_deg > 180 or (o.tilt_deg or 0) > 30:
            raise VertebraIDError("Option oblique_deg must be at most 180 and tilt_deg at most 30 degrees.")
        o.spacing = _parse_spacing(o.spacing)
        if o.shape is not None:
            try:
                shape = tuple(int(v) for v in o.shape)
            except (TypeError, ValueError):
                raise VertebraIDError(f"Option shape must be three whole numbers, got {o.shape!r}.") from None
            if len(shape) != 3 or min(shape) < 1:
                raise VertebraIDError(f"Option shape must be three positive whole numbers, got {o.shape!r}.")
            if shape[0] * shape[1] * shape[2] > MAX_VOXELS:
                raise VertebraIDError(f"A phantom of shape {shape} is too large (at most {MAX_VOXELS:,} voxels).")
            o.shape = shape
        o.matrix = _count("matrix", o.matrix)
        if o.matrix is not None and not 16 <= o.matrix <= 2048:
            raise VertebraIDError(f"Option matrix must be between 16 and 2048 voxels, got {o.matrix}.")
        o.orientation = str(o.orientation).strip()
        if o.orientation.lower() != "random":
            o.orientation = o.orientation.upper()
            if not ORIENTATION_CODES.match(o.orientation):
                raise VertebraIDError(
                    f"Unknown orientation '{self.orientation}'; give three axis codes such as RAS, LPS or PIR, or random."
                )
        if not isinstance(o.hu_max, (int, float)) or not 1000 <= int(o.hu_max) <= 32767:
            raise VertebraIDError(f"Option hu_max must be between 1000 and 32767, got {o.hu_max!r}.")
        o.hu_max = int(o.hu_max)
        return o

    def to_dict(self) -> dict:
        """The options as plain data (recorded in a phantom's metadata)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


def _parse_levels_any_anatomy(value):
    """Level range checked against the largest chain (the anatomy is not chosen yet)."""
    try:
        return parse_levels(value, "none")
    except VertebraIDError:
        pass
    for transitional in ("13_ribs", "L6"):
        try:
            return parse_levels(value, transitional)
        except VertebraIDError:
            continue
    return parse_levels(value, "none")  # raises the plain message


def _parse_spacing(value):
    if value is None:
        return None
    if isinstance(value, str):
        value = [v for v in re.split(r"[,x\s]+", value.strip()) if v]
    if isinstance(value, (int, float)):
        value = [value]
    try:
        values = [float(v) for v in value]
    except (TypeError, ValueError):
        raise VertebraIDError(f"Option spacing must be numbers in mm, got {value!r}.") from None
    if len(values) == 1:
        values = values * 3
    elif len(values) == 2:
        values = [values[0], values[0], values[1]]
    if len(values) != 3 or not all(math.isfinite(v) for v in values):
        raise VertebraIDError(f"Option spacing must be 1, 2 or 3 numbers in mm, got {value!r}.")
    if min(values[:2]) < 0.3 or max(values[:2]) > 6.0 or not 0.3 <= values[2] <= 10.0:
        raise VertebraIDError(
            f"Spacing {values} mm is out of range: in-plane 0.3 to 6 mm, slices 0.3 to 10 mm."
        )
    return tuple(values)
