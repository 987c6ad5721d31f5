"""Loss modules: they hold hyperparameters and call :func:`divergent.divergence`."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from divergent.functional import _validation as v
from divergent.functional.api import divergence
from divergent.functional.registry import get_spec
from divergent.functional.topk import TopK

__all__ = ["DivergenceLoss", "DistillationLoss"]


class DivergenceLoss(nn.Module):
    """``T² · divergence(name, student_logits, teacher_logits)`` as a module.

    With ``t2_scale=True`` (default, Hinton's convention) the divergence of the
    tempered distributions is multiplied by T², which keeps gradient magnitudes
    comparable across temperatures. Parameters are checked at construction. Like
    :func:`divergent.divergence`, the gradient reaches the teacher too when its logits
    require grad (detach them for a fixed teacher).

    >>> import torch, divergent as dv
    >>> loss = dv.DivergenceLoss("js", temperature=2.0, beta=0.5)
    >>> s, t = torch.randn(4, 10, requires_grad=True), torch.randn(4, 10)
    >>> value = loss(s, t)
    >>> bool(torch.isclose(value, 4.0 * dv.divergence("js", s, t, temperature=2.0)))
    True
    """

    def __init__(self, name: str, temperature: float = 1.0, t2_scale: bool = True, reduction: str = "mean",
                 **params: Any) -> None:
        super().__init__()
        self.spec = get_spec(name)
        self.name = name
        self.params = self.spec.resolve(params)
        self.temperature = v.check_temperature(temperature)
        self.reduction = v.check_reduction(reduction)
        if not isinstance(t2_scale, bool):
            raise TypeError(f"t2_scale must be True or False, got {t2_scale!r}")
        self.t2_scale = t2_scale

    @property
    def scale(self) -> float:
        return self.temperature**2 if self.t2_scale else 1.0

    def forward(self, student_logits: Tensor, teacher_logits: Tensor | TopK, mask: Tensor | None = None,
                normalizer: float | Tensor | None = None) -> Tensor:
        value = divergence(self.name, student_logits, teacher_logits, temperature=self.temperature, mask=mask,
                           reduction=self.reduction, normalizer=normalizer, **self.params)
        return value * self.scale

    def extra_repr(self) -> str:
        params = "".join(f", {k}={val!r}" for k, val in self.params.items())
        return f"{self.name!r}, temperature={self.temperature}, t2_scale={self.t2_scale}{params}"


class DistillationLoss(nn.Module):
    """Hard-label cross-entropy plus a divergence to the teacher.

    loss = hard_weight · CE(student_logits, labels) + soft_weight · s · D(p_T ‖ q_T),
    with s = T² when ``t2_scale`` (default) and D the divergence ``name``. Rows whose
    label equals ``ignore_index`` count in neither term; both terms are means over the
    counted rows, or sums divided by ``normalizer`` (e.g. the global token count).
    Without labels only the divergence is used (over all rows).

    >>> import torch, divergent as dv
    >>> loss = dv.DistillationLoss("forward_kl", hard_weight=0.1, soft_weight=0.9, temperature=4.0)
    >>> s, t = torch.randn(8, 10), torch.randn(8, 10)
    >>> labels = torch.tensor([1, 2, 3, -100, 4, 5, 6, 7])
    >>> float(loss(s, t, labels)) > 0
    True
    """

    def __init__(self, name: str, hard_weight: float = 0.5, soft_weight: float = 0.5, temperature: float = 1.0,
                 t2_scale: bool = True, ignore_index: int = -100, **params: Any) -> None:
        super().__init__()
        self.hard_weight = v.check_weight(hard_weight, "hard_weight")
        self.soft_weight = v.check_weight(soft_weight, "soft_weight")
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
        self.ignore_index = ignore_index
        self.soft = DivergenceLoss(name, temperature=temperature, t2_scale=t2_scale, reduction="mean", **params)

    @property
    def name(self) -> str:
        return self.soft.name

    def forward(self, student_logits: Tensor, teacher_logits: Tensor | TopK, labels: Tensor | None = None,
                normalizer: float | Tensor | None = None) -> Tensor:
        student_logits = v.check_logits(student_logits, "student_logits")
        if labels is None:
            if self.hard_weight > 0:
                raise ValueError(
                    f"labels are required when hard_weight > 0 (got hard_weight={self.hard_weight}); "
                    f"pass labels or set hard_weight=0"
                )
            return self.soft_weight * self.soft(student_logits, teacher_logits, normalizer=normalizer)
        if not isinstance(labels, Tensor) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise TypeError(f"labels must be an integer tensor of class indices, got {getattr(labels, 'dtype', type(labels))}")
        if labels.shape != student_logits.shape[:-1]:
            raise ValueError(
                f"labels must have shape student_logits.shape[:-1] = {tuple(student_logits.shape[:-1])}, "
                f"got {tuple(labels.shape)}"
            )
        counted = labels != self.ignore_index
        n_classes = student_logits.shape[-1]
        valid = labels[counted]
        if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= n_classes):
            raise ValueError(
                f"labels must be in [0, {n_classes}) or equal ignore_index={self.ignore_index}; "
                f"got values from {int(valid.min())} to {int(valid.max())}"
            )
        soft = self.soft(student_logits, teacher_logits, mask=counted, normalizer=normalizer)
        if self.hard_weight == 0:
            return self.soft_weight * soft
        ce_sum = F.cross_entropy(
            student_logits.reshape(-1, n_classes).to(soft.dtype),
            labels.reshape(-1),
            ignore_index=self.ignore_index,
            reduction="sum",
        )
        denominator = normalizer if normalizer is not None else max(int(counted.sum()), 1)
        return self.hard_weight * ce_sum / denominator + self.soft_weight * soft
