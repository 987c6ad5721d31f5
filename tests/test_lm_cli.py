"""`divergent distill-lm` and `divergent cache-teacher` as a user runs them: the default run at toy
sizes, the user's own tiny HF models and data files, the teacher cache, resume, and one-line errors."""

import csv
import json
import os
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from divergent.cli import app

pytest.importorskip("transformers")
import lm_helpers as H  # noqa: E402

TINY = ["--steps", "3", "--teacher-steps", "3", "--batch-size", "4", "--set", "max_train_bytes=20000",
        "--set", "max_val_bytes=4000", "--set", "max_eval_examples=4", "--threads", "1", "--set", "seeds=[]"]


def _run(args):
    result = CliRunner().invoke(app, args)
    return result


def _rows(run_root):
    (run_dir,) = [p for p in run_root.iterdir() if p.name.startswith("distill-lm-")]
    with open(run_dir / "results.csv") as handle:
        return run_dir, list(csv.DictReader(handle))


def test_default_run_compares_divergences_writes_report_and_models(tmp_path):
    result = _run(["distill-lm", *TINY, "--divergences", "forward_kl,js", "-o", str(tmp_path)])
    assert result.exit_code == 0, result.output
    run_dir, rows = _rows(tmp_path)
    assert [(r["model"], r["divergence"]) for r in rows] == [
        ("teacher", "-"), ("scratch", "-"), ("distilled", "forward_kl"), ("distilled", "js")]
    for row in rows[1:]:
        assert 0 < float(row["eval_loss"]) < 9 and float(row["tokens_per_s"]) > 0 and float(row["peak_mb"]) > 0
        assert float(row["bits_per_byte"]) == pytest.approx(float(row["eval_loss"]) / 0.6931471805599453, rel=1e-6)
        assert 0 <= float(row["top1_agreement"]) <= 1 and float(row["kl_teacher"]) > 0
    for name in ("results.json", "report.md", "curves.png", "config.yaml"):
        assert (run_dir / name).is_file()
    assert "forward_kl" in (run_dir / "report.md").read_text()
    from divergent.models.hf import load_causal_lm

    student = load_causal_lm(run_dir / "runs" / "js" / "model")  # save_pretrained at the end
    assert sum(p.numel() for p in student.parameters()) == int(rows[-1]["params"])
    # The teacher is cached: a second run loads it instead of training.
    again = _run(["distill-lm", *TINY, "-o", str(tmp_path / "again")])
    assert again.exit_code == 0 and "loaded from cache" in again.output


def test_user_models_and_chat_data_with_truncation_and_skips_counted(tmp_path):
    teacher, student, tokenizer = H.save_pair(tmp_path)
    rows = H.chat_rows(20) + [{"messages": [{"role": "user", "content": "hi"}]}]  # no assistant turn
    data = H.write_jsonl(tmp_path / "chat.jsonl", rows)
    result = _run(["distill-lm", "--teacher", str(teacher), "--student", str(student), "--data", str(data),
                   "--max-length", "30", "--steps", "3", "--batch-size", "4", "-d", "reverse_kl",
                   "--eval-fraction", "0.2", "-o", str(tmp_path / "runs")])
    assert result.exit_code == 0, result.output
    run_dir, table = _rows(tmp_path / "runs")
    assert [r["model"] for r in table] == ["teacher", "scratch", "distilled"]
    assert "bits_per_byte" not in table[0]  # BPE tokens, not bytes
    results = json.loads((run_dir / "results.json").read_text())
    stats = results["data_stats"]
    assert stats["train"]["rows"] + stats["eval"]["rows"] == 21
    assert stats["train"]["truncated"] + stats["eval"]["truncated"] == 20  # every conversation is longer than 30
    assert stats["train"]["skipped_nothing_to_learn"] + stats["eval"]["skipped_nothing_to_learn"] == 1
    assert "truncated" in result.output and "skipped with nothing to learn" in result.output
    # The distilled student is a save_pretrained folder with the tokenizer: it loads and generates.
    import transformers

    model_dir = run_dir / "runs" / "reverse_kl" / "model"
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    loaded = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    assert loaded.get_vocab() == tokenizer.get_vocab() and loaded.chat_template == tokenizer.chat_template
    prompt = loaded.apply_chat_template([{"role": "user", "content": "what is 1 plus 2?"}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    assert model.generate(**prompt, max_new_tokens=3, do_sample=False).shape[1] == prompt["input_ids"].shape[1] + 3


@pytest.mark.parametrize("kind", ["csv", "parquet", "txt", "saved"])
def test_every_file_format_trains(tmp_path, kind):
    datasets = pytest.importorskip("datasets")
    teacher, student, _ = H.save_pair(tmp_path)
    if kind == "csv":
        path = tmp_path / "rows.csv"
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, ["prompt", "completion"])
            writer.writeheader()
            writer.writerows(H.prompt_completion_rows(10) + [{"prompt": "empty", "completion": ""}])
    elif kind == "parquet":
        path = tmp_path / "rows.parquet"
        datasets.Dataset.from_list(H.text_rows(10)).to_parquet(str(path))
    elif kind == "txt":
        path = tmp_path / "notes.txt"
        path.write_text("\n".join(H.CORPUS[:10]))
    else:
        path = tmp_path / "saved"
        datasets.DatasetDict({"train": datasets.Dataset.from_list(H.chat_rows(8)),
                              "test": datasets.Dataset.from_list(H.chat_rows(2))}).save_to_disk(str(path))
    extra = ["--packing", "--max-length", "24"] if kind == "txt" else []
    result = _run(["distill-lm", "--teacher", str(teacher), "--student", str(student), "--data", str(path),
                   "--steps", "2", "--batch-size", "2", "--set", "evaluations=1", "-o", str(tmp_path / "runs"), *extra])
    assert result.exit_code == 0, result.output
    run_dir, _ = _rows(tmp_path / "runs")
    stats = json.loads((run_dir / "results.json").read_text())["data_stats"]
    if kind == "csv":
        assert stats["train"]["skipped_nothing_to_learn"] + stats["eval"]["skipped_nothing_to_learn"] == 1
    if kind == "saved":
        assert stats["eval"]["rows"] == 2  # the DatasetDict's test split
    if kind == "txt":
        assert "packed into" in json.loads((run_dir / "results.json").read_text())["data"]


def test_cache_teacher_on_user_data_then_distil_with_no_teacher_in_memory(tmp_path):
    teacher, student, _ = H.save_pair(tmp_path)
    data = H.write_jsonl(tmp_path / "pc.jsonl", H.prompt_completion_rows(16))
    cache = tmp_path / "cache"
    result = _run(["cache-teacher", "--teacher", str(teacher), "--data", str(data), "--k", "8",
                   "--sequences-per-shard", "5", "-o", str(cache)])
    assert result.exit_code == 0, result.output
    index = json.loads((cache / "index.json").read_text())
    assert index["k"] == 8 and index["total_sequences"] == {"train": 15, "eval": 1}
    assert index["bytes_per_token"] > 0 and "teacher cache written to" in result.output
    args = ["--student", str(student), "--steps", "2", "--batch-size", "4", "-d", "forward_kl", "--threads", "1"]
    result = _run(["distill-lm", "--teacher-cache", str(cache), *args, "-o", str(tmp_path / "runs")])
    assert result.exit_code == 0, result.output
    run_dir, rows = _rows(tmp_path / "runs")
    # The cache's teacher loss on its evaluation rows equals the live teacher's on the same rows.
    live = _run(["distill-lm", "--teacher", str(teacher), "--data", str(data), *args, "-o", str(tmp_path / "live")])
    assert live.exit_code == 0, live.output
    _, live_rows = _rows(tmp_path / "live")
    assert float(rows[0]["eval_loss"]) == pytest.approx(float(live_rows[0]["eval_loss"]), rel=1e-3)
    assert "cached top-k teacher" in (run_dir / "report.md").read_text()
    # Another tokenizer than the cache's is refused.
    other = tmp_path / "other"
    H.llama(400, 32, 1).save_pretrained(other)
    H.tokenizer(400).save_pretrained(other)
    refused = _run(["distill-lm", "--teacher-cache", str(cache), "--student", str(other), "-o", str(tmp_path / "x")])
    assert refused.exit_code == 2 and "another tokenizer" in refused.output


def _cli(args, tmp_path, **env):
    return subprocess.run([sys.executable, "-m", "divergent.cli", *args], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "DIVERGENT_CACHE_DIR": str(tmp_path / "cache"), **env}, timeout=300)


def test_user_errors_are_one_line_exit_2_and_leave_no_run_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    teacher, student, _ = H.save_pair(tmp_path)
    H.write_jsonl(tmp_path / "qa.jsonl", [{"question": "a", "answer": "b"}] * 3)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text((student / "config.json").read_text())
    (tmp_path / "broken" / "model.safetensors").write_bytes(b"not weights")
    other = tmp_path / "other"
    H.llama(400, 32, 1).save_pretrained(other)
    H.tokenizer(400).save_pretrained(other)
    pair = ["--teacher", "teacher", "--student", "student"]
    cases = [
        ([*pair, "--data", "missing.jsonl"], "--data: missing.jsonl not found; expected files .jsonl, .json, .csv"),
        ([*pair, "--data", "qa.jsonl"], "qa.jsonl: no column this command can train on; found columns ['question', "
                                        "'answer']; accepted row formats: 'messages'"),
        (["--teacher", "other", "--student", "student", "--data", "qa.jsonl"],
         "different tokenizers (300 vs 400 tokens"),
        (["--teacher", "broken", "--student", "student", "--data", "qa.jsonl"],
         "--teacher: could not load a causal LM from broken (weights: model.safetensors)"),
        (["--teacher", "nowhere", "--student", "student"], "--teacher: nowhere is not a local directory"),
        (["--teacher", "teacher"], "give --student PATH too"),
        (["-d", "kl"], "unknown divergence 'kl'"),
        (["--set", "divergence_params={js: {bta: 0.2}}", "-d", "js"], "did you mean 'beta'"),
    ]
    for args, message in cases:
        result = _run(["distill-lm", *args, "-o", "runs"])
        assert result.exit_code == 2, (args, result.output)
        assert message in " ".join(result.output.split()), (args, result.output)
    # As a user sees it: one line on stderr, no traceback; --debug shows it.
    result = _cli(["distill-lm", "--teacher", "other", "--student", "student", "--data", "qa.jsonl", "-o", "runs"],
                  tmp_path)
    assert result.returncode == 2
    assert "give --cross-tokenizer uld" in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_resume_continues_the_interrupted_student_and_keeps_finished_ones(tmp_path, monkeypatch):
    args = [*TINY, "--steps", "6", "-d", "forward_kl", "--set", "checkpoint_every=2", "-o", str(tmp_path)]
    reference = _run(["distill-lm", *args[:-1], str(tmp_path / "reference")])
    assert reference.exit_code == 0, reference.output
    H.ctrl_c_in_student(monkeypatch, 2, 3)  # the distilled student: Ctrl-C after its step 3
    first = _run(["distill-lm", *args])
    assert first.exit_code == 130
    (run_dir,) = [p for p in tmp_path.iterdir() if p.name.startswith("distill-lm-")]
    assert f"divergent distill-lm --resume {run_dir}" in " ".join(first.output.split())
    assert (run_dir / "runs" / "scratch" / "result.json").is_file()
    assert (run_dir / "runs" / "forward_kl" / "model" / "config.json").is_file()  # exported at the checkpoint
    monkeypatch.undo()
    resumed = _run(["distill-lm", "--resume", str(run_dir)])
    assert resumed.exit_code == 0, resumed.output
    assert "scratch: already finished" in resumed.output
    _, rows = _rows(tmp_path)
    _, want = _rows(tmp_path / "reference")
    for row, expected in zip(rows, want):
        for key in ("eval_loss", "kl_teacher", "top1_agreement"):
            assert float(row[key]) == pytest.approx(float(expected[key]), rel=1e-6), key
    (run_dir / "config.yaml").write_text("")
    broken = _run(["distill-lm", "--resume", str(run_dir)])
    assert broken.exit_code == 2 and "config.yaml is empty" in broken.output


def test_config_file_and_help(tmp_path):
    config = tmp_path / "lm.yaml"
    config.write_text("steps: 2\nteacher_steps: 2\nbatch_size: 2\nmax_train_bytes: 20000\nmax_val_bytes: 4000\n"
                      "max_eval_examples: 2\ndivergences: [tvd]\ninclude_scratch: false\nnum_threads: 1\nseeds: []\n")
    result = _run(["distill-lm", "-c", str(config), "-o", str(tmp_path)])
    assert result.exit_code == 0, result.output
    _, rows = _rows(tmp_path)
    assert [r["divergence"] for r in rows] == ["-", "tvd"]
    help_text = " ".join(_run(["distill-lm", "--help"]).output.split())
    for option in ("--data", "--eval-data", "--max-length", "--packing", "--teacher-cache", "--resume", "--set"):
        assert option in help_text
    assert "[tokens, vocab]" in help_text


def test_distill_lm_refuses_to_run_once_per_rank(monkeypatch, tmp_path):
    """Under torchrun each rank would repeat the whole comparison: a clear error instead."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    result = _run(["distill-lm", "--out-dir", str(tmp_path)])
    assert result.exit_code == 2 and "runs in one process" in result.output
    assert not list(tmp_path.iterdir())


def test_an_interrupted_cache_teacher_resumes_to_the_same_cache(tmp_path, monkeypatch):
    from divergent.data import teacher_cache

    teacher, _, _ = H.save_pair(tmp_path)
    data = H.write_jsonl(tmp_path / "rows.jsonl", H.text_rows(20))
    args = ["--teacher", str(teacher), "--data", str(data), "--k", "4", "--batch-size", "2",
            "--sequences-per-shard", "4", "--max-length", "16"]
    whole = _run(["cache-teacher", *args, "-o", str(tmp_path / "whole")])
    assert whole.exit_code == 0, whole.output
    real, calls = teacher_cache.teacher_topk, []

    def ctrl_c_on_the_fifth_batch(*a, **k):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(teacher_cache, "teacher_topk", ctrl_c_on_the_fifth_batch)
    cut = _run(["cache-teacher", *args, "-o", str(tmp_path / "cut")])
    assert cut.exit_code == 130 and f"divergent cache-teacher --resume {tmp_path / 'cut'}" in " ".join(cut.output.split())
    assert not (tmp_path / "cut" / "index.json").exists()
    monkeypatch.setattr(teacher_cache, "teacher_topk", real)
    again = _run(["cache-teacher", *args, "-o", str(tmp_path / "cut")])
    assert again.exit_code == 2 and "--resume" in again.output  # not silently restarted over the kept shards
    resumed = _run(["cache-teacher", "--resume", str(tmp_path / "cut")])
    assert resumed.exit_code == 0, resumed.output
    from divergent.data.teacher_cache import TeacherCache

    for split in ("train", "eval"):
        a, b = TeacherCache(tmp_path / "whole", split), TeacherCache(tmp_path / "cut", split)
        assert len(a) == len(b)
        for i in range(len(a)):
            assert torch.equal(a.example(i)["teacher_indices"], b.example(i)["teacher_indices"])
