"""f-DPG objective: the authors' formulas, unbiasedness on a categorical toy, the RLHF case,
running Z and baseline, importance-sampled metrics, moment matching, bad inputs.

Reference formulas are transcribed from naver/disco at commit
5ea6fdef073464eeb4e018bad9276faeba7317e6:
- disco/tuners/losses/f_divergence.py  (FDivergenceLoss.__call__)
- disco/tuners/losses/{kl,reverse_kl,js,tv,chi_square}.py  (f_prime)
- disco/utils/moving_average.py  (MovingAverage, WindowedMovingAverage)
- disco/metrics/{kl,tv,js}.py  (pointwise_estimates)
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.optimize import brentq
from scipy.spatial.distance import jensenshannon

from divergent.rl import (
    PseudoRewardBaseline,
    RunningZ,
    fdpg_divergence_estimates,
    fdpg_loss,
    fdpg_pseudo_reward,
    fit_moment_lambda,
)

# ---- disco, transcribed (commit 5ea6fdef) ---------------------------------------------------

DISCO_F_PRIME = {
    "forward_kl": lambda log_t: -torch.exp(-log_t),  # losses/kl.py KLLoss
    "reverse_kl": lambda log_t: log_t + 1,  # losses/reverse_kl.py
    "js": lambda log_t: torch.log(torch.tensor(2.0, dtype=log_t.dtype)) - torch.nn.functional.softplus(-log_t),
    "tvd": lambda log_t: torch.sign(log_t) / 2.0,  # losses/tv.py
    "chi2": lambda log_t: 1.0 - torch.exp(-2 * log_t),  # losses/chi_square.py
}


class DiscoWindowed:
    def __init__(self, window_size=1024):
        self.window_size, self.buffer, self.value = window_size, [], None

    def update(self, new):
        self.buffer.extend(new.flatten().tolist())
        self.buffer = self.buffer[-self.window_size :]
        self.value = sum(self.buffer) / len(self.buffer)


class DiscoMovingAverage:
    def __init__(self):
        self.value, self.weight = None, 0

    def update(self, new):
        vals = new.detach().flatten().tolist() if isinstance(new, torch.Tensor) else [new]
        m = sum(vals) / len(vals)
        if self.value is None:
            self.value, self.weight = m, len(vals)
        else:
            self.value = (self.value * self.weight + m * len(vals)) / (self.weight + len(vals))
            self.weight += len(vals)


def disco_loss(name, baseline, proposal_log_probs, target_log_scores, policy_log_probs, z):
    target_log_probs = target_log_scores - torch.log(z)
    log_t = policy_log_probs.detach() - target_log_probs
    pseudo_reward = -DISCO_F_PRIME[name](log_t)
    if baseline is not None:
        advantage = pseudo_reward - baseline.value if baseline.value is not None else pseudo_reward
        baseline.update(pseudo_reward)
    else:
        advantage = pseudo_reward
    importance_ratios = (policy_log_probs.detach() - proposal_log_probs).exp()
    return (importance_ratios * (-advantage) * policy_log_probs).mean()


def disco_kl_pointwise(m1, m2, z, proposal):
    est = torch.exp(m1 - proposal) * (m1 - m2)
    est[torch.isnan(est)] = 0
    return -torch.log(z) + (1 / z) * est


def disco_tv_pointwise(m1, m2, z, proposal):
    return 0.5 * torch.abs(torch.exp(m2 - proposal) - torch.exp(m1 - torch.log(z) - proposal))


def disco_js_pointwise(m1, m2, z, proposal):
    n1 = m1 - torch.log(z)
    mx = torch.max(n1, m2)
    mlog = mx + torch.log(((n1 - mx).exp() + (m2 - mx).exp()) / 2)
    one = torch.as_tensor(1.0, dtype=m1.dtype)
    return disco_kl_pointwise(n1, mlog, one, proposal) / 2 + disco_kl_pointwise(m2, mlog, one, proposal) / 2


# ---- against disco ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(DISCO_F_PRIME))
def test_pseudo_reward_is_disco_minus_f_prime(name):
    log_t = torch.linspace(-6, 6, 41, dtype=torch.float64)
    torch.testing.assert_close(fdpg_pseudo_reward(log_t, name), -DISCO_F_PRIME[name](log_t))


@pytest.mark.parametrize("name", list(DISCO_F_PRIME))
def test_loss_and_baseline_match_disco_over_batches(name):
    """Three batches through disco's FDivergenceLoss and through fdpg_loss + PseudoRewardBaseline
    (window 5 so that cropping happens): same loss values and gradients."""
    g = torch.Generator().manual_seed(0)
    ours, theirs = PseudoRewardBaseline(window=5), DiscoWindowed(5)
    for _ in range(3):
        n = 4
        policy = torch.randn(n, generator=g, dtype=torch.float64) - 3
        proposal = policy + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)
        target = policy + torch.randn(n, generator=g, dtype=torch.float64)
        z = torch.tensor(0.7, dtype=torch.float64)
        a = policy.clone().requires_grad_(True)
        b = policy.clone().requires_grad_(True)
        expected = disco_loss(name, theirs, proposal, target, a, z)
        baseline = ours.value
        got = fdpg_loss(b, proposal, target, math.log(0.7), divergence=name, baseline=baseline)
        ours.update(fdpg_pseudo_reward(b.detach() - (target - math.log(0.7)), name))
        torch.testing.assert_close(got, expected)
        expected.backward()
        got.backward()
        torch.testing.assert_close(b.grad, a.grad)
        assert ours.value == pytest.approx(theirs.value, rel=1e-12)


def test_running_z_is_disco_moving_average_per_prompt():
    g = torch.Generator().manual_seed(1)
    ours = RunningZ()
    theirs = {"a": DiscoMovingAverage(), "b": DiscoMovingAverage()}
    for _ in range(4):
        target = torch.randn(6, generator=g, dtype=torch.float64)
        proposal = torch.randn(6, generator=g, dtype=torch.float64)
        keys = ["a", "a", "a", "b", "b", "b"]
        ours.update(keys, target, proposal)
        est = torch.exp(target - proposal)
        for i, key in enumerate(keys):  # tuner._update_moving_z: one .item() at a time
            theirs[key].update(est[i].item())
    for key in "ab":
        assert ours.z(key) == pytest.approx(theirs[key].value, rel=1e-12)
    torch.testing.assert_close(ours.log_z(["b", "a"]), torch.tensor([math.log(theirs["b"].value), math.log(theirs["a"].value)], dtype=torch.float64))


def test_state_dicts_round_trip():
    z, b = RunningZ(), PseudoRewardBaseline(window=3)
    z.update(["p", None], torch.tensor([0.0, -1.0]), torch.tensor([-1.0, -1.0]))
    b.update(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    z2, b2 = RunningZ(), PseudoRewardBaseline()
    z2.load_state_dict(z.state_dict())
    b2.load_state_dict(b.state_dict())
    assert z2.value == z.value and z2.weight == z.weight
    assert b2.buffer == [2.0, 3.0, 4.0] and b2.value == 3.0 and b2.window == 3


def test_metrics_match_disco_pointwise_means():
    g = torch.Generator().manual_seed(2)
    target = torch.randn(32, generator=g, dtype=torch.float64) - 2
    target[::5] = -math.inf  # P = 0 on some samples
    model = torch.randn(32, generator=g, dtype=torch.float64) - 2
    proposal = model + 0.2 * torch.randn(32, generator=g, dtype=torch.float64)
    z = torch.tensor(0.4, dtype=torch.float64)
    got = fdpg_divergence_estimates(target, model, math.log(0.4), proposal)
    assert got["kl"] == pytest.approx(float(disco_kl_pointwise(target, model, z, proposal).mean()), rel=1e-10)
    assert got["tv"] == pytest.approx(float(disco_tv_pointwise(target, model, z, proposal).mean()), rel=1e-10)
    assert got["js"] == pytest.approx(float(disco_js_pointwise(target, model, z, proposal).mean()), rel=1e-10)


# ---- categorical toy: p known exactly ---------------------------------------------------------

K = 6
P_TARGET = torch.tensor([0.30, 0.05, 0.20, 0.15, 0.25, 0.05], dtype=torch.float64)
THETA0 = torch.tensor([0.4, -0.3, 0.1, 0.9, -0.6, 0.2], dtype=torch.float64)


def exact_divergence(name, pi, p):
    """Closed forms of D_f(pi || p) with disco's f (no code under test)."""
    if name == "forward_kl":
        return (p * (p.log() - pi.log())).sum()
    if name == "reverse_kl":
        return (pi * (pi.log() - p.log())).sum()
    if name == "js":  # f(t) = t log t - (t+1) log((t+1)/2): twice the JS divergence
        m = (pi + p) / 2
        return (pi * (pi / m).log()).sum() + (p * (p / m).log()).sum()
    if name == "tvd":
        return 0.5 * (pi - p).abs().sum()
    if name == "chi2":
        return ((p - pi) ** 2 / pi).sum()
    if name == "hellinger":
        return 0.5 * ((pi.sqrt() - p.sqrt()) ** 2).sum()
    raise AssertionError(name)


def sampled_gradients(name, *, batches=40, batch=4000, offline=False, baseline=None, seed=0, target=None, log_z=0.0):
    g = torch.Generator().manual_seed(seed)
    target = P_TARGET.log() if target is None else target
    q = torch.softmax(THETA0 + torch.tensor([0.5, 0.0, -0.5, 0.0, 0.3, 0.0], dtype=torch.float64), 0)
    grads = []
    for _ in range(batches):
        theta = THETA0.clone().requires_grad_(True)
        log_pi = torch.log_softmax(theta, 0)
        sampler = q if offline else log_pi.detach().exp()
        x = torch.multinomial(sampler, batch, replacement=True, generator=g)
        proposal = sampler.log()[x]
        loss = fdpg_loss(log_pi[x], proposal, target[x], log_z, divergence=name, baseline=baseline)
        (grad,) = torch.autograd.grad(loss, theta)
        grads.append(grad)
    return torch.stack(grads)


def assert_unbiased(grads, exact):
    mean, sem = grads.mean(0), grads.std(0) / math.sqrt(grads.shape[0])
    # 5 standard errors per coordinate: a wrong sign, factor or missing weight fails by far more
    assert ((mean - exact).abs() <= 5 * sem + 1e-9).all(), (mean, exact, sem)
    assert (exact.abs() > 10 * sem).any(), "test too weak to tell"


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "js", "tvd", "chi2", "hellinger"])
def test_sampled_gradient_is_unbiased_on_policy(name):
    theta = THETA0.clone().requires_grad_(True)
    (exact,) = torch.autograd.grad(exact_divergence(name, torch.softmax(theta, 0), P_TARGET), theta)
    assert_unbiased(sampled_gradients(name, baseline=0.3), exact)


@pytest.mark.parametrize("name", ["forward_kl", "js"])
def test_sampled_gradient_is_unbiased_from_an_offline_proposal(name):
    theta = THETA0.clone().requires_grad_(True)
    (exact,) = torch.autograd.grad(exact_divergence(name, torch.softmax(theta, 0), P_TARGET), theta)
    assert_unbiased(sampled_gradients(name, offline=True), exact)


def test_unnormalised_target_with_its_log_z_is_the_same_gradient():
    """P = 7 p, log Z = log 7: the same samples give the same gradient as the normalised p."""
    a = sampled_gradients("js", batches=2, batch=50, seed=3)
    b = sampled_gradients("js", batches=2, batch=50, seed=3, target=(7 * P_TARGET).log(), log_z=math.log(7))
    torch.testing.assert_close(a, b)


def test_reward_target_with_reverse_kl_is_kl_regularised_policy_gradient():
    """P = a exp(r / beta): reverse-KL f-DPG is (1/beta) x REINFORCE on r - beta log(pi / a)."""
    beta = 0.5
    base = torch.softmax(torch.tensor([0.2, 0.1, -0.4, 0.3, 0.0, -0.2], dtype=torch.float64), 0)
    reward = torch.tensor([1.0, 0.0, 0.5, -0.5, 0.2, 0.8], dtype=torch.float64)
    target = base.log() + reward / beta
    log_z = float(torch.logsumexp(target, 0))
    # exact: grad of -(E_pi r - beta KL(pi || a)) / beta
    theta = THETA0.clone().requires_grad_(True)
    pi = torch.softmax(theta, 0)
    objective = (pi * reward).sum() - beta * (pi * (pi.log() - base.log())).sum()
    (exact,) = torch.autograd.grad(-objective / beta, theta)
    assert_unbiased(sampled_gradients("reverse_kl", target=target, log_z=log_z), exact)
    # same samples: with b = -log Z - 1 the constant of -f' cancels and the two losses coincide
    g = torch.Generator().manual_seed(5)
    theta = THETA0.clone().requires_grad_(True)
    log_pi = torch.log_softmax(theta, 0)
    x = torch.multinomial(log_pi.detach().exp(), 64, replacement=True, generator=g)
    ours = fdpg_loss(log_pi[x], log_pi[x].detach(), target[x], log_z, divergence="reverse_kl", baseline=-log_z - 1)
    shaped = reward[x] - beta * (log_pi[x].detach() - base.log()[x])
    reinforce = -(shaped * log_pi[x]).mean()
    (g_ours,) = torch.autograd.grad(ours, theta, retain_graph=True)
    (g_pg,) = torch.autograd.grad(reinforce, theta)
    torch.testing.assert_close(beta * g_ours, g_pg)


def test_metric_estimates_converge_to_exact_divergences():
    g = torch.Generator().manual_seed(7)
    pi = torch.softmax(THETA0, 0)
    x = torch.multinomial(pi, 200_000, replacement=True, generator=g)
    est = fdpg_divergence_estimates((3 * P_TARGET).log()[x], pi.log()[x], math.log(3))
    p, q = P_TARGET.numpy(), pi.numpy()
    assert est["kl"] == pytest.approx(float((p * np.log(p / q)).sum()), abs=0.01)
    assert est["tv"] == pytest.approx(0.5 * float(np.abs(p - q).sum()), abs=0.01)
    assert est["js"] == pytest.approx(jensenshannon(p, q) ** 2, abs=0.005)


def test_moment_matching_matches_scipy_root():
    """Enumerated support with weights a(x): E_{p_lambda}[phi] = mu* exactly at the fitted lambda."""
    a = torch.tensor([0.5, 0.2, 0.2, 0.1], dtype=torch.float64)
    phi = torch.tensor([0.0, 1.0, 0.0, 1.0], dtype=torch.float64)
    lam = fit_moment_lambda(phi, [0.6], log_weights=a.log())
    expected = brentq(lambda l: float((a * np.exp(l * phi) * phi).sum() / (a * np.exp(l * phi)).sum()) - 0.6, -20, 20)
    assert float(lam) == pytest.approx(expected, rel=1e-4)


def test_moment_matching_two_features():
    g = torch.Generator().manual_seed(0)
    phi = (torch.rand(5000, 2, generator=g) < torch.tensor([0.2, 0.6])).double()
    lam = fit_moment_lambda(phi, [0.5, 0.5])
    w = torch.softmax(phi @ lam.double(), 0)
    torch.testing.assert_close(w @ phi, torch.tensor([0.5, 0.5], dtype=torch.float64), atol=1e-4, rtol=0)


# ---- bad input ------------------------------------------------------------------------------


def test_unknown_divergence_did_you_mean():
    with pytest.raises(ValueError, match="did you mean 'tvd'"):
        fdpg_pseudo_reward(torch.zeros(2), "tv")
    with pytest.raises(ValueError, match="without an f-generator"):
        fdpg_loss(torch.zeros(2), torch.zeros(2), torch.zeros(2), 0.0, divergence="cauchy_schwarz")


def test_shapes_dtypes_and_nan():
    with pytest.raises(ValueError, match=r"proposal_logprobs must have shape \[3\]"):
        fdpg_loss(torch.zeros(3), torch.zeros(2), torch.zeros(3), 0.0, divergence="js")
    with pytest.raises(TypeError, match="policy_logprobs"):
        fdpg_loss(torch.zeros(3, dtype=torch.long), torch.zeros(3), torch.zeros(3), 0.0, divergence="js")
    with pytest.raises(ValueError, match=r"shape \[n\]"):
        fdpg_loss(torch.zeros(3, 2), torch.zeros(3, 2), torch.zeros(3, 2), 0.0, divergence="js")
    with pytest.raises(ValueError, match="target_log_scores contains NaN"):
        fdpg_loss(torch.zeros(2), torch.zeros(2), torch.tensor([0.0, math.nan]), 0.0, divergence="js")


def test_z_zero_is_an_error_naming_the_target_never_nan():
    with pytest.raises(ValueError, match="Z = 0"):
        fdpg_loss(torch.zeros(2), torch.zeros(2), torch.zeros(2), -math.inf, divergence="js")
    z = RunningZ("constraint regex:xyz")
    z.update(["p1"] * 3, torch.full((3,), -math.inf), torch.zeros(3))
    with pytest.raises(ValueError, match=r"none of 3 samples satisfies constraint regex:xyz.*loosen"):
        z.log_z(["p1"])


def test_zero_target_probability():
    """P(x) = 0: finite pseudo-rewards for bounded f' (forward KL 0, JS log 2 ...), an error for reverse KL."""
    target = torch.tensor([0.0, -math.inf])
    assert fdpg_loss(torch.tensor([-1.0, -1.0]), torch.tensor([-1.0, -1.0]), target, 0.0, divergence="js").isfinite()
    with pytest.raises(ValueError, match="reverse_kl pseudo-reward .* infinite on 1 of 2 .*epsilon"):
        fdpg_loss(torch.tensor([-1.0, -1.0]), torch.tensor([-1.0, -1.0]), target, 0.0, divergence="reverse_kl")


def test_baseline_window_and_alpha_range():
    with pytest.raises(ValueError, match="window must be a positive integer"):
        PseudoRewardBaseline(window=0)
    with pytest.raises(ValueError, match="alpha must be in"):
        fdpg_pseudo_reward(torch.zeros(1), "alpha", alpha=1.5)
    with pytest.raises(ValueError, match="not strictly inside"):
        fit_moment_lambda(torch.tensor([0.0, 1.0]), [1.0])
