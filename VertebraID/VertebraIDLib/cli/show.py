"""`vertebraid show`: a picture (sagittal and coronal slab MIPs) of a CT with labelled vertebrae.

CASE is an image file, a DICOM folder or a case folder; vertebrae are taken from --points,
else from the files beside the image (see VertebraIDLib.io.cases). The picture is written to
-o, or to `<case>_views.png` in the current folder.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import VertebraIDError
from ..evaluation.qc import render_views, save_figure
from ..io.cases import load_case
from ..io.formats import read_vertebrae_any


def register(subparsers) -> None:
    """Add `show` to the sub-commands."""
    parser = subparsers.add_parser(
        "show",
        help="save sagittal and coronal views of a CT with its labelled vertebrae",
        description="Save sagittal and coronal views (slab MIPs along the spine) of a CT with labelled vertebrae.",
    )
    parser.add_argument("case", metavar="CASE", help="image file, DICOM folder or case folder")
    parser.add_argument("-o", "--out", default=None, help="picture file (.png, .jpg, .pdf, .svg)")
    parser.add_argument("--points", default=None,
                        help="vertebrae file to draw (vertebrae JSON, markups, CSV, VerSe centroids)")
    parser.add_argument("--no-points", action="store_true", help="draw the image only")
    parser.add_argument("--title", default=None, help="title (default: the case name)")
    parser.add_argument("--slab", type=float, default=12.0, metavar="MM", help="slab thickness (default 12 mm)")
    parser.add_argument("--window", default="-250,1250", metavar="LOW,HIGH", help="HU window (default -250,1250)")
    parser.set_defaults(func=run)


def _window(text):
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise VertebraIDError(f"Cannot read --window '{text}'; write it as LOW,HIGH in HU, e.g. -250,1250.") from None
    if not high > low:
        raise VertebraIDError(f"The --window '{text}' must have LOW below HIGH.")
    return low, high


def run(args) -> int:
    """Run `vertebraid show`; returns the exit status."""
    window = _window(args.window)
    if not args.slab > 0:
        raise VertebraIDError(f"--slab must be positive, got {args.slab:g}.")
    case = load_case(args.case)
    if case.image is None:
        raise VertebraIDError(f"'{args.case}' holds no image to show (only annotations).")
    vertebrae = case.truth or []
    if args.points:
        vertebrae = read_vertebrae_any(args.points, reference=case.image)
    if args.no_points:
        vertebrae = []
    out = Path(args.out) if args.out else Path.cwd() / f"{Path(case.name).name or 'case'}_views.png"
    if out.is_dir():
        raise VertebraIDError(f"The picture output '{out}' is a folder; give a file name.")
    fig = render_views(case.image, vertebrae, title=args.title or case.name, slab_mm=args.slab, window=window)
    save_figure(fig, out)
    print(f"{out} ({len(vertebrae)} vertebrae)")
    return 0
