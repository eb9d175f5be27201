"""Pieces shared by the sub-commands: the engine options and output paths."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..engine.settings import METHODS, EngineSettings
from ..errors import VertebraIDError


def add_engine_options(parser: argparse.ArgumentParser) -> None:
    """The optimiser options every labelling command takes."""
    parser.add_argument("--method", choices=METHODS, default="exact", help="optimiser (default: exact)")
    parser.add_argument("--no-weights", action="store_true", help="switch off the anchor weights (λ = 1 for all)")
    parser.add_argument("--transitional", action="store_true", help="allow transitional vertebrae T13 and L6")


def engine_settings(args) -> EngineSettings:
    """EngineSettings from the parsed engine options."""
    return EngineSettings(method=args.method, weighted=not args.no_weights, transitional=args.transitional)


def check_output_path(path: str | None, what: str) -> Path | None:
    """The output's folder must exist or be creatable; refuse to write over a folder."""
    if path is None:
        return None
    p = Path(path)
    if p.is_dir():
        raise VertebraIDError(f"The {what} output '{p}' is a folder; give a file name.")
    return p
