"""Progress reporting and cancellation, shared by every long step (network, engine, training).

A progress callback is called as `progress(fraction, message)` with `fraction` in [0, 1]; it
returns True to ask the work to stop, which then raises `Cancelled` at the next report.
"""
from __future__ import annotations

from typing import Callable, Optional

#: progress(fraction in [0, 1], message) -> True to cancel (None or False: go on)
ProgressCallback = Callable[[float, str], Optional[bool]]


class Cancelled(Exception):
    """Raised when a progress callback asks to stop (it returned True)."""


def report(progress: ProgressCallback | None, fraction: float, message: str) -> None:
    """Tell `progress` how far the work is; raise `Cancelled` when it asks to stop."""
    if progress is not None and progress(fraction, message):
        raise Cancelled(message)


def scaled(progress: ProgressCallback | None, start: float, end: float) -> ProgressCallback | None:
    """A callback for a sub-step that covers [start, end] of the whole work."""
    if progress is None:
        return None
    return lambda fraction, message: progress(start + (end - start) * float(fraction), message)
