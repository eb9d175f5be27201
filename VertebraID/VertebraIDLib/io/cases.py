"""Cases on disk: finding CTs and their annotations, shared by every face of VertebraID.

    found = find_cases(["scans/"])          # every CT under the inputs, named; label images passed over
    case = load_case("scan_ct.nii.gz")      # an image file, a DICOM folder or a case folder
    case.image, case.truth, case.name, case.source
    for case in iter_cases(root): ...       # VerSe layout, or any folder tree of cases

One list of image suffixes (`images.IMAGE_SUFFIXES`), one case naming (`case_name`), one test
for label images (`is_label_image_name`) and one for DICOM series folders (`is_dicom_folder`):
`detect`, `slicer-batch`, `evaluate` and training find the same cases in the same folder.

What is recognised:
- VerSe layout: `rawdata/<sub>/<sub>[_...]_ct.nii.gz` with
  `derivatives/<sub>/<sub>[_...]_seg-subreg_ctd.json` and `..._seg-vert_msk.nii.gz`.
- A generic folder: an image (NIfTI, NRRD, MetaImage, or a DICOM series folder) with, beside
  it and named after it (`<case>_vertebrae.json`, `<case>_seg-subreg_ctd.json`,
  `<case>_ctd.json`, `<case>.mrk.json`, `<case>_seg-vert_msk.nii.gz`), or with the plain names
  of a case folder (`vertebrae_gt.json`, `vertebrae.json`, `seg_vert.nii.gz`,
  `seg_totalseg.nii.gz`...), its vertebrae. A DICOM folder's annotations may sit in its parent.
- Label masks with VerSe ids or TotalSegmentator v2 ids (`totalseg` in the file name, or
  labels above 28): when only a mask is given, the vertebrae are computed from it (below).
- The phantom generator's output (`<case>_ct.nii.gz` etc.) is a generic folder.

Vertebra positions from a label mask (the project's convention is the centre of the
vertebral body, not of the whole vertebra, whose centroid lies ~1 cm further back):
- with a sub-region mask (TPTBox/VerSe style: 49 = body border (cortex), 50 = body interior;
  checked on the TPTBox sample, where 49 and 50 together fill the body and 41-48 are the arch
  and processes), the centroid of each vertebra's 49+50 voxels;
- otherwise the body is estimated as the anterior part of each vertebra mask: the voxels in
  the anterior 42 % of its extent along the anterior direction (perpendicular to the local
  spine axis), whose centroid is the body centre (checked against the phantoms' body masks
  and the TPTBox sub-regions in the tests);
- the sacrum (VerSe 26, or TotalSegmentator's sacrum when it has no S1 label) gives S1 from
  its uppermost 28 mm along the spine axis, anterior part as above;
- a vertebra cut by the image border is kept (marked `partial`) unless it is a sliver: fewer
  voxels than 30 % of the median complete vertebra in the same mask.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from ..engine.anatomy import VERSE_NAMES, LabelSet
from ..engine.vertebrae import Vertebra, sort_by_level
from ..engine.volume import Volume
from ..errors import VertebraIDError
from .files import PathLike
from .formats import read_vertebrae_any, sniff_format
from .images import IMAGE_SUFFIXES, read_image, read_nifti

#: TotalSegmentator v2 class ids of the vertebrae (25 sacrum, 26 S1, 27 L5 ... 50 C1).
TOTALSEG_LEVELS = {26: "S1", 27: "L5", 28: "L4", 29: "L3", 30: "L2", 31: "L1"}
TOTALSEG_LEVELS.update({32 + i: f"T{12 - i}" for i in range(12)})
TOTALSEG_LEVELS.update({44 + i: f"C{7 - i}" for i in range(7)})
TOTALSEG_SACRUM = 25
#: Sub-region ids of the vertebral body (TPTBox: 49 corpus border, 50 corpus).
BODY_SUBREGIONS = (49, 50)
VERSE_SACRUM = 26

#: File names with these words are label images or annotations, not CTs.
_LABEL_WORDS = re.compile(r"(seg|msk|mask|label|subreg|ctd)", re.IGNORECASE)
#: DICOM folders named like this say nothing about the case: theirs is the parent folder's name.
GENERIC_FOLDER_NAMES = {"dicom", "dcm", "ct", "series", "image", "images", "img", "scan", "data"}
ANTERIOR_FRACTION = 0.42
SACRUM_TOP_MM = 28.0
SLIVER_FRACTION = 0.3


@dataclass
class Case:
    """One scan: image (None for mask-only data), vertebrae (None when unannotated)."""

    image: Volume | None
    truth: list[Vertebra] | None
    name: str
    source: str  # where the truth came from: vertebrae_json, verse_ctd, markups, verse_mask, ... or none
    paths: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- masks -> centres


def _scheme_of(path: Path, labels: np.ndarray) -> str:
    if "totalseg" in path.name.lower() or "total" in path.name.lower():
        return "totalseg"
    return "totalseg" if labels.size and labels.max() > 28 else "verse"


def read_label_mask(path: PathLike) -> Volume:
    """A label mask as integers (VerSe masks are sometimes stored as float64)."""
    vol = read_nifti(path, dtype=np.float64) if str(path).lower().endswith((".nii", ".nii.gz")) else read_image(path, np.float64)
    arr = vol.array
    if arr.ndim != 3:
        raise VertebraIDError(f"Cannot read '{path}': a label mask must be 3-D.")
    if not np.isfinite(arr).all() or np.any(np.abs(arr - np.round(arr)) > 1e-3) or arr.min() < 0:
        raise VertebraIDError(f"Cannot read '{path}': it is not a label mask (values must be whole numbers >= 0).")
    return Volume(np.round(arr).astype(np.int32), vol.affine)


def _level_map(labels, scheme: str) -> dict[int, str]:
    out = {}
    for lab in labels:
        lab = int(lab)
        if scheme == "totalseg":
            if lab in TOTALSEG_LEVELS:
                out[lab] = TOTALSEG_LEVELS[lab]
        elif lab in VERSE_NAMES:
            out[lab] = VERSE_NAMES[lab]
    if scheme == "totalseg" and TOTALSEG_SACRUM in labels and "S1" not in out.values():
        out[TOTALSEG_SACRUM] = "S1"
    return out


def centroids_from_mask(mask: Volume, scheme: str = "verse", subregions: Volume | None = None) -> list[Vertebra]:
    """Vertebral-body centres (RAS mm) from a label mask; see the module notes for the method."""
    arr = np.asarray(mask.array)
    present = np.unique(arr[arr > 0])
    names = _level_map(present, scheme)
    if not names:
        return []
    sub = None
    if subregions is not None:
        if subregions.shape3 != mask.shape3 or not np.allclose(subregions.affine, mask.affine, atol=1e-3):
            raise VertebraIDError("The sub-region mask is not on the same grid as the vertebra mask.")
        sub = np.isin(np.asarray(subregions.array), BODY_SUBREGIONS)
    label_ids = np.array(sorted(names), int)
    objects = ndimage.find_objects(np.where(np.isin(arr, label_ids), arr, 0).astype(np.int32))
    voxels = {}
    whole_centre = {}
    border = {}
    for lab in label_ids:
        sl = objects[lab - 1] if lab - 1 < len(objects) else None
        if sl is None:
            continue
        idx = np.argwhere(arr[sl] == lab) + np.array([s.start for s in sl])
        voxels[lab] = idx
        whole_centre[lab] = mask.voxel_to_world(idx.mean(0))
        border[lab] = bool(np.any(idx.min(0) == 0) or np.any(idx.max(0) == np.array(arr.shape) - 1))
    # spine axis per level from the whole-vertebra centroids (cranial to caudal)
    order = sorted(voxels, key=lambda lab: _order_key(names[lab]))
    centres = np.array([whole_centre[lab] for lab in order])
    complete = [len(voxels[lab]) for lab in order if not border[lab] and names[lab] != "S1"]
    typical = float(np.median(complete)) if complete else None
    out = []
    for k, lab in enumerate(order):
        name = names[lab]
        idx = voxels[lab]
        if border[lab] and typical and len(idx) < SLIVER_FRACTION * typical:
            continue
        axis = _local_axis(centres, k)
        pts = mask.voxel_to_world(idx)
        if sub is not None and sub[tuple(idx.T)].sum() >= 10:
            body = pts[sub[tuple(idx.T)]]
            method = "subregion"
        else:
            sacrum = (scheme == "verse" and lab == VERSE_SACRUM) or (scheme == "totalseg" and lab == TOTALSEG_SACRUM)
            if sacrum:
                top = pts @ axis
                pts = pts[top >= top.max() - SACRUM_TOP_MM]
            body = _anterior_part(pts, axis)
            method = "anterior"
        extra = {"method": method, "voxels": int(len(idx))}
        if border[lab]:
            extra["partial"] = True
        out.append(Vertebra(name, body.mean(0), 1.0, extra=extra))
    return sort_by_level(out)


def _order_key(name: str) -> int:
    return LabelSet.standard(transitional=True).levels.index(name)


def _local_axis(centres: np.ndarray, k: int) -> np.ndarray:
    """Unit vector pointing cranially along the spine at level k (superior when alone)."""
    if len(centres) >= 2:
        a = centres[max(k - 1, 0)]
        b = centres[min(k + 1, len(centres) - 1)]
        v = a - b  # order is cranial to caudal
        if np.linalg.norm(v) > 1e-6:
            v = v / np.linalg.norm(v)
            if v[2] < 0:
                v = -v
            return v
    return np.array([0.0, 0.0, 1.0])


def _anterior_part(pts: np.ndarray, axis: np.ndarray) -> np.ndarray:
    anterior = np.array([0.0, 1.0, 0.0]) - axis * axis[1]
    anterior /= max(np.linalg.norm(anterior), 1e-9)
    a = pts @ anterior
    lo, hi = a.min(), a.max()
    keep = a >= hi - ANTERIOR_FRACTION * (hi - lo)
    return pts[keep] if keep.sum() >= 3 else pts


# --------------------------------------------------------------------------- finding files

#: Suffixes of vertebrae files, in order of preference when a case has several.
ANNOTATION_SUFFIXES = (
    ".vertebrae.json",
    ".vertebrae.mrk.json",
    "_seg-subreg_ctd.json",
    "_seg-vert_ctd.json",
    "_ctd.json",
    ".mrk.json",
    ".json",
    ".csv",
)
NOT_ANNOTATION_SUFFIXES = ("_phantom.json",)  # other files that live in case folders (phantom metadata)


def annotation_case_name(path: Path) -> str:
    """The case a vertebrae file belongs to: 'a.vertebrae.json', 'a_ctd.json', 'a.mrk.json' -> 'a'."""
    name = path.name
    lower = name.lower()
    for suffix in ANNOTATION_SUFFIXES:
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def annotation_suffix_rank(path: Path) -> int:
    """Position of the file's suffix in ANNOTATION_SUFFIXES (lower is preferred)."""
    lower = path.name.lower()
    return next((i for i, suffix in enumerate(ANNOTATION_SUFFIXES) if lower.endswith(suffix)), len(ANNOTATION_SUFFIXES))


def annotation_files_by_case(folder: Path) -> dict[str, Path]:
    """One file per case; where a case has several (a phantom's vertebrae JSON and VerSe file),
    the earlier suffix of ANNOTATION_SUFFIXES wins."""
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        lower = path.name.lower()
        if not path.is_file() or path.name.startswith(".") or not lower.endswith((".json", ".csv")):
            continue
        if lower.endswith(NOT_ANNOTATION_SUFFIXES):
            continue
        name = annotation_case_name(path)
        if name in files:
            if annotation_suffix_rank(path) == annotation_suffix_rank(files[name]):
                raise VertebraIDError(
                    f"Two files in '{folder}' belong to case '{name}': {files[name].name} and {path.name}."
                )
            if annotation_suffix_rank(path) > annotation_suffix_rank(files[name]):
                continue
        files[name] = path
    return files


def strip_image_suffix(name: str) -> str:
    """'a_ct.nii.gz' -> 'a_ct' (image suffixes and .json)."""
    low = name.lower()
    for suffix in IMAGE_SUFFIXES + (".json",):
        if low.endswith(suffix):
            return name[: -len(suffix)]
    return name


def case_stem(image_path: Path) -> str:
    """'sub-verse004_ct.nii.gz' -> 'sub-verse004'; 'ct.nii.gz' -> '' (a case folder)."""
    stem = strip_image_suffix(image_path.name)
    if stem.lower() in ("ct", "image", "img"):
        return ""
    return re.sub(r"[_-](ct|image|img)$", "", stem, flags=re.IGNORECASE)


def case_name(path: Path) -> str:
    """A CT's case name: 'sub-verse004_ct.nii.gz' -> 'sub-verse004'; 'chest/ct.nii.gz' and a DICOM
    folder named 'dicom' (or a number) -> 'chest', their parent folder's name."""
    path = Path(path)
    if path.is_dir():
        generic = path.name.lower() in GENERIC_FOLDER_NAMES or path.name.isdigit()
        parent = path.resolve().parent.name
        return parent if generic and parent else path.name
    return case_stem(path) or path.resolve().parent.name


def is_label_image_name(path: Path) -> bool:
    """Whether a file's name says it is a label image or annotation (seg, mask, label, ctd...)."""
    return bool(_LABEL_WORDS.search(strip_image_suffix(Path(path).name)))


def is_dicom_folder(path: Path) -> bool:
    """A folder holding DICOM files (the DICM magic, or .dcm names) directly."""
    if not path.is_dir():
        return False
    for f in sorted(path.iterdir())[:50]:
        if f.is_file():
            try:
                with open(f, "rb") as fh:
                    head = fh.read(132)
            except OSError:
                continue
            if head[128:132] == b"DICM" or f.suffix.lower() == ".dcm":
                return True
    return False


def is_image_file(path: Path) -> bool:
    """An image file (by suffix) whose name does not say it is a label image."""
    low = path.name.lower()
    return path.is_file() and low.endswith(IMAGE_SUFFIXES) and not is_label_image_name(path)


@dataclass
class FoundCases:
    """CTs under some inputs, each with a unique case name, and the label images passed over."""

    cases: list[tuple[str, Path]]
    passed_over: list[Path]


def find_cases(paths) -> FoundCases:
    """Every CT under the inputs (files, DICOM series folders, folders searched recursively).

    An input file is taken as given; inside folders, image files whose names say they are
    label images are passed over. Names come from `case_name`; a name met twice gets '-2'...
    """
    found: list[Path] = []
    passed_over: list[Path] = []

    def walk(p: Path, top: bool):
        if p.is_file():
            if top or is_image_file(p):
                found.append(p)
            elif p.name.lower().endswith(IMAGE_SUFFIXES):
                passed_over.append(p)
            return
        if is_dicom_folder(p):
            found.append(p)
            return
        for child in sorted(p.iterdir()):
            if not child.name.startswith("."):
                walk(child, False)

    for raw in paths:
        p = Path(raw)
        if not p.exists():
            raise VertebraIDError(f"Cannot read '{p}': no such file or folder.")
        before = len(found)
        walk(p, True)
        if len(found) == before:
            raise VertebraIDError(f"Found no CT (NIfTI, NRRD, MetaImage or DICOM series) in '{p}'.")
    cases, seen = [], {}
    for p in dict.fromkeys(found):
        name = case_name(p)
        seen[name] = seen.get(name, 0) + 1
        cases.append((name if seen[name] == 1 else f"{name}-{seen[name]}", p))
    return FoundCases(cases, passed_over)


def _annotation_files(folder: Path, stem: str) -> dict:
    """Point files and masks beside an image, by kind (first existing match wins)."""
    def first(names):
        for n in names:
            p = folder / n
            if p.is_file():
                return p
        return None

    pre = f"{stem}_" if stem else ""
    found = {
        "points": first(
            [f"{pre}vertebrae.json", f"{stem}.vertebrae.json" if stem else "", "vertebrae_gt.json", "vertebrae.json",
             f"{pre}vertebrae.mrk.json", f"{stem}.mrk.json" if stem else "", f"{pre}seg-subreg_ctd.json",
             f"{pre}seg-vert_ctd.json", f"{pre}ctd.json"]
        ),
        "mask": first([f"{pre}seg-vert_msk.nii.gz", f"{pre}seg-vert_msk.nii", "seg_vert.nii.gz", "seg-vert_msk.nii.gz",
                       f"{pre}seg_totalseg.nii.gz", "seg_totalseg.nii.gz", f"{pre}seg.nii.gz"]),
        "subregions": first([f"{pre}seg-subreg_msk.nii.gz", "seg_subreg.nii.gz", "seg-subreg_msk.nii.gz"]),
    }
    if found["points"] is None and stem:
        # VerSe variants such as sub-verse004_dir-ax_seg-subreg_ctd.json
        matches = sorted(folder.glob(f"{stem}*_ctd.json"))
        if len(matches) == 1:
            found["points"] = matches[0]
    return {k: v for k, v in found.items() if v is not None}


def _read_points(path: Path, reference: Volume | None) -> tuple[list[Vertebra], str]:
    kind = sniff_format(path)
    sources = {"verse": "verse_ctd", "markups": "markups", "vertebrae": "vertebrae_json", "csv": "csv", "vid": "vid_json"}
    return read_vertebrae_any(path, reference=reference), sources.get(kind, kind)


def _truth(ann: dict, image: Volume | None) -> tuple[list[Vertebra] | None, str, Volume | None]:
    """Vertebrae from the annotations found: points first, else the mask."""
    mask_vol = None
    if "mask" in ann:
        mask_vol = read_label_mask(ann["mask"])
    if "points" in ann:
        reference = image if image is not None else mask_vol
        verts, kind = _read_points(ann["points"], reference)
        return verts, kind, mask_vol
    if mask_vol is not None:
        scheme = _scheme_of(ann["mask"], mask_vol.array)
        sub = read_label_mask(ann["subregions"]) if "subregions" in ann else None
        verts = centroids_from_mask(mask_vol, scheme, sub)
        source = f"{scheme}_mask" + ("+subregions" if sub is not None else "")
        return verts, source, mask_vol
    return None, "none", None


def _dicom_series_folders(folder: Path) -> list[Path]:
    subs = [p for p in sorted(folder.iterdir()) if p.is_dir() and is_dicom_folder(p)]
    return subs


def load_case(path: PathLike, name: str | None = None) -> Case:
    """Load an image file, a DICOM folder, or a case folder, with the vertebrae beside it."""
    path = Path(path)
    if not path.exists():
        raise VertebraIDError(f"Cannot read '{path}': no such file or folder.")
    if path.is_file():
        if not path.name.lower().endswith(IMAGE_SUFFIXES):
            raise VertebraIDError(
                f"Cannot read '{path}': not an image (NIfTI, NRRD, MetaImage) or a DICOM folder."
            )
        if is_label_image_name(path):
            return _mask_only_case(path.parent, name or case_stem(path) or path.parent.name, mask=path)
        return _image_case(path, path.parent, case_stem(path), name)
    # a folder
    if is_dicom_folder(path):
        stem = path.name if path.name.lower() not in ("dicom", "dcm", "images") else ""
        case = _image_case(path, path, "", name or (path.name if stem else path.parent.name))
        if case.truth is None and path.parent != path:
            ann = _annotation_files(path.parent, "")
            if ann:
                case.truth, case.source, _ = _truth(ann, case.image)
                case.paths.update(ann)
        return case
    images = sorted(p for p in path.iterdir() if is_image_file(p))
    if len(images) == 1:
        return _image_case(images[0], path, case_stem(images[0]), name or case_stem(images[0]) or path.name)
    if len(images) > 1:
        raise VertebraIDError(
            f"'{path}' holds {len(images)} images; give one of them (or use iter_cases for the folder)."
        )
    for sub in ("dicom", "DICOM", "dcm", "images"):
        if (path / sub).is_dir() and is_dicom_folder(path / sub):
            case = _image_case(path / sub, path / sub, "", name or path.name)
            if case.truth is None:
                ann = _annotation_files(path, "")
                if ann:
                    case.truth, case.source, _ = _truth(ann, case.image)
                    case.paths.update(ann)
            return case
    series = _dicom_series_folders(path)
    if series:
        # several series (e.g. reformats in different planes): the one with most slices
        best = max(series, key=lambda p: sum(1 for f in p.iterdir() if f.is_file()))
        case = load_case(best, name=name or path.name)
        case.extra["other_series"] = [str(s) for s in series if s != best]
        return case
    ann = _annotation_files(path, "")
    if not ann:
        ann = _mask_files_any(path)
    if ann:
        return _mask_only_case(path, name or path.name, ann=ann)
    raise VertebraIDError(f"Found no image, DICOM series or annotations in '{path}'.")


def _mask_files_any(folder: Path) -> dict:
    """Mask-only folders whose files carry a subject prefix (sub-verse004_seg-vert_msk.nii.gz)."""
    masks = sorted(folder.glob("*seg-vert_msk.nii*")) + sorted(folder.glob("*_msk.nii*"))
    if not masks:
        return {}
    stem = masks[0].name.split("_seg-vert_msk")[0].split("_msk")[0]
    ann = _annotation_files(folder, stem)
    ann.setdefault("mask", masks[0])
    return ann


def _mask_only_case(folder: Path, name: str, mask: Path | None = None, ann: dict | None = None) -> Case:
    ann = dict(ann or {})
    if mask is not None:
        ann["mask"] = mask
        stem = mask.name.split("_seg")[0] if "_seg" in mask.name else ""
        for k, v in _annotation_files(folder, stem).items():
            ann.setdefault(k, v)
        if ann.get("mask") != mask:
            ann["mask"] = mask
    truth, source, _ = _truth(ann, None)
    return Case(None, truth, name, source, paths={k: Path(v) for k, v in ann.items()})


def _image_case(image_path: Path, folder: Path, stem: str, name: str | None) -> Case:
    image = read_image(image_path)
    ann = _annotation_files(folder, stem)
    if image_path.is_dir() and not ann:
        ann = {}
    truth, source, _ = _truth(ann, image) if ann else (None, "none", None)
    paths = {"image": image_path, **ann}
    return Case(image, truth, name or stem or folder.name, source, paths=paths)


# --------------------------------------------------------------------------- iterating


def _verse_cases(root: Path):
    raw, deriv = root / "rawdata", root / "derivatives"
    for ct in sorted(raw.rglob("*_ct.nii*")):
        stem = case_stem(ct)
        subject = ct.parent.name
        folder = deriv / subject if (deriv / subject).is_dir() else deriv
        ann = _annotation_files(folder, stem)
        if "points" not in ann:
            matches = sorted(folder.glob(f"{subject}*_ctd.json"))
            if len(matches) == 1:
                ann["points"] = matches[0]
        if "mask" not in ann:
            matches = sorted(folder.glob(f"{subject}*_seg-vert_msk.nii*"))
            if len(matches) == 1:
                ann["mask"] = matches[0]
        image = read_image(ct)
        truth, source, _ = _truth(ann, image) if ann else (None, "none", None)
        yield Case(image, truth, stem, source, paths={"image": ct, **ann})


def iter_cases(root: PathLike):
    """Every case under `root` (a VerSe dataset, a folder of case folders, or one case)."""
    root = Path(root)
    if not root.exists():
        raise VertebraIDError(f"Cannot read '{root}': no such file or folder.")
    if root.is_file():
        yield load_case(root)
        return
    if (root / "rawdata").is_dir():
        yield from _verse_cases(root)
        return
    images = sorted(p for p in root.iterdir() if is_image_file(p))
    if images:
        for img in images:
            yield _image_case(img, root, case_stem(img), case_stem(img) or root.name)
        return
    if is_dicom_folder(root) or any((root / s).is_dir() and is_dicom_folder(root / s) for s in ("dicom", "DICOM")):
        yield load_case(root)
        return
    series = _dicom_series_folders(root)
    if series and not any(p.is_dir() and not is_dicom_folder(p) for p in root.iterdir()):
        for s in series:
            yield load_case(s, name=f"{root.name}/{s.name}")
        return
    if _annotation_files(root, "") or _mask_files_any(root):
        yield load_case(root)
        return
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        yield from iter_cases(sub)
