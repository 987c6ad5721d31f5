"""Offline teacher cache: the teacher's top-k log-probs, written once, read as ``dv.TopK``.

Running a large teacher at every distillation step costs as much memory and
compute as the student. Instead the teacher is run once over the training
sequences and, for every position, its ``k`` largest log-probabilities
(full-vocabulary ``log_softmax`` at temperature 1) and their token ids are
stored. Distillation then reads them as a ``dv.TopK`` sparse teacher (top-k
buckets plus one tail bucket holding the remaining mass) with no teacher in
memory.

Layout of a cache folder::

    index.json                  format version, k, vocab size, sequence length,
                                dtypes, and per shard: file name, sequences,
                                tokens, size in bytes and SHA-256
    shard_00000.safetensors     input_ids [n, T], labels [n, T],
                                indices [n, T, k], logprobs [n, T, k]
    ...

Shards are written atomically (temporary file, fsync, rename) and checked on
read against the size and checksum in the index: a truncated or corrupted
shard raises :class:`CorruptCacheError` naming the file, never a wrong batch.

Size: ``k * (index bytes + log-prob bytes)`` per token plus the ids, e.g.
k = 32 with int16 ids and float16 log-probs is 32 * 4 + 4 = 132 bytes/token.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CorruptCacheError",
    "TeacherCache",
    "write_teacher_cache",
    "CACHE_FORMAT_VERSION",
]

CACHE_FORMAT_VERSION = 1
_INDEX = "index.json"
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class CorruptCacheError(ValueError):
    """A cache shard or its index does not match what was written."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _index_dtype(vocab_size: int) -> torch.dtype:
    # int16 holds ids < 32768 (byte-level and small vocabularies); int32 otherwise.
    return torch.int16 if vocab_size <= 32767 else torch.int32


def _atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save

    from divergent.train.checkpoint import atomic_write_bytes

    atomic_write_bytes(path, save({k: v.contiguous() for k, v in tensors.items()}))


@torch.no_grad()
def write_teacher_cache(
    teacher_logits_fn,
    sequences: Iterable[tuple[torch.Tensor, torch.Tensor]],
    out_dir: str | Path,
    *,
    k: int,
    vocab_size: int,
    logprob_dtype: str = "float16",
    sequences_per_shard: int = 256,
    metadata: dict[str, Any] | None = None,
    progress_callback=None,
) -> dict[str, Any]:
    """Run the teacher over ``sequences`` and write the top-``k`` cache to ``out_dir``.

    ``teacher_logits_fn(input_ids [B, T]) -> logits [B, T, V]``;
    ``sequences`` yields ``(input_ids [B, T], labels [B, T])`` batches (labels
    are stored for the hard-label term; -100 = masked). Returns the index dict
    (also written to ``out_dir/index.json``), including ``bytes_per_token``.
    ``progress_callback(n_sequences_done)`` is called after each batch.
    """
    if not isinstance(k, int) or not 1 <= k <= vocab_size:
        raise ValueError(f"k must be an int in [1, vocab_size={vocab_size}], got {k!r}")
    if logprob_dtype not in _DTYPES:
        raise ValueError(f"logprob_dtype must be one of {sorted(_DTYPES)}, got {logprob_dtype!r}")
    if not isinstance(sequences_per_shard, int) or sequences_per_shard < 1:
        raise ValueError(f"sequences_per_shard must be a positive int, got {sequences_per_shard!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if (out_dir / _INDEX).exists():
        (out_dir / _INDEX).unlink()  # an index only ever describes a finished cache
    for stale in out_dir.glob("shard_*.safetensors"):
        stale.unlink()
    index_dtype = _index_dtype(vocab_size)
    store_dtype = _DTYPES[logprob_dtype]

    shards: list[dict[str, Any]] = []
    pending: dict[str, list[torch.Tensor]] = {"input_ids": [], "labels": [], "indices": [], "logprobs": []}
    seq_len = None
    done = 0

    def flush() -> None:
        if not pending["input_ids"]:
            return
        tensors = {key: torch.cat(values) for key, values in pending.items()}
        name = f"shard_{len(shards):05d}.safetensors"
        path = out_dir / name
        _atomic_save_safetensors(tensors, path)
        n = tensors["input_ids"].shape[0]
        shards.append(
            {
                "file": name,
                "sequences": n,
                "tokens": n * tensors["input_ids"].shape[1],
                "bytes": path.stat().st_size,
                "sha256": _sha256(path),
            }
        )
        for values in pending.values():
            values.clear()

    for input_ids, labels in sequences:
        if input_ids.dim() != 2 or labels.shape != input_ids.shape:
            raise ValueError(
                f"sequences must yield input_ids and labels of the same shape [B, T], got "
                f"{tuple(input_ids.shape)} and {tuple(labels.shape)}"
            )
        if seq_len is None:
            seq_len = input_ids.shape[1]
        elif input_ids.shape[1] != seq_len:
            raise ValueError(f"all sequences must have length {seq_len}, got {input_ids.shape[1]}")
        logits = teacher_logits_fn(input_ids)
        if logits.shape[-1] < vocab_size:
            raise ValueError(f"teacher gives {logits.shape[-1]} logits per token, vocab_size is {vocab_size}")
        logprobs = torch.log_softmax(logits[..., :vocab_size].float(), dim=-1)
        top_values, top_indices = logprobs.topk(k, dim=-1)
        pending["input_ids"].append(input_ids.to(index_dtype).cpu())
        pending["labels"].append(labels.to(torch.int32 if index_dtype == torch.int32 else torch.int16).cpu())
        pending["indices"].append(top_indices.to(index_dtype).cpu())
        pending["logprobs"].append(top_values.to(store_dtype).cpu())
        done += input_ids.shape[0]
        if sum(t.shape[0] for t in pending["input_ids"]) >= sequences_per_shard:
            flush()
        if progress_callback is not None:
            progress_callback(done)
    flush()
    if not shards:
        raise ValueError("sequences yielded no batches; nothing to cache")

    total_tokens = sum(s["tokens"] for s in shards)
    total_bytes = sum(s["bytes"] for s in shards)
    index = {
        "format_version": CACHE_FORMAT_VERSION,
        "k": k,
        "vocab_size": vocab_size,
        "seq_len": seq_len,
        "index_dtype": str(index_dtype).removeprefix("torch."),
        "logprob_dtype": logprob_dtype,
        "total_sequences": sum(s["sequences"] for s in shards),
        "total_tokens": total_tokens,
        "total_bytes": total_bytes,
        "bytes_per_token": total_bytes / total_tokens,
        "shards": shards,
        "metadata": metadata or {},
    }
    from divergent.train.checkpoint import atomic_write_bytes

    atomic_write_bytes(out_dir / _INDEX, json.dumps(index, indent=2).encode())
    return index


@dataclass
class _Shard:
    file: str
    sequences: int
    tokens: int
    bytes: int
    sha256: str
    first: int  # index of the shard's first sequence in the whole cache


class TeacherCache:
    """Read a cache written by :func:`write_teacher_cache`.

    ``cache[i]`` / :meth:`get` give ``(input_ids, labels, TopK)`` for sequence
    indices; :meth:`batches` iterates over the whole cache. Each shard is
    verified (size and SHA-256 against the index) the first time it is read;
    ``verify_all()`` checks every shard up front.

    >>> import tempfile, torch
    >>> d = tempfile.mkdtemp()
    >>> batches = [(torch.randint(0, 16, (2, 5)), torch.randint(0, 16, (2, 5)))]
    >>> index = write_teacher_cache(lambda ids: torch.randn(*ids.shape, 16), batches, d, k=4, vocab_size=16)
    >>> cache = TeacherCache(d)
    >>> ids, labels, teacher = cache.get([0, 1])
    >>> tuple(teacher.indices.shape), len(cache)
    ((2, 5, 4), 2)
    """

    def __init__(self, directory: str | Path, *, device: str | torch.device = "cpu") -> None:
        self.directory = Path(directory)
        self.device = torch.device(device)
        index_path = self.directory / _INDEX
        if not index_path.is_file():
            raise FileNotFoundError(
                f"teacher cache: no {_INDEX} in {self.directory} (write one with "
                "`divergent cache-teacher` or write_teacher_cache)"
            )
        try:
            self.index = json.loads(index_path.read_text())
        except json.JSONDecodeError as exc:
            raise CorruptCacheError(f"teacher cache: {index_path} is not valid JSON ({exc})") from exc
        if self.index.get("format_version") != CACHE_FORMAT_VERSION:
            raise CorruptCacheError(
                f"teacher cache: {index_path} has format_version {self.index.get('format_version')!r}, "
                f"this version of divergent reads {CACHE_FORMAT_VERSION}"
            )
        self.k = int(self.index["k"])
        self.vocab_size = int(self.index["vocab_size"])
        self.seq_len = int(self.index["seq_len"])
        self._shards: list[_Shard] = []
        first = 0
        for entry in self.index["shards"]:
            self._shards.append(_Shard(first=first, **{key: entry[key] for key in ("file", "sequences", "tokens", "bytes", "sha256")}))
            first += entry["sequences"]
        self._length = first
        self._loaded: dict[int, dict[str, torch.Tensor]] = {}
        self._verified: set[int] = set()

    def __len__(self) -> int:
        return self._length

    @property
    def bytes_per_token(self) -> float:
        return float(self.index["bytes_per_token"])

    def _verify(self, shard_id: int) -> Path:
        shard = self._shards[shard_id]
        path = self.directory / shard.file
        if shard_id in self._verified:
            return path
        if not path.is_file():
            raise CorruptCacheError(f"teacher cache: shard {path} listed in the index is missing")
        size = path.stat().st_size
        if size != shard.bytes:
            raise CorruptCacheError(
                f"teacher cache: shard {path} has {size} bytes, the index says {shard.bytes} "
                "(truncated or overwritten); rebuild the cache with `divergent cache-teacher`"
            )
        if _sha256(path) != shard.sha256:
            raise CorruptCacheError(
                f"teacher cache: shard {path} fails its SHA-256 check (corrupted); rebuild the "
                "cache with `divergent cache-teacher`"
            )
        self._verified.add(shard_id)
        return path

    def verify_all(self) -> None:
        """Check every shard's size and checksum (raises CorruptCacheError)."""
        for shard_id in range(len(self._shards)):
            self._verify(shard_id)

    def _shard_tensors(self, shard_id: int) -> dict[str, torch.Tensor]:
        if shard_id not in self._loaded:
            from safetensors.torch import load_file

            path = self._verify(shard_id)
            try:
                tensors = load_file(str(path))
            except Exception as exc:  # safetensors raises its own error types
                raise CorruptCacheError(f"teacher cache: cannot read shard {path}: {exc}") from exc
            expected = self._shards[shard_id].sequences
            for key in ("input_ids", "labels", "indices", "logprobs"):
                if key not in tensors or tensors[key].shape[0] != expected:
                    raise CorruptCacheError(
                        f"teacher cache: shard {path} lacks {key!r} for {expected} sequences"
                    )
            # Keep at most a few shards decoded; a cache can be larger than memory.
            if len(self._loaded) >= 4:
                self._loaded.pop(next(iter(self._loaded)))
            self._loaded[shard_id] = tensors
        return self._loaded[shard_id]

    def _locate(self, sequence: int) -> tuple[int, int]:
        if not 0 <= sequence < self._length:
            raise IndexError(f"sequence index {sequence} out of range for a cache of {self._length}")
        for shard_id, shard in enumerate(self._shards):
            if sequence < shard.first + shard.sequences:
                return shard_id, sequence - shard.first
        raise IndexError(sequence)  # unreachable

    def get(self, sequences: Iterable[int]) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """``(input_ids [B, T] int64, labels [B, T] int64, dv.TopK [B, T, k])``."""
        from divergent.functional.topk import TopK

        parts: dict[str, list[torch.Tensor]] = {"input_ids": [], "labels": [], "indices": [], "logprobs": []}
        for sequence in sequences:
            shard_id, row = self._locate(int(sequence))
            tensors = self._shard_tensors(shard_id)
            for key in parts:
                parts[key].append(tensors[key][row])
        if not parts["input_ids"]:
            raise ValueError("get() needs at least one sequence index")
        stacked = {key: torch.stack(values).to(self.device) for key, values in parts.items()}
        teacher = TopK(stacked["indices"].long(), stacked["logprobs"].float())
        return stacked["input_ids"].long(), stacked["labels"].long(), teacher

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, Any]]:
        """All sequences in order, ``batch_size`` at a time."""
        for start in range(0, self._length, batch_size):
            yield self.get(range(start, min(start + batch_size, self._length)))

    def describe(self) -> str:
        return (
            f"{self._length} sequences x {self.seq_len} tokens, k={self.k}, "
            f"{self.index['total_bytes'] / 1e6:.2f} MB, {self.bytes_per_token:.1f} bytes/token"
        )

