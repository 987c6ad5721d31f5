"""Maximum conditional mutual information (MCMI) teacher fine-tuning (Ye et al., ICLR 2024)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from divergent.functional import divergence
from divergent.methods._common import as_float

__all__ = ["mcmi_teacher_loss", "class_centroid_log_probs"]


def class_centroid_log_probs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log Q_{y_i} per row: Q_y = mean softmax over the batch's samples of class y, shape ``(N, C)``.

    The batch estimate of the class-conditional output distribution; gradients flow
    through it.
    """
    probs = torch.softmax(as_float(logits), dim=-1)
    num_classes = logits.shape[-1]
    sums = torch.zeros(num_classes, num_classes, dtype=probs.dtype, device=probs.device).index_add(0, labels, probs)
    counts = torch.bincount(labels, minlength=num_classes).clamp_min(1).to(probs.dtype).unsqueeze(1)
    return (sums / counts).log()[labels]


def mcmi_teacher_loss(teacher_logits: torch.Tensor, labels: torch.Tensor, *, weight: float = 0.15) -> torch.Tensor:
    """L = CE(p, y) − λ · mean_x KL(p(x) ‖ Q_y), the batch estimate of −λ · I(X; Ŷ | Y).

    Maximising the conditional mutual information spreads the teacher's outputs
    within each class, so they carry more "dark knowledge" for a student. λ ≈ 0.15.
    Q_y is estimated on the current batch (unverified whether the paper uses the
    batch or a running estimate).
    """
    # forward_kl(student=log Q_y, teacher=p(x)) = KL(p(x) ‖ Q_y).
    cmi = divergence("forward_kl", class_centroid_log_probs(teacher_logits, labels), teacher_logits)
    return F.cross_entropy(teacher_logits, labels) - weight * cmi
