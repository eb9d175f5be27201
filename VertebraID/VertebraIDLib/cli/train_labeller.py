"""`vertebraid train-labeller --model M`: train the level labeller for a heatmap model."""
from __future__ import annotations

from ..errors import VertebraIDError
from ..training.labeller import train_for_model


def register(subparsers) -> None:
    """Add `train-labeller` to the sub-commands."""
    parser = subparsers.add_parser(
        "train-labeller",
        help="train the level labeller (whole-spine level evidence) for a heatmap model",
        description="Train the level labeller on phantoms and on CTs rendered from real label maps: the CT "
        "straightened along the truth centreline, labelled with each vertebra's level. Samples are cached in "
        "--samples (a rerun only adds missing ones). The weights are written beside the model and, with "
        "--attach, recorded in its metadata, so that `detect` and the Slicer module use them.",
    )
    parser.add_argument("--model", required=True, help="the heatmap model (.safetensors) the labeller serves")
    parser.add_argument("--samples", required=True, help="folder for the phantom samples (kept between runs)")
    parser.add_argument("--phantoms", type=int, default=2000, help="phantom seeds 0..N-1 (default 2000)")
    parser.add_argument("--labelmaps", nargs="*", default=[], metavar="LABELMAP",
                        help="label maps of real anatomy (.nii.gz with <name>_labels.json beside it) to render CTs from")
    parser.add_argument("--renders", type=int, default=300, help="CTs rendered per label map (default 300)")
    parser.add_argument("--fine-tune", action="store_true", help="continue from the model's current labeller")
    parser.add_argument("--bone-floor", type=float, default=None, metavar="HU",
                        help="read bone only: HU below this are blanked in the labeller's input (e.g. 150)")
    parser.add_argument("--phantom-share", type=float, default=0.5,
                        help="share of the training steps on phantoms when label maps are given (default 0.5)")
    parser.add_argument("--minutes", type=float, default=30.0, help="training time (default 30)")
    parser.add_argument("--seed", type=int, default=0, help="training random seed")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    parser.add_argument("--attach", action="store_true", help="record the labeller in the model's metadata")
    parser.set_defaults(func=run)


def run(args) -> int:
    """Run `vertebraid train-labeller`; returns the exit status."""
    if args.threads < 0:
        raise VertebraIDError("--threads must not be negative.")
    train_for_model(args.model, args.samples, args.phantoms, args.minutes, args.seed, args.attach,
                    log=lambda message: print(message, flush=True), threads=args.threads,
                    labelmaps=args.labelmaps, renders=args.renders, fine_tune=args.fine_tune,
                    bone_floor_hu=args.bone_floor, phantom_share=args.phantom_share)
    return 0
