"""A generated arithmetic task with a verifiable exact-match reward.

Problems are ``"a+b="`` (or ``-``, ``*``) with ``0 <= a, b <= max_operand``; the
answer is the decimal result, e.g. ``"12+7="`` -> ``"19"``. Tokens are raw bytes
(0..255) plus three special ids: ``BOS`` (256), ``EOS`` (257), ``PAD`` (258), so
the vocabulary has :data:`VOCAB_SIZE` = 259 entries.

Every prompt is encoded to the same length by left-filling with ``BOS``; a
batch of prompts is then a plain ``[N, prompt_length]`` tensor that any causal
LM (the project's TinyGPT or a Hugging Face model) can continue without an
attention mask. A response is the bytes of the answer followed by ``EOS``.

The full problem set is every (a, op, b) triple; it is shuffled with ``seed``
and split into held-out test problems and training problems, so the split is
the same on every machine.

>>> task = ArithmeticTask(max_operand=9, n_test=10, seed=0)
>>> len(task.train) + len(task.test)
100
>>> task.reward(task.test[0], task.test[0].answer)
1.0
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["BOS", "EOS", "PAD", "VOCAB_SIZE", "Problem", "ArithmeticTask", "encode_text", "decode_response"]

BOS, EOS, PAD = 256, 257, 258
VOCAB_SIZE = 259

_OPERATIONS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


@dataclass(frozen=True)
class Problem:
    """One task instance: the prompt text (``"12+7="``) and its exact answer (``"19"``)."""

    prompt: str
    answer: str


def encode_text(text: str) -> list[int]:
    """UTF-8 bytes of ``text`` as token ids."""
    return list(text.encode("utf-8"))


def decode_response(token_ids: Sequence[int]) -> tuple[str, int, bool]:
    """Decode generated ids up to the first ``EOS``.

    Returns:
        ``(text, length, finished)``: the decoded bytes (invalid bytes and
        special ids become U+FFFD), the number of response tokens counting the
        EOS, and whether an EOS was produced within the ids given.
    """
    data = bytearray()
    for position, token in enumerate(int(t) for t in token_ids):
        if token == EOS:
            return bytes(data).decode("utf-8", errors="replace"), position + 1, True
        if 0 <= token < 256:
            data.append(token)
        else:
            data.extend("\ufffd".encode("utf-8"))
    return bytes(data).decode("utf-8", errors="replace"), len(token_ids), False


class ArithmeticTask:
    """Generated arithmetic problems with exact-match reward.

    Args:
        max_operand: operands range over ``0..max_operand``.
        operations: string of operators drawn from ``"+-*"``.
        n_test: number of held-out test problems.
        seed: seed of the shuffle that splits train and test.
    """

    def __init__(self, *, max_operand: int = 99, operations: str = "+", n_test: int = 200, seed: int = 0):
        if not isinstance(max_operand, int) or max_operand < 1:
            raise ValueError(f"max_operand must be an int >= 1, got {max_operand!r}")
        if not operations or any(op not in _OPERATIONS for op in operations):
            raise ValueError(f"operations must be a non-empty string over '+-*', got {operations!r}")
        problems = [
            Problem(f"{a}{op}{b}=", str(_OPERATIONS[op](a, b)))
            for op in dict.fromkeys(operations)
            for a in range(max_operand + 1)
            for b in range(max_operand + 1)
        ]
        if not 1 <= n_test < len(problems):
            raise ValueError(f"n_test must be in [1, {len(problems) - 1}] for this task, got {n_test}")
        random.Random(seed).shuffle(problems)
        self.max_operand, self.operations, self.seed = max_operand, operations, seed
        self.vocab_size, self.eos_id, self.pad_id = VOCAB_SIZE, EOS, PAD
        self.test: list[Problem] = problems[:n_test]
        self.train: list[Problem] = problems[n_test:]
        # One BOS at least, so that every prompt starts the same way.
        self.prompt_length = 1 + max(len(encode_text(p.prompt)) for p in problems)
        self.max_answer_tokens = max(len(encode_text(p.answer)) for p in problems) + 1  # + EOS

    # ------------------------------------------------------------------ encoding
    def encode_prompts(self, problems: Sequence[Problem]) -> torch.Tensor:
        """``[N, prompt_length]`` int64 ids, left-filled with ``BOS``."""
        rows = []
        for problem in problems:
            ids = encode_text(problem.prompt)
            rows.append([BOS] * (self.prompt_length - len(ids)) + ids)
        return torch.tensor(rows, dtype=torch.long)

    def supervised_batch(self, problems: Sequence[Problem]) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forcing tensors for the answers.

        Returns:
            ``input_ids [N, prompt_length + max_answer_tokens]`` (right-padded with
            ``PAD``) and ``target_mask`` of the same shape, True at positions whose
            token is part of the answer or its EOS (the positions to predict).
        """
        prompts = self.encode_prompts(problems)
        width = self.prompt_length + self.max_answer_tokens
        ids = torch.full((len(problems), width), PAD, dtype=torch.long)
        mask = torch.zeros((len(problems), width), dtype=torch.bool)
        ids[:, : self.prompt_length] = prompts
        for row, problem in enumerate(problems):
            answer = encode_text(problem.answer) + [EOS]
            ids[row, self.prompt_length : self.prompt_length + len(answer)] = torch.tensor(answer)
            mask[row, self.prompt_length : self.prompt_length + len(answer)] = True
        return ids, mask

    def decode(self, token_ids: Sequence[int]) -> tuple[str, int, bool]:
        """See :func:`decode_response`."""
        return decode_response(token_ids)

    # ------------------------------------------------------------------ reward
    def reward(self, problem: Problem, response: str) -> float:
        """1.0 when the response is exactly the answer (surrounding spaces ignored), else 0.0."""
        return 1.0 if response.strip() == problem.answer else 0.0

    def wrong_answer(self, problem: Problem, rng: random.Random) -> str:
        """A plausible wrong answer (off by a small non-zero amount), for preference pairs."""
        value = int(problem.answer)
        offset = rng.choice([-10, -2, -1, 1, 2, 10])
        return str(value + offset)

    def preference_pairs(self, problems: Sequence[Problem], seed: int = 0) -> list[tuple[str, str, str]]:
        """``(prompt, chosen, rejected)`` triples: the exact answer over a near miss."""
        rng = random.Random(seed)
        return [(p.prompt, p.answer, self.wrong_answer(p, rng)) for p in problems]
