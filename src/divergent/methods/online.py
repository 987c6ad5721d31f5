"""Online distillation: two networks trained together (DML, BD-KD)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from divergent.functional import divergence

__all__ = ["dml_losses", "bdkd_online_losses"]


def dml_losses(
    logits_a: torch.Tensor, logits_b: torch.Tensor, labels: torch.Tensor, *, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Deep mutual learning: each network gets CE + T² · KL(p_other ‖ q_self), the peer detached.

    Returns ``(loss_a, loss_b)``; the sum can be minimised in one backward pass because
    each loss only reaches its own network's parameters.
    """
    kl_a = divergence("forward_kl", logits_a, logits_b.detach(), temperature=temperature)
    kl_b = divergence("forward_kl", logits_b, logits_a.detach(), temperature=temperature)
    scale = temperature**2
    return F.cross_entropy(logits_a, labels) + scale * kl_a, F.cross_entropy(logits_b, labels) + scale * kl_b


def bdkd_online_losses(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    high_weight: float = 3.0,
    low_weight: float = 1.0,
    teacher_divergence: str = "forward_kl",
    teacher_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BD-KD online: (student loss, teacher loss).

    student: CE + T² · BD(p_t, q_s), the entropy-balanced sum of forward and reverse KL
    (``divergent.functional.bdkd``; weights 3 and 1 at T = 1 as in a third-party
    reimplementation); teacher: CE + teacher_weight · T² · D(student ‖ teacher) with
    D = ``teacher_divergence``, the student's prediction as the (detached) target.
    The exact weights, teacher term and temperature of the paper are unverified.
    """
    scale = temperature**2
    balanced = divergence(
        "bdkd", student_logits, teacher_logits.detach(), temperature=temperature,
        high_weight=high_weight, low_weight=low_weight,
    )
    toward_student = divergence(teacher_divergence, teacher_logits, student_logits.detach(), temperature=temperature)
    student_loss = F.cross_entropy(student_logits, labels) + scale * balanced
    teacher_loss = F.cross_entropy(teacher_logits, labels) + teacher_weight * scale * toward_student
    return student_loss, teacher_loss
