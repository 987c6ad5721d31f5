"""``gkd_loss``: any registered divergence with the call signature of TRL's ``generalized_jsd_loss``.

TRL's ``GKDTrainer`` computes its loss with the static method
``generalized_jsd_loss(student_logits, teacher_logits, labels=None, beta=0.5,
temperature=1.0, reduction="batchmean", num_items_in_batch=None)``. A TRL user swaps
the divergence in one line::

    from divergent.hf import gkd_loss
    trainer = GKDTrainer(...)
    trainer.generalized_jsd_loss = gkd_loss("skew_kl", alpha=0.1)

Equal to TRL's function for ``gkd_loss("js")`` at β in (0, 1) (the β TRL passes, its
``GKDConfig.beta``), to TRL at β = 0 for ``gkd_loss("forward_kl")`` and at β = 1 for
``gkd_loss("reverse_kl")`` (tested against TRL itself).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from divergent.functional import divergence
from divergent.functional.registry import get_spec

__all__ = ["gkd_loss"]


def gkd_loss(name: str = "js", **params: Any) -> Callable[..., torch.Tensor]:
    """A loss function for TRL's ``GKDTrainer`` that computes the divergence ``name``.

    ``params`` are the divergence's parameters (checked now). The returned function takes
    TRL's arguments:

    - ``student_logits``, ``teacher_logits``: ``[batch, seq, vocab]`` (student first);
    - ``labels``: ``[batch, seq]``, positions equal to -100 do not count;
    - ``beta``: used as ``js``'s β unless ``beta`` was given here; ignored by the other
      divergences (TRL always passes its ``GKDConfig.beta``);
    - ``temperature``: divides both logits (no T² factor, as in TRL);
    - ``reduction``: ``"batchmean"`` (sum over counted tokens / their number; without
      labels, / batch size, as TRL), ``"sum"``, ``"mean"`` (TRL's mean over every
      vocabulary entry: the sum / (tokens × vocab)), or ``"none"`` (per-token values of the
      counted tokens; TRL returns per-vocabulary-entry terms, which only some divergences
      have);
    - ``num_items_in_batch``: when given, the sum over counted tokens divided by it (TRL's
      gradient-accumulation normaliser), whatever ``reduction``.

    >>> import torch
    >>> loss = gkd_loss("reverse_kl")
    >>> s, t = torch.randn(2, 3, 10), torch.randn(2, 3, 10)
    >>> float(loss(s, t, labels=torch.zeros(2, 3, dtype=torch.long))) >= 0
    True
    """
    spec = get_spec(name)
    fixed = spec.resolve(params) if params else {}
    beta_from_call = name == "js" and "beta" not in params

    def generalized_jsd_loss(
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        labels: torch.Tensor | None = None,
        beta: float = 0.5,
        temperature: float = 1.0,
        reduction: str = "batchmean",
        num_items_in_batch: int | torch.Tensor | None = None,
    ) -> torch.Tensor:
        call_params = dict(fixed)
        if beta_from_call:
            call_params["beta"] = float(beta)
        mask = labels != -100 if labels is not None else None
        rows = divergence(name, student_logits, teacher_logits, temperature=temperature, mask=mask,
                          reduction="none", **call_params)
        total = rows.sum()
        if num_items_in_batch is not None:
            if isinstance(num_items_in_batch, torch.Tensor):
                num_items_in_batch = num_items_in_batch.to(total.device)
            return total / num_items_in_batch
        if reduction == "batchmean":
            if mask is not None:
                return total / mask.sum().clamp_min(1)
            return total / max(student_logits.shape[0], 1)
        if reduction == "sum":
            return total
        if reduction == "mean":
            tokens = mask.sum() if mask is not None else rows.numel()
            return total / (tokens * student_logits.shape[-1])
        if reduction == "none":
            return rows[mask] if mask is not None else rows
        raise ValueError(f"reduction must be 'batchmean', 'sum', 'mean' or 'none', got {reduction!r}")

    generalized_jsd_loss.__qualname__ = generalized_jsd_loss.__name__ = f"gkd_loss_{name}"
    generalized_jsd_loss.__doc__ = f"TRL-compatible generalized_jsd_loss computing divergent's {name!r}."
    return generalized_jsd_loss
