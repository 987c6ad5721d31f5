"""nn.Module wrappers that hold hyperparameters and call divergent.functional."""

from divergent.losses.linear import LinearDistillationLoss
from divergent.losses.modules import DistillationLoss, DivergenceLoss

__all__ = ["DivergenceLoss", "DistillationLoss", "LinearDistillationLoss"]
