"""A byte-level text corpus that every machine has: the Python standard library's source.

The default corpus of ``divergent distill-lm`` is the ``*.py`` files directly
inside ``sysconfig.get_paths()["stdlib"]`` (no site-packages, no tests folder),
in sorted order so the corpus is the same on every run. Files are split into
train and validation *by file* (every ``round(1 / val_fraction)``-th file goes
to validation), so no validation text was seen in training. Each split is
capped at a number of bytes to keep CPU runs short. Tokens are raw bytes
(vocabulary 256), so bits per byte = cross-entropy in nats / ln 2.

>>> corpus = load_stdlib_corpus(max_train_bytes=20_000, max_val_bytes=5_000)
>>> corpus.train.dtype, len(corpus.train) <= 20_000, len(corpus.val) <= 5_000
(torch.uint8, True, True)
>>> set(corpus.train_files).isdisjoint(corpus.val_files)
True
"""

from __future__ import annotations

import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = [
    "BYTE_VOCAB_SIZE",
    "ByteCorpus",
    "stdlib_source_files",
    "load_text_corpus",
    "load_stdlib_corpus",
    "random_windows",
    "sequential_windows",
    "encode_text",
    "decode_bytes",
]

BYTE_VOCAB_SIZE = 256


@dataclass
class ByteCorpus:
    """Train and validation byte streams (``torch.uint8``) and the files they came from."""

    train: torch.Tensor
    val: torch.Tensor
    train_files: list[str] = field(default_factory=list)
    val_files: list[str] = field(default_factory=list)

    def describe(self) -> str:
        return (
            f"{len(self.train):,} train bytes from {len(self.train_files)} files, "
            f"{len(self.val):,} val bytes from {len(self.val_files)} files"
        )


def encode_text(text: str) -> torch.Tensor:
    """UTF-8 bytes of ``text`` as a ``torch.uint8`` tensor."""
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).clone()


def decode_bytes(ids: torch.Tensor) -> str:
    """Inverse of :func:`encode_text` (invalid UTF-8 sequences are replaced)."""
    return bytes(ids.to(torch.uint8).tolist()).decode("utf-8", errors="replace")


def stdlib_source_files(root: str | Path | None = None) -> list[Path]:
    """The standard library's top-level ``*.py`` files, sorted by name."""
    root = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
    files = sorted(path for path in root.glob("*.py") if path.is_file())
    if not files:
        raise FileNotFoundError(f"no *.py files found in {root}")
    return files


def _read_capped(files: list[Path], max_bytes: int) -> tuple[bytes, list[str]]:
    chunks, used, total = [], [], 0
    for path in files:
        if total >= max_bytes:
            break
        data = path.read_bytes()[: max_bytes - total]
        chunks.append(data + b"\n")
        used.append(str(path))
        total += len(data) + 1
    return b"".join(chunks)[:max_bytes], used


def load_text_corpus(
    files: list[str | Path],
    *,
    val_fraction: float = 0.1,
    max_train_bytes: int = 2_000_000,
    max_val_bytes: int = 200_000,
) -> ByteCorpus:
    """Byte corpus from ``files`` (order kept), split into train/val by file.

    Every ``round(1 / val_fraction)``-th file (starting with the first) is a
    validation file; the rest are training files. Each split stops after
    ``max_*_bytes`` bytes.
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    for argument, value in (("max_train_bytes", max_train_bytes), ("max_val_bytes", max_val_bytes)):
        if not isinstance(value, int) or value < 2:
            raise ValueError(f"{argument} must be an int >= 2, got {value!r}")
    paths = [Path(f) for f in files]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"text corpus files not found: {', '.join(missing[:5])}")
    if len(paths) < 2:
        raise ValueError(f"need at least 2 files to split train/val by file, got {len(paths)}")
    every = max(2, round(1 / val_fraction))
    val_files = [p for i, p in enumerate(paths) if i % every == 0]
    train_files = [p for i, p in enumerate(paths) if i % every != 0]
    train_bytes, train_used = _read_capped(train_files, max_train_bytes)
    val_bytes, val_used = _read_capped(val_files, max_val_bytes)
    return ByteCorpus(
        train=torch.frombuffer(bytearray(train_bytes), dtype=torch.uint8).clone(),
        val=torch.frombuffer(bytearray(val_bytes), dtype=torch.uint8).clone(),
        train_files=train_used,
        val_files=val_used,
    )


def load_stdlib_corpus(
    *,
    val_fraction: float = 0.1,
    max_train_bytes: int = 2_000_000,
    max_val_bytes: int = 200_000,
    root: str | Path | None = None,
) -> ByteCorpus:
    """The standard-library corpus (see the module docstring)."""
    return load_text_corpus(
        stdlib_source_files(root),
        val_fraction=val_fraction,
        max_train_bytes=max_train_bytes,
        max_val_bytes=max_val_bytes,
    )


def random_windows(
    data: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of random windows for next-token training.

    Returns ``input_ids = data[s : s + seq_len]`` and
    ``labels = data[s + 1 : s + seq_len + 1]`` for ``batch_size`` random starts
    ``s``, both int64 ``[batch_size, seq_len]``.
    """
    if len(data) < seq_len + 1:
        raise ValueError(f"data has {len(data)} tokens, need at least seq_len + 1 = {seq_len + 1}")
    starts = torch.randint(0, len(data) - seq_len, (batch_size,), generator=generator)
    offsets = torch.arange(seq_len + 1)
    windows = data[starts[:, None] + offsets].long()
    return windows[:, :-1], windows[:, 1:]


def sequential_windows(
    data: torch.Tensor, seq_len: int, max_windows: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-overlapping windows covering ``data`` in order (for evaluation).

    Returns ``(input_ids, labels)`` int64 ``[n, seq_len]`` with labels shifted
    by one; the tail shorter than a window is dropped.
    """
    n = (len(data) - 1) // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n < 1:
        raise ValueError(f"data has {len(data)} tokens, need at least seq_len + 1 = {seq_len + 1}")
    inputs = data[: n * seq_len].view(n, seq_len).long()
    labels = data[1 : n * seq_len + 1].view(n, seq_len).long()
    return inputs, labels
