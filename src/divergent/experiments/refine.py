"""``divergent refine-data``: MiniPLM's difference sampling on a user's corpus (or an embedded one).

Every unit of the data (a row, or with ``packing`` a chunk of ``max_length`` teacher tokens
of the concatenated rows, the official unit) is scored by

    score = mean log p_teacher - mean log p_reference

(:mod:`divergent.data.difference` says which tokens count, after the official code), the
``int(keep * N)`` units with the largest scores are kept (ties: the earlier unit) and written
back in corpus order, in the input's own format. The run folder holds ``data.<ext>`` (the
kept rows), ``scores.parquet`` (per unit: id, both mean log-probs, score, kept, tokens),
``scores.png`` (a histogram with the cut), ``report.md`` and ``results.json``.

Scale: the corpus is read as a stream, ``rows_per_shard`` units at a time; each shard's
scores are written atomically and checksummed (``shards/shard_<k>.ckpt``), so a run killed
at any point continues with ``--resume RUN_DIR`` from the shards on disk to the same output.
Under ``torchrun`` rank r scores the shards k with k mod world = r and rank 0 merges.

With no teacher, reference or data it runs on embedded parts: the default byte-level
teacher of ``distill-lm`` (cached), a small reference trained once on a held-out slice of
the standard-library corpus (cached), and a corpus of ``hard`` rows (held-out standard
library source), ``easy`` rows (one short line of source repeated) and ``noise`` rows (random
printable characters), with a ``domain`` column naming the part.

Python API::

    from divergent.experiments.refine import RefineDataConfig, run_refine_data
    results = run_refine_data(RefineDataConfig(teacher="t", reference="r", data="rows.jsonl", keep=0.5))
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

from divergent.config import config_to_dict, load_run_config, save_config
from divergent.data.difference import (
    difference_scores,
    keep_count,
    length_batches,
    masked_input_id,
    mean_token_logprobs,
    select_top,
    unit_token_ids,
)
from divergent.data.row_files import RowFile, atomic_output
from divergent.experiments import report
from divergent.io import CorruptFileError, atomic_write_text, load_state, read_json, save_state, sha256_file, write_json
from divergent.train import distributed

__all__ = ["RefineDataConfig", "run_refine_data", "resume_refine_data", "default_reference", "default_corpus",
           "score_units", "padded_batches", "REFERENCE_CONFIG"]

# The default reference: smaller than the default teacher and trained on far less text, as
# MiniPLM's 104M reference beside its 1.8B teacher.
REFERENCE_CONFIG = dict(vocab_size=256, d_model=64, n_layers=1, n_heads=2, max_seq_len=128)
_REFERENCE_RECIPE_VERSION = 1
_DEFAULT_ROW_BYTES = 64  # the default models were trained on 65-byte windows: later positions are untrained
_DEFAULT_SHARES = {"hard": 0.6, "easy": 0.2, "noise": 0.2}

@dataclass
class RefineDataConfig:
    """Settings of ``divergent refine-data`` (every key can be set in YAML or with ``--set``).

    teacher: local Hugging Face (or TinyGPT) folder of the teacher; "" = distill-lm's default
        byte-level teacher (cached).
    reference: local folder of the small reference model; "" = the default reference (a tiny
        GPT trained once on a held-out slice of the standard library, cached; only with the
        default teacher). Without a tokenizer of its own it uses the teacher's, and its
        vocabulary must then match the teacher's.
    data: the corpus: .jsonl/.json/.csv/.parquet/.txt or a save_to_disk folder; "" = the
        embedded corpus of hard, easy and noise rows.
    keep: fraction of the units kept, in (0, 1]: the int(keep * N) with the largest scores.
    packing: score chunks of max_length teacher tokens of the concatenated rows (the official
        unit) instead of rows; the output holds the kept chunks as 'text' rows.
    max_length: tokens per unit: longer rows are cut (and counted); 0 = 1024, or 128 with a
        byte-level default model.
    text_column: the column scored; "" = 'text', else 'prompt' + 'completion' joined.
    domain_column: column whose values are counted per part in the report; "" = 'domain'
        when the data has one.
    batch_tokens: padded tokens per forward pass (units batched by length).
    rows_per_shard: units per shard file (the unit of resuming and of data parallelism).
    reference_steps: training steps of the default reference (when not cached).
    teacher_steps: training steps of the default teacher (distill-lm's recipe and cache; 1500
        here, not distill-lm's 300: at 300 steps the teacher hardly knows more than the reference).
    default_rows: rows of the embedded corpus (60% hard, 20% easy, 20% noise) when there is no data.
    seed: seed of the default models and the embedded corpus.
    device: cpu, cuda or auto. num_threads: CPU threads for torch (0 = torch's default).
    output_dir: folder in which the run folder is created.
    """

    teacher: str = ""
    reference: str = ""
    data: str = ""
    keep: float = 0.5
    packing: bool = False
    max_length: int = 0
    text_column: str = ""
    domain_column: str = ""
    batch_tokens: int = 16384
    rows_per_shard: int = 1024
    reference_steps: int = 300
    teacher_steps: int = 1500
    default_rows: int = 4000
    seed: int = 0
    device: str = "auto"
    num_threads: int = 0
    output_dir: str = "runs"

    def __post_init__(self) -> None:
        keep_count(self.keep, 1)  # keep outside (0, 1] fails here, naming it
        if self.max_length < 0 or self.max_length == 1:
            raise ValueError(f"max_length must be 0 (automatic) or >= 2 tokens, got {self.max_length}")
        for name in ("batch_tokens", "rows_per_shard", "reference_steps", "teacher_steps", "default_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.reference and not self.teacher:
            raise ValueError("reference is given without teacher: give --teacher PATH too")
        if self.teacher and not self.reference:
            raise ValueError("teacher is given without reference: give --reference PATH too (MiniPLM's small "
                             "reference model, trained on a held-out slice of the corpus)")
        if self.device not in ("cpu", "cuda", "auto") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be cpu, cuda, cuda:N or auto, got {self.device!r}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r} asked for, but CUDA is not available; use cpu or auto")

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            if torch.cuda.is_available():
                return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            return torch.device("cpu")
        return torch.device(self.device)


# ----------------------------------------------------------------------------- models


@dataclass
class _Scorer:
    """One model and the tokenizer with which it reads the text."""

    name: str
    model: torch.nn.Module
    tokenizer: Any
    description: str

    @property
    def masked_id(self) -> int | None:
        return masked_input_id(self.tokenizer)

    @property
    def pad_id(self) -> int:
        for name in ("pad_token_id", "eos_token_id"):
            value = getattr(self.tokenizer, name, None)
            if value is not None:
                return int(value)
        return 0


def _vocab_rows(model: torch.nn.Module) -> int:
    from divergent.models.hf import output_layer

    return int(output_layer(model).weight.shape[0])


def _max_positions(model: torch.nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for name in ("max_seq_len", "max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _load_scorers(config: RefineDataConfig, console: Console, device: torch.device) -> tuple[_Scorer, _Scorer]:
    from divergent.data.lm_data import ByteTokenizer
    from divergent.models.hf import load_causal_lm, load_tokenizer, tokenizer_fingerprint

    if not config.teacher:
        teacher, teacher_dir = _default_teacher(config, console, device)
        reference, reference_dir = default_reference(config, console=console, device=device)
        return (_Scorer("teacher", teacher.to(device).eval(), ByteTokenizer(), f"default byte-level teacher ({teacher_dir})"),
                _Scorer("reference", reference.to(device).eval(), ByteTokenizer(), f"default reference ({reference_dir})"))
    scorers = []
    for name, path in (("teacher", config.teacher), ("reference", config.reference)):
        model = load_causal_lm(path, what=f"--{name}")
        tokenizer = load_tokenizer(path, f"--{name}")
        scorers.append([name, model, tokenizer, path])
    (_, teacher, teacher_tok, _), (_, reference, reference_tok, _) = scorers
    if teacher_tok is None:
        if _vocab_rows(teacher) != 256:
            raise ValueError(f"--teacher {config.teacher} has no tokenizer (tokenizer.json / tokenizer_config.json) and its "
                             f"vocabulary ({_vocab_rows(teacher)}) is not bytes; save its tokenizer beside it")
        teacher_tok = ByteTokenizer()
    if reference_tok is None:
        # The reference reads the text with the teacher's tokenizer: the vocabularies must be the same.
        if _vocab_rows(reference) != _vocab_rows(teacher):
            raise ValueError(
                f"--reference {config.reference} has no tokenizer of its own, so it reads the text with the teacher's, "
                f"but its output layer has {_vocab_rows(reference)} rows and the teacher's {_vocab_rows(teacher)}: the "
                f"vocabularies do not match; save the reference's tokenizer beside it (tokenizer.save_pretrained)")
        reference_tok = teacher_tok
    for (name, model, _, path), tokenizer in zip(scorers, (teacher_tok, reference_tok)):
        if _vocab_rows(model) < len(tokenizer):
            raise ValueError(f"--{name} {path}: its output layer has {_vocab_rows(model)} rows but its tokenizer has "
                             f"{len(tokenizer)} tokens; the model and tokenizer do not belong together")
    same = reference_tok is teacher_tok or (
        not isinstance(teacher_tok, ByteTokenizer) and not isinstance(reference_tok, ByteTokenizer)
        and tokenizer_fingerprint(teacher_tok) == tokenizer_fingerprint(reference_tok))
    if not same:
        console.print("teacher and reference have different tokenizers: each scores the same text with its own")
    return (_Scorer("teacher", teacher.to(device).eval(), teacher_tok, config.teacher),
            _Scorer("reference", reference.to(device).eval(), reference_tok, config.reference))


def _default_settings(config: RefineDataConfig):
    from divergent.experiments.lm import LMDataSettings

    return LMDataSettings(teacher_steps=config.teacher_steps, seed=config.seed, device=config.device)


def _default_teacher(config: RefineDataConfig, console: Console, device: torch.device):
    from divergent.data.lm_data import ByteTokenizer
    from divergent.experiments.lm import _stdlib_examples, default_teacher

    settings = _default_settings(config)
    train, _, _ = _stdlib_examples(ByteTokenizer(), settings.length(), settings.max_train_bytes,
                                   settings.max_val_bytes, settings.max_eval_examples)
    return default_teacher(train, settings, console=console, device=device)


def _stdlib_text(config: RefineDataConfig) -> tuple[bytes, bytes]:
    """(the reference's training text, the text of the corpus's hard rows).

    The reference trains on the standard library's validation slice, which the default teacher
    never saw; the hard rows are standard-library source from the teacher's training slice, so
    the teacher knows them and the reference does not (the case MiniPLM keeps).
    """
    from divergent.data.text import load_stdlib_corpus

    settings = _default_settings(config)
    corpus = load_stdlib_corpus(max_train_bytes=settings.max_train_bytes, max_val_bytes=settings.max_val_bytes)
    return bytes(corpus.val.tolist()), bytes(corpus.train.tolist())


def default_reference(config: RefineDataConfig, *, console: Console, device: torch.device | str = "cpu"):
    """The default reference: a tiny byte-level GPT trained on the first half of the held-out slice, cached.

    The cache key is a hash of the recipe (architecture, steps, text, seed); training checkpoints
    under the cache directory, so an interrupted training continues.
    """
    from divergent.data.lm_data import stream_examples
    from divergent.models.gpt import GPTConfig, TinyGPT
    from divergent.models.hf import save_pretrained
    from divergent.train.lm import ExampleSource, LMDistillConfig, LMTrainer
    from divergent.train.run import Checkpointer, drive

    text, _ = _stdlib_text(config)
    recipe = dict(version=_REFERENCE_RECIPE_VERSION, model=REFERENCE_CONFIG, steps=config.reference_steps,
                  batch_size=16, lr=3e-3, length=65, text=hashlib.sha256(text).hexdigest()[:16], seed=config.seed)
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    folder = report.cache_dir() / f"miniplm-reference-{key}"
    if (folder / "model.safetensors").is_file():
        console.print(f"reference: loaded from cache {folder}")
        return TinyGPT.from_pretrained(folder), folder
    console.print(f"reference: training {REFERENCE_CONFIG} for {config.reference_steps} steps on {len(text):,} held-out "
                  f"bytes (cached afterwards in {folder})")
    torch.manual_seed(config.seed)
    model = TinyGPT(GPTConfig(**REFERENCE_CONFIG))
    train = stream_examples(torch.tensor(list(text), dtype=torch.uint8), 65)
    trainer_config = LMDistillConfig(steps=config.reference_steps, batch_size=16, lr=3e-3, hard_weight=1.0,
                                     soft_weight=0.0, seed=config.seed + 2000, log_every=max(1, config.reference_steps // 20))
    trainer = LMTrainer(model, None, ExampleSource(train, seed=config.seed + 2000), trainer_config, device=device)
    work = report.cache_dir() / f".miniplm-reference-{key}-checkpoints"
    with report.progress(console=console, transient=True) as bar:
        task = bar.add_task("training the default reference", total=config.reference_steps)
        drive(trainer, checkpointer=Checkpointer(work, keep=1), checkpoint_every=50, resume=True,
              on_step=lambda record: bar.update(task, completed=record["step"]))
    save_pretrained(model, folder)
    write_json(recipe, folder / "recipe.json")
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    return model.eval(), folder


def default_corpus(config: RefineDataConfig, parts: dict[str, int] | None = None, *, seed_offset: int = 0) -> list[dict]:
    """The embedded corpus: rows ``{"text", "domain"}`` of ``_DEFAULT_ROW_BYTES`` characters, parts interleaved.

    hard: consecutive pieces of standard-library source from the teacher's training slice;
    easy: one short line of the same source repeated; noise: random printable ASCII. ``seed_offset``
    draws other rows (held-out evaluation rows use another part of the source).
    """
    if parts is None:
        parts = {part: round(share * config.default_rows) for part, share in _DEFAULT_SHARES.items()}
    rng = random.Random(config.seed * 1000 + 17 + seed_offset)
    _, source = _stdlib_text(config)
    source_text = source.decode("utf-8", errors="replace")
    pieces = [source_text[i:i + _DEFAULT_ROW_BYTES] for i in range(0, len(source_text) - _DEFAULT_ROW_BYTES, _DEFAULT_ROW_BYTES)]
    pieces = [p for p in pieces if p.isascii() and p.strip()]
    lines = sorted({line.strip() + "\n" for line in source_text.splitlines() if 8 <= len(line.strip()) <= 32 and line.isascii()})
    if seed_offset:  # evaluation rows: from the other end of the source
        pieces = pieces[::-1]
    rows = []
    for part, count in parts.items():
        for i in range(count):
            if part == "hard":
                text = pieces[i % len(pieces)]
            elif part == "easy":
                line = rng.choice(lines)
                text = (line * (_DEFAULT_ROW_BYTES // len(line) + 1))[:_DEFAULT_ROW_BYTES]
            else:
                text = "".join(rng.choice("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,;:()[]{}=+-*/#'\"\n")
                               for _ in range(_DEFAULT_ROW_BYTES))
            rows.append({"text": text, "domain": part})
    rng.shuffle(rows)
    return rows


# ----------------------------------------------------------------------------- units


def _text_of(row: dict[str, Any], column: str, source: str, index: int) -> str:
    if column:
        value = row.get(column)
    elif "text" in row:
        value = row["text"]
    elif "prompt" in row and "completion" in row:
        prompt, completion = row.get("prompt"), row.get("completion")
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise ValueError(f"{source} row {index}: 'prompt' and 'completion' must be strings to be scored as text; "
                             f"name a text column with --text-column")
        value = prompt + completion
    else:
        raise ValueError(f"{source} row {index}: no 'text' column (nor 'prompt' + 'completion'); found columns "
                         f"{list(row)}; name the column to score with --text-column")
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise ValueError(f"{source} row {index}: column {column or 'text'!r} must hold text, got {type(value).__name__}")
    return value


def _check_columns(first: dict[str, Any], config: RefineDataConfig, source: str) -> str:
    """The domain column used ('' for none); an unknown text or domain column fails here."""
    from divergent.config import suggest

    columns = list(first)
    for option, name in (("--text-column", config.text_column), ("--domain-column", config.domain_column)):
        if name and name not in first:
            raise ValueError(f"{source} has no column {name!r} ({option}){suggest(name, columns, 'column')}; "
                             f"columns: {', '.join(columns)}")
    _text_of(first, config.text_column, source, 0)
    if config.domain_column:
        return config.domain_column
    return "domain" if "domain" in first else ""


def _encode(scorer: _Scorer, text: str, max_length: int) -> tuple[list[int], bool]:
    ids = unit_token_ids(scorer.tokenizer, text)
    return (ids[:max_length], True) if len(ids) > max_length else (ids, False)


def _row_units(rows, config: RefineDataConfig, teacher: _Scorer, reference: _Scorer, max_length: int, source: str,
               domain_column: str, skip: set[int]):
    """Yield one unit per row: (id, teacher ids, reference ids, truncated, domain); ids None for skipped shards."""
    shared = reference.tokenizer is teacher.tokenizer
    for index, row in enumerate(rows):
        domain = str(row.get(domain_column)) if domain_column else None
        if index // config.rows_per_shard in skip:
            yield index, None, None, False, domain
            continue
        text = _text_of(row, config.text_column, source, index)
        teacher_ids, cut_t = _encode(teacher, text, max_length)
        reference_ids, cut_r = (teacher_ids, cut_t) if shared else _encode(reference, text, max_length)
        yield index, teacher_ids, reference_ids, cut_t or cut_r, domain


def _chunk_texts(teacher: _Scorer, ids: list[int]) -> list[tuple[str, bool]]:
    """The text pieces of a chunk of teacher tokens, split at EOS: (text, followed by EOS)."""
    eos = getattr(teacher.tokenizer, "eos_token_id", None)
    pieces, current = [], []
    for token in ids:
        if eos is not None and token == eos:
            pieces.append((current, True))
            current = []
        else:
            current.append(token)
    if current:
        pieces.append((current, False))
    return [(teacher.tokenizer.decode(p, skip_special_tokens=False) if p else "", ended) for p, ended in pieces]


def _packed_units(rows, config: RefineDataConfig, teacher: _Scorer, reference: _Scorer, max_length: int, source: str,
                  domain_column: str, skip: set[int]):
    """Yield chunks of ``max_length`` teacher tokens of the concatenated rows (each row + EOS).

    The reference reads the chunk's text with its own tokenizer: the pieces between the teacher's
    EOS tokens, each followed by the reference's EOS where the teacher had one (all of it, however
    many tokens that is, up to the reference's positions).
    """
    shared = reference.tokenizer is teacher.tokenizer
    buffer: list[int] = []
    rows_of: list[int] = []  # the row of each buffered token
    chunk = 0

    def emit(ids: list[int], owners: list[int]):
        nonlocal chunk
        first, last = owners[0], owners[-1]
        if chunk // config.rows_per_shard in skip:
            unit = (chunk, None, None, False, (first, last))
        elif shared:
            unit = (chunk, ids, ids, False, (first, last))
        else:
            reference_ids: list[int] = []
            for text, ended in _chunk_texts(teacher, ids):
                reference_ids += list(reference.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []
                eos = getattr(reference.tokenizer, "eos_token_id", None)
                if ended and eos is not None:
                    reference_ids.append(int(eos))
            # The same text may take the reference more tokens: cut only where its positions end.
            limit = _max_positions(reference.model) or len(reference_ids)
            unit = (chunk, ids, reference_ids[:limit], len(reference_ids) > limit, (first, last))
        chunk += 1
        return unit

    for index, row in enumerate(rows):
        ids = unit_token_ids(teacher.tokenizer, _text_of(row, config.text_column, source, index))
        buffer += ids
        rows_of += [index] * len(ids)
        while len(buffer) >= max_length:
            yield emit(buffer[:max_length], rows_of[:max_length])
            buffer, rows_of = buffer[max_length:], rows_of[max_length:]
    if len(buffer) >= 2:
        yield emit(buffer, rows_of)


def _forward_logits(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=input_ids, attention_mask=attention_mask)
    return out if isinstance(out, torch.Tensor) else out.logits


def padded_batches(units: list[list[int]], batch_tokens: int, pad_id: int):
    """Yield ``(members, input_ids, attention_mask)``: the units of 2 or more tokens, batched by length, right-padded."""
    lengths = [len(u) for u in units]
    scorable = [i for i, n in enumerate(lengths) if n >= 2]
    for batch in length_batches([lengths[i] for i in scorable], batch_tokens):
        members = [scorable[j] for j in batch]
        width = max(lengths[i] for i in members)
        ids = torch.full((len(members), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(members), width), dtype=torch.long)
        for row, i in enumerate(members):
            ids[row, :lengths[i]] = torch.as_tensor(units[i])
            mask[row, :lengths[i]] = 1
        yield members, ids, mask


@torch.no_grad()
def score_units(scorer: _Scorer, units: list[list[int]], *, batch_tokens: int, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """(mean log-prob float64, counted predictions int64) of each unit under one model, batched by length."""
    means = np.full(len(units), np.nan)
    counts = np.zeros(len(units), dtype=np.int64)
    for members, ids, mask in padded_batches(units, batch_tokens, scorer.pad_id):
        ids, mask = ids.to(device), mask.to(device)
        mean, count = mean_token_logprobs(_forward_logits(scorer.model, ids, mask), ids, mask.sum(1), scorer.masked_id)
        means[members] = mean.cpu().numpy()
        counts[members] = count.cpu().numpy()
    means[counts == 0] = np.nan
    return means, counts


# ----------------------------------------------------------------------------- shards


_SHARD = re.compile(r"^shard_(\d+)\.ckpt$")


def _shard_path(run_dir: Path, number: int) -> Path:
    return run_dir / "shards" / f"shard_{number:06d}.ckpt"


def _done_shards(run_dir: Path) -> set[int]:
    folder = run_dir / "shards"
    if not folder.is_dir():
        return set()
    return {int(m.group(1)) for name in os.listdir(folder) if (m := _SHARD.match(name))}


def _score_shard(pending: list, teacher: _Scorer, reference: _Scorer, config: RefineDataConfig, device: torch.device) -> dict:
    ids = [u[0] for u in pending]
    teacher_mean, teacher_count = score_units(teacher, [u[1] for u in pending], batch_tokens=config.batch_tokens, device=device)
    reference_mean, reference_count = score_units(reference, [u[2] for u in pending], batch_tokens=config.batch_tokens, device=device)
    state = {
        "ids": torch.tensor(ids, dtype=torch.long),
        "teacher_logprob": torch.from_numpy(teacher_mean),
        "reference_logprob": torch.from_numpy(reference_mean),
        "teacher_tokens": torch.tensor([len(u[1]) for u in pending], dtype=torch.long),
        "reference_tokens": torch.tensor([len(u[2]) for u in pending], dtype=torch.long),
        "teacher_counted": torch.from_numpy(teacher_count),
        "reference_counted": torch.from_numpy(reference_count),
        "truncated": torch.tensor([bool(u[3]) for u in pending]),
    }
    if config.packing:
        state["first_row"] = torch.tensor([u[4][0] for u in pending], dtype=torch.long)
        state["last_row"] = torch.tensor([u[4][1] for u in pending], dtype=torch.long)
    else:
        state["domain"] = [u[4] for u in pending] if pending and pending[0][4] is not None else None
    return state


def _load_shard(run_dir: Path, number: int) -> dict:
    path = _shard_path(run_dir, number)
    try:
        return load_state(path, what="shard")
    except CorruptFileError as exc:
        raise CorruptFileError(f"{exc}; delete it and run --resume again to score its rows anew") from None


# ----------------------------------------------------------------------------- the run


def _fingerprint(config: RefineDataConfig, data_path: Path) -> dict[str, Any]:
    settings = {k: v for k, v in config_to_dict(config).items() if k not in ("device", "num_threads", "output_dir")}
    data = sha256_file(data_path) if data_path.is_file() else \
        hashlib.sha256("".join(sorted(f"{p.relative_to(data_path)}:{sha256_file(p)}" for p in data_path.rglob("*") if p.is_file())).encode()).hexdigest()
    return {"settings": settings, "data_sha256": data}


def _max_length(config: RefineDataConfig, teacher: _Scorer, reference: _Scorer) -> int:
    limits = [n for n in (_max_positions(teacher.model), _max_positions(reference.model)) if n]
    length = config.max_length or min([1024, *limits])
    for scorer in (teacher, reference):
        limit = _max_positions(scorer.model)
        if limit and length > limit:
            raise ValueError(f"max_length {length} is longer than the {scorer.name}'s {limit} positions; "
                             f"give --max-length {limit} or less")
    return length


def run_refine_data(config: RefineDataConfig, *, run_dir: str | Path | None = None, console: Console | None = None,
                    command: str | None = None) -> dict[str, Any] | None:
    """Run (or, with ``run_dir`` of a partial run, resume) ``refine-data``; the results dict (None on ranks > 0)."""
    console = console or report.output_console()
    started = distributed.init_distributed_from_env(config.device)
    rank, world = distributed.rank(), distributed.world_size()
    previous = torch.get_num_threads()
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    try:
        if config.data:  # checked before a run folder exists: a missing or empty file leaves nothing behind
            rows = RowFile(config.data)
            first = next(iter(rows), None)
            if first is None:
                raise ValueError(f"--data: {config.data} holds no rows")
        if world == 1:
            with report.run_folder(config.output_dir, "refine-data", resume=run_dir) as folder:
                return _run(config, folder, console, command, rank, world)
        # Rank 0 creates the folder and tells the others where it is.
        import torch.distributed as dist

        holder = [str(run_dir) if run_dir is not None else (str(report.make_run_dir(config.output_dir, "refine-data")) if rank == 0 else None)]
        dist.broadcast_object_list(holder, src=0)
        folder = report.RunFolder(Path(holder[0]), created=False)
        return _run(config, folder, console if rank == 0 else Console(quiet=True), command, rank, world)
    finally:
        torch.set_num_threads(previous)
        if started:
            import torch.distributed as dist

            dist.destroy_process_group()


def _run(config: RefineDataConfig, folder: report.RunFolder, console: Console, command: str | None,
         rank: int, world: int) -> dict[str, Any] | None:
    start_time = time.perf_counter()
    run_dir = folder.path
    device = config.torch_device()
    command = command or f"divergent refine-data --config {shlex.quote(str(run_dir / 'config.yaml'))}"
    if rank == 0:
        save_config(config, run_dir / "config.yaml")
    teacher, reference = _load_scorers(config, console, device)
    if config.data:
        data_path = Path(config.data)
    else:
        data_path = run_dir / "input" / "corpus.jsonl"
        if rank == 0 and not data_path.is_file():
            with atomic_output(data_path) as tmp:
                tmp.write_text("".join(json.dumps(r) + "\n" for r in default_corpus(config)), encoding="utf-8")
        _barrier(world)
    rows = RowFile(data_path)
    source = str(data_path)
    first = next(iter(rows), None)
    if first is None:
        raise ValueError(f"--data: {data_path} holds no rows")
    domain_column = _check_columns(first, config, source)
    max_length = _max_length(config, teacher, reference)
    n_rows = rows.count()
    if not config.packing and keep_count(config.keep, n_rows) == 0:
        raise ValueError(f"keep {config.keep:g} of {n_rows} rows keeps none (int(keep * N) = 0); raise --keep")
    fingerprint = _fingerprint(config, data_path)
    fingerprint_file = run_dir / "fingerprint.json"
    if fingerprint_file.is_file():
        if read_json(fingerprint_file, "run fingerprint") != fingerprint:
            raise ValueError(f"the data or settings differ from those {run_dir} was started with ({fingerprint_file}); "
                             f"start a new run instead of resuming this one")
    elif rank == 0:
        write_json(fingerprint, fingerprint_file)
    folder.started()
    done = _done_shards(run_dir)
    for number in sorted(done):
        _load_shard(run_dir, number)  # a corrupt shard is an error naming it, before any work
    if done:
        console.print(f"resuming: {len(done)} shard(s) already scored in {run_dir / 'shards'}")
    console.print(f"run folder: {run_dir}")
    console.print(f"teacher: {teacher.description}; reference: {reference.description}")
    console.print(f"data: {source}: {n_rows:,} rows; units: {'chunks of ' + str(max_length) + ' teacher tokens' if config.packing else 'rows'} "
                  f"(at most {max_length} tokens)")

    # Shard k is scored by rank k mod world; shards on disk are skipped (their rows are not tokenized).
    def skipped(number: int) -> bool:
        return number in done or number % world != rank

    skip = _SkipSet(skipped)
    make_units = _packed_units if config.packing else _row_units
    units = make_units(iter(rows), config, teacher, reference, max_length, source, domain_column, skip)
    pending: list = []
    number = 0
    with report.progress(console=console) as bar:
        task = bar.add_task("scoring", total=n_rows)
        for unit in units:
            shard = unit[0] // config.rows_per_shard
            if shard != number:
                _flush(run_dir, number, pending, skipped, teacher, reference, config, device)
                pending, number = [], shard
            pending.append(unit)
            last_row = unit[4][1] if config.packing else unit[0]
            bar.update(task, completed=last_row + 1)
        _flush(run_dir, number, pending, skipped, teacher, reference, config, device)
        bar.update(task, completed=n_rows)
    _barrier(world)
    if rank != 0:
        return None
    return _finish(config, run_dir, rows, console, command, teacher, reference, max_length, domain_column, start_time)


class _SkipSet:
    """``number in skip``: whether shard ``number`` is skipped by this rank (scored already, or another rank's)."""

    def __init__(self, fn) -> None:
        self.fn = fn

    def __contains__(self, number: int) -> bool:
        return self.fn(number)


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def _flush(run_dir: Path, number: int, pending: list, skipped, teacher, reference, config, device) -> None:
    if pending and not skipped(number):
        save_state(_shard_path(run_dir, number), _score_shard(pending, teacher, reference, config, device))


def _merge(run_dir: Path) -> dict[str, Any]:
    numbers = sorted(_done_shards(run_dir))
    if numbers != list(range(len(numbers))):
        missing = sorted(set(range(max(numbers) + 1)) - set(numbers)) if numbers else [0]
        raise ValueError(f"{run_dir / 'shards'} lacks shard(s) {missing[:5]}; run --resume {run_dir} to score them")
    shards = [_load_shard(run_dir, n) for n in numbers]
    merged: dict[str, Any] = {}
    for key in shards[0]:
        if shards[0][key] is None:
            merged[key] = None
        elif isinstance(shards[0][key], list):
            merged[key] = [v for s in shards for v in s[key]]
        else:
            merged[key] = torch.cat([s[key] for s in shards]).numpy()
    return merged


def _finish(config: RefineDataConfig, run_dir: Path, rows: RowFile, console: Console, command: str,
            teacher: _Scorer, reference: _Scorer, max_length: int, domain_column: str, start_time: float) -> dict[str, Any]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    merged = _merge(run_dir)
    scores = difference_scores(merged["teacher_logprob"], merged["reference_logprob"])
    kept = select_top(scores, config.keep)
    n_units = len(scores)
    unscored = int(np.isnan(scores).sum())
    unit_name = "chunk" if config.packing else "row"
    columns = {unit_name: merged["ids"], "teacher_logprob": merged["teacher_logprob"],
               "reference_logprob": merged["reference_logprob"], "score": scores, "kept": kept,
               "teacher_tokens": merged["teacher_tokens"], "reference_tokens": merged["reference_tokens"]}
    if config.packing:
        columns.update(first_row=merged["first_row"], last_row=merged["last_row"])
    elif merged.get("domain") is not None:
        columns["domain"] = merged["domain"]
    with atomic_output(run_dir / "scores.parquet") as tmp:
        pq.write_table(pa.table(columns), tmp)
    output = run_dir / rows.output_name
    if config.packing:
        rows.write_rows(_kept_chunks(config, rows, teacher, merged, kept, max_length), output)
    else:
        rows.write_subset(kept, output)
    threshold = float(np.nanmin(np.where(kept, scores, np.nan))) if kept.any() else float("nan")
    _plot(scores, kept, threshold, run_dir / "scores.png",
          f"difference scores of {n_units:,} {unit_name}s; kept the top {config.keep:g} (score >= {threshold:.3g})",
          merged.get("domain"))
    table = _summary(scores, kept, merged, None if config.packing else merged.get("domain"))
    title = f"refine-data: {Path(config.data).name if config.data else 'embedded corpus'}, keep {config.keep:g}"
    display_columns = ["part", f"{unit_name}s in", f"{unit_name}s kept", "kept %", "tokens in", "tokens kept", "mean score"]
    report.print_table(table, display_columns, title=title, console=console)
    seconds = time.perf_counter() - start_time
    results = {"command": command, "config": config_to_dict(config), "units": unit_name, "units_in": n_units,
               "units_kept": int(kept.sum()), "unscored": unscored, "threshold": threshold, "max_length": max_length,
               "truncated": int(np.asarray(merged["truncated"]).sum()), "table": table, "output": str(output),
               "teacher": teacher.description, "reference": reference.description, "seconds": seconds,
               "run_dir": str(run_dir)}
    write_json(results, run_dir / "results.json")
    _write_report(run_dir, config, results, table, display_columns, domain_column)
    if unscored:
        console.print(f"{unscored} {unit_name}(s) had no token to score (empty text) and were not kept")
    console.print(f"kept {int(kept.sum()):,} of {n_units:,} {unit_name}s in {output}; scores in {run_dir / 'scores.parquet'} "
                  f"({seconds:.0f} s)")
    return results


def _kept_chunks(config, rows: RowFile, teacher: _Scorer, merged, kept, max_length: int):
    """The kept chunks as rows {'text', 'chunk', 'first_row', 'last_row'}: re-cut from the data (a second pass)."""
    eos_text = getattr(teacher.tokenizer, "eos_token", None) or ""
    wanted = set(np.asarray(merged["ids"])[kept].tolist())
    for chunk, ids, _, _, (first, last) in _packed_units(iter(rows), config, teacher, teacher, max_length, "", "", frozenset()):
        if chunk in wanted:
            text = eos_text.join(t for t, _ in _chunk_texts(teacher, ids))
            yield {"text": text, "chunk": chunk, "first_row": first, "last_row": last}


def _summary(scores, kept, merged, domains) -> list[dict[str, Any]]:
    tokens = np.asarray(merged["teacher_tokens"])
    parts = [("all", np.ones(len(scores), dtype=bool))]
    if domains is not None:
        values = np.asarray(domains, dtype=object)
        parts += [(str(d), values == d) for d in sorted(set(domains))]
    table = []
    unit = "chunk" if "first_row" in merged else "row"
    for name, where in parts:
        finite = where & ~np.isnan(scores)
        table.append({"part": name, f"{unit}s in": int(where.sum()), f"{unit}s kept": int((where & kept).sum()),
                      "kept %": 100.0 * float((where & kept).sum()) / max(1, int(where.sum())),
                      "tokens in": int(tokens[where].sum()), "tokens kept": int(tokens[where & kept].sum()),
                      "mean score": float(scores[finite].mean()) if finite.any() else float("nan")})
    return table


def _plot(scores: np.ndarray, kept: np.ndarray, threshold: float, path: Path, title: str, domains) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finite = scores[~np.isnan(scores)]
    fig, ax = plt.subplots(figsize=(7, 3.8), layout="constrained")
    bins = np.histogram_bin_edges(finite, bins=min(60, max(10, len(finite) // 5)))
    if domains is not None:
        values = np.asarray(domains, dtype=object)
        names = sorted(set(domains))
        ax.hist([scores[(values == d) & ~np.isnan(scores)] for d in names], bins=bins, stacked=True, label=names)
        ax.legend(title="domain", fontsize=8)
    else:
        ax.hist(finite, bins=bins, color="tab:blue")
    if not np.isnan(threshold):
        ax.axvline(threshold, color="black", linestyle="--", linewidth=1)
        ax.annotate(f"cut: kept >= {threshold:.3g}", xy=(threshold, 1.0), xycoords=("data", "axes fraction"),
                    ha="left", va="top", fontsize=8, xytext=(3, -3), textcoords="offset points")
    ax.set_xlabel("score = mean log p_teacher - mean log p_reference (nats/token)")
    ax.set_ylabel("units")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def _write_report(run_dir: Path, config: RefineDataConfig, results: dict, table: list[dict], columns: list[str],
                  domain_column: str) -> None:
    unit = results["units"]
    lines = [
        "# refine-data (MiniPLM difference sampling)", "",
        f"Command: `{results['command']}`", "",
        f"- teacher: {results['teacher']}",
        f"- reference: {results['reference']}",
        f"- data: {config.data or 'embedded corpus (input/corpus.jsonl)'}; units: {unit}s of at most "
        f"{results['max_length']} tokens ({results['truncated']} cut)",
        f"- score = mean log p_teacher - mean log p_reference per {unit} (EOS appended; predictions from an "
        f"EOS or padding do not count, as the official compute_lm_loss)",
        f"- kept: the top {config.keep:g} = {results['units_kept']:,} of {results['units_in']:,} {unit}s "
        f"(score >= {results['threshold']:.4g}; ties: the earlier {unit}); {results['unscored']} with nothing to score",
        f"- output: `{Path(results['output']).name}` (kept {unit}s in corpus order), `scores.parquet`, `scores.png`",
        "", f"Tokens counted with the teacher's tokenizer. " + (f"Parts: the column `{domain_column}`." if domain_column and unit == "row" else ""),
        "", report.markdown_table(table, columns), "",
        "![scores](scores.png)", "",
    ]
    atomic_write_text(run_dir / "report.md", "\n".join(lines))


def resume_refine_data(run_dir: str | Path, *, console: Console | None = None) -> dict[str, Any] | None:
    """Continue the run in ``run_dir`` with its saved ``config.yaml``: scored shards are not scored again."""
    run_dir = Path(run_dir)
    config = load_run_config(RefineDataConfig, run_dir)
    return run_refine_data(config, run_dir=run_dir, console=console,
                           command=f"divergent refine-data --resume {shlex.quote(str(run_dir))}")
