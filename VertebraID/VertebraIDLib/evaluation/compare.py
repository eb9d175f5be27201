"""Labelled vertebrae against ground truth, file by file or folder by folder (`vertebraid evaluate`).

Folders are paired by case name: a file's name up to the first of ".vertebrae.json",
"_seg-subreg_ctd.json", "_seg-vert_ctd.json", "_ctd.json", ".mrk.json", ".json", ".csv"
(`io.cases.annotation_case_name`). Any format `read_vertebrae_any` knows is accepted
(vertebrae JSON, markups, CSV, VID ground truth). VerSe centroid files hold voxel coordinates,
so they are read only with a reference: the image file (single files) or a folder of images
named by case (`<case>.nii.gz`, `<case>_ct.nii.gz`, NRRD, ...).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..engine.volume import Volume
from ..errors import VertebraIDError
from ..io.cases import annotation_case_name, annotation_files_by_case, case_name
from ..io.formats import read_vertebrae_any, sniff_format
from ..io.images import IMAGE_SUFFIXES, read_geometry
from .metrics import (
    DEFAULT_MAX_DIST_MM,
    CaseEvaluation,
    Summary,
    evaluate_case,
    summarize,
)


@dataclass
class Comparison:
    """Every ground-truth case scored, and the files that had no partner."""

    summary: Summary
    cases: list[CaseEvaluation]
    cases_without_prediction: list[str] = field(default_factory=list)
    predictions_without_ground_truth: list[str] = field(default_factory=list)


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
        return [(annotation_case_name(gt), pred, gt)], []
    pred_files, gt_files = annotation_files_by_case(pred), annotation_files_by_case(gt)
    if not gt_files:
        raise VertebraIDError(f"The ground-truth folder '{gt}' holds no .json or .csv file.")
    if not set(pred_files) & set(gt_files):
        raise VertebraIDError(
            f"No prediction in '{pred}' pairs with a ground-truth file in '{gt}' by case name "
            f"(e.g. ground-truth case '{next(iter(gt_files))}')."
        )
    pairs = [(case, pred_files.get(case), path) for case, path in gt_files.items()]
    return pairs, sorted(set(pred_files) - set(gt_files))


def compare(pred: Path, gt: Path, metric: str = "spineweb", max_dist_mm: float = DEFAULT_MAX_DIST_MM,
            reference: Path | None = None) -> Comparison:
    """Score predictions (a file or a folder) against ground truth (the same); a ground-truth case
    without prediction identifies nothing."""
    pred, gt = Path(pred), Path(gt)
    pairs, unmatched_pred = _pairs(pred, gt)
    references = None
    if reference is not None:
        reference = Path(reference)
        if not reference.exists():
            raise VertebraIDError(f"The reference path '{reference}' does not exist.")
        if gt.is_dir():
            if not reference.is_dir():
                raise VertebraIDError("With folders of files, --reference must be a folder of images named by case.")
            references = {}
            for path in sorted(reference.iterdir()):
                if path.name.lower().endswith(IMAGE_SUFFIXES):
                    references.setdefault(case_name(path), path)
    cases, missing_pred = [], []
    for case, pred_path, gt_path in pairs:
        gt_vertebrae = _read(gt_path, case, reference, references)
        if pred_path is None:
            missing_pred.append(case)
            pred_vertebrae = []  # a scan without prediction identifies nothing
        else:
            pred_vertebrae = _read(pred_path, case, reference, references)
        cases.append(evaluate_case(pred_vertebrae, gt_vertebrae, metric, max_dist_mm, name=case))
    return Comparison(summarize(cases), cases, missing_pred, unmatched_pred)
