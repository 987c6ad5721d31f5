"""GRPO pieces: group-standardised advantages and the PPO-clip token-mean loss.

GRPO samples G responses per prompt and uses, as the advantage of every token of
response i, its reward standardised within its group:

    A_i = (R_i - mean_j R_j) / (std_j R_j + eps)

The policy loss is PPO's clipped surrogate with ratio rho_t = pi_theta(y_t) / pi_old(y_t):

    L = - sum_t min(rho_t A, clip(rho_t, 1 - eps_low, 1 + eps_high) A) / (number of tokens)

aggregated as a *token mean* over every counted token of the batch (a long
response weighs in proportion to its length), or over ``normalizer`` tokens
when given (gradient accumulation, several ranks).
"""

from __future__ import annotations

import torch

__all__ = ["group_advantages", "masked_token_mean", "ppo_clip_loss"]


def group_advantages(rewards: torch.Tensor, *, eps: float = 1e-4, scale: bool = True) -> torch.Tensor:
    """Rewards standardised within each group: ``(R - mean) / (std + eps)``.

    Args:
        rewards: ``[P, G]`` — P prompts, G sampled responses each.
        eps: added to the standard deviation so that an all-equal group gives 0, not NaN.
        scale: if False, only centre (Dr. GRPO's unscaled variant).

    Returns:
        ``[P, G]`` float advantages; every group with equal rewards is all zeros.
        The standard deviation is the population one (divide by G).

    Example:
        >>> import torch
        >>> group_advantages(torch.tensor([[1.0, 0.0], [1.0, 1.0]]))
        tensor([[ 0.9998, -0.9998],
                [ 0.0000,  0.0000]])
    """
    if not isinstance(rewards, torch.Tensor):
        raise TypeError(f"rewards must be a torch.Tensor, got {type(rewards).__name__}")
    if rewards.dim() != 2:
        raise ValueError(f"rewards must have shape [prompts, group_size], got {tuple(rewards.shape)}")
    if rewards.shape[1] < 2:
        raise ValueError(f"group_size must be >= 2 to standardise within a group, got {rewards.shape[1]}")
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    rewards = rewards.to(torch.float64 if rewards.dtype == torch.float64 else torch.float32)
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if not scale:
        return centred
    return centred / (rewards.std(dim=1, unbiased=False, keepdim=True) + eps)


def masked_token_mean(values: torch.Tensor, mask: torch.Tensor, normalizer: float | None = None) -> torch.Tensor:
    """Sum of ``values`` over ``mask`` divided by the number of counted tokens (or ``normalizer``).

    An all-false mask gives 0 with a valid (zero) gradient.
    """
    if mask.shape != values.shape:
        raise ValueError(f"mask must have shape {tuple(values.shape)}, got {tuple(mask.shape)}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got dtype {mask.dtype}")
    total = torch.where(mask, values, torch.zeros_like(values)).sum()
    if normalizer is not None:
        if normalizer <= 0:
            raise ValueError(f"normalizer must be > 0, got {normalizer}")
        return total / normalizer
    return total / mask.sum().clamp(min=1)


def ppo_clip_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    normalizer: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO clipped surrogate, token-mean aggregated.

    Args:
        logp: ``[B, T]`` log pi_theta of the sampled tokens (with gradient).
        old_logp: ``[B, T]`` log pi_old of the same tokens (no gradient needed).
        advantages: ``[B]`` per-sequence advantage (broadcast over tokens) or ``[B, T]``.
        mask: ``[B, T]`` bool, True on response tokens that count.
        clip_eps: lower clip range, rho >= 1 - clip_eps.
        clip_eps_high: upper clip range (defaults to ``clip_eps``; DAPO's clip-higher uses a larger one).
        normalizer: divide by this instead of the number of counted tokens.

    Returns:
        ``(loss, stats)`` where stats holds ``clip_fraction`` (share of counted
        tokens whose ratio was clipped in the direction that matters).
    """
    if logp.shape != old_logp.shape or logp.shape != mask.shape:
        raise ValueError(
            f"logp, old_logp and mask must share a shape, got {tuple(logp.shape)}, "
            f"{tuple(old_logp.shape)}, {tuple(mask.shape)}"
        )
    if advantages.dim() == 1:
        if advantages.shape[0] != logp.shape[0]:
            raise ValueError(f"advantages must have {logp.shape[0]} entries, got {advantages.shape[0]}")
        advantages = advantages.unsqueeze(1).expand_as(logp)
    elif advantages.shape != logp.shape:
        raise ValueError(f"advantages must have shape [B] or {tuple(logp.shape)}, got {tuple(advantages.shape)}")
    if not 0 < clip_eps < 1:
        raise ValueError(f"clip_eps must be in (0, 1), got {clip_eps}")
    high = clip_eps if clip_eps_high is None else clip_eps_high
    if high <= 0:
        raise ValueError(f"clip_eps_high must be > 0, got {high}")
    ratio = torch.exp(logp - old_logp.detach())
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - clip_eps, 1.0 + high) * advantages
    per_token = -torch.minimum(unclipped, clipped)
    loss = masked_token_mean(per_token, mask, normalizer)
    with torch.no_grad():
        was_clipped = (clipped < unclipped) & mask
        clip_fraction = float(was_clipped.sum()) / max(int(mask.sum()), 1)
    return loss, {"clip_fraction": clip_fraction}
