"""OFA-KD's target-enhanced loss (Hao et al. 2023) and its projector branches."""

from __future__ import annotations

import torch
from torch import nn
from divergent.methods._common import as_float

__all__ = ["ofa_loss", "OFABranch"]


def ofa_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, *, epsilon: float = 1.0, temperature: float = 1.0
) -> torch.Tensor:
    """mean over rows of −Σ_c [(p_c + 1[c = y])^ε − 1[c = y]] · log q_c.

    p = softmax(teacher / T), q = softmax(student / T). ε > 1 enhances the target
    class's weight when the teacher is confident; at ε = 1 this is the cross-entropy
    with the teacher's distribution. Paper defaults: ε = 1.5 (ImageNet), 1.0 (CIFAR).

    >>> z = torch.zeros(1, 2)
    >>> round(ofa_loss(z, z, torch.tensor([0])).item(), 4)  # ε = 1: H(p, q) = log 2
    0.6931
    """
    if epsilon <= 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    p = torch.softmax(as_float(teacher_logits).detach() / temperature, dim=-1)
    onehot = torch.nn.functional.one_hot(labels, p.shape[-1]).to(p.dtype)
    weight = (p + onehot).pow(epsilon) - onehot
    log_q = torch.log_softmax(as_float(student_logits) / temperature, dim=-1)
    return -(weight * log_q).sum(-1).mean()


class OFABranch(nn.Module):
    """Projects an intermediate stage's output into logit space.

    Feature maps ``(N, C, H, W)``: 1x1 conv, BatchNorm, ReLU, global average pooling,
    linear. Vectors ``(N, D)``: linear, ReLU, linear. (A lighter projector than the
    paper's stage-matched blocks; the loss on its logits is the same.)
    """

    def __init__(self, in_channels: int, num_classes: int, spatial: bool, hidden: int = 128):
        super().__init__()
        if spatial:
            self.body = nn.Sequential(
                nn.Conv2d(in_channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(),
                nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(hidden, num_classes),
            )
        else:
            self.body = nn.Sequential(nn.Linear(in_channels, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.body(features)
