"""The Slicer module's Logic over a folder of CTs, each case in a fresh MRML scene.

Runs in PyPI's slicer-core and in 3D Slicer alike (`vertebraid slicer-batch`). Per case it
leaves <case>.vertebrae.mrk.json (the labelled points), <case>.centerline.mrk.json (the
centreline curve), both written by Slicer's markups storage node, and <case>.mrb (the whole
scene: CT, points, centreline, maps, straightened volumes, signals table and plot); with
`screenshots`, also <case>.png (sagittal and coronal slice views of the CT with Ĝ over it and
the labelled points, rendered off screen by Slicer's own slice-view code: `snapshot.py`).
Evidence comes from the bundled model unless a model or a points folder is given.
"""
from __future__ import annotations

import importlib.util
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..engine.settings import EngineSettings
from ..errors import VertebraIDError
from ..io.cases import find_cases

#: Points files looked for, per case, in a points folder.
POINTS_NAMES = ("{case}.mrk.json", "{case}.json", "{case}.vertebrae.json", "{case}_ctd.json", "{case}.csv")


def find_points_file(points_dir: Path, case: str) -> Path:
    """The points file of `case` in `points_dir` (the first of POINTS_NAMES that exists)."""
    for pattern in POINTS_NAMES:
        candidate = points_dir / pattern.format(case=case)
        if candidate.is_file():
            return candidate
    raise VertebraIDError(
        f"No points file for case '{case}' in '{points_dir}' (looked for {', '.join(p.format(case=case) for p in POINTS_NAMES)})."
    )


def output_paths(output_dir: Path, case: str, screenshots: bool = False) -> dict[str, Path]:
    """Where the files of one case go."""
    paths = {
        "vertebrae": output_dir / f"{case}.vertebrae.mrk.json",
        "centerline": output_dir / f"{case}.centerline.mrk.json",
        "scene": output_dir / f"{case}.mrb",
    }
    if screenshots:
        paths["picture"] = output_dir / f"{case}.png"
    return paths


@dataclass
class BatchOptions:
    """Where the evidence comes from and how the engine runs."""

    model: Path | None = None  # None: the bundled model (unless points_dir is given)
    device: str = "auto"
    points_dir: Path | None = None  # use points as evidence: a points file per case, named after it
    point_labels: str = "level"  # how the points' labels count as evidence
    settings: EngineSettings = field(default_factory=EngineSettings)
    overwrite: bool = False
    screenshots: bool = False  # also <case>.png: the slice views with Ĝ and the labelled points


@dataclass
class BatchReport:
    """How a batch went: cases done, skipped and failed (with the error's sentence)."""

    done: int = 0
    skipped: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (case, the error's sentence)


def process_case(case: str, path: Path, output_dir: Path, options: BatchOptions) -> dict:
    """Run the Logic on one CT in a fresh scene; returns a summary (labels, seconds)."""
    from . import mrml
    from .logic import NetworkHeatmapSource, PointsHeatmapSource, VertebraIDLogic

    start = time.perf_counter()
    if mrml.running_in_slicer_app():
        import slicer

        slicer.mrmlScene.Clear(0)
        context = mrml.SceneContext.current()
    else:
        context = mrml.SceneContext.create()
    logic = VertebraIDLogic(context)
    volume_node = mrml.read_volume(context, path, case)
    if options.points_dir:
        points_file = find_points_file(Path(options.points_dir), case)
        reference = mrml.volume_from_node(volume_node)  # VerSe centroid files are in its voxels
        source = PointsHeatmapSource.from_file(points_file, context, reference, options.point_labels)
    else:
        source = NetworkHeatmapSource(options.model, options.device)
    run = logic.detect(volume_node, source, options.settings, name=f"VertebraID {case}")
    paths = output_paths(output_dir, case, options.screenshots)
    logic.save_results(run.folder, output_dir, case)
    if options.screenshots:
        from .snapshot import run_picture

        run_picture(logic, run.folder, paths["picture"])
    logic.save_scene(paths["scene"])
    return {"labels": [v.label for v in run.result.vertebrae], "seconds": time.perf_counter() - start,
            "to_check": [v.label for v in run.result.vertebrae if v.needs_check]}


def run_batch(input_dir: Path, output_dir: Path, options: BatchOptions,
              log: Callable[[str], None] = print) -> BatchReport:
    """Every CT in `input_dir` (see `io.cases.find_cases`) through the Logic; results in `output_dir`."""
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    if importlib.util.find_spec("slicer") is None:
        raise VertebraIDError("slicer-batch needs slicer-core (pip install 'vertebraid[slicer]') or 3D Slicer.")
    if not input_dir.is_dir():
        raise VertebraIDError(f"'{input_dir}' is not a folder.")
    if options.points_dir and not Path(options.points_dir).is_dir():
        raise VertebraIDError(f"The points folder '{options.points_dir}' does not exist.")
    if options.model and not options.points_dir and not Path(options.model).is_file():
        raise VertebraIDError(f"The model file '{options.model}' does not exist.")
    found = find_cases([input_dir])
    output_dir.mkdir(parents=True, exist_ok=True)
    for path in found.passed_over:
        log(f"{path.name}: passed over (its name says it is a label image)")
    report = BatchReport()
    for case, path in found.cases:
        paths = output_paths(output_dir, case, options.screenshots)
        if not options.overwrite and all(p.is_file() for p in paths.values()):
            log(f"{case}: skipped (outputs exist; --overwrite redoes it)")
            report.skipped += 1
            continue
        try:
            summary = process_case(case, path, output_dir, options)
        except VertebraIDError as exc:
            report.failed.append((case, str(exc)))
            continue
        except MemoryError:
            report.failed.append((case, "out of memory."))
            continue
        labels = summary["labels"]
        check = f" (check {', '.join(summary['to_check'])})" if summary.get("to_check") else ""
        span = labels[0] if len(labels) == 1 else f"{labels[0]}-{labels[-1]}"
        log(f"{case}: {len(labels)} {'vertebra' if len(labels) == 1 else 'vertebrae'} {span} in "
            f"{summary['seconds']:.1f} s{check}")
        report.done += 1
    log(f"{report.done} done, {report.skipped} skipped, {len(report.failed)} failed, of {len(found.cases)} case(s); "
        f"results in {output_dir}")
    return report
