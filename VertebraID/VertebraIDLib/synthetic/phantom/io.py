"""Writing a phantom case: CT NIfTI (int16 HU), VerSe label mask, VerSe centroid JSON, the
project's vertebrae JSON and the generation record; every file is written atomically."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np

from ...errors import VertebraIDError
from ...io.files import write_json_atomic
from ...io.formats import write_verse_ctd, write_vertebrae_json
from ...io.images import write_nifti

_CASE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def case_paths(out_dir: str | os.PathLike, case_id: str) -> dict[str, Path]:
    """Where the files of a case go (VerSe-like names: `<case>_ct.nii.gz`, `<case>_seg-vert_msk.nii.gz`...)."""
    if not isinstance(case_id, str) or not _CASE_ID.match(case_id) or case_id.endswith("."):
        raise VertebraIDError(
            f"Case id {case_id!r} is not usable as a file name; use letters, digits, '-', '_' or '.'."
        )
    out = Path(out_dir)
    return {
        "ct": out / f"{case_id}_ct.nii.gz",
        "mask": out / f"{case_id}_seg-vert_msk.nii.gz",
        "verse_ctd": out / f"{case_id}_seg-subreg_ctd.json",
        "vertebrae": out / f"{case_id}.vertebrae.json",
        "meta": out / f"{case_id}_phantom.json",
        "body_mask": out / f"{case_id}_seg-body_msk.nii.gz",
    }


def write_phantom(phantom, out_dir: str | os.PathLike, case_id: str) -> dict[str, Path]:
    """Write one case into `out_dir`; returns the paths written."""

    paths = case_paths(out_dir, case_id)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise VertebraIDError(f"Cannot write into '{out}': it is a file, not a folder.")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise VertebraIDError(f"Cannot create the folder '{out}' ({exc.strerror or exc}).") from exc
    written = {}
    try:
        write_nifti(phantom.ct, paths["ct"], dtype=np.int16)
        written["ct"] = paths["ct"]
        write_nifti(phantom.mask, paths["mask"], dtype=np.uint8)
        written["mask"] = paths["mask"]
        if phantom.body_mask is not None:
            write_nifti(phantom.body_mask, paths["body_mask"], dtype=np.uint8)
            written["body_mask"] = paths["body_mask"]
        write_verse_ctd(paths["verse_ctd"], phantom.truth, phantom.ct)
        written["verse_ctd"] = paths["verse_ctd"]
        write_vertebrae_json(paths["vertebrae"], phantom.truth, "RAS", source="phantom", case=case_id)
        written["vertebrae"] = paths["vertebrae"]
        write_json_atomic(paths["meta"], json.loads(json.dumps(phantom.meta, default=_jsonable)))
        written["meta"] = paths["meta"]
    except OSError as exc:
        raise VertebraIDError(f"Cannot write case '{case_id}' into '{out}' ({exc.strerror or exc}).") from exc
    return written


def _jsonable(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)
