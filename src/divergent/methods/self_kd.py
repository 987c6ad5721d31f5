"""Self-distillation without a separate teacher: PS-KD and USKD."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from divergent.methods._common import as_float, non_target_logits, soft_cross_entropy, target_log_prob

__all__ = ["pskd_alpha", "pskd_loss", "uskd_loss", "uskd_rank_scores", "zipf_non_target_labels", "WeakHead"]


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


def zipf_non_target_labels(rank_scores: torch.Tensor, labels: torch.Tensor, *, rank_over: str = "all") -> torch.Tensor:
    """USKD's non-target soft labels: Zipf's law 1/rank, kept on the non-target classes and normalised.

    Rank 1 is the largest score of ``rank_scores`` ``(N, C)``. ``rank_over``:

    - ``"all"`` (USKD's official code): every class, the target included, gets its rank
      among all C classes; the target's entry is then dropped and the rest renormalised,
      so with the target ranked first the non-target classes get 1/2, 1/3, … ;
    - ``"non_target"``: the C − 1 non-target classes are ranked among themselves (1, 1/2, …).

    Returns ``(N, C − 1)`` in class order (matching :func:`non_target_logits`), without gradient.

    >>> scores, y = torch.tensor([[3.0, 0.0, 1.0]]), torch.tensor([0])
    >>> zipf_non_target_labels(scores, y)  # ranks 3 and 2 among all: (1/3, 1/2) / (5/6)
    tensor([[0.4000, 0.6000]])
    >>> zipf_non_target_labels(scores, y, rank_over="non_target")  # ranks 2 and 1
    tensor([[0.3333, 0.6667]])
    """
    if rank_over not in ("all", "non_target"):
        raise ValueError(f"rank_over must be 'all' or 'non_target', got {rank_over!r}")
    scores = rank_scores.detach()
    if rank_over == "non_target":
        scores = non_target_logits(scores, labels)
    # argsort of argsort gives each class's position in descending order (0-based rank).
    rank = scores.argsort(dim=-1, descending=True).argsort(dim=-1) + 1
    weights = 1.0 / rank.to(torch.float64 if scores.dtype == torch.float64 else torch.float32)
    if rank_over == "all":
        weights = non_target_logits(weights, labels)
    return weights / weights.sum(-1, keepdim=True)


def uskd_rank_scores(logits: torch.Tensor, labels: torch.Tensor, weak_logits: torch.Tensor | None = None) -> torch.Tensor:
    """The score USKD's official code ranks classes by, shape ``(N, C)``, without gradient.

    w_c / (1 − w_y) + log s_c / (1 − log s_y), with w = softmax(weak head), s = softmax(final
    logits) and y the label (``yzd-v/cls_KD``, ``mmcls/models/dis_losses/uskd.py``: the weak
    head's probabilities normalised by their non-target mass, plus the final *log*-probabilities
    scaled by 1 − log s_y, as the code computes them; 1e-6 is added to both denominators there
    and here). Without a weak head only the second term is used, which ranks like the logits.
    """
    logits = as_float(logits.detach())
    log_s = torch.log_softmax(logits, dim=-1)
    log_s_y = log_s.gather(1, labels.view(-1, 1))
    scores = log_s / (1.0 - log_s_y + 1e-6)
    if weak_logits is not None:
        w = torch.softmax(as_float(weak_logits.detach()), dim=-1)
        scores = scores + w / (1.0 - w.gather(1, labels.view(-1, 1)) + 1e-6)
    return scores


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
    ranking: str = "combined",
) -> torch.Tensor:
    """USKD: CE + α · L_target + β · L_non-target + μ · L_weak.

    - target soft label p̃_y = s_y² + 1 − mean_batch(s_y²) (fixed), L_target = −mean(p̃_y log s_y);
    - non-target soft labels z from Zipf's law over class ranks, L_non-target = −mean Σ z_i log N(s)_i,
      N = softmax over the non-target logits. ``ranking`` chooses the ranks:
      ``"combined"`` (default, the official code) ranks all classes by
      :func:`uskd_rank_scores` (weak head and final logits) and renormalises over the
      non-target positions; ``"weak"`` ranks the non-target classes by the weak head's logits
      alone (the model's own logits without a weak head);
    - L_weak = CE of the weak head against labels smoothed to 0.9 · onehot + 0.1 / C.

    Defaults are the ImageNet values of the paper and its code (α = 1, β = 0.1, μ = 0.005;
    the official CIFAR-100 config uses α = 0.1, β = 0.1, μ = 0.1). The official trainer adds
    the classifier's own CE to the USKD terms: ``ce_weight`` = 1.
    """
    if ranking == "combined":
        zipf = zipf_non_target_labels(uskd_rank_scores(logits, labels, weak_logits), labels, rank_over="all")
    elif ranking == "weak":
        zipf = zipf_non_target_labels(weak_logits if weak_logits is not None else logits, labels, rank_over="non_target")
    else:
        raise ValueError(f"ranking must be 'combined' (official) or 'weak', got {ranking!r}")
    log_s = torch.log_softmax(as_float(logits), dim=-1)
    s_y2 = target_log_prob(logits, labels).exp().detach() ** 2
    target_label = s_y2 + 1.0 - s_y2.mean()
    target_term = -(target_label * log_s.gather(1, labels.view(-1, 1)).squeeze(1)).mean()
    non_target_term = soft_cross_entropy(non_target_logits(logits, labels), zipf.log())
    loss = ce_weight * F.cross_entropy(logits, labels) + alpha * target_term + beta * non_target_term
    if weak_logits is not None:
        loss = loss + mu * F.cross_entropy(weak_logits, labels, label_smoothing=0.1)
    return loss
