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
    """g = (e^{c·y} − e^{c·x})/c for c > 0, accurate and overflow-free.

    With m = max(x, y) and δ = −|y − x| ≤ 0:  g = sign(y − x)·e^{c·m}·(−expm1(c·δ))/c.
    No exponential of a positive number is taken, and expm1 keeps the small-difference
    case exact (no cancellation between two nearly equal exponentials).
    """
    d = y - x
    return torch.sign(d) * (c * torch.maximum(x, y)).exp() * -torch.expm1(-c * d.abs()) / c


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


# ---------------------------------------------------------------------------
# Gradients in closed form.
#
# For a per-row divergence D(p, q) with p = softmax(t/T), q = softmax(s/T), the
# softmax chain rule gives  ∂D/∂s_j = (w_j − q_j · Σ_k w_k) / T  with
# w_k = q_k · ∂D/∂q_k  (D read as a function of unconstrained q), and the same for
# the teacher with v_k = p_k · ∂D/∂p_k. Terms of w that are constant multiples of
# q (or of p for v) cancel in that formula and are left out below. Writing w and v
# in closed form lets the backward pass be a few elementwise passes instead of
# replaying every intermediate of the value's formula.
# ---------------------------------------------------------------------------


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


def _scaled_difference(x: Tensor, y: Tensor, c: float) -> Tensor:
    """G(x, y; c) = (e^{c·y} − e^{c·x})/c, and y − x at c = 0."""
    if c == 0.0:
        return y - x
    return _scaled_expm1_product(x, y, c)


def forward_kl_weights(lp, lq, zeros):
    return -lp.exp(), _plogratio_terms(lp, lq, zeros)


def reverse_kl_weights(lp, lq, zeros):
    return _plogratio_terms(lq, lp, zeros), -lq.exp()


def js_weights(lp, lq, zeros, beta):
    # JSD_β = H(m) − β H(p) − (1−β) H(q):  q ∂/∂q = (1−β) q log(q/m),  p ∂/∂p = β p log(p/m)
    lm = _log_mixture(lp, lq, beta, zeros)
    return (1.0 - beta) * _plogratio_terms(lq, lm, zeros), beta * _plogratio_terms(lp, lm, zeros)


def tvd_weights(lp, lq, zeros):
    p, q = lp.exp(), lq.exp()
    sign = torch.sign(q - p)
    return 0.5 * q * sign, -0.5 * p * sign


def skew_kl_weights(lp, lq, zeros, alpha):
    # D = KL(p‖m), m = αp + (1−α)q:  q ∂/∂q = −(1−α) p q / m,  p ∂/∂p ≐ p log(p/m) − α p²/m
    if alpha == 0.0:
        return forward_kl_weights(lp, lq, zeros)
    lm = _log_mixture(lp, lq, alpha, zeros)
    w = -(1.0 - alpha) * (lp + lq - lm).exp()
    v = _plogratio_terms(lp, lm, zeros) - alpha * (2.0 * lp - lm).exp()
    return w, v


def skew_reverse_kl_weights(lp, lq, zeros, alpha):
    v, w = skew_kl_weights(lq, lp, zeros, alpha)  # the mirror image with p and q exchanged
    return w, v


def hellinger_weights(lp, lq, zeros):
    # ½ Σ (√p − √q)²:  q ∂/∂q = ½ (q − √(pq)),  p ∂/∂p = ½ (p − √(pq))
    root = (0.5 * (lp + lq)).exp()
    return 0.5 * (lq.exp() - root), 0.5 * (lp.exp() - root)


def chi2_weights(lp, lq, zeros):
    # Σ p²/q − 1:  q ∂/∂q = −p²/q,  p ∂/∂p = 2 p²/q
    if zeros:
        both_zero = (lp == _NEG_INF) & (lq == _NEG_INF)
        lp = torch.where(both_zero, _NEG_INF, lp)
        lq = torch.where(both_zero, 0.0, lq)
    ratio = (2.0 * lp - lq).exp()
    return -ratio, 2.0 * ratio


def cauchy_schwarz_weights(lp, lq, zeros):
    # −log A + ½ log B + ½ log C, A = Σpq, B = Σp², C = Σq²
    log_a = torch.logsumexp(lp + lq, dim=-1, keepdim=True)
    cross = (lp + lq - log_a).exp()
    w = (2.0 * lq - torch.logsumexp(2.0 * lq, dim=-1, keepdim=True)).exp() - cross
    v = (2.0 * lp - torch.logsumexp(2.0 * lp, dim=-1, keepdim=True)).exp() - cross
    return w, v


def alpha_beta_weights(lp, lq, zeros, alpha, beta):
    # q ∂/∂q = (q^{α+β} − p^α q^β)/α = q^β · G(log p, log q; α)
    # p ∂/∂p = (p^{α+β} − p^α q^β)/β = p^α · G(log q, log p; β)
    if zeros:
        both_zero = (lp == _NEG_INF) & (lq == _NEG_INF)
        lp = torch.where(both_zero, 0.0, lp)
        lq = torch.where(both_zero, 0.0, lq)
    w = _power(lq, beta) * _scaled_difference(lp, lq, alpha)
    v = _power(lp, alpha) * _scaled_difference(lq, lp, beta)
    return w, v


def _power(log_x: Tensor, c: float) -> Tensor | float:
    """x^c from log x, with x^0 = 1 also at x = 0 (exp(0 · -inf) would be NaN)."""
    return 1.0 if c == 0.0 else (c * log_x).exp()


def alpha_weights(lp, lq, zeros, alpha):
    return alpha_beta_weights(lp, lq, zeros, alpha=alpha, beta=1.0 - alpha)


def bdkd_weights(lp, lq, zeros, high_weight, low_weight):
    student_less_confident = (-_neg_entropy(lq, zeros) > -_neg_entropy(lp, zeros)).unsqueeze(-1)
    w_rkl = torch.where(student_less_confident, high_weight, low_weight).to(lp.dtype)
    w_fkl = torch.where(student_less_confident, low_weight, high_weight).to(lp.dtype)
    fw, fv = forward_kl_weights(lp, lq, zeros)
    rw, rv = reverse_kl_weights(lp, lq, zeros)
    return w_fkl * fw + w_rkl * rw, w_fkl * fv + w_rkl * rv


def _generic(value_fn, weights_fn):
    def both(lp, lq, zeros, want_weights, **params):
        rows = value_fn(lp, lq, zeros, **params)
        return (rows, *weights_fn(lp, lq, zeros, **params)) if want_weights else (rows, None, None)

    return both


def forward_kl_both(lp, lq, zeros, want_weights):
    terms = _plogratio_terms(lp, lq, zeros)
    return terms.sum(-1), (-lp.exp() if want_weights else None), terms


def reverse_kl_both(lp, lq, zeros, want_weights):
    terms = _plogratio_terms(lq, lp, zeros)
    return terms.sum(-1), terms, (-lq.exp() if want_weights else None)


def js_both(lp, lq, zeros, want_weights, beta):
    lm = _log_mixture(lp, lq, beta, zeros)
    to_p, to_q = _plogratio_terms(lp, lm, zeros), _plogratio_terms(lq, lm, zeros)
    rows = beta * to_p.sum(-1) + (1.0 - beta) * to_q.sum(-1)
    return rows, (1.0 - beta) * to_q, beta * to_p


def alpha_beta_both(lp, lq, zeros, want_weights, alpha, beta):
    # D_AB = Σ (w + v) / (α + β) with w = q ∂D/∂q and v = p ∂D/∂p as in alpha_beta_weights:
    # (w + v)/s = p^s/(sβ) + q^s/(sα) − p^α q^β/(αβ), the AB formula term by term; the
    # limits at α = 0 or β = 0 follow from those of G.
    if alpha == 0.0 and beta == 0.0:
        rows = alpha_beta_rows(lp, lq, zeros, 0.0, 0.0)
        return (rows, *alpha_beta_weights(lp, lq, zeros, 0.0, 0.0)) if want_weights else (rows, None, None)
    out_dtype = lp.dtype
    if max(alpha, beta) < 0.05:  # both exponents small: keep the division by s accurate
        lp, lq = lp.double(), lq.double()
    w, v = alpha_beta_weights(lp, lq, zeros, alpha, beta)
    if zeros:  # 0·(±inf) where a probability is 0: those terms are 0 (their limits)
        w = torch.nan_to_num(w, nan=0.0, posinf=float("inf"), neginf=float("-inf"))
        v = torch.nan_to_num(v, nan=0.0, posinf=float("inf"), neginf=float("-inf"))
    rows = ((w + v).sum(-1) / (alpha + beta)).to(out_dtype)
    return rows, w.to(out_dtype), v.to(out_dtype)


def alpha_both(lp, lq, zeros, want_weights, alpha):
    return alpha_beta_both(lp, lq, zeros, want_weights, alpha=alpha, beta=1.0 - alpha)


def bdkd_both(lp, lq, zeros, want_weights, high_weight, low_weight):
    to_q = _plogratio_terms(lp, lq, zeros)  # p log(p/q): forward KL terms
    to_p = _plogratio_terms(lq, lp, zeros)  # q log(q/p): reverse KL terms
    less_confident = -_neg_entropy(lq, zeros) > -_neg_entropy(lp, zeros)
    w_rkl = torch.where(less_confident, high_weight, low_weight).to(lp.dtype)
    w_fkl = torch.where(less_confident, low_weight, high_weight).to(lp.dtype)
    rows = w_fkl * to_q.sum(-1) + w_rkl * to_p.sum(-1)
    if not want_weights:
        return rows, None, None
    w_fkl, w_rkl = w_fkl.unsqueeze(-1), w_rkl.unsqueeze(-1)
    return rows, -w_fkl * lp.exp() + w_rkl * to_p, w_fkl * to_q - w_rkl * lq.exp()


ROW_KERNELS = {
    "forward_kl": forward_kl_both,
    "reverse_kl": reverse_kl_both,
    "js": js_both,
    "tvd": _generic(tvd_rows, tvd_weights),
    "skew_kl": _generic(skew_kl_rows, skew_kl_weights),
    "skew_reverse_kl": _generic(skew_reverse_kl_rows, skew_reverse_kl_weights),
    "alpha_beta": alpha_beta_both,
    "alpha": alpha_both,
    "hellinger": _generic(hellinger_rows, hellinger_weights),
    "chi2": _generic(chi2_rows, chi2_weights),
    "cauchy_schwarz": _generic(cauchy_schwarz_rows, cauchy_schwarz_weights),
    "bdkd": bdkd_both,
}


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

    Inputs are student and teacher logits ``[n, V]`` in the compute dtype. Chunk by
    chunk, the forward pass computes both log-softmaxes once, the divergence, and —
    when a gradient will be needed — ``(w − q·Σw)/T`` for the student (and the
    teacher's counterpart), sharing the intermediate terms between value and
    gradient (as fused kernels such as Liger-Kernel's do). The backward pass only
    multiplies by the incoming per-row gradient. Double backward is not supported
    (it raises instead of silently returning a wrong second derivative).
    """

    @staticmethod
    def forward(ctx, student, teacher, name, temperature, params, zeros, want_student, want_teacher):
        kernel = ROW_KERNELS[name]
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
