"""Distillation between models with different tokenizers: Universal Logit Distillation (ULD).

The student's and the teacher's vocabularies index different strings, so no divergence
of the registry applies token by token. ULD (Boizard et al. 2024, "Towards Cross-Tokenizer
Distillation: the Universal Logit Distillation Loss for LLMs") compares the two
distributions up to a relabelling of the classes: sort each row's probabilities in
descending order, pad the shorter vocabulary with zeros, and take the L1 distance

    ULD(p, q) = Σ_i | q_(i) − p_(i) |,   q_(1) ≥ q_(2) ≥ …,  p_(1) ≥ p_(2) ≥ …

(the closed-form Wasserstein-1 distance between the two sorted distributions with a
uniform cost). Positions are aligned by truncation: the i-th answer token of the
student's tokenization against the i-th of the teacher's, over the shorter of the two,
as TRL's ``ULDLoss`` (``trl/experimental/gold/gold_trainer.py``) computes it with
``use_extended_uld=False``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from divergent.functional import _validation as v

__all__ = ["uld_distance", "uld_sequence_loss"]


def uld_distance(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    student_temperature: float = 1.0,
    teacher_temperature: float = 1.0,
    mask: Tensor | None = None,
    reduction: str = "mean",
    normalizer: float | Tensor | None = None,
) -> Tensor:
    """ULD between rows of two vocabularies: Σ_i |sort↓(q)_i − sort↓(p)_i|, the shorter padded with 0.

    Args:
        student_logits: ``[..., Vs]`` student logits (q = softmax(student / student_temperature)).
        teacher_logits: ``[..., Vt]`` teacher logits (p = softmax(teacher / teacher_temperature));
            the leading dimensions are the student's, the vocabulary sizes may differ.
        mask, reduction, normalizer: as in :func:`divergent.divergence`.

    Returns:
        float32 (float64 for float64 input) per-row values or their reduction; between 0 and 2.

    >>> import torch
    >>> from divergent.functional.cross_tokenizer import uld_distance
    >>> s = torch.tensor([[0.0, 1.0, 2.0]]); t = torch.tensor([[2.0, 1.0, 0.0, -2.0]])
    >>> round(uld_distance(s, t).item(), 4)  # the same logits, reordered, plus one teacher class
    0.0241
    """
    student_logits = v.check_logits(student_logits, "student_logits")
    teacher_logits = v.check_logits(teacher_logits, "teacher_logits")
    if student_logits.shape[:-1] != teacher_logits.shape[:-1]:
        raise ValueError(
            f"student_logits and teacher_logits must have the same leading dimensions (one row per aligned "
            f"position; the vocabularies may differ), got {tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    student_temperature = _temperature(student_temperature, "student_temperature")
    teacher_temperature = _temperature(teacher_temperature, "teacher_temperature")
    reduction = v.check_reduction(reduction)
    normalizer = v.check_normalizer(normalizer)
    batch_shape = student_logits.shape[:-1]
    mask = v.check_mask(mask, batch_shape, student_logits.device)
    dtype = v.compute_dtype(student_logits, teacher_logits)
    student_rows = student_logits.reshape(-1, student_logits.shape[-1]) if mask is None else student_logits[mask]
    teacher_rows = teacher_logits.reshape(-1, teacher_logits.shape[-1]) if mask is None else teacher_logits[mask]
    q = torch.softmax(student_rows.to(dtype) / student_temperature, dim=-1)
    p = torch.softmax(teacher_rows.to(dtype) / teacher_temperature, dim=-1)
    rows = _sorted_l1(q, p)
    if torch.isnan(rows).any():
        raise ValueError("uld_distance: NaN in the result; student_logits or teacher_logits hold NaN or rows of -inf only")
    return v.reduce_rows(rows, mask, batch_shape, reduction, normalizer)


def _sorted_l1(q: Tensor, p: Tensor) -> Tensor:
    """Σ_i |q_(i) − p_(i)| per row of two probability tensors ``[n, Vs]``, ``[n, Vt]``, sorted descending."""
    q_sorted = q.sort(dim=-1, descending=True).values
    p_sorted = p.sort(dim=-1, descending=True).values
    width = max(q_sorted.shape[-1], p_sorted.shape[-1])
    q_sorted = F.pad(q_sorted, (0, width - q_sorted.shape[-1]))
    p_sorted = F.pad(p_sorted, (0, width - p_sorted.shape[-1]))
    return (q_sorted - p_sorted).abs().sum(-1)


def _temperature(value: object, argument: str) -> float:
    try:
        return v.check_temperature(value)
    except (TypeError, ValueError) as exc:
        raise type(exc)(str(exc).replace("temperature", argument, 1)) from None


def answer_span(labels: Tensor, ignore_index: int = -100) -> tuple[int, int]:
    """(first counted position, number of counted positions) of one row of labels; (0, 0) when none count."""
    counted = labels.ne(ignore_index)
    if not bool(counted.any()):
        return 0, 0
    return int(counted.nonzero()[0, 0]), int(counted.sum())


def uld_sequence_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    student_labels: Tensor,
    teacher_labels: Tensor,
    *,
    student_temperature: float = 1.0,
    teacher_temperature: float = 1.0,
    skip_student_eos: bool = True,
    skip_teacher_eos: bool = True,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> Tensor:
    """ULD over a batch of sequences in two tokenizations, positions aligned by truncation.

    For each sequence b: the answer span of each side is its labels that are not
    ``ignore_index`` (start = the first such position, size = their number, minus 1 with
    ``skip_*_eos``); the logits at those positions (``logits[b, start:start + size]``, labels
    in the Hugging Face convention, aligned with the input ids) are truncated to the shorter
    span ``m``; ``loss_b = Σ_{i<m} ULD(q_i, p_i) / m``. The result is the mean of ``loss_b``
    over the batch (a sequence with nothing to compare counts as 0) — TRL's ``ULDLoss`` with
    ``use_extended_uld=False``, ``uld_token_merge_strategy="observed"``, no cross-entropy term.
    ``reduction="sum"``: Σ_b Σ_{i<m_b} ULD(q_i, p_i) instead, the sum over every aligned
    position (for a loss divided by a token count, as the LM trainer's).

    Args:
        student_logits: ``[B, Ls, Vs]``; teacher_logits: ``[B, Lt, Vt]`` (lengths and vocabularies may differ).
        student_labels: ``[B, Ls]``; teacher_labels: ``[B, Lt]`` (``ignore_index`` = not an answer token).
    """
    student_logits = v.check_logits(student_logits, "student_logits")
    teacher_logits = v.check_logits(teacher_logits, "teacher_logits")
    for name, logits, labels in (("student", student_logits, student_labels), ("teacher", teacher_logits, teacher_labels)):
        if logits.ndim != 3:
            raise ValueError(f"{name}_logits must be [batch, length, vocab], got shape {tuple(logits.shape)}")
        if not isinstance(labels, Tensor) or labels.shape != logits.shape[:2]:
            got = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
            raise ValueError(f"{name}_labels must be a tensor of shape {tuple(logits.shape[:2])} (the logits' "
                             f"batch and length), got {got}")
    if student_logits.shape[0] != teacher_logits.shape[0]:
        raise ValueError(f"student_logits and teacher_logits must hold the same sequences, got batch sizes "
                         f"{student_logits.shape[0]} and {teacher_logits.shape[0]}")
    student_temperature = _temperature(student_temperature, "student_temperature")
    teacher_temperature = _temperature(teacher_temperature, "teacher_temperature")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' (TRL's: the mean over sequences of each one's mean) or 'sum' "
                         f"(over every aligned position), got {reduction!r}")
    dtype = v.compute_dtype(student_logits, teacher_logits)
    losses = []
    for b in range(student_logits.shape[0]):
        s_start, s_size = answer_span(student_labels[b], ignore_index)
        t_start, t_size = answer_span(teacher_labels[b], ignore_index)
        s_size -= int(skip_student_eos and s_size > 0)
        t_size -= int(skip_teacher_eos and t_size > 0)
        length = min(s_size, t_size)
        if length <= 0:
            losses.append(student_logits[b].sum().to(dtype) * 0.0)
            continue
        q = torch.softmax(student_logits[b, s_start:s_start + length].to(dtype) / student_temperature, dim=-1)
        p = torch.softmax(teacher_logits[b, t_start:t_start + length].to(dtype) / teacher_temperature, dim=-1)
        rows = _sorted_l1(q, p).sum()
        losses.append(rows / length if reduction == "mean" else rows)
    total = torch.stack(losses)
    return total.mean() if reduction == "mean" else total.sum()
