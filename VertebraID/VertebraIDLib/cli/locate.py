"""`vertebraid locate`: 26 activation maps (4-D NIfTI) -> labelled vertebrae."""
from __future__ import annotations

import time

from ..formats import write_markups_json, write_vertebrae_json, write_verse_ctd
from ..pipeline import locate
from ..volume import Volume, read_nifti
from ._common import add_locate_options, check_output_path, locate_options


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "locate",
        help="label vertebrae from 26 activation maps (4-D NIfTI)",
        description="Trace the spine through 26 activation maps (C1..S2, channel c = label c+1 on the "
        "last axis), straighten them, and label the vertebrae with the chosen optimiser.",
    )
    parser.add_argument("heatmaps", help="4-D NIfTI with 26 channels on the last axis")
    parser.add_argument("-o", "--output", required=True, help="vertebrae JSON to write")
    add_locate_options(parser)
    parser.add_argument("--markups", help="also write a Slicer markups point list (.mrk.json)")
    parser.add_argument("--ctd", help="also write VerSe centroid JSON (voxel coordinates of the maps' grid)")
    parser.add_argument("--picture", help="also write a PNG of the maps, centreline, straightened spine and 1-D signals")
    parser.set_defaults(func=run)


def run(args) -> int:
    outputs = {k: check_output_path(getattr(args, k), k) for k in ("output", "markups", "ctd", "picture")}
    options = locate_options(args)
    t0 = time.perf_counter()
    heatmaps = read_nifti(args.heatmaps)
    read_s = time.perf_counter() - t0
    result = locate(heatmaps, options)
    timings = {"read": read_s, **result.timings_s}
    write_vertebrae_json(
        outputs["output"],
        result.vertebrae,
        "RAS",
        method=result.method,
        energy=None if result.energy != result.energy else round(float(result.energy), 4),
        spine_found=result.centerline is not None,
        timings_s={k: round(v, 4) for k, v in timings.items()},
    )
    if outputs["markups"]:
        write_markups_json(outputs["markups"], result.vertebrae)
    if outputs["ctd"]:
        write_verse_ctd(outputs["ctd"], result.vertebrae, Volume(heatmaps.array[..., 0], heatmaps.affine))
    if outputs["picture"]:
        from ..qc import result_figure, save_figure

        save_figure(result_figure(result), outputs["picture"])
    labels = " ".join(v.label for v in result.vertebrae) or "none"
    print(f"{len(result.vertebrae)} vertebrae ({labels}) -> {outputs['output']}")
    return 0
