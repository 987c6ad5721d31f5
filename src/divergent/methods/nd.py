"""Norm-and-direction (ND) loss of KD++ (Wang et al. 2023) and the teacher class centres it needs."""

from __future__ import annotations

import torch
from divergent.methods._common import as_float

__all__ = ["nd_loss", "teacher_class_centers"]


@torch.no_grad()
def teacher_class_centers(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """e_c = mean of the teacher's features over training samples of class c, scaled to unit norm.

    ``features`` ``(N, D)`` are the teacher's penultimate features of the training set.
    Classes with no sample get a zero centre.
    """
    sums = torch.zeros(num_classes, features.shape[1], dtype=torch.float32).index_add_(0, labels, features.float())
    counts = torch.bincount(labels, minlength=num_classes).clamp_min(1).unsqueeze(1)
    means = sums / counts
    return means / means.norm(dim=1, keepdim=True).clamp_min(1e-12)


def nd_loss(
    student_features: torch.Tensor,
    teacher_features: torch.Tensor,
    labels: torch.Tensor,
    centers: torch.Tensor,
) -> torch.Tensor:
    """mean[1 − ⟨f_s, e_y⟩ / max(‖f_s‖, ‖f_t‖)].

    Pulls the student's feature towards the teacher's class-mean direction e_y and
    its norm towards at least the teacher's (the ratio is largest when f_s points at
    e_y with norm ≥ ‖f_t‖). ``student_features`` must already have the teacher's
    width (project them first when widths differ).
    """
    if student_features.shape != teacher_features.shape:
        raise ValueError(
            f"student_features {tuple(student_features.shape)} and teacher_features "
            f"{tuple(teacher_features.shape)} must have the same shape; project the student first"
        )
    f_s = as_float(student_features)
    f_t = as_float(teacher_features).detach()
    projection = (f_s * centers[labels]).sum(-1)
    scale = torch.maximum(f_s.norm(dim=-1), f_t.norm(dim=-1)).clamp_min(1e-12)
    return (1.0 - projection / scale).mean()
