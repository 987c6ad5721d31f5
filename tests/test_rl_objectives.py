"""Tests for divergent.rl: KL estimators, GRPO, DPH generators, KDRL, filtering.

References are independent of the code under test: closed forms, scipy's
``rel_entr`` for exact KL, and ``divergent.divergence`` (the functional layer)
for the exact divergences the estimators and generators target.
"""

import math

import numpy as np
import pytest
import torch
from scipy.special import rel_entr

from divergent.rl import (
    BalancedBatch,
    accuracy_band_mask,
    f_generator,
    group_advantages,
    kdrl_coefficient,
    kdrl_kd_loss,
    kl_estimator,
    masked_token_mean,
    ppo_clip_loss,
    token_logprobs,
)


def _functional_divergence():
    """divergent.divergence once the core lands; tests using it skip before that."""
    import divergent as dv

    if not hasattr(dv, "divergence"):
        pytest.skip("divergent.divergence is not available yet")
    return dv.divergence


# ---------------------------------------------------------------- estimators


def _sample_estimates(kind, n=400_000, vocab=7, seed=0):
    gen = torch.Generator().manual_seed(seed)
    policy_logits = torch.randn(vocab, generator=gen, dtype=torch.float64)
    ref_logits = torch.randn(vocab, generator=gen, dtype=torch.float64)
    logq = torch.log_softmax(policy_logits, -1)
    logp = torch.log_softmax(ref_logits, -1)
    tokens = torch.multinomial(logq.exp(), n, replacement=True, generator=gen)
    values = kl_estimator(logq[tokens], logp[tokens], kind)
    exact = float(rel_entr(logq.exp().numpy(), logp.exp().numpy()).sum())  # KL(q || p)
    return values, exact, policy_logits, ref_logits


@pytest.mark.parametrize("kind", ["k1", "k3"])
def test_unbiased_estimators_match_exact_reverse_kl(kind):
    """k1 and k3 averaged over tokens sampled from the policy converge to KL(policy || ref)."""
    values, exact, _, _ = _sample_estimates(kind)
    standard_error = float(values.std()) / math.sqrt(values.numel())
    assert abs(float(values.mean()) - exact) < 5 * standard_error + 1e-6


def test_k2_is_biased():
    """k2 = (log r)^2 / 2 does not average to the KL (it is biased), but is close for near distributions."""
    values, exact, _, _ = _sample_estimates("k2")
    standard_error = float(values.std()) / math.sqrt(values.numel())
    assert abs(float(values.mean()) - exact) > 10 * standard_error


def test_estimator_mean_matches_functional_reverse_kl():
    """The exact target of k1/k3 is the library's own reverse_kl (student = policy, teacher = reference)."""
    divergence = _functional_divergence()
    values, exact, policy_logits, ref_logits = _sample_estimates("k3", seed=1)
    library = float(divergence("reverse_kl", policy_logits[None], ref_logits[None]))
    assert library == pytest.approx(exact, rel=1e-6)
    standard_error = float(values.std()) / math.sqrt(values.numel())
    assert abs(float(values.mean()) - library) < 5 * standard_error


def test_estimators_closed_forms_and_signs():
    logp = torch.tensor([-1.0, -2.0, -0.5])
    ref = torch.tensor([-1.0, -1.0, -2.0])
    log_r = logp - ref
    torch.testing.assert_close(kl_estimator(logp, ref, "k1"), log_r)
    torch.testing.assert_close(kl_estimator(logp, ref, "k2"), 0.5 * log_r**2)
    torch.testing.assert_close(kl_estimator(logp, ref, "k3"), torch.exp(-log_r) + log_r - 1)
    assert (kl_estimator(logp, ref, "k3") >= 0).all()
    assert kl_estimator(logp, ref, "k3")[0] == 0


def test_k3_accurate_near_zero():
    """At a log-ratio of 1e-6, k3 ~ (log r)^2 / 2 = 5e-13 and must not round to 0 or go negative."""
    value = kl_estimator(torch.tensor([1e-6], dtype=torch.float64), torch.tensor([0.0], dtype=torch.float64), "k3")
    assert float(value) == pytest.approx(5e-13, rel=1e-4)


def test_estimator_bad_input():
    with pytest.raises(ValueError, match="kind"):
        kl_estimator(torch.zeros(2), torch.zeros(2), "k4")
    with pytest.raises(ValueError, match="shape"):
        kl_estimator(torch.zeros(2), torch.zeros(3), "k1")
    with pytest.raises(TypeError, match="logp"):
        kl_estimator(torch.zeros(2, dtype=torch.long), torch.zeros(2), "k1")


def test_token_logprobs_matches_log_softmax():
    logits = torch.randn(3, 5, 11, dtype=torch.float64)
    tokens = torch.randint(0, 11, (3, 5))
    expected = torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1)
    torch.testing.assert_close(token_logprobs(logits, tokens), expected)
    assert token_logprobs(logits.to(torch.bfloat16), tokens).dtype == torch.float32
    with pytest.raises(ValueError, match="tokens"):
        token_logprobs(logits, tokens[:, :2])


# ---------------------------------------------------------------- GRPO


def test_group_advantages_closed_form():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0], [3.0, 1.0, 2.0, 2.0]])
    for std, ddof in (("sample", 1), ("population", 0)):
        adv = group_advantages(rewards, eps=1e-12, std=std)
        expected = (rewards.numpy() - rewards.numpy().mean(1, keepdims=True)) / (
            rewards.numpy().std(1, ddof=ddof, keepdims=True) + 1e-12
        )
        expected[1] = 0.0
        np.testing.assert_allclose(adv.numpy(), expected, rtol=1e-6, atol=1e-6)
        assert torch.isfinite(adv).all()
    # The default is the sample (Bessel-corrected) standard deviation.
    torch.testing.assert_close(group_advantages(rewards), group_advantages(rewards, std="sample"))
    centred = group_advantages(rewards, scale=False)
    torch.testing.assert_close(centred.sum(1), torch.zeros(3))


def test_group_advantages_bad_input():
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.zeros(3, 1))
    with pytest.raises(ValueError, match="shape"):
        group_advantages(torch.zeros(3))
    with pytest.raises(ValueError, match="std must be 'sample'.*got 'bessel'"):
        group_advantages(torch.zeros(3, 2), std="bessel")


def test_ppo_clip_on_policy_is_policy_gradient():
    """With old = current policy the ratio is 1; the gradient is -A * grad log pi averaged over tokens."""
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.7, -9.0]], requires_grad=True)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    adv = torch.tensor([1.0, -2.0])
    loss, stats = ppo_clip_loss(logp, logp.detach(), adv, mask)
    loss.backward()
    expected_grad = -(adv[:, None] * mask) / mask.sum()
    torch.testing.assert_close(logp.grad, expected_grad)
    assert float(loss.detach()) == pytest.approx(-(1 * 3 - 2 * 2) / 5)
    assert stats["clip_fraction"] == 0.0


def test_ppo_clip_clips_in_the_direction_of_the_advantage():
    """A ratio of e^1 with positive advantage is clipped at 1.2 (no gradient); with negative it is not."""
    old = torch.zeros(1, 2)
    logp = torch.ones(1, 2, requires_grad=True)
    mask = torch.ones(1, 2, dtype=torch.bool)
    loss, stats = ppo_clip_loss(logp, old, torch.tensor([1.0]), mask, clip_eps=0.2)
    loss.backward()
    assert float(loss.detach()) == pytest.approx(-1.2)
    assert torch.all(logp.grad == 0)
    assert stats["clip_fraction"] == 1.0
    logp.grad = None
    loss, _ = ppo_clip_loss(logp, old, torch.tensor([-1.0]), mask, clip_eps=0.2)
    loss.backward()
    assert float(loss.detach()) == pytest.approx(math.e)
    torch.testing.assert_close(logp.grad, torch.full((1, 2), math.e / 2))


def test_masked_token_mean_all_masked_is_zero_with_grad():
    values = torch.randn(2, 3, requires_grad=True)
    out = masked_token_mean(values, torch.zeros(2, 3, dtype=torch.bool))
    out.backward()
    assert float(out.detach()) == 0.0 and torch.all(values.grad == 0)
    assert float(masked_token_mean(torch.ones(2, 3), torch.ones(2, 3, dtype=torch.bool), normalizer=12)) == 0.5


# ---------------------------------------------------------------- DPH generators


def _two_distributions(vocab=9, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(vocab, generator=gen, dtype=torch.float64), torch.randn(vocab, generator=gen, dtype=torch.float64)


def _pi0_expectation(divergence, policy_logits, initial_logits, **kw):
    """sum_y pi_0(y) f(pi_theta(y) / pi_0(y)) — the exact expectation over rehearsal tokens."""
    log_theta = torch.log_softmax(policy_logits, -1)
    log_0 = torch.log_softmax(initial_logits, -1)
    return float((log_0.exp() * f_generator(log_theta - log_0, divergence, **kw)).sum())


def test_forward_kl_generator_expectation_is_kl_pi0_pitheta():
    theta, initial = _two_distributions()
    q, p = torch.softmax(theta, -1).numpy(), torch.softmax(initial, -1).numpy()
    assert _pi0_expectation("forward_kl", theta, initial) == pytest.approx(rel_entr(p, q).sum(), rel=1e-10)


def test_js_generator_expectation_is_twice_jsd():
    theta, initial = _two_distributions(seed=1)
    q, p = torch.softmax(theta, -1).numpy(), torch.softmax(initial, -1).numpy()
    m = 0.5 * (p + q)
    jsd = 0.5 * rel_entr(p, m).sum() + 0.5 * rel_entr(q, m).sum()
    assert _pi0_expectation("js", theta, initial) == pytest.approx(2 * jsd, rel=1e-10)


def test_alpha_generator_expectation_is_amari_alpha():
    theta, initial = _two_distributions(seed=2)
    q, p = torch.softmax(theta, -1).numpy(), torch.softmax(initial, -1).numpy()
    alpha = 0.2
    amari = (1 - (p**alpha * q ** (1 - alpha)).sum()) / (alpha * (1 - alpha))
    assert _pi0_expectation("alpha", theta, initial, alpha=alpha) == pytest.approx(amari, rel=1e-10)


def test_generator_expectations_match_functional_layer():
    divergence = _functional_divergence()
    theta, initial = _two_distributions(seed=3)
    student, teacher = theta[None], initial[None]
    assert _pi0_expectation("forward_kl", theta, initial) == pytest.approx(
        float(divergence("forward_kl", student, teacher)), rel=1e-8
    )
    assert _pi0_expectation("js", theta, initial) == pytest.approx(
        2 * float(divergence("js", student, teacher, beta=0.5)), rel=1e-8
    )
    assert _pi0_expectation("alpha", theta, initial, alpha=0.2) == pytest.approx(
        float(divergence("alpha", student, teacher, alpha=0.2)), rel=1e-8
    )


@pytest.mark.parametrize("name", ["forward_kl", "js", "alpha"])
def test_generators_pointwise_closed_form_and_nonnegative(name):
    log_u = torch.linspace(-6, 6, 101, dtype=torch.float64)
    u = log_u.exp()
    a = 0.2
    closed = {
        "forward_kl": u - torch.log(u) - 1,
        "js": u * torch.log(u) - (u + 1) * torch.log((u + 1) / 2),
        "alpha": (u ** (1 - a) - (1 - a) * u - a) / (a * (a - 1)),
    }[name]
    values = f_generator(log_u, name, alpha=a)
    torch.testing.assert_close(values, closed, rtol=1e-9, atol=1e-12)
    assert (values >= -1e-15).all() and abs(float(values[50])) < 1e-20


@pytest.mark.parametrize("name", ["forward_kl", "js", "alpha"])
def test_generators_finite_at_extreme_ratios(name):
    """Float32 log-ratios of +-60 give finite values and gradients; near 0 they are accurate."""
    log_u = torch.tensor([-60.0, -1e-4, 0.0, 1e-4, 60.0], requires_grad=True)
    values = f_generator(log_u, name)
    values.sum().backward()
    assert torch.isfinite(values).all() and torch.isfinite(log_u.grad).all()
    small = f_generator(torch.tensor([1e-4], dtype=torch.float64), name)
    # f(1) = f'(1) = 0, so f(e^l) ~ f''(1) l^2 / 2 near 0 (f''(1) = 1 for forward_kl and alpha, 1/2 for js).
    curvature = 0.5 if name == "js" else 1.0
    assert float(small) == pytest.approx(curvature * 1e-8 / 2, rel=1e-3)


def test_generator_bad_input():
    with pytest.raises(ValueError, match="divergence"):
        f_generator(torch.zeros(1), "reverse_kl")
    with pytest.raises(ValueError, match="alpha"):
        f_generator(torch.zeros(1), "alpha", alpha=1.0)


# ---------------------------------------------------------------- KDRL


def test_kdrl_coefficient_anneals_to_floor():
    values = [kdrl_coefficient(t, beta0=0.05, delta=0.01, beta_min=0.02) for t in range(6)]
    assert values == pytest.approx([0.05, 0.04, 0.03, 0.02, 0.02, 0.02])


def test_kdrl_reward_guided_masking_drops_correct_responses():
    student = torch.tensor([[-1.0, -2.0], [-0.5, -0.5]], requires_grad=True)
    teacher = torch.tensor([[-2.0, -2.0], [-3.0, -1.0]])
    mask = torch.ones(2, 2, dtype=torch.bool)
    rewards = torch.tensor([1.0, 0.0])
    loss = kdrl_kd_loss(student, teacher, mask, rewards, estimator="k2")
    log_r = student[1].detach() - teacher[1]
    assert float(loss.detach()) == pytest.approx(float((0.5 * log_r**2).mean()))
    loss.backward()
    assert torch.all(student.grad[0] == 0)
    unmasked = kdrl_kd_loss(student, teacher, mask, rewards, estimator="k2", mask_correct=False)
    assert float(unmasked.detach()) == pytest.approx(float((0.5 * (student.detach() - teacher) ** 2).mean()))


def test_kdrl_full_estimator_uses_exact_reverse_kl():
    divergence = _functional_divergence()
    student_logits = torch.randn(2, 3, 5, dtype=torch.float64)
    teacher_logits = torch.randn(2, 3, 5, dtype=torch.float64)
    mask = torch.ones(2, 3, dtype=torch.bool)
    dummy = torch.zeros(2, 3, dtype=torch.float64)
    value = kdrl_kd_loss(
        dummy, dummy, mask, None, estimator="full", mask_correct=False,
        student_logits=student_logits, teacher_logits=teacher_logits,
    )
    q, p = torch.softmax(student_logits, -1).numpy(), torch.softmax(teacher_logits, -1).numpy()
    assert float(value) == pytest.approx(rel_entr(q, p).sum(-1).mean(), rel=1e-8)
    assert float(value) == pytest.approx(float(divergence("reverse_kl", student_logits, teacher_logits)), rel=1e-8)


def test_kdrl_bad_input():
    z = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="rewards"):
        kdrl_kd_loss(z, z, torch.ones(1, 2, dtype=torch.bool), None)
    with pytest.raises(ValueError, match="estimator"):
        kdrl_kd_loss(z, z, torch.ones(1, 2, dtype=torch.bool), torch.zeros(1), estimator="k5")


# ---------------------------------------------------------------- filtering


def test_accuracy_band_and_refill():
    rewards = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0], [0.0] * 4])
    torch.testing.assert_close(accuracy_band_mask(rewards), torch.tensor([False, True, True, False]))
    batch = BalancedBatch(3)
    batch.offer(["a", "b", "c", "d"], rewards)
    assert not batch.full and batch.items == ["b", "c"]
    batch.offer(["e", "f", "g", "h"], rewards)
    assert batch.full and batch.items == ["b", "c", "f"] and batch.offered == 8
    with pytest.raises(ValueError, match="low"):
        accuracy_band_mask(rewards, low=0.8, high=0.2)


# ---------------------------------------------------------------- what each estimator's gradient targets


def _expected_loss_gradient(kind, policy_logits, ref_logits):
    """Exact E_{y ~ pi_theta}[grad k(y)] with the samples held fixed (as in training), by enumeration."""
    policy_logits = policy_logits.clone().requires_grad_(True)
    logq = torch.log_softmax(policy_logits, -1)
    logp = torch.log_softmax(ref_logits, -1)
    weights = logq.exp().detach()  # the sampling distribution carries no gradient
    (weights * kl_estimator(logq, logp, kind)).sum().backward()
    return policy_logits.grad


def _divergence_gradient(name, policy_logits, ref_logits):
    divergence = _functional_divergence()
    policy_logits = policy_logits.clone().requires_grad_(True)
    divergence(name, policy_logits[None], ref_logits[None]).backward()
    return policy_logits.grad


def test_k1_loss_has_zero_expected_gradient():
    """E_q[grad log q(y)] = 0: k1 used directly as a loss only adds noise."""
    theta, ref = _two_distributions(seed=4)
    torch.testing.assert_close(_expected_loss_gradient("k1", theta, ref), torch.zeros_like(theta))


def test_k2_loss_gradient_is_reverse_kl_gradient():
    """E_q[grad (log q/p)^2 / 2] = E_q[(log q/p) grad log q] = grad KL(q || p)."""
    theta, ref = _two_distributions(seed=5)
    torch.testing.assert_close(
        _expected_loss_gradient("k2", theta, ref), _divergence_gradient("reverse_kl", theta, ref)
    )


def test_k3_loss_gradient_is_forward_kl_gradient():
    """E_q[(1 - p/q) grad log q] = -sum_y p grad log q = grad KL(p || q): k3 as a loss pulls like forward KL."""
    theta, ref = _two_distributions(seed=6)
    torch.testing.assert_close(
        _expected_loss_gradient("k3", theta, ref), _divergence_gradient("forward_kl", theta, ref)
    )
