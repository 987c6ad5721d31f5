"""Classification metrics: accuracy, NLL, expected calibration error, Brier score, teacher agreement.

All functions take logits ``(N, C)`` and integer labels ``(N,)``; probabilities
are ``softmax(logits)`` computed in float32.

- accuracy = mean 1[argmax q = y]
- NLL = −mean log q_y (natural log)
- ECE = Σ_b (|B_b| / N) · |acc(B_b) − conf(B_b)| over 15 equal-width confidence
  bins, confidence = max_c q_c (torchmetrics' ``multiclass_calibration_error``, l1 norm)
- Brier = mean Σ_c (q_c − 1[c = y])² (the multiclass form, range [0, 2])
- agreement = mean 1[argmax q = argmax p] with the teacher's logits
"""

from __future__ import annotations

import torch
from torchmetrics.functional.classification import multiclass_calibration_error

__all__ = [
    "accuracy",
    "negative_log_likelihood",
    "expected_calibration_error",
    "brier_score",
    "teacher_agreement",
    "reliability_bins",
    "classification_metrics",
    "ECE_BINS",
]

ECE_BINS = 15


def _check(logits: torch.Tensor, labels: torch.Tensor | None = None) -> None:
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2:
        raise ValueError(f"logits must be a tensor of shape (N, C), got {getattr(logits, 'shape', type(logits))}")
    if logits.is_floating_point() is False:
        raise TypeError(f"logits must be floating point, got {logits.dtype}")
    if labels is not None:
        if labels.shape != logits.shape[:1]:
            raise ValueError(f"labels must have shape ({logits.shape[0]},), got {tuple(labels.shape)}")
        if labels.is_floating_point():
            raise TypeError(f"labels must be integer class indices, got {labels.dtype}")
        if labels.numel() and (labels.min() < 0 or labels.max() >= logits.shape[1]):
            raise ValueError(f"labels must lie in [0, {logits.shape[1] - 1}], got range [{labels.min()}, {labels.max()}]")


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of rows whose arg-max class is the label.

    >>> accuracy(torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0]))
    0.5
    """
    _check(logits, labels)
    return (logits.argmax(-1) == labels).float().mean().item()


def negative_log_likelihood(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean of −log softmax(logits)_y (nats)."""
    _check(logits, labels)
    return torch.nn.functional.cross_entropy(logits.float(), labels).item()


def expected_calibration_error(logits: torch.Tensor, labels: torch.Tensor, n_bins: int = ECE_BINS) -> float:
    """Top-label ECE with ``n_bins`` equal-width bins, via torchmetrics (l1 norm)."""
    _check(logits, labels)
    probs = torch.softmax(logits.float(), dim=-1)
    return multiclass_calibration_error(probs, labels, num_classes=logits.shape[1], n_bins=n_bins, norm="l1").item()


def brier_score(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over rows of Σ_c (q_c − 1[c = y])²."""
    _check(logits, labels)
    probs = torch.softmax(logits.float(), dim=-1)
    onehot = torch.nn.functional.one_hot(labels, logits.shape[1]).float()
    return ((probs - onehot) ** 2).sum(-1).mean().item()


def teacher_agreement(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> float:
    """Fraction of rows where student and teacher predict the same class."""
    _check(student_logits)
    _check(teacher_logits)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"teacher_logits must have the student's shape {tuple(student_logits.shape)}, got {tuple(teacher_logits.shape)}"
        )
    return (student_logits.argmax(-1) == teacher_logits.argmax(-1)).float().mean().item()


def reliability_bins(logits: torch.Tensor, labels: torch.Tensor, n_bins: int = ECE_BINS) -> dict[str, list[float]]:
    """Per-bin mean confidence, accuracy and count for a reliability diagram.

    Bins are ``(k/n, (k+1)/n]`` over the top-label confidence, as in the ECE.
    Empty bins have count 0 and NaN confidence/accuracy.
    """
    _check(logits, labels)
    probs = torch.softmax(logits.float(), dim=-1)
    confidence, predicted = probs.max(-1)
    correct = (predicted == labels).float()
    edges = torch.linspace(0, 1, n_bins + 1)
    # bucketize with right=False puts c in bin k when edges[k-1] < c <= edges[k].
    bin_index = (torch.bucketize(confidence, edges[1:-1], right=False)).clamp(0, n_bins - 1)
    counts = torch.bincount(bin_index, minlength=n_bins).float()
    conf_sum = torch.zeros(n_bins).index_add_(0, bin_index, confidence)
    acc_sum = torch.zeros(n_bins).index_add_(0, bin_index, correct)
    nan = torch.full((n_bins,), float("nan"))
    return {
        "lower": edges[:-1].tolist(),
        "upper": edges[1:].tolist(),
        "confidence": torch.where(counts > 0, conf_sum / counts.clamp_min(1), nan).tolist(),
        "accuracy": torch.where(counts > 0, acc_sum / counts.clamp_min(1), nan).tolist(),
        "count": counts.tolist(),
    }


def classification_metrics(
    logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor | None = None
) -> dict[str, float]:
    """accuracy, nll, ece, brier (and agreement when ``teacher_logits`` is given) as one dict.

    >>> m = classification_metrics(torch.tensor([[3.0, 0.0], [0.0, 3.0]]), torch.tensor([0, 1]))
    >>> m["accuracy"], round(m["nll"], 4)
    (1.0, 0.0486)
    """
    metrics = {
        "accuracy": accuracy(logits, labels),
        "nll": negative_log_likelihood(logits, labels),
        "ece": expected_calibration_error(logits, labels),
        "brier": brier_score(logits, labels),
    }
    if teacher_logits is not None:
        metrics["agreement"] = teacher_agreement(logits, teacher_logits)
    return metrics
