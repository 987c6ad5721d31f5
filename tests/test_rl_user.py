"""`divergent rl` on the user's HF model, prompts and reward: padding, prompts files, the CLI end to end, KDRL
with an HF teacher, bad input as one-line errors, and Ctrl-C then resume equal to the uninterrupted run."""

import json
import re

import pytest
import torch
from typer.testing import CliRunner

import lm_helpers
from divergent.cli import app
from divergent.data.prompts import PromptTask, read_prompt_rows
from divergent.rl.rewards import RewardScorer, RewardSpec, resolve_reward
from divergent.train.rl import GRPOConfig, GRPOTrainer, response_logprobs, sample_responses
from divergent.train.run import Checkpointer, RunInterrupted, current_interrupt, drive

transformers = pytest.importorskip("transformers")


def arithmetic_rows(n=24):
    return [{"prompt": f"what is {i % 5} plus {i % 3}?", "answer": str(i % 5 + i % 3), "id": i} for i in range(n)]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("rl-user")
    tok = lm_helpers.tokenizer()
    policy, teacher = lm_helpers.llama(len(tok), 32, 1, seed=0), lm_helpers.llama(len(tok), 48, 1, seed=1)
    for name, model in (("policy", policy), ("teacher", teacher)):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    other = lm_helpers.tokenizer(280)
    lm_helpers.llama(len(other), 32, 1, seed=2).save_pretrained(root / "other")
    other.save_pretrained(root / "other")
    lm_helpers.write_jsonl(root / "prompts.jsonl", arithmetic_rows())
    return root


def test_left_padded_prompts_give_the_log_probs_of_unpadded_ones():
    """Reference: each row alone, without padding."""
    model = lm_helpers.llama(300, 32, 2, seed=3).eval()
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    responses = torch.tensor([[20, 21, 2], [22, 2, 0], [23, 24, 25]])
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    padded, _ = response_logprobs(model, ids, responses, mask)
    for row, prompt in enumerate(prompts):
        alone, _ = response_logprobs(model, torch.tensor([prompt]), responses[row:row + 1])
        torch.testing.assert_close(padded[row], alone[0], rtol=1e-5, atol=1e-5)
    # generate: the first EOS ends a response, padding after it; the same generator gives the same draws
    draws = [sample_responses(model, ids, attention_mask=mask, max_new_tokens=6, eos_id=2, pad_id=0,
                              generator=torch.Generator().manual_seed(1)) for _ in range(2)]
    assert torch.equal(draws[0], draws[1]) and draws[0].shape == (3, 6)
    state = torch.get_rng_state()
    sample_responses(model, ids, attention_mask=mask, max_new_tokens=2, eos_id=2, pad_id=0,
                     generator=torch.Generator().manual_seed(1))
    assert torch.equal(torch.get_rng_state(), state)  # torch's global random state is left alone


def test_prompts_file_errors_name_the_file_and_row(tmp_path):
    bad = lm_helpers.write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a"}, {"question": "b", "answer": 1}])
    with pytest.raises(ValueError, match=r"bad.jsonl row 2 has no 'prompt' field \(fields: 'question', 'answer'\)"):
        read_prompt_rows(bad)
    empty = lm_helpers.write_jsonl(tmp_path / "empty.jsonl", [{"prompt": "  "}])
    with pytest.raises(ValueError, match="row 1: 'prompt' is empty"):
        read_prompt_rows(empty)
    typed = lm_helpers.write_jsonl(tmp_path / "typed.jsonl", [{"prompt": 3}])
    with pytest.raises(ValueError, match="row 1: 'prompt' must be a non-empty string or a list"):
        read_prompt_rows(typed)
    (tmp_path / "rows.csv").write_text("prompt,answer\nwhat is 1 plus 1?,2\n")
    assert read_prompt_rows(tmp_path / "rows.csv") == [{"prompt": "what is 1 plus 1?", "answer": "2"}]


def test_prompt_task_renders_the_chat_template_and_hands_columns_to_the_reward():
    tok = lm_helpers.tokenizer()
    seen = {}

    def reward(prompts, completions, **columns):
        seen.update(prompts=prompts, completions=completions, **columns)
        return [1.0] * len(completions)

    rows = [{"prompt": "hi", "answer": "1", "extra": "x"},
            {"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "yo"}], "answer": "2"}]
    task = PromptTask(rows, [], tok, RewardScorer(RewardSpec("mine", reward), timeout=0))
    assert task.texts == ["<|user|>hi</s><|assistant|>", "<|system|>s</s><|user|>yo</s><|assistant|>"]
    ids, mask = task.encode_prompts([0, 1])
    assert mask[0].sum() == len(task.ids[0]) and mask[0, 0] == 0 and mask[1].all()  # left padding
    rewards, _ = task.score([0, 1], ["a", "b"])
    assert seen["prompts"][0] == "hi" and seen["completions"] == ["a", [{"role": "assistant", "content": "b"}]]
    assert seen["answer"] == ["1", "2"] and seen["extra"] == ["x", None]
    eos = tok.eos_token_id
    text, length, finished = task.decode(tok("two", add_special_tokens=False)["input_ids"] + [eos, 0, 0])
    assert (text, finished) == ("two", True) and length == len(tok("two", add_special_tokens=False)["input_ids"]) + 1


def _cli(folders, out, *extra):
    return CliRunner().invoke(app, ["rl", "--model", str(folders / "policy"), "--prompts",
                                    str(folders / "prompts.jsonl"), "--reward", "exact", "--steps", "2",
                                    "--max-new-tokens", "4", "--eval-samples", "4", "--set", "prompts_per_step=3",
                                    "--set", "group_size=3", "-o", str(out), *extra])


def test_cli_end_to_end_on_an_hf_model(folders, tmp_path):
    result = _cli(folders, tmp_path, "--regulariser", "reverse_kl", "--set", "checkpoint_every=1")
    assert result.exit_code == 0, result.output
    (run_dir,) = tmp_path.glob("rl-*")
    for name in ("results.json", "results.csv", "history.csv", "report.md", "pass_at_k.png", "config.yaml"):
        assert (run_dir / name).is_file(), name
    model = transformers.AutoModelForCausalLM.from_pretrained(run_dir / "model", local_files_only=True)
    assert transformers.AutoTokenizer.from_pretrained(run_dir / "model", local_files_only=True).chat_template
    from divergent.io import load_state

    state = load_state(run_dir / "checkpoints" / "step_2.ckpt")["model"]
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, state[key])
    results = json.loads((run_dir / "results.json").read_text())
    assert set(results["pass_at_k"]) == {"1", "2", "3", "4"} and results["train_reward_errors"] == 0
    report = (run_dir / "report.md").read_text()
    assert "reward exact" in report and "base (initial policy)" in report and "reward_timeout" in report


def test_kdrl_with_an_hf_teacher(folders, tmp_path):
    result = _cli(folders, tmp_path, "--regulariser", "kdrl", "--teacher", str(folders / "teacher"),
                  "--estimator", "full")
    assert result.exit_code == 0, result.output
    (run_dir,) = tmp_path.glob("rl-*")
    assert "kdrl_beta" in (run_dir / "history.csv").read_text().splitlines()[0]


@pytest.mark.parametrize("extra, message", [
    (["--teacher", "{other}", "--regulariser", "kdrl"], "--teacher .*other and --model .*: student and teacher use different tokenizers"),
    (["--regulariser", "kdrl"], "regulariser 'kdrl' needs a teacher: give --teacher PATH"),
    (["--reward", "regex:(["], "not a valid regular expression"),
    (["--reward", "nowhere_module_q:fn"], "cannot import the module 'nowhere_module_q'"),
], ids=["teacher-tokenizer", "no-teacher", "bad-regex", "no-module"])
def test_bad_input_is_one_line_and_leaves_no_run_folder(folders, tmp_path, extra, message):
    extra = [e.format(other=folders / "other") for e in extra]
    if extra[:1] == ["--reward"]:
        args = ["rl", "--model", str(folders / "policy"), "--prompts", str(folders / "prompts.jsonl"), *extra,
                "-o", str(tmp_path)]
        result = CliRunner().invoke(app, args)
    else:
        result = _cli(folders, tmp_path, *extra)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    assert re.search(message, result.output), result.output
    assert not list(tmp_path.glob("rl-*"))


def test_missing_model_and_rows_without_answer_are_one_line_errors(folders, tmp_path):
    result = CliRunner().invoke(app, ["rl", "--model", str(tmp_path / "nope"), "--prompts",
                                      str(folders / "prompts.jsonl"), "--reward", "exact", "-o", str(tmp_path)])
    assert result.exit_code == 2 and "--model" in result.output and "nope" in result.output
    no_answer = lm_helpers.write_jsonl(tmp_path / "q.jsonl", [{"prompt": "a", "answer": 1}, {"prompt": "b"}] * 3)
    result = CliRunner().invoke(app, ["rl", "--model", str(folders / "policy"), "--prompts", str(no_answer),
                                      "--reward", "math", "-o", str(tmp_path)])
    assert result.exit_code == 2 and "q.jsonl row 2 has no 'answer'" in result.output
    assert not list(tmp_path.glob("rl-*"))


def _hf_trainer(folders, regulariser, steps=4):
    from divergent.models.hf import load_causal_lm, load_tokenizer

    tok = load_tokenizer(folders / "policy")
    rows = arithmetic_rows()
    task = PromptTask(rows[:20], rows[20:], tok, RewardScorer(resolve_reward("regex:[0-9]"), timeout=0))
    config = GRPOConfig(steps=steps, prompts_per_step=3, group_size=3, max_new_tokens=4, lr=1e-2,
                        regulariser=regulariser, dph_probe_prompts=8, dph_probe_samples=4,
                        dph_solved_fraction=0.25, dph_batch_size=3)
    return GRPOTrainer(load_causal_lm(folders / "policy"), task, config)


@pytest.mark.parametrize("regulariser", ["dph", "reverse_kl"])
def test_ctrl_c_then_resume_equals_the_uninterrupted_run_on_an_hf_model(folders, tmp_path, regulariser):
    reference = _hf_trainer(folders, regulariser)
    drive(reference)
    assert any(r["mean_reward"] > 0 for r in reference.history)

    def ctrl_c(record):
        if record["step"] == 2:
            current_interrupt().request()

    checkpointer = Checkpointer(tmp_path / "ck")
    with pytest.raises(RunInterrupted, match="after step 2"):
        drive(_hf_trainer(folders, regulariser), checkpointer=checkpointer, on_step=ctrl_c)
    torch.manual_seed(99)
    resumed = _hf_trainer(folders, regulariser)
    drive(resumed, checkpointer=checkpointer, resume=True)
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
    assert strip(resumed.history) == strip(reference.history)
    for key, value in reference.policy.state_dict().items():
        torch.testing.assert_close(resumed.policy.state_dict()[key], value, rtol=0, atol=0)
