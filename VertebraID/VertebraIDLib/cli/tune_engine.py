"""`vertebraid tune-engine --model M`: the engine's settings for a model's maps, on validation cases."""
from __future__ import annotations

from pathlib import Path

from ..errors import VertebraIDError
from ..io.files import write_text_atomic
from ..training.tune_engine import tune_engine


def register(subparsers) -> None:
    """Add `tune-engine` to the sub-commands."""
    parser = subparsers.add_parser(
        "tune-engine",
        help="pick the engine's settings (centreline threshold, α, floor, shortest gap, spacing prior, ribs and "
        "sacrum, temperature) for a model",
        description="Run the model on validation phantoms (training's validation seeds) and on CTs rendered from "
        "real label maps, and pick the engine settings that identify the most vertebrae, then the confidence "
        "temperature by the Brier score. With --write they are stored in the model's metadata, where detect and "
        "the Slicer module read them.",
    )
    parser.add_argument("--model", required=True, help="the model (.safetensors with its .json)")
    parser.add_argument("--phantoms", type=int, default=60, help="validation phantoms (default 60)")
    parser.add_argument("--labelmaps", nargs="*", default=[], metavar="LABELMAP",
                        help="label maps of real anatomy (.nii.gz with <name>_labels.json) to render validation CTs from")
    parser.add_argument("--renders", type=int, default=30, help="validation CTs rendered per label map (default 30)")
    parser.add_argument("--seed", type=int, default=1_000_000, help="first validation seed (default: training's)")
    parser.add_argument("--write", action="store_true", help="store the chosen settings in the model's .json")
    parser.add_argument("--out", type=Path, default=None, help="also write the report (markdown) to this file")
    parser.set_defaults(func=run)


def run(args) -> int:
    """Run `vertebraid tune-engine`; returns the exit status."""
    if args.phantoms < 1:
        raise VertebraIDError(f"--phantoms must be at least 1, got {args.phantoms}.")
    if args.labelmaps and args.renders < 1:
        raise VertebraIDError(f"--renders must be at least 1 with --labelmaps, got {args.renders}.")
    report = tune_engine(args.model, args.phantoms, args.seed, args.write, log=lambda m: print(m, flush=True),
                         labelmaps=args.labelmaps, renders=args.renders)
    print(report)
    if args.out is not None:
        write_text_atomic(args.out, report + "\n")
    return 0
