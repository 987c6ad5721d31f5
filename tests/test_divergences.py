"""Every registered divergence against independent references and the property matrix."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import jensenshannon

import divergent as dv
from references import REFERENCES, probs

PER_ROW = [n for n in dv.available() if dv.get_spec(n).per_row]
SYMMETRIC = [n for n in dv.available() if dv.get_spec(n).symmetric == "yes"]


def _pair(shape=(6, 11), scale=2.0, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=dtype) * scale,
            torch.randn(shape, generator=g, dtype=dtype) * scale)


# ---------------------------------------------------------------- references


@pytest.mark.parametrize("name", sorted(REFERENCES))
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_matches_float64_reference(name, temperature):
    """Each divergence equals a direct float64 formula on probabilities."""
    fn, params = REFERENCES[name]
    s, t = _pair()
    got = dv.divergence(name, s, t, temperature=temperature, reduction="none", **params)
    want = fn(probs(t.numpy(), temperature), probs(s.numpy(), temperature), **params)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_float32_close_to_float64(name):
    fn, params = REFERENCES[name]
    s, t = _pair(dtype=torch.float32, scale=3.0)
    got = dv.divergence(name, s, t, reduction="none", **params)
    assert got.dtype == torch.float32
    want = fn(probs(t.double().numpy()), probs(s.double().numpy()), **params)
    np.testing.assert_allclose(got.numpy(), want, rtol=2e-4, atol=2e-5)


def test_js_half_is_scipy_jensenshannon_squared():
    """scipy's jensenshannon is sqrt(JSD) with β = 1/2 (natural log)."""
    s, t = _pair()
    got = dv.functional.js(s, t, beta=0.5, reduction="none").numpy()
    p, q = probs(t.numpy()), probs(s.numpy())
    want = np.array([jensenshannon(p[i], q[i]) ** 2 for i in range(len(p))])
    np.testing.assert_allclose(got, want, rtol=1e-8)


def test_sinkhorn_matches_pot_at_convergence():
    ot = pytest.importorskip("ot")
    s, t = _pair(shape=(7, 5), scale=1.5)
    for eps in (0.1, 0.5):
        got = dv.functional.sinkhorn(s, t, epsilon=eps, n_iters=2000)
        p, q = probs(t.numpy()), probs(s.numpy())
        cost = np.abs(q[:, None, :] - p[None, :, :]).sum(-1)
        n = len(p)
        want = ot.sinkhorn2(np.full(n, 1 / n), np.full(n, 1 / n), cost, eps, numItermax=100000, stopThr=1e-13)
        np.testing.assert_allclose(float(got), float(want), rtol=1e-6)


def test_sinkhorn_costs_and_single_row():
    """One row: the plan is the identity, so the value is the ground cost itself."""
    s, t = _pair(shape=(1, 9))
    p, q = probs(t.numpy())[0], probs(s.numpy())[0]
    assert math.isclose(float(dv.functional.sinkhorn(s, t)), np.abs(p - q).sum(), rel_tol=1e-9)
    assert math.isclose(float(dv.functional.sinkhorn(s, t, cost="l2")), np.linalg.norm(p - q), rel_tol=1e-9)
    assert math.isclose(float(dv.functional.sinkhorn(s, t, cost="sqeuclidean")), ((p - q) ** 2).sum(), rel_tol=1e-9)


def test_sinkhorn_permutation_closed_form():
    """Teacher rows = permuted student rows, small ε: OT matches each row to its copy, cost ≈ 0."""
    s, _ = _pair(shape=(5, 8), scale=3.0)
    t = s[torch.tensor([3, 0, 4, 1, 2])]
    assert float(dv.functional.sinkhorn(s, t, epsilon=0.01, n_iters=500)) < 1e-6
    # while the row-by-row l1 distance is large
    assert float(dv.functional.tvd(s, t)) > 0.1


# ---------------------------------------------------------------- properties


@pytest.mark.parametrize("name", dv.available())
def test_zero_when_equal(name):
    s, _ = _pair(dtype=torch.float32)
    value = dv.divergence(name, s, s.clone(), reduction="none")
    if name == "sinkhorn":  # the plan spreads mass over other rows at ε > 0
        value = dv.divergence(name, s, s.clone(), epsilon=1e-3, n_iters=200, reduction="none")
    assert value.abs().max() < 1e-5


@pytest.mark.parametrize("name", dv.available())
@pytest.mark.parametrize("seed", range(3))
def test_non_negative(name, seed):
    s, t = _pair(seed=seed, scale=4.0)
    assert (dv.divergence(name, s, t, reduction="none") >= -1e-12).all()


@pytest.mark.parametrize("name", SYMMETRIC)
def test_symmetric(name):
    s, t = _pair()
    torch.testing.assert_close(dv.divergence(name, s, t, reduction="none"), dv.divergence(name, t, s, reduction="none"))


def test_js_symmetric_at_half_not_elsewhere():
    s, t = _pair()
    torch.testing.assert_close(dv.functional.js(s, t, beta=0.5), dv.functional.js(t, s, beta=0.5))
    torch.testing.assert_close(dv.functional.js(s, t, beta=0.2), dv.functional.js(t, s, beta=0.8))
    assert not torch.isclose(dv.functional.js(s, t, beta=0.2), dv.functional.js(t, s, beta=0.2))


def test_forward_reverse_are_mirror_images():
    s, t = _pair()
    torch.testing.assert_close(dv.functional.forward_kl(s, t), dv.functional.reverse_kl(t, s))
    torch.testing.assert_close(dv.functional.skew_kl(s, t, alpha=0.3), dv.functional.skew_reverse_kl(t, s, alpha=0.3))


def test_js_tends_to_zero_at_ends_and_scaled_limits_are_kls():
    """JSD_β → 0 as β → 0 or 1; JSD_β/β → KL(p‖q) and JSD_β/(1−β) → KL(q‖p)."""
    s, t = _pair()
    fkl, rkl = dv.functional.forward_kl(s, t), dv.functional.reverse_kl(s, t)
    small = 1e-6
    torch.testing.assert_close(dv.functional.js(s, t, beta=small) / small, fkl, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(dv.functional.js(s, t, beta=1 - small) / small, rkl, rtol=1e-4, atol=1e-6)


def test_skew_at_zero_is_kl():
    s, t = _pair()
    torch.testing.assert_close(dv.functional.skew_kl(s, t, alpha=0.0), dv.functional.forward_kl(s, t))
    torch.testing.assert_close(dv.functional.skew_reverse_kl(s, t, alpha=0.0), dv.functional.reverse_kl(s, t))


def test_skew_kl_bounded_by_minus_log_alpha():
    s = torch.tensor([[0.0, -50.0, -50.0]], dtype=torch.float64)
    t = torch.tensor([[-50.0, 0.0, -50.0]], dtype=torch.float64)
    assert float(dv.functional.skew_kl(s, t, alpha=0.1)) <= -math.log(0.1) + 1e-9


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_alpha_beta_special_cases_and_continuity(dtype):
    s, t = _pair(dtype=dtype)
    F = dv.functional
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(F.alpha_beta(s, t, alpha=1.0, beta=0.0), F.forward_kl(s, t), **tol)
    torch.testing.assert_close(F.alpha_beta(s, t, alpha=0.0, beta=1.0), F.reverse_kl(s, t), **tol)
    torch.testing.assert_close(F.alpha_beta(s, t, alpha=0.3, beta=0.7), F.alpha(s, t, alpha=0.3), **tol)
    p, q = probs(t.double().numpy()), probs(s.double().numpy())
    # (0, 0) is the log form ½ Σ (log p − log q)²
    half_sq = 0.5 * ((np.log(p) - np.log(q)) ** 2).sum(-1)
    np.testing.assert_allclose(F.alpha_beta(s, t, alpha=0.0, beta=0.0, reduction="none").double().numpy(), half_sq,
                               rtol=1e-5)
    # near every special point the value matches the general formula (float64 numpy,
    # where its cancellation is still harmless) — no jump at the boundaries
    from references import alpha_beta as general

    for a, b in [(1.0, 1e-4), (1e-4, 1.0), (0.5, 1e-5), (1e-3, 1e-3), (0.01, 0.02), (1e-4, 2e-4)]:
        near = F.alpha_beta(s, t, alpha=a, beta=b, reduction="none").double().numpy()
        np.testing.assert_allclose(near, general(p, q, a, b), rtol=2e-4 if dtype == torch.float32 else 1e-6)
    # and the values converge to the limits as the parameters approach them
    for a, b, limit in [(1.0, 1e-7, F.forward_kl(s, t)), (1e-7, 1.0, F.reverse_kl(s, t)),
                        (1e-7, 1e-7, torch.tensor(half_sq.mean(), dtype=dtype))]:
        torch.testing.assert_close(F.alpha_beta(s, t, alpha=a, beta=b), limit, rtol=1e-4, atol=1e-5)


def test_alpha_beta_alpha_only_limit_exact():
    """(α, 0): 1/α² Σ [p^α log(p^α/q^α) − p^α + q^α], computed directly."""
    s, t = _pair()
    p, q = probs(t.numpy()), probs(s.numpy())
    a = 0.6
    want = (p**a * np.log(p**a / q**a) - p**a + q**a).sum(-1) / a**2
    np.testing.assert_allclose(dv.functional.alpha_beta(s, t, alpha=a, beta=0.0, reduction="none").numpy(), want,
                               rtol=1e-9)


@pytest.mark.parametrize("a", [1e-7, 1 - 1e-7])
def test_alpha_divergence_limits(a):
    s, t = _pair()
    F = dv.functional
    target = F.reverse_kl(s, t) if a < 0.5 else F.forward_kl(s, t)
    torch.testing.assert_close(F.alpha(s, t, alpha=a), target, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(F.alpha(s, t, alpha=round(a)), target)


def test_hellinger_at_half_alpha():
    """Amari α = ½ is 4 × squared Hellinger (with the ½ convention): 4·(1 − Σ√(pq))/... = 4H²·... ."""
    s, t = _pair()
    torch.testing.assert_close(dv.functional.alpha(s, t, alpha=0.5), 4 * dv.functional.hellinger(s, t))


@pytest.mark.parametrize("seed", range(5))
def test_pinsker_inequality(seed):
    """TVD ≤ sqrt(KL/2) (Pinsker), row by row."""
    s, t = _pair(seed=seed, scale=3.0)
    tv = dv.functional.tvd(s, t, reduction="none")
    kl = dv.functional.forward_kl(s, t, reduction="none")
    assert (tv <= torch.sqrt(kl / 2) + 1e-12).all()


def test_bdkd_weights_follow_entropy_gap():
    t = torch.tensor([[3.0, 0.0, 0.0, 0.0]], dtype=torch.float64)  # confident teacher
    flat_student = torch.zeros(1, 4, dtype=torch.float64)  # H(q) > H(p)
    sharp_student = torch.tensor([[9.0, 0.0, 0.0, 0.0]], dtype=torch.float64)  # H(q) < H(p)
    F = dv.functional
    torch.testing.assert_close(F.bdkd(flat_student, t), F.forward_kl(flat_student, t) + 3 * F.reverse_kl(flat_student, t))
    torch.testing.assert_close(F.bdkd(sharp_student, t), 3 * F.forward_kl(sharp_student, t) + F.reverse_kl(sharp_student, t))


# ---------------------------------------------------------------- zeros and extremes


def test_zero_probability_classes():
    """−inf logits are probability 0: 0·log 0 = 0; a truly infinite divergence is inf."""
    inf = float("-inf")
    t = torch.tensor([[0.0, 1.0, inf]], dtype=torch.float64)
    s = torch.tensor([[0.5, 0.0, 1.0]], dtype=torch.float64)
    p, q = probs([0.0, 1.0, -np.inf]), probs([0.5, 0.0, 1.0])
    F = dv.functional
    assert math.isclose(float(F.forward_kl(s, t)), rel_entr_sum(p, q), rel_tol=1e-12)
    assert float(F.reverse_kl(s, t)) == math.inf
    assert math.isfinite(float(F.js(s, t))) and math.isfinite(float(F.skew_reverse_kl(s, t)))
    assert float(F.chi2(t, s)) == math.inf  # q = 0 where p > 0
    both = torch.tensor([[0.0, 1.0, inf]], dtype=torch.float64)
    for name in dv.available():
        value = dv.divergence(name, both, both.clone())
        assert float(value) == pytest.approx(0.0, abs=1e-9), name


def rel_entr_sum(p, q):
    from scipy.special import rel_entr

    return float(rel_entr(p, q).sum())


@pytest.mark.parametrize("name", dv.available())
def test_gradients_finite_with_shared_zero_classes(name):
    """A class with probability 0 under both models contributes no NaN to the gradient."""
    inf = float("-inf")
    s = torch.tensor([[0.3, inf, 1.0, -0.5], [1.0, 0.0, inf, 2.0]], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([[1.0, inf, 0.2, 0.1], [0.5, 0.3, inf, 1.0]], dtype=torch.float64, requires_grad=True)
    value = dv.divergence(name, s, t)
    value.backward()
    for g in (s.grad, t.grad):
        assert torch.isfinite(g).all(), (name, g)


@pytest.mark.parametrize("name", dv.available())
def test_extreme_logits_finite(name):
    s = torch.tensor([[1e4, -1e4, 0.0, 5e3], [-1e4, 1e4, 1e4, 0.0]])
    t = torch.tensor([[1e4, -1e4, 1.0, 5e3], [0.0, 1e4, 1e4, -1e4]])
    value = dv.divergence(name, s, t, reduction="none")
    assert not torch.isnan(value).any()
    if dv.get_spec(name).bounded != "no":  # a bounded divergence stays finite
        assert torch.isfinite(value).all(), (name, value)


# ---------------------------------------------------------------- autograd, dtypes, shapes


@pytest.mark.parametrize("name", dv.available())
def test_gradcheck_float64(name):
    s, t = _pair(shape=(3, 5), scale=1.0)
    s.requires_grad_(True)
    t.requires_grad_(True)
    params = {"n_iters": 5} if name == "sinkhorn" else {}
    fn = lambda a, b: dv.divergence(name, a, b, temperature=1.7, reduction="none", **params)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (s, t))
    s_only = lambda a: dv.divergence(name, a, t.detach(), temperature=0.8, reduction="none", **params)  # noqa: E731
    assert torch.autograd.gradcheck(s_only, (s,))


def test_double_backward_is_refused_not_wrong():
    """The closed-form backward is first-order only: asking for a second derivative raises."""
    s, t = _pair(shape=(2, 4))
    s.requires_grad_(True)
    (g,) = torch.autograd.grad(dv.functional.js(s, t), s, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|differentiate|does not require grad"):
        torch.autograd.grad(g.sum(), s)


@pytest.mark.parametrize("name", dv.available())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_computed_in_float32(name, dtype):
    s, t = _pair(dtype=torch.float32, scale=2.0)
    s_half, t_half = s.to(dtype), t.to(dtype)
    got = dv.divergence(name, s_half, t_half, reduction="none")
    assert got.dtype == torch.float32
    want = dv.divergence(name, s_half.double(), t_half.double(), reduction="none")
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", dv.available())
def test_grad_output_not_one(name):
    """Backward with an upstream gradient ≠ 1 scales like the reference per-row gradient."""
    s, t = _pair(shape=(4, 7))
    s.requires_grad_(True)
    rows = dv.divergence(name, s, t, reduction="none")
    weights = torch.tensor([0.5, -2.0, 3.0, 0.0], dtype=torch.float64)
    (grad,) = torch.autograd.grad(rows, s, grad_outputs=weights)
    if dv.get_spec(name).per_row:
        for i in range(4):
            (g_i,) = torch.autograd.grad(dv.divergence(name, s[i : i + 1], t[i : i + 1]), s)
            torch.testing.assert_close(grad[i], weights[i] * g_i[i])
    else:
        rows = dv.divergence(name, s, t, reduction="none")
        (g_sum,) = torch.autograd.grad((rows * weights).sum(), s)
        torch.testing.assert_close(grad, g_sum)


@pytest.mark.parametrize("name", PER_ROW)
@pytest.mark.parametrize("shape", [(7,), (1, 1), (2, 3, 5), (3, 1, 2, 4)])
def test_odd_shapes(name, shape):
    s, t = _pair(shape=shape)
    rows = dv.divergence(name, s, t, reduction="none")
    assert rows.shape == shape[:-1]
    flat = dv.divergence(name, s.reshape(-1, shape[-1]), t.reshape(-1, shape[-1]), reduction="none")
    torch.testing.assert_close(rows.reshape(-1), flat)


def test_single_class_is_zero():
    s, t = _pair(shape=(3, 1))
    for name in dv.available():
        assert float(dv.divergence(name, s, t)) == pytest.approx(0.0, abs=1e-12)


# ---------------------------------------------------------------- masks and reductions


@pytest.mark.parametrize("name", dv.available())
def test_mask_and_reductions(name):
    s, t = _pair(shape=(2, 5, 6))
    mask = torch.tensor([[True, False, True, True, False], [False, True, True, False, True]])
    rows = dv.divergence(name, s, t, mask=mask, reduction="none")
    assert rows.shape == (2, 5)
    assert (rows[~mask] == 0).all()
    dense = dv.divergence(name, s[mask], t[mask], reduction="none")
    torch.testing.assert_close(rows[mask], dense)
    total = dv.divergence(name, s, t, mask=mask, reduction="sum")
    torch.testing.assert_close(total, dense.sum())
    torch.testing.assert_close(dv.divergence(name, s, t, mask=mask), dense.mean())
    torch.testing.assert_close(dv.divergence(name, s, t, mask=mask, normalizer=20), dense.sum() / 20)
    torch.testing.assert_close(dv.divergence(name, s, t, mask=mask, normalizer=torch.tensor(20.0)), dense.sum() / 20)


@pytest.mark.parametrize("name", dv.available())
def test_all_masked_is_zero_with_valid_gradient(name):
    s, t = _pair(shape=(3, 4))
    s.requires_grad_(True)
    value = dv.divergence(name, s, t, mask=torch.zeros(3, dtype=torch.bool))
    assert float(value.detach()) == 0.0
    value.backward()
    assert torch.equal(s.grad, torch.zeros_like(s))


def test_masked_rows_are_not_inspected():
    """A padding row of NaNs excluded by the mask does not raise."""
    s, t = _pair(shape=(3, 4))
    s[1] = float("nan")
    mask = torch.tensor([True, False, True])
    assert torch.isfinite(dv.functional.forward_kl(s, t, mask=mask))


# ---------------------------------------------------------------- TopK


@pytest.mark.parametrize("name", [n for n in dv.available() if dv.get_spec(n).accepts_topk])
def test_topk_with_all_classes_equals_dense(name):
    s, t = _pair(shape=(2, 3, 6))
    sparse = dv.TopK.from_logits(t, k=6)
    torch.testing.assert_close(dv.divergence(name, s, sparse, reduction="none"),
                               dv.divergence(name, s, t, reduction="none"))
    torch.testing.assert_close(dv.divergence(name, s, sparse, temperature=2.0, reduction="none"),
                               dv.divergence(name, s, t, temperature=2.0, reduction="none"))


F_DIVERGENCES = ["forward_kl", "reverse_kl", "js", "tvd", "skew_kl", "skew_reverse_kl", "alpha", "hellinger", "chi2"]


@pytest.mark.parametrize("name", F_DIVERGENCES)
@pytest.mark.parametrize("k", [1, 3, 5])
def test_topk_is_a_coarsening(name, k):
    """Merging classes never increases an f-divergence (data processing inequality).

    (bdkd re-chooses its weights on the buckets and cauchy_schwarz is no f-divergence,
    so neither is covered by the inequality.)"""
    s, t = _pair(shape=(5, 9), scale=2.0)
    sparse = dv.TopK.from_logits(t, k=k)
    assert (dv.divergence(name, s, sparse, reduction="none") <= dv.divergence(name, s, t, reduction="none") + 1e-10).all()


def test_topk_buckets_against_numpy():
    s, t = _pair(shape=(4, 8))
    k = 3
    sparse = dv.TopK.from_logits(t, k=k)
    p, q = probs(t.numpy()), probs(s.numpy())
    idx = sparse.indices.numpy()
    p_b = np.concatenate([np.take_along_axis(p, idx, -1), 1 - np.take_along_axis(p, idx, -1).sum(-1, keepdims=True)], -1)
    q_b = np.concatenate([np.take_along_axis(q, idx, -1), 1 - np.take_along_axis(q, idx, -1).sum(-1, keepdims=True)], -1)
    from references import forward_kl as ref_fkl

    np.testing.assert_allclose(dv.functional.forward_kl(s, sparse, reduction="none").numpy(), ref_fkl(p_b, q_b), rtol=1e-9)


def test_topk_gradient_reaches_student():
    s, t = _pair(shape=(4, 8))
    s.requires_grad_(True)
    dv.functional.js(s, dv.TopK.from_logits(t, k=2)).backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


def test_topk_errors():
    s, t = _pair(shape=(4, 8))
    sparse = dv.TopK.from_logits(t, k=2)
    with pytest.raises(ValueError, match="sinkhorn does not accept a TopK"):
        dv.functional.sinkhorn(s, sparse)
    with pytest.raises(ValueError, match="do not match"):
        dv.functional.forward_kl(s[:2], sparse)
    with pytest.raises(ValueError, match="vocabulary size 8"):
        dv.functional.forward_kl(s, dv.TopK(torch.full((4, 1), 9), torch.full((4, 1), -0.1, dtype=torch.float64)))
    with pytest.raises(TypeError, match="integer"):
        dv.TopK(torch.zeros(4, 2), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="repeated index"):
        dv.TopK(torch.tensor([[1, 1]]), torch.tensor([[-1.0, -2.0]]))
    with pytest.raises(ValueError, match="log-probabilities"):
        dv.TopK(torch.tensor([[1, 2]]), torch.tensor([[1.0, -2.0]]))
    with pytest.raises(ValueError, match="more than 1"):
        dv.TopK(torch.tensor([[1, 2]]), torch.tensor([[-0.1, -0.2]]))
    with pytest.raises(ValueError, match="same shape"):
        dv.TopK(torch.tensor([[1, 2]]), torch.tensor([[-1.0]]))


# ---------------------------------------------------------------- bad input


def test_bad_input_errors():
    s, t = _pair(shape=(4, 8), dtype=torch.float32)
    F = dv.functional
    with pytest.raises(ValueError, match="vocabulary size 8 but teacher_logits has 9"):
        F.forward_kl(s, torch.randn(4, 9))
    with pytest.raises(ValueError, match="same shape"):
        F.forward_kl(s, torch.randn(3, 8))
    with pytest.raises(ValueError, match="student_logits contains NaN"):
        F.forward_kl(torch.full((4, 8), float("nan")), t)
    with pytest.raises(ValueError, match="teacher_logits contains \\+inf"):
        F.forward_kl(s, torch.full((4, 8), float("inf")))
    with pytest.raises(ValueError, match="all -inf"):
        F.forward_kl(s, torch.full((4, 8), float("-inf")))
    with pytest.raises(ValueError, match="temperature must be a finite number > 0, got 0.0"):
        F.forward_kl(s, t, temperature=0.0)
    with pytest.raises(TypeError, match="temperature"):
        F.forward_kl(s, t, temperature="2")
    with pytest.raises(ValueError, match="open interval \\(0, 1\\).*forward_kl.*reverse_kl"):
        F.js(s, t, beta=0.0)
    with pytest.raises(ValueError, match="open interval"):
        F.js(s, t, beta=1.0)
    with pytest.raises(ValueError, match="alpha must be a number in \\[0, 1\\)"):
        F.skew_kl(s, t, alpha=1.0)
    with pytest.raises(ValueError, match="alpha must be a number in \\[0, inf\\]"):
        F.alpha_beta(s, t, alpha=-0.5, beta=1.0)
    with pytest.raises(ValueError, match="unknown divergence 'kl'; valid names: forward_kl, reverse_kl"):
        dv.divergence("kl", s, t)
    with pytest.raises(TypeError, match="unexpected parameter.*valid parameters: beta"):
        dv.divergence("js", s, t, alpha=0.3)
    with pytest.raises(ValueError, match="reduction must be one of"):
        F.forward_kl(s, t, reduction="avg")
    with pytest.raises(TypeError, match="floating-point logits"):
        F.forward_kl(s.long(), t)
    with pytest.raises(TypeError, match="torch.Tensor"):
        F.forward_kl(s.numpy(), t)
    with pytest.raises(ValueError, match="mask must have shape"):
        F.forward_kl(s, t, mask=torch.ones(8, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask must have dtype torch.bool"):
        F.forward_kl(s, t, mask=torch.ones(4))
    with pytest.raises(ValueError, match="normalizer"):
        F.forward_kl(s, t, normalizer=0)
    with pytest.raises(ValueError, match="normalizer replaces"):
        F.forward_kl(s, t, reduction="sum", normalizer=3)
    with pytest.raises(ValueError, match="cost must be one of"):
        F.sinkhorn(s, t, cost="l3")
    with pytest.raises(ValueError, match="n_iters must be an integer"):
        F.sinkhorn(s, t, n_iters=2.5)


@pytest.mark.parametrize("a, b", [(1.0, 0.0), (0.0, 1.0), (1.5, 0.0), (0.0, 0.5), (0.3, 0.7), (0.2, 0.7)])
def test_alpha_beta_with_zero_classes_matches_log_forms(a, b):
    """Zero-probability classes on one side or both: each term takes its limit (no NaN, no dropped term)."""
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(4, 50, generator=g, dtype=torch.float64) * 3, torch.randn(4, 50, generator=g, dtype=torch.float64) * 3
    t[:, 10:30] = float("-inf")
    s[:, 10:20] = float("-inf")
    p, q = probs(t.numpy()), probs(s.numpy())
    with np.errstate(all="ignore"):
        if b == 0.0:
            terms = np.where(p > 0, p**a * np.log(p**a / q**a), 0.0) - p**a + q**a
            want = terms.sum(-1) / a**2
        elif a == 0.0:
            terms = np.where(q > 0, q**b * np.log(q**b / p**b), 0.0) - q**b + p**b
            want = terms.sum(-1) / b**2
        else:
            from references import alpha_beta as general

            want = general(p, q, a, b)
    got = dv.functional.alpha_beta(s, t, alpha=a, beta=b, reduction="none").numpy()
    np.testing.assert_allclose(got, want, rtol=1e-9)


def test_sinkhorn_plain_and_log_domain_iterations_agree(monkeypatch):
    """Plain scalings (used when W/ε < 30) and log-domain ones give the same value and gradient."""
    from divergent.functional import _math

    s, t = _pair(shape=(6, 9), scale=1.5)
    s.requires_grad_(True)
    plain = dv.functional.sinkhorn(s, t, epsilon=0.2, n_iters=15)
    (g_plain,) = torch.autograd.grad(plain, s)
    monkeypatch.setattr(_math, "_PLAIN_SINKHORN_LIMIT", 0.0)  # force the log domain
    logd = dv.functional.sinkhorn(s, t, epsilon=0.2, n_iters=15)
    (g_log,) = torch.autograd.grad(logd, s)
    torch.testing.assert_close(plain, logd)
    torch.testing.assert_close(g_plain, g_log)
    # a tiny ε takes the log domain on its own and stays finite
    assert torch.isfinite(dv.functional.sinkhorn(s, t, epsilon=1e-3, n_iters=50))
