"""Per-token KL estimators on sampled tokens, and token log-probabilities.

With ``log r = log pi_theta(y_t) - log pi_ref(y_t)`` evaluated on tokens
``y_t ~ pi_theta`` (Schulman's "Approximating KL divergence"):

- ``k1 = log r`` — unbiased for KL(pi_theta || pi_ref), high variance, can be negative;
- ``k2 = (log r)^2 / 2`` — biased (its mean is not the KL), low variance, >= 0;
- ``k3 = exp(-log r) + log r - 1`` — unbiased and >= 0 (the GRPO choice).

All three are zero when the two log-probabilities agree. verl's ``kl_penalty`` clamps
k3 for numerical stability (``log r`` to [-20, 20], the value to [-10, 10]); the same
clamps are options here (``log_ratio_clamp``, ``value_clamp``), off by default as in TRL.
"""

from __future__ import annotations

import torch

__all__ = ["KL_ESTIMATORS", "kl_estimator", "token_logprobs"]

KL_ESTIMATORS = ("k1", "k2", "k3")


def _check_float_tensor(name: str, value) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")


def kl_estimator(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    kind: str = "k3",
    *,
    log_ratio_clamp: float | None = None,
    value_clamp: float | None = None,
) -> torch.Tensor:
    """Per-token estimate of KL(pi_theta || pi_ref) from sampled-token log-probs.

    Args:
        logp: log pi_theta(y_t) of the sampled tokens, any shape.
        ref_logp: log pi_ref(y_t) of the same tokens, same shape.
        kind: ``"k1"`` (log r), ``"k2"`` ((log r)^2 / 2) or ``"k3"`` (exp(-log r) + log r - 1),
            with ``log r = logp - ref_logp``.
        log_ratio_clamp: clamp ``log r`` to [-x, x] first (verl: 20 for k3). None = off.
        value_clamp: clamp the estimate to [-x, x] (verl: 10 for k3). None = off.

    Returns:
        A tensor of the input shape (no reduction; mask and average it yourself).

    Example:
        >>> import torch
        >>> kl_estimator(torch.tensor([-1.0]), torch.tensor([-1.0]), "k3")
        tensor([0.])
        >>> kl_estimator(torch.tensor([-30.0]), torch.tensor([0.0]), "k3", log_ratio_clamp=20.0, value_clamp=10.0)
        tensor([10.])
    """
    _check_float_tensor("logp", logp)
    _check_float_tensor("ref_logp", ref_logp)
    if logp.shape != ref_logp.shape:
        raise ValueError(
            f"logp and ref_logp must have the same shape, got {tuple(logp.shape)} and {tuple(ref_logp.shape)}"
        )
    if kind not in KL_ESTIMATORS:
        raise ValueError(f"kind must be one of {KL_ESTIMATORS}, got {kind!r}")
    for name, bound in (("log_ratio_clamp", log_ratio_clamp), ("value_clamp", value_clamp)):
        if bound is not None and (isinstance(bound, bool) or not isinstance(bound, (int, float)) or not bound > 0):
            raise ValueError(f"{name} must be a number > 0 or None, got {bound!r}")
    log_ratio = logp - ref_logp
    if log_ratio_clamp is not None:
        log_ratio = log_ratio.clamp(-log_ratio_clamp, log_ratio_clamp)
    if kind == "k1":
        value = log_ratio
    elif kind == "k2":
        value = 0.5 * log_ratio.square()
    else:
        # k3 = r^-1 - 1 + log r; expm1 keeps it accurate (and >= 0) near r = 1.
        value = torch.expm1(-log_ratio) + log_ratio
    if value_clamp is not None:
        value = value.clamp(-value_clamp, value_clamp)
    return value


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[..., token] for each position, computed in float32.

    Args:
        logits: ``[..., V]`` next-token logits.
        tokens: integer tensor of shape ``logits.shape[:-1]`` with values in ``[0, V)``.

    Returns:
        ``[...]`` float32 (float64 stays float64) log-probabilities of ``tokens``.
    """
    _check_float_tensor("logits", logits)
    if not isinstance(tokens, torch.Tensor) or tokens.is_floating_point():
        raise TypeError("tokens must be an integer torch.Tensor")
    if tokens.shape != logits.shape[:-1]:
        raise ValueError(
            f"tokens must have shape logits.shape[:-1] = {tuple(logits.shape[:-1])}, got {tuple(tokens.shape)}"
        )
    compute_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    logits = logits.to(compute_dtype)
    # log p(y) = z_y - logsumexp(z): avoids materialising the full log-softmax.
    picked = logits.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)
