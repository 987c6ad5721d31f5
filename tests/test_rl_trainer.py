"""GRPO trainer: trajectories on a tiny model, resume (Ctrl-C, SIGKILL), NaN stop, reward errors, HF models."""

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from divergent.data.arithmetic import EOS, PAD, VOCAB_SIZE, ArithmeticTask
from divergent.models.gpt import GPTConfig, TinyGPT
from divergent.rl import pass_at_k
from divergent.io import load_state
from divergent.train.run import Checkpointer, RunInterrupted, current_interrupt, drive
from divergent.train.rl import (
    GRPOConfig,
    GRPOTrainer,
    NonFiniteLossError,
    evaluate_policy,
    response_mask,
    sample_responses,
    score_responses,
    supervised_warm_start,
)



@pytest.fixture(scope="module")
def task():
    return ArithmeticTask(max_operand=9, n_test=20, seed=0)


def tiny_policy(seed=0):
    torch.manual_seed(seed)
    return TinyGPT(GPTConfig(vocab_size=VOCAB_SIZE, d_model=32, n_layers=1, n_heads=2, max_seq_len=16))


@pytest.fixture(scope="module")
def warm_state(task):
    """A policy warm-started briefly so that some rewards are 1 and advantages are non-zero."""
    model = tiny_policy()
    supervised_warm_start(model, task, steps=60, batch_size=32, lr=3e-3)
    return model.state_dict()


def warm_policy(warm_state):
    model = tiny_policy()
    model.load_state_dict(warm_state)
    return model


def small_config(**overrides):
    base = dict(steps=3, prompts_per_step=4, group_size=4, max_new_tokens=4, lr=1e-3, checkpoint_every=0,
                dph_probe_prompts=16, dph_probe_samples=4, dph_solved_fraction=0.25, dph_batch_size=4)
    base.update(overrides)
    return GRPOConfig(**base)


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    "overrides",
    [
        {"regulariser": "none"},
        {"regulariser": "reverse_kl", "kl_estimator": "k1"},
        {"regulariser": "reverse_kl", "kl_estimator": "k3"},
        {"regulariser": "dph", "dph_divergence": "forward_kl"},
        {"regulariser": "dph", "dph_divergence": "js"},
        {"regulariser": "dph", "dph_divergence": "alpha"},
        {"regulariser": "none", "filter_low": 0.25, "filter_high": 0.75, "num_iterations": 2},
    ],
    ids=["none", "rkl-k1", "rkl-k3", "dph-fkl", "dph-js", "dph-alpha", "filtered-ppo2"],
)
def test_few_steps_change_parameters_with_finite_logs(task, warm_state, overrides):
    policy = warm_policy(warm_state)
    before = _params(policy)
    trainer = GRPOTrainer(policy, task, small_config(**overrides))
    history = trainer.train()
    assert len(history) == 3
    changed = any(not torch.equal(before[k], v) for k, v in policy.state_dict().items())
    assert changed
    for record in history:
        assert record["groups_kept"] <= 4
        if record["groups_kept"]:
            assert 0.0 <= record["mean_reward"] <= 1.0 and torch.isfinite(torch.tensor(record["loss"]))
            assert 1 <= record["mean_length"] <= 4  # generation length cap


def test_dph_builds_rehearsal_and_removes_solved_prompts(task, warm_state):
    trainer = GRPOTrainer(warm_policy(warm_state), task, small_config(regulariser="dph", steps=1))
    trainer.train()
    rehearsal = trainer.rehearsal
    assert len(rehearsal["indices"]) > 0, "the warm-started policy should solve some probe prompts"
    solved_prompts = set()
    for prompt, response, mask in zip(rehearsal["prompts"], rehearsal["responses"], rehearsal["mask"]):
        text, _, finished = task.decode(response.tolist())
        prompt_text = bytes(t for t in prompt.tolist() if t < 256).decode()
        assert finished and text == str(eval(prompt_text.rstrip("=")))  # stored responses are correct
        solved_prompts.add(prompt_text)
    assert not solved_prompts & {p.prompt for p in trainer.pool}
    assert len(trainer.pool) == len(task.train) - len(rehearsal["indices"])
    # The stored log-probs are those of the initial policy on the stored tokens.
    initial = warm_policy(warm_state).eval()
    with torch.no_grad():
        seq = torch.cat([rehearsal["prompts"], rehearsal["responses"]], 1)
        logp = torch.log_softmax(initial(seq)[:, rehearsal["prompts"].shape[1] - 1 : -1], -1)
        expected = logp.gather(-1, rehearsal["responses"][..., None]).squeeze(-1)
    torch.testing.assert_close(rehearsal["logprobs"][rehearsal["mask"]], expected[rehearsal["mask"]])


def test_kdrl_with_teacher_changes_parameters(task, warm_state):
    teacher = warm_policy(warm_state)
    supervised_warm_start(teacher, task, steps=20, batch_size=32, lr=3e-3, seed=1)
    policy = warm_policy(warm_state)
    before = _params(policy)
    config = small_config(regulariser="kdrl", kdrl_beta0=0.5, kdrl_delta=0.1, kdrl_beta_min=0.2)
    history = GRPOTrainer(policy, task, config, teacher=teacher).train()
    assert [r["kdrl_beta"] for r in history] == pytest.approx([0.5, 0.4, 0.3])
    assert any(not torch.equal(before[k], v) for k, v in policy.state_dict().items())
    with pytest.raises(ValueError, match="teacher"):
        GRPOTrainer(policy, task, config)


def _strip_time(history):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in history]


@pytest.mark.parametrize("regulariser", ["reverse_kl", "dph"])
def test_resume_equals_uninterrupted(task, warm_state, tmp_path, regulariser):
    full = GRPOTrainer(warm_policy(warm_state), task, small_config(steps=4, regulariser=regulariser), run_dir=tmp_path / "a")
    full_history = full.train()

    first = GRPOTrainer(warm_policy(warm_state), task, small_config(steps=2, regulariser=regulariser), run_dir=tmp_path / "b")
    first.train()
    # A fresh process would start from a fresh (here: differently initialised) model and resume.
    resumed = GRPOTrainer(tiny_policy(seed=7), task, small_config(steps=4, regulariser=regulariser), run_dir=tmp_path / "b")
    resumed_history = resumed.train(resume=True)

    assert _strip_time(resumed_history) == _strip_time(full_history)
    for key, value in full.policy.state_dict().items():
        torch.testing.assert_close(resumed.policy.state_dict()[key], value, rtol=0, atol=0)


def _dropout_policy(warm_state):
    """The warm policy with dropout on: an exact resume needs torch's global random state too."""
    model = warm_policy(warm_state)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.1
    return model


@pytest.mark.parametrize("stop_after", [1, 3])
@pytest.mark.parametrize("overrides", [{"regulariser": "dph"}, {"regulariser": "reverse_kl", "filter_low": 0.0,
                                                                 "filter_high": 0.9, "num_iterations": 2}],
                         ids=["dph", "rkl-filtered"])
def test_ctrl_c_between_steps_then_resume_equals_the_uninterrupted_run(task, warm_state, tmp_path, stop_after, overrides):
    config = small_config(steps=5, **overrides)
    reference = GRPOTrainer(_dropout_policy(warm_state), task, config)
    drive(reference)

    def ctrl_c(record):
        if record["step"] == stop_after:
            current_interrupt().request()

    checkpointer = Checkpointer(tmp_path / "ck")
    first = GRPOTrainer(_dropout_policy(warm_state), task, small_config(steps=5, **overrides))
    with pytest.raises(RunInterrupted, match=f"after step {stop_after}"):
        drive(first, checkpointer=checkpointer, checkpoint_every=2, on_step=ctrl_c)
    torch.manual_seed(123)  # a fresh process would not share torch's random state: resume restores it
    second = GRPOTrainer(_dropout_policy(tiny_policy(seed=7).state_dict()), task, small_config(steps=5, **overrides))
    drive(second, checkpointer=checkpointer, checkpoint_every=2, resume=True)
    assert _strip_time(second.history) == _strip_time(reference.history)
    assert [r["step"] for r in second.history] == [1, 2, 3, 4, 5]  # no batch skipped or repeated
    for key, value in reference.policy.state_dict().items():
        torch.testing.assert_close(second.policy.state_dict()[key], value, rtol=0, atol=0)
    if overrides["regulariser"] == "dph":
        torch.testing.assert_close(second.rehearsal["logprobs"], reference.rehearsal["logprobs"], rtol=0, atol=0)
        assert second.pool == reference.pool


def test_resume_refuses_a_checkpoint_of_other_settings(task, warm_state, tmp_path):
    checkpointer = Checkpointer(tmp_path / "ck")
    drive(GRPOTrainer(warm_policy(warm_state), task, small_config(steps=1)), checkpointer=checkpointer)
    with pytest.raises(ValueError, match="written with group_size=4, this run has group_size=2"):
        drive(GRPOTrainer(warm_policy(warm_state), task, small_config(steps=2, group_size=2)),
              checkpointer=checkpointer, resume=True)


_SCRIPT = textwrap.dedent(
    """
    import json, sys, time, torch
    torch.set_num_threads(1)
    sys.path.insert(0, {tests!r})
    import test_rl_trainer as t
    from divergent.data.arithmetic import ArithmeticTask
    from divergent.train.run import Checkpointer, RunInterrupted, drive

    task = ArithmeticTask(max_operand=9, n_test=20, seed=0)
    state = torch.load({warm!r})
    trainer = t.GRPOTrainer(t._dropout_policy(state), task, t.small_config(steps=8, regulariser="dph"))
    def slow(record):
        print(record["step"], flush=True)
        time.sleep({delay})
    try:
        drive(trainer, checkpointer=Checkpointer({folder!r}), checkpoint_every=2, resume=True, on_step=slow)
    except RunInterrupted as exc:
        print("INTERRUPTED", exc.step, flush=True)
        sys.exit(130)
    json.dump(t._strip_time(trainer.history), open({out!r}, "w"))
    """
)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "sigkill"])
def test_a_real_signal_then_resume_equals_the_uninterrupted_run(task, warm_state, tmp_path, sig):
    torch.set_num_threads(1)
    reference = GRPOTrainer(_dropout_policy(warm_state), task, small_config(steps=8, regulariser="dph"))
    drive(reference)
    torch.save(warm_state, tmp_path / "warm.pt")
    script = tmp_path / "run.py"
    script.write_text(_SCRIPT.format(tests=str(Path(__file__).parent), warm=str(tmp_path / "warm.pt"),
                                     folder=str(tmp_path / "ck"), out=str(tmp_path / "history.json"), delay=0.3))
    process = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    for line in process.stdout:
        if line.strip().isdigit() and int(line) >= 3:
            break
    process.send_signal(sig)
    rest = process.stdout.read()
    code = process.wait(timeout=120)
    if sig == signal.SIGINT:
        assert code == 130 and "INTERRUPTED" in rest
    else:
        assert code == -signal.SIGKILL
    script.write_text(script.read_text().replace("time.sleep(0.3)", "time.sleep(0.0)"))
    resumed = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads((tmp_path / "history.json").read_text()) == json.loads(json.dumps(_strip_time(reference.history)))


def test_nan_stops_with_message_and_keeps_last_good_checkpoint(task, warm_state, tmp_path):
    policy = warm_policy(warm_state)
    trainer = GRPOTrainer(policy, task, small_config(steps=2, checkpoint_every=1), run_dir=tmp_path)
    trainer.train()
    good = {k: v.clone() for k, v in policy.state_dict().items()}
    trainer.config.steps = 3
    with torch.no_grad():
        policy.lm_head.weight.fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match="step_2.ckpt"):
        trainer.train()
    saved = load_state(tmp_path / "checkpoints" / "step_2.ckpt")
    for key, value in good.items():
        torch.testing.assert_close(saved["model"][key], value)
    assert not (tmp_path / "checkpoints" / "step_3.ckpt").exists()


def test_nan_loss_stops_before_the_update(task, warm_state, tmp_path):
    """A non-finite loss (here: corrupted rehearsal log-probs) raises and leaves the weights untouched."""
    policy = warm_policy(warm_state)
    trainer = GRPOTrainer(policy, task, small_config(steps=1, regulariser="dph"), run_dir=tmp_path)
    trainer.train()
    trainer.rehearsal["logprobs"].fill_(float("nan"))
    trainer.config.steps = 2
    before = _params(policy)
    with pytest.raises(NonFiniteLossError, match="non-finite loss .* step 2 .*step_1.ckpt"):
        trainer.train()
    for key, value in before.items():
        assert torch.equal(policy.state_dict()[key], value)


def test_reward_errors_are_counted_not_fatal(task, warm_state):
    calls = {"n": 0}

    def flaky_reward(problem, text):
        calls["n"] += 1
        if calls["n"] % 3 == 0:
            raise RuntimeError("grader crashed")
        return task.reward(problem, text)

    history = GRPOTrainer(warm_policy(warm_state), task, small_config(steps=2), reward_fn=flaky_reward).train()
    assert sum(r["reward_errors"] for r in history) == calls["n"] // 3
    rewards, errors = score_responses(lambda p, t: float("nan"), [None, None], ["a", "b"])
    assert errors == 2 and rewards.tolist() == [0.0, 0.0]


def test_sampling_respects_length_cap_and_pads_after_eos():
    class AlwaysEOS(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, ids):
            logits = torch.full((*ids.shape, VOCAB_SIZE), -1e9)
            logits[..., EOS] = 0.0
            return logits

    out = sample_responses(AlwaysEOS(), torch.zeros(3, 5, dtype=torch.long), max_new_tokens=4, eos_id=EOS, pad_id=PAD)
    assert out.tolist() == [[EOS, PAD, PAD, PAD]] * 3
    policy = tiny_policy()
    out = sample_responses(policy, torch.zeros(2, 5, dtype=torch.long), max_new_tokens=3, eos_id=EOS, pad_id=PAD,
                           generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 3)
    responses = torch.tensor([[5, EOS, PAD], [5, 6, 7], [EOS, PAD, PAD]])
    assert response_mask(responses, EOS).tolist() == [[True, True, False], [True, True, True], [True, False, False]]


def test_evaluate_policy_metrics_are_consistent(task, warm_state):
    result = evaluate_policy(warm_policy(warm_state), task, task.test, n_samples=8, max_new_tokens=4, seed=0)
    curve = result["pass_at_k"]
    assert sorted(curve) == list(range(1, 9))
    assert curve[1] == pytest.approx(result["mean_reward"])  # binary reward: pass@1 = accuracy
    assert curve[8] == pytest.approx(result["solved"] / len(task.test))
    assert all(curve[k] <= curve[k + 1] + 1e-12 for k in range(1, 8))
    # With one correct answer per problem, distinct correct answers = solved problems.
    assert result["distinct_correct"] == result["solved"]
    assert pass_at_k(8, 0, 1) == 0.0
    again = evaluate_policy(warm_policy(warm_state), task, task.test, n_samples=8, max_new_tokens=4, seed=0)
    assert again == result


def test_hugging_face_causal_lm_trains(task):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=VOCAB_SIZE, n_embd=32, n_layer=1, n_head=2, n_positions=16)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    supervised_warm_start(model, task, steps=10, batch_size=16, lr=3e-3)
    before = _params(model)
    history = GRPOTrainer(model, task, small_config(steps=2, regulariser="reverse_kl")).train()
    assert len(history) == 2
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
