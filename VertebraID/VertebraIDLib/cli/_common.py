"""Pieces shared by the sub-commands: the optimiser options and writing the result files."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import VertebraIDError
from ..pipeline import METHODS, LocateOptions


def add_locate_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", choices=METHODS, default="exact", help="optimiser (default: exact)")
    parser.add_argument("--no-weights", action="store_true", help="switch off the anchor weights (λ = 1 for all)")
    parser.add_argument("--transitional", action="store_true", help="allow transitional vertebrae T13 and L6")


def locate_options(args, **overrides) -> LocateOptions:
    return LocateOptions(method=args.method, weighted=not args.no_weights, transitional=args.transitional, **overrides)


def check_output_path(path: str | None, what: str) -> Path | None:
    """The output's folder must exist or be creatable; refuse to write over a folder."""
    if path is None:
        return None
    p = Path(path)
    if p.is_dir():
        raise VertebraIDError(f"The {what} output '{p}' is a folder; give a file name.")
    return p
