"""DPH-RL generator functions f(u), u = pi_theta / pi_0, evaluated from log u.

DPH-RL (``docs/methods.md``) adds ``eta * mean_t f(u_t)`` over the tokens of stored
rehearsal responses, ``u_t = pi_theta(y_t) / pi_0(y_t)`` with the pi_0 log-probs
stored when the rehearsal set was built. For tokens drawn from pi_0,
E_{pi_0}[f(u)] is the f-divergence between pi_0 and pi_theta:

- forward KL:  f(u) = u - log u - 1                         -> E = KL(pi_0 || pi_theta)
- JS:          f(u) = u log u - (u + 1) log((u + 1) / 2)    -> E = 2 JS(pi_0, pi_theta)
- alpha:       f(u) = (u^(1-a) - (1-a) u - a) / (a (a - 1)), a in (0, 1)  (a = 0.2 in DPH-RL)

Every f here is convex with f(1) = 0 and f'(1) = 0, so f(u) >= 0 token-wise.
All are computed from ``log u`` with expm1/softplus so that u near 1 and very
large or small u stay accurate.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["GENERATORS", "f_generator"]

GENERATORS = ("forward_kl", "js", "alpha")
_LOG2 = math.log(2.0)


def f_generator(log_ratio: torch.Tensor, divergence: str, *, alpha: float = 0.2) -> torch.Tensor:
    """Elementwise f(u) at ``u = exp(log_ratio)``.

    Args:
        log_ratio: ``log pi_theta(y) - log pi_0(y)``, any shape, floating point.
        divergence: ``"forward_kl"``, ``"js"`` or ``"alpha"``.
        alpha: the alpha-divergence order, 0 < alpha < 1 (only for ``"alpha"``).

    Example:
        >>> import torch
        >>> f_generator(torch.zeros(2), "js")
        tensor([0., 0.])
    """
    if not isinstance(log_ratio, torch.Tensor) or not log_ratio.is_floating_point():
        raise TypeError("log_ratio must be a floating-point torch.Tensor")
    if divergence not in GENERATORS:
        raise ValueError(f"divergence must be one of {GENERATORS}, got {divergence!r}")
    lr = log_ratio
    if divergence == "forward_kl":
        # u - log u - 1 = expm1(l) - l
        return torch.expm1(lr) - lr
    if divergence == "js":
        # u log u - (u+1) log((u+1)/2) with log((u+1)/2) = softplus(l) - log 2 and
        # l - softplus(l) = -softplus(-l):  = u (log 2 - softplus(-l)) - softplus(l) + log 2
        u = torch.exp(lr)
        return u * (_LOG2 - F.softplus(-lr)) - F.softplus(lr) + _LOG2
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1) for the alpha generator, got {alpha}")
    # (u^(1-a) - 1) - (1-a)(u - 1), over a(a-1): expm1 keeps u near 1 accurate.
    numerator = torch.expm1((1.0 - alpha) * lr) - (1.0 - alpha) * torch.expm1(lr)
    return numerator / (alpha * (alpha - 1.0))
