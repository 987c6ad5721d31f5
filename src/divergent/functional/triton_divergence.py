"""One fused Triton kernel per chunk: both log-softmaxes, the divergence and its gradient.

This is the GPU inner loop of the output-layer-fused loss
(:mod:`divergent.functional.fused_linear`). For a chunk of ``N`` tokens it
receives the student and teacher logits ``s, t`` (``[N, V]``, bf16/fp16/fp32)
and returns, for every built-in divergence whose registry entry names a ``triton_kernel``
(all but ``sinkhorn`` and ``kl_top``; see :data:`SUPPORTED_NAMES`),

    rows[i] = D(p_i || q_i),        p_i = softmax(t_i / T),  q_i = softmax(s_i / T)
    grad    = d( sum_i row_scale[i] * rows[i] ) / d s

with the functional layer's conventions (student first, teacher second, no T^2
factor; rows with ``row_scale == 0`` give 0 and a zero gradient). The gradient
is written into the student logits' own buffer when it is contiguous, so a
chunk needs no ``[N, V]`` allocation beyond the two logits.

The gradient of every divergence has one shape. Write l_k = log q_k =
s_k / T - log Z_q and a_k = dD/dl_k (the sensitivity to the student's
log-probability of class k). Since dl_k/ds_j = (delta_kj - q_j) / T,

    dD/ds_j = ( a_j - q_j * A ) / T,        A = sum_k a_k.

Each divergence therefore only supplies its per-class term, its ``a_k`` and,
where ``a_k`` needs a row-level quantity (Cauchy-Schwarz, BD-KD), the sums that
quantity is made of. One program handles one row in three passes over the
vocabulary, ``BLOCK_V`` entries at a time, accumulating in float32:

1. online log-sum-exp of ``s / T`` and ``t / T`` (running maximum, rescaled sum);
   forward and reverse KL stream their value here too and skip pass 2;
2. the divergence's sums (its value and ``A``, or the row statistics it needs);
3. ``grad_j = row_scale * (a_j - q_j * A) / T``, stored over ``s_j``.

Reads per row: 3 x (student + teacher) logits (2 x for forward/reverse KL), one
write; no ``[N, V]`` float32 temporaries. The Python side
(:func:`rows_and_student_grad`) validates inputs, maps a name and its parameters
to the kernel's constants, and launches one program per row.
:func:`rows_and_student_grad_topk` does the same for a ``dv.TopK`` teacher.

``import triton`` is optional: without it this module still imports and
:func:`supports` returns False, so callers fall back to the PyTorch path. On a
machine without a GPU the kernels run on CPU tensors under Triton's interpreter
(``TRITON_INTERPRET=1`` when this module is imported); that is how its tests
check them against the float64 reference. Notes, floor arithmetic and what is
still to be measured on a GPU: ``docs/gpu.md``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

from divergent.functional._math import PLAIN_POWERS_FROM  # exponents below it go to _AB_SMALL
from divergent.functional.registry import REGISTRY, get_spec

try:  # Triton is optional: CPU-only installs and CI have none.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on machines without triton
    triton = None
    tl = None

__all__ = [
    "supports",
    "rows_and_student_grad",
    "rows_and_student_grad_topk",
    "triton_available",
    "SUPPORTED_NAMES",
    "KERNEL_CONSTANTS",
]

# Kernel identifiers of the per-class formulas (constexpr: each name compiles its own kernel).
_FORWARD_KL = 0
_REVERSE_KL = 1
_JS = 2
_TVD = 3
_SKEW_KL = 4
_SKEW_REVERSE_KL = 5
_AB_GENERIC = 6  # alpha, beta >= 0.1: plain powers
_AB_SMALL = 7  # alpha + beta > 0 with an exponent below 0.1 (0 included): the form without cancellation
_AB_BOTH_ZERO = 8  # alpha = beta = 0 (log form)
_AMARI = 9  # 0.1 <= alpha <= 0.9; nearer the ends _AB_SMALL, at the ends forward/reverse KL
_HELLINGER = 10
_CHI2 = 11
_CAUCHY_SCHWARZ = 12
_BDKD = 13
_KERNEL_IDS = tuple(range(14))



def triton_available() -> bool:
    """True when ``import triton`` succeeded."""
    return triton is not None


def supports(name: str) -> bool:
    """Whether this module computes ``name`` (False for every name when Triton is absent).

    True for the registry entries with a ``triton_kernel``. ``sinkhorn`` couples all rows
    of a batch (a transport plan between them), so it has no per-row kernel; a divergence
    registered with ``dv.register_divergence`` has none either (the chunked torch path runs it).
    """
    spec = REGISTRY.get(name) if isinstance(name, str) else None
    return triton is not None and spec is not None and spec.triton_kernel in KERNEL_CONSTANTS


if triton is not None:
    # Only Triton builtins and this module's own jit functions are called below (reductions
    # through tl.reduce, zeros through tl.full): the standard-library wrappers (tl.sum, tl.max,
    # tl.zeros) are jit functions bound when triton is imported, so with them the kernel could
    # not be re-created under the interpreter after a normal import (see the tests). The
    # combine functions are tl.sum's and tl.max's own where this Triton has them, because the
    # interpreter recognises those and reduces with numpy instead of element by element.

    @triton.jit
    def _add(x, y):
        return x + y

    @triton.jit
    def _larger(x, y):
        return tl.maximum(x, y)

    _add = getattr(tl.standard, "_sum_combine", _add)
    _larger = getattr(tl.standard, "_elementwise_max", _larger)

    @triton.jit
    def _logaddexp(x, y):
        # log(e^x + e^y) with -inf on either side allowed (then it is the other side).
        hi = tl.maximum(x, y)
        lo = tl.minimum(x, y)
        safe_hi = tl.where(hi == float("-inf"), 0.0, hi)
        return hi + tl.log(1.0 + tl.exp(lo - safe_hi))

    @triton.jit
    def _online_logsumexp(row_max, row_sum, block):
        """One step of the streaming log-sum-exp: keep sum(exp(x - row_max)) for the running maximum.

        Also returns the factor the previous sums were rescaled by and exp(block - new maximum),
        so that other sums weighted by exp(x - max) can be streamed along.
        """
        new_max = tl.maximum(row_max, tl.reduce(block, 0, _larger))
        # While every value seen is -inf, shift by 0 so that exp(-inf - 0) = 0 instead of NaN.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        rescale = tl.exp(row_max - shift)
        weights = tl.exp(block - shift)
        return new_max, row_sum * rescale + tl.reduce(weights, 0, _add), rescale, weights

    @triton.jit
    def _psi_series(u):
        # psi(u) = (e^u - 1 - u) / u^2 = sum_k u^k / (k+2)!, for |u| < 1/2 (relative error 2e-9)
        out = 1.0 / 3628800.0
        out = out * u + 1.0 / 362880.0
        out = out * u + 1.0 / 40320.0
        out = out * u + 1.0 / 5040.0
        out = out * u + 1.0 / 720.0
        out = out * u + 1.0 / 120.0
        out = out * u + 1.0 / 24.0
        out = out * u + 1.0 / 6.0
        return out * u + 0.5

    @triton.jit
    def _weighted_phi(cross, log_top, c, z):
        """e^A phi(c, z) = e^A (e^(cz) - 1 - cz) / c^2 with e^A = cross and e^(A + cz) = e^log_top.

        |cz| < 1/2: e^A z^2 psi(cz) by the series; otherwise (e^(A + cz) - e^A (1 + cz)) / c^2, which
        never exponentiates cz alone (A + cz <= 0). e^A = 0 against an infinite cz is the limit 0.
        """
        u = c * z
        near = tl.abs(u) < 0.5
        series = cross * z * z * _psi_series(tl.where(near, u, 0.0))
        correction = tl.where(cross == 0.0, 0.0, cross * (1.0 + u))
        far = (tl.exp(log_top) - correction) / (c * c)
        return tl.where(near, series, far)

    @triton.jit
    def _ab_small_inputs(lp, lq, p_pos, q_pos, alpha, beta):
        """log p and log q with shared zeros set to 0 (their terms are 0), d = log p - log q, p^a q^b."""
        both_zero = (~p_pos) & (~q_pos)
        lp0 = tl.where(both_zero, 0.0, lp)
        lq0 = tl.where(both_zero, 0.0, lq)
        # an exponent of 0 makes its factor 1, also where the probability is 0
        log_cross = tl.where(alpha > 0.0, alpha * lp0, 0.0) + tl.where(beta > 0.0, beta * lq0, 0.0)
        return lp0, lq0, lp0 - lq0, tl.exp(log_cross), both_zero

    @triton.jit
    def _ab_small_sensitivity(lq0, d, cross, q_pos, alpha, beta):
        """a_k = q^b (q^a - p^a) / a = p^a q^b expm1(-a d) / a, and q^b (log q - log p) at a = 0.

        expm1(u) / u = 1 + u psi(u): the series for |u| < 1/2, else the exponentials (A + u <= 0).
        """
        u = -alpha * d
        near = tl.abs(u) < 0.5
        un = tl.where(near, u, 0.0)
        series = -cross * d * (1.0 + un * _psi_series(un))
        far = (tl.exp((alpha + beta) * lq0) - cross) / alpha
        general = tl.where(near, series, far)
        at_zero = tl.where(q_pos, -cross * d, 0.0)
        return tl.where(alpha > 0.0, general, at_zero)

    @triton.jit
    def _class_terms(lp, lq, p, q, param0, param1, param2, DIVERGENCE: tl.constexpr):
        """Per-class contributions to the pass-2 sums (acc0..acc3) of one divergence.

        lp, lq: log p, log q of a block (-inf where a probability is 0); p, q: their exps.
        For a sum of per-class terms, acc0 is the divergence and acc1 is A = sum_k a_k.
        """
        zero = p * 0.0  # p = exp(log p) is finite
        # "p > 0" as a log test: a probability that underflows float32 (log p = -1e4) is not a zero
        p_pos = lp > float("-inf")
        q_pos = lq > float("-inf")
        acc0 = zero
        acc1 = zero
        acc2 = zero
        acc3 = zero
        # forward KL (0) and reverse KL (1) are summed in pass 1 of the kernel:
        #   forward: a = -p, A = -sum p = -1;   reverse: a = q (log q - log p + 1), A = D + 1
        if DIVERGENCE == 2:
            # JSD_beta = beta KL(p||m) + (1-beta) KL(q||m), m = beta p + (1-beta) q;
            # a = (1-beta) q (log q - log m)  (the m-terms of the derivative cancel)
            # param0 = beta, param1 = log beta, param2 = log(1 - beta)
            lm = _logaddexp(param1 + lp, param2 + lq)
            q_term = tl.where(q_pos, q * (lq - lm), zero)
            acc0 = param0 * tl.where(p_pos, p * (lp - lm), zero) + (1.0 - param0) * q_term
            acc1 = (1.0 - param0) * q_term
        elif DIVERGENCE == 3:
            # TVD = 1/2 sum |p - q|; a = q * sign(q - p) / 2
            acc0 = 0.5 * tl.abs(p - q)
            sign = tl.where(q > p, 1.0, tl.where(q < p, -1.0, 0.0))
            acc1 = 0.5 * q * sign
        elif DIVERGENCE == 4:
            # skew KL = KL(p || m), m = alpha p + (1-alpha) q; a = -(1-alpha) p q / m
            # param0 = alpha, param1 = log alpha, param2 = log(1 - alpha)
            lm = _logaddexp(param1 + lp, param2 + lq)
            acc0 = tl.where(p_pos, p * (lp - lm), zero)
            acc1 = tl.where(p_pos & q_pos, -(1.0 - param0) * tl.exp(lp + lq - lm), zero)
        elif DIVERGENCE == 5:
            # skew reverse KL = KL(q || m), m = alpha q + (1-alpha) p;
            # a = q (log q - log m + 1) - alpha q^2 / m
            lm = _logaddexp(param1 + lq, param2 + lp)
            acc0 = tl.where(q_pos, q * (lq - lm), zero)
            acc1 = tl.where(q_pos, q * (lq - lm + 1.0) - param0 * tl.exp(2.0 * lq - lm), zero)
        elif DIVERGENCE == 6:
            # AB-divergence, alpha, beta > 0:
            #   D = -1/(alpha beta) sum [p^a q^b - a/(a+b) p^(a+b) - b/(a+b) q^(a+b)]
            #   a_k = (q^(a+b) - p^a q^b) / alpha;    param0 = alpha, param1 = beta
            s = param0 + param1
            pa_qb = tl.exp(param0 * lp + param1 * lq)
            p_ab = tl.exp(s * lp)
            q_ab = tl.exp(s * lq)
            acc0 = -(pa_qb - (param0 / s) * p_ab - (param1 / s) * q_ab) / (param0 * param1)
            acc1 = (q_ab - pa_qb) / param0
        elif DIVERGENCE == 7:
            # AB-divergence with an exponent below 0.1 (0 included), alpha + beta > 0, written
            # without cancellation (see divergent.functional._math.alpha_beta):
            #   D = sum p^a q^b [ (b/s) phi(b, d) + (a/s) phi(a, -d) ],  s = a + b,  d = log p - log q,
            #   phi(c, z) = (e^(cz) - 1 - cz) / c^2 >= 0;   a_k = q^b (q^a - p^a) / a.
            #   param0 = alpha, param1 = beta
            lp0, lq0, d, cross, both_zero = _ab_small_inputs(lp, lq, p_pos, q_pos, param0, param1)
            s = param0 + param1
            toward_p = _weighted_phi(cross, s * lp0, param1, d)
            toward_q = _weighted_phi(cross, s * lq0, param0, -d)
            value = tl.where(param1 > 0.0, (param1 / s) * toward_p, 0.0)
            value += tl.where(param0 > 0.0, (param0 / s) * toward_q, 0.0)
            # at alpha = 0 a class with p = 0 < q is +inf, at beta = 0 one with q = 0 < p (decided in log
            # space: p^a q^b may underflow to 0 against an infinite d)
            value = tl.where((param0 == 0.0) & q_pos & (~p_pos), float("inf"), value)
            value = tl.where((param1 == 0.0) & p_pos & (~q_pos), float("inf"), value)
            acc0 = tl.where(both_zero, zero, value)
            acc1 = _ab_small_sensitivity(lq0, d, cross, q_pos, param0, param1)
        elif DIVERGENCE == 8:
            # AB-divergence, alpha = beta = 0 (limit): D = 1/2 sum (log p - log q)^2; a_k = log q - log p
            diff = tl.where(p_pos | q_pos, lq - lp, zero)
            acc0 = 0.5 * diff * diff
            acc1 = diff
        elif DIVERGENCE == 9:
            # Amari alpha, 0.1 <= alpha <= 0.9: D = (1 - sum p^a q^(1-a)) / (a (1-a));
            # acc0 collects sum p^a q^(1-a); a_k = -p^a q^(1-a) / a.   param0 = alpha
            acc0 = tl.where(p_pos & q_pos, tl.exp(param0 * lp + (1.0 - param0) * lq), zero)
        elif DIVERGENCE == 10:
            # squared Hellinger = 1/2 sum (sqrt p - sqrt q)^2; a = (q - sqrt(p q)) / 2
            root_pq = tl.exp(0.5 * (lp + lq))
            acc0 = 0.5 * (p - 2.0 * root_pq + q)
            acc1 = 0.5 * (q - root_pq)
        elif DIVERGENCE == 11:
            # Pearson chi^2 = sum (p - q)^2 / q; a = q - p^2 / q. With d = log p - log q the term is
            # q (e^d - 1)^2 for d <= 0 and e^(log p + d) (1 - e^-d)^2 for d > 0: no overflow unless
            # the value itself overflows (q = 0 < p gives +inf).
            both_zero = (~p_pos) & (~q_pos)
            d = tl.where(both_zero, 0.0, lp - lq)
            d_pos = tl.maximum(d, 0.0)
            d_neg = tl.minimum(d, 0.0)
            above = tl.exp(lp + d_pos) * (1.0 - tl.exp(-d_pos)) * (1.0 - tl.exp(-d_pos))
            below = q * (tl.exp(d_neg) - 1.0) * (tl.exp(d_neg) - 1.0)
            acc0 = tl.where(both_zero, zero, tl.where(d > 0.0, above, below))
            acc1 = tl.where(both_zero, zero, q - tl.exp(2.0 * lp - lq))
        elif DIVERGENCE == 12:
            # Cauchy-Schwarz: sum p^2 and sum q^2 here; log sum p q is streamed in the kernel
            acc1 = p * p
            acc2 = q * q
        elif DIVERGENCE == 13:
            # BD-KD: forward KL, reverse KL, teacher entropy H(p), student entropy H(q)
            acc0 = tl.where(p_pos, p * (lp - lq), zero)
            acc1 = tl.where(q_pos, q * (lq - lp), zero)
            acc2 = tl.where(p_pos, -p * lp, zero)
            acc3 = tl.where(q_pos, -q * lq, zero)
        return acc0, acc1, acc2, acc3

    @triton.jit
    def _class_sensitivity(lp, lq, p, q, param0, param1, param2, c0, c1, DIVERGENCE: tl.constexpr):
        """a_k = dD/d(log q_k) for one block; c0, c1 are row constants from pass 2."""
        zero = p * 0.0  # p = exp(log p) is finite
        # "p > 0" as a log test: a probability that underflows float32 (log p = -1e4) is not a zero
        p_pos = lp > float("-inf")
        q_pos = lq > float("-inf")
        a = zero
        if DIVERGENCE == 0:
            a = -p
        elif DIVERGENCE == 1:
            a = tl.where(q_pos, q * (lq - lp + 1.0), zero)
        elif DIVERGENCE == 2:
            lm = _logaddexp(param1 + lp, param2 + lq)
            a = (1.0 - param0) * tl.where(q_pos, q * (lq - lm), zero)
        elif DIVERGENCE == 3:
            sign = tl.where(q > p, 1.0, tl.where(q < p, -1.0, 0.0))
            a = 0.5 * q * sign
        elif DIVERGENCE == 4:
            lm = _logaddexp(param1 + lp, param2 + lq)
            a = tl.where(p_pos & q_pos, -(1.0 - param0) * tl.exp(lp + lq - lm), zero)
        elif DIVERGENCE == 5:
            lm = _logaddexp(param1 + lq, param2 + lp)
            a = tl.where(q_pos, q * (lq - lm + 1.0) - param0 * tl.exp(2.0 * lq - lm), zero)
        elif DIVERGENCE == 6:
            s = param0 + param1
            a = (tl.exp(s * lq) - tl.exp(param0 * lp + param1 * lq)) / param0
        elif DIVERGENCE == 7:
            lp0, lq0, d, cross, both_zero = _ab_small_inputs(lp, lq, p_pos, q_pos, param0, param1)
            a = _ab_small_sensitivity(lq0, d, cross, q_pos, param0, param1)
        elif DIVERGENCE == 8:
            a = tl.where(p_pos | q_pos, lq - lp, zero)
        elif DIVERGENCE == 9:
            a = tl.where(p_pos & q_pos, -tl.exp(param0 * lp + (1.0 - param0) * lq) / param0, zero)
        elif DIVERGENCE == 10:
            a = 0.5 * (q - tl.exp(0.5 * (lp + lq)))
        elif DIVERGENCE == 11:
            a = tl.where(p_pos | q_pos, q - tl.exp(2.0 * lp - lq), zero)
        elif DIVERGENCE == 12:
            # D = -log sum pq + 1/2 log sum p^2 + 1/2 log sum q^2
            # a = -p q / sum pq + q^2 / sum q^2;   c0 = log sum pq, c1 = 1 / sum q^2
            a = -tl.exp(lp + lq - c0) + q * q * c1
        elif DIVERGENCE == 13:
            # D = w_f KL(p||q) + w_r KL(q||p) with the row weights fixed by the entropy gap
            # (piecewise constant, so they carry no gradient); c0 = w_f, c1 = w_r. A weight of 0
            # drops its direction also where that KL's term is infinite (0 * inf would be NaN).
            reverse = tl.where(q_pos, q * (lq - lp + 1.0), zero)
            a = -c0 * p + tl.where(c1 == 0.0, zero, c1 * reverse)
        return a

    @triton.jit
    def _fused_divergence_kernel(
        student_ptr,
        teacher_ptr,
        row_scale_ptr,
        rows_ptr,
        vocab_size,
        student_row_stride,
        teacher_row_stride,
        inv_temperature,
        param0,
        param1,
        param2,
        DIVERGENCE: tl.constexpr,
        BLOCK_V: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        student_row = student_ptr + row * student_row_stride
        teacher_row = teacher_ptr + row * teacher_row_stride
        offsets = tl.arange(0, BLOCK_V)
        row_scale = tl.load(row_scale_ptr + row).to(tl.float32)

        # Pass 1: log Z_q and log Z_p of the tempered logits, streamed over the vocabulary.
        # Forward and reverse KL also stream their value here, which saves them pass 2:
        #   KL(p||q) = sum_k e^(t_k - m_t) (t_k - s_k) / sum_k e^(t_k - m_t) - (log Z_p - log Z_q)
        # (and the mirror image for KL(q||p)), rescaled with the running maximum like the sums.
        s_max = float("-inf")
        s_sum = 0.0
        t_max = float("-inf")
        t_sum = 0.0
        kl_cross = 0.0
        for start in range(0, vocab_size, BLOCK_V):
            cols = start + offsets
            in_vocab = cols < vocab_size
            s = tl.load(student_row + cols, mask=in_vocab, other=float("-inf")).to(tl.float32) * inv_temperature
            t = tl.load(teacher_row + cols, mask=in_vocab, other=float("-inf")).to(tl.float32) * inv_temperature
            s_max, s_sum, s_rescale, s_weights = _online_logsumexp(s_max, s_sum, s)
            t_max, t_sum, t_rescale, t_weights = _online_logsumexp(t_max, t_sum, t)
            if DIVERGENCE == 0:
                # classes with p = 0 (t = -inf) contribute 0, also where s = -inf; p > 0 = q is +inf
                # (decided in log space: p's weight may underflow to 0 against t - s = inf)
                terms = tl.where(t > float("-inf"), tl.where(s == float("-inf"), float("inf"), t_weights * (t - s)), 0.0)
                kl_cross = kl_cross * t_rescale + tl.reduce(terms, 0, _add)
            elif DIVERGENCE == 1:
                terms = tl.where(s > float("-inf"), tl.where(t == float("-inf"), float("inf"), s_weights * (s - t)), 0.0)
                kl_cross = kl_cross * s_rescale + tl.reduce(terms, 0, _add)
        log_zq = s_max + tl.log(s_sum)
        log_zp = t_max + tl.log(t_sum)
        # log Z_p - log Z_q with the maxima subtracted first (exact for nearby maxima)
        log_z_gap = (t_max - s_max) + (tl.log(t_sum) - tl.log(s_sum))

        # Pass 2: the divergence's row sums, per lane in float32, reduced once at the end.
        acc0 = tl.full([BLOCK_V], 0.0, dtype=tl.float32)
        acc1 = tl.full([BLOCK_V], 0.0, dtype=tl.float32)
        acc2 = tl.full([BLOCK_V], 0.0, dtype=tl.float32)
        acc3 = tl.full([BLOCK_V], 0.0, dtype=tl.float32)
        # Cauchy-Schwarz only: per-lane streaming log-sum-exp of log p + log q, because
        # sum p q underflows float32 when the two distributions barely overlap.
        cross_max = tl.full([BLOCK_V], float("-inf"), dtype=tl.float32)
        cross_sum = tl.full([BLOCK_V], 0.0, dtype=tl.float32)
        if DIVERGENCE > 1:  # forward and reverse KL have their value from pass 1 already
            for start in range(0, vocab_size, BLOCK_V):
                cols = start + offsets
                in_vocab = cols < vocab_size
                s = tl.load(student_row + cols, mask=in_vocab, other=float("-inf")).to(tl.float32) * inv_temperature
                t = tl.load(teacher_row + cols, mask=in_vocab, other=float("-inf")).to(tl.float32) * inv_temperature
                lq = s - log_zq
                lp = t - log_zp
                d0, d1, d2, d3 = _class_terms(lp, lq, tl.exp(lp), tl.exp(lq), param0, param1, param2, DIVERGENCE)
                # Lanes past the vocabulary hold p = q = 0; every term is 0 there except where a
                # formula is not (chi^2 and the AB log forms guard it), so mask them explicitly.
                acc0 += tl.where(in_vocab, d0, 0.0)
                acc1 += tl.where(in_vocab, d1, 0.0)
                acc2 += tl.where(in_vocab, d2, 0.0)
                acc3 += tl.where(in_vocab, d3, 0.0)
                if DIVERGENCE == 12:
                    cross = lp + lq
                    new_max = tl.maximum(cross_max, cross)
                    shift = tl.where(new_max == float("-inf"), 0.0, new_max)
                    cross_sum = cross_sum * tl.exp(cross_max - shift) + tl.exp(cross - shift)
                    cross_max = new_max
        sum0 = tl.reduce(acc0, 0, _add)
        sum1 = tl.reduce(acc1, 0, _add)
        sum2 = tl.reduce(acc2, 0, _add)
        sum3 = tl.reduce(acc3, 0, _add)

        # Row value D, A = sum_k a_k, and the row constants the per-class a_k need.
        c0 = 0.0
        c1 = 0.0
        if DIVERGENCE == 0:
            value = kl_cross / t_sum - log_z_gap
            total_a = -1.0
        elif DIVERGENCE == 1:
            value = kl_cross / s_sum + log_z_gap
            total_a = value + 1.0
        elif DIVERGENCE == 9:
            value = (1.0 - sum0) / (param0 * (1.0 - param0))
            total_a = -sum0 / param0
        elif DIVERGENCE == 12:
            top = tl.reduce(cross_max, 0, _larger)
            safe_top = tl.where(top == float("-inf"), 0.0, top)
            log_cross = safe_top + tl.log(tl.reduce(cross_sum * tl.exp(cross_max - safe_top), 0, _add))
            # >= 0 by the Cauchy-Schwarz inequality; clamp rounding below zero
            value = tl.maximum(-log_cross + 0.5 * tl.log(sum1) + 0.5 * tl.log(sum2), 0.0)
            total_a = 0.0  # -sum pq / sum pq + sum q^2 / sum q^2
            c0 = log_cross
            c1 = 1.0 / sum2
        elif DIVERGENCE == 13:
            # The less confident side gets the large weight on the KL that pulls it:
            # student entropy above the teacher's -> reverse KL weighted high, else forward KL.
            student_less_confident = sum3 > sum2
            c0 = tl.where(student_less_confident, param1, param0)  # forward-KL weight
            c1 = tl.where(student_less_confident, param0, param1)  # reverse-KL weight
            # a weight of 0 drops its direction, also where that KL is infinite (0 * inf would be NaN)
            value = tl.where(c0 == 0.0, 0.0, c0 * sum0) + tl.where(c1 == 0.0, 0.0, c1 * sum1)
            total_a = -c0 + tl.where(c1 == 0.0, 0.0, c1 * (sum1 + 1.0))
        else:
            value = sum0
            total_a = sum1

        counted = row_scale != 0.0
        tl.store(rows_ptr + row, tl.where(counted, value, 0.0))

        # Pass 3: grad_j = row_scale * (a_j - q_j A) / T, written over the student logits.
        coefficient = row_scale * inv_temperature
        for start in range(0, vocab_size, BLOCK_V):
            cols = start + offsets
            in_vocab = cols < vocab_size
            s_raw = tl.load(student_row + cols, mask=in_vocab, other=float("-inf"))
            s = s_raw.to(tl.float32) * inv_temperature
            t = tl.load(teacher_row + cols, mask=in_vocab, other=float("-inf")).to(tl.float32) * inv_temperature
            lq = s - log_zq
            lp = t - log_zp
            q = tl.exp(lq)
            a = _class_sensitivity(lp, lq, tl.exp(lp), q, param0, param1, param2, c0, c1, DIVERGENCE)
            grad = tl.where(counted, coefficient * (a - q * total_a), 0.0)
            tl.store(student_row + cols, grad.to(s_raw.dtype), mask=in_vocab)

    @triton.jit
    def _row_logsumexp_kernel(logits_ptr, out_ptr, vocab_size, row_stride, inv_temperature, BLOCK_V: tl.constexpr):
        """out[i] = log sum_j exp(x_ij / T), streamed over the row."""
        row = tl.program_id(0).to(tl.int64)
        row_ptr = logits_ptr + row * row_stride
        offsets = tl.arange(0, BLOCK_V)
        row_max = float("-inf")
        row_sum = 0.0
        for start in range(0, vocab_size, BLOCK_V):
            cols = start + offsets
            x = tl.load(row_ptr + cols, mask=cols < vocab_size, other=float("-inf")).to(tl.float32) * inv_temperature
            row_max, row_sum, _, _ = _online_logsumexp(row_max, row_sum, x)
        tl.store(out_ptr + row, row_max + tl.log(row_sum))

    @triton.jit
    def _scaled_softmax_kernel(
        logits_ptr, log_norm_ptr, coefficient_ptr, vocab_size, row_stride, inv_temperature, BLOCK_V: tl.constexpr
    ):
        """x_ij <- c_i * exp(x_ij / T - log_norm_i), in place."""
        row = tl.program_id(0).to(tl.int64)
        row_ptr = logits_ptr + row * row_stride
        log_norm = tl.load(log_norm_ptr + row)
        coefficient = tl.load(coefficient_ptr + row)
        offsets = tl.arange(0, BLOCK_V)
        for start in range(0, vocab_size, BLOCK_V):
            cols = start + offsets
            in_vocab = cols < vocab_size
            raw = tl.load(row_ptr + cols, mask=in_vocab, other=float("-inf"))
            value = coefficient * tl.exp(raw.to(tl.float32) * inv_temperature - log_norm)
            tl.store(row_ptr + cols, value.to(raw.dtype), mask=in_vocab)


def _alpha_beta_constants(alpha: float, beta: float) -> tuple[int, float, float, float]:
    if alpha == 0.0 and beta == 0.0:
        return _AB_BOTH_ZERO, 0.0, 0.0, 0.0
    if min(alpha, beta) >= PLAIN_POWERS_FROM:
        return _AB_GENERIC, alpha, beta, 0.0
    return _AB_SMALL, alpha, beta, 0.0


def _amari_constants(params: Mapping[str, Any]) -> tuple[int, float, float, float]:
    alpha = params["alpha"]
    if alpha == 1.0:  # the alpha -> 1 limit is forward KL
        return _FORWARD_KL, 0.0, 0.0, 0.0
    if alpha == 0.0:  # the alpha -> 0 limit is reverse KL
        return _REVERSE_KL, 0.0, 0.0, 0.0
    if min(alpha, 1.0 - alpha) >= PLAIN_POWERS_FROM:
        return _AMARI, alpha, 0.0, 0.0
    # Nearer the ends 1 - sum p^a q^(1-a) cancels: the AB form at (alpha, 1 - alpha) does not.
    return _alpha_beta_constants(alpha, 1.0 - alpha)


def _mixture_constants(kernel: int, plain: int, weight: float) -> tuple[int, float, float, float]:
    if weight == 0.0:  # no smoothing: the plain KL of that direction
        return plain, 0.0, 0.0, 0.0
    return kernel, weight, math.log(weight), math.log1p(-weight)


# The kernels, keyed by a registry entry's ``triton_kernel``: each maps the divergence's resolved
# parameters to (kernel id, param0, param1, param2) of _fused_divergence_kernel.
KERNEL_CONSTANTS: dict[str, Callable[[Mapping[str, Any]], tuple[int, float, float, float]]] = {
    "forward_kl": lambda params: (_FORWARD_KL, 0.0, 0.0, 0.0),
    "reverse_kl": lambda params: (_REVERSE_KL, 0.0, 0.0, 0.0),
    "js": lambda params: (_JS, params["beta"], math.log(params["beta"]), math.log1p(-params["beta"])),
    "tvd": lambda params: (_TVD, 0.0, 0.0, 0.0),
    "skew_kl": lambda params: _mixture_constants(_SKEW_KL, _FORWARD_KL, params["alpha"]),
    "skew_reverse_kl": lambda params: _mixture_constants(_SKEW_REVERSE_KL, _REVERSE_KL, params["alpha"]),
    "alpha_beta": lambda params: _alpha_beta_constants(params["alpha"], params["beta"]),
    "alpha": _amari_constants,
    "hellinger": lambda params: (_HELLINGER, 0.0, 0.0, 0.0),
    "chi2": lambda params: (_CHI2, 0.0, 0.0, 0.0),
    "cauchy_schwarz": lambda params: (_CAUCHY_SCHWARZ, 0.0, 0.0, 0.0),
    "bdkd": lambda params: (_BDKD, params["high_weight"], params["low_weight"], 0.0),
}

# Derived from the registry: the divergences whose entry names one of these kernels.
SUPPORTED_NAMES = tuple(name for name, spec in REGISTRY.items() if spec.triton_kernel in KERNEL_CONSTANTS)


def _kernel_constants(name: str, params: Mapping[str, Any] | None) -> tuple[int, float, float, float]:
    """Map a divergence and its parameters to (kernel id, param0, param1, param2).

    Parameters are filled and range-checked by the registry (``get_spec(name).resolve``),
    the one place their defaults and ranges are declared.
    """
    spec = get_spec(name)
    if spec.triton_kernel not in KERNEL_CONSTANTS:
        raise ValueError(f"name {name!r} has no fused kernel; supported: {', '.join(SUPPORTED_NAMES)}")
    return KERNEL_CONSTANTS[spec.triton_kernel](spec.resolve(dict(params or {})))


def _default_block_size(vocab_size: int) -> int:
    return min(4096, triton.next_power_of_2(vocab_size))


def _is_interpreted(kernel: Any) -> bool:
    return type(kernel).__name__ == "InterpretedFunction"


def rows_and_student_grad(
    name: str,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    params: Mapping[str, Any] | None = None,
    row_scale: torch.Tensor | None = None,
    block_size: int | None = None,
    num_warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row divergence of one chunk and the gradient of their weighted sum, in one kernel.

    Args:
        name: a registered divergence other than ``sinkhorn`` (see :func:`supports`).
        student_logits: ``[N, V]`` float16/bfloat16/float32 student logits ``s``.
            Overwritten with the gradient when contiguous (the chunk's logits
            are not needed afterwards); otherwise a contiguous copy is.
        teacher_logits: ``[N, V]`` teacher logits ``t`` (any float dtype); read only.
        temperature: ``T > 0``; both sides are ``softmax(logits / T)``. No T^2 factor.
        params: the divergence's parameters (registry defaults for the ones left out).
        row_scale: ``[N]`` weights ``c_i`` (default ones); rows with ``c_i = 0`` give 0.
        block_size: vocabulary entries per step (a power of two; default min(4096, V)).
        num_warps: warps per program (a power of two; default 16 at a block of 4096 or
            more, 8 from 1024, else 4).

    Returns:
        ``rows`` float32 ``[N]`` with ``rows[i] = D(p_i || q_i)`` (0 where ``c_i = 0``)
        and ``grad = d(sum_i c_i rows[i]) / d s`` in ``student_logits``' dtype,
        sharing its storage when it was contiguous.

    Inputs are assumed free of NaN (the calling loss validates logits once).
    """
    if triton is None:
        raise RuntimeError("divergent.functional.triton_divergence needs the triton package; it is not installed")
    for argument, tensor in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{argument} must be a torch.Tensor of logits, got {type(tensor).__name__}")
        if tensor.ndim != 2:
            raise ValueError(f"{argument} must be 2-D [tokens, vocabulary], got shape {tuple(tensor.shape)}")
        if tensor.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise TypeError(f"{argument} must be float16, bfloat16 or float32, got {tensor.dtype}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits and teacher_logits must have the same shape, got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    if student_logits.device != teacher_logits.device:
        raise ValueError(
            f"student_logits and teacher_logits must be on one device, got "
            f"{student_logits.device} and {teacher_logits.device}"
        )
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
    if not math.isfinite(float(temperature)):
        raise ValueError(f"temperature must be finite, got {temperature!r}")
    if not supports(name):
        raise ValueError(f"name {name!r} has no fused kernel; supported: {', '.join(SUPPORTED_NAMES)}")
    kernel_id, param0, param1, param2 = _kernel_constants(name, params)

    rows_count, vocab_size = student_logits.shape
    device = student_logits.device
    if device.type == "cpu" and not _is_interpreted(_fused_divergence_kernel):
        raise RuntimeError(
            "the Triton kernel needs CUDA tensors; on CPU it runs only under the interpreter "
            "(set TRITON_INTERPRET=1 before importing divergent.functional.triton_divergence)"
        )
    if row_scale is None:
        row_scale = torch.ones(rows_count, dtype=torch.float32, device=device)
    if not isinstance(row_scale, torch.Tensor) or row_scale.shape != (rows_count,):
        got = tuple(row_scale.shape) if isinstance(row_scale, torch.Tensor) else type(row_scale).__name__
        raise ValueError(f"row_scale must be a tensor of shape ({rows_count},), got {got}")
    row_scale = row_scale.to(device=device, dtype=torch.float32).contiguous()
    if block_size is None:
        block_size = _default_block_size(vocab_size)
    if block_size < 1 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two, got {block_size}")
    num_warps = _checked_num_warps(num_warps, block_size)

    # The gradient overwrites the logits it is computed from, one block after it was read.
    student = student_logits if student_logits.is_contiguous() else student_logits.contiguous()
    teacher = teacher_logits.contiguous()
    rows = torch.empty(rows_count, dtype=torch.float32, device=device)
    if rows_count == 0:
        return rows, student
    _fused_divergence_kernel[(rows_count,)](
        student,
        teacher,
        row_scale,
        rows,
        vocab_size,
        student.stride(0),
        teacher.stride(0),
        1.0 / float(temperature),
        param0,
        param1,
        param2,
        DIVERGENCE=kernel_id,
        BLOCK_V=block_size,
        num_warps=num_warps,
    )
    return rows, student


def _checked_num_warps(num_warps: int | None, block_size: int) -> int:
    if num_warps is None:
        # 4096 entries over 16 warps is 8 values of each tensor per thread: 57-76 registers
        # (no local memory) for every variant when compiled for sm_90, two programs per SM.
        # Untuned: benchmarks/bench_fused_linear.py --kernel-configs sweeps it on a GPU.
        return 16 if block_size >= 4096 else (8 if block_size >= 1024 else 4)
    if isinstance(num_warps, bool) or not isinstance(num_warps, int) or num_warps < 1 or num_warps & (num_warps - 1):
        raise ValueError(f"num_warps must be a power of two, got {num_warps!r}")
    return num_warps


def _launch_rowwise(kernel: Any, logits: torch.Tensor, *args: Any, block_size: int | None) -> None:
    vocab_size = logits.shape[1]
    block = block_size or _default_block_size(vocab_size)
    num_warps = _checked_num_warps(None, block)
    kernel[(logits.shape[0],)](logits, *args[:-1], vocab_size, logits.stride(0), args[-1], BLOCK_V=block, num_warps=num_warps)


def rows_and_student_grad_topk(
    name: str,
    student_logits: torch.Tensor,
    teacher: Any,
    *,
    temperature: float = 1.0,
    params: Mapping[str, Any] | None = None,
    row_scale: torch.Tensor | None = None,
    block_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`rows_and_student_grad` for a ``dv.TopK`` teacher (k stored classes + a tail bucket).

    The divergence is taken between the k+1 buckets, as ``dv.divergence`` does with a
    ``TopK`` (see ``divergent.functional.topk.bucket_logprobs``): the student's bucket
    log-probs are ``log q_j`` at the stored indices ``K`` and ``L_tail = log sum_{j not in K} q_j``.
    With ``g_b`` the gradient of the bucket divergence with respect to the bucket
    log-probs taken as logits (what :func:`rows_and_student_grad` returns for the k+1
    buckets at T = 1), the chain rule through ``L_b(s)`` gives

        dD/ds_j = g_j / T                                  for j in K
        dD/ds_j = exp(s_j / T - LSE_tail) * g_tail / T     for j not in K

    where ``LSE_tail = log sum_{j not in K} exp(s_j / T)``. Work over the vocabulary: the
    stored entries of the student buffer are set to -inf (the buffer is overwritten anyway),
    one streamed log-sum-exp gives ``LSE_tail`` exactly (not as 1 - sum of the top k), the
    small k+1 bucket problem runs through the fused kernel, and one more pass writes the
    tail gradient; the k stored entries are scattered last. Indices must be unique per row
    (as ``TopK.from_logits`` makes them).
    """
    from divergent.functional.topk import TopK, bucket_logprobs

    if triton is None:
        raise RuntimeError("divergent.functional.triton_divergence needs the triton package; it is not installed")
    if not isinstance(teacher, TopK):
        raise TypeError(f"teacher must be a dv.TopK, got {type(teacher).__name__}")
    if not isinstance(student_logits, torch.Tensor) or student_logits.ndim != 2:
        got = tuple(student_logits.shape) if isinstance(student_logits, torch.Tensor) else type(student_logits).__name__
        raise ValueError(f"student_logits must be a 2-D tensor [tokens, vocabulary], got {got}")
    if student_logits.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"student_logits must be float16, bfloat16 or float32, got {student_logits.dtype}")
    rows_count, vocab_size = student_logits.shape
    if teacher.indices.ndim != 2 or teacher.indices.shape[0] != rows_count:
        raise ValueError(
            f"TopK teacher must have shape [{rows_count}, k] to match student_logits, got {tuple(teacher.indices.shape)}"
        )
    if teacher.k > vocab_size or (teacher.indices.numel() and int(teacher.indices.max()) >= vocab_size):
        raise ValueError(f"TopK teacher indices (k={teacher.k}) do not fit a vocabulary of {vocab_size}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
    device = student_logits.device
    indices = teacher.indices.to(device=device, dtype=torch.long)
    logprobs = teacher.logprobs.to(device=device, dtype=torch.float32)
    if teacher.k == vocab_size:
        # No tail: the stored log-probs are the whole teacher distribution.
        dense = torch.full((rows_count, vocab_size), float("-inf"), device=device).scatter(1, indices, logprobs)
        return rows_and_student_grad(
            name, student_logits, dense, temperature=temperature, params=params, row_scale=row_scale, block_size=block_size
        )
    if row_scale is None:
        row_scale = torch.ones(rows_count, dtype=torch.float32, device=device)
    inv_temperature = 1.0 / float(temperature)

    student = student_logits if student_logits.is_contiguous() else student_logits.contiguous()
    top_logits = student.gather(1, indices).float()
    student.scatter_(1, indices, float("-inf"))
    tail_lse = torch.empty(rows_count, dtype=torch.float32, device=device)
    if rows_count:
        _launch_rowwise(_row_logsumexp_kernel, student, tail_lse, inv_temperature, block_size=block_size)

    # Bucket log-probs exactly as the functional layer forms them: logits whose tempered
    # softmax over k+1 entries is (q at K, tail mass), and the teacher's stored log-probs.
    bucket_logits = torch.cat([top_logits, (tail_lse * float(temperature))[:, None]], dim=1)
    local = torch.arange(teacher.k, device=device).expand(rows_count, teacher.k)
    lp, lq = bucket_logprobs(bucket_logits, TopK(local, logprobs), float(temperature), torch.float32)
    rows, bucket_grad = rows_and_student_grad(
        name, lq.contiguous(), lp.contiguous(), temperature=1.0, params=params, row_scale=row_scale
    )
    tail_coefficient = (bucket_grad[:, -1] * inv_temperature).contiguous()
    if rows_count:
        _launch_rowwise(
            _scaled_softmax_kernel, student, tail_lse, tail_coefficient, inv_temperature, block_size=block_size
        )
    student.scatter_(1, indices, (bucket_grad[:, :-1] * inv_temperature).to(student.dtype))
    return rows, student
