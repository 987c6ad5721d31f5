"""Offline teacher cache: the teacher's top-k log-probs over the user's examples, read as ``dv.TopK``.

Running a large teacher at every distillation step costs as much memory and
compute as the student. Instead the teacher is run once over the (tokenized)
examples and, for every position, its ``k`` largest log-probabilities
(full-vocabulary ``log_softmax`` at temperature 1) and their token ids are
stored, together with the log-prob it gives the next token (for its evaluation
loss). Distillation then reads them as a ``dv.TopK`` sparse teacher (top-k
buckets plus one tail bucket holding the remaining mass) with no teacher in
memory.

Layout of a cache folder::

    index.json                  format version, k, vocabulary size and tokenizer
                                fingerprint, dtypes, metadata, and per split
                                ("train", "eval"): its shards with file name,
                                sequences, tokens, size in bytes and SHA-256
    train_00000.safetensors     input_ids [n, T], attention_mask [n, T],
                                labels [n, T] (Hugging Face convention: not
                                shifted, -100 = not counted), indices [n, T, k],
                                logprobs [n, T, k], next_logprob [n, T]
    ...
    progress.json               while writing: the shards finished so far
                                (``write_teacher_cache(..., resume=True)`` continues)

Position ``t`` holds the teacher's distribution over the token at ``t + 1`` (what
the model predicts at ``t``). Shards are written atomically (temporary file,
fsync, rename) and checked on read against the size and checksum in the index:
a truncated or corrupted shard raises :class:`CorruptCacheError` naming the
file, never a wrong batch. ``index.json`` is written last: a folder without it
is an unfinished cache.

Size: ``k * (id bytes + log-prob bytes)`` per token plus the token, mask, label
and next-token log-prob (2 + 1 + 4 + 4 bytes), e.g. k = 32 with int16 ids and
float16 log-probs is 32 * 4 + 11 = 139 bytes/token (int32 ids above 32,767 tokens).

Compressed (``logprob_bits > 0``, format version 3; :mod:`divergent.data.cache_codec`):
``indices`` holds each token's ids bit-packed at ceil(log2 V) bits, ``logprobs`` the k + 1
bucket log-probs (top k and tail) quantised to ``logprob_bits`` bits on a per-token grid
whose low end is ``logprob_lo`` [n, T] (float32); the index records ``kl_bound_max``, the
largest KL(p ‖ p̂) the quantisation can cause at any token (Δ²/8). k = 32, V = 256 and 8
bits: 32 + 33 + 4 + 11 = 80 bytes/token. Version 2 caches (uncompressed) stay readable.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from divergent.data import cache_codec
from divergent.io import CorruptFileError, atomic_write_bytes, read_json, sha256_file, write_json

__all__ = [
    "CorruptCacheError",
    "TeacherCache",
    "write_teacher_cache",
    "teacher_topk",
    "CACHE_FORMAT_VERSION",
]

CACHE_FORMAT_VERSION = 2  # uncompressed; a compressed cache is version 3
COMPRESSED_FORMAT_VERSION = 3
_INDEX = "index.json"
_PROGRESS = "progress.json"
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_KEYS = ("input_ids", "attention_mask", "labels", "indices", "logprobs", "next_logprob")
_COMPRESSED_KEYS = (*_KEYS, "logprob_lo")


class CorruptCacheError(CorruptFileError):
    """A cache shard or its index does not match what was written."""


def _index_dtype(vocab_size: int) -> torch.dtype:
    # int16 holds ids < 32768 (byte-level and small vocabularies); int32 otherwise.
    return torch.int16 if vocab_size <= 32767 else torch.int32


@torch.no_grad()
def teacher_topk(
    teacher: torch.nn.Module | Callable[..., torch.Tensor],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    k: int,
    vocab_size: int,
    max_logits: int = 2**26,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(indices [B, T, k], logprobs [B, T, k], next_logprob [B, T])`` of a teacher on a batch.

    ``teacher``: a causal LM (its output layer's input and weight are used chunk by chunk,
    at most ``max_logits`` logits at a time), a module that gives its logits
    (:func:`divergent.models.hf.gives_logits`) or a function ``(input_ids, attention_mask) ->
    logits [B, T, V]``. ``next_logprob[:, t]`` is the log-prob of ``input_ids[:, t + 1]``
    (0 at the last position). A served teacher (:class:`divergent.models.served.ServedTeacher`,
    anything with ``served_topk``) answers the same triple from its server.
    """
    if hasattr(teacher, "served_topk"):
        return teacher.served_topk(input_ids.cpu(), attention_mask.cpu(), k=k, vocab_size=vocab_size)
    from divergent.models.hf import gives_logits, output_layer_input

    if gives_logits(teacher):  # e.g. a mixture of teachers: its logits (at T = 1, as every cache), not an output layer
        from divergent.models.hf import teacher_side

        teacher = lambda ids, mask, model=teacher: teacher_side(model, ids, mask, temperature=1.0)[1]  # noqa: E731
    if isinstance(teacher, torch.nn.Module):
        hidden, weight = output_layer_input(teacher, input_ids, attention_mask)
        logits_of = lambda rows: rows.float() @ weight.float().T  # noqa: E731
        flat = hidden.reshape(-1, hidden.shape[-1])
    else:
        logits = teacher(input_ids, attention_mask)
        logits_of = lambda rows: rows.float()  # noqa: E731
        flat = logits.reshape(-1, logits.shape[-1])
    batch, length = input_ids.shape
    next_ids = torch.cat([input_ids[:, 1:], input_ids[:, -1:]], dim=1).reshape(-1)
    chunk = max(1, max_logits // max(vocab_size, 1))
    indices, values, next_values = [], [], []
    for start in range(0, flat.shape[0], chunk):
        logits = logits_of(flat[start : start + chunk])
        if logits.shape[-1] < vocab_size:
            raise ValueError(f"the teacher gives {logits.shape[-1]} logits per token, vocab_size is {vocab_size}")
        logprobs = torch.log_softmax(logits[:, :vocab_size], dim=-1)
        top = logprobs.topk(k, dim=-1)
        indices.append(top.indices)
        values.append(top.values)
        next_values.append(logprobs.gather(1, next_ids[start : start + chunk, None].to(logprobs.device)).squeeze(1))
    next_logprob = torch.cat(next_values).reshape(batch, length)
    next_logprob[:, -1] = 0.0
    return (torch.cat(indices).reshape(batch, length, k), torch.cat(values).reshape(batch, length, k), next_logprob)


def _settings_hash(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


@torch.no_grad()
def write_teacher_cache(
    teacher: Any,
    splits: dict[str, Sequence[dict[str, Any]]],
    out_dir: str | Path,
    *,
    k: int,
    vocab_size: int,
    tokenizer_fingerprint: str = "",
    batch_size: int = 8,
    pad_token_id: int = 0,
    logprob_dtype: str = "float16",
    sequences_per_shard: int = 256,
    metadata: dict[str, Any] | None = None,
    device: str | torch.device = "cpu",
    resume: bool = False,
    progress_callback: Callable[[int], None] | None = None,
    logprob_bits: int = 0,
) -> dict[str, Any]:
    """Run the teacher over ``splits`` (``{"train": examples, "eval": examples}``) and write the cache.

    Examples are dicts with ``input_ids`` and ``labels`` (lists, Hugging Face convention),
    as :mod:`divergent.data.lm_data` makes them. ``resume=True`` keeps the shards a previous
    call with the same settings finished (``progress.json``) and continues after them.
    Returns the index (also written to ``out_dir/index.json``), with ``bytes_per_token``.
    ``progress_callback(n_sequences_done)`` is called after each batch. ``logprob_bits`` in
    [2, 16] writes a compressed cache (bit-packed ids, log-probs quantised to that many bits with
    the KL bound in the index; see the module docstring); 0 stores ``logprob_dtype`` values.
    """
    from divergent.data.lm_data import collate

    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= vocab_size:
        raise ValueError(f"k must be an int in [1, vocab_size={vocab_size}], got {k!r}")
    if logprob_dtype not in _DTYPES:
        raise ValueError(f"logprob_dtype must be one of {sorted(_DTYPES)}, got {logprob_dtype!r}")
    if isinstance(logprob_bits, bool) or not isinstance(logprob_bits, int) or not (
            logprob_bits == 0 or 2 <= logprob_bits <= 16):
        raise ValueError(f"logprob_bits must be 0 (no compression) or an int in [2, 16], got {logprob_bits!r}")
    for argument, value in (("sequences_per_shard", sequences_per_shard), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{argument} must be a positive int, got {value!r}")
    if not splits or not any(len(v) for v in splits.values()):
        raise ValueError("splits hold no examples; nothing to cache")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    index_dtype = _index_dtype(vocab_size)
    store_dtype = _DTYPES[logprob_dtype]
    compression = {"index_bits": cache_codec.id_bits(vocab_size), "logprob_bits": logprob_bits} if logprob_bits else None
    settings = {
        "format_version": COMPRESSED_FORMAT_VERSION if compression else CACHE_FORMAT_VERSION, "k": k, "vocab_size": vocab_size, "logprob_dtype": logprob_dtype,
        "sequences_per_shard": sequences_per_shard, "tokenizer": tokenizer_fingerprint,
        "examples": {name: hashlib.sha256(json.dumps([e["input_ids"] for e in examples]).encode()).hexdigest()[:16]
                     for name, examples in splits.items()},
    }
    if compression:
        settings["compression"] = compression
    key = _settings_hash(settings)
    progress_path = out_dir / _PROGRESS
    done: dict[str, list[dict[str, Any]]] = {name: [] for name in splits}
    if resume and progress_path.is_file():
        saved = read_json(progress_path, "teacher cache progress file")
        if saved.get("settings_hash") != key:
            raise ValueError(f"{progress_path} was written for other settings or data than this call; "
                             f"write the cache into a new folder (or delete {out_dir})")
        done = {name: list(saved["shards"].get(name, [])) for name in splits}
        for shards in done.values():
            for shard in shards:
                path = out_dir / shard["file"]
                if not path.is_file() or path.stat().st_size != shard["bytes"] or sha256_file(path) != shard["sha256"]:
                    raise CorruptCacheError(f"teacher cache: shard {path} listed in {progress_path} is missing or "
                                            f"damaged; write the cache into a new folder")
    else:
        (out_dir / _INDEX).unlink(missing_ok=True)  # an index only ever describes a finished cache
        progress_path.unlink(missing_ok=True)
        for stale in out_dir.glob("*.safetensors"):
            stale.unlink()
    (out_dir / _INDEX).unlink(missing_ok=True)
    if isinstance(teacher, torch.nn.Module):
        teacher.eval()

    def record_progress() -> None:
        write_json({"settings_hash": key, "shards": done}, progress_path)

    total = 0
    for name, examples in splits.items():
        skip = sum(s["sequences"] for s in done[name])
        total += skip
        pending: list[dict[str, torch.Tensor]] = []
        for start in range(skip, len(examples), batch_size):
            rows = list(examples[start : start + batch_size])
            batch = collate(rows, pad_token_id)
            ids = batch["input_ids"].to(device)
            mask = batch["attention_mask"].to(device)
            top_indices, top_values, next_logprob = teacher_topk(teacher, ids, mask, k=k, vocab_size=vocab_size)
            entry = {
                "input_ids": batch["input_ids"].to(index_dtype), "attention_mask": batch["attention_mask"].to(torch.uint8),
                "labels": batch["labels"].to(torch.int32), "indices": top_indices.to(index_dtype).cpu(),
                "logprobs": top_values.to(store_dtype).cpu(), "next_logprob": next_logprob.float().cpu(),
            }
            if compression:
                codes, lo = cache_codec.quantize_logprobs(top_values.cpu(), logprob_bits)
                entry.update(indices=cache_codec.pack_bits(top_indices.cpu(), compression["index_bits"]),
                             logprobs=cache_codec.pack_bits(codes, logprob_bits), logprob_lo=lo)
            pending.append(entry)
            total += len(rows)
            if sum(p["input_ids"].shape[0] for p in pending) >= sequences_per_shard or start + batch_size >= len(examples):
                done[name].append(_write_shard(out_dir, name, len(done[name]), pending, logprob_bits))
                pending = []
                record_progress()
            if progress_callback is not None:
                progress_callback(total)
    tokens = {name: sum(s["tokens"] for s in shards) for name, shards in done.items()}
    total_bytes = sum(s["bytes"] for shards in done.values() for s in shards)
    total_tokens = sum(tokens.values())
    if compression:
        bounds = [s["kl_bound_max"] for shards in done.values() for s in shards]
        compression = {**compression, "kl_bound_max": max(bounds)}
    index = {
        **settings,
        "index_dtype": str(index_dtype).removeprefix("torch."),
        "total_sequences": {name: sum(s["sequences"] for s in shards) for name, shards in done.items()},
        "total_tokens": total_tokens,
        "total_bytes": total_bytes,
        "bytes_per_token": total_bytes / max(total_tokens, 1),
        "splits": done,
        "metadata": metadata or {},
    }
    if compression:
        index["compression"] = compression
    write_json(index, out_dir / _INDEX)
    progress_path.unlink(missing_ok=True)
    return index


def _write_shard(out_dir: Path, split: str, number: int, pending: list[dict[str, torch.Tensor]],
                 logprob_bits: int = 0) -> dict[str, Any]:
    from safetensors.torch import save

    length = max(p["input_ids"].shape[1] for p in pending)

    def padded(tensor: torch.Tensor, key: str) -> torch.Tensor:
        extra = length - tensor.shape[1]
        if extra == 0:
            return tensor
        if key in ("indices", "logprobs", "next_logprob", "logprob_lo"):  # repeat the last position (a valid distribution)
            return torch.cat([tensor, tensor[:, -1:].expand(tensor.shape[0], extra, *tensor.shape[2:])], dim=1)
        fill = -100 if key == "labels" else 0
        return torch.cat([tensor, torch.full((tensor.shape[0], extra), fill, dtype=tensor.dtype)], dim=1)

    keys = _COMPRESSED_KEYS if "logprob_lo" in pending[0] else _KEYS
    tensors = {key: torch.cat([padded(p[key], key) for p in pending]).contiguous() for key in keys}
    name = f"{split}_{number:05d}.safetensors"
    path = out_dir / name
    atomic_write_bytes(path, save(tensors))
    n = tensors["input_ids"].shape[0]
    shard = {"file": name, "sequences": n, "tokens": int(tensors["attention_mask"].sum()), "length": length,
             "bytes": path.stat().st_size, "sha256": sha256_file(path)}
    if logprob_bits:  # the largest KL bound over the shard's real positions
        real = tensors["attention_mask"].bool()
        shard["kl_bound_max"] = float(cache_codec.kl_bound(tensors["logprob_lo"][real], logprob_bits).max()) \
            if bool(real.any()) else 0.0
    return shard


@dataclass
class _Shard:
    file: str
    sequences: int
    tokens: int
    bytes: int
    sha256: str
    first: int  # index of the shard's first sequence in the split


class TeacherCache:
    """Read one split of a cache written by :func:`write_teacher_cache`.

    :meth:`examples` gives rows as the trainer takes them (``input_ids``, ``labels`` and the
    per-position ``teacher_indices``/``teacher_logprobs``/``teacher_next_logprob``);
    :meth:`get` a padded batch ``(input_ids, labels, TopK)``. Each shard is verified (size and
    SHA-256 against the index) the first time it is read; :meth:`verify_all` checks every
    shard up front.

    >>> import tempfile, torch
    >>> d = tempfile.mkdtemp()
    >>> rows = [{"input_ids": [1, 2, 3, 4], "labels": [1, 2, 3, 4]}, {"input_ids": [5, 6], "labels": [-100, 6]}]
    >>> index = write_teacher_cache(lambda ids, mask: torch.randn(*ids.shape, 16), {"train": rows}, d, k=4, vocab_size=16)
    >>> cache = TeacherCache(d)
    >>> ids, labels, teacher = cache.get([0, 1])
    >>> tuple(teacher.indices.shape), len(cache), labels[1].tolist()
    ((2, 4, 4), 2, [-100, 6, -100, -100])
    """

    def __init__(self, directory: str | Path, split: str = "train", *, device: str | torch.device = "cpu") -> None:
        self.directory = Path(directory)
        self.split = split
        self.device = torch.device(device)
        index_path = self.directory / _INDEX
        if not self.directory.is_dir():
            raise FileNotFoundError(f"teacher cache: {self.directory} is not a folder (write one with `divergent cache-teacher`)")
        if not index_path.is_file():
            unfinished = " (progress.json is there: an unfinished cache; continue it with `divergent cache-teacher --resume`)" \
                if (self.directory / _PROGRESS).is_file() else ""
            raise FileNotFoundError(
                f"teacher cache: no {_INDEX} in {self.directory}{unfinished} (write one with `divergent cache-teacher`)"
            )
        self.index = read_json(index_path, "teacher cache index")
        version = self.index.get("format_version") if isinstance(self.index, dict) else None
        if version not in (CACHE_FORMAT_VERSION, COMPRESSED_FORMAT_VERSION) or (
                version == COMPRESSED_FORMAT_VERSION and not isinstance(self.index.get("compression"), dict)):
            raise CorruptCacheError(
                f"teacher cache: {index_path} has format_version {version!r}, this version of divergent reads "
                f"{CACHE_FORMAT_VERSION} (uncompressed) and {COMPRESSED_FORMAT_VERSION} (compressed, with its "
                f"'compression' entry); rebuild the cache with `divergent cache-teacher`"
            )
        self.compression = self.index.get("compression") if version == COMPRESSED_FORMAT_VERSION else None
        splits = self.index.get("splits", {})
        if split not in splits:
            raise ValueError(f"teacher cache {self.directory} has no {split!r} split; it has {sorted(splits)}")
        self.k = int(self.index["k"])
        self.vocab_size = int(self.index["vocab_size"])
        self.tokenizer = str(self.index.get("tokenizer", ""))
        self._shards: list[_Shard] = []
        first = 0
        for entry in splits[split]:
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
        if sha256_file(path) != shard.sha256:
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
                raise CorruptCacheError(f"teacher cache: cannot read shard {path}: {exc}") from None
            expected = self._shards[shard_id].sequences
            for key in _COMPRESSED_KEYS if self.compression else _KEYS:
                if key not in tensors or tensors[key].shape[0] != expected:
                    raise CorruptCacheError(f"teacher cache: shard {path} lacks {key!r} for {expected} sequences")
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

    def example(self, sequence: int) -> dict[str, Any]:
        """One row: ``input_ids``/``labels`` lists and ``teacher_*`` tensors over its real positions."""
        shard_id, row = self._locate(int(sequence))
        tensors = self._shard_tensors(shard_id)
        n = int(tensors["attention_mask"][row].sum())
        indices, logprobs = tensors["indices"][row, :n], tensors["logprobs"][row, :n]
        if self.compression:
            bits = int(self.compression["logprob_bits"])
            indices = cache_codec.unpack_bits(indices, int(self.compression["index_bits"]), self.k)
            codes = cache_codec.unpack_bits(logprobs, bits, self.k + 1)
            logprobs = cache_codec.dequantize_logprobs(codes, tensors["logprob_lo"][row, :n], bits)
        return {
            "input_ids": tensors["input_ids"][row, :n].long().tolist(),
            "labels": tensors["labels"][row, :n].long().tolist(),
            "teacher_indices": indices.long(),
            "teacher_logprobs": logprobs.float(),
            "teacher_next_logprob": tensors["next_logprob"][row, :n].float(),
        }

    def examples(self) -> list[dict[str, Any]]:
        """Every row of the split, in order."""
        return [self.example(i) for i in range(self._length)]

    def get(self, sequences) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """``(input_ids [B, T], labels [B, T], dv.TopK [B, T, k])`` padded to the longest row (labels -100)."""
        from divergent.data.lm_data import collate
        from divergent.functional.topk import TopK

        rows = [self.example(i) for i in sequences]
        if not rows:
            raise ValueError("get() needs at least one sequence index")
        batch = collate(rows, 0, extra=("teacher_indices", "teacher_logprobs"))
        teacher = TopK(batch["teacher_indices"].to(self.device), batch["teacher_logprobs"].to(self.device))
        return batch["input_ids"].to(self.device), batch["labels"].to(self.device), teacher

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, Any]]:
        """All sequences in order, ``batch_size`` at a time."""
        for start in range(0, self._length, batch_size):
            yield self.get(range(start, min(start + batch_size, self._length)))

    def describe(self) -> str:
        tokens = sum(s.tokens for s in self._shards)
        packed = "" if not self.compression else (
            f", ids {self.compression['index_bits']} bits, log-probs {self.compression['logprob_bits']} bits "
            f"(KL error ≤ {self.compression['kl_bound_max']:.2g} nats/token)")
        return (f"{self.directory} ({self.split} split): {self._length} sequences, {tokens:,} tokens, k={self.k}, "
                f"{self.index['total_bytes'] / 1e6:.2f} MB in all, {self.bytes_per_token:.1f} bytes/token{packed}")
