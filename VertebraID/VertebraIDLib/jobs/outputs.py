"""The files of one result: vertebrae JSON, Slicer markups, VerSe centroids and the QC picture.

Every file is written atomically; the vertebrae JSON, written last, marks a case as done.
"""
from __future__ import annotations

from pathlib import Path

from ..engine.pipeline import Result
from ..engine.volume import Volume
from ..evaluation.qc import result_figure, save_figure
from ..io.formats import write_markups_json, write_verse_ctd, write_vertebrae_json


def result_fields(result: Result) -> dict:
    """What a vertebrae JSON says about how its labels were found."""
    return {
        "method": result.method,
        "energy": None if result.energy != result.energy else round(float(result.energy), 4),
        "spine_found": result.centerline is not None,
    }


def write_result_files(result: Result, vertebrae_path: Path, *, markups: Path | None = None, ctd: Path | None = None,
                       ctd_reference: Volume | None = None, picture: Path | None = None, ct: Volume | None = None,
                       title: str | None = None, **extra) -> None:
    """Write the result's outputs that are asked for; the vertebrae JSON (with `extra` fields) last."""
    if markups is not None:
        write_markups_json(markups, result.vertebrae)
    if ctd is not None:
        write_verse_ctd(ctd, result.vertebrae, ctd_reference)
    if picture is not None:
        save_figure(result_figure(result, ct, title=title), picture)
    write_vertebrae_json(vertebrae_path, result.vertebrae, "RAS", **{**result_fields(result), **extra})
