"""f-DPG: fit a policy to a target distribution p = P / Z with any f-divergence.

Go et al., "Aligning Language Models with Preferences through f-divergence Minimization"
(ICML 2023); the authors' library naver/disco (``disco/tuners/losses/f_divergence.py``,
``disco/tuners/tuner.py``, ``disco/metrics/*.py``, ``disco/utils/moving_average.py``).

Gradient of D_f(pi || p) = E_p[f(pi / p)], estimated with samples x ~ q:

    grad D_f(pi || p) = E_{x~q}[ (pi(x) / q(x)) f'(pi(x) / p(x)) grad log pi(x) ]

so with t = pi / p (log t = log pi - log P + log Z), pseudo-reward r = -f'(t), a baseline b,
w = pi / q with no gradient, the surrogate loss is

    loss = mean_x[ w(x) * -(r(x) - b) * log pi(x) ]

(``disco``: ``FDivergenceLoss.__call__``; log pi is detached inside t and w). f' comes from
the one table in :mod:`divergent.rl.generators`. Z is a running mean of P(x)/q(x) over every
sample seen (per prompt), updated with a batch *before* that batch's gradient; b is the mean of
the last 1024 pseudo-rewards, its value *before* the batch (disco's ``WindowedMovingAverage``).

Everything here is sequence level: inputs are ``[n]`` tensors of summed log-probabilities.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Mapping
from typing import Any

import torch

from divergent.rl.generators import F_DIVERGENCES, check_f_divergence, f_prime

__all__ = [
    "FDPG_DIVERGENCES",
    "PseudoRewardBaseline",
    "RunningZ",
    "fdpg_divergence_estimates",
    "fdpg_loss",
    "fdpg_pseudo_reward",
    "fit_moment_lambda",
]

FDPG_DIVERGENCES = F_DIVERGENCES


def _check_sequence(name: str, value: Any, n: int | None = None) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point torch.Tensor of shape [n], got {type(value).__name__}")
    if value.dim() != 1:
        raise ValueError(f"{name} must have shape [n] (one value per sequence), got {tuple(value.shape)}")
    if n is not None and value.shape[0] != n:
        raise ValueError(f"{name} must have shape [{n}] like policy_logprobs, got {tuple(value.shape)}")
    if torch.isnan(value).any():
        raise ValueError(f"{name} contains NaN")
    return value


def fdpg_pseudo_reward(log_ratio: torch.Tensor, divergence: str, *, alpha: float = 0.2) -> torch.Tensor:
    """The f-DPG pseudo-reward ``-f'(t)`` at ``log t = log pi(x) - log p(x)`` (p normalised).

    forward_kl: 1/t;  reverse_kl: -(log t + 1);  js: -log(2t / (1 + t));  tvd: -sign(log t)/2;
    chi2, hellinger, alpha: see :mod:`divergent.rl.generators`.

    Example:
        >>> import torch
        >>> fdpg_pseudo_reward(torch.tensor([0.0, math.log(2.0)]), "forward_kl")
        tensor([1.0000, 0.5000])
    """
    if not isinstance(log_ratio, torch.Tensor) or not log_ratio.is_floating_point():
        raise TypeError(f"log_ratio must be a floating-point torch.Tensor, got {type(log_ratio).__name__}")
    if torch.isnan(log_ratio).any():
        raise ValueError("log_ratio contains NaN")
    return -f_prime(log_ratio, check_f_divergence(divergence, alpha=alpha), alpha=alpha)


def _as_log_z(log_z: Any, n: int, like: torch.Tensor) -> torch.Tensor:
    if isinstance(log_z, torch.Tensor):
        if log_z.dim() not in (0, 1) or (log_z.dim() == 1 and log_z.shape[0] not in (1, n)):
            raise ValueError(f"log_z must be a scalar or have shape [{n}] (one per sequence), got {tuple(log_z.shape)}")
        value = log_z.detach().to(device=like.device, dtype=torch.float64)
    elif isinstance(log_z, (int, float)) and not isinstance(log_z, bool):
        value = torch.tensor(float(log_z), dtype=torch.float64, device=like.device)
    else:
        raise TypeError(f"log_z must be a float or a tensor, got {type(log_z).__name__}")
    if torch.isnan(value).any() or torch.isinf(value).any():
        raise ValueError(
            f"log_z must be finite, got {value.tolist()}: Z = 0 means no sample so far has P(x) > 0 "
            "(draw more samples or loosen the constraint)"
        )
    return value


def fdpg_loss(
    policy_logprobs: torch.Tensor,
    proposal_logprobs: torch.Tensor,
    target_log_scores: torch.Tensor,
    log_z: float | torch.Tensor,
    *,
    divergence: str,
    baseline: float | torch.Tensor | None = None,
    alpha: float = 0.2,
) -> torch.Tensor:
    """The f-DPG surrogate loss ``mean(w * -(r - b) * log pi)`` (a scalar); its gradient is the
    importance-sampled gradient of D_f(pi || p).

    Args:
        policy_logprobs: log pi(x) of the samples, ``[n]``, with gradient.
        proposal_logprobs: log q(x) of the proposal the samples came from, ``[n]`` (= the
            detached policy log-probs when sampling on-policy).
        target_log_scores: log P(x) of the unnormalised target, ``[n]``; -inf where P(x) = 0.
        log_z: log Z, the target's log partition function: a float, a scalar or ``[n]`` (per prompt).
        divergence: an f-divergence name (``forward_kl``, ``reverse_kl``, ``js``, ``tvd``, ...).
        baseline: b subtracted from the pseudo-reward (a float or ``[n]``), or None for none.
        alpha: the order of the ``alpha`` divergence.

    Raises ``ValueError`` when a pseudo-reward is infinite (reverse_kl on a sample with P(x) = 0:
    use a soft target, P = a * max(b, epsilon)) rather than returning inf or NaN.
    """
    check_f_divergence(divergence, alpha=alpha)
    policy_logprobs = _check_sequence("policy_logprobs", policy_logprobs)
    n = policy_logprobs.shape[0]
    proposal_logprobs = _check_sequence("proposal_logprobs", proposal_logprobs, n)
    target_log_scores = _check_sequence("target_log_scores", target_log_scores, n)
    if (target_log_scores == math.inf).any():
        raise ValueError("target_log_scores contains +inf (P(x) = inf)")
    if torch.isinf(policy_logprobs).any() or torch.isinf(proposal_logprobs).any():
        raise ValueError("policy_logprobs and proposal_logprobs must be finite (samples have probability > 0)")
    log_z64 = _as_log_z(log_z, n, policy_logprobs)
    policy_detached = policy_logprobs.detach().double()
    log_t = policy_detached - (target_log_scores.detach().double() - log_z64)
    reward = fdpg_pseudo_reward(log_t, divergence, alpha=alpha)
    if not torch.isfinite(reward).all():
        raise ValueError(
            f"the {divergence} pseudo-reward -f'(pi/p) is infinite on {int((~torch.isfinite(reward)).sum())} of {n} "
            "samples, those with P(x) = 0; use a soft target (P = a * max(b, epsilon), epsilon > 0) "
            "or a divergence whose f' is bounded at infinity (forward_kl, js, tvd)"
        )
    if baseline is None:
        advantage = reward
    else:
        if isinstance(baseline, torch.Tensor):
            b = baseline.detach().to(device=reward.device, dtype=torch.float64)
        elif isinstance(baseline, (int, float)) and not isinstance(baseline, bool):
            b = torch.tensor(float(baseline), dtype=torch.float64, device=reward.device)
        else:
            raise TypeError(f"baseline must be None, a float or a tensor, got {type(baseline).__name__}")
        if not torch.isfinite(b).all():
            raise ValueError(f"baseline must be finite, got {b.tolist()}")
        advantage = reward - b
    # w = pi / q, no gradient (disco: importance_ratios)
    weights = torch.exp(policy_detached - proposal_logprobs.detach().double())
    coefficient = (weights * -advantage).to(policy_logprobs.dtype)
    return (coefficient * policy_logprobs).mean()


class RunningZ:
    """Running mean of P(x)/q(x) over every sample seen, one per key (prompt), as disco's
    ``MovingAverage`` in ``Tuner._update_moving_z`` (no clipping, ``max_z=None``).

    ``update(keys, target_log_scores, proposal_log_scores)`` adds a batch; ``log_z(keys)`` gives
    log Z per sample. Keys are any hashables (the prompt text; ``None`` for unconditional).
    """

    def __init__(self, target_name: str = "the target") -> None:
        self.target_name = target_name
        self.value: dict[Hashable, float] = {}
        self.weight: dict[Hashable, int] = {}

    def update(self, keys: Iterable[Hashable] | None, target_log_scores: torch.Tensor, proposal_log_scores: torch.Tensor) -> None:
        target_log_scores = _check_sequence("target_log_scores", target_log_scores)
        proposal_log_scores = _check_sequence("proposal_log_scores", proposal_log_scores, target_log_scores.shape[0])
        keys = [None] * target_log_scores.shape[0] if keys is None else list(keys)
        if len(keys) != target_log_scores.shape[0]:
            raise ValueError(f"keys has {len(keys)} entries for {target_log_scores.shape[0]} samples")
        estimates = torch.exp(target_log_scores.detach().double() - proposal_log_scores.detach().double()).tolist()
        for key, estimate in zip(keys, estimates):
            if not math.isfinite(estimate):
                raise ValueError(f"P(x)/q(x) = {estimate} for {self.target_name}: the target score overflows")
            # the incremental mean of MovingAverage.update, one sample at a time as the tuner does
            weight = self.weight.get(key, 0)
            self.value[key] = (self.value.get(key, 0.0) * weight + estimate) / (weight + 1)
            self.weight[key] = weight + 1

    def samples(self, key: Hashable = None) -> int:
        return self.weight.get(key, 0)

    def z(self, key: Hashable = None) -> float:
        return self.value.get(key, 0.0)

    def log_z(self, keys: Iterable[Hashable] | None = None, *, n: int | None = None) -> torch.Tensor:
        """log Z per key as a float64 tensor; ``ValueError`` naming the target where Z = 0."""
        keys = [None] * (n or 1) if keys is None else list(keys)
        out = []
        for key in keys:
            z = self.z(key)
            if not z > 0:
                where = "" if key is None else f" for prompt {str(key)[:60]!r}"
                raise ValueError(
                    f"Z = 0{where}: none of {self.samples(key)} samples satisfies {self.target_name}; "
                    "draw more samples (a larger batch or more steps before giving up) or loosen the constraint"
                )
            out.append(math.log(z))
        return torch.tensor(out, dtype=torch.float64)

    def state_dict(self) -> dict[str, Any]:
        return {"keys": list(self.value), "value": list(self.value.values()), "weight": [self.weight[k] for k in self.value]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.value = dict(zip(state["keys"], (float(v) for v in state["value"])))
        self.weight = dict(zip(state["keys"], (int(w) for w in state["weight"])))


class PseudoRewardBaseline:
    """The mean of the last ``window`` pseudo-rewards (disco's ``WindowedMovingAverage``, 1024).

    ``value`` is None before the first update; read it *before* ``update`` with this batch's
    rewards, as ``FDivergenceLoss`` does.
    """

    def __init__(self, window: int = 1024) -> None:
        if not isinstance(window, int) or isinstance(window, bool) or window <= 0:
            raise ValueError(f"window must be a positive integer, got {window!r}")
        self.window = window
        self.buffer: list[float] = []
        self.value: float | None = None

    def update(self, rewards: torch.Tensor | Iterable[float]) -> None:
        values = rewards.detach().flatten().tolist() if isinstance(rewards, torch.Tensor) else [float(r) for r in rewards]
        self.buffer = (self.buffer + values)[-self.window :]
        if self.buffer:
            self.value = sum(self.buffer) / len(self.buffer)

    def state_dict(self) -> dict[str, Any]:
        return {"window": self.window, "buffer": list(self.buffer), "value": self.value}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.window = int(state["window"])
        self.buffer = [float(v) for v in state["buffer"]]
        self.value = None if state["value"] is None else float(state["value"])


def fdpg_divergence_estimates(
    target_log_scores: torch.Tensor,
    model_logprobs: torch.Tensor,
    log_z: float | torch.Tensor,
    proposal_logprobs: torch.Tensor | None = None,
) -> dict[str, float]:
    """Importance-sampled KL(p || m), TV(p, m) and JS(p, m) with p = P / Z (disco ``metrics/``).

    Pointwise, with w_P = P / q and w_m = m / q over samples x ~ q (q = m when no proposal):

        KL: -log Z + (1/Z) w_P (log P - log m)       (0 where P = 0)
        TV: |w_m - w_P / Z| / 2
        JS: KL(p || M)/2 + KL(m || M)/2,  M = (p + m)/2

    Returns the means over the samples as floats (float64 inside).
    """
    model = _check_sequence("model_logprobs", model_logprobs).detach().double()
    n = model.shape[0]
    target = _check_sequence("target_log_scores", target_log_scores, n).detach().double()
    proposal = model if proposal_logprobs is None else _check_sequence("proposal_logprobs", proposal_logprobs, n).detach().double()
    log_z64 = _as_log_z(log_z, n, model).expand(n)

    def kl_pointwise(log_m1: torch.Tensor, log_m2: torch.Tensor) -> torch.Tensor:
        # m1 normalised: -log 1 + w (log m1 - log m2), 0 * (-inf) -> 0
        values = torch.exp(log_m1 - proposal) * (log_m1 - log_m2)
        return torch.where(torch.isinf(log_m1) & (log_m1 < 0), torch.zeros_like(values), values)

    log_p = target - log_z64
    # disco's KL keeps P unnormalised: -log Z + (1/Z) (P/q)(log P - log m)
    kl = -log_z64 + torch.exp(-log_z64) * kl_pointwise(target, model)
    tv = 0.5 * (torch.exp(model - proposal) - torch.exp(log_p - proposal)).abs()
    log_mix = torch.logaddexp(log_p, model) - math.log(2.0)
    js = kl_pointwise(log_p, log_mix) / 2 + kl_pointwise(model, log_mix) / 2
    return {"kl": float(kl.mean()), "tv": float(tv.mean()), "js": float(js.mean())}


def fit_moment_lambda(
    features: torch.Tensor,
    moments: torch.Tensor | Iterable[float],
    *,
    log_weights: torch.Tensor | None = None,
    tolerance: float = 1e-6,
    max_iter: int = 200,
) -> torch.Tensor:
    """λ such that the exponential family p_λ(x) ∝ a(x) exp(λ·φ(x)) has moments E_{p_λ}[φ] = μ*.

    GDC (Khalifa et al., ICLR 2021; naver/gdc): with samples x_i ~ a (or ~ q with
    ``log_weights`` = log a - log q), the self-normalised importance-sampling estimate
    μ(λ) = Σ_i w_i e^{λ·φ_i} φ_i / Σ_i w_i e^{λ·φ_i} is matched to μ*. Solved here as the
    convex dual min_λ log Σ_i w_i e^{λ·φ_i} - λ·μ* (its gradient is μ(λ) - μ*) by Newton steps.

    Args:
        features: φ(x_i), ``[n, k]`` (or ``[n]`` for one feature).
        moments: μ*, ``[k]``; each strictly inside the range of the sampled features.
    """
    if not isinstance(features, torch.Tensor) or not features.is_floating_point():
        raise TypeError("features must be a floating-point torch.Tensor of shape [n, k]")
    phi = features.detach().double()
    phi = phi.unsqueeze(1) if phi.dim() == 1 else phi
    if phi.dim() != 2 or phi.shape[0] == 0:
        raise ValueError(f"features must have shape [n, k] with n > 0, got {tuple(features.shape)}")
    mu = torch.as_tensor(list(moments) if not isinstance(moments, torch.Tensor) else moments, dtype=torch.float64).flatten()
    if mu.shape[0] != phi.shape[1]:
        raise ValueError(f"moments has {mu.shape[0]} values for {phi.shape[1]} features")
    lo, hi = phi.min(0).values, phi.max(0).values
    for j in range(mu.shape[0]):
        if not (lo[j] < mu[j] < hi[j]):
            raise ValueError(
                f"moment {j} = {float(mu[j])} is not strictly inside the sampled feature range "
                f"[{float(lo[j])}, {float(hi[j])}]: no finite λ reaches it (draw more samples or pick a reachable moment)"
            )
    lw = torch.zeros(phi.shape[0], dtype=torch.float64) if log_weights is None else log_weights.detach().double()
    lam = torch.zeros(phi.shape[1], dtype=torch.float64)
    for _ in range(max_iter):
        w = torch.softmax(lw + phi @ lam, dim=0)
        mean = w @ phi
        grad = mean - mu
        if grad.abs().max() < tolerance:
            return lam.float()
        centered = phi - mean
        hessian = (centered * w.unsqueeze(1)).T @ centered + 1e-10 * torch.eye(phi.shape[1], dtype=torch.float64)
        step = torch.linalg.solve(hessian, grad)
        # backtracking on the dual objective keeps Newton steps safe far from the optimum
        objective = torch.logsumexp(lw + phi @ lam, 0) - lam @ mu
        scale = 1.0
        while scale > 1e-8:
            candidate = lam - scale * step
            if torch.logsumexp(lw + phi @ candidate, 0) - candidate @ mu <= objective:
                break
            scale /= 2
        lam = candidate
    w = torch.softmax(lw + phi @ lam, dim=0)
    if (w @ phi - mu).abs().max() > max(tolerance, 1e-4):
        raise ValueError(f"moment matching did not converge in {max_iter} iterations (moments {mu.tolist()})")
    return lam.float()
