"""Atomic file writing: an output is either complete or absent, never half-written."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Union

#: A file path as callers give it.
PathLike = Union[str, os.PathLike]


@contextlib.contextmanager
def atomic_path(path: PathLike, suffix: str | None = None):
    """Yield a temporary path beside `path`; move it into place only if the block succeeds.

    `suffix` keeps the extension on the temporary file for writers that look at it
    (".nii.gz", ".mrk.json"...); by default the destination's full suffix is used.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix is None:
        suffix = "".join(path.suffixes) or ".tmp"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name.split('.')[0]}-", suffix=suffix, dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual permissions
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(path: PathLike, text: str) -> None:
    """Write text to `path`: all of it, or nothing."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: PathLike, data) -> None:
    """Write `data` as indented JSON to `path`: all of it, or nothing."""
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")
