"""`vertebraid evaluate`: identification rate and localisation error against ground truth.

--pred and --gt are each a file or a folder; how folders pair and which formats are read:
see `VertebraIDLib/evaluation/compare.py`.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..evaluation.compare import compare
from ..evaluation.metrics import DEFAULT_MAX_DIST_MM, METRICS, format_table


def register(subparsers) -> None:
    """Add `evaluate` to the sub-commands."""
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


def run(args: argparse.Namespace) -> int:
    """Run `vertebraid evaluate`; returns the exit status."""
    result = compare(Path(args.pred), Path(args.gt), args.metric, args.max_dist,
                     Path(args.reference) if args.reference else None)
    cases, missing_pred, unmatched_pred = result.cases, result.cases_without_prediction, result.predictions_without_ground_truth
    notes = []
    if missing_pred:
        notes.append(f"{len(missing_pred)} ground-truth case(s) without prediction, counted as unidentified: "
                     + ", ".join(missing_pred))
    if unmatched_pred:
        notes.append(f"{len(unmatched_pred)} prediction(s) without ground truth, ignored: " + ", ".join(unmatched_pred))

    if args.json:
        out = result.summary.to_dict()
        out["cases_without_prediction"] = missing_pred
        out["predictions_without_ground_truth"] = unmatched_pred
        print(json.dumps(out, indent=2))
        return 0
    print(format_table(result.summary))
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
