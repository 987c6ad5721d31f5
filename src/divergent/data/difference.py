"""MiniPLM's difference sampling: score text by how much more a teacher than a small reference predicts it.

MiniPLM (Gu et al., ICLR 2025; official code thu-coai/MiniPLM at commit
ac2302f9a5512f91e839df310af8b5d052331cba) refines a pre-training corpus offline: every
unit x (a 1024-token chunk there) is scored by

    score(x) = mean_t log p_T(x_{t+1} | x_{<=t}) - mean_t log p_R(x_{t+1} | x_{<=t})

with the teacher T and a small reference R trained on a held-out slice of the corpus
(``compute_difference_scores.py``: ``diff_scores = small_scores - large_scores``, where
each score is the per-unit mean cross-entropy of ``compute_lm_loss``), and the units with
the largest scores are kept (``construct_pretrain_data.py``: ``torch.sort(scores,
descending=True)``, the first ``int(ratio * N)``, written back in corpus order).

Which tokens count, as the official ``LMDataset.collate`` and ``_get_lm_loss_from_logits``
count them:

- a unit's tokens are its text encoded *without* special tokens followed by the EOS token
  (``tools/process_data/tokenize_pile.py``: ``tokenizer.encode(doc, add_special_tokens=False)
  + [eos_token_id]``);
- the first token is never predicted (there is no position before it);
- the prediction made *at* position t (of token t+1) counts when token t is not the padding
  id, and the official code sets the padding id to the EOS id (``utils.py``:
  ``PAD_EOS_MODELS``, every model family it uses): so a prediction made from an EOS (the
  first token of the next document in a packed chunk) does not count, the prediction *of*
  an EOS does. A tokenizer without EOS masks its padding id instead;
- padding added to fill a batch never counts.

The mean is over the counted predictions of each unit (``sum(loss * mask) / sum(mask)``).
Each model scores the same text with its own tokenizer, so teacher and reference may come
from different model families (MiniPLM's point).

Ranking (:func:`select_top`) is deterministic where the official ``torch.sort`` is not:
ties are broken by position (the earlier unit first).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "unit_token_ids",
    "masked_input_id",
    "counted_predictions",
    "mean_token_logprobs",
    "difference_scores",
    "keep_count",
    "select_top",
    "length_batches",
]


def masked_input_id(tokenizer: Any) -> int | None:
    """The token id from which predictions do not count: EOS (the official pad = EOS), else padding, else None."""
    for name in ("eos_token_id", "pad_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return None


def unit_token_ids(tokenizer: Any, text: str) -> list[int]:
    """``text`` encoded without special tokens, followed by the tokenizer's EOS (when it has one)."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    eos = getattr(tokenizer, "eos_token_id", None)
    return ids + [int(eos)] if eos is not None else ids


def counted_predictions(input_ids: torch.Tensor, lengths: torch.Tensor, masked_id: int | None) -> torch.Tensor:
    """Bool ``[B, T-1]``: whether the prediction at position t (of token t+1) counts.

    It counts when token t+1 is inside the unit (t < length - 1) and token t is not ``masked_id``.
    """
    positions = torch.arange(input_ids.shape[1] - 1, device=input_ids.device)
    inside = positions[None, :] < (lengths.to(input_ids.device)[:, None] - 1)
    if masked_id is None:
        return inside
    return inside & (input_ids[:, :-1] != masked_id)


def mean_token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, lengths: torch.Tensor,
                        masked_id: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per unit: (mean over counted predictions of log p(token t+1), number counted), float64 and int64 ``[B]``.

    ``logits`` ``[B, T, V]`` of a causal LM on right-padded ``input_ids`` ``[B, T]`` whose units have
    ``lengths`` tokens. A unit with no counted prediction has mean NaN and count 0 (callers report it).
    """
    if logits.shape[:2] != input_ids.shape:
        raise ValueError(f"logits have shape {tuple(logits.shape)}; expected [B, T, V] for input_ids {tuple(input_ids.shape)}")
    batch, width, vocab = logits.shape
    counted = counted_predictions(input_ids, lengths, masked_id)
    # Position t is scored against token t+1; the last position and uncounted ones get ignore_index,
    # so the [B*T, V] logits are used in place (no shifted copy).
    labels = torch.full_like(input_ids, -100, dtype=torch.long)
    labels[:, :-1] = torch.where(counted, input_ids[:, 1:].long(), -100)
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()  # half-precision logits: the log-softmax in float32
    # log p(x_{t+1} | x_{<=t}) = -CE(logits_t, x_{t+1})
    nll = F.cross_entropy(logits.reshape(batch * width, vocab), labels.reshape(-1), reduction="none")
    total = -nll.view(batch, width)[:, :-1].double().sum(dim=1)
    count = counted.sum(dim=1)
    return total / count, count


def difference_scores(teacher_mean: torch.Tensor | np.ndarray, reference_mean: torch.Tensor | np.ndarray) -> np.ndarray:
    """score = mean log p_T - mean log p_R (= the reference's mean loss minus the teacher's), float64."""
    return np.asarray(teacher_mean, dtype=np.float64) - np.asarray(reference_mean, dtype=np.float64)


def keep_count(keep: float, n: int) -> int:
    """Units kept: ``int(keep * n)`` as the official ``construct_pretrain_data.py`` (keep in (0, 1])."""
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0 < keep <= 1:
        raise ValueError(f"keep must be a fraction in (0, 1], got {keep!r}")
    return int(keep * n)


def select_top(scores: Sequence[float] | np.ndarray, keep: float) -> np.ndarray:
    """Bool mask of the ``int(keep * N)`` units with the largest scores; ties go to the earlier unit.

    NaN scores (units with nothing to score) are never kept and do not count in N.

    >>> select_top([0.1, 0.5, 0.5, -1.0], 0.5).tolist()
    [False, True, True, False]
    >>> select_top([0.2, 0.2, 0.2], 0.34).tolist()
    [True, False, False]
    """
    scores = np.asarray(scores, dtype=np.float64)
    finite = ~np.isnan(scores)
    n_kept = keep_count(keep, int(finite.sum()))
    # stable sort of -score: equal scores keep their corpus order; NaN sorts last
    order = np.argsort(np.where(finite, -scores, np.inf), kind="stable")
    mask = np.zeros(len(scores), dtype=bool)
    mask[order[:n_kept]] = True
    return mask


def length_batches(lengths: Sequence[int], batch_tokens: int, max_batch: int = 1024) -> list[list[int]]:
    """Indices grouped into batches of similar length, each with at most ``batch_tokens`` padded tokens.

    Sorted by length (longest first, ties by index), so padding is small; a unit longer
    than ``batch_tokens`` is a batch of its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for index in order:
        width = lengths[current[0]] if current else lengths[index]
        if current and ((len(current) + 1) * width > batch_tokens or len(current) >= max_batch):
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches
