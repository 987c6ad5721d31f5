"""Checkpoint files of the trainers: checksummed, atomic, loaded without unpickling code.

Thin names over :mod:`divergent.io` (the format) kept for the trainers and for users'
scripts; new code uses :class:`divergent.train.run.Checkpointer`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from divergent.io import atomic_write_bytes, load_state, save_state

__all__ = ["save_checkpoint", "load_checkpoint", "latest_checkpoint", "atomic_write_bytes"]

_STEP_PATTERN = re.compile(r"step_(\d+)\.(pt|ckpt)$")


def save_checkpoint(path: str | os.PathLike, obj: Any) -> Path:
    """Save ``obj`` (tensors and plain values) checksummed and atomically; returns the path.

    >>> import tempfile, torch
    >>> d = tempfile.mkdtemp()
    >>> p = save_checkpoint(f"{d}/step_3.ckpt", {"w": torch.ones(2)})
    >>> load_checkpoint(p)["w"].tolist()
    [1.0, 1.0]
    """
    return save_state(path, obj)


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """Load a checkpoint written by :func:`save_checkpoint` after verifying its checksum.

    ``FileNotFoundError`` naming the path when it does not exist; :class:`divergent.io.CorruptFileError`
    (a ``ValueError``) when it is truncated, altered or not a divergent checkpoint. Never unpickles
    arbitrary objects.
    """
    return load_state(path, map_location=map_location)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The checkpoint ``step_N.ckpt`` with the largest N in ``run_dir`` (searched recursively), or None."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return None
    best: tuple[int, Path] | None = None
    for candidate in run_dir.rglob("step_*"):
        match = _STEP_PATTERN.search(candidate.name)
        if match and (best is None or int(match.group(1)) > best[0]):
            best = (int(match.group(1)), candidate)
    return None if best is None else best[1]
