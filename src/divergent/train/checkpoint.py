"""Atomic checkpoints: a run interrupted at any moment keeps its last complete checkpoint.

A checkpoint is written to a temporary file in the same folder, flushed to disk,
and moved over the final name with :func:`os.replace`, which is atomic on POSIX
and Windows. A reader therefore sees either the previous checkpoint or the new
one, never a half-written file.
"""

from __future__ import annotations

import io
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["save_checkpoint", "load_checkpoint", "latest_checkpoint", "atomic_write_bytes"]

_STEP_PATTERN = re.compile(r"step_(\d+)\.pt$")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file in the same folder, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def save_checkpoint(path: str | os.PathLike, obj: Any) -> Path:
    """Save ``obj`` with :func:`torch.save` to ``path`` atomically; returns the path.

    >>> import tempfile, torch
    >>> d = tempfile.mkdtemp()
    >>> p = save_checkpoint(f"{d}/step_3.pt", {"w": torch.ones(2)})
    >>> load_checkpoint(p)["w"].tolist()
    [1.0, 1.0]
    """
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """Load a checkpoint written by :func:`save_checkpoint`.

    Raises ``FileNotFoundError`` naming the path when it does not exist, and
    ``ValueError`` when the file is not a readable checkpoint (truncated or corrupt).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # torch.load raises pickle, runtime, EOF and zip errors for bad files
        raise ValueError(f"checkpoint {path} is not readable (truncated or corrupt): {exc}") from exc


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The checkpoint ``step_N.pt`` with the largest N in ``run_dir`` (searched recursively), or None."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return None
    best: tuple[int, Path] | None = None
    for candidate in run_dir.rglob("step_*.pt"):
        match = _STEP_PATTERN.search(candidate.name)
        if match and (best is None or int(match.group(1)) > best[0]):
            best = (int(match.group(1)), candidate)
    return None if best is None else best[1]
