"""`vertebraid slicer-batch IN_DIR -o OUT_DIR`: the Slicer module's Logic over a folder of CTs.

Every case runs in a fresh MRML scene -- PyPI's slicer-core here, or 3D Slicer itself:

    Slicer --no-main-window --python-script <VertebraIDLib>/cli/slicer_batch.py IN_DIR -o OUT_DIR
    python -m VertebraIDLib.cli.slicer_batch IN_DIR -o OUT_DIR     (the same, without the other commands)

What it writes per case: see `VertebraIDLib/slicer/batch.py`. Cases are found as `detect` finds
them (files whose names say they are labels are passed over). Evidence comes from the bundled
model by default, another model (--model) or points (--points-dir, one file per case named
after it).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script (inside Slicer): make VertebraIDLib importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from VertebraIDLib.engine.settings import EngineSettings
from VertebraIDLib.errors import VertebraIDError
from VertebraIDLib.slicer.batch import POINTS_NAMES, BatchOptions, run_batch


def register(subparsers) -> None:
    """Add `slicer-batch` to the sub-commands."""
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
            "outputs per case: <case>.vertebrae.mrk.json, <case>.centerline.mrk.json, <case>.mrb "
            "(and <case>.png with --screenshots)\n"
            "points files (--points-dir): " + ", ".join(POINTS_NAMES)
        ),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `slicer-batch` (shared by the sub-command and the script form)."""
    parser.add_argument("input_dir", help="folder of CT images (and/or DICOM series sub-folders)")
    parser.add_argument("-o", "--output-dir", required=True, help="where the results go")
    parser.add_argument("--model", help="network model file (.safetensors); default: the bundled model")
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
    parser.add_argument("--screenshots", action="store_true",
                        help="also write <case>.png: sagittal and coronal slice views with the labelled points "
                             "(rendered off screen)")
    parser.set_defaults(func=run)


def run(args) -> int:
    """Run `vertebraid slicer-batch`; returns the exit status (1 when a case failed)."""
    options = BatchOptions(
        model=Path(args.model) if args.model else None, device=args.device,
        points_dir=Path(args.points_dir) if args.points_dir else None, point_labels=args.point_labels,
        settings=EngineSettings(method=args.method, transitional=args.transitional), overwrite=args.overwrite,
        screenshots=getattr(args, "screenshots", False),
    )
    report = run_batch(Path(args.input_dir), Path(args.output_dir), options, log=lambda m: print(m, flush=True))
    for case, error in report.failed:
        print(f"{case}: error: {error}", file=sys.stderr)
    if report.failed:
        print(f"vertebraid slicer-batch: {len(report.failed)} case(s) failed: "
              f"{', '.join(case for case, _ in report.failed)}.", file=sys.stderr)
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
