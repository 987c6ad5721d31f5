"""``divergent dpo`` end to end on a tiny Llama with a locally trained tokenizer: run folder, results,
the saved model, held-out accuracy moving the right way, every row format, Ctrl-C and --resume,
one-line errors."""

import json
import math

import pytest
import torch
from typer.testing import CliRunner

import lm_helpers
from divergent.cli import app
from divergent.data.preference import load_preference_data, tokenize_preference_rows
from divergent.models.hf import load_causal_lm

runner = CliRunner()


def _rows(n=40):
    """An easy preference set: the chosen answer is always the same fixed sentence."""
    rejected = ["the dog sat on the log", "numbers: one two three", "python is a programming language",
                "a quick brown fox jumps"]
    return [{"prompt": f"what is {i % 5} plus {(i * 3) % 7}?", "chosen": " i am fine, thank you very much.",
             "rejected": " " + rejected[i % len(rejected)]} for i in range(n)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dpo") / "model"
    tok = lm_helpers.tokenizer()
    lm_helpers.llama(len(tok), 32, 1, seed=0).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _invoke(*args):
    return runner.invoke(app, list(map(str, args)))


def _run_dir(out):
    (folder,) = [p for p in out.iterdir() if p.name.startswith("dpo-")]
    return folder


def test_dpo_end_to_end_moves_held_out_accuracy_and_saves_a_loadable_model(tmp_path, model_dir):
    data = lm_helpers.write_jsonl(tmp_path / "pairs.jsonl", _rows())
    result = _invoke("dpo", "--model", model_dir, "--data", data, "--divergence", "js", "--beta", "0.5",
                     "--steps", "8", "--batch-size", "8", "--lr", "3e-3", "--eval-fraction", "0.25",
                     "--threads", "1", "-o", tmp_path / "runs", "--set", "checkpoint_every=4")
    assert result.exit_code == 0, result.output
    run_dir = _run_dir(tmp_path / "runs")
    results = json.loads((run_dir / "results.json").read_text())
    before, after = results["before"], results["after"]
    # At the start the policy is the reference: every implicit reward is 0, the loss is log 2.
    assert before["accuracy"] == 0.0 and before["margin"] == 0.0 and before["loss"] == pytest.approx(math.log(2))
    assert after["accuracy"] == 1.0 and after["margin"] > 0 and after["loss"] < math.log(2)
    assert after["pairs"] == 10 and len(results["history"]) == 8
    assert {"results.csv", "report.md", "config.yaml", "model"} <= {p.name for p in run_dir.iterdir()}
    assert not (run_dir / "checkpoints").exists()
    assert "accuracy" in (run_dir / "results.csv").read_text().splitlines()[0]
    trained = load_causal_lm(run_dir / "model")
    with torch.no_grad():
        ids = torch.tensor([[1, 5, 9, 12]])
        assert not torch.equal(trained(ids).logits, load_causal_lm(model_dir)(ids).logits)
    assert (run_dir / "model" / "tokenizer.json").is_file()


def test_ctrl_c_names_the_resume_command_and_resume_finishes_the_run(tmp_path, model_dir, monkeypatch):
    from divergent.train import run

    data = lm_helpers.write_jsonl(tmp_path / "pairs.jsonl", _rows(16))
    original = run.drive

    def interrupted_drive(trainer, **kwargs):
        def stop(record):
            if record["step"] == 2:
                run.current_interrupt().request()
        return original(trainer, **{**kwargs, "on_step": stop})

    monkeypatch.setattr("divergent.experiments.dpo.drive", interrupted_drive)
    result = _invoke("dpo", "--model", model_dir, "--data", data, "--steps", "4", "--batch-size", "4", "--lr", "1e-3",
                     "-o", tmp_path / "runs")
    assert result.exit_code == 130
    run_dir = _run_dir(tmp_path / "runs")
    assert f"divergent dpo --resume {run_dir}" in result.output
    assert (run_dir / "model").is_dir()  # exported with the checkpoint written on Ctrl-C
    monkeypatch.setattr("divergent.experiments.dpo.drive", original)
    assert _invoke("dpo", "--resume", run_dir, "--steps", "5").exit_code == 2  # no other settings with --resume
    resumed = _invoke("dpo", "--resume", run_dir)
    assert resumed.exit_code == 0, resumed.output
    results = json.loads((run_dir / "results.json").read_text())
    assert [h["step"] for h in results["history"]] == [1, 2, 3, 4]
    # The uninterrupted run gives the same history and held-out numbers.
    fresh = _invoke("dpo", "--model", model_dir, "--data", data, "--steps", "4", "--batch-size", "4", "--lr", "1e-3",
                    "-o", tmp_path / "fresh")
    assert fresh.exit_code == 0, fresh.output
    uninterrupted = json.loads((_run_dir(tmp_path / "fresh") / "results.json").read_text())
    assert uninterrupted["history"] == results["history"] and uninterrupted["after"] == results["after"]


def test_row_formats_strings_conversations_and_implicit_prompts(tmp_path):
    tok = lm_helpers.tokenizer()
    user = [{"role": "user", "content": "what is two plus two?"}]
    good, bad = [{"role": "assistant", "content": "four."}], [{"role": "assistant", "content": "five."}]
    rows = [{"prompt": "what is two plus two?", "chosen": " four.", "rejected": " five."},
            {"prompt": user, "chosen": good, "rejected": bad},
            {"chosen": user + good, "rejected": user + bad}]
    (text, chat, implicit), stats = tokenize_preference_rows(rows, tok, max_length=64)
    assert stats.used == 3 and stats.truncated == 0
    assert tok.decode(text[1]) == " four.</s>" and tok.decode(text[2]) == " five.</s>"
    assert tok.decode(chat[0]) == "<|user|>what is two plus two?</s><|assistant|>"
    assert tok.decode(chat[1]) == "four.</s>" and tok.decode(chat[2]) == "five.</s>"
    assert implicit == chat  # the shared first message is the prompt
    # As TRL's DPOTrainer tokenizes: prompt + response whole, responses from where they differ.
    whole = tok("what is two plus two? four.</s>")["input_ids"]
    assert text[0] + text[1] == whole


def test_truncation_is_counted_and_pairs_with_nothing_left_are_skipped(tmp_path):
    tok = lm_helpers.tokenizer()
    prompt_len = len(tok("what is two plus two?")["input_ids"])
    rows = [{"prompt": "what is two plus two?", "chosen": " four, " * 10, "rejected": " five."},
            {"prompt": "what is two plus two?", "chosen": " four.", "rejected": " five."}]
    short = max(len(tok(f"what is two plus two? {w}.</s>")["input_ids"]) for w in ("four", "five"))
    pairs, stats = tokenize_preference_rows(rows, tok, max_length=short)
    assert stats.truncated == 1 and stats.used == 2
    assert all(len(p) + len(c) <= short and len(p) + len(r) <= short for p, c, r in pairs)
    _, stats = tokenize_preference_rows(rows, tok, max_length=prompt_len)
    assert stats.skipped_nothing_to_learn == 2 and stats.used == 0


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".json", "disk"])
def test_every_file_format_reads_the_same_pairs(tmp_path, suffix):
    import datasets

    tok = lm_helpers.tokenizer()
    rows = _rows(6)
    rows[0] = {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "hello"}],
               "rejected": [{"role": "assistant", "content": "go away"}]}
    path = tmp_path / f"pairs{suffix}"
    if suffix == ".csv":
        import csv

        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["prompt", "chosen", "rejected"])
            writer.writeheader()
            for row in rows:
                writer.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in row.items()})
    elif suffix == ".json":
        path.write_text(json.dumps(rows))
    elif suffix == ".parquet":
        rows = rows[1:]  # a Parquet column holds one type
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    else:
        rows = rows[1:]
        datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                              "test": datasets.Dataset.from_list(rows[:2])}).save_to_disk(str(path))
    expected, _ = tokenize_preference_rows(rows, tok, max_length=64)
    data = load_preference_data(path, tok, eval_fraction=0.5, max_length=64, seed=1)
    got = data.train + data.eval if suffix != "disk" else data.train
    assert sorted(map(str, got)) == sorted(map(str, expected))
    if suffix == "disk":
        assert data.eval == expected[:2]  # the DatasetDict's test split


def test_bad_input_is_one_line_and_exit_2(tmp_path, model_dir):
    data = lm_helpers.write_jsonl(tmp_path / "pairs.jsonl", _rows(6) + [{"prompt": "hi", "chosen": "hello"}])  # the 7th row
    out = tmp_path / "runs"
    cases = [
        (["--model", model_dir, "--data", data], f"{data} row 7: missing 'rejected'"),
        (["--model", tmp_path / "nope", "--data", data], "--model: "),
        (["--model", model_dir, "--data", data, "--divergence", "revers_kl"], "did you mean 'reverse_kl'"),
        (["--model", model_dir, "--data", tmp_path / "missing.jsonl"], "missing.jsonl not found"),
        (["--data", data], "model is required"),
        (["--model", model_dir, "--data", data, "--divergence", "alpha", "--alpha", "1.5"], "alpha must be in (0, 1)"),
    ]
    for args, message in cases:
        result = runner.invoke(app, ["dpo", *map(str, args), "-o", str(out)])
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output and "Traceback" not in result.output, (message, result.output)
        assert len(result.output.strip().splitlines()) == 1, result.output
    assert not out.exists() or not any(out.iterdir())  # a run that failed before training leaves no folder
