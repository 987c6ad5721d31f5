"""The user's own text data for LM distillation: files in the formats TRL's SFT takes.

Files (local only): ``.jsonl``, ``.json`` (a list of rows, or a mapping of columns),
``.csv``, ``.parquet``, ``.txt`` (one ``text`` row per non-empty line, as ``datasets``'
text loader reads it; use packing for running text), or a folder written by
``datasets``' ``save_to_disk`` (a ``DatasetDict``'s ``train`` split is used, and its
``validation``/``test`` split for evaluation when no other evaluation data is given).

Row formats, detected from the columns (the first that matches):

- ``messages``: a conversation, a list of ``{"role", "content"}``; rendered with the
  tokenizer's chat template; the loss counts the assistant turns only.
- ``prompt`` + ``completion``: plain strings (the tokenizer's EOS is appended to the
  completion), or conversations (lists of messages: the prompt rendered with the
  generation prompt, the completion as the assistant's reply); the loss counts the
  completion only.
- ``text``: the loss counts every token (EOS appended, as TRL does).

Every row becomes an *example*: ``input_ids`` and ``labels`` of equal length, in Hugging
Face's convention — ``labels[t]`` is the token at position ``t`` (not shifted) or -100 where
it does not count; the model's prediction at ``t`` is scored against ``labels[t + 1]``.
Rows longer than ``max_length`` tokens are cut to their first ``max_length`` and counted as
truncated; rows left with nothing to learn (an empty completion, an assistant turn cut
off) are skipped and counted. Both counts go into the run's report.

Which character spans count is found from the rendered text, not from token ids: the
template renders the conversation up to each assistant turn (with the generation prompt)
and up to its end; the turn's characters are those between, and a token counts when it
starts inside them (fast tokenizers' offset mapping). A template that does not render a
conversation's beginning as a prefix of the whole is an error naming the row.
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "FORMATS",
    "FILE_SUFFIXES",
    "ByteTokenizer",
    "Example",
    "DataStats",
    "LMData",
    "read_rows",
    "detect_format",
    "tokenize_rows",
    "pack_examples",
    "load_lm_data",
    "read_splits",
    "split_rows",
    "collate",
    "stream_examples",
    "is_byte_tokenizer",
]

# Row formats, in the order they are detected; the text is what error messages list.
FORMATS = {
    "messages": "'messages' (a conversation rendered with the tokenizer's chat template; loss on assistant turns)",
    "prompt_completion": "'prompt' + 'completion' (loss on the completion)",
    "text": "'text' (loss on every token)",
}
FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt")
ACCEPTED = (
    "files .jsonl, .json, .csv, .parquet, .txt or a folder written by datasets' save_to_disk, "
    "with rows of: " + "; ".join(FORMATS.values())
)

Example = dict  # {"input_ids": list[int], "labels": list[int]}


class ByteTokenizer:
    """UTF-8 bytes as tokens (vocabulary 256): the tokenizer of byte-level models such as TinyGPT.

    Called like a Hugging Face tokenizer (``tokenizer(text, return_offsets_mapping=True)``);
    there is no EOS, no padding token of its own (0 pads; padded labels are -100) and no
    chat template.

    >>> tok = ByteTokenizer()
    >>> tok("hé")["input_ids"], tok("hé", return_offsets_mapping=True)["offset_mapping"]
    ([104, 195, 169], [(0, 1), (1, 2), (1, 2)])
    """

    vocab_size = 256
    eos_token_id = None
    eos_token = None
    pad_token_id = 0
    bos_token_id = None
    chat_template = None

    def __call__(self, text: str, add_special_tokens: bool = True, return_offsets_mapping: bool = False, **_: Any):
        ids: list[int] = []
        offsets: list[tuple[int, int]] = []
        for position, char in enumerate(text):
            encoded = char.encode("utf-8")
            ids.extend(encoded)
            offsets.extend([(position, position + 1)] * len(encoded))
        out: dict[str, Any] = {"input_ids": ids}
        if return_offsets_mapping:
            out["offset_mapping"] = offsets
        return out

    def decode(self, ids: Sequence[int], **_: Any) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def get_vocab(self) -> dict[str, int]:
        return {f"<0x{i:02X}>": i for i in range(256)}

    def __len__(self) -> int:
        return 256


def is_byte_tokenizer(tokenizer: Any) -> bool:
    return isinstance(tokenizer, ByteTokenizer)


@dataclass
class DataStats:
    """What became of a data source's rows (reported with every run).

    rows: rows read; used: examples kept; truncated: rows cut to ``max_length``;
    skipped_nothing_to_learn: rows with no counted token (e.g. an empty completion);
    tokens: tokens of the kept examples; counted_tokens: tokens the loss counts (predicted
    positions whose label is not -100).
    """

    source: str
    format: str
    rows: int = 0
    used: int = 0
    truncated: int = 0
    skipped_nothing_to_learn: int = 0
    tokens: int = 0
    counted_tokens: int = 0

    def describe(self) -> str:
        return (f"{self.source}: {self.rows} rows ({self.format}) -> {self.used} examples, {self.tokens:,} tokens "
                f"({self.counted_tokens:,} counted); {self.truncated} truncated, "
                f"{self.skipped_nothing_to_learn} skipped with nothing to learn")


@dataclass
class LMData:
    """Tokenized training and evaluation examples, with what happened to the rows."""

    train: list[Example]
    eval: list[Example]
    train_stats: DataStats
    eval_stats: DataStats
    byte_level: bool = False
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- reading files


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / name).is_file() for name in ("dataset_info.json", "state.json", "dataset_dict.json"))


def read_rows(path: str | Path, what: str = "--data") -> dict[str, list[dict[str, Any]]]:
    """The rows of a data file or ``save_to_disk`` folder, by split (``{"train": rows}`` for a file).

    A missing or unreadable path, an unknown suffix or a malformed file raises an error
    naming the path (and the line, for JSON Lines).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what}: {path} not found; expected {ACCEPTED}")
    if path.is_dir():
        if not _is_saved_dataset(path):
            raise ValueError(f"{what}: {path} is a folder but not one written by datasets' save_to_disk "
                             f"(no dataset_info.json/state.json/dataset_dict.json); expected {ACCEPTED}")
        return _read_saved_dataset(path, what)
    suffix = path.suffix.lower()
    if suffix not in FILE_SUFFIXES:
        raise ValueError(f"{what}: {path} has the suffix {suffix or '(none)'!r}; expected {ACCEPTED}")
    try:
        if suffix == ".parquet":
            rows = _read_parquet(path, what)
        else:
            text = path.read_text(encoding="utf-8")
            rows = {".jsonl": _parse_jsonl, ".json": _parse_json, ".csv": _parse_csv, ".txt": _parse_txt}[suffix](text, path, what)
    except UnicodeDecodeError as exc:
        raise ValueError(f"{what}: {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except PermissionError:
        raise PermissionError(f"{what}: cannot read {path}: permission denied") from None
    except IsADirectoryError:  # pragma: no cover - checked above
        raise
    if not rows:
        raise ValueError(f"{what}: {path} holds no rows")
    return {"train": rows}


def _parse_jsonl(text: str, path: Path, what: str) -> list[dict[str, Any]]:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{what}: {path} line {number} is not valid JSON ({exc.msg}, column {exc.colno})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{what}: {path} line {number} is a JSON {type(row).__name__}; expected an object (one row)")
        rows.append(row)
    return rows


def _parse_json(text: str, path: Path, what: str) -> list[dict[str, Any]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what}: {path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    if isinstance(data, dict) and all(isinstance(v, list) for v in data.values()) and data:
        lengths = {len(v) for v in data.values()}
        if len(lengths) != 1:
            raise ValueError(f"{what}: {path} is a mapping of columns of different lengths {sorted(lengths)}")
        n = lengths.pop()
        return [{key: values[i] for key, values in data.items()} for i in range(n)]
    if isinstance(data, list):
        for index, row in enumerate(data):
            if not isinstance(row, dict):
                raise ValueError(f"{what}: {path} row {index} is a {type(row).__name__}; expected an object")
        return data
    raise ValueError(f"{what}: {path} holds a JSON {type(data).__name__}; expected a list of rows or a mapping of columns")


def _maybe_json_list(value: Any) -> Any:
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            return value
        return parsed if isinstance(parsed, list) else value
    return value


def _parse_csv(text: str, path: Path, what: str) -> list[dict[str, Any]]:
    import io

    try:
        reader = csv.DictReader(io.StringIO(text))
        rows = [dict(row) for row in reader]
    except csv.Error as exc:
        raise ValueError(f"{what}: {path} is not valid CSV ({exc})") from None
    # Conversations stored in a CSV cell are JSON text.
    for row in rows:
        for key in ("messages", "prompt", "completion"):
            if key in row:
                row[key] = _maybe_json_list(row[key])
    return rows


def _parse_txt(text: str, path: Path, what: str) -> list[dict[str, Any]]:
    return [{"text": line} for line in text.splitlines() if line.strip()]


def _read_parquet(path: Path, what: str) -> list[dict[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:  # pragma: no cover - pyarrow comes with datasets
        raise ImportError(f"{what}: reading {path} needs pyarrow: pip install 'divergent[llm]'") from exc
    try:
        return pq.read_table(path).to_pylist()
    except Exception as exc:
        raise ValueError(f"{what}: {path} is not a readable Parquet file ({str(exc).splitlines()[0][:200]})") from None


def _read_saved_dataset(path: Path, what: str) -> dict[str, list[dict[str, Any]]]:
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover
        raise ImportError(f"{what}: reading the save_to_disk folder {path} needs 'datasets': pip install 'divergent[llm]'") from exc
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:
        raise ValueError(f"{what}: could not read the save_to_disk folder {path}: {str(exc).splitlines()[0][:200]}") from None
    if isinstance(loaded, datasets.DatasetDict):
        return {name: split.to_list() for name, split in loaded.items()}
    return {"train": loaded.to_list()}


# ----------------------------------------------------------------------------- formats


def detect_format(columns: Sequence[str], source: str) -> str:
    """The row format of a source from its columns (see :data:`FORMATS`)."""
    columns = list(columns)
    if "messages" in columns:
        return "messages"
    if "prompt" in columns and "completion" in columns:
        return "prompt_completion"
    if "text" in columns:
        return "text"
    hint = ""
    if "prompt" in columns or "completion" in columns:
        hint = " ('prompt' and 'completion' must both be present)"
    raise ValueError(
        f"{source}: no column this command can train on{hint}; found columns {columns}; "
        f"accepted row formats: {'; '.join(FORMATS.values())}"
    )


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    seen: dict[str, None] = {}
    for row in rows[:1000]:
        for key in row:
            seen.setdefault(str(key), None)
    return list(seen)


def _check_messages(messages: Any, source: str, index: int, column: str) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{source} row {index}: {column!r} must be a non-empty list of {{'role', 'content'}} messages, "
                         f"got {type(messages).__name__} {str(messages)[:80]!r}")
    for turn in messages:
        if not isinstance(turn, Mapping) or "role" not in turn or "content" not in turn:
            raise ValueError(f"{source} row {index}: every message of {column!r} needs 'role' and 'content', got {str(turn)[:80]!r}")
    return [dict(turn) for turn in messages]


def _render(tokenizer: Any, messages: list[dict[str, Any]], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _require_template(tokenizer: Any, source: str) -> None:
    if getattr(tokenizer, "chat_template", None) is None or not hasattr(tokenizer, "apply_chat_template"):
        name = "byte-level model (no tokenizer)" if is_byte_tokenizer(tokenizer) else f"tokenizer {type(tokenizer).__name__}"
        raise ValueError(
            f"{source}: conversational rows need a chat template, and the {name} has none; set "
            f"tokenizer.chat_template and save it with the model (tokenizer.save_pretrained), or use "
            f"'prompt' + 'completion' or 'text' rows"
        )


def _spans_messages(tokenizer: Any, messages: list[dict[str, Any]], source: str, index: int) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns."""
    full = _render(tokenizer, messages, False)
    spans = []
    for turn, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:turn], True) if turn else ""
        upto = _render(tokenizer, messages[: turn + 1], False)
        if not upto.startswith(before) or not full.startswith(upto):
            raise ValueError(
                f"{source} row {index}: the chat template does not render the conversation's beginning as a prefix "
                f"of the whole (turn {turn}), so the assistant's tokens cannot be found; use 'prompt' + 'completion' rows"
            )
        spans.append((len(before), len(upto)))
    return full, spans


def _row_text_and_spans(row: dict[str, Any], fmt: str, tokenizer: Any, source: str, index: int) -> tuple[str, list[tuple[int, int]], bool]:
    """(text, counted character spans, add_special_tokens) of one row."""
    if fmt == "messages":
        messages = _check_messages(row.get("messages"), source, index, "messages")
        text, spans = _spans_messages(tokenizer, messages, source, index)
        return text, spans, False
    if fmt == "prompt_completion":
        prompt, completion = row.get("prompt"), row.get("completion")
        if isinstance(prompt, list) or isinstance(completion, list):
            prompt_messages = _check_messages(prompt, source, index, "prompt")
            completion_messages = _check_messages(completion, source, index, "completion") if completion else []
            _require_template(tokenizer, source)
            before = _render(tokenizer, prompt_messages, True)
            if not completion_messages:
                return before, [], False
            full = _render(tokenizer, prompt_messages + completion_messages, False)
            if not full.startswith(before):
                raise ValueError(
                    f"{source} row {index}: the chat template does not render the prompt as a prefix of prompt + "
                    f"completion, so the completion's tokens cannot be found"
                )
            return full, [(len(before), len(full))], False
        prompt = "" if prompt is None else prompt
        completion = "" if completion is None else completion
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise ValueError(f"{source} row {index}: 'prompt' and 'completion' must be strings or lists of messages, "
                             f"got {type(prompt).__name__} and {type(completion).__name__}")
        if not completion:
            return prompt, [], True
        eos = getattr(tokenizer, "eos_token", None)
        if eos and not completion.endswith(eos):
            completion += eos
        return prompt + completion, [(len(prompt), len(prompt) + len(completion))], True
    text = row.get("text")
    text = "" if text is None else text
    if not isinstance(text, str):
        raise ValueError(f"{source} row {index}: 'text' must be a string, got {type(text).__name__}")
    if not text:
        return "", [], True
    eos = getattr(tokenizer, "eos_token", None)
    if eos and not text.endswith(eos):
        text += eos
    return text, [(0, len(text))], True


def _encode_with_spans(tokenizer: Any, text: str, spans: list[tuple[int, int]], add_special_tokens: bool) -> tuple[list[int], list[bool]]:
    """Token ids of ``text`` and whether each token starts inside one of ``spans``."""
    try:
        encoded = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
        offsets = encoded["offset_mapping"]
        ids = list(encoded["input_ids"])
    except (NotImplementedError, ValueError, TypeError, KeyError):
        offsets = None
        ids = list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])
    if offsets is not None:
        counted = []
        for start, end in offsets:
            counted.append(end > start and any(a <= start < b for a, b in spans))
        return ids, counted
    # Slow tokenizers have no offsets: count the tokens of each span's end prefix.
    counted = [False] * len(ids)
    for a, b in spans:
        first = len(tokenizer(text[:a], add_special_tokens=add_special_tokens)["input_ids"])
        last = len(tokenizer(text[:b], add_special_tokens=add_special_tokens)["input_ids"])
        for position in range(first, min(last, len(ids))):
            counted[position] = True
    return ids, counted


def tokenize_rows(
    rows: list[dict[str, Any]],
    tokenizer: Any,
    *,
    max_length: int,
    source: str = "data",
    format: str | None = None,
) -> tuple[list[Example], DataStats]:
    """Tokenize rows into examples (HF label convention) and count truncated and skipped rows.

    ``format``: one of :data:`FORMATS`, or None to detect it from the columns.
    """
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an int >= 2 (tokens per example), got {max_length!r}")
    if not rows:
        raise ValueError(f"{source}: no rows to tokenize")
    fmt = format or detect_format(_columns(rows), source)
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {sorted(FORMATS)}, got {fmt!r}")
    if fmt == "messages":
        _require_template(tokenizer, source)
    stats = DataStats(source=source, format=fmt, rows=len(rows))
    examples: list[Example] = []
    for index, row in enumerate(rows):
        text, spans, special = _row_text_and_spans(row, fmt, tokenizer, source, index)
        if not text:
            stats.skipped_nothing_to_learn += 1
            continue
        ids, counted = _encode_with_spans(tokenizer, text, spans, special)
        if len(ids) > max_length:
            ids, counted = ids[:max_length], counted[:max_length]
            stats.truncated += 1
        labels = [token if keep else -100 for token, keep in zip(ids, counted)]
        n_counted = sum(1 for label in labels[1:] if label != -100)
        if n_counted == 0:
            stats.skipped_nothing_to_learn += 1
            continue
        examples.append({"input_ids": ids, "labels": labels})
        stats.used += 1
        stats.tokens += len(ids)
        stats.counted_tokens += n_counted
    return examples, stats


def pack_examples(examples: list[Example], max_length: int) -> list[Example]:
    """Concatenate examples and cut the stream into blocks of ``max_length`` tokens.

    Attention crosses the examples' boundaries inside a block (TRL's "wrapped" packing);
    labels keep their -100 marks. A last block with nothing to learn is dropped.
    """
    ids = [token for example in examples for token in example["input_ids"]]
    labels = [label for example in examples for label in example["labels"]]
    blocks = []
    for start in range(0, len(ids), max_length):
        block_labels = labels[start : start + max_length]
        if any(label != -100 for label in block_labels[1:]):
            blocks.append({"input_ids": ids[start : start + max_length], "labels": block_labels})
    return blocks


def split_rows(rows: list[dict[str, Any]], fraction: float, seed: int, source: str) -> tuple[list, list]:
    """A seeded random split of rows into (train, held-out) with ``round(fraction * n)`` (at least 1) held out."""
    if not 0 < fraction < 1:
        raise ValueError(f"eval_fraction must be in (0, 1), got {fraction!r}")
    if len(rows) < 2:
        raise ValueError(f"{source}: {len(rows)} row cannot be split into training and evaluation rows; "
                         f"give evaluation data (--eval-data)")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_eval = min(len(rows) - 1, max(1, round(fraction * len(rows))))
    held = set(order[:n_eval])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def read_splits(data: str | Path, eval_data: str | Path | None = None):
    """``(train rows, source, evaluation rows or None, evaluation source)`` of the data files.

    Evaluation rows: ``eval_data`` if given; else a ``save_to_disk`` DatasetDict's
    ``validation`` or ``test`` split; else None (the caller holds rows out). A training
    source without a known row format fails here, before any split.
    """
    splits = read_rows(data, "--data")
    train_name = "train" if "train" in splits else next(iter(splits))
    train_rows = splits[train_name]
    source = str(data) if len(splits) == 1 else f"{data} [{train_name}]"
    detect_format(_columns(train_rows), source)  # before splitting: a file without a known column fails first
    held = next((n for n in ("validation", "test") if n in splits and n != train_name), None)
    if eval_data is not None:
        eval_splits = read_rows(eval_data, "--eval-data")
        eval_name = next((n for n in ("validation", "test", "train") if n in eval_splits), next(iter(eval_splits)))
        return train_rows, source, eval_splits[eval_name], str(eval_data)
    if held is not None:
        return train_rows, source, splits[held], f"{data} [{held}]"
    return train_rows, source, None, None


def load_lm_data(
    data: str | Path,
    tokenizer: Any,
    *,
    eval_data: str | Path | None = None,
    eval_fraction: float = 0.05,
    max_length: int = 512,
    packing: bool = False,
    seed: int = 0,
    max_eval_examples: int | None = None,
) -> LMData:
    """Read, split and tokenize the user's data (see the module docstring).

    Evaluation rows: ``eval_data`` if given; else a ``save_to_disk`` DatasetDict's
    ``validation`` or ``test`` split; else a seeded ``eval_fraction`` of the rows.
    Evaluation examples are never packed; at most ``max_eval_examples`` are kept.
    """
    train_rows, source, eval_rows, eval_source = read_splits(data, eval_data)
    if eval_rows is None:
        train_rows, eval_rows = split_rows(train_rows, eval_fraction, seed, source)
        eval_source = f"{source} (held-out {eval_fraction:g})"
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an int >= 2 (tokens per example), got {max_length!r}")
    # Packed rows are not truncated: they continue into the next block.
    train, train_stats = tokenize_rows(train_rows, tokenizer, max_length=2**62 if packing else max_length, source=source)
    evaluation, eval_stats = tokenize_rows(eval_rows, tokenizer, max_length=max_length, source=eval_source)
    if not train:
        raise ValueError(f"{source}: none of its {train_stats.rows} rows has anything to learn "
                         f"({train_stats.skipped_nothing_to_learn} skipped: empty text or completion, or cut off by max_length={max_length})")
    if not evaluation:
        raise ValueError(f"{eval_source}: none of its {eval_stats.rows} evaluation rows has anything to learn")
    if max_eval_examples is not None:
        evaluation = evaluation[:max_eval_examples]
    notes = []
    if packing:
        train = pack_examples(train, max_length)
        notes.append(f"packed into {len(train)} blocks of up to {max_length} tokens")
    return LMData(train=train, eval=evaluation, train_stats=train_stats, eval_stats=eval_stats,
                  byte_level=is_byte_tokenizer(tokenizer), notes=notes)


def stream_examples(stream: torch.Tensor, length: int, max_examples: int | None = None) -> list[Example]:
    """Non-overlapping windows of ``length`` tokens of a token stream, every token counted."""
    n = len(stream) // length
    if max_examples is not None:
        n = min(n, max_examples)
    if n < 1:
        raise ValueError(f"the token stream has {len(stream)} tokens, fewer than one example of {length}")
    windows = stream[: n * length].view(n, length).long().tolist()
    return [{"input_ids": w, "labels": list(w)} for w in windows]


def collate(examples: Sequence[Example], pad_token_id: int = 0, extra: Sequence[str] = ()) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 on padding) ``[B, T]``.

    ``extra``: keys holding per-position tensors ``[T, ...]`` (e.g. a cached teacher's top-k),
    padded by repeating their last position. Examples of domain-grouped data also give
    ``domain_index`` ``[B]`` (each row's domain).
    """
    if not examples:
        raise ValueError("collate needs at least one example")
    length = max(len(e["input_ids"]) for e in examples)
    batch = len(examples)
    input_ids = torch.full((batch, length), int(pad_token_id), dtype=torch.long)
    labels = torch.full((batch, length), -100, dtype=torch.long)
    attention = torch.zeros((batch, length), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        input_ids[row, :n] = torch.as_tensor(example["input_ids"], dtype=torch.long)
        labels[row, :n] = torch.as_tensor(example["labels"], dtype=torch.long)
        attention[row, :n] = 1
    out = {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
    if "domain_index" in examples[0]:
        out["domain_index"] = torch.tensor([int(e["domain_index"]) for e in examples], dtype=torch.long)
    for key in extra:
        values = [torch.as_tensor(e[key]) for e in examples]
        padded = []
        for value in values:
            if value.shape[0] < length:
                value = torch.cat([value, value[-1:].expand(length - value.shape[0], *value.shape[1:])])
            padded.append(value)
        out[key] = torch.stack(padded)
    return out
