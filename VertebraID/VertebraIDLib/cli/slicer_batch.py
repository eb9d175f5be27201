"""`vertebraid slicer-batch IN_DIR -o OUT_DIR`: the Slicer module's Logic over a folder of CTs.

Every case runs in a fresh MRML scene -- PyPI's slicer-core here, or 3D Slicer itself:

    Slicer --no-main-window --python-script <VertebraIDLib>/cli/slicer_batch.py IN_DIR -o OUT_DIR
    python -m VertebraIDLib.cli.slicer_batch IN_DIR -o OUT_DIR     (the same, without the other commands)

and leaves in OUT_DIR: <case>.vertebrae.mrk.json (the labelled points), <case>.centerline.mrk.json
(the centreline curve), both written by Slicer's markups storage node, and <case>.mrb (the
whole scene: CT, points, centreline, maps, straightened volumes, signals table and plot).

A case is an image file (NIfTI, NRRD, MetaImage) or a sub-folder holding a DICOM series;
files whose names say they are labels (seg, label, mask, msk) are passed over. Cases whose
three outputs exist are skipped unless --overwrite. Evidence comes from the network
(--model) or from points (--points-dir, one file per case named after it).
"""
from __future__ import annotations

import argparse
import importlib.util
import re
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script (inside Slicer): make VertebraIDLib importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from VertebraIDLib.errors import VertebraIDError

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
LABEL_NAME = re.compile(r"(seg|label|mask|msk)", re.IGNORECASE)
POINTS_NAMES = ("{case}.mrk.json", "{case}.json", "{case}.vertebrae.json", "{case}_ctd.json", "{case}.csv")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "slicer-batch",
        help="run the Slicer module's Logic over a folder of CTs (points, centreline, scene bundle)",
        **_parser_texts(),
    )
    add_arguments(parser)


def _parser_texts() -> dict:
    return {
        "description": (
            "Run the VertebraID Slicer module's Logic over a folder of CTs, each in a fresh MRML scene, "
            "saving the labelled points, the centreline and the scene bundle per case."
        ),
        "formatter_class": argparse.RawDescriptionHelpFormatter,
        "epilog": (
            "outputs per case: <case>.vertebrae.mrk.json, <case>.centerline.mrk.json, <case>.mrb\n"
            "points files (--points-dir): " + ", ".join(POINTS_NAMES)
        ),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input_dir", help="folder of CT images (and/or DICOM series sub-folders)")
    parser.add_argument("-o", "--output-dir", required=True, help="where the results go")
    parser.add_argument("--model", help="network model file (.safetensors); the evidence unless --points-dir")
    parser.add_argument("--device", default="auto", help="network device: auto, cpu or cuda (default auto)")
    parser.add_argument("--points-dir", help="use points as evidence: a points file per case, named after it")
    parser.add_argument(
        "--point-labels",
        choices=("level", "region", "none"),
        default="level",
        help="how the points' labels count as evidence (default level)",
    )
    parser.add_argument("--method", choices=("exact", "paper"), default="exact", help="optimiser (default exact)")
    parser.add_argument("--transitional", action="store_true", help="allow T13 and L6")
    parser.add_argument("--overwrite", action="store_true", help="redo cases whose outputs already exist")
    parser.set_defaults(func=run)


# --------------------------------------------------------------------------- finding things


def load_vertebraid_module():
    """The VertebraID Slicer module (VertebraID.py): imported inside Slicer, else loaded from
    beside the VertebraIDLib package (a source checkout or an editable install)."""
    if importlib.util.find_spec("slicer") is None:
        raise VertebraIDError("slicer-batch needs slicer-core (pip install 'vertebraid[slicer]') or 3D Slicer.")
    module = sys.modules.get("VertebraID")
    if module is not None and hasattr(module, "VertebraIDLogic"):
        return module
    try:
        import VertebraID as module  # inside Slicer the module folder is on sys.path

        if hasattr(module, "VertebraIDLogic"):
            return module
    except ImportError:
        pass
    path = Path(__file__).resolve().parents[2] / "VertebraID.py"
    if not path.is_file():
        raise VertebraIDError(
            "slicer-batch needs the VertebraID Slicer module file (VertebraID.py beside VertebraIDLib); "
            "use a source checkout or 3D Slicer."
        )
    spec = importlib.util.spec_from_file_location("VertebraID", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["VertebraID"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop("VertebraID", None)
        raise
    return module


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(IMAGE_SUFFIXES)


def find_cases(input_dir: Path) -> tuple[list[tuple[str, Path]], list[Path]]:
    """(case name, path) for every CT in the folder, and the label-like files passed over."""
    from VertebraIDLib.mrml import volume_case_name

    if not input_dir.is_dir():
        raise VertebraIDError(f"'{input_dir}' is not a folder.")
    cases, passed_over = [], []
    for path in sorted(input_dir.iterdir()):
        if path.name.startswith("."):
            continue
        if is_image_file(path):
            if LABEL_NAME.search(volume_case_name(path)):
                passed_over.append(path)
            else:
                cases.append((volume_case_name(path), path))
        elif path.is_dir():
            files = [p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")]
            if files and not any(is_image_file(p) for p in files):  # a DICOM series folder
                cases.append((path.name, path))
    names = [name for name, _ in cases]
    doubled = sorted({n for n in names if names.count(n) > 1})
    if doubled:
        raise VertebraIDError(f"Several inputs in '{input_dir}' share the case name {', '.join(doubled)}.")
    return cases, passed_over


def find_points_file(points_dir: Path, case: str) -> Path:
    for pattern in POINTS_NAMES:
        candidate = points_dir / pattern.format(case=case)
        if candidate.is_file():
            return candidate
    raise VertebraIDError(
        f"No points file for case '{case}' in '{points_dir}' (looked for {', '.join(p.format(case=case) for p in POINTS_NAMES)})."
    )


def output_paths(output_dir: Path, case: str) -> dict[str, Path]:
    return {
        "vertebrae": output_dir / f"{case}.vertebrae.mrk.json",
        "centerline": output_dir / f"{case}.centerline.mrk.json",
        "scene": output_dir / f"{case}.mrb",
    }


# --------------------------------------------------------------------------- one case


def process_case(module, case: str, path: Path, output_dir: Path, args) -> dict:
    """Run the Logic on one CT in a fresh scene; returns a summary (labels, seconds)."""
    from VertebraIDLib import mrml
    from VertebraIDLib.pipeline import LocateOptions

    start = time.perf_counter()
    if mrml.running_in_slicer_app():
        import slicer

        slicer.mrmlScene.Clear(0)
        context = mrml.SceneContext.current()
    else:
        context = mrml.SceneContext.create()
    logic = module.VertebraIDLogic(context)
    volume_node = mrml.read_volume(context, path, case)
    if args.points_dir:
        points_file = find_points_file(Path(args.points_dir), case)
        reference = mrml.volume_from_node(volume_node)  # VerSe centroid files are in its voxels
        source = module.PointsHeatmapSource.from_file(points_file, context, reference, args.point_labels)
    else:
        source = module.NetworkHeatmapSource(args.model, args.device)
    options = LocateOptions(method=args.method, transitional=args.transitional)
    run = logic.detect(volume_node, source, options, name=f"VertebraID {case}")
    paths = output_paths(output_dir, case)
    logic.save_results(run.folder, output_dir, case)
    logic.save_scene(paths["scene"])
    labels = [v.label for v in run.result.vertebrae]
    return {"labels": labels, "seconds": time.perf_counter() - start}


# --------------------------------------------------------------------------- command


def run(args) -> int:
    input_dir = Path(args.input_dir)
    output_dir = Path(args.output_dir)
    if not args.points_dir and not args.model:
        raise VertebraIDError("Give --model (the network) or --points-dir (points as evidence).")
    if args.points_dir and not Path(args.points_dir).is_dir():
        raise VertebraIDError(f"The points folder '{args.points_dir}' does not exist.")
    if args.model and not args.points_dir and not Path(args.model).is_file():
        raise VertebraIDError(f"The model file '{args.model}' does not exist.")
    cases, passed_over = find_cases(input_dir)
    if not cases:
        raise VertebraIDError(f"No CT images (NIfTI, NRRD, MetaImage or DICOM folders) in '{input_dir}'.")
    module = load_vertebraid_module()
    output_dir.mkdir(parents=True, exist_ok=True)
    for path in passed_over:
        print(f"{path.name}: passed over (its name says it is a label image)")

    done = skipped = 0
    failed: list[str] = []
    for case, path in cases:
        paths = output_paths(output_dir, case)
        if not args.overwrite and all(p.is_file() for p in paths.values()):
            print(f"{case}: skipped (outputs exist; --overwrite redoes it)")
            skipped += 1
            continue
        try:
            summary = process_case(module, case, path, output_dir, args)
        except VertebraIDError as exc:
            print(f"{case}: error: {exc}", file=sys.stderr)
            failed.append(case)
            continue
        except MemoryError:
            print(f"{case}: error: out of memory.", file=sys.stderr)
            failed.append(case)
            continue
        labels = summary["labels"]
        print(f"{case}: {len(labels)} vertebrae {labels[0]}-{labels[-1]} in {summary['seconds']:.1f} s")
        done += 1
    print(f"{done} done, {skipped} skipped, {len(failed)} failed, of {len(cases)} case(s); results in {output_dir}")
    if failed:
        print(f"vertebraid slicer-batch: {len(failed)} case(s) failed: {', '.join(failed)}.", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """This command on its own (as a script, e.g. inside Slicer): the same exit codes as `vertebraid`."""
    parser = argparse.ArgumentParser(prog="vertebraid slicer-batch", **_parser_texts())
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return int(run(args) or 0)
    except VertebraIDError as exc:
        print(f"vertebraid slicer-batch: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vertebraid slicer-batch: cancelled.", file=sys.stderr)
        return 130


def _main_as_script() -> None:
    code = main(sys.argv[1:])
    try:
        import slicer

        if getattr(slicer, "app", None) is not None:  # Slicer --python-script: quit with the code
            slicer.util.exit(code)
            return
    except ImportError:
        pass
    sys.exit(code)


if __name__ == "__main__":
    _main_as_script()
