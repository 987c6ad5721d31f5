"""The user's prompts for RL: a file of rows ``{"prompt": ..., ...}`` and the task ``divergent rl`` trains on.

Files are read as :func:`divergent.data.lm_data.read_rows` reads them: ``.jsonl``,
``.json``, ``.csv``, ``.parquet`` or a ``save_to_disk`` folder (its ``train`` split).
Each row has a ``prompt``: a string, or a conversation (a list of ``{"role", "content"}``
messages, as TRL's conversational prompts). Every other field (``answer``, ``tests``, …)
is handed to the reward function, as a list over the batch, under its own name.

:class:`PromptTask` turns rows into what :class:`divergent.train.rl.GRPOTrainer` samples
from: problems are row numbers; a prompt is rendered with the tokenizer's chat template
when it has one (a string prompt becomes one user message; ``chat_template=False`` keeps
strings as they are), tokenized, cut to its last ``max_prompt_length`` tokens (counted),
and left-padded with the tokenizer's pad token in a batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["read_prompt_rows", "split_prompt_rows", "PromptTask"]


def _check_prompt(row: dict[str, Any], source: str, number: int) -> None:
    if "prompt" not in row:
        fields = ", ".join(repr(k) for k in list(row)[:8]) or "none"
        raise ValueError(f"{source} row {number} has no 'prompt' field (fields: {fields}); expected rows like "
                         '{"prompt": "What is 2+3?", "answer": "5"} or a "prompt" list of chat messages')
    prompt = row["prompt"]
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ValueError(f"{source} row {number}: 'prompt' is empty")
        return
    if isinstance(prompt, list) and prompt and all(isinstance(m, dict) and "role" in m and "content" in m
                                                    for m in prompt):
        return
    raise ValueError(f"{source} row {number}: 'prompt' must be a non-empty string or a list of "
                     f"{{\"role\", \"content\"}} messages, got {type(prompt).__name__} {str(prompt)[:60]!r}")


def read_prompt_rows(path: str | Path, what: str = "--prompts") -> list[dict[str, Any]]:
    """The rows of a prompts file, each checked to have a ``prompt`` (errors name the file and the 1-based row)."""
    from divergent.data.lm_data import read_rows

    splits = read_rows(path, what)
    rows = splits.get("train") or next(iter(splits.values()))
    source = f"{what} {path}"
    for number, row in enumerate(rows, start=1):
        _check_prompt(row, source, number)
    return rows


def split_prompt_rows(rows: list[dict[str, Any]], fraction: float, seed: int, source: str) -> tuple[list, list]:
    """(training rows, held-out rows): ``round(fraction * n)`` (at least 1) rows held out by a ``seed``-ed shuffle."""
    from divergent.data.lm_data import split_rows

    if not 0 < fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1) when there is no test_prompts file, got {fraction!r}")
    if len(rows) < 2:
        raise ValueError(f"{source}: {len(rows)} row cannot be split into training and test prompts; give "
                         f"--test-prompts FILE")
    return split_rows(rows, fraction, seed, source)


class PromptTask:
    """The user's prompts as a GRPO task (see :mod:`divergent.train.rl` for the interface).

    Args:
        train_rows, test_rows: rows with a ``prompt`` (checked by :func:`read_prompt_rows`).
        tokenizer: the policy's Hugging Face tokenizer; its EOS ends a response.
        scorer: ``scorer(prompts, completions, columns) -> (rewards [N], counts)``, e.g.
            :class:`divergent.rl.rewards.RewardScorer`.
        chat_template: render prompts with the tokenizer's chat template when it has one.
        max_prompt_length: prompts longer than this many tokens keep their last ones (counted in
            ``truncated_prompts``).
        source: names the data in messages.
    """

    def __init__(self, train_rows: Sequence[dict[str, Any]], test_rows: Sequence[dict[str, Any]], tokenizer: Any,
                 scorer: Callable[..., tuple[torch.Tensor, dict[str, int]]], *, chat_template: bool = True,
                 max_prompt_length: int = 512, source: str = "--prompts") -> None:
        if not train_rows:
            raise ValueError(f"{source}: no training prompts")
        if max_prompt_length < 1:
            raise ValueError(f"max_prompt_length must be >= 1, got {max_prompt_length}")
        eos = getattr(tokenizer, "eos_token_id", None)
        if eos is None:
            raise ValueError("the policy's tokenizer has no eos_token; a response needs an end (set tokenizer.eos_token "
                             "and save it with the model)")
        self.tokenizer = tokenizer
        self.scorer = scorer
        self.rows = list(train_rows) + list(test_rows)
        self.train = list(range(len(train_rows)))
        self.test = list(range(len(train_rows), len(self.rows)))
        self.eos_id = int(eos)
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = int(pad) if pad is not None else self.eos_id
        self.use_template = bool(chat_template and getattr(tokenizer, "chat_template", None))
        self.source = source
        self.truncated_prompts = 0
        self.texts = [self._render(row["prompt"], i) for i, row in enumerate(self.rows)]
        self.ids: list[list[int]] = []
        for text in self.texts:
            ids = tokenizer(text, add_special_tokens=not self.use_template)["input_ids"]
            if len(ids) > max_prompt_length:
                ids = ids[-max_prompt_length:]
                self.truncated_prompts += 1
            if not ids:
                raise ValueError(f"{source}: a prompt tokenizes to no tokens: {text[:60]!r}")
            self.ids.append(list(ids))
        self.columns = [c for c in dict.fromkeys(k for row in self.rows for k in row) if c != "prompt"]

    def _render(self, prompt: Any, index: int) -> str:
        if isinstance(prompt, list):
            if not getattr(self.tokenizer, "chat_template", None):
                raise ValueError(f"{self.source} row {index + 1}: 'prompt' is a list of chat messages, and the "
                                 f"tokenizer has no chat template to render it; give string prompts or a tokenizer "
                                 f"with a chat_template")
            return self.tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        if self.use_template:
            return self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                      add_generation_prompt=True, tokenize=False)
        return prompt

    def encode_prompts(self, problems: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids, attention_mask)`` ``[N, L]``, left-padded with the pad token to the longest prompt."""
        rows = [self.ids[p] for p in problems]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, width - len(row):] = torch.tensor(row)
            mask[i, width - len(row):] = 1
        return ids, mask

    def decode(self, token_ids: Sequence[int]) -> tuple[str, int, bool]:
        """``(text, length, finished)``: the text before the first EOS, tokens counting the EOS, whether it ended."""
        tokens = [int(t) for t in token_ids]
        if self.eos_id in tokens:
            end = tokens.index(self.eos_id)
            return self.tokenizer.decode(tokens[:end], skip_special_tokens=True), end + 1, True
        return self.tokenizer.decode(tokens, skip_special_tokens=True), len(tokens), False

    def score(self, problems: Sequence[int], texts: Sequence[str]) -> tuple[torch.Tensor, dict[str, int]]:
        """Rewards of ``texts`` (one per problem), called as TRL calls reward functions."""
        rows = [self.rows[p] for p in problems]
        conversational = [isinstance(r["prompt"], list) for r in rows]
        prompts = [r["prompt"] for r in rows]
        completions = [[{"role": "assistant", "content": t}] if chat else t for t, chat in zip(texts, conversational)]
        columns = {c: [r.get(c) for r in rows] for c in self.columns}
        return self.scorer(prompts, completions, columns)
