"""`vertebraid train CONFIG [--resume]`: train the heatmap network (see training/heatmap.py)."""
from __future__ import annotations

from pathlib import Path

from ..training.config import load_config, validate_config
from ..training.heatmap import train


def register(subparsers) -> None:
    """Add `train` to the sub-commands."""
    parser = subparsers.add_parser(
        "train",
        help="train the heatmap network from a configuration (TOML or JSON)",
        description="Train the 26-channel heatmap network on phantoms generated on the fly and/or annotated "
        "folders, as described by CONFIG (see VertebraIDTrain/configs/). Run it under torchrun for several "
        "processes. Writes checkpoints, TensorBoard logs and model.safetensors + model.json into the "
        "configuration's output_dir.",
    )
    parser.add_argument("config", help="training configuration (.toml or .json)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), help="override the configuration's device")
    parser.add_argument("--output-dir", help="override the configuration's output_dir")
    parser.add_argument("--epochs", type=int, help="override the number of epochs")
    parser.add_argument("--max-minutes", type=float,
                        help="stop after the epoch that passes this many minutes (the schedule spans them)")
    parser.add_argument("--init-from", help="start from this model file's weights ('' = random)")
    parser.set_defaults(func=run)


def run(args) -> int:
    """Run `vertebraid train`; returns the exit status."""
    config = load_config(args.config)
    if args.device:
        config.device = args.device
    if args.output_dir:
        config.output_dir = str(Path(args.output_dir).resolve())
    if args.epochs is not None:
        config.train.epochs = args.epochs
    if args.max_minutes is not None:
        config.train.max_minutes = args.max_minutes
    if args.init_from is not None:
        config.train.init_from = str(Path(args.init_from).resolve()) if args.init_from else ""
    validate_config(config)
    result = train(config, resume=args.resume)
    if result.model_path is not None:
        print(f"model -> {result.model_path}")
    return 0
