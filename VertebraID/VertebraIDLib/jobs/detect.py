"""`vertebraid detect` as a library call: CT files -> the model -> result files in a folder.

For each case, into the output folder:
  <case>.vertebrae.json   the engine's result (RAS mm), written last: it marks the case done
  <case>.mrk.json         Slicer markups point list
  <case>_ctd.json         VerSe centroids (voxel coordinates of the input CT)
  <case>_qc.png           Ĝ with centreline and labels, straightened spine, 1-D signals
  <case>_heatmaps.nii.gz  the 26 maps as scaled uint8 (when asked)
Cases whose .vertebrae.json exists are skipped unless `overwrite`. With several inputs a
failing case is reported and the others go on.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..engine.corrections import Constraint
from ..engine.settings import EngineSettings
from ..engine.vertebrae import CHECK_BELOW_CONFIDENCE
from ..errors import VertebraIDError
from ..io.cases import find_cases
from ..io.formats import read_vertebrae_any
from ..io.images import read_image, write_scaled_uint8_nifti
from ..networks.bundle import Model
from ..networks.predict import detect
from .outputs import write_result_files


def output_paths(out_dir: Path, case: str) -> dict[str, Path]:
    """Where the files of one case go."""
    return {
        "vertebrae": out_dir / f"{case}.vertebrae.json",
        "markups": out_dir / f"{case}.mrk.json",
        "ctd": out_dir / f"{case}_ctd.json",
        "picture": out_dir / f"{case}_qc.png",
        "heatmaps": out_dir / f"{case}_heatmaps.nii.gz",
    }


def read_fixed_points(path: Path, ct) -> list[Constraint]:
    """The user's corrections as constraints: every labelled point of the file, in RAS."""
    points = read_vertebrae_any(path, reference=ct)
    if not points:
        raise VertebraIDError(f"The fixed points file '{path}' holds no labelled point.")
    return [Constraint(v.label, v.position) for v in points]


@dataclass
class DetectOptions:
    """What a detect job writes and how (the engine's own settings come separately)."""

    device: str = "auto"
    fixed: Path | None = None  # one case only: the user's corrections, kept as they are
    overwrite: bool = False
    picture: bool = True
    save_heatmaps: bool = False


@dataclass
class DetectReport:
    """How a detect job went: one line per case done, and the cases that failed or were skipped."""

    lines: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (case, the error's sentence)
    skipped: int = 0


def detect_case(ct_path: Path, case: str, model: Model, settings: EngineSettings, options: DetectOptions,
                out_dir: Path) -> str:
    """One CT: read, detect, write its files; returns the summary line."""
    paths = output_paths(out_dir, case)
    t0 = time.perf_counter()
    ct = read_image(ct_path)
    constraints = read_fixed_points(options.fixed, ct) if options.fixed else []
    read_s = time.perf_counter() - t0
    result = detect(ct, model, settings, constraints, device=options.device)
    out_dir.mkdir(parents=True, exist_ok=True)  # only now: a case that fails early leaves no folder
    if options.save_heatmaps:
        write_scaled_uint8_nifti(result.prepared.heatmaps, paths["heatmaps"])
    t0 = time.perf_counter()
    write_result_files(
        result, paths["vertebrae"], markups=paths["markups"], ctd=paths["ctd"], ctd_reference=ct,
        picture=paths["picture"] if options.picture else None, ct=ct, title=case,
        case=case, image=str(ct_path), model=str(model.path.name if model.path else ""),
        model_sha256=model.metadata.get("weights_sha256"),
        **({"fixed_points": str(options.fixed)} if options.fixed else {}),
        **({"level_labeller": model.metadata["level_labeller"]["weights_file"]} if model.labeller is not None else {}),
        timings_s={k: round(v, 3) for k, v in {"read": read_s, **result.timings_s,
                                                "outputs": time.perf_counter() - t0}.items()},
    )
    labels = " ".join(v.label for v in result.vertebrae) or "none (no spine found)"
    count = len(result.vertebrae)
    fixed = f", {len(constraints)} kept as fixed" if constraints else ""
    to_check = [v.label for v in result.vertebrae if v.needs_check]
    why = sorted({v.flag_reason for v in result.vertebrae} - {""})
    check = (f"; check {' '.join(to_check)} (confidence < {CHECK_BELOW_CONFIDENCE:g}{': ' if why else ''}{'; '.join(why)})"
             if to_check else "")
    return f"{case}: {count} {'vertebra' if count == 1 else 'vertebrae'} ({labels}){fixed}{check}"


def _check_fixed_run(options: DetectOptions, settings: EngineSettings, cases, out_dir: Path) -> None:
    """A fixed-points run re-labels one case: refuse what would skip it or write over the user's file."""
    fixed = Path(options.fixed)
    if not fixed.is_file():
        raise VertebraIDError(f"Cannot read the fixed points file '{fixed}': no such file.")
    if len(cases) != 1:
        raise VertebraIDError(f"--fixed holds the corrections of one case; give one CT, not {len(cases)}.")
    if settings.method != "exact":
        raise VertebraIDError("Fixed points need the exact method (--method exact).")
    paths = output_paths(out_dir, cases[0][0])
    if any(p.resolve() == fixed.resolve() for p in paths.values() if p.exists()):
        raise VertebraIDError(f"The results would overwrite the fixed points file '{fixed}'; "
                              "write them to another folder (-o).")
    if paths["vertebrae"].exists() and not options.overwrite:
        raise VertebraIDError(f"'{paths['vertebrae']}' exists; add --overwrite or choose another -o to re-label.")


def detect_files(inputs, out_dir: Path, model: Model, settings: EngineSettings = EngineSettings(),
                 options: DetectOptions = DetectOptions(), log: Callable[[str], None] = print) -> DetectReport:
    """Every CT under `inputs` (files, DICOM folders, folders of them) -> its files in `out_dir`.

    A single case's error is raised (one sentence); with several, failures are reported and the
    others go on.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise VertebraIDError(f"The output '{out_dir}' is a file; give a folder.")
    cases = find_cases(inputs).cases
    if options.fixed:
        _check_fixed_run(options, settings, cases, out_dir)
    report = DetectReport()
    todo = [(n, p) for n, p in cases if options.overwrite or not output_paths(out_dir, n)["vertebrae"].exists()]
    report.skipped = len(cases) - len(todo)
    if report.skipped:
        log(f"skipping {report.skipped} case(s) already done in {out_dir}")
    for name, path in todo:
        t0 = time.perf_counter()
        try:
            line = detect_case(path, name, model, settings, options, out_dir)
        except VertebraIDError as exc:
            if len(cases) == 1:
                raise
            report.failed.append((name, str(exc)))
            continue
        report.lines.append(f"{line} [{time.perf_counter() - t0:.1f} s]")
        log(report.lines[-1])
    return report
