"""Maximum conditional mutual information (MCMI) teacher fine-tuning (Ye et al., ICLR 2024)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from divergent.functional import divergence
from divergent.methods._common import as_float

__all__ = ["mcmi_teacher_loss", "class_centroids", "class_centroid_log_probs"]


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


@torch.no_grad()
def class_centroids(logits: torch.Tensor, labels: torch.Tensor, num_classes: int | None = None) -> torch.Tensor:
    """Q ``(C, C)``: row y is the mean softmax of ``logits`` over the samples labelled y.

    Pass the logits of the whole training set to get the centroids the official MCMI code
    uses (``Centroid.update_epoch`` in ``iclr2024mcmi/ICLRMCMI``: the softmax outputs summed
    per class and each row normalised to sum 1). A class with no sample gets the uniform
    distribution. No gradient.

    >>> class_centroids(torch.log(torch.tensor([[0.5, 0.5], [0.9, 0.1], [0.1, 0.9]])), torch.tensor([0, 0, 1]))
    tensor([[0.7000, 0.3000],
            [0.1000, 0.9000]])
    """
    probs = torch.softmax(as_float(logits), dim=-1)
    num_classes = probs.shape[-1] if num_classes is None else num_classes
    if probs.shape[-1] != num_classes:
        raise ValueError(f"logits must have {num_classes} classes (num_classes), got shape {tuple(logits.shape)}")
    sums = torch.zeros(num_classes, num_classes, dtype=probs.dtype, device=probs.device).index_add(0, labels, probs)
    empty = torch.bincount(labels, minlength=num_classes) == 0
    sums[empty] = 1.0
    return sums / sums.sum(-1, keepdim=True)


def mcmi_teacher_loss(
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    weight: float = 0.15,
    centroids: torch.Tensor | None = None,
) -> torch.Tensor:
    """L = CE(p, y) − λ · mean_x KL(p(x) ‖ Q_y), an estimate of −λ · I(X; Ŷ | Y).

    Maximising the conditional mutual information spreads the teacher's outputs
    within each class, so they carry more "dark knowledge" for a student. λ = ``weight``
    (0.15 in the official scripts). Q_y, the mean teacher softmax over class y, is

    - ``centroids`` ``(C, C)`` when given: fixed class centroids (no gradient through them),
      e.g. :func:`class_centroids` of the training set, as the official code does;
    - otherwise the batch estimate (:func:`class_centroid_log_probs`), with gradients
      flowing through Q_y.
    """
    if centroids is None:
        log_q = class_centroid_log_probs(teacher_logits, labels)
    else:
        num_classes = teacher_logits.shape[-1]
        if centroids.shape != (num_classes, num_classes):
            raise ValueError(
                f"centroids must have shape ({num_classes}, {num_classes}) (classes x classes), "
                f"got {tuple(centroids.shape)}"
            )
        log_q = centroids.detach().to(device=teacher_logits.device, dtype=as_float(teacher_logits).dtype).log()[labels]
    # forward_kl(student=log Q_y, teacher=p(x)) = KL(p(x) ‖ Q_y).
    cmi = divergence("forward_kl", log_q, teacher_logits)
    return F.cross_entropy(teacher_logits, labels) - weight * cmi
