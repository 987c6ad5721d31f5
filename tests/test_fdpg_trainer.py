"""f-DPG trainer and command: a tiny TinyGPT on arithmetic prompts, targets, resume (Ctrl-C, SIGKILL),
non-finite stop, bad input on the command line."""

from __future__ import annotations

import math
import signal
import sys
from pathlib import Path

import pytest
import torch

from divergent.data.arithmetic import VOCAB_SIZE, ArithmeticTask
from divergent.models.gpt import GPTConfig, TinyGPT
from divergent.rl.rewards import RewardScorer, resolve_reward
from divergent.train.fdpg import FDPGConfig, FDPGTarget, FDPGTrainer
from divergent.train.rl import NonFiniteLossError, supervised_warm_start
from divergent.train.run import Checkpointer, drive

sys.path.insert(0, str(Path(__file__).parent))
from signal_helpers import signal_then_resume  # noqa: E402

TASK = ArithmeticTask(max_operand=9, n_test=20, seed=0)
PROMPTS = TASK.train[:6]


def tiny_policy(seed=0, warm=30):
    torch.manual_seed(seed)
    model = TinyGPT(GPTConfig(vocab_size=VOCAB_SIZE, d_model=32, n_layers=1, n_heads=2, max_seq_len=16))
    supervised_warm_start(model, TASK, steps=warm, batch_size=32, lr=3e-3)
    return model


def target(kind="constraint", spec="regex:1", **kw):
    scorer = RewardScorer(resolve_reward(spec, f"--{kind}"), timeout=0)

    def score(problems, texts):
        return scorer([p.prompt for p in problems], list(texts), {})

    return FDPGTarget(kind=kind, name=f"--{kind} {spec}", score=score, **kw)


def config(**overrides):
    base = dict(steps=4, prompts_per_step=2, samples_per_prompt=8, max_new_tokens=3, lr=1e-3, eval_every=2,
                eval_samples=4, divergence="js")
    base.update(overrides)
    return FDPGConfig(**base)


def make(**overrides):
    kind = overrides.pop("kind", "constraint")
    spec = overrides.pop("spec", "regex:1")
    target_kw = overrides.pop("target_kw", {})
    return FDPGTrainer(tiny_policy(), TASK, PROMPTS, target(kind, spec, **target_kw), config(**overrides))


@pytest.mark.parametrize("divergence", ["forward_kl", "js", "tvd", "reverse_kl"])
def test_steps_change_parameters_with_finite_metrics(divergence):
    kw = {"target_kw": {"epsilon": 1e-3}} if divergence == "reverse_kl" else {}
    trainer = make(divergence=divergence, **kw)
    before = {k: v.clone() for k, v in trainer.policy.state_dict().items()}
    history = trainer.train()
    assert len(history) == 4
    assert any(not torch.equal(before[k], v) for k, v in trainer.policy.state_dict().items())
    trained = [h for h in history if not math.isnan(h["loss"])]
    assert trained and all(math.isfinite(h["loss"]) and h["z"] > 0 for h in trained)
    assert [e["step"] for e in trainer.evaluations] == [0, 2, 4]
    final = trainer.evaluations[-1]
    assert 0 <= final["alignment"] <= 1 and 0 < final["distinct_1"] <= 1 and 0 <= final["self_bleu"] <= 100


def test_z_is_the_running_mean_of_p_over_q_per_prompt():
    """On-policy at step 1 the policy is a, so P/q = b: Z of each prompt is its share of satisfying samples."""
    trainer = make(steps=1)
    trainer.train()
    for key, value in trainer.z.value.items():
        assert 0 <= value <= 1 and trainer.z.weight[key] == 8
        assert value * 8 == pytest.approx(round(value * 8), abs=1e-4)


def test_resume_equals_uninterrupted(tmp_path):
    straight = make()
    straight.train()
    first = make()
    drive(first, checkpointer=Checkpointer(tmp_path), checkpoint_every=2)
    assert first.step_index == 4
    # interrupted after 2: a fresh trainer resumed from the step-2 checkpoint
    stopped = make(steps=4)
    stopped.total_steps = 2
    drive(stopped, checkpointer=Checkpointer(tmp_path / "b"))
    resumed = make()
    drive(resumed, checkpointer=Checkpointer(tmp_path / "b"), resume=True)
    assert resumed.history == straight.history
    assert resumed.evaluations == straight.evaluations
    for k, v in straight.policy.state_dict().items():
        torch.testing.assert_close(resumed.policy.state_dict()[k], v, rtol=0, atol=0)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "sigkill"])
def test_a_real_signal_then_resume_equals_the_uninterrupted_run(tmp_path, sig):
    straight = make(steps=6)
    straight.train()
    history = signal_then_resume(tmp_path, "from test_fdpg_trainer import make; trainer = make(steps=6)", sig,
                                 after=3, every=2)
    assert history == straight.history


def test_offline_proposal_is_frozen_until_replaced():
    trainer = make(offline=True, steps=4, proposal_update_every=2)
    initial = {k: v.clone() for k, v in trainer.proposal.state_dict().items()}
    trainer.step()
    assert all(torch.equal(initial[k], v) for k, v in trainer.proposal.state_dict().items())
    trainer.train()
    replaced = any(not torch.equal(initial[k], v) for k, v in trainer.proposal.state_dict().items())
    assert replaced == (trainer.proposal_updates > 0)
    assert all("proposal_updates" in h for h in trainer.history if not math.isnan(h["loss"]))


def test_feature_target_fits_lambda_to_the_moment():
    trainer = make(kind="feature", spec="regex:1", target_kw={"moments": [0.5]}, moment_samples=256, steps=1)
    assert trainer.target.lam is not None and float(trainer.target.lam) > 0  # a(x) has the feature < 50%
    trainer.train()


def test_reward_target_trains_and_beta_must_be_positive():
    make(kind="reward", spec="regex:1", target_kw={"beta": 0.5}, steps=1).train()
    with pytest.raises(ValueError, match="beta must be > 0"):
        target("reward", "regex:1", beta=0.0)


def test_non_binary_constraint_is_an_error_naming_it():
    trainer = FDPGTrainer(tiny_policy(), TASK, PROMPTS, FDPGTarget(
        "constraint", "--constraint half", score=lambda p, t: (torch.full((len(t),), 0.5), {})), config())
    with pytest.raises(ValueError, match="--constraint half returned 0.5.*0 or 1"):
        trainer.step()


def test_never_satisfied_constraint_stops_with_z_zero_after_the_configured_samples():
    trainer = make(spec="regex:xyz", max_zero_samples=32, steps=10)
    with pytest.raises(ValueError, match=r"Z = 0 after 32 samples .*--constraint regex:xyz.*loosen"):
        trainer.train()
    assert trainer.step_index == 1  # 16 samples: not yet; the second batch reaches 32


def test_non_finite_policy_stops_without_update(tmp_path):
    trainer = make()
    with torch.no_grad():
        next(trainer.policy.parameters()).fill_(math.nan)
    with pytest.raises(NonFiniteLossError):
        trainer.train(checkpointer=Checkpointer(tmp_path))


def test_cli_bad_input_is_one_line_exit_2(tmp_path):
    from typer.testing import CliRunner

    from divergent.cli import app

    runner = CliRunner()
    for args, expected in [
        (["--divergence", "tv"], "did you mean 'tvd'"),
        (["--reward", "regex:1", "--beta", "0"], "--beta must be > 0"),
        (["--constraint", "regex:("], "not a valid regular expression"),
        (["--constraint", "regex:1", "--reward", "regex:2"], "give one target"),
        (["--feature", "regex:1"], "--feature needs --moment"),
        (["--set", "divergences=[js, skew_kl]"], "without an f-generator"),
    ]:
        result = runner.invoke(app, ["fdpg", *args, "-o", str(tmp_path)])
        assert result.exit_code == 2, (args, result.output)
        assert expected in result.output and "Traceback" not in result.output
        assert len(result.output.strip().splitlines()) == 1


def test_cli_on_a_hugging_face_model_and_prompts_file_end_to_end(tmp_path):
    """--model/--prompts/--constraint over two divergences: report, curves, table, save_pretrained folders;
    then --resume of the finished run reads it back."""
    pytest.importorskip("transformers")
    from typer.testing import CliRunner

    import lm_helpers
    from divergent.cli import app

    tok = lm_helpers.tokenizer()
    lm_helpers.llama(len(tok), 32, 1, seed=0).save_pretrained(tmp_path / "policy")
    tok.save_pretrained(tmp_path / "policy")
    lm_helpers.write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"count {i} and"} for i in range(4)])
    args = ["fdpg", "--model", str(tmp_path / "policy"), "--prompts", str(tmp_path / "prompts.jsonl"),
            "--constraint", "regex:[aeiou]", "--compare", "--divergences", "js,forward_kl", "--seeds", "0,1",
            "--steps", "2", "--max-new-tokens", "4", "--set", "samples_per_prompt=4", "--set", "eval_samples=2",
            "-o", str(tmp_path / "runs")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    (run_dir,) = (tmp_path / "runs").iterdir()
    report_md = (run_dir / "report.md").read_text()
    assert report_md.startswith("# divergent fdpg\n\nVerdict (TV(p, π) to the target, mean of 2 seeds)")
    assert (run_dir / "curves.png").stat().st_size > 10_000
    assert (run_dir / "js-seed1" / "model" / "config.json").is_file()
    assert (run_dir / "js-seed1" / "model" / "tokenizer.json").is_file()
    rows = (run_dir / "results.csv").read_text().splitlines()
    assert len(rows) == 5 and "kl_target_policy" in rows[0]
    again = CliRunner().invoke(app, ["fdpg", "--resume", str(run_dir)])
    assert again.exit_code == 0, again.output


@pytest.mark.parametrize("target_args", [
    ["--feature", "regex:[aeiou]", "--moment", "0.5", "--set", "moment_samples=32"],
    ["--reward", "regex:[aeiou]", "--beta", "0.5", "--divergence", "reverse_kl", "--offline"],
], ids=["feature", "reward-offline"])
def test_cli_feature_and_reward_targets_run(tmp_path, target_args):
    pytest.importorskip("transformers")
    from typer.testing import CliRunner

    import lm_helpers
    from divergent.cli import app

    tok = lm_helpers.tokenizer()
    lm_helpers.llama(len(tok), 32, 1, seed=0).save_pretrained(tmp_path / "policy")
    tok.save_pretrained(tmp_path / "policy")
    lm_helpers.write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"count {i} and"} for i in range(3)])
    args = ["fdpg", "--model", str(tmp_path / "policy"), "--prompts", str(tmp_path / "prompts.jsonl"), *target_args,
            "--steps", "2", "--max-new-tokens", "4", "--set", "samples_per_prompt=4", "--set", "eval_samples=2",
            "-o", str(tmp_path / "runs")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert "Verdict" in (run_dir / "report.md").read_text()
