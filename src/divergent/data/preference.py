"""The user's preference data for f-DPO: files in the formats TRL's DPOTrainer takes.

Files are read by :func:`divergent.data.lm_data.read_rows` (``.jsonl``, ``.json``,
``.csv``, ``.parquet``, or a ``save_to_disk`` folder). Row formats:

- ``prompt``, ``chosen``, ``rejected`` strings (the tokenizer's EOS is appended to each
  response, as TRL does);
- the same keys holding conversations (TRL's conversational form): ``prompt`` a list of
  ``{"role", "content"}`` messages, ``chosen``/``rejected`` the assistant's reply as a list
  of messages; rendered with the tokenizer's chat template (prompt with the generation
  prompt);
- ``chosen`` and ``rejected`` full conversations and no ``prompt`` (TRL's implicit prompt):
  the messages both share from the start are the prompt, the rest are the responses.

Tokenized as TRL tokenizes them: ``prompt``, ``prompt + chosen`` and ``prompt + rejected``
are tokenized whole, and a response starts where its sequence and the prompt's tokens
first differ (so a token merged across the boundary counts as response). Only response
tokens enter the sequence log-probs. A sequence longer than ``max_length`` tokens is cut to
its first ``max_length`` (counted as truncated); a pair left without a response token, or
without a prompt token to predict from, is skipped and counted.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from divergent.data.lm_data import DataStats, _maybe_json_list, read_rows, split_rows

__all__ = ["PreferenceData", "ROW_FORMATS", "load_preference_data", "tokenize_preference_rows"]

ROW_FORMATS = (
    "'prompt', 'chosen', 'rejected' strings; or the same keys as conversations (lists of {'role', 'content'} "
    "messages, prompt first); or 'chosen' and 'rejected' full conversations sharing their first messages"
)

TokenTriple = tuple[list[int], list[int], list[int]]


@dataclass
class PreferenceData:
    """Tokenized ``(prompt_ids, chosen_ids, rejected_ids)`` triples for training and evaluation."""

    train: list[TokenTriple]
    eval: list[TokenTriple]
    train_stats: DataStats
    eval_stats: DataStats
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        return "; ".join([_describe(self.train_stats), _describe(self.eval_stats), *self.notes])


def _describe(stats: DataStats) -> str:
    return (f"{stats.source}: {stats.rows} rows ({stats.format}) -> {stats.used} pairs, {stats.tokens:,} tokens "
            f"({stats.counted_tokens:,} response tokens); {stats.truncated} truncated, "
            f"{stats.skipped_nothing_to_learn} skipped with no response or prompt left")


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(m, Mapping) for m in value)


def _check_messages(value: Any, source: str, index: int, key: str) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value or not all(
            isinstance(m, Mapping) and "role" in m and "content" in m for m in value):
        raise ValueError(f"{source} row {index}: {key!r} must be a non-empty list of {{'role', 'content'}} messages "
                         f"(or every field a string), got {str(value)[:80]!r}; expected rows of {ROW_FORMATS}")
    return [dict(m) for m in value]


def _row_parts(row: Mapping[str, Any], source: str, index: int) -> tuple[str, Any, Any, Any]:
    """``(kind, prompt, chosen, rejected)`` with kind "text" or "chat" (messages)."""
    missing = [key for key in ("chosen", "rejected") if row.get(key) in (None, "")]
    if missing:
        raise ValueError(f"{source} row {index}: missing {' and '.join(repr(k) for k in missing)} (found keys "
                         f"{sorted(map(str, row))}); expected rows of {ROW_FORMATS}")
    prompt, chosen, rejected = row.get("prompt"), row["chosen"], row["rejected"]
    if any(_is_messages(v) for v in (prompt, chosen, rejected)):
        chosen = _check_messages(chosen, source, index, "chosen")
        rejected = _check_messages(rejected, source, index, "rejected")
        if prompt in (None, ""):
            # Implicit prompt: the messages both conversations share from the start.
            shared = 0
            while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
                shared += 1
            if shared == 0:
                raise ValueError(f"{source} row {index}: 'chosen' and 'rejected' share no first message and there is "
                                 f"no 'prompt'; expected rows of {ROW_FORMATS}")
            return "chat", chosen[:shared], chosen[shared:], rejected[shared:]
        return "chat", _check_messages(prompt, source, index, "prompt"), chosen, rejected
    if prompt is None:
        raise ValueError(f"{source} row {index}: no 'prompt' for string 'chosen'/'rejected' (found keys "
                         f"{sorted(map(str, row))}); expected rows of {ROW_FORMATS}")
    for key, value in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
        if not isinstance(value, str):
            raise ValueError(f"{source} row {index}: {key!r} must be a string or a list of messages, got "
                             f"{type(value).__name__} {str(value)[:60]!r}")
    return "text", prompt, chosen, rejected


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _tokenize_row(tokenizer: Any, kind: str, prompt: Any, chosen: Any, rejected: Any, source: str,
                  index: int) -> tuple[list[int], list[int], list[int]]:
    if kind == "chat":
        if getattr(tokenizer, "chat_template", None) is None or not hasattr(tokenizer, "apply_chat_template"):
            raise ValueError(f"{source} row {index}: conversational rows need a chat template, and the tokenizer "
                             f"has none; save one with the model (tokenizer.chat_template) or use string rows")

        def encode(messages, generation_prompt):
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
            return list(tokenizer(text, add_special_tokens=False)["input_ids"])

        prompt_ids = encode(prompt, True)
        full_chosen, full_rejected = encode(prompt + chosen, False), encode(prompt + rejected, False)
    else:
        eos = getattr(tokenizer, "eos_token", None) or ""

        def encode(text):
            return list(tokenizer(text)["input_ids"])

        prompt_ids = encode(prompt)
        full_chosen = encode(prompt + (chosen if chosen.endswith(eos) else chosen + eos))
        full_rejected = encode(prompt + (rejected if rejected.endswith(eos) else rejected + eos))
    # As TRL: the responses start where the prompt's tokens and the whole sequence's first differ.
    start = min(_common_prefix(prompt_ids, full_chosen), _common_prefix(prompt_ids, full_rejected))
    return full_chosen[:start], full_chosen[start:], full_rejected[start:]


def tokenize_preference_rows(rows: list[Mapping[str, Any]], tokenizer: Any, *, max_length: int,
                             source: str = "data") -> tuple[list[TokenTriple], DataStats]:
    """Rows to ``(prompt_ids, chosen_ids, rejected_ids)`` triples, counting truncated and skipped rows."""
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an int >= 2 (tokens per sequence), got {max_length!r}")
    if not rows:
        raise ValueError(f"{source}: holds no rows; expected rows of {ROW_FORMATS}")
    kinds = set()
    stats = DataStats(source=source, format="", rows=len(rows))
    triples: list[TokenTriple] = []
    _check_rows(rows, source)
    for index, row in enumerate(rows, start=1):  # rows numbered from 1, as lines are
        kind, prompt, chosen, rejected = _row_parts(row, source, index)
        kinds.add(kind)
        prompt_ids, chosen_ids, rejected_ids = _tokenize_row(tokenizer, kind, prompt, chosen, rejected, source, index)
        room = max_length - len(prompt_ids)
        if len(chosen_ids) > room or len(rejected_ids) > room:
            stats.truncated += 1
            chosen_ids, rejected_ids = chosen_ids[: max(room, 0)], rejected_ids[: max(room, 0)]
        if not prompt_ids or not chosen_ids or not rejected_ids:
            stats.skipped_nothing_to_learn += 1
            continue
        triples.append((prompt_ids, chosen_ids, rejected_ids))
        stats.used += 1
        stats.tokens += 2 * len(prompt_ids) + len(chosen_ids) + len(rejected_ids)
        stats.counted_tokens += len(chosen_ids) + len(rejected_ids)
    stats.format = " and ".join(sorted({"text": "prompt/chosen/rejected strings",
                                        "chat": "conversations (chat template)"}[k] for k in kinds))
    return triples, stats


def _read(path: str | Path, what: str) -> dict[str, list[dict[str, Any]]]:
    splits = read_rows(path, what)
    if Path(path).suffix.lower() == ".csv":  # conversations stored in CSV cells are JSON text
        for rows in splits.values():
            for row in rows:
                for key in ("prompt", "chosen", "rejected"):
                    if key in row:
                        row[key] = _maybe_json_list(row[key])
    return splits


def _check_rows(rows: list[Any], source: str) -> None:
    for index, row in enumerate(rows, start=1):
        if not isinstance(row, Mapping):
            raise ValueError(f"{source} row {index}: is a {type(row).__name__}; expected an object with {ROW_FORMATS}")
        _row_parts(row, source, index)


def load_preference_data(data: str | Path, tokenizer: Any, *, eval_data: str | Path | None = None,
                         eval_fraction: float = 0.1, max_length: int = 512, seed: int = 0,
                         max_eval_pairs: int | None = None) -> PreferenceData:
    """Read, split and tokenize preference data (see the module docstring).

    Evaluation pairs: ``eval_data`` if given; else a ``save_to_disk`` DatasetDict's
    ``validation``/``test`` split; else a seeded ``eval_fraction`` of the rows.
    """
    splits = _read(data, "--data")
    train_name = "train" if "train" in splits else next(iter(splits))
    train_rows = splits[train_name]
    source = str(data) if len(splits) == 1 else f"{data} [{train_name}]"
    _check_rows(train_rows, source)  # before splitting: errors name the row of the file
    held = next((n for n in ("validation", "test") if n in splits and n != train_name), None)
    if eval_data is not None:
        eval_splits = _read(eval_data, "--eval-data")
        eval_name = next((n for n in ("validation", "test", "train") if n in eval_splits), next(iter(eval_splits)))
        eval_rows, eval_source = eval_splits[eval_name], str(eval_data)
        _check_rows(eval_rows, eval_source)
    elif held is not None:
        eval_rows, eval_source = splits[held], f"{data} [{held}]"
    else:
        train_rows, eval_rows = split_rows(train_rows, eval_fraction, seed, source)
        eval_source = f"{source} (held-out {eval_fraction:g})"
    train, train_stats = tokenize_preference_rows(train_rows, tokenizer, max_length=max_length, source=source)
    evaluation, eval_stats = tokenize_preference_rows(eval_rows, tokenizer, max_length=max_length, source=eval_source)
    if not train:
        raise ValueError(f"{source}: none of its {train_stats.rows} rows keeps a response within max_length="
                         f"{max_length} tokens; raise --max-length")
    if not evaluation:
        raise ValueError(f"{eval_source}: none of its {eval_stats.rows} evaluation rows keeps a response within "
                         f"max_length={max_length} tokens")
    if max_eval_pairs is not None:
        evaluation = evaluation[:max_eval_pairs]
    return PreferenceData(train=train, eval=evaluation, train_stats=train_stats, eval_stats=eval_stats)
