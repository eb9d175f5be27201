"""`vertebraid detect CT... -o DIR`: the main job, CT -> network -> engine -> labelled vertebrae.

Inputs: NIfTI, NRRD/MetaImage files or DICOM series folders; one, many, or a folder holding
them (searched recursively). The files written per case are listed in `jobs/detect.py`.

--fixed FILE (one CT): the headless Re-label. Every labelled point in FILE (Slicer markups,
vertebrae JSON/CSV or VerSe centroids) is a correction the user vouches for: it keeps its label
and position, and the rest of the spine is re-solved around it (exact optimiser).
"""
from __future__ import annotations

import sys
from pathlib import Path

from ..jobs.detect import DetectOptions, detect_files
from ..networks.bundle import default_model_path, load_model
from ._common import add_engine_options, engine_settings


def register(subparsers) -> None:
    """Add `detect` to the sub-commands."""
    parser = subparsers.add_parser(
        "detect",
        help="find and label the vertebrae in CT scans with the network (the main job)",
        description="Run the heatmap network on each CT (NIfTI, NRRD or a DICOM series folder; files, "
        "folders of them), then the pipeline, and write <case>.vertebrae.json, .mrk.json, _ctd.json (VerSe) "
        "and a QC picture into the output folder. Cases already done are skipped.",
    )
    parser.add_argument("inputs", nargs="+", metavar="CT", help="CT file, DICOM series folder, or a folder of them")
    parser.add_argument("-o", "--output", required=True, help="output folder")
    parser.add_argument("--model", help="model file (.safetensors with its .json); default: the bundled model")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where the network runs")
    add_engine_options(parser)
    parser.add_argument("--save-heatmaps", action="store_true", help="also write the 26 maps (<case>_heatmaps.nii.gz)")
    parser.add_argument("--no-picture", action="store_true", help="skip the QC picture")
    parser.add_argument("--overwrite", action="store_true", help="redo cases that are already done")
    parser.add_argument("--fixed", metavar="FILE",
                        help="one CT only: labelled points (markups, vertebrae JSON/CSV, VerSe centroids) to keep as "
                        "they are; the rest is re-solved around them, like Re-label in Slicer")
    parser.set_defaults(func=run)


def run(args) -> int:
    """Run `vertebraid detect`; returns the exit status."""
    model_path = Path(args.model) if args.model else default_model_path()
    model = load_model(model_path, args.device)
    if model.metadata.get("status"):  # e.g. a research preview: say so before any label is read
        print(f"model {model_path.name}: {model.metadata['status']}")
    options = DetectOptions(args.device, Path(args.fixed) if args.fixed else None, args.overwrite,
                            not args.no_picture, args.save_heatmaps)
    report = detect_files(args.inputs, Path(args.output), model, engine_settings(args), options,
                          log=lambda line: print(line, flush=True))
    for case, error in report.failed:
        print(f"vertebraid detect: error: {case}: {error}", file=sys.stderr)
    if report.failed:
        print(f"vertebraid detect: {len(report.failed)} of {len(report.failed) + len(report.lines)} case(s) failed.",
              file=sys.stderr)
        return 2
    return 0
