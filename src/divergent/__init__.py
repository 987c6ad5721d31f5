"""divergent: train one model against another model's distribution.

The choice of divergence is the pluggable concept: every divergence from the
distillation and alignment literature, verified, behind one API.

>>> import torch, divergent as dv
>>> student, teacher = torch.randn(4, 10), torch.randn(4, 10)
>>> float(dv.divergence("forward_kl", student, student)) == 0.0
True
"""

from divergent import functional
from divergent.functional import TopK, available, divergence, get_spec, register_divergence
from divergent.losses import DistillationLoss, DivergenceLoss, LinearDistillationLoss

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "functional",
    "available",
    "divergence",
    "get_spec",
    "register_divergence",
    "TopK",
    "DivergenceLoss",
    "DistillationLoss",
    "LinearDistillationLoss",
]
