"""GRPO pieces: group-standardised advantages and the PPO-clip token-mean loss.

GRPO samples G responses per prompt and uses, as the advantage of every token of
response i, its reward standardised within its group:

    A_i = (R_i - mean_j R_j) / (std_j R_j + eps)

with the sample standard deviation (divide by G - 1), as TRL's GRPOTrainer and verl's
``compute_grpo_outcome_advantage`` do; ``std="population"`` divides by G instead.

The policy loss is PPO's clipped surrogate with ratio rho_t = pi_theta(y_t) / pi_old(y_t):

    L = - sum_t min(rho_t A, clip(rho_t, 1 - eps_low, 1 + eps_high) A) / (number of tokens)

optionally with verl's dual clip (for A < 0 the per-token loss is capped at -c A, so a
token whose ratio has run far above 1 stops pushing) and a clamp of log rho_t before exp.

aggregated as a *token mean* over every counted token of the batch (a long
response weighs in proportion to its length), or over ``normalizer`` tokens
when given (gradient accumulation, several ranks).
"""

from __future__ import annotations

import torch

__all__ = ["group_advantages", "masked_token_mean", "ppo_clip_loss"]


def group_advantages(
    rewards: torch.Tensor, *, eps: float = 1e-4, scale: bool = True, std: str = "sample"
) -> torch.Tensor:
    """Rewards standardised within each group: ``(R - mean) / (std + eps)``.

    Args:
        rewards: ``[P, G]`` — P prompts, G sampled responses each.
        eps: added to the standard deviation so that an all-equal group gives 0, not NaN
            (TRL's 1e-4; verl uses 1e-6).
        scale: if False, only centre (Dr. GRPO's unscaled variant).
        std: ``"sample"`` (divide by G - 1, Bessel-corrected; TRL and verl) or
            ``"population"`` (divide by G).

    Returns:
        ``[P, G]`` float advantages; every group with equal rewards is all zeros.

    Example:
        >>> import torch
        >>> group_advantages(torch.tensor([[1.0, 0.0], [1.0, 1.0]]))
        tensor([[ 0.7070, -0.7070],
                [ 0.0000,  0.0000]])
        >>> group_advantages(torch.tensor([[1.0, 0.0]]), std="population")
        tensor([[ 0.9998, -0.9998]])
    """
    if not isinstance(rewards, torch.Tensor):
        raise TypeError(f"rewards must be a torch.Tensor, got {type(rewards).__name__}")
    if rewards.dim() != 2:
        raise ValueError(f"rewards must have shape [prompts, group_size], got {tuple(rewards.shape)}")
    if rewards.shape[1] < 2:
        raise ValueError(f"group_size must be >= 2 to standardise within a group, got {rewards.shape[1]}")
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if std not in ("sample", "population"):
        raise ValueError(f"std must be 'sample' (divide by G - 1) or 'population' (divide by G), got {std!r}")
    rewards = rewards.to(torch.float64 if rewards.dtype == torch.float64 else torch.float32)
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if not scale:
        return centred
    return centred / (rewards.std(dim=1, unbiased=std == "sample", keepdim=True) + eps)


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
    dual_clip: float | None = None,
    log_ratio_clamp: float | None = None,
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
        dual_clip: c > 1 for dual-clip PPO (Ye et al. 2019; verl's ``clip_ratio_c``, 3 there): where
            A < 0 the per-token loss is min(max(-rho A, -clip(rho) A), -c A). None (default) = off.
        log_ratio_clamp: clamp log rho to [-x, x] before exp (verl clamps at 20). None (default) = off.
        normalizer: divide by this instead of the number of counted tokens.

    Returns:
        ``(loss, stats)`` where stats holds ``clip_fraction`` (share of counted tokens whose
        ratio was clipped in the direction that matters) and, with ``dual_clip``,
        ``dual_clip_fraction`` (share of counted tokens capped by it).
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
    if dual_clip is not None and not dual_clip > 1:
        raise ValueError(f"dual_clip must be > 1 (the ratio bound c for negative advantages) or None, got {dual_clip}")
    if log_ratio_clamp is not None and not log_ratio_clamp > 0:
        raise ValueError(f"log_ratio_clamp must be > 0 or None, got {log_ratio_clamp}")
    log_ratio = logp - old_logp.detach()
    if log_ratio_clamp is not None:
        log_ratio = log_ratio.clamp(-log_ratio_clamp, log_ratio_clamp)
    ratio = torch.exp(log_ratio)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - clip_eps, 1.0 + high) * advantages
    per_token = -torch.minimum(unclipped, clipped)
    stats: dict[str, float] = {}
    if dual_clip is not None:
        # -A > 0 for A < 0: capping the loss at -c A stops the push once rho > c.
        capped = torch.minimum(per_token, -dual_clip * advantages)
        with torch.no_grad():
            was_capped = (advantages < 0) & (capped < per_token) & mask
            stats["dual_clip_fraction"] = float(was_capped.sum()) / max(int(mask.sum()), 1)
        per_token = torch.where(advantages < 0, capped, per_token)
    loss = masked_token_mean(per_token, mask, normalizer)
    with torch.no_grad():
        was_clipped = (clipped < unclipped) & mask
        stats = {"clip_fraction": float(was_clipped.sum()) / max(int(mask.sum()), 1), **stats}
    return loss, stats
