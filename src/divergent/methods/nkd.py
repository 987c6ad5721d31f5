"""Normalized Knowledge Distillation (NKD, Yang et al. 2023)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from divergent.methods._common import non_target_logits, soft_cross_entropy, target_log_prob

__all__ = ["nkd_loss"]


def nkd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 3.0,
    gamma: float = 3.5,
    ce_weight: float = 1.0,
) -> torch.Tensor:
    """L = CE − mean(t_y · log s_y) − γ · T² · mean H(N(t_T), N(s_T)).

    t_y, s_y are the teacher's and student's target probabilities at T = 1 (t_y is a
    fixed weight); N(·) is the softmax over the non-target logits at temperature T,
    and H(a, b) = −Σ a log b the cross-entropy between the normalised non-target
    distributions. Defaults are the CIFAR-100 setting (T = 3, γ = 3.5); ImageNet
    uses T = 1, γ = 1.5.
    """
    teacher_target = target_log_prob(teacher_logits, labels).exp().detach()
    target_term = -(teacher_target * target_log_prob(student_logits, labels)).mean()
    non_target = soft_cross_entropy(
        non_target_logits(student_logits, labels),
        non_target_logits(teacher_logits, labels).detach(),
        temperature=temperature,
    )
    ce = F.cross_entropy(student_logits, labels)
    return ce_weight * ce + target_term + gamma * temperature**2 * non_target
