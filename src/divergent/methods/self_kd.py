"""Self-distillation without a separate teacher: PS-KD and USKD."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from divergent.methods._common import as_float, non_target_logits, soft_cross_entropy, target_log_prob

__all__ = ["pskd_alpha", "pskd_loss", "uskd_loss", "zipf_non_target_labels", "WeakHead"]


def pskd_alpha(epoch: int, epochs: int, alpha_final: float = 0.8) -> float:
    """PS-KD's weight of the previous-epoch prediction: α_t = α_T · (epoch + 1) / epochs (epoch from 0).

    >>> pskd_alpha(0, 4), pskd_alpha(3, 4)
    (0.2, 0.8)
    """
    return alpha_final * (epoch + 1) / epochs


def pskd_loss(logits: torch.Tensor, labels: torch.Tensor, previous_probs: torch.Tensor | None, alpha_t: float) -> torch.Tensor:
    """Progressive self-KD: H(target, q) with target = (1 − α_t) · onehot(y) + α_t · p_prev(x).

    ``previous_probs`` are the model's own softmax outputs for these samples in the
    previous epoch; ``None`` (first epoch, nothing recorded yet) gives plain CE.
    """
    if previous_probs is None:
        return F.cross_entropy(logits, labels)
    onehot = F.one_hot(labels, logits.shape[-1]).to(previous_probs.dtype)
    target = (1.0 - alpha_t) * onehot + alpha_t * previous_probs
    return soft_cross_entropy(logits, target.log())


def zipf_non_target_labels(rank_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """USKD's non-target soft labels: 1/rank (Zipf's law) over the non-target classes, normalised.

    Rank 1 is the largest non-target logit of ``rank_logits``. Returns ``(N, C − 1)``
    in class order (matching :func:`non_target_logits`).

    >>> zipf_non_target_labels(torch.tensor([[3.0, 0.0, 1.0]]), torch.tensor([0]))
    tensor([[0.3333, 0.6667]])
    """
    scores = non_target_logits(rank_logits.detach(), labels)
    # argsort of argsort gives each class's position in descending order (0-based rank).
    rank = scores.argsort(dim=-1, descending=True).argsort(dim=-1) + 1
    weights = 1.0 / rank.float()
    return weights / weights.sum(-1, keepdim=True)


class WeakHead(nn.Module):
    """USKD's weak classifier on mid-level features: global average pooling (for maps) and a linear layer."""

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.linear = nn.Linear(in_features, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.ndim > 2:
            features = features.flatten(2).mean(-1)
        return self.linear(features)


def uskd_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    weak_logits: torch.Tensor | None = None,
    alpha: float = 1.0,
    beta: float = 0.1,
    mu: float = 0.005,
    ce_weight: float = 1.0,
) -> torch.Tensor:
    """USKD: CE + α · L_target + β · L_non-target + μ · L_weak.

    - target soft label p̃_y = s_y² + 1 − mean_batch(s_y²) (fixed), L_target = −mean(p̃_y log s_y);
    - non-target soft labels z = Zipf 1/rank over the ranks of ``weak_logits`` (or of the
      model's own logits when no weak head is used), L_non-target = −mean Σ z_i log N(s)_i,
      N = softmax over the non-target logits;
    - L_weak = CE of the weak head against labels smoothed to 0.9 · onehot + 0.1 / C.

    Defaults are the paper's ImageNet values (α = 1, β = 0.1, μ = 0.005). Whether CE is
    kept beside the target term is configurable (``ce_weight``); unverified.
    """
    log_s = torch.log_softmax(as_float(logits), dim=-1)
    s_y2 = target_log_prob(logits, labels).exp().detach() ** 2
    target_label = s_y2 + 1.0 - s_y2.mean()
    target_term = -(target_label * log_s.gather(1, labels.view(-1, 1)).squeeze(1)).mean()
    zipf = zipf_non_target_labels(weak_logits if weak_logits is not None else logits, labels)
    non_target_term = soft_cross_entropy(non_target_logits(logits, labels), zipf.log())
    loss = ce_weight * F.cross_entropy(logits, labels) + alpha * target_term + beta * non_target_term
    if weak_logits is not None:
        loss = loss + mu * F.cross_entropy(weak_logits, labels, label_smoothing=0.1)
    return loss
