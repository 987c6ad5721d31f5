"""Files a run depends on: written atomically, checksummed, and loaded without executing code.

Every file a resume reads (settings, per-row results, checkpoints) goes through
this module:

- :func:`atomic_write_bytes` writes to a temporary file in the same folder,
  flushes it to disk and renames it over the target (``os.replace`` is atomic),
  so a reader sees the old file or the new one, never half of one — whatever
  kills the process (Ctrl-C, SIGKILL, a full disk).
- :func:`save_state` / :func:`load_state` store nested dicts of tensors and
  plain Python values (model and optimiser states, RNG states, histories) as a
  checksummed ``torch.save`` payload. Loading verifies the SHA-256 before
  anything is parsed and then uses ``torch.load(weights_only=True)``, which
  refuses arbitrary pickled objects: a checkpoint or cache someone else wrote
  cannot execute code, and a flipped bit is reported, not loaded.
- :func:`read_json` / :func:`read_yaml` turn missing, empty and malformed files
  into errors that name the file (and the line, for YAML).

Write failures (read-only folder, full disk) raise :class:`WriteError`, an
``OSError`` whose message names the path and the reason.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "CorruptFileError",
    "WriteError",
    "atomic_write_bytes",
    "atomic_write_text",
    "write_json",
    "read_json",
    "write_yaml",
    "read_yaml",
    "save_state",
    "load_state",
    "is_state_file",
    "sha256_file",
    "cache_dir",
]


class CorruptFileError(ValueError):
    """A file exists but cannot be trusted: empty, truncated, a checksum mismatch, or unparsable."""


class WriteError(OSError):
    """A file could not be written (read-only folder, full disk, …); the message names the path."""


_HINTS = {
    errno.ENOSPC: "the disk is full; free space or choose another output folder",
    errno.EDQUOT: "the disk quota is exceeded; free space or choose another output folder",
    errno.EROFS: "the file system is read-only; choose another output folder",
    errno.EACCES: "permission denied; choose a folder you can write to",
    errno.EPERM: "permission denied; choose a folder you can write to",
}


def _write_error(path: Path, exc: OSError) -> WriteError:
    reason = exc.strerror or str(exc)
    hint = _HINTS.get(exc.errno or -1)
    message = f"cannot write {path}: {reason}" + (f" ({hint})" if hint else "")
    error = WriteError(exc.errno or 0, message)
    error.filename = str(path)
    return error


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temporary file in the same folder, fsync, rename).

    >>> import tempfile
    >>> p = atomic_write_bytes(Path(tempfile.mkdtemp()) / "a.txt", b"hello")
    >>> p.read_bytes()
    b'hello'
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        raise _write_error(path, exc) from exc
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def write_json(obj: Any, path: str | os.PathLike) -> Path:
    """Write ``obj`` as indented JSON, atomically (paths, 0-d tensors and arrays become plain values)."""
    return atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def _read_text(path: Path, what: str) -> str:
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    if path.is_dir():
        raise IsADirectoryError(f"{what} {path} is a folder; expected a file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CorruptFileError(f"{what} {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if not text.strip():
        raise CorruptFileError(f"{what} {path} is empty")
    return text


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    """Parse a JSON file; a missing, empty or malformed file raises an error naming it."""
    path = Path(path)
    text = _read_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise CorruptFileError(f"{what} {path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None


def write_yaml(obj: Any, path: str | os.PathLike) -> Path:
    """Write ``obj`` as YAML (keys in the given order), atomically."""
    return atomic_write_text(path, yaml.safe_dump(obj, sort_keys=False, allow_unicode=True))


def read_yaml(path: str | os.PathLike, what: str = "YAML file", *, allow_empty: bool = False) -> Any:
    """Parse a YAML file; syntax errors name the file and the line.

    >>> import tempfile
    >>> p = Path(tempfile.mkdtemp()) / "bad.yaml"
    >>> _ = p.write_text("a: 1\\nb: [2\\n")
    >>> try:
    ...     read_yaml(p)
    ... except CorruptFileError as exc:
    ...     print(str(exc).split(" is ")[1])
    not valid YAML (line 3, column 1: expected ',' or ']', but got '<stream end>')
    """
    path = Path(path)
    if allow_empty and path.is_file() and not path.read_text(encoding="utf-8", errors="replace").strip():
        return None
    text = _read_text(path, what)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "unknown position"
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise CorruptFileError(f"{what} {path} is not valid YAML ({where}: {problem})") from None


# ------------------------------------------------------------------ checksummed state files

_MAGIC = b"DIVERGENT-STATE v1\n"
_DIGEST_LEN = 64  # hex SHA-256


def save_state(path: str | os.PathLike, obj: Any) -> Path:
    """Save ``obj`` (tensors, dicts, lists, tuples, numbers, strings, None) checksummed and atomically.

    The file is a short header, the SHA-256 of the payload and a ``torch.save`` payload.
    Objects that ``torch.load(weights_only=True)`` would refuse (arbitrary classes,
    ``pathlib.Path``, NumPy arrays) are refused here already, so that nothing is
    written that cannot be read back.

    >>> import tempfile, torch
    >>> p = save_state(Path(tempfile.mkdtemp()) / "state.ckpt", {"w": torch.ones(2), "step": 3})
    >>> load_state(p)["step"]
    3
    """
    import torch

    _check_plain(obj, str(path), "state")
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    payload = buffer.getvalue()
    digest = hashlib.sha256(payload).hexdigest().encode("ascii")
    return atomic_write_bytes(path, _MAGIC + digest + b"\n" + payload)


def _check_plain(obj: Any, path: str, where: str) -> None:
    """Refuse what ``torch.load(weights_only=True)`` could not read back (checked before writing)."""
    import collections

    import torch

    if obj is None or isinstance(obj, (bool, int, float, str, torch.Tensor, torch.dtype,
                                       torch.device, torch.Size)):
        return
    if isinstance(obj, (dict, collections.OrderedDict)):
        for key, value in obj.items():
            _check_plain(key, path, f"{where} key")
            _check_plain(value, path, f"{where}[{key!r}]")
        return
    if isinstance(obj, (list, tuple)):
        for index, value in enumerate(obj):
            _check_plain(value, path, f"{where}[{index}]")
        return
    raise TypeError(
        f"cannot save state to {path}: {where} is a {type(obj).__module__}.{type(obj).__name__}, which "
        f"could only be loaded by unpickling arbitrary code; store tensors, dicts, lists, tuples, numbers, "
        f"strings or None (e.g. str(path), tensor.tolist())"
    )


def is_state_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` starts like a file written by :func:`save_state`."""
    try:
        with open(path, "rb") as handle:
            return handle.read(len(_MAGIC)) == _MAGIC
    except OSError:
        return False


def load_state(path: str | os.PathLike, map_location: Any = "cpu", what: str = "checkpoint") -> Any:
    """Load a file written by :func:`save_state`, after checking its SHA-256.

    Raises ``FileNotFoundError`` naming the path when it is missing and
    :class:`CorruptFileError` when it is empty, truncated, altered, or not such a file.
    Never unpickles arbitrary objects (``weights_only=True``).
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    data = path.read_bytes()
    if not data:
        raise CorruptFileError(f"{what} {path} is empty")
    if not data.startswith(_MAGIC):
        raise CorruptFileError(
            f"{what} {path} is not a divergent state file (no '{_MAGIC.decode().strip()}' header); "
            f"it may be from an older version, or another program's file"
        )
    header_end = len(_MAGIC) + _DIGEST_LEN
    stored = data[len(_MAGIC):header_end].decode("ascii", errors="replace")
    payload = data[header_end + 1:]
    actual = hashlib.sha256(payload).hexdigest()
    if len(data) < header_end + 1 or stored != actual:
        raise CorruptFileError(
            f"{what} {path} is corrupt: its SHA-256 checksum does not match its contents "
            f"(truncated or altered); it was not loaded"
        )
    try:
        return torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
    except Exception as exc:
        raise CorruptFileError(f"{what} {path} could not be read: {str(exc).splitlines()[0][:300]}") from None


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def cache_dir() -> Path:
    """Where cached teachers and warm-started models live.

    ``$DIVERGENT_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/divergent``, else
    ``~/.cache/divergent``. Created on first use.
    """
    env = os.environ.get("DIVERGENT_CACHE_DIR")
    if env:
        root = Path(env)
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = (Path(xdg) if xdg else Path.home() / ".cache") / "divergent"
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _write_error(root, exc) from exc
    return root
