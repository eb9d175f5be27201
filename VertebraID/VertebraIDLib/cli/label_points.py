"""`vertebraid label-points`: label any detector's points (with optional region/level probabilities)."""
from __future__ import annotations

import numpy as np

from ..engine.points import label_points
from ..io.formats import read_points_json, write_vertebrae_json
from ._common import add_engine_options, check_output_path, engine_settings


def register(subparsers) -> None:
    """Add `label-points` to the sub-commands."""
    parser = subparsers.add_parser(
        "label-points",
        help="label unlabelled 3-D points (detections of any detector)",
        description="Render the points into activation maps and run the same pipeline; every point gets "
        "a label or is rejected. Vertebrae the chain infers between points (a missed detection) are "
        "listed with source_index null unless --points-only.",
    )
    parser.add_argument("points", help='JSON: {"coordinate_system": "LPS"|"RAS", "points": [{"position": [x,y,z], "probabilities": {...}}]}')
    parser.add_argument("-o", "--output", required=True, help="vertebrae JSON to write (in the input's coordinate system)")
    add_engine_options(parser)
    parser.add_argument("--points-only", action="store_true", help="leave out vertebrae inferred where no point was given")
    parser.set_defaults(func=run)


def run(args) -> int:
    """Run `vertebraid label-points`; returns the exit status."""
    out = check_output_path(args.output, "output")
    positions, probabilities, system = read_points_json(args.points)
    labelling = label_points(positions, probabilities, engine_settings(args), include_inferred=not args.points_only)
    write_vertebrae_json(
        out,
        labelling.vertebrae,
        system,
        method=labelling.result.method,
        rejected=[int(i) for i in labelling.rejected],
        energy=None if np.isnan(labelling.result.energy) else round(float(labelling.result.energy), 4),
    )
    print(f"{sum(v.source_index is not None for v in labelling.vertebrae)} of {len(positions)} points labelled, "
          f"{len(labelling.rejected)} rejected -> {out}")
    return 0
