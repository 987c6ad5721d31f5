"""The math of every divergence, on log-probabilities, one value per row.

p = teacher, q = student. Each per-row *kernel* takes the teacher log-probabilities
``lp`` and the student log-probabilities ``lq`` (both ``[n, V]``, float32 or
float64) and returns ``(rows, w, v)``: the divergence of each row ``[n]`` and,
when ``want_weights``, the elementwise gradient weights

    w_k = q_k · ∂D/∂q_k   and   v_k = p_k · ∂D/∂p_k

(D read as a function of unconstrained p and q). The softmax chain rule turns them
into gradients with respect to the logits: ∂D/∂s_j = (w_j − q_j·Σ_k w_k)/T, and the
same for the teacher with v. Terms of w that are constant multiples of q (of p for
v) cancel there and are left out. Computing value and weights together shares the
intermediate terms (log m, the KL terms), so one pass yields both.

``zeros`` says whether any entry may be -inf (probability exactly 0). When False
the plain formulas run; when True every term takes its limit (0·log 0 = 0) and a
truly infinite divergence is +inf.

This module is the single place where divergence math is written. Everything
else (losses, methods, trainers, the fused kernels' references) calls it through
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


def _plogratio_terms(la: Tensor, lb: Tensor, zeros: bool) -> Tensor:
    """Elementwise a_k (log a_k − log b_k), with the conventions of :func:`_plogratio`."""
    if not zeros:
        return la.exp() * (la - lb)
    support = la > _NEG_INF
    infinite = support & (lb == _NEG_INF)
    keep = support & ~infinite
    la_s = torch.where(keep, la, 0.0)
    lb_s = torch.where(keep, lb, 0.0)
    return torch.where(infinite, float("inf"), torch.where(keep, la_s.exp() * (la_s - lb_s), 0.0))


def _scaled_expm1_product(x: Tensor, y: Tensor, c: float) -> Tensor:
    """g = (e^{c·y} − e^{c·x})/c for c > 0, accurate and overflow-free.

    With m = max(x, y) and δ = −|y − x| ≤ 0:  g = sign(y − x)·e^{c·m}·(−expm1(c·δ))/c.
    No exponential of a positive number is taken, and expm1 keeps the small-difference
    case exact (no cancellation between two nearly equal exponentials).
    """
    d = y - x
    return torch.sign(d) * (c * torch.maximum(x, y)).exp() * -torch.expm1(-c * d.abs()) / c


def _scaled_difference(x: Tensor, y: Tensor, c: float) -> Tensor:
    """G(x, y; c) = (e^{c·y} − e^{c·x})/c, and y − x at c = 0."""
    if c == 0.0:
        return y - x
    return _scaled_expm1_product(x, y, c)


def _power(log_x: Tensor, c: float) -> Tensor | float:
    """x^c from log x, with x^0 = 1 also at x = 0 (exp(0 · -inf) would be NaN)."""
    return 1.0 if c == 0.0 else (c * log_x).exp()


def _finite_where_zero(x: Tensor, zeros: bool) -> Tensor:
    """0·(±inf) at zero-probability classes is the term's limit 0, not NaN."""
    return torch.nan_to_num(x, nan=0.0, posinf=float("inf"), neginf=float("-inf")) if zeros else x


# KL(p‖q) = Σ p (log p − log q);  w = −p,  v = p log(p/q)
def forward_kl(lp, lq, zeros, want_weights):
    terms = _plogratio_terms(lp, lq, zeros)
    return terms.sum(-1), (-lp.exp() if want_weights else None), terms


# KL(q‖p) = Σ q (log q − log p);  w = q log(q/p),  v = −q
def reverse_kl(lp, lq, zeros, want_weights):
    terms = _plogratio_terms(lq, lp, zeros)
    return terms.sum(-1), terms, (-lq.exp() if want_weights else None)


# JSD_β = β·KL(p‖m) + (1−β)·KL(q‖m), m = βp + (1−β)q  (= H(m) − β H(p) − (1−β) H(q));
# w = (1−β) q log(q/m),  v = β p log(p/m)
def js(lp, lq, zeros, want_weights, beta):
    lm = _log_mixture(lp, lq, beta, zeros)
    to_p, to_q = _plogratio_terms(lp, lm, zeros), _plogratio_terms(lq, lm, zeros)
    rows = beta * to_p.sum(-1) + (1.0 - beta) * to_q.sum(-1)
    return rows, (1.0 - beta) * to_q, beta * to_p


# TVD = ½ Σ |p − q|;  w = ½ q sign(q − p),  v = ½ p sign(p − q)
def tvd(lp, lq, zeros, want_weights):
    p, q = lp.exp(), lq.exp()
    rows = 0.5 * (p - q).abs().sum(-1)
    if not want_weights:
        return rows, None, None
    sign = torch.sign(q - p)
    return rows, 0.5 * q * sign, -0.5 * p * sign


# SKL_α = KL(p ‖ m), m = αp + (1−α)q;  w = −(1−α) p q / m,  v = p log(p/m) − α p²/m
def skew_kl(lp, lq, zeros, want_weights, alpha):
    if alpha == 0.0:
        return forward_kl(lp, lq, zeros, want_weights)
    lm = _log_mixture(lp, lq, alpha, zeros)
    terms = _plogratio_terms(lp, lm, zeros)
    if not want_weights:
        return terms.sum(-1), None, None
    return terms.sum(-1), -(1.0 - alpha) * (lp + lq - lm).exp(), terms - alpha * (2.0 * lp - lm).exp()


# SRKL_α = KL(q ‖ αq + (1−α)p): skew_kl with p and q exchanged
def skew_reverse_kl(lp, lq, zeros, want_weights, alpha):
    rows, v, w = skew_kl(lq, lp, zeros, want_weights, alpha)
    return rows, w, v


# H² = ½ Σ (√p − √q)²;  w = ½ (q − √(pq)),  v = ½ (p − √(pq))
def hellinger(lp, lq, zeros, want_weights):
    root_p, root_q = (0.5 * lp).exp(), (0.5 * lq).exp()
    rows = 0.5 * (root_p - root_q).square().sum(-1)
    if not want_weights:
        return rows, None, None
    root = root_p * root_q
    return rows, 0.5 * (root_q.square() - root), 0.5 * (root_p.square() - root)


def chi2(lp, lq, zeros, want_weights):
    """χ²(p‖q) = Σ (p − q)²/q = Σ p²/q − 1, written so that no branch overflows.

    With d = log p − log q:  (p − q)²/q = q·expm1(d)²  for d ≤ 0, and
    exp(log p + d)·expm1(−d)²  for d > 0.  w = −p²/q,  v = 2 p²/q.
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
    rows = torch.where(d > 0, above, below).sum(-1)
    if not want_weights:
        return rows, None, None
    ratio = (lp + d).exp()  # p²/q
    if zeros:
        ratio = torch.where(both_zero, 0.0, ratio)
    return rows, -ratio, 2.0 * ratio


# CS = −log A + ½ log B + ½ log C with A = Σpq, B = Σp², C = Σq²;
# w = q²/C − pq/A,  v = p²/B − pq/A
def cauchy_schwarz(lp, lq, zeros, want_weights):
    log_a = torch.logsumexp(lp + lq, dim=-1, keepdim=True)
    log_b = torch.logsumexp(2.0 * lp, dim=-1, keepdim=True)
    log_c = torch.logsumexp(2.0 * lq, dim=-1, keepdim=True)
    # ≥ 0 by the Cauchy–Schwarz inequality; clamp rounding below zero.
    rows = (0.5 * log_b + 0.5 * log_c - log_a).squeeze(-1).clamp_min(0.0)
    if not want_weights:
        return rows, None, None
    cross = (lp + lq - log_a).exp()
    return rows, (2.0 * lq - log_c).exp() - cross, (2.0 * lp - log_b).exp() - cross


# Exponents from which the AB-divergence's value is summed from plain powers (here and in the
# Triton kernel); below, the form without cancellation.
PLAIN_POWERS_FROM = 0.1


def alpha_beta(lp, lq, zeros, want_weights, alpha, beta):
    """AB-divergence (Cichocki, Cruces & Amari 2011) for α, β ≥ 0.

    D_AB(p‖q) = −1/(αβ) Σ [p^α q^β − α/(α+β) p^{α+β} − β/(α+β) q^{α+β}], continued to its
    limits: (α, 0) → 1/α² Σ [p^α log(p^α/q^α) − p^α + q^α] ((1, 0) is KL(p‖q)), (0, β) → the
    mirror image ((0, 1) is KL(q‖p)), (0, 0) → ½ Σ (log p − log q)².

    Gradient weights, with G(x, y; c) = (e^{c·y} − e^{c·x})/c (y − x at c = 0) computed
    without cancellation:
        w = q ∂D/∂q = (q^{α+β} − p^α q^β)/α = q^β · G(log p, log q; α)
        v = p ∂D/∂p = (p^{α+β} − p^α q^β)/β = p^α · G(log q, log p; β)

    Value. When both exponents are at least 0.1, D = Σ (w + v)/(α + β) from plain powers
    (cancellation costs at most ~eps·max(q^s, p^α q^β)/α per term, far below the value).
    Nearer 0, w + v cancels to O(α + β) and that sum loses every digit (α = β = 1e-20
    would give 0 instead of ½ Σ (log p − log q)²), so the value is taken from a form
    without any cancellation: with x = log p, y = log q, d = x − y, s = α + β and
    φ(c, z) = (e^{cz} − 1 − cz)/c² ≥ 0 (z²/2 at c = 0),

        D = Σ p^α q^β · [ (β/s)·φ(β, d) + (α/s)·φ(α, −d) ],

    a weighted mean of two non-negative terms (see :func:`_weighted_phi`). Every limit
    follows: α → 0 leaves q^β φ(β, d), the (0, β) log form; α, β → 0 leaves d²/2.
    """
    if zeros:
        both_zero = (lp == _NEG_INF) & (lq == _NEG_INF)
        lp = torch.where(both_zero, 0.0, lp)
        lq = torch.where(both_zero, 0.0, lq)
    if alpha == 0.0 and beta == 0.0:
        d = lp - lq
        return 0.5 * d.square().sum(-1), -d, d
    s = alpha + beta
    if min(alpha, beta) >= PLAIN_POWERS_FROM:
        cross = (alpha * lp + beta * lq).exp()
        w = ((s * lq).exp() - cross) / alpha
        v = ((s * lp).exp() - cross) / beta
        return (w + v).sum(-1) / s, w, v
    out_dtype = lp.dtype
    if out_dtype != torch.float64 and 0.0 < min(e for e in (alpha, beta) if e > 0.0) < 1e-30:
        # c·(log p − log q) would fall among float32's subnormals: work in float64.
        lp, lq = lp.double(), lq.double()
    d = lp - lq
    # p^α q^β; an exponent of 0 makes its factor 1, also where that probability is 0
    cross = (alpha * lp if beta == 0.0 else beta * lq if alpha == 0.0 else alpha * lp + beta * lq).exp()
    terms = 0.0
    if beta > 0.0:  # e^{(α+β)·log p} = p^α q^β · e^{β d}
        terms = (beta / s) * _weighted_phi(cross, s * lp, beta, d, zeros)
    if alpha > 0.0:
        terms = terms + (alpha / s) * _weighted_phi(cross, s * lq, alpha, -d, zeros)
    if zeros:
        # At α = 0 the term is (1/β²)[q^β log(q^β/p^β) − q^β + p^β]: +inf wherever p = 0 < q, decided
        # in log space (as KL(q‖p) does), since q^β itself may underflow to 0 (log q = −120) and
        # leave 0·inf = 0. At β = 0 the mirror image: +inf wherever q = 0 < p.
        if alpha == 0.0:
            terms = torch.where((lp == _NEG_INF) & (lq > _NEG_INF), float("inf"), terms)
        if beta == 0.0:
            terms = torch.where((lq == _NEG_INF) & (lp > _NEG_INF), float("inf"), terms)
    rows = terms.sum(-1).to(out_dtype)
    if not want_weights:
        return rows, None, None
    w = _finite_where_zero(_power(lq, beta) * _scaled_difference(lp, lq, alpha), zeros)
    v = _finite_where_zero(_power(lp, alpha) * _scaled_difference(lq, lp, beta), zeros)
    return rows, w.to(out_dtype), v.to(out_dtype)


# ψ(u) = (e^u − 1 − u)/u² = Σ_k u^k/(k+2)!. For |u| < ½ the series' first 8 terms leave a
# relative error of 2e-9 (below float32's eps), the first 14 terms 6e-18 (below float64's).
_PSI_COEFFICIENTS = tuple(1.0 / math.factorial(k + 2) for k in range(14))
_PSI_SERIES_LIMIT = 0.5


def _psi_series(u: Tensor) -> Tensor:
    coefficients = _PSI_COEFFICIENTS[: 14 if u.dtype == torch.float64 else 8]
    out = torch.full_like(u, coefficients[-1])
    for c in reversed(coefficients[:-1]):
        out.mul_(u).add_(c)
    return out


def _weighted_phi(cross: Tensor, log_top: Tensor, c: float, z: Tensor, zeros: bool) -> Tensor:
    """e^A · φ(c, z) = e^A (e^{cz} − 1 − cz)/c² for c > 0, with e^A = ``cross`` and e^{A + cz} = e^{log_top}.

    |cz| < ½: e^A z² ψ(cz) by the series (no cancellation). Otherwise
    (e^{A + cz} − e^A (1 + cz))/c², which cancels by at most a factor ~10 there and never
    exponentiates cz on its own (A + cz ≤ 0, so nothing overflows). A zero probability makes
    e^A exactly 0 against an infinite cz; that product is the limit 0 (p^α log p → 0).
    """
    u = c * z
    near = u.abs() < _PSI_SERIES_LIMIT
    series = cross * z.square() * _psi_series(torch.where(near, u, 0.0))
    correction = cross * (1.0 + u)
    if zeros:
        correction = torch.where(cross == 0.0, 0.0, correction)
    far = (log_top.exp() - correction) / (c * c)
    return torch.where(near, series, far)


# Amari α-divergence (1 − Σ p^α q^{1−α}) / (α(1−α)) = D_AB at (α, 1−α)
def alpha(lp, lq, zeros, want_weights, alpha):
    return alpha_beta(lp, lq, zeros, want_weights, alpha=alpha, beta=1.0 - alpha)


def _weighted(weight: Tensor, value: Tensor, zeros: bool) -> Tensor:
    """weight · value, where a weight of 0 removes an infinite value too (0 · inf would be NaN)."""
    return torch.where(weight == 0.0, 0.0, weight * value) if zeros else weight * value


def bdkd(lp, lq, zeros, want_weights, high_weight, low_weight):
    """Entropy-balanced forward/reverse KL (BD-KD).

    Per row: if the student is less confident than the teacher (H(q) > H(p)) the reverse KL
    gets ``high_weight`` and the forward KL ``low_weight``; otherwise the other way round.
    The entropies only choose the weights (no gradient flows through them).
    """
    to_q = _plogratio_terms(lp, lq, zeros)  # forward KL terms p log(p/q)
    to_p = _plogratio_terms(lq, lp, zeros)  # reverse KL terms q log(q/p)
    less_confident = -_neg_entropy(lq, zeros) > -_neg_entropy(lp, zeros)
    w_rkl = torch.where(less_confident, high_weight, low_weight).to(lp.dtype)
    w_fkl = torch.where(less_confident, low_weight, high_weight).to(lp.dtype)
    rows = _weighted(w_fkl, to_q.sum(-1), zeros) + _weighted(w_rkl, to_p.sum(-1), zeros)
    if not want_weights:
        return rows, None, None
    w_fkl, w_rkl = w_fkl.unsqueeze(-1), w_rkl.unsqueeze(-1)
    return rows, -w_fkl * lp.exp() + w_rkl * to_p, w_fkl * to_q - w_rkl * lq.exp()
def kl_top(lp, lq, zeros, want_weights, k, renormalize, tail=False):
    """KL-Top (OSTQuant): forward KL restricted to the teacher's top-k classes S.

    D = Σ_{i∈S} p_i (log p_i − log q_i) with the full-vocabulary p and q (OSTQuant's
    released scripts, ``post_attn=True``); with ``renormalize`` both are renormalised over S
    first, p̃ = p_S/Σ_S p, q̃ = q_S/Σ_S q, and D = KL(p̃‖q̃). k above the number of classes
    takes them all (then D is plain forward KL). ``tail=True``: the last column is a
    :class:`~divergent.functional.topk.TopK` teacher's tail bucket, never one of the top k
    (the teacher's top k are among its stored classes). S is chosen by the teacher's values
    and carries no gradient. Gradient weights, zero outside S:
        w = −p             v = p log(p/q) + p                         (partial sum)
        w = q̃ − p̃          v = p̃ (log(p̃/q̃) − D)                       (renormalised)
    (p_S alone is no constant multiple of the whole p, so the "+ p" of v stays.)
    """
    classes = lp.shape[-1] - (1 if tail else 0)
    top = lp[..., :classes].topk(min(k, classes), dim=-1).indices
    lp_top, lq_top = lp.gather(-1, top), lq.gather(-1, top)
    if renormalize:
        lp_top = lp_top - torch.logsumexp(lp_top, dim=-1, keepdim=True)
        mass_q = torch.logsumexp(lq_top, dim=-1, keepdim=True)
        # a student with no mass on S: every q̃ is 0 (an infinite KL), not NaN
        lq_top = torch.where(mass_q == _NEG_INF, _NEG_INF, lq_top - mass_q) if zeros else lq_top - mass_q
    terms = _plogratio_terms(lp_top, lq_top, zeros)
    rows = terms.sum(-1)
    if not want_weights:
        return rows, None, None
    p_top = lp_top.exp()
    if renormalize:
        w_top = lq_top.exp() - p_top
        v_top = _finite_where_zero(terms - p_top * rows.unsqueeze(-1), zeros)
    else:
        w_top, v_top = -p_top, terms + p_top
    return rows, torch.zeros_like(lq).scatter(-1, top, w_top), torch.zeros_like(lp).scatter(-1, top, v_top)


def sinkhorn_rows(student_logprobs: Tensor, teacher_logprobs: Tensor, *, epsilon: float, n_iters: int,
                  cost: str) -> Tensor:
    """Batch-wise entropic optimal transport between student rows and teacher rows (SinKD).

    Cost W_ij = ‖q_i − p_j‖ (``cost``: "l1", "l2", or "sqeuclidean" = squared L2) between
    student row i and teacher row j; K = exp(−W/ε); uniform marginals 1/n. ``n_iters``
    alternating row/column scalings give P = diag(u)·K·diag(v) — plain scalings when every
    W_ij/ε is below 30, log-domain (stabilised) ones otherwise. Returns
    n·Σ_j P_ij W_ij for each row i, so the mean over rows is ⟨P, W⟩. Gradients flow
    through both P and W (by autograd: this is a registry ``fn``, not a row kernel).
    """
    lq, lp = student_logprobs, teacher_logprobs
    n = lp.shape[0]  # ≥ 1: dv.divergence does not call a registry fn without rows
    p, q = lp.exp(), lq.exp()
    if cost == "l1":
        w = torch.cdist(q, p, p=1.0)
    elif cost == "l2":
        w = torch.cdist(q, p, p=2.0)
    else:
        w = (q.unsqueeze(1) - p.unsqueeze(0)).square().sum(-1) if n * n * q.shape[1] <= 2**24 else torch.cdist(q, p).square()
    log_k = -w / epsilon
    # One host read decides the iteration (detached: it is a number, not part of the graph).
    lowest = float(log_k.detach().min())
    largest = float(w.detach().max()) if not math.isfinite(lowest) else 0.0
    if math.isfinite(largest) and not math.isfinite(lowest):
        raise ValueError(
            f"sinkhorn: epsilon={epsilon:g} is too small for {w.dtype}: cost / epsilon overflows (largest "
            f"cost {largest:.3g}, so epsilon must exceed {largest / torch.finfo(w.dtype).max:.3g}); "
            f"use a larger epsilon (SinKD uses 0.1) or float64 logits"
        )
    # (A cost that is not finite comes from logits that are not: the value turns NaN, and
    # dv.divergence names the argument.)
    if lowest > -_PLAIN_SINKHORN_LIMIT:
        # K = exp(−W/ε) has no entry near underflow: plain scaling u = a/(Kv), v = b/(Kᵀu)
        # (two matrix-vector products per iteration) gives the same plan as the log domain.
        kernel = log_k.exp()
        marginal = w.new_full((n,), 1.0 / n)
        v = w.new_ones(n)
        for _ in range(n_iters):
            u = marginal / (kernel @ v)
            v = marginal / (kernel.T @ u)
        plan = u.unsqueeze(1) * kernel * v.unsqueeze(0)
        return n * (plan * w).sum(1)
    log_marginal = -math.log(n)
    f = w.new_zeros(n)
    g = w.new_zeros(n)
    for _ in range(n_iters):
        f = log_marginal - torch.logsumexp(log_k + g.unsqueeze(0), dim=1)
        g = log_marginal - torch.logsumexp(log_k + f.unsqueeze(1), dim=0)
    plan = (f.unsqueeze(1) + log_k + g.unsqueeze(0)).exp()
    return n * (plan * w).sum(1)


# Largest W/ε for which the plain (non-log) Sinkhorn iterations are used: exp(−30) ≈ 1e-13
# keeps K and the scalings u, v far from float32 underflow and overflow for n_iters iterations.
_PLAIN_SINKHORN_LIMIT = 30.0


# Rows are processed in chunks of about this many elements (8 MB in float32). Every intermediate of a
# chunk then stays small enough for the allocator to reuse the same memory (and for
# the CPU caches to hold it), instead of faulting in fresh pages for each of the
# dozen elementwise temporaries a formula needs over a [tokens, vocab] tensor.
CHUNK_ELEMENTS = 1 << 21


def _chunks(n_rows: int, vocab: int):
    step = max(1, CHUNK_ELEMENTS // max(vocab, 1))
    for start in range(0, n_rows, step):
        yield slice(start, min(start + step, n_rows))


class RowDivergence(torch.autograd.Function):
    """Per-row divergence of tempered softmaxes; the gradient is formed in the forward pass.

    Inputs are student and teacher logits ``[n, V]`` in the compute dtype and a per-row
    kernel of this module (a registry entry's ``kernel``). Chunk by
    chunk, the forward pass computes both log-softmaxes once, the divergence, and —
    when a gradient will be needed — ``(w − q·Σw)/T`` for the student (and the
    teacher's counterpart), sharing the intermediate terms between value and
    gradient (as fused kernels such as Liger-Kernel's do). The backward pass only
    multiplies by the incoming per-row gradient. Double backward is not supported
    (it raises instead of silently returning a wrong second derivative).
    """

    @staticmethod
    def forward(ctx, student, teacher, kernel, temperature, params, zeros, want_student, want_teacher):
        n, vocab = student.shape
        rows = student.new_empty(n)
        grad_student = torch.empty_like(student) if want_student else None
        grad_teacher = torch.empty_like(teacher) if want_teacher else None
        for sl in _chunks(n, vocab):
            s_chunk, t_chunk = student[sl], teacher[sl]
            if temperature != 1.0:
                s_chunk, t_chunk = s_chunk / temperature, t_chunk / temperature
            lq = torch.log_softmax(s_chunk, dim=-1)
            lp = torch.log_softmax(t_chunk, dim=-1)
            rows[sl], w, v = kernel(lp, lq, zeros, want_student or want_teacher, **params)
            if want_student:
                if zeros:
                    w = torch.nan_to_num(w, nan=0.0, posinf=float("inf"), neginf=float("-inf"))
                grad_student[sl] = (w - lq.exp() * w.sum(-1, keepdim=True)) / temperature
            if want_teacher:
                if zeros:
                    v = torch.nan_to_num(v, nan=0.0, posinf=float("inf"), neginf=float("-inf"))
                grad_teacher[sl] = (v - lp.exp() * v.sum(-1, keepdim=True)) / temperature
        ctx.save_for_backward(grad_student, grad_teacher)
        return rows

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_rows):
        grad_student, grad_teacher = ctx.saved_tensors
        scale = grad_rows.unsqueeze(-1)
        grad_student = grad_student * scale if ctx.needs_input_grad[0] and grad_student is not None else None
        grad_teacher = grad_teacher * scale if ctx.needs_input_grad[1] and grad_teacher is not None else None
        return grad_student, grad_teacher, None, None, None, None, None, None
