"""Decoupled Knowledge Distillation (DKD, Zhao et al. 2022)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from divergent.functional import divergence
from divergent.methods._common import as_float, non_target_logits

__all__ = ["dkd_loss", "binary_target_log_probs"]


def binary_target_log_probs(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """log [b_y, 1 − b_y] with b = softmax(logits / T), computed in log space, shape ``(N, 2)``.

    log(1 − b_y) = logsumexp_{c≠y}(z_c / T) − logsumexp_c(z_c / T), which stays finite
    even when b_y rounds to 1.
    """
    scaled = as_float(logits) / temperature
    log_total = torch.logsumexp(scaled, dim=-1)
    log_target = scaled.gather(1, labels.view(-1, 1)).squeeze(1) - log_total
    log_rest = torch.logsumexp(non_target_logits(scaled, labels), dim=-1) - log_total
    return torch.stack([log_target, log_rest], dim=-1)


def dkd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    epoch: int,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
    warmup_epochs: int = 20,
    ce_weight: float = 1.0,
) -> torch.Tensor:
    """L = CE + min((epoch + 1) / warmup, 1) · (α · TCKD + β · NCKD).

    TCKD = T² · KL(b_t ‖ b_s) over the binary split [p_y, 1 − p_y];
    NCKD = T² · KL(p̂_t ‖ p̂_s) over the non-target classes, renormalised
    (p̂ = softmax of the non-target logits / T). ``epoch`` counts from 0 (the trainer's
    count), so the first epoch gets 1/warmup: the same factor as mdistiller's
    min(epoch / warmup, 1) with its epochs counted from 1 (``mdistiller/distillers/DKD.py``,
    ``mdistiller/engine/trainer.py``). Defaults are mdistiller's CIFAR recipe: α = 1, β = 8,
    T = 4, 20 warm-up epochs, CE weight 1.

    >>> z = torch.tensor([[2.0, 0.0, -1.0]])
    >>> dkd_loss(z, z, torch.tensor([0]), epoch=30).item() == F.cross_entropy(z, torch.tensor([0])).item()
    True
    """
    # Binary "logits" are log-probabilities: softmax leaves them unchanged at T = 1.
    tckd = divergence(
        "forward_kl",
        binary_target_log_probs(student_logits, labels, temperature),
        binary_target_log_probs(teacher_logits, labels, temperature),
    )
    nckd = divergence(
        "forward_kl",
        non_target_logits(student_logits, labels),
        non_target_logits(teacher_logits, labels),
        temperature=temperature,
    )
    warmup = min((epoch + 1) / warmup_epochs, 1.0) if warmup_epochs > 0 else 1.0
    ce = F.cross_entropy(student_logits, labels)
    return ce_weight * ce + warmup * temperature**2 * (alpha * tckd + beta * nckd)
