"""`vertebraid evaluate`: identification rate and localisation error against ground truth.

--pred and --gt are each a file or a folder. Folders are paired by case name: a file's name
up to the first of ".vertebrae.json", "_seg-subreg_ctd.json", "_seg-vert_ctd.json",
"_ctd.json", ".mrk.json", ".json", ".csv". Any format `read_vertebrae_any` knows is accepted
(vertebrae JSON, markups, CSV, VID ground truth). VerSe centroid files hold voxel
coordinates, so they are read only with --reference: the image file (single files) or a
folder of images named by case (`<case>.nii.gz`, `<case>_ct.nii.gz`, NRRD, ...).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from ..errors import VertebraIDError
from ..formats import read_vertebrae_any, sniff_format
from ..metrics import DEFAULT_MAX_DIST_MM, METRICS, evaluate_case, format_table, summarize
from ..volume import Volume, read_image

CASE_SUFFIXES = (  # in order of preference when a case has several files
    ".vertebrae.json",
    ".vertebrae.mrk.json",
    "_seg-subreg_ctd.json",
    "_seg-vert_ctd.json",
    "_ctd.json",
    ".mrk.json",
    ".json",
    ".csv",
)
NOT_VERTEBRAE_SUFFIXES = ("_phantom.json",)  # other files that live in case folders (phantom metadata)
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
IMAGE_CASE_TAILS = ("_ct",)  # VerSe names its images <case>_ct.nii.gz


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="identification rate and localisation error of labelled vertebrae against ground truth",
        description=(
            "Compare labelled vertebrae with ground truth and print the identification rate and "
            "localisation error per region (C, T, L, S) and overall, and the share of scans with "
            "every vertebra identified. --pred and --gt are files or folders (paired by case name)."
        ),
    )
    parser.add_argument("--pred", required=True, help="predicted vertebrae: a file or a folder of files")
    parser.add_argument("--gt", required=True, help="ground truth: a file or a folder of files")
    parser.add_argument(
        "--metric",
        choices=METRICS,
        default="spineweb",
        help="spineweb: same label within the distance and mutually closest (default); "
        "verse: same label within the distance and the prediction's nearest ground truth",
    )
    parser.add_argument(
        "--max-dist", type=float, default=DEFAULT_MAX_DIST_MM, metavar="MM",
        help=f"largest distance (mm) for an identification (default {DEFAULT_MAX_DIST_MM:g})",
    )
    parser.add_argument(
        "--reference", "--reference-dir", dest="reference", default=None,
        help="image placing VerSe centroid files (voxel coordinates) in the world: an image file, "
        "or a folder of images named by case",
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON (with every case)")
    parser.add_argument("--per-case", action="store_true", help="also print one line per case")
    parser.set_defaults(func=run)


def case_name(path: Path) -> str:
    name = path.name
    lower = name.lower()
    for suffix in CASE_SUFFIXES:
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _suffix_rank(path: Path) -> int:
    lower = path.name.lower()
    return next((i for i, suffix in enumerate(CASE_SUFFIXES) if lower.endswith(suffix)), len(CASE_SUFFIXES))


def _case_files(folder: Path) -> dict[str, Path]:
    """One file per case; where a case has several (a phantom's vertebrae JSON and VerSe file),
    the earlier suffix of CASE_SUFFIXES wins."""
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        lower = path.name.lower()
        if not path.is_file() or path.name.startswith(".") or not lower.endswith((".json", ".csv")):
            continue
        if lower.endswith(NOT_VERTEBRAE_SUFFIXES):
            continue
        name = case_name(path)
        if name in files:
            if _suffix_rank(path) == _suffix_rank(files[name]):
                raise VertebraIDError(
                    f"Two files in '{folder}' belong to case '{name}': {files[name].name} and {path.name}."
                )
            if _suffix_rank(path) > _suffix_rank(files[name]):
                continue
        files[name] = path
    return files


def _image_case_name(path: Path) -> str | None:
    lower = path.name.lower()
    for suffix in IMAGE_SUFFIXES:
        if lower.endswith(suffix):
            name = path.name[: -len(suffix)]
            for tail in IMAGE_CASE_TAILS:
                if name.endswith(tail):
                    name = name[: -len(tail)]
            return name
    return None


def read_geometry(path: Path) -> Volume:
    """The grid of an image without its voxels (a zero-strided array of the right shape)."""
    if path.is_file():
        lower = path.name.lower()
        try:
            if lower.endswith((".nii", ".nii.gz")):
                import nibabel as nib

                header_image = nib.load(str(path))
                if len(header_image.shape) >= 3:
                    return Volume(np.broadcast_to(np.float32(0), header_image.shape[:3]), header_image.affine)
            elif lower.endswith((".nrrd", ".nhdr", ".mha", ".mhd")):
                import SimpleITK as sitk

                from ..volume import LPS_TO_RAS

                reader = sitk.ImageFileReader()
                reader.SetFileName(str(path))
                reader.ReadImageInformation()
                if reader.GetDimension() == 3:
                    lps = np.eye(4)
                    lps[:3, :3] = np.array(reader.GetDirection()).reshape(3, 3) * np.array(reader.GetSpacing())
                    lps[:3, 3] = reader.GetOrigin()
                    return Volume(np.broadcast_to(np.float32(0), tuple(reader.GetSize())), LPS_TO_RAS @ lps)
        except Exception as exc:  # header readers raise many types for corrupt files
            raise VertebraIDError(f"'{path}' is not a readable image ({type(exc).__name__}).") from exc
    return read_image(path)  # DICOM folders and anything unusual: the full reader judges


def _reference_for(case: str, reference: Path | None, references: dict[str, Path] | None) -> Volume | None:
    if references is not None:
        path = references.get(case)
        return read_geometry(path) if path else None
    return read_geometry(reference) if reference is not None else None


def _read(path: Path, case: str, reference: Path | None, references: dict[str, Path] | None):
    if sniff_format(path) == "verse":
        volume = _reference_for(case, reference, references)
        if volume is None:
            raise VertebraIDError(
                f"'{path}' holds VerSe centroids in voxel coordinates; give the image of case '{case}' "
                "with --reference (a file, or a folder of images named by case)."
            )
        return read_vertebrae_any(path, volume)
    return read_vertebrae_any(path)


def _pairs(pred: Path, gt: Path) -> tuple[list[tuple[str, Path | None, Path]], list[str]]:
    """(case, prediction file or None, GT file) for every GT case, and prediction-only cases."""
    for path, what in ((pred, "prediction"), (gt, "ground-truth")):
        if not path.exists():
            raise VertebraIDError(f"The {what} path '{path}' does not exist.")
    if pred.is_dir() != gt.is_dir():
        raise VertebraIDError("--pred and --gt must both be files or both be folders.")
    if not gt.is_dir():
        return [(case_name(gt), pred, gt)], []
    pred_files, gt_files = _case_files(pred), _case_files(gt)
    if not gt_files:
        raise VertebraIDError(f"The ground-truth folder '{gt}' holds no .json or .csv file.")
    if not set(pred_files) & set(gt_files):
        raise VertebraIDError(
            f"No prediction in '{pred}' pairs with a ground-truth file in '{gt}' by case name "
            f"(e.g. ground-truth case '{next(iter(gt_files))}')."
        )
    pairs = [(case, pred_files.get(case), path) for case, path in gt_files.items()]
    return pairs, sorted(set(pred_files) - set(gt_files))


def run(args: argparse.Namespace) -> int:
    pred, gt = Path(args.pred), Path(args.gt)
    pairs, unmatched_pred = _pairs(pred, gt)
    reference = Path(args.reference) if args.reference else None
    references = None
    if reference is not None:
        if not reference.exists():
            raise VertebraIDError(f"The reference path '{reference}' does not exist.")
        if gt.is_dir():
            if not reference.is_dir():
                raise VertebraIDError("With folders of files, --reference must be a folder of images named by case.")
            references = {}
            for path in sorted(reference.iterdir()):
                name = _image_case_name(path)
                if name is not None:
                    references.setdefault(name, path)

    cases = []
    missing_pred = []
    for case, pred_path, gt_path in pairs:
        gt_vertebrae = _read(gt_path, case, reference, references)
        if pred_path is None:
            missing_pred.append(case)
            pred_vertebrae = []  # a scan without prediction identifies nothing
        else:
            pred_vertebrae = _read(pred_path, case, reference, references)
        cases.append(evaluate_case(pred_vertebrae, gt_vertebrae, args.metric, args.max_dist, name=case))
    summary = summarize(cases)

    notes = []
    if missing_pred:
        notes.append(f"{len(missing_pred)} ground-truth case(s) without prediction, counted as unidentified: "
                     + ", ".join(missing_pred))
    if unmatched_pred:
        notes.append(f"{len(unmatched_pred)} prediction(s) without ground truth, ignored: " + ", ".join(unmatched_pred))

    if args.json:
        out = summary.to_dict()
        out["cases_without_prediction"] = missing_pred
        out["predictions_without_ground_truth"] = unmatched_pred
        print(json.dumps(out, indent=2))
        return 0
    print(format_table(summary))
    if args.per_case:
        print()
        width = max(len(c.name) for c in cases)
        for c in cases:
            missed = [o.label for o in c.outcomes if not o.identified]
            print(
                f"{c.name.ljust(width)}  {c.num_identified}/{c.num_gt} identified"
                + (f"; missed {', '.join(missed)}" if missed else "")
                + (f"; extra {', '.join(c.extra_labels)}" if c.extra_labels else "")
            )
    for note in notes:
        print(f"note: {note}")
    return 0
