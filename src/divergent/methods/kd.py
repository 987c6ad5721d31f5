"""Logit distillation as cross-entropy plus a divergence: Hinton KD, ABKD and SinKD.

Every loss here is a weighted sum of the hard-label cross-entropy and terms taken
from :mod:`divergent.functional`; nothing re-derives a divergence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from divergent.functional import divergence

__all__ = ["divergence_kd_loss", "hinton_kd_loss", "abkd_loss", "sinkd_loss"]


def divergence_kd_loss(
    name: str,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 4.0,
    hard_weight: float = 0.5,
    soft_weight: float = 0.5,
    **params,
) -> torch.Tensor:
    """L = hard_weight · CE(q, y) + soft_weight · T² · D_name(p_T ‖ q_T).

    The T² factor (Hinton et al.) keeps the soft term's gradient scale independent of
    T. ``params`` go to the divergence (e.g. ``alpha=0.8, beta=0.3`` for ``alpha_beta``).
    """
    soft = divergence(name, student_logits, teacher_logits, temperature=temperature, **params)
    ce = F.cross_entropy(student_logits, labels) if hard_weight else student_logits.new_zeros(())
    return hard_weight * ce + soft_weight * temperature**2 * soft


def hinton_kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 4.0,
    hard_weight: float = 0.1,
    soft_weight: float = 0.9,
) -> torch.Tensor:
    """Hinton KD: hard_weight · CE + soft_weight · T² · KL(p_T ‖ q_T).

    Defaults are mdistiller's CIFAR recipe (T = 4, CE weight 0.1, KD weight 0.9).

    >>> s, t, y = torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([0, 1])
    >>> round(hinton_kd_loss(s, t, y).item(), 4)  # KL = 0, so 0.1 · log 3
    0.1099
    """
    return divergence_kd_loss(
        "forward_kl", student_logits, teacher_logits, labels,
        temperature=temperature, hard_weight=hard_weight, soft_weight=soft_weight,
    )


def abkd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    alpha: float = 0.8,
    beta: float = 0.3,
    temperature: float = 4.0,
    hard_weight: float = 1.0,
    soft_weight: float = 2.0,
) -> torch.Tensor:
    """ABKD: hard_weight · CE + soft_weight · T² · D_AB^{(α,β)}(p_T ‖ q_T).

    Defaults: the paper's CIFAR (resnet56 → resnet20) α = 0.8, β = 0.3 and total
    weight λ = 32 on the divergence, written here as soft_weight · T² = 2 · 16.
    How the paper combines λ with a temperature is unverified; set ``temperature=1,
    soft_weight=32`` for the other reading.
    """
    return divergence_kd_loss(
        "alpha_beta", student_logits, teacher_logits, labels,
        temperature=temperature, hard_weight=hard_weight, soft_weight=soft_weight, alpha=alpha, beta=beta,
    )


def sinkd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    kd_weight: float = 0.9,
    sinkhorn_weight: float = 0.8,
    temperature: float = 2.0,
    epsilon: float = 0.1,
    n_iters: int = 20,
) -> torch.Tensor:
    """SinKD: (1 − α) · CE + α · T² · KL(p_T ‖ q_T) + β · S_ε(q_T, p_T).

    S_ε is the batch-wise Sinkhorn divergence ⟨P, W⟩ with L1 cost between student and
    teacher rows (``divergent.functional.sinkhorn``). Defaults follow the SinKD GLUE
    recipe: α = ``kd_weight`` = 0.9, β = ``sinkhorn_weight`` = 0.8, T = 2, ε = 0.1,
    20 iterations. The batch is the transport problem, so the term depends on batch
    composition (and on how a batch is split across processes).
    """
    kd = divergence("forward_kl", student_logits, teacher_logits, temperature=temperature)
    sink = divergence("sinkhorn", student_logits, teacher_logits, temperature=temperature, epsilon=epsilon, n_iters=n_iters)
    ce = F.cross_entropy(student_logits, labels)
    return (1.0 - kd_weight) * ce + kd_weight * temperature**2 * kd + sinkhorn_weight * sink
