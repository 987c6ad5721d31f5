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
    sinkhorn_temperature: float = 2.0,
    epsilon: float = 0.1,
    n_iters: int = 20,
    t2_scale: bool = False,
    sinkhorn_scale: float = 0.001,
    sinkhorn_reduction: str = "sum",
) -> torch.Tensor:
    """SinKD: (1 − α) · CE + α · c_T · KL(p_T ‖ q_T) + β · s · S(q_T', p_T').

    S is the batch-wise Sinkhorn transport cost with L1 ground cost between student and
    teacher rows (``divergent.functional.sinkhorn``, ε = ``epsilon``, ``n_iters`` alternating
    row/column normalisations), at its own temperature T' = ``sinkhorn_temperature``.

    Defaults follow the official code (``2018cx/SinKD``, ``loss.py`` and ``glue_train.py``):
    α = ``kd_weight`` = 0.9, β = ``sinkhorn_weight`` = 0.8, T = 2 for the KD term, T' = 2
    (fixed in the official ``Sinkhorn`` module), ε = 0.1, 20 iterations; the KD term is *not*
    multiplied by T² (c_T = 1, ``t2_scale=False``) and the Sinkhorn term is
    s = ``sinkhorn_scale`` = 0.001 times Σ_ij P_ij W_ij of a plan whose columns sum to 1
    (``sinkhorn_reduction="sum"``, i.e. B · ⟨P, W⟩ for a batch of B rows).
    ``t2_scale=True, sinkhorn_scale=1, sinkhorn_reduction="mean"`` gives the Hinton-style
    row this library used before (c_T = T², ⟨P, W⟩ with unit total mass).

    The official KD term is the soft cross-entropy −Σ p_T log q_T; the KL used here differs
    from it by the teacher's entropy, a constant without gradient. The batch is the transport
    problem, so the Sinkhorn term depends on batch composition (and on how a batch is split
    across processes).
    """
    if sinkhorn_reduction not in ("sum", "mean"):
        raise ValueError(f"sinkhorn_reduction must be 'sum' (official) or 'mean', got {sinkhorn_reduction!r}")
    kd = divergence("forward_kl", student_logits, teacher_logits, temperature=temperature)
    sink = divergence(
        "sinkhorn", student_logits, teacher_logits, temperature=sinkhorn_temperature,
        epsilon=epsilon, n_iters=n_iters, reduction=sinkhorn_reduction,
    )
    ce = F.cross_entropy(student_logits, labels)
    kd_scale = temperature**2 if t2_scale else 1.0
    return (1.0 - kd_weight) * ce + kd_weight * kd_scale * kd + sinkhorn_weight * sinkhorn_scale * sink
