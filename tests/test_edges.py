"""Edges: exponents at and near 0, zero weights on infinite terms, overflow named, TopK rounding,
teacher gradients, no warnings, and every input of the fused loss checked.

References are closed forms in float64 numpy/scipy and, for the AB-divergence near its
special points, the defining formula evaluated in mpmath to 60 significant digits.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from scipy.special import rel_entr

import divergent as dv
from divergent.functional.fused_linear import fused_linear_distillation
from references import probs

INF = float("-inf")


def _pair(shape=(4, 9), dtype=torch.float64, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=dtype) * scale, torch.randn(shape, generator=g, dtype=dtype) * scale


def _ab_high_precision(student_logits, teacher_logits, alpha, beta):
    """D_AB per row from its definition (or the log form when an exponent is 0), to 60 significant digits."""
    mpmath = pytest.importorskip("mpmath")
    mp = mpmath.mp
    # The general formula cancels to O(α + β): carry twice the exponents' digits on top of 60.
    smallest = min([e for e in (alpha, beta) if e > 0] or [1.0])
    mp.dps = 60 + 2 * max(0, -math.floor(math.log10(smallest)))
    a, b = mp.mpf(alpha), mp.mpf(beta)

    def distribution(row):
        finite = [mp.mpf(float(x)) for x in row if math.isfinite(x)]
        log_norm = mp.log(sum(mp.exp(x) for x in finite))
        return [mp.exp(mp.mpf(float(x)) - log_norm) if math.isfinite(x) else mp.mpf(0) for x in row]

    def term(p, q):
        if p == 0 and q == 0:
            return mp.mpf(0)
        if a == 0 and b == 0:
            return (mp.log(p) - mp.log(q)) ** 2 / 2 if p > 0 and q > 0 else mp.inf
        if a == 0:  # 1/β² [q^β log(q^β/p^β) − q^β + p^β]
            return mp.inf if p == 0 else (q**b * b * (mp.log(q) - mp.log(p)) - q**b + p**b) / b**2 if q > 0 else p**b / b**2
        if b == 0:
            return mp.inf if q == 0 else (p**a * a * (mp.log(p) - mp.log(q)) - p**a + q**a) / a**2 if p > 0 else q**a / a**2
        s = a + b
        return -(p**a * q**b - a / s * p**s - b / s * q**s) / (a * b)

    out = []
    for s_row, t_row in zip(student_logits.tolist(), teacher_logits.tolist()):
        p, q = distribution(t_row), distribution(s_row)
        out.append(float(sum(term(pk, qk) for pk, qk in zip(p, q))))
    return np.array(out)


# ---------------------------------------------------------------- α, β at and near 0

AB_NEAR_ZERO = [(1e-20, 1e-20), (0.0, 1e-20), (1e-20, 0.0), (1e-8, 3e-8), (1e-4, 0.5), (0.05, 0.07), (0.5, 1e-6),
                (2.0, 1e-3), (0.0, 0.3), (0.3, 0.0), (0.09, 0.2), (1e-300, 1e-300)]


@pytest.mark.parametrize(("alpha", "beta"), AB_NEAR_ZERO)
def test_alpha_beta_near_zero_matches_high_precision_arithmetic(alpha, beta):
    s, t = _pair()
    want = _ab_high_precision(s, t, alpha, beta)
    got = dv.functional.alpha_beta(s, t, alpha=alpha, beta=beta, reduction="none").numpy()
    np.testing.assert_allclose(got, want, rtol=1e-10)
    got32 = dv.functional.alpha_beta(s.float(), t.float(), alpha=alpha, beta=beta, reduction="none").numpy()
    np.testing.assert_allclose(got32, want, rtol=2e-5)


@pytest.mark.parametrize(("alpha", "beta"), [(1e-20, 1e-20), (1e-6, 0.0), (0.0, 1e-3), (0.02, 0.7), (1e-3, 1e-3)])
def test_alpha_beta_near_zero_with_zero_probabilities(alpha, beta):
    s, t = _pair(shape=(3, 12))
    t[:, 2:5] = INF  # p = 0
    s[:, 4:7] = INF  # q = 0 (class 4: both zero)
    want = _ab_high_precision(s, t, alpha, beta)
    got = dv.functional.alpha_beta(s, t, alpha=alpha, beta=beta, reduction="none").numpy()
    np.testing.assert_allclose(got, want, rtol=1e-10)


def test_alpha_beta_tends_to_its_log_forms():
    """Closed forms without mpmath: ½ Σ (log p − log q)² at (α, β) → 0, and the (0, β) / (α, 0) log forms."""
    s, t = _pair()
    p, q = probs(t.numpy()), probs(s.numpy())
    half_square = 0.5 * ((np.log(p) - np.log(q)) ** 2).sum(-1)
    F = dv.functional
    for scale in (1e-20, 1e-12):
        np.testing.assert_allclose(F.alpha_beta(s, t, alpha=scale, beta=3 * scale, reduction="none").numpy(),
                                   half_square, rtol=1e-10)
    b = 0.4
    log_form = (q**b * np.log(q**b / p**b) - q**b + p**b).sum(-1) / b**2
    np.testing.assert_allclose(F.alpha_beta(s, t, alpha=0.0, beta=b, reduction="none").numpy(), log_form, rtol=1e-12)
    np.testing.assert_allclose(F.alpha_beta(s, t, alpha=1e-14, beta=b, reduction="none").numpy(), log_form, rtol=1e-12)
    # from both sides of each special point, no jump
    for a, b in [(1e-9, 1.0), (1.0, 1e-9)]:
        limit = F.reverse_kl(s, t, reduction="none") if a < b else F.forward_kl(s, t, reduction="none")
        torch.testing.assert_close(F.alpha_beta(s, t, alpha=a, beta=b, reduction="none"), limit, rtol=1e-8, atol=0)


def test_alpha_at_and_near_its_ends():
    """α = 0 is reverse KL (inf where p = 0 < q), α → 0 tends to it, α → 1 to forward KL."""
    s, t = _pair()
    p, q = probs(t.numpy()), probs(s.numpy())
    F = dv.functional
    np.testing.assert_allclose(F.alpha(s, t, alpha=1e-20, reduction="none").numpy(), rel_entr(q, p).sum(-1), rtol=1e-12)
    np.testing.assert_allclose(F.alpha(s, t, alpha=1 - 1e-12, reduction="none").numpy(), rel_entr(p, q).sum(-1),
                               rtol=1e-9)
    t_zero = t.clone()
    t_zero[:, 0] = INF  # p = 0 < q: reverse KL is infinite
    assert torch.isinf(F.alpha(s, t_zero, alpha=0.0, reduction="none")).all()
    assert torch.isinf(F.alpha(s.float(), t_zero.float(), alpha=0.0, reduction="none")).all()
    near = F.alpha(s, t_zero, alpha=1e-20, reduction="none").numpy()  # (1 − Σ p^α q^(1−α))/(α(1−α)) ≈ q_0/α
    np.testing.assert_allclose(near, _ab_high_precision(s, t_zero, 1e-20, 1.0 - 1e-20), rtol=1e-10)
    assert (near > 1e17).all()
    # the student gives 0 where the teacher does not: reverse KL stays finite at α → 0
    s_zero = s.clone()
    s_zero[:, 0] = INF
    q_zero = probs(s_zero.numpy())
    for dtype in (torch.float64, torch.float32):
        got = F.alpha(s_zero.to(dtype), t.to(dtype), alpha=1e-20, reduction="none").double().numpy()
        np.testing.assert_allclose(got, rel_entr(q_zero, p).sum(-1), rtol=1e-6 if dtype == torch.float32 else 1e-12)


@pytest.mark.parametrize(("alpha", "beta"), [(1e-3, 2e-3), (0.0, 0.05), (0.05, 0.0), (1e-20, 1e-20)])
def test_alpha_beta_gradients_near_zero(alpha, beta):
    s, t = _pair(shape=(3, 5), scale=1.0)
    s.requires_grad_(True)
    t.requires_grad_(True)
    fn = lambda a, b: dv.functional.alpha_beta(a, b, alpha=alpha, beta=beta, reduction="none")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (s, t))


# ---------------------------------------------------------------- bdkd with a zero weight


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_bdkd_zero_weight_on_an_infinite_direction_gives_the_other(dtype):
    """A flat student (H(q) > H(p)) weights reverse KL high; reverse KL is infinite where p = 0 < q."""
    t = torch.tensor([[3.0, 0.0, 0.0, INF]], dtype=dtype)
    s = torch.zeros(1, 4, dtype=dtype, requires_grad=True)
    p, q = probs(t.double().numpy()), probs(s.detach().double().numpy())
    forward = rel_entr(p, q).sum()
    assert math.isinf(rel_entr(q, p).sum())
    value = dv.functional.bdkd(s, t, high_weight=0.0, low_weight=2.0)
    np.testing.assert_allclose(float(value.detach()), 2.0 * forward, rtol=1e-6)
    value.backward()
    assert torch.isfinite(s.grad).all()
    # the other way round: weight 0 on the finite direction leaves the infinite one
    assert math.isinf(float(dv.functional.bdkd(s.detach(), t, high_weight=1.0, low_weight=0.0)))


# ---------------------------------------------------------------- overflow is named


@pytest.mark.parametrize("name", dv.available())
def test_temperature_that_overflows_is_named(name):
    s, t = _pair(dtype=torch.float32)
    with pytest.raises(ValueError, match=r"(student|teacher)_logits / temperature \(temperature=1e-40\) overflows"):
        dv.divergence(name, s, t, temperature=1e-40)


@pytest.mark.parametrize("name", dv.available())
def test_logits_that_overflow_give_a_value_or_a_named_error(name):
    """Logits of ±1e38: either the divergence survives (no NaN) or a ValueError names the logits."""
    s, t = _pair(dtype=torch.float32)
    try:
        value = dv.divergence(name, s * 1e38, t * 1e38, reduction="none")
    except ValueError as exc:
        assert "_logits" in str(exc) and "bug" not in str(exc)
    else:
        assert not torch.isnan(value).any()


@pytest.mark.parametrize("epsilon", [1e-45, 1e-60])
def test_sinkhorn_epsilon_that_overflows_is_named(epsilon):
    s, t = _pair(dtype=torch.float32)
    with pytest.raises(ValueError, match=f"sinkhorn: epsilon={epsilon:g} is too small for torch.float32"):
        dv.functional.sinkhorn(s, t, epsilon=epsilon)
    assert torch.isfinite(dv.functional.sinkhorn(s.double(), t.double(), epsilon=1e-60))


# ---------------------------------------------------------------- TopK within its dtype's rounding


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("made", ["in float32, stored low", "computed low"])
def test_low_precision_topk_cache_at_k_equal_v_loads(dtype, made):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 1000, generator=g) * 3
    student = torch.randn(16, 1000, generator=g)
    stored = torch.log_softmax(logits, -1).to(dtype) if made.startswith("in") else torch.log_softmax(logits.to(dtype), -1)
    mass = torch.logsumexp(stored.double(), -1).exp()
    assert (mass > 1).any()  # the case this test is about: rounding put some rows above 1
    cache = dv.TopK(torch.arange(1000).expand(16, 1000), stored)
    # the stored values are the whole distribution: the divergence is that of its normalised form
    p, q = probs(stored.double().numpy()), probs(student.double().numpy())
    np.testing.assert_allclose(dv.functional.forward_kl(student, cache, reduction="none").numpy(),
                               rel_entr(p, q).sum(-1), rtol=1e-5)


def test_topk_slightly_above_one_at_k_below_v_has_an_empty_tail():
    top = torch.tensor([[-0.0001, -9.0]], dtype=torch.bfloat16)  # sums to 1.0000 + 1.2e-4 in bf16
    cache = dv.TopK(torch.tensor([[0, 1]]), top)
    student = torch.tensor([[1.0, 0.0, -1.0]], dtype=torch.float64)
    p = probs(top.double().numpy())  # the top k, scaled back to 1; nothing left for the tail
    q = probs(student.numpy())
    q_buckets = np.concatenate([q[:, :2], q[:, 2:].sum(-1, keepdims=True)], -1)
    want = rel_entr(np.concatenate([p, [[0.0]]], -1), q_buckets).sum(-1)
    np.testing.assert_allclose(dv.functional.forward_kl(student, cache, reduction="none").numpy(), want, rtol=1e-9)


def test_topk_still_refuses_what_rounding_does_not_explain():
    with pytest.raises(ValueError, match="up to 0.0078 above for the rounding of torch.bfloat16"):
        dv.TopK(torch.tensor([[0, 1]]), torch.tensor([[0.05, -3.0]], dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="sum to more than 1.*beyond the rounding of torch.bfloat16"):
        dv.TopK(torch.tensor([[0, 1]]), torch.tensor([[-0.5, -0.6]], dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="sum to more than 1"):
        dv.TopK(torch.tensor([[0, 1]]), torch.tensor([[-0.69, -0.69]]))  # float32: 1.003
    dv.TopK(torch.tensor([[0, 1]]), torch.tensor([[-0.6931, -0.6931]]))  # 1.00002: float32 rounding


# ---------------------------------------------------------------- teacher logits that require grad


def _plain_forward_kl(s, t, temperature):
    lp, lq = torch.log_softmax(t / temperature, -1), torch.log_softmax(s / temperature, -1)
    return (lp.exp() * (lp - lq)).sum(-1).mean()


def test_gradient_reaches_a_teacher_that_requires_grad():
    s, t = _pair()
    s.requires_grad_(True)
    t.requires_grad_(True)
    got = torch.autograd.grad(dv.functional.forward_kl(s, t, temperature=1.5), (s, t))
    want = torch.autograd.grad(_plain_forward_kl(s, t, 1.5), (s, t))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    # the loss modules pass it on, scaled as the loss is
    loss = dv.DistillationLoss("forward_kl", hard_weight=0.0, soft_weight=0.5, temperature=1.5)
    (teacher_grad,) = torch.autograd.grad(loss(s, t), t)
    torch.testing.assert_close(teacher_grad, 0.5 * 1.5**2 * want[1])
    # and a detached teacher gets none
    assert dv.functional.forward_kl(s, t.detach()).grad_fn is not None
    assert torch.autograd.grad(dv.functional.forward_kl(s, t.detach()), (s,))[0] is not None


def test_topk_logprobs_that_require_grad():
    """dv.divergence differentiates through the bucket log-probs; the fused loss refuses such a teacher."""
    s, t = _pair(shape=(3, 8))
    logprobs = torch.log_softmax(t, -1).topk(3, dim=-1)
    values = logprobs.values.clone().requires_grad_(True)

    def fn(v):
        return dv.functional.js(s, dv.TopK(logprobs.indices, v), reduction="none")

    assert torch.autograd.gradcheck(fn, (values,))
    x_s, w_s = torch.randn(3, 4, dtype=torch.float64), torch.randn(8, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="TopK teacher's logprobs require grad.*logprobs.detach\\(\\)"):
        fused_linear_distillation("js", x_s, w_s, None, dv.TopK(logprobs.indices, values))


# ---------------------------------------------------------------- no warnings in a normal run


@pytest.mark.parametrize("name", dv.available())
def test_no_warnings_forward_and_backward(name):
    s, t = _pair(dtype=torch.float32)
    s.requires_grad_(True)
    t.requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dv.divergence(name, s, t, temperature=2.0).backward()
        with torch.no_grad():
            float(dv.divergence(name, s, t))
        if dv.get_spec(name).accepts_topk:
            dv.divergence(name, s, dv.TopK.from_logits(t.detach(), k=3)).backward()
        if dv.get_spec(name).per_row:
            x_s = torch.randn(6, 3, requires_grad=True)
            loss = dv.LinearDistillationLoss(name, chunk_size=4)(x_s, torch.randn(9, 3), torch.randn(6, 2),
                                                                torch.randn(9, 2), torch.arange(6))
            loss.backward()
            float(loss.detach())


# ---------------------------------------------------------------- every input of the fused loss


def _fused_inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    x_s = torch.randn(6, 3, generator=g, dtype=dtype, requires_grad=True)
    w_s = torch.randn(9, 3, generator=g, dtype=dtype)
    x_t = torch.randn(6, 2, generator=g, dtype=dtype)
    w_t = torch.randn(9, 2, generator=g, dtype=dtype)
    labels = torch.tensor([0, 3, -100, 8, 1, 2])
    return x_s, w_s, x_t, w_t, labels


def _with(tensor, index, value):
    tensor = tensor.detach().clone()
    tensor.view(-1)[index] = value
    return tensor


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (lambda a: {**a, "labels": a["labels"] > 0}, TypeError, "labels must be an integer tensor.*got torch.bool"),
        (lambda a: {**a, "labels": a["labels"].float()}, TypeError, "labels must be an integer tensor"),
        (lambda a: {**a, "student_weight": _with(a["student_weight"], 4, float("nan"))}, ValueError,
         "student_weight holds 1 NaN or infinite value"),
        (lambda a: {**a, "teacher_weight": _with(a["teacher_weight"], 0, float("inf"))}, ValueError,
         "teacher_weight holds 1 NaN or infinite value"),
        (lambda a: {**a, "student_input": _with(a["student_input"], 2, float("-inf"))}, ValueError,
         "student_input holds 1 NaN or infinite value"),
        (lambda a: {**a, "teacher_input": _with(a["teacher_input"], 1, float("nan"))}, ValueError,
         "teacher_input holds 1 NaN"),
        (lambda a: {**a, "normalizer": float("inf")}, ValueError, "normalizer must be a finite number > 0"),
        (lambda a: {**a, "normalizer": 0}, ValueError, "normalizer must be a finite number > 0"),
        (lambda a: {**a, "normalizer": "12"}, TypeError, "normalizer must be a positive number, got str"),
        (lambda a: {**a, "temperature": "2"}, TypeError, "temperature must be a positive number, got str"),
        (lambda a: {**a, "temperature": 0.0}, ValueError, "temperature must be a finite number > 0"),
        (lambda a: {**a, "ignore_index": 1.5}, TypeError, "ignore_index must be an int"),
        (lambda a: {**a, "ignore_index": True}, TypeError, "ignore_index must be an int"),
        (lambda a: {**a, "hard_weight": True}, TypeError, "hard_weight must be a number ≥ 0, got bool"),
        (lambda a: {**a, "soft_weight": float("nan")}, ValueError, "soft_weight must be a finite number ≥ 0"),
        (lambda a: {**a, "hard_weight": float("inf")}, ValueError, "hard_weight must be a finite number ≥ 0"),
        (lambda a: {**a, "t2_scale": "yes"}, TypeError, "t2_scale must be True or False"),
        (lambda a: {**a, "student_input": a["student_input"].detach().double()}, TypeError,
         "student_input has dtype torch.float64 but student_weight has torch.float32"),
        (lambda a: {**a, "teacher_weight": a["teacher_weight"].bfloat16()}, TypeError,
         "teacher_input has dtype torch.float32 but teacher_weight has torch.bfloat16"),
        (lambda a: {**a, "student_weight": torch.empty(9, 3, device="meta")}, ValueError,
         "student_input is on cpu but student_weight is on meta"),
        (lambda a: {**a, "student_input": torch.empty(6, 3, device="meta"),
                    "student_weight": torch.empty(9, 3, device="meta")}, ValueError,
         "student_weight is on the meta device.*load its weights first"),
        (lambda a: {**a, "beta": 1.0}, ValueError, "js: parameter beta must be a number in \\(0, 1\\)"),
        (lambda a: {**a, "gamma": 1.0}, TypeError, "js got unexpected parameter\\(s\\) gamma"),
    ],
)
def test_fused_loss_checks_every_input(change, error, match):
    x_s, w_s, x_t, w_t, labels = _fused_inputs()
    arguments = dict(student_input=x_s, student_weight=w_s, teacher_input=x_t, teacher_weight=w_t, labels=labels,
                     hard_weight=0.5)
    with pytest.raises(error, match=match):
        fused_linear_distillation("js", **change(arguments))


def test_fused_loss_logits_that_overflow_are_named():
    x_s, w_s, x_t, w_t, labels = _fused_inputs()
    with pytest.raises(ValueError, match="student_logits contains NaN.*in the fused loss: student_logits = "
                                         "student_input @ student_weight.T, teacher_logits = .*tokens 0 to 5"):
        fused_linear_distillation("forward_kl", x_s * 1e30, w_s * 1e30, x_t, w_t, labels)
    with pytest.raises(ValueError, match="student_logits / temperature \\(temperature=1e-40\\) overflows"):
        fused_linear_distillation("js", x_s, w_s, x_t, w_t, labels, temperature=1e-40, t2_scale=False)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"beta": 1.0}, ValueError, "js: parameter beta must be a number in \\(0, 1\\)"),
        ({"gamma": 1.0}, TypeError, "js got unexpected parameter\\(s\\) gamma"),
        ({"hard_weight": True}, TypeError, "hard_weight must be a number ≥ 0, got bool"),
        ({"soft_weight": float("nan")}, ValueError, "soft_weight must be a finite number ≥ 0"),
        ({"hard_weight": float("inf")}, ValueError, "hard_weight must be a finite number ≥ 0"),
        ({"temperature": "2"}, TypeError, "temperature must be a positive number"),
        ({"t2_scale": 1}, TypeError, "t2_scale must be True or False"),
        ({"ignore_index": "x"}, TypeError, "ignore_index must be an int"),
        ({"vocab_size": 0}, ValueError, "vocab_size must be a positive int"),
        ({"chunk_size": 0}, ValueError, "chunk_size must be a positive int"),
        ({"accumulation_dtype": torch.int32}, TypeError, "accumulation_dtype must be a floating-point"),
    ],
)
def test_linear_distillation_loss_checks_its_settings_when_made(kwargs, error, match):
    with pytest.raises(error, match=match):
        dv.LinearDistillationLoss("js", **kwargs)


def test_constructed_loss_keeps_resolved_parameters():
    loss = dv.LinearDistillationLoss("alpha_beta", alpha=0.5)
    assert loss.params == {"alpha": 0.5, "beta": 0.7}
    assert loss.hard_weight == 0.5 and loss.temperature == 1.0


def test_distillation_loss_refuses_infinite_weights():
    with pytest.raises(ValueError, match="soft_weight must be a finite number ≥ 0, got inf"):
        dv.DistillationLoss("js", soft_weight=float("inf"))
    with pytest.raises(TypeError, match="hard_weight must be a number ≥ 0, got bool"):
        dv.DistillationLoss("js", hard_weight=False)
