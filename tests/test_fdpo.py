"""f-DPO: psi functions, the loss against written-out formulas, and the preference trainer."""

import math

import pytest
import torch

from divergent.data.arithmetic import EOS, PAD, VOCAB_SIZE, ArithmeticTask, Problem, encode_text
from divergent.models.gpt import GPTConfig, TinyGPT
from divergent.rl import fdpo_loss, fdpo_psi
from divergent.train.preference import PreferenceConfig, PreferenceTrainer, encode_preference_pairs, sequence_logprobs
from divergent.train.run import NonFiniteLossError


def _sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def _random_logps(n=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [-(torch.rand(n, generator=gen, dtype=torch.float64) * 5 + 0.5) for _ in range(4)]


def test_reverse_kl_is_standard_dpo():
    """Standard DPO: -log sigma(beta [(log pi_w - log ref_w) - (log pi_l - log ref_l)])."""
    pw, pl, rw, rl = _random_logps()
    beta = 0.3
    loss, stats = fdpo_loss(pw, pl, rw, rl, divergence="reverse_kl", beta=beta, reduction="none")
    for i in range(len(pw)):
        margin = beta * ((pw[i] - rw[i]) - (pl[i] - rl[i])).item()
        assert loss[i].item() == pytest.approx(-math.log(_sigmoid(margin)), rel=1e-12)
    assert stats["accuracy"].item() == pytest.approx(float((((pw - rw) - (pl - rl)) > 0).double().mean()))


@pytest.mark.parametrize("name", ["forward_kl", "js", "alpha"])
def test_psi_closed_forms(name):
    log_u = torch.linspace(-4, 4, 17, dtype=torch.float64)
    u = log_u.exp()
    a = 0.5
    expected = {"forward_kl": -1 / u, "js": torch.log(2 * u / (1 + u)), "alpha": (1 - u ** (-a)) / a}[name]
    torch.testing.assert_close(fdpo_psi(log_u, name, alpha=a), expected)


@pytest.mark.parametrize("name", ["forward_kl", "js", "alpha"])
def test_fdpo_loss_against_written_formula(name):
    pw, pl, rw, rl = _random_logps(seed=1)
    beta, a = 0.2, 0.3
    psi = {
        "forward_kl": lambda u: -1.0 / u,
        "js": lambda u: math.log(2 * u / (1 + u)),
        "alpha": lambda u: (1 - u ** (-a)) / a,
    }[name]
    loss = fdpo_loss(pw, pl, rw, rl, divergence=name, beta=beta, alpha=a, reduction="none")[0]
    for i in range(len(pw)):
        uw, ul = math.exp((pw[i] - rw[i]).item()), math.exp((pl[i] - rl[i]).item())
        assert loss[i].item() == pytest.approx(-math.log(_sigmoid(beta * (psi(uw) - psi(ul)))), rel=1e-10)


def test_trl_forward_kl_convention_differs_by_a_constant_only():
    """TRL writes forward-KL f'(u) = 1 - 1/u; the constant cancels in the chosen-rejected difference."""
    pw, pl, rw, rl = _random_logps(seed=2)
    ours = fdpo_loss(pw, pl, rw, rl, divergence="forward_kl", beta=0.1, reduction="none")[0]
    trl_style = -torch.nn.functional.logsigmoid(
        0.1 * ((1 - torch.exp(-(pw - rw))) - (1 - torch.exp(-(pl - rl))))
    )
    torch.testing.assert_close(ours, trl_style)


def test_all_divergences_agree_at_the_reference():
    """At pi_theta = pi_ref every psi gives the same value for both responses: loss = log 2."""
    pw, pl, _, _ = _random_logps(seed=3)
    for name in ("reverse_kl", "forward_kl", "js", "alpha"):
        loss, _ = fdpo_loss(pw, pl, pw.clone(), pl.clone(), divergence=name)
        assert loss.item() == pytest.approx(math.log(2))


def test_gradient_pushes_chosen_up_and_rejected_down():
    for name in ("reverse_kl", "forward_kl", "js", "alpha"):
        pw = torch.tensor([-2.0], requires_grad=True)
        pl = torch.tensor([-2.5], requires_grad=True)
        loss, _ = fdpo_loss(pw, pl, torch.tensor([-2.2]), torch.tensor([-2.4]), divergence=name)
        loss.backward()
        assert pw.grad.item() < 0 < pl.grad.item()


def test_fdpo_bad_input():
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="divergence"):
        fdpo_loss(x, x, x, x, divergence="tvd")
    with pytest.raises(ValueError, match="beta"):
        fdpo_loss(x, x, x, x, beta=0)
    with pytest.raises(ValueError, match="ref_rejected_logps"):
        fdpo_loss(x, x, x, torch.zeros(2))
    with pytest.raises(ValueError, match="alpha"):
        fdpo_psi(x, "alpha", alpha=1.5)


# ---------------------------------------------------------------- trainer


@pytest.fixture(scope="module")
def arithmetic_pairs():
    task = ArithmeticTask(max_operand=9, n_test=10, seed=0)
    triples = task.preference_pairs(task.train[:48], seed=0)
    return encode_preference_pairs(
        triples,
        encode_prompt=lambda s: task.encode_prompts([Problem(s, "")])[0].tolist(),
        encode_response=lambda s: encode_text(s) + [EOS],
    )


def _policy():
    torch.manual_seed(0)
    return TinyGPT(GPTConfig(vocab_size=VOCAB_SIZE, d_model=32, n_layers=1, n_heads=2, max_seq_len=16))


def test_sequence_logprobs_matches_token_by_token_sum():
    model = _policy().eval()
    prompts, responses = [[1, 2, 3], [4, 5]], [[6, 7], [8, 9, 10]]
    got = sequence_logprobs(model, prompts, responses, PAD)
    for row, (p, r) in enumerate(zip(prompts, responses)):
        seq = torch.tensor([p + r])
        logp = torch.log_softmax(model(seq)[0], -1)
        expected = sum(logp[len(p) - 1 + i, tok] for i, tok in enumerate(r))
        assert got[row].item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("name", ["reverse_kl", "forward_kl", "js", "alpha"])
def test_preference_trainer_raises_the_chosen_margin(arithmetic_pairs, name):
    policy = _policy()
    config = PreferenceConfig(steps=15, batch_size=16, lr=3e-3, beta=0.5, divergence=name)
    history = PreferenceTrainer(policy, arithmetic_pairs, config, pad_id=PAD).train()
    assert all(math.isfinite(r["loss"]) for r in history)
    assert history[0]["loss"] == pytest.approx(math.log(2), rel=1e-5)  # policy == reference at step 1
    assert sum(r["margin"] for r in history[-5:]) / 5 > 0
    assert sum(r["loss"] for r in history[-5:]) / 5 < math.log(2)


def test_preference_nan_stops(arithmetic_pairs):
    policy = _policy()
    with torch.no_grad():
        policy.lm_head.weight.fill_(float("nan"))
    trainer = PreferenceTrainer(policy, arithmetic_pairs, PreferenceConfig(steps=1), pad_id=PAD,
                                reference=_policy())
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    with pytest.raises(NonFiniteLossError, match="f-DPO loss .* at step 1"):
        trainer.train()
    assert trainer.step_index == 0
    assert all(torch.equal(v.nan_to_num(), before[k].nan_to_num()) for k, v in policy.state_dict().items())  # no update
