"""The `vertebraid` command line. Each sub-command lives in its own module here.

A sub-command module defines `register(subparsers)`, which adds its parser and sets
`func` (called with the parsed arguments, returns an exit code).
"""
from __future__ import annotations

import argparse
import importlib
import sys

from ..errors import VertebraIDError

#: Sub-command modules, in the order `--help` lists them.
COMMAND_MODULES = [
    "locate",
    "label_points",
    "evaluate",
    "slicer_batch",
    "phantom",
    "show",
    "train",
    "train_labeller",
    "tune_engine",
    "detect",
]


def build_parser() -> argparse.ArgumentParser:
    """The `vertebraid` parser with every sub-command registered."""
    parser = argparse.ArgumentParser(
        prog="vertebraid",
        description="Find and name every vertebra in a CT scan (Wang et al., CVPR 2021).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run `vertebraid` with `argv`; a user's error is one sentence on stderr and exit status 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except VertebraIDError as exc:
        print(f"vertebraid {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"vertebraid {args.command}: cancelled.", file=sys.stderr)
        return 130
    except MemoryError:
        print(f"vertebraid {args.command}: error: out of memory.", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
