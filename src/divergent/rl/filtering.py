"""Balanced online difficulty filtering.

A GRPO group whose responses are all right (or all wrong) has zero advantage
everywhere and teaches nothing. Balanced filtering keeps only prompts whose
group accuracy lies in a band ``low <= acc <= high`` (e.g. 0.25..0.75) and
refills the batch with freshly sampled prompts until it holds a fixed number.
"""

from __future__ import annotations

import torch

__all__ = ["accuracy_band_mask", "BalancedBatch"]


def accuracy_band_mask(
    rewards: torch.Tensor, *, low: float = 0.25, high: float = 0.75, correct_threshold: float = 0.0
) -> torch.Tensor:
    """``[P]`` bool: True where the group's accuracy is within ``[low, high]``.

    Args:
        rewards: ``[P, G]`` rewards; a response is correct when reward > ``correct_threshold``.

    Example:
        >>> import torch
        >>> accuracy_band_mask(torch.tensor([[1., 1., 1., 1.], [1., 0., 0., 1.], [0., 0., 0., 0.]]))
        tensor([False,  True, False])
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must have shape [prompts, group_size], got {tuple(rewards.shape)}")
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"need 0 <= low <= high <= 1, got low={low}, high={high}")
    accuracy = (rewards > correct_threshold).float().mean(dim=1)
    # A small tolerance so that e.g. 2/8 counts as 0.25 despite rounding.
    return (accuracy >= low - 1e-9) & (accuracy <= high + 1e-9)


class BalancedBatch:
    """Accumulates sampled groups that pass the accuracy band until ``size`` are held.

    Usage: ``while not batch.full: batch.offer(groups, rewards)``; then
    ``batch.items`` holds at most ``size`` kept groups (in arrival order).
    ``batch.offered`` / ``batch.kept`` count groups for logging.
    """

    def __init__(self, size: int, *, low: float = 0.25, high: float = 0.75, correct_threshold: float = 0.0):
        if size <= 0:
            raise ValueError(f"size must be > 0, got {size}")
        self.size = size
        self.low, self.high, self.correct_threshold = low, high, correct_threshold
        self.items: list = []
        self.offered = 0

    @property
    def full(self) -> bool:
        return len(self.items) >= self.size

    @property
    def kept(self) -> int:
        return len(self.items)

    def offer(self, groups: list, rewards: torch.Tensor) -> None:
        """Offer ``len(groups)`` groups with their ``[P, G]`` rewards; keep those in the band."""
        if len(groups) != rewards.shape[0]:
            raise ValueError(f"got {len(groups)} groups but rewards for {rewards.shape[0]}")
        keep = accuracy_band_mask(rewards, low=self.low, high=self.high, correct_threshold=self.correct_threshold)
        self.offered += len(groups)
        for group, kept in zip(groups, keep.tolist()):
            if kept and not self.full:
                self.items.append(group)
