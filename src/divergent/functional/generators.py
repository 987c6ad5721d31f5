"""f-divergence generators f(u) and their derivatives f'(u), evaluated from log u.

One table for every sequence-level objective that needs an f: DPH-RL (``f_generator``),
f-DPO (``fdpo_psi``) and f-DPG (``fdpg_pseudo_reward``). With u = pi / p,

    D_f(pi || p) = E_p[ f(pi / p) ],

and the names are the divergence registry's (``forward_kl`` = KL(p || pi) etc.):

========== ================================== ============================ =========
name        f(u)                                 f'(u)                         f'(1)
========== ================================== ============================ =========
forward_kl  -log u                               -1/u                           -1
reverse_kl  u log u                              log u + 1                      1
js          u log u - (u+1) log((u+1)/2)         log(2u / (1+u))                0
tvd         |u - 1| / 2                          sign(log u) / 2                0
chi2        (u - 1)^2 / u                        1 - u^-2                       0
hellinger   (sqrt(u) - 1)^2 / 2                  (1 - u^-1/2) / 2               0
alpha       (1 - u^(1-a)) / (a (1-a)), 0<a<1     -u^-a / a                      -1/a
========== ================================== ============================ =========

f' is exactly the authors' (naver/disco ``disco/tuners/losses/*.py``): js is 2 JS(pi, p)
(disco's JSLoss, m = (pi + p)/2), chi2 is Pearson chi^2(p || pi) (disco's ChiSquaredLoss),
tvd is disco's TVLoss. ``generator_value`` returns the *tangent-normalised* generator
f(u) - f'(1) (u - 1): the same divergence (E_p[u - 1] = 0), but >= 0 pointwise with
f(1) = f'(1) = 0, which is what DPH-RL averages over tokens. Both are computed from
``log u`` with expm1/softplus so that u near 1 and very large or small u stay accurate.

DPH-RL generators (``f_generator``, ``GENERATORS``): forward KL u - log u - 1
(-> KL(pi_0 || pi_theta)), JS (-> 2 JS), alpha (a = 0.2 in DPH-RL).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = ["F_DIVERGENCES", "GENERATORS", "MEASURE_DIVERGENCES", "f_generator", "f_prime", "generator_value",
           "check_f_divergence", "registry_f"]

_LOG2 = math.log(2.0)


def _fkl_f(lr, a):  # u - log u - 1
    return torch.expm1(lr) - lr


def _rkl_f(lr, a):  # u log u - (u - 1)
    return torch.exp(lr) * lr - torch.expm1(lr)


def _js_f(lr, a):
    # u log u - (u+1) log((u+1)/2) with log((u+1)/2) = softplus(l) - log 2 and
    # l - softplus(l) = -softplus(-l):  = u (log 2 - softplus(-l)) - softplus(l) + log 2
    return torch.exp(lr) * (_LOG2 - F.softplus(-lr)) - F.softplus(lr) + _LOG2


def _tvd_f(lr, a):
    return 0.5 * torch.expm1(lr).abs()


def _chi2_f(lr, a):  # (u - 1)^2 / u
    return torch.expm1(lr).square() * torch.exp(-lr)


def _hellinger_f(lr, a):  # (sqrt u - 1)^2 / 2
    return 0.5 * torch.expm1(0.5 * lr).square()


def _alpha_f(lr, a):
    # (u^(1-a) - 1) - (1-a)(u - 1), over a(a-1): expm1 keeps u near 1 accurate.
    return (torch.expm1((1.0 - a) * lr) - (1.0 - a) * torch.expm1(lr)) / (a * (a - 1.0))


# name -> (tangent-normalised f(u), f'(u), f'(1)), each from l = log u (f'(1) may depend on alpha)
_TABLE: dict[str, tuple[Callable, Callable, Callable[[float], float]]] = {
    "forward_kl": (_fkl_f, lambda lr, a: -torch.exp(-lr), lambda a: -1.0),
    "reverse_kl": (_rkl_f, lambda lr, a: lr + 1.0, lambda a: 1.0),
    # log(2u / (1 + u)) = log 2 + l - softplus(l) = log 2 - softplus(-l)
    "js": (_js_f, lambda lr, a: _LOG2 - F.softplus(-lr), lambda a: 0.0),
    "tvd": (_tvd_f, lambda lr, a: torch.sign(lr) / 2.0, lambda a: 0.0),
    "chi2": (_chi2_f, lambda lr, a: -torch.expm1(-2.0 * lr), lambda a: 0.0),
    "hellinger": (_hellinger_f, lambda lr, a: -0.5 * torch.expm1(-0.5 * lr), lambda a: 0.0),
    "alpha": (_alpha_f, lambda lr, a: -torch.exp(-a * lr) / a, lambda a: -1.0 / a),
}

F_DIVERGENCES = tuple(_TABLE)
GENERATORS = ("forward_kl", "js", "alpha")


def check_f_divergence(divergence: str, *, alpha: float = 0.2, valid=F_DIVERGENCES, what: str = "divergence") -> str:
    """``divergence`` if it has an f-generator in ``valid``, else ``ValueError`` with a did-you-mean.

    A name the divergence registry knows but that is not an f-divergence (``skew_kl``,
    ``cauchy_schwarz``, ...) is told so.
    """
    from divergent.config import suggest
    from divergent.functional.registry import available

    if not isinstance(divergence, str):
        raise TypeError(f"{what} must be a string naming an f-divergence, got {type(divergence).__name__}")
    if divergence not in valid:
        known = available()
        if divergence in known:
            reason = f"{divergence!r} is a registered divergence without an f-generator here"
        else:
            reason = f"unknown {what} {divergence!r}{suggest(divergence, valid)}"
        raise ValueError(f"{reason}; {what} must be one of {', '.join(valid)}")
    if divergence == "alpha" and not (isinstance(alpha, (int, float)) and 0.0 < alpha < 1.0):
        raise ValueError(f"alpha must be in (0, 1) for the alpha generator, got {alpha!r}")
    return divergence


def _check_log_ratio(log_ratio) -> None:
    if not isinstance(log_ratio, torch.Tensor) or not log_ratio.is_floating_point():
        raise TypeError("log_ratio must be a floating-point torch.Tensor")


def f_prime(log_ratio: torch.Tensor, divergence: str, *, alpha: float = 0.2) -> torch.Tensor:
    """Elementwise f'(u) at ``u = exp(log_ratio)`` (the table in the module docstring).

    Example:
        >>> import torch
        >>> f_prime(torch.zeros(2), "reverse_kl")
        tensor([1., 1.])
    """
    _check_log_ratio(log_ratio)
    check_f_divergence(divergence, alpha=alpha)
    return _TABLE[divergence][1](log_ratio, float(alpha))


def f_prime_at_one(divergence: str, *, alpha: float = 0.2) -> float:
    """f'(1), the constant that the tangent normalisation removes."""
    check_f_divergence(divergence, alpha=alpha)
    return _TABLE[divergence][2](float(alpha))


def generator_value(log_ratio: torch.Tensor, divergence: str, *, alpha: float = 0.2) -> torch.Tensor:
    """Elementwise tangent-normalised f(u) - f'(1)(u - 1) at ``u = exp(log_ratio)``; >= 0.

    Example:
        >>> import torch
        >>> generator_value(torch.zeros(2), "tvd")
        tensor([0., 0.])
    """
    _check_log_ratio(log_ratio)
    check_f_divergence(divergence, alpha=alpha)
    return _TABLE[divergence][0](log_ratio, float(alpha))


def f_generator(log_ratio: torch.Tensor, divergence: str, *, alpha: float = 0.2) -> torch.Tensor:
    """DPH-RL's elementwise f(u) at ``u = exp(log_ratio)`` (``generator_value`` of ``GENERATORS``).

    Args:
        log_ratio: ``log pi_theta(y) - log pi_0(y)``, any shape, floating point.
        divergence: ``"forward_kl"``, ``"js"`` or ``"alpha"``.
        alpha: the alpha-divergence order, 0 < alpha < 1 (only for ``"alpha"``).

    Example:
        >>> import torch
        >>> f_generator(torch.zeros(2), "js")
        tensor([0., 0.])
    """
    _check_log_ratio(log_ratio)
    if divergence not in GENERATORS:
        raise ValueError(f"divergence must be one of {GENERATORS}, got {divergence!r}")
    return generator_value(log_ratio, divergence, alpha=alpha)


# Registry divergences whose value is Σ_i p_i f(q_i / p_i) with f(1) = 0 and no linear term, so that the
# same sum is defined on unnormalised positive vectors (GOLD's merged probabilities): registry_f.
MEASURE_DIVERGENCES = ("forward_kl", "reverse_kl", "js", "tvd", "chi2", "hellinger")


def _js_beta_f(lr, beta):
    # generalized JSD, m = beta p + (1 - beta) q = p (beta + (1 - beta) u):
    # beta p log(p/m) + (1 - beta) q log(q/m) = p [-beta log w + (1 - beta) u (log u - log w)],
    # w = beta + (1 - beta) u; log w = log1p((1 - beta) expm1(l)) for l <= 0 and
    # l + log1p(beta expm1(-l)) for l > 0: exact at u = 1, finite for any l (each branch clamped)
    below, above = lr.clamp_max(0.0), lr.clamp_min(0.0)
    log_w = torch.where(lr <= 0, torch.log1p((1.0 - beta) * torch.expm1(below)),
                        above + torch.log1p(beta * torch.expm1(-above)))
    return -beta * log_w + (1.0 - beta) * torch.exp(lr) * (lr - log_w)


def registry_f(log_ratio: torch.Tensor, divergence: str, **params) -> torch.Tensor:
    """Elementwise f(u), u = exp(log_ratio) = q / p, of the divergence registry's ``divergence``.

    ``Σ_i p_i f(q_i / p_i)`` is the registry's value on probability vectors (teacher p,
    student q) and, having no linear term ``c (u - 1)``, the plain f-sum on unnormalised
    positive vectors: forward_kl ``f = -log u`` (Σ p log(p/q)), reverse_kl ``f = u log u``
    (Σ q log(q/p)), js with the registry's ``beta`` (teacher weight in m = βp + (1-β)q;
    at β = 0.5 half the table's 2·JS), tvd, chi2, hellinger (the table's, f'(1) = 0).
    ``params`` are the registry's (``divergent.get_spec(name).resolve`` checks them).

    Example:
        >>> import torch
        >>> registry_f(torch.zeros(2), "js", beta=0.3)
        tensor([0., 0.])
    """
    from divergent.functional.registry import get_spec

    _check_log_ratio(log_ratio)
    check_f_divergence(divergence, valid=MEASURE_DIVERGENCES)
    resolved = get_spec(divergence).resolve(params)
    if divergence == "js":
        return _js_beta_f(log_ratio, float(resolved["beta"]))
    value = _TABLE[divergence][0](log_ratio, 0.0)
    slope = _TABLE[divergence][2](0.0)
    return value + slope * torch.expm1(log_ratio) if slope else value
