"""Reading and writing labelled vertebrae and input points in the formats the project meets.

- Vertebrae JSON (the project's own output): RAS or LPS millimetres, one entry per vertebra.
- VerSe centroid JSON (`*_ctd.json`): voxel coordinates of the image reoriented to the file's
  axis codes; placing them in the world needs that image (`reference`).
- Slicer markups JSON (`.mrk.json`, schema v1.0.3): a point list labelled by level, or a curve.
- CSV: label,index,x,y,z,confidence in RAS millimetres.
- Points JSON: the input of `vertebraid label-points` (positions with optional region/level
  probabilities).
- VID dataset (Bürgin et al., MICCAI 2023): keypoint detections and ground truth in DICOM world
  coordinates (LPS).

Inside the package every position is RAS millimetres; LPS appears only in files. Every reader
turns malformed input into a VertebraIDError whose one sentence names the file.
"""
from __future__ import annotations

import csv
import io
import json
import math
import re
from pathlib import Path

import numpy as np

from ..engine.anatomy import (
    CHECK_COLOR,
    LABEL_IDS,
    REGION_COLORS,
    VERSE_IDS,
    VERSE_NAMES,
    is_known_label,
)
from ..engine.vertebrae import Vertebra, sort_by_level
from ..errors import VertebraIDError
from .files import PathLike, write_json_atomic, write_text_atomic

COORDINATE_SYSTEMS = ("RAS", "LPS")
_RAS_LPS_FLIP = np.array([-1.0, -1.0, 1.0])  # the same diagonal converts either way
POSITION_DECIMALS = 3
CONFIDENCE_DECIMALS = 4

#: VerSe's coccyx id: a valid VerSe label that the project does not name; skipped on reading.
VERSE_COCCYX_ID = 27

#: Schema id Slicer writes (and recognises) in markups files.
MARKUPS_SCHEMA = (
    "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/"
    "Resources/Schema/markups-schema-v1.0.3.json#"
)
_DEFAULT_MARKUPS_COLOR = (1.0, 1.0, 0.3)
_LPS_IDENTITY_ORIENTATION = [-1.0, -0.0, -0.0, -0.0, -1.0, -0.0, 0.0, 0.0, 1.0]
_CONFIDENCE_IN_DESCRIPTION = re.compile(r"confidence\s*[:=]?\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)")

#: Probability keys accepted in a points file: region letters or level names.
REGION_KEYS = ("C", "T", "L", "S")
VID_REGION_KEYS = ("C", "T", "L")
VID_KEYPOINT_TYPES = ("body", "left", "right")


# --------------------------------------------------------------------------- helpers


def _fail(path: PathLike, problem: str) -> VertebraIDError:
    return VertebraIDError(f"Cannot read '{path}': {problem}.")


def _read_text(path: PathLike) -> str:
    path = Path(path)
    if not path.exists():
        raise VertebraIDError(f"Cannot read '{path}': no such file.")
    if not path.is_file():
        raise VertebraIDError(f"Cannot read '{path}': it is a folder, not a file.")
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise _fail(path, "it is not a text file") from exc
    except OSError as exc:
        raise _fail(path, exc.strerror or "the file cannot be opened") from exc


def _load_json(path: PathLike):
    """Parse a JSON file; NaN literals are let through for the readers to judge."""
    text = _read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise _fail(path, f"it is not valid JSON (line {exc.lineno}, column {exc.colno})") from exc


def _as_position(value, path: PathLike, what: str) -> np.ndarray:
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        raise _fail(path, f"the position of {what} is not a list of 3 numbers")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        raise _fail(path, f"the position of {what} is not a list of 3 numbers")
    position = np.array(value, dtype=float)
    if not np.isfinite(position).all():
        raise _fail(path, f"the position of {what} contains NaN or infinite values")
    return position


def _as_number(value, path: PathLike, what: str, minimum: float | None = None) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise _fail(path, f"{what} is not a finite number")
    if minimum is not None and value < minimum:
        raise _fail(path, f"{what} is below {minimum:g}")
    return float(value)


def _check_label(label, path: PathLike, where: str) -> str:
    if not isinstance(label, str) or not is_known_label(label.strip()):
        raise _fail(
            path,
            f"{where} has label {label!r}, which is not a vertebra level name (C1..C7, T1..T13, L1..L6, S1, S2)",
        )
    return label.strip()


def _check_unique(vertebrae: list[Vertebra], path: PathLike) -> list[Vertebra]:
    seen = set()
    for v in vertebrae:
        if v.label in seen:
            raise _fail(path, f"label {v.label} appears more than once")
        seen.add(v.label)
    return sort_by_level(vertebrae)


def _convert(positions: np.ndarray, coordinate_system: str) -> np.ndarray:
    """RAS <-> LPS (the same flip of x and y both ways)."""
    positions = np.asarray(positions, dtype=float)
    return positions * _RAS_LPS_FLIP if coordinate_system == "LPS" else positions.copy()


def _check_coordinate_system(value, path: PathLike | None = None) -> str:
    if isinstance(value, str) and value.upper() in COORDINATE_SYSTEMS:
        return value.upper()
    if path is None:
        raise VertebraIDError(f"Unknown coordinate system {value!r}; use 'RAS' or 'LPS'.")
    raise _fail(path, f"coordinate system {value!r} is neither 'RAS' nor 'LPS'")


def _finite(vertebrae: list[Vertebra]) -> list[Vertebra]:
    """Cranial-to-caudal copy of the list, refusing NaN or infinite values (JSON cannot hold them)."""
    for v in vertebrae:
        if not np.isfinite(v.position).all() or not math.isfinite(float(v.confidence)):
            raise VertebraIDError(f"Vertebra {v.label} has a NaN or infinite position or confidence.")
    return sort_by_level(list(vertebrae))


def _rounded(values, decimals: int) -> list[float]:
    return [round(float(v), decimals) + 0.0 for v in values]  # + 0.0 turns -0.0 into 0.0


# --------------------------------------------------------------------------- vertebrae JSON


def vertebrae_to_dict(vertebrae: list[Vertebra], coordinate_system: str = "RAS", **extra) -> dict:
    """The project's vertebrae JSON as a dict, ordered cranial to caudal.

    `{"coordinate_system": "RAS"|"LPS", "vertebrae": [{"label", "index", "position",
    "confidence", ["source_index"], ["locked"]}, ...], **extra}`; positions in mm rounded to
    3 decimals, confidences to 4.
    """
    system = _check_coordinate_system(coordinate_system)
    reserved = {"coordinate_system", "vertebrae"} & extra.keys()
    if reserved:
        raise ValueError(f"Extra keys may not replace {sorted(reserved)}.")
    entries = []
    for v in _finite(vertebrae):
        entry = {
            "label": v.label,
            "index": LABEL_IDS[v.label],
            "position": _rounded(_convert(v.position, system), POSITION_DECIMALS),
            "confidence": round(float(v.confidence), CONFIDENCE_DECIMALS),
        }
        if v.source_index is not None:
            entry["source_index"] = int(v.source_index)
        if v.locked:
            entry["locked"] = True
        entries.append(entry)
    return {"coordinate_system": system, "vertebrae": entries, **extra}


def write_vertebrae_json(path: PathLike, vertebrae: list[Vertebra], coordinate_system: str = "RAS", **extra) -> None:
    """Write the vertebrae JSON atomically (see `vertebrae_to_dict`)."""
    write_json_atomic(path, vertebrae_to_dict(vertebrae, coordinate_system, **extra))


def _vertebrae_from_dict(data, path: PathLike) -> list[Vertebra]:
    if not isinstance(data, dict) or not isinstance(data.get("vertebrae"), list):
        raise _fail(path, "it has no 'vertebrae' list")
    system = _check_coordinate_system(data.get("coordinate_system", "RAS"), path)
    out = []
    for n, entry in enumerate(data["vertebrae"], start=1):
        if not isinstance(entry, dict) or "label" not in entry or "position" not in entry:
            raise _fail(path, f"vertebra entry {n} lacks a 'label' or a 'position'")
        label = _check_label(entry["label"], path, f"vertebra entry {n}")
        position = _convert(_as_position(entry["position"], path, label), system)
        confidence = _as_number(entry.get("confidence", 1.0), path, f"the confidence of {label}", 0.0)
        source_index = entry.get("source_index")
        if source_index is not None and (not isinstance(source_index, int) or isinstance(source_index, bool)):
            raise _fail(path, f"the source_index of {label} is not an integer")
        locked = entry.get("locked", False)
        if not isinstance(locked, bool):
            raise _fail(path, f"the locked flag of {label} is not true or false")
        out.append(Vertebra(label, position, confidence, source_index, locked))
    return _check_unique(out, path)


def read_vertebrae_json(path: PathLike) -> list[Vertebra]:
    """Read the project's vertebrae JSON (RAS or LPS file); positions returned in RAS.

    `index` entries are ignored (the label decides); a missing confidence reads as 1.
    """
    return _vertebrae_from_dict(_load_json(path), path)


# --------------------------------------------------------------------------- VerSe centroids


def _reoriented_affine(reference, axcodes) -> np.ndarray:
    """Voxel->RAS affine of `reference` reoriented to `axcodes` (nibabel's as_reoriented)."""
    import nibabel.orientations as nio

    transform = nio.ornt_transform(nio.io_orientation(reference.affine), nio.axcodes2ornt(axcodes))
    return reference.affine @ nio.inv_ornt_aff(transform, reference.shape3)


def _check_axcodes(value, path: PathLike) -> tuple[str, str, str]:
    valid = isinstance(value, (list, tuple)) and len(value) == 3 and all(isinstance(c, str) for c in value)
    if valid:
        codes = tuple(c.upper() for c in value)
        axes = sorted({"L": 0, "R": 0, "P": 1, "A": 1, "I": 2, "S": 2}.get(c, -1) for c in codes)
        if axes == [0, 1, 2]:
            return codes
    raise _fail(path, f"its direction {value!r} is not three axis codes such as ['P', 'I', 'R']")


def read_verse_ctd(path: PathLike, reference=None) -> list[Vertebra]:
    """Read a VerSe centroid file into RAS millimetres using the image it belongs to.

    VerSe stores `[{"direction": [axis codes]}, {"label": id, "X", "Y", "Z"}, ...]`, the
    coordinates being voxel indices of the image reoriented to those axis codes (VerSe's
    `reorient_to`). We map them with `reference`'s affine reoriented the same way (nibabel's
    convention; VerSe's own notebook flips with `size - x` instead of `size - 1 - x`, which only
    matters when the file's axis codes differ from the image's). Without a "direction" entry
    the reference's own axes are assumed. Entries with NaN coordinates (VerSe's marker for an
    absent centroid) and the coccyx (id 27) are skipped; VerSe id 26 (sacrum) becomes S1.
    """
    data = _load_json(path)
    if not isinstance(data, list):
        raise _fail(path, "a VerSe centroid file is a list of entries")
    axcodes = None
    points = []
    for n, entry in enumerate(data, start=1):
        if not isinstance(entry, dict):
            raise _fail(path, f"entry {n} is not an object")
        if "direction" in entry:
            axcodes = _check_axcodes(entry["direction"], path)
            continue
        if not {"label", "X", "Y", "Z"} <= entry.keys():
            raise _fail(path, f"entry {n} lacks one of 'label', 'X', 'Y', 'Z'")
        verse_id = entry["label"]
        if isinstance(verse_id, float) and verse_id.is_integer():
            verse_id = int(verse_id)
        if not isinstance(verse_id, int) or isinstance(verse_id, bool):
            raise _fail(path, f"entry {n} has label {verse_id!r}, which is not a VerSe vertebra id")
        xyz = [entry[k] for k in "XYZ"]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in xyz):
            raise _fail(path, f"the coordinates of VerSe label {verse_id} are not numbers")
        if not all(math.isfinite(v) for v in xyz):
            continue
        if verse_id == VERSE_COCCYX_ID:
            continue
        if verse_id not in VERSE_NAMES:
            raise _fail(path, f"entry {n} has label {verse_id}, which is not a VerSe vertebra id (1-26, 28)")
        points.append((VERSE_NAMES[verse_id], np.array(xyz, dtype=float)))
    if reference is None:
        if axcodes is None:
            raise _fail(
                path, "it has no 'direction' entry and no reference image was given to place its voxel coordinates"
            )
        raise _fail(path, "its centroids are voxel coordinates, so the image they belong to is needed as a reference")
    affine = _reoriented_affine(reference, axcodes) if axcodes else reference.affine
    out = [Vertebra(label, ijk @ affine[:3, :3].T + affine[:3, 3]) for label, ijk in points]
    return _check_unique(out, path)


def verse_ctd_list(vertebrae: list[Vertebra], reference) -> list[dict]:
    """VerSe centroid entries in `reference`'s own axis codes and voxel coordinates.

    Levels without a VerSe id (S2) are left out.
    """
    import nibabel.orientations as nio

    entries: list[dict] = [{"direction": list(nio.aff2axcodes(reference.affine))}]
    for v in _finite(vertebrae):
        if v.label not in VERSE_IDS:
            continue
        ijk = reference.world_to_voxel(v.position)
        entries.append({"label": VERSE_IDS[v.label], **dict(zip("XYZ", _rounded(ijk, 2)))})
    return entries


def write_verse_ctd(path: PathLike, vertebrae: list[Vertebra], reference) -> None:
    """Write a VerSe centroid file (voxel coordinates of `reference`), atomically."""
    write_text_atomic(path, json.dumps(verse_ctd_list(vertebrae, reference)) + "\n")


# --------------------------------------------------------------------------- Slicer markups


def _markups_document(markup: dict) -> dict:
    return {"@schema": MARKUPS_SCHEMA, "markups": [markup]}


def _control_point(n: int, label: str, position_lps, description: str = "", locked: bool = False,
                   selected: bool = True) -> dict:
    return {
        "id": str(n),
        "label": label,
        "description": description,
        "associatedNodeID": "",
        "position": _rounded(position_lps, POSITION_DECIMALS),
        "orientation": list(_LPS_IDENTITY_ORIENTATION),
        "selected": bool(selected),
        "locked": bool(locked),
        "visibility": True,
        "positionStatus": "defined",
    }


def _display(color) -> dict:
    return {
        "visibility": True,
        "opacity": 1.0,
        "color": list(CHECK_COLOR),  # unselected points: the labels to check
        "selectedColor": list(color),
        "activeColor": [0.4, 1.0, 0.0],
        "propertiesLabelVisibility": False,
        "pointLabelsVisibility": True,
        "textScale": 3.0,
        "glyphType": "Sphere3D",
        "glyphScale": 3.0,
        "glyphSize": 5.0,
        "useGlyphScale": True,
    }


def markups_point_list_dict(vertebrae: list[Vertebra], name: str = "Vertebrae", color=None) -> dict:
    """A Slicer point list (schema v1.0.3, LPS) with one control point per vertebra.

    Each point is labelled with its level; its description carries the confidence and its
    locked flag follows the vertebra. A markups node has one colour: by default the region
    colour when all vertebrae share a region, else a neutral yellow. Points to check (confidence
    below 0.5) are left unselected, which Slicer draws in the node's other colour, red.
    """
    ordered = _finite(vertebrae)
    if color is None:
        regions = {v.region for v in ordered}
        color = REGION_COLORS[regions.pop()] if len(regions) == 1 else _DEFAULT_MARKUPS_COLOR
    points = [
        _control_point(n, v.label, _convert(v.position, "LPS"), v.confidence_text, v.locked, not v.needs_check)
        for n, v in enumerate(ordered, start=1)
    ]
    markup = {
        "type": "Fiducial",
        "name": name,
        "coordinateSystem": "LPS",
        "coordinateUnits": "mm",
        "locked": False,
        "fixedNumberOfControlPoints": False,
        "labelFormat": "%N-%d",
        "lastUsedControlPointNumber": len(points),
        "controlPoints": points,
        "measurements": [],
        "display": _display(color),
    }
    return _markups_document(markup)


def write_markups_json(path: PathLike, vertebrae: list[Vertebra], name: str = "Vertebrae") -> None:
    """Write the vertebrae as a Slicer `.mrk.json` point list, atomically."""
    write_json_atomic(path, markups_point_list_dict(vertebrae, name))


def curve_markups_dict(points_ras, name: str = "Centerline") -> dict:
    """A Slicer markups Curve (LPS) through `points_ras` (N, 3), in order."""
    points = np.asarray(points_ras, dtype=float)
    if points.ndim != 2 or points.shape[1] != 3:
        raise VertebraIDError(f"A curve needs an (N, 3) array of points, got shape {points.shape}.")
    if not np.isfinite(points).all():
        raise VertebraIDError("The curve points contain NaN or infinite values.")
    control_points = [_control_point(n, f"{name}-{n}", p) for n, p in enumerate(_convert(points, "LPS"), start=1)]
    markup = {
        "type": "Curve",
        "name": name,
        "coordinateSystem": "LPS",
        "coordinateUnits": "mm",
        "locked": True,
        "fixedNumberOfControlPoints": False,
        "labelFormat": "%N-%d",
        "lastUsedControlPointNumber": len(control_points),
        "controlPoints": control_points,
        "measurements": [],
        "display": {**_display((0.9, 0.3, 0.3)), "pointLabelsVisibility": False, "glyphScale": 1.0},
    }
    return _markups_document(markup)


def write_curve_markups_json(path: PathLike, points_ras, name: str = "Centerline") -> None:
    """Write a markups Curve through `points_ras` (N, 3) as `.mrk.json`, atomically."""
    write_json_atomic(path, curve_markups_dict(points_ras, name))


def _vertebrae_from_markups(data, path: PathLike) -> list[Vertebra]:
    if not isinstance(data, dict) or not isinstance(data.get("markups"), list):
        raise _fail(path, "it has no 'markups' list")
    out = []
    for markup in data["markups"]:
        if not isinstance(markup, dict):
            raise _fail(path, "a markups entry is not an object")
        system = _check_coordinate_system(markup.get("coordinateSystem", "LPS"), path)
        units = markup.get("coordinateUnits", "mm")
        if isinstance(units, list) and units:
            units = units[0]
        if units not in ("mm", "um"):
            raise _fail(path, f"coordinate units {units!r} are neither 'mm' nor 'um'")
        scale = 0.001 if units == "um" else 1.0
        points = markup.get("controlPoints", [])
        if not isinstance(points, list):
            raise _fail(path, "'controlPoints' is not a list")
        for n, point in enumerate(points, start=1):
            if not isinstance(point, dict):
                raise _fail(path, f"control point {n} is not an object")
            if point.get("positionStatus", "defined") == "undefined":
                continue  # placed in the list but never positioned
            label = _check_label(point.get("label"), path, f"control point {n}")
            position = _convert(_as_position(point.get("position"), path, label), system) * scale
            match = _CONFIDENCE_IN_DESCRIPTION.search(str(point.get("description", "")))
            confidence = float(match.group(1)) if match else 1.0
            out.append(Vertebra(label, position, confidence, locked=bool(point.get("locked", False))))
    return _check_unique(out, path)


def read_markups_json(path: PathLike) -> list[Vertebra]:
    """Read labelled control points of a Slicer `.mrk.json` (LPS or RAS) as vertebrae (RAS).

    Every defined control point must be labelled with a level name; the confidence is read
    back from a description "confidence 0.93" when present (else 1).
    """
    return _vertebrae_from_markups(_load_json(path), path)


# --------------------------------------------------------------------------- CSV

CSV_COLUMNS = ("label", "index", "x", "y", "z", "confidence")


def vertebrae_csv_text(vertebrae: list[Vertebra]) -> str:
    """The vertebrae as CSV text (label, index, x, y, z, confidence; RAS mm)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for v in _finite(vertebrae):
        x, y, z = _rounded(v.position, POSITION_DECIMALS)
        writer.writerow([v.label, LABEL_IDS[v.label], x, y, z, round(float(v.confidence), CONFIDENCE_DECIMALS)])
    return buffer.getvalue()


def write_vertebrae_csv(path: PathLike, vertebrae: list[Vertebra]) -> None:
    """Write label,index,x,y,z,confidence (RAS mm), cranial to caudal, atomically."""
    write_text_atomic(path, vertebrae_csv_text(vertebrae))


def _vertebrae_from_csv(text: str, path: PathLike) -> list[Vertebra]:
    rows = csv.DictReader(io.StringIO(text))
    columns = {(c or "").strip().lower() for c in rows.fieldnames or []}
    if not {"label", "x", "y", "z"} <= columns:
        raise _fail(path, "a vertebrae CSV needs the columns label, x, y, z")
    out = []
    for line, row in enumerate(rows, start=2):
        row = {(k or "").strip().lower(): (v or "").strip() for k, v in row.items() if k is not None}
        if not any(row.values()):
            continue
        label = _check_label(row["label"], path, f"line {line}")
        try:
            position = np.array([float(row[k]) for k in "xyz"])
            confidence = float(row["confidence"]) if row.get("confidence") else 1.0
        except ValueError as exc:
            raise _fail(path, f"line {line} has a value that is not a number") from exc
        if not np.isfinite(position).all() or not math.isfinite(confidence):
            raise _fail(path, f"line {line} contains NaN or infinite values")
        out.append(Vertebra(label, position, confidence))
    return _check_unique(out, path)


def read_vertebrae_csv(path: PathLike) -> list[Vertebra]:
    """Read a vertebrae CSV (label,x,y,z[,confidence] in RAS mm; other columns ignored)."""
    return _vertebrae_from_csv(_read_text(path), path)


# --------------------------------------------------------------------------- points input


def _probabilities(value, path: PathLike, n: int) -> dict | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _fail(path, f"the probabilities of point {n} are not an object")
    out = {}
    for key, p in value.items():
        if key not in REGION_KEYS and not is_known_label(key):
            raise _fail(path, f"point {n} has probability key {key!r}; use region letters C/T/L/S or level names")
        out[key] = _as_number(p, path, f"the probability {key!r} of point {n}", 0.0)
    return out


def read_points_json(path: PathLike) -> tuple[np.ndarray, list[dict | None], str]:
    """Read unlabelled points for `label-points`.

    Format: `{"coordinate_system": "LPS"|"RAS", "points": [{"position": [x, y, z],
    "probabilities": {"C": 0.02, "T": 0.01, "L": 0.99}}, ...]}`; probabilities are optional,
    keyed by region letters or level names, finite and >= 0. Returns RAS positions (N, 3),
    the probabilities per point (None where absent) and the file's coordinate system.
    """
    data = _load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("points"), list):
        raise _fail(path, "it has no 'points' list")
    system = _check_coordinate_system(data.get("coordinate_system", "RAS"), path)
    positions, probabilities = [], []
    for n, point in enumerate(data["points"], start=1):
        if not isinstance(point, dict) or "position" not in point:
            raise _fail(path, f"point {n} has no 'position'")
        positions.append(_as_position(point["position"], path, f"point {n}"))
        probabilities.append(_probabilities(point.get("probabilities"), path, n))
    array = np.array(positions, dtype=float).reshape(-1, 3)
    return _convert(array, system), probabilities, system


# --------------------------------------------------------------------------- VID dataset


def _vid_keypoints(path: PathLike, keypoint_type: str) -> list[tuple[np.ndarray, dict]]:
    if keypoint_type not in VID_KEYPOINT_TYPES:
        raise VertebraIDError(
            f"Unknown VID keypoint type {keypoint_type!r}; use one of {', '.join(VID_KEYPOINT_TYPES)}."
        )
    data = _load_json(path)
    if not isinstance(data, list):
        raise _fail(path, "a VID keypoint file is a list of keypoints")
    out = []
    for n, keypoint in enumerate(data, start=1):
        try:
            world = keypoint["coordinates"]["world_space"]
            kind = keypoint["type"]
            this_type = kind["keypoint_type"]
        except (KeyError, TypeError) as exc:
            raise _fail(path, f"keypoint {n} lacks 'coordinates.world_space' or 'type.keypoint_type'") from exc
        if this_type == keypoint_type:
            # DICOM world coordinates are LPS.
            out.append((_convert(_as_position(world, path, f"keypoint {n}"), "LPS"), kind))
    return out


def read_vid_detections(path: PathLike, keypoint_type: str = "body") -> tuple[np.ndarray, list[dict]]:
    """Keypoints of one type from a VID prediction file: RAS positions (N, 3) and, per point,
    the raw (unnormalised) `spine_segment_probabilities` as {"C": p, "T": p, "L": p}."""
    positions, probabilities = [], []
    for n, (position, kind) in enumerate(_vid_keypoints(path, keypoint_type), start=1):
        values = kind.get("spine_segment_probabilities")
        if not isinstance(values, list) or len(values) != 3:
            raise _fail(path, f"{keypoint_type} keypoint {n} lacks three 'spine_segment_probabilities'")
        probabilities.append(
            {k: _as_number(p, path, f"a segment probability of {keypoint_type} keypoint {n}", 0.0)
             for k, p in zip(VID_REGION_KEYS, values)}
        )
        positions.append(position)
    return np.array(positions, dtype=float).reshape(-1, 3), probabilities


def read_vid_ground_truth(path: PathLike, keypoint_type: str = "body") -> list[Vertebra]:
    """Labelled keypoints (`spine_level` C1..L6) of a VID ground-truth file, RAS positions.

    Only body keypoints carry a level in this dataset, so other types are refused.
    """
    if keypoint_type != "body":
        raise VertebraIDError(
            f"VID ground truth gives spine levels for body keypoints only, not {keypoint_type!r} keypoints."
        )
    out = []
    for n, (position, kind) in enumerate(_vid_keypoints(path, keypoint_type), start=1):
        label = _check_label(kind.get("spine_level"), path, f"body keypoint {n}")
        out.append(Vertebra(label, position))
    return _check_unique(out, path)


# --------------------------------------------------------------------------- sniffing


def _sniff(path: PathLike):
    """(format name, parsed JSON or CSV text) of a vertebrae file."""
    text = _read_text(path)
    stripped = text.lstrip()
    if not stripped.startswith(("{", "[")):
        if Path(path).suffix.lower() == ".csv" or "," in stripped.split("\n", 1)[0]:
            return "csv", text
        raise _fail(path, "it is neither JSON nor CSV")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _fail(path, f"it is not valid JSON (line {exc.lineno}, column {exc.colno})") from exc
    return _json_format(data, path), data


def sniff_format(path: PathLike) -> str:
    """Which vertebrae format a file holds: 'vertebrae', 'verse', 'markups', 'vid' or 'csv'.

    Raises VertebraIDError when it is none of them.
    """
    return _sniff(path)[0]


def _json_format(data, path: PathLike) -> str:
    if isinstance(data, dict):
        if "vertebrae" in data:
            return "vertebrae"
        if "markups" in data:
            return "markups"
        if "points" in data:
            raise _fail(path, "it holds unlabelled points (the input of label-points), not vertebrae")
    if isinstance(data, list) and data and all(isinstance(d, dict) for d in data):
        if any("direction" in d or "X" in d for d in data):
            return "verse"
        if all("coordinates" in d and "type" in d for d in data):
            if any(isinstance(d["type"], dict) and "spine_level" in d["type"] for d in data):
                return "vid"
            raise _fail(path, "it holds VID keypoint detections without spine levels, not labelled vertebrae")
    raise _fail(path, "it is not a vertebrae, VerSe centroid, Slicer markups or VID ground-truth file")


def read_vertebrae_any(path: PathLike, reference=None) -> list[Vertebra]:
    """Read labelled vertebrae (RAS) from any supported file, recognised by its content.

    `reference` (a Volume) is needed only for VerSe centroid files, which are in voxels.
    """
    kind, content = _sniff(path)
    if kind == "csv":
        return _vertebrae_from_csv(content, path)
    if kind == "verse":
        return read_verse_ctd(path, reference)
    if kind == "vid":
        return read_vid_ground_truth(path)
    if kind == "markups":
        return _vertebrae_from_markups(content, path)
    return _vertebrae_from_dict(content, path)
