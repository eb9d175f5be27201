"""Network weights on disk: safetensors files checked by their SHA-256, written atomically.

safetensors holds plain tensors and cannot execute code; a pickle or a PyTorch checkpoint
offered instead is recognised by its first bytes and refused. Nothing here unpickles. Tensors
travel as numpy arrays, so reading and writing files needs no torch.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from ..errors import VertebraIDError
from .files import PathLike, atomic_path


def sha256_file(path: PathLike) -> str:
    """The file's SHA-256 (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_weights(state: dict[str, np.ndarray], path: PathLike, file_format: str) -> str:
    """Arrays to a safetensors file, atomically; returns the file's SHA-256."""
    from safetensors.numpy import save_file

    with atomic_path(path) as tmp:
        save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(tmp), metadata={"format": file_format})
        os.chmod(tmp, 0o644)  # save_file creates a new file with the temporary's 0600 mode
        digest = sha256_file(tmp)
    return digest


def read_weights(path: PathLike, sha256: str | None, what: str) -> dict[str, np.ndarray]:
    """The arrays of a safetensors file (whose SHA-256 matches, when one is given); `what` names it in errors."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = Path(path)
    refuse_pickle(path)
    if sha256 is not None and sha256_file(path) != str(sha256).lower():
        raise VertebraIDError(
            f"The {what} '{path.name}' does not match its checksum: the file is corrupt or was modified."
        )
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise VertebraIDError(f"The {what} '{path.name}' is not a readable safetensors file.") from exc


_PICKLE_PREFIXES = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05", b"PK\x03\x04")


def refuse_pickle(path: PathLike) -> None:
    """One sentence for a pickle or PyTorch checkpoint offered as a safetensors file."""
    with open(path, "rb") as fh:
        head = fh.read(8)
    if head.startswith(_PICKLE_PREFIXES):
        raise VertebraIDError(
            f"'{path}' is a pickle or PyTorch checkpoint, not a safetensors model; VertebraID never unpickles files."
        )
