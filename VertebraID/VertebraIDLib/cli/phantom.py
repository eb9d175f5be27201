"""`vertebraid phantom`: synthetic spine CTs with ground truth (see VertebraIDLib.synthetic.phantom).

Case k (0-based) of a run uses seed S + k and is named `<prefix><S + k>` (six digits); its
files are `<case>_ct.nii.gz` (int16 HU), `<case>_seg-vert_msk.nii.gz` (VerSe ids),
`<case>_seg-subreg_ctd.json` (VerSe centroids), `<case>.vertebrae.json` (RAS mm) and
`<case>_phantom.json` (everything drawn). Options are checked before anything is written.
"""
from __future__ import annotations

import time
from pathlib import Path

from ..errors import VertebraIDError
from ..evaluation.qc import render_views, save_figure
from ..synthetic.phantom import (
    PATHOLOGIES,
    TRANSITIONAL,
    PhantomOptions,
    generate_phantom,
    write_phantom,
)
from ..synthetic.phantom.io import case_paths
from ..synthetic.phantom.options import REGION_PRESETS


def register(subparsers) -> None:
    """Add `phantom` to the sub-commands."""
    parser = subparsers.add_parser(
        "phantom",
        help="generate synthetic spine CT phantoms with ground truth",
        description=(
            "Generate N synthetic spine CTs (HU, int16) with a VerSe label mask and the body centre of "
            "every vertebra in the image, reproducibly from a seed. Unset options are drawn at random."
        ),
    )
    parser.add_argument("--n", type=int, default=1, help="number of cases (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first case (default 0)")
    parser.add_argument("-o", "--out", required=True, help="output folder")
    parser.add_argument("--prefix", default="phantom_", help="case name prefix (default 'phantom_')")
    parser.add_argument(
        "--levels", default=None,
        help=f"visible levels, e.g. T10..S2, or one of {', '.join(REGION_PRESETS)} (default: random)",
    )
    cut = parser.add_mutually_exclusive_group()
    cut.add_argument("--cut", dest="cut", action="store_const", const=True, default=None,
                     help="end the field of view inside a vertebra")
    cut.add_argument("--no-cut", dest="cut", action="store_const", const=False, help="show the end vertebrae whole")
    parser.add_argument("--spacing", default=None, metavar="MM",
                        help="voxel size: one number, 'INPLANE,SLICE' or 'X,Y,Z' in mm (default: random)")
    parser.add_argument("--shape", default=None, metavar="NXxNYxNZ", help="grid size in voxels, e.g. 256x256x300")
    parser.add_argument("--matrix", type=int, default=None, help="in-plane voxels (square) when --shape is not given")
    parser.add_argument("--max-slices", type=int, default=1000, help="most slices per case (default 1000)")
    parser.add_argument("--orientation", default="random", help="axis codes of the arrays (RAS, LPS, PIR...) or random")
    parser.add_argument("--oblique", type=float, default=0.0, metavar="DEG", help="rotate the image axes by DEG degrees about a random axis (oblique scan)")
    parser.add_argument("--pathologies", default=None,
                        help=f"comma-separated subset of: {', '.join(PATHOLOGIES)}; 'none'; default random")
    parser.add_argument("--fractures", type=int, default=None, help="number of compression fractures")
    parser.add_argument("--fracture-grade", choices=("mild", "moderate", "severe"), default=None)
    parser.add_argument("--scoliosis", type=float, default=None, metavar="DEG", help="Cobb angle (degrees)")
    parser.add_argument("--transitional", default=None, help=f"one of {', '.join(TRANSITIONAL)} (default: random, rare)")
    parser.add_argument("--sex", choices=("male", "female"), default=None)
    parser.add_argument("--age", type=float, default=None)
    parser.add_argument("--size", type=float, default=None, help="anatomy scale (1 = average adult male)")
    parser.add_argument("--noise", type=float, default=None, metavar="HU", help="noise standard deviation")
    parser.add_argument("--blur", type=float, default=None, metavar="MM", help="in-plane blur sigma")
    parser.add_argument("--hu-max", type=int, default=3071, help="clip (metal) at this HU (default 3071)")
    parser.add_argument("--body-mask", action="store_true", help="also write the vertebral-body mask")
    parser.add_argument("--preview", action="store_true", help="also save <case>_views.png (sagittal and coronal)")
    parser.add_argument("-q", "--quiet", action="store_true", help="print only errors")
    parser.set_defaults(func=run)


def _shape(text):
    if text is None:
        return None
    parts = [p for p in text.lower().replace(",", "x").split("x") if p.strip()]
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        raise VertebraIDError(f"Cannot read --shape '{text}'; write it as NXxNYxNZ, e.g. 256x256x300.") from None
    if len(values) != 3:
        raise VertebraIDError(f"Cannot read --shape '{text}'; write it as NXxNYxNZ, e.g. 256x256x300.")
    return values


def options_from_args(args) -> PhantomOptions:
    """PhantomOptions from the parsed arguments (unset ones stay random)."""
    return PhantomOptions(
        levels=args.levels, cut=args.cut, spacing=args.spacing, shape=_shape(args.shape), matrix=args.matrix,
        max_slices=args.max_slices, orientation=args.orientation, oblique_deg=args.oblique,
        pathologies=args.pathologies, fractures=args.fractures, fracture_grade=args.fracture_grade,
        scoliosis_deg=args.scoliosis, transitional=args.transitional, sex=args.sex, age=args.age, size=args.size,
        noise_hu=args.noise, blur_mm=args.blur, hu_max=args.hu_max, with_body_mask=args.body_mask,
    )


def run(args) -> int:
    """Run `vertebraid phantom`; returns the exit status."""
    if args.n < 1:
        raise VertebraIDError(f"--n must be at least 1, got {args.n}.")
    if args.seed < 0:
        raise VertebraIDError(f"--seed must not be negative, got {args.seed}.")
    options = options_from_args(args)
    options.validated()  # every option error surfaces before a file is written
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise VertebraIDError(f"The output '{out}' is a file; give a folder.")
    case_paths(out, f"{args.prefix}{args.seed:06d}")  # the prefix must make valid file names
    for k in range(args.n):
        seed = args.seed + k
        case = f"{args.prefix}{seed:06d}"
        start = time.perf_counter()
        phantom = generate_phantom(seed, options)
        written = write_phantom(phantom, out, case)
        if args.preview:
            fig = render_views(phantom.ct, phantom.truth, title=case)
            save_figure(fig, out / f"{case}_views.png")
        if not args.quiet:
            levels = phantom.meta["levels_in_image"]
            span = f"{levels[0]}..{levels[-1]}" if levels else "no vertebra centre"
            extras = ", ".join(phantom.meta["pathologies"]) or "-"
            shape = "x".join(str(n) for n in phantom.ct.shape3)
            print(f"{case}: {span} ({len(levels)}), {shape} voxels, {extras}, "
                  f"{time.perf_counter() - start:.1f} s -> {written['ct'].parent}")
    return 0
