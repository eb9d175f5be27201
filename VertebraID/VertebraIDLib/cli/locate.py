"""`vertebraid locate`: 26 activation maps (4-D NIfTI) -> labelled vertebrae."""
from __future__ import annotations

import time

from ..engine.pipeline import locate
from ..engine.volume import Volume
from ..io.images import read_nifti
from ..jobs.outputs import write_result_files
from ._common import add_engine_options, check_output_path, engine_settings


def register(subparsers) -> None:
    """Add `locate` to the sub-commands."""
    parser = subparsers.add_parser(
        "locate",
        help="label vertebrae from 26 activation maps (4-D NIfTI)",
        description="Trace the spine through 26 activation maps (C1..S2, channel c = label c+1 on the "
        "last axis), straighten them, and label the vertebrae with the chosen optimiser.",
    )
    parser.add_argument("heatmaps", help="4-D NIfTI with 26 channels on the last axis")
    parser.add_argument("-o", "--output", required=True, help="vertebrae JSON to write")
    add_engine_options(parser)
    parser.add_argument("--markups", help="also write a Slicer markups point list (.mrk.json)")
    parser.add_argument("--ctd", help="also write VerSe centroid JSON (voxel coordinates of the maps' grid)")
    parser.add_argument("--picture", help="also write a PNG of the maps, centreline, straightened spine and 1-D signals")
    parser.set_defaults(func=run)


def run(args) -> int:
    """Run `vertebraid locate`; returns the exit status."""
    outputs = {k: check_output_path(getattr(args, k), k) for k in ("output", "markups", "ctd", "picture")}
    settings = engine_settings(args)
    t0 = time.perf_counter()
    heatmaps = read_nifti(args.heatmaps)
    read_s = time.perf_counter() - t0
    result = locate(heatmaps, settings)
    write_result_files(
        result, outputs["output"], markups=outputs["markups"], ctd=outputs["ctd"],
        ctd_reference=Volume(heatmaps.array[..., 0], heatmaps.affine), picture=outputs["picture"],
        timings_s={k: round(v, 4) for k, v in {"read": read_s, **result.timings_s}.items()},
    )
    labels = " ".join(v.label for v in result.vertebrae) or "none"
    print(f"{len(result.vertebrae)} vertebrae ({labels}) -> {outputs['output']}")
    return 0
