"""divergent inside the Hugging Face engine (``transformers.Trainer``, TRL, ``accelerate``).

- :class:`DistillationConfig` / :class:`DistillationTrainer`: LLM distillation with any
  registered divergence, as a ``transformers.Trainer`` (``accelerate launch`` for DDP,
  FSDP, DeepSpeed); the loss of a batch is :class:`divergent.train.lm.LMObjective`, the
  same code ``divergent distill-lm`` runs.
- :class:`GRPOConfig` / :class:`GRPOTrainer`: TRL's GRPO with a divergent RL regulariser
  (``reverse_kl`` k1/k2/k3, ``dph``, ``kdrl`` with ``teacher_model=``), logged through TRL's metrics.
- :class:`FDPGConfig` / :class:`FDPGTrainer`: f-DPG (any f-divergence to a target
  P(x) = a(x)·factor(x) scored by TRL's reward functions) on TRL's GRPO machinery, the loss
  :func:`divergent.rl.fdpg_loss` as ``divergent fdpg`` computes it.
- :func:`gkd_loss`: a drop-in for TRL's ``GKDTrainer.generalized_jsd_loss`` with any
  divergence (``trainer.generalized_jsd_loss = gkd_loss("reverse_kl")``).

Names are imported on first use, so ``from divergent.hf import gkd_loss`` works without
``transformers`` installed (extra ``llm``).
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> module that defines it. Each trainer family has its own module in this package.
_EXPORTS = {
    "DistillationConfig": "divergent.hf.distillation",
    "DistillationTrainer": "divergent.hf.distillation",
    "gkd_loss": "divergent.hf.gkd",
    "GRPOConfig": "divergent.hf.grpo",
    "GRPOTrainer": "divergent.hf.grpo",
    "FDPGConfig": "divergent.hf.fdpg",
    "FDPGTrainer": "divergent.hf.fdpg",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'divergent.hf' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
