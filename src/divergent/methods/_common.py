"""Small pieces shared by the classifier methods (not divergences: those live in functional)."""

from __future__ import annotations

import torch

from divergent.functional import divergence

__all__ = ["as_float", "non_target_logits", "soft_cross_entropy", "target_log_prob"]


def as_float(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32, or float64 when it already is (the functional layer's rule)."""
    return x if x.dtype == torch.float64 else x.float()


def non_target_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The ``(N, C − 1)`` logits of every class except each row's label, in class order.

    >>> non_target_logits(torch.tensor([[0.0, 1.0, 2.0]]), torch.tensor([1]))
    tensor([[0., 2.]])
    """
    keep = torch.ones_like(logits, dtype=torch.bool).scatter_(1, labels.view(-1, 1), False)
    return logits[keep].view(logits.shape[0], logits.shape[1] - 1)


def target_log_prob(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / T)_y per row, shape ``(N,)``."""
    return torch.log_softmax(as_float(logits) / temperature, dim=-1).gather(1, labels.view(-1, 1)).squeeze(1)


def soft_cross_entropy(
    student_logits: torch.Tensor, target_logits: torch.Tensor, *, temperature: float = 1.0
) -> torch.Tensor:
    """Mean over rows of H(t, q) = −Σ_c t_c log q_c, with t = softmax(target_logits / T).

    Written as H(t, q) = KL(t ‖ q) + H(t): the KL comes from the functional layer,
    the entropy H(t) carries no gradient to the student (``target_logits`` is a
    fixed target). Pass log-probabilities as ``target_logits`` for a given
    distribution t.

    >>> t = torch.log(torch.tensor([[0.5, 0.5]]))
    >>> round(soft_cross_entropy(torch.zeros(1, 2), t).item(), 4)  # log 2
    0.6931
    """
    target_log = torch.log_softmax(as_float(target_logits) / temperature, dim=-1)
    # 0 · log 0 = 0 for classes with zero target mass.
    entropy = -(target_log.exp() * target_log.clamp_min(torch.finfo(target_log.dtype).min)).sum(-1).mean()
    kl = divergence("forward_kl", student_logits, target_logits, temperature=temperature)
    return kl + entropy
