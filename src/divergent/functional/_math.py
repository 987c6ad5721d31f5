"""The math of every divergence, on log-probabilities, one value per row.

Each ``*_rows`` function takes the teacher log-probabilities ``lp`` (p) and the
student log-probabilities ``lq`` (q), both ``[n, V]`` in float32 or float64, and
returns the divergence of each row, shape ``[n]``. ``zeros`` says whether any
entry may be -inf (a class of probability exactly 0); when False the plain
formulas run, when True every formula uses 0·log 0 = 0 and keeps gradients
finite wherever the divergence itself is finite.

This module is the single place where divergence math is written. Everything
else (losses, methods, trainers, fused kernels' references) calls it through
:func:`divergent.divergence`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_NEG_INF = float("-inf")


def _finite_floor(x: Tensor) -> Tensor:
    """Replace -inf by a very negative finite number (used only inside mixtures)."""
    return x.clamp_min(-1e30)


def _plogratio(la: Tensor, lb: Tensor, zeros: bool) -> Tensor:
    """Σ_k a_k (log a_k − log b_k) per row, a = exp(la): the KL(a‖b) of two log-prob rows.

    With zeros: terms with a_k = 0 are 0 (their gradient too); a_k > 0 = b_k gives +inf.
    """
    if not zeros:
        return (la.exp() * (la - lb)).sum(-1)
    support = la > _NEG_INF
    # a_k > 0 = b_k is an infinite term even when exp(la) underflows to 0 (0·inf would be NaN)
    infinite = support & (lb == _NEG_INF)
    keep = support & ~infinite
    la_s = torch.where(keep, la, 0.0)
    lb_s = torch.where(keep, lb, 0.0)
    term = torch.where(keep, la_s.exp() * (la_s - lb_s), 0.0)
    return torch.where(infinite, float("inf"), term).sum(-1)


def _neg_entropy(la: Tensor, zeros: bool) -> Tensor:
    """Σ_k a_k log a_k per row (minus the entropy), with 0·log 0 = 0."""
    if not zeros:
        return (la.exp() * la).sum(-1)
    support = la > _NEG_INF
    la_s = torch.where(support, la, 0.0)
    return torch.where(support, la_s.exp() * la_s, 0.0).sum(-1)


def _log_mixture(la: Tensor, lb: Tensor, weight_a: float, zeros: bool) -> Tensor:
    """log(w·a + (1−w)·b), computed with logaddexp (never exp().log())."""
    if zeros:
        la, lb = _finite_floor(la), _finite_floor(lb)
    return torch.logaddexp(la + math.log(weight_a), lb + math.log1p(-weight_a))


# KL(p‖q) = Σ p (log p − log q)
def forward_kl_rows(lp: Tensor, lq: Tensor, zeros: bool) -> Tensor:
    return _plogratio(lp, lq, zeros)


# KL(q‖p) = Σ q (log q − log p)
def reverse_kl_rows(lp: Tensor, lq: Tensor, zeros: bool) -> Tensor:
    return _plogratio(lq, lp, zeros)


# JSD_β(p, q) = β·KL(p‖m) + (1−β)·KL(q‖m),  m = β·p + (1−β)·q
def js_rows(lp: Tensor, lq: Tensor, zeros: bool, beta: float) -> Tensor:
    lm = _log_mixture(lp, lq, beta, zeros)
    return beta * _plogratio(lp, lm, zeros) + (1.0 - beta) * _plogratio(lq, lm, zeros)


# TVD(p, q) = ½ Σ |p − q|
def tvd_rows(lp: Tensor, lq: Tensor, zeros: bool) -> Tensor:
    return 0.5 * (lp.exp() - lq.exp()).abs().sum(-1)


# SKL_α(p, q) = KL(p ‖ α·p + (1−α)·q)
def skew_kl_rows(lp: Tensor, lq: Tensor, zeros: bool, alpha: float) -> Tensor:
    if alpha == 0.0:
        return _plogratio(lp, lq, zeros)
    return _plogratio(lp, _log_mixture(lp, lq, alpha, zeros), zeros)


# SRKL_α(p, q) = KL(q ‖ α·q + (1−α)·p)
def skew_reverse_kl_rows(lp: Tensor, lq: Tensor, zeros: bool, alpha: float) -> Tensor:
    if alpha == 0.0:
        return _plogratio(lq, lp, zeros)
    return _plogratio(lq, _log_mixture(lq, lp, alpha, zeros), zeros)


# H²(p, q) = ½ Σ (√p − √q)²
def hellinger_rows(lp: Tensor, lq: Tensor, zeros: bool) -> Tensor:
    return 0.5 * ((0.5 * lp).exp() - (0.5 * lq).exp()).square().sum(-1)


def chi2_rows(lp: Tensor, lq: Tensor, zeros: bool) -> Tensor:
    """χ²(p‖q) = Σ (p − q)²/q, written so that no branch overflows.

    With d = log p − log q:  (p − q)²/q = q·expm1(d)²  for d ≤ 0,
    and = exp(log p + d)·expm1(−d)²  for d > 0 (= p²/q · (1 − q/p)²).
    """
    if zeros:
        both_zero = (lp == _NEG_INF) & (lq == _NEG_INF)
        lp = torch.where(both_zero, 0.0, lp)
        lq = torch.where(both_zero, 0.0, lq)
    d = lp - lq
    d_pos = d.clamp_min(0.0)
    d_neg = d.clamp_max(0.0)
    above = (lp + d_pos).exp() * torch.expm1(-d_pos).square()
    below = lq.exp() * torch.expm1(d_neg).square()
    return torch.where(d > 0, above, below).sum(-1)


# CS(p, q) = −log( Σ p·q / √(Σ p² · Σ q²) )
def cauchy_schwarz_rows(lp: Tensor, lq: Tensor, zeros: bool) -> Tensor:
    cross = torch.logsumexp(lp + lq, dim=-1)
    value = 0.5 * torch.logsumexp(2.0 * lp, dim=-1) + 0.5 * torch.logsumexp(2.0 * lq, dim=-1) - cross
    # ≥ 0 by the Cauchy–Schwarz inequality; clamp rounding below zero.
    return value.clamp_min(0.0)


def _scaled_expm1_product(x: Tensor, y: Tensor, c: float) -> Tensor:
    """g = e^{c·x}·(e^{c·(y−x)} − 1)/c for c > 0 (= (e^{c·y} − e^{c·x})/c), overflow-free.

    Written as e^{c·x}·expm1(c·d)/c for d = y − x ≤ 0 and e^{c·y}·(−expm1(−c·d))/c for d > 0,
    with d clamped in each branch so neither branch makes inf or NaN (values or gradients).
    """
    d = y - x
    d_pos = d.clamp_min(0.0)
    d_neg = d.clamp_max(0.0)
    rising = (c * y).exp() * -torch.expm1(-c * d_pos)
    falling = (c * x).exp() * torch.expm1(c * d_neg)
    return torch.where(d > 0, rising, falling) / c


def alpha_beta_rows(lp: Tensor, lq: Tensor, zeros: bool, alpha: float, beta: float) -> Tensor:
    """AB-divergence (Cichocki, Cruces & Amari 2011) for α, β ≥ 0.

    D_AB(p‖q) = −1/(αβ) Σ [p^α q^β − α/(α+β) p^{α+β} − β/(α+β) q^{α+β}],
    continued to its limits: (α, 0) → 1/α² Σ [p^α log(p^α/q^α) − p^α + q^α] (so (1, 0) is
    KL(p‖q)), (0, β) → the mirror image ((0, 1) is KL(q‖p)), (0, 0) → ½ Σ (log p − log q)².

    Computed with s = α+β and a = max(α, β) ≥ b = min(α, β), swapping (p, α) with (q, β) when
    β > α (the divergence is invariant under that swap). With x, y the log-probs of the
    first/second distribution after the swap:
        term = [ g(x, y; s) − e^{a·x}·g(x, y; b) ] / a,   g(x, y; c) = (e^{c·y} − e^{c·x})/c,
    with g(x, y; 0) = y − x. Dividing only by the larger exponent keeps every case near a
    special point accurate; when both exponents are below 0.05 the row is computed in float64.
    """
    if alpha >= beta:
        a, b, x, y = alpha, beta, lp, lq
    else:
        a, b, x, y = beta, alpha, lq, lp
    if zeros:
        both_zero = (x == _NEG_INF) & (y == _NEG_INF)
        x = torch.where(both_zero, 0.0, x)
        y = torch.where(both_zero, 0.0, y)
    if a == 0.0:  # α = β = 0
        return 0.5 * (x - y).square().sum(-1)
    out_dtype = x.dtype
    if a < 0.05:
        x, y = x.double(), y.double()
    s = a + b
    first = _scaled_expm1_product(x, y, s)
    if b == 0.0:
        d = y - x
        if zeros:
            # p^a·log(q/p) → 0 where p = 0; where p > 0 = q the divergence is +inf
            infinite = (y == _NEG_INF) & (x > _NEG_INF)
            d = torch.where((x == _NEG_INF) | infinite, 0.0, d)
            second = torch.where(infinite, _NEG_INF, (a * x).exp() * d)
        else:
            second = (a * x).exp() * d
    else:
        second = (a * x).exp() * _scaled_expm1_product(x, y, b)
    return ((first - second) / a).sum(-1).to(out_dtype)


# Amari α-divergence: (1 − Σ p^α q^{1−α}) / (α(1−α)) = D_AB with (α, 1−α)
def alpha_rows(lp: Tensor, lq: Tensor, zeros: bool, alpha: float) -> Tensor:
    return alpha_beta_rows(lp, lq, zeros, alpha=alpha, beta=1.0 - alpha)


def bdkd_rows(lp: Tensor, lq: Tensor, zeros: bool, high_weight: float, low_weight: float) -> Tensor:
    """Entropy-balanced forward/reverse KL (BD-KD).

    Per row: if the student is less confident than the teacher (H(q) > H(p)) the reverse KL
    gets ``high_weight`` and the forward KL ``low_weight``; otherwise the other way round.
    The entropies only choose the weights (no gradient flows through them).
    """
    fkl = _plogratio(lp, lq, zeros)
    rkl = _plogratio(lq, lp, zeros)
    with torch.no_grad():
        student_less_confident = -_neg_entropy(lq, zeros) > -_neg_entropy(lp, zeros)
    w_rkl = torch.where(student_less_confident, high_weight, low_weight).to(fkl.dtype)
    w_fkl = torch.where(student_less_confident, low_weight, high_weight).to(fkl.dtype)
    return w_fkl * fkl + w_rkl * rkl


def sinkhorn_rows(lp: Tensor, lq: Tensor, zeros: bool, epsilon: float, n_iters: int, cost: str) -> Tensor:
    """Batch-wise entropic optimal transport between student rows and teacher rows (SinKD).

    Cost W_ij = ‖q_i − p_j‖ (``cost``: "l1", "l2", or "sqeuclidean" = squared L2) between
    student row i and teacher row j; K = exp(−W/ε); uniform marginals 1/n. ``n_iters``
    alternating row/column scalings in the log domain give P = diag(u)·K·diag(v). Returns
    n·Σ_j P_ij W_ij for each row i, so the mean over rows is ⟨P, W⟩. Gradients flow
    through both P and W.
    """
    n = lp.shape[0]
    if n == 0:
        return (lp.sum(-1) + lq.sum(-1)) * 0.0  # empty, but attached to the graph
    p, q = lp.exp(), lq.exp()
    if cost == "l1":
        w = torch.cdist(q, p, p=1.0)
    elif cost == "l2":
        w = torch.cdist(q, p, p=2.0)
    else:
        w = (q.unsqueeze(1) - p.unsqueeze(0)).square().sum(-1) if n * n * q.shape[1] <= 2**24 else torch.cdist(q, p).square()
    log_k = -w / epsilon
    log_marginal = -math.log(n)
    f = w.new_zeros(n)
    g = w.new_zeros(n)
    for _ in range(n_iters):
        f = log_marginal - torch.logsumexp(log_k + g.unsqueeze(0), dim=1)
        g = log_marginal - torch.logsumexp(log_k + f.unsqueeze(1), dim=0)
    plan = (f.unsqueeze(1) + log_k + g.unsqueeze(0)).exp()
    return n * (plan * w).sum(1)
