"""f-DPO: DPO with the reverse-KL regulariser replaced by an f-divergence.

With the sequence ratio ``u = pi_theta(y|x) / pi_ref(y|x)`` and ``psi = f'``:

    L = -log sigmoid( beta * [psi(u_chosen) - psi(u_rejected)] )

    reverse_kl:  psi(u) = log u                  (standard DPO)
    forward_kl:  psi(u) = -1 / u
    js:          psi(u) = log(2u / (1 + u))
    alpha:       psi(u) = (1 - u^(-alpha)) / alpha,  0 < alpha < 1

(Additive constants of f' cancel in the difference.) All psi are computed from
``log u`` (a difference of summed token log-probs). Note that forward_kl and
alpha grow like ``exp(-log u)`` when the policy puts much less mass than the
reference on a response; the loss is computed in float64 to push that limit out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from divergent.rl.generators import f_prime, f_prime_at_one

__all__ = ["FDPO_DIVERGENCES", "fdpo_loss", "fdpo_psi"]

FDPO_DIVERGENCES = ("reverse_kl", "forward_kl", "js", "alpha")


def fdpo_psi(log_ratio: torch.Tensor, divergence: str, *, alpha: float = 0.5) -> torch.Tensor:
    """psi(u) = f'(u) at ``u = exp(log_ratio)`` for the f-DPO divergences.

    Example:
        >>> import torch
        >>> fdpo_psi(torch.tensor([0.0]), "forward_kl")
        tensor([-1.])
    """
    if not isinstance(log_ratio, torch.Tensor) or not log_ratio.is_floating_point():
        raise TypeError("log_ratio must be a floating-point torch.Tensor")
    if divergence not in FDPO_DIVERGENCES:
        raise ValueError(f"divergence must be one of {FDPO_DIVERGENCES}, got {divergence!r}")
    if divergence == "alpha" and not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1) for f-DPO, got {alpha}")
    # f' from the one table (divergent.rl.generators). reverse_kl and alpha drop f'(1) so that
    # reverse KL is standard DPO's log u; forward_kl keeps the paper's -1/u (constants cancel).
    shift = 0.0 if divergence == "forward_kl" else f_prime_at_one(divergence, alpha=alpha)
    return f_prime(log_ratio, divergence, alpha=alpha) - shift


def fdpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    divergence: str = "reverse_kl",
    beta: float = 0.1,
    alpha: float = 0.5,
    reduction: str = "mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """f-DPO loss from summed sequence log-probs (shape ``[B]`` each).

    Returns:
        ``(loss, stats)``; stats has per-pair ``chosen_rewards`` and ``rejected_rewards``
        (``beta * psi``, detached) and ``accuracy`` (share with chosen > rejected).
    """
    tensors = {
        "policy_chosen_logps": policy_chosen_logps,
        "policy_rejected_logps": policy_rejected_logps,
        "ref_chosen_logps": ref_chosen_logps,
        "ref_rejected_logps": ref_rejected_logps,
    }
    for name, value in tensors.items():
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise TypeError(f"{name} must be a floating-point torch.Tensor")
        if value.shape != policy_chosen_logps.shape or value.dim() != 1:
            raise ValueError(
                f"{name} must have shape [batch] = {tuple(policy_chosen_logps.shape)}, got {tuple(value.shape)}"
            )
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    out_dtype = policy_chosen_logps.dtype
    chosen_log_ratio = (policy_chosen_logps - ref_chosen_logps.detach()).double()
    rejected_log_ratio = (policy_rejected_logps - ref_rejected_logps.detach()).double()
    chosen = beta * fdpo_psi(chosen_log_ratio, divergence, alpha=alpha)
    rejected = beta * fdpo_psi(rejected_log_ratio, divergence, alpha=alpha)
    per_pair = -F.logsigmoid(chosen - rejected)
    if reduction == "mean":
        loss = per_pair.mean()
    elif reduction == "sum":
        loss = per_pair.sum()
    else:
        loss = per_pair
    stats = {
        "chosen_rewards": chosen.detach().to(out_dtype),
        "rejected_rewards": rejected.detach().to(out_dtype),
        "accuracy": (chosen > rejected).float().mean().detach(),
    }
    return loss.to(out_dtype), stats
