"""Independent float64 references on probability vectors (numpy/scipy), one per divergence.

These are written from the formulas in docs/methods.md and docs/divergences.md directly on probabilities, with no
code shared with divergent's log-space implementation.
"""

from __future__ import annotations

import numpy as np
from scipy.special import rel_entr, softmax


def probs(logits, temperature=1.0):
    return softmax(np.asarray(logits, dtype=np.float64) / temperature, axis=-1)


def forward_kl(p, q):
    return rel_entr(p, q).sum(-1)


def reverse_kl(p, q):
    return rel_entr(q, p).sum(-1)


def js(p, q, beta=0.5):
    m = beta * p + (1 - beta) * q
    return beta * rel_entr(p, m).sum(-1) + (1 - beta) * rel_entr(q, m).sum(-1)


def tvd(p, q):
    return 0.5 * np.abs(p - q).sum(-1)


def skew_kl(p, q, alpha=0.1):
    return rel_entr(p, alpha * p + (1 - alpha) * q).sum(-1)


def skew_reverse_kl(p, q, alpha=0.1):
    return rel_entr(q, alpha * q + (1 - alpha) * p).sum(-1)


def alpha_beta(p, q, alpha=0.2, beta=0.7):
    """The general AB formula (α, β, α+β ≠ 0) directly on probabilities."""
    s = alpha + beta
    return -(p**alpha * q**beta - alpha / s * p**s - beta / s * q**s).sum(-1) / (alpha * beta)


def alpha_div(p, q, alpha=0.5):
    return (1 - (p**alpha * q ** (1 - alpha)).sum(-1)) / (alpha * (1 - alpha))


def hellinger(p, q):
    return 0.5 * ((np.sqrt(p) - np.sqrt(q)) ** 2).sum(-1)


def chi2(p, q):
    return ((p - q) ** 2 / q).sum(-1)


def cauchy_schwarz(p, q):
    return -np.log((p * q).sum(-1) / np.sqrt((p**2).sum(-1) * (q**2).sum(-1)))


def entropy(p):
    return -np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0).sum(-1)


def bdkd(p, q, high_weight=3.0, low_weight=1.0):
    less_confident = entropy(q) > entropy(p)
    w_r = np.where(less_confident, high_weight, low_weight)
    w_f = np.where(less_confident, low_weight, high_weight)
    return w_f * forward_kl(p, q) + w_r * reverse_kl(p, q)


def kl_top(p, q, k=1000, renormalize=False):
    """OSTQuant's KL-Top on probabilities: Σ over the k largest p of p·log(p/q), or KL of the two renormalised."""
    top = np.argsort(-p, axis=-1, kind="stable")[..., :k]
    p_top, q_top = np.take_along_axis(p, top, -1), np.take_along_axis(q, top, -1)
    if renormalize:
        p_top, q_top = p_top / p_top.sum(-1, keepdims=True), q_top / q_top.sum(-1, keepdims=True)
    return rel_entr(p_top, q_top).sum(-1)


REFERENCES = {
    "forward_kl": (forward_kl, {}),
    "reverse_kl": (reverse_kl, {}),
    "js": (js, {"beta": 0.3}),
    "tvd": (tvd, {}),
    "skew_kl": (skew_kl, {"alpha": 0.1}),
    "skew_reverse_kl": (skew_reverse_kl, {"alpha": 0.25}),
    "alpha_beta": (alpha_beta, {"alpha": 0.2, "beta": 0.7}),
    "alpha": (alpha_div, {"alpha": 0.3}),
    "hellinger": (hellinger, {}),
    "chi2": (chi2, {}),
    "cauchy_schwarz": (cauchy_schwarz, {}),
    "bdkd": (bdkd, {"high_weight": 3.0, "low_weight": 1.0}),
    "kl_top": (kl_top, {"k": 4, "renormalize": False}),
}
