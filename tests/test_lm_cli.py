"""`divergent distill-lm` and `divergent cache-teacher` end to end at toy sizes."""

import csv
import json

import pytest
from typer.testing import CliRunner

from divergent.cli import app

TINY = ["--steps", "3", "--teacher-steps", "3", "--seq-len", "16", "--batch-size", "4",
        "--max-train-bytes", "20000", "--max-val-bytes", "4000", "--eval-windows", "4"]


def _rows(run_root):
    (run_dir,) = list(run_root.glob("distill-lm-*"))
    with open(run_dir / "results.csv") as handle:
        return run_dir, list(csv.DictReader(handle))


def test_distill_lm_compares_divergences_and_writes_report(tmp_path):
    result = CliRunner().invoke(app, ["distill-lm", *TINY, "--divergences", "forward_kl,js", "-o", str(tmp_path)])
    assert result.exit_code == 0, result.output
    run_dir, rows = _rows(tmp_path)
    assert [(r["model"], r["divergence"]) for r in rows] == [
        ("teacher", "-"), ("scratch", "-"), ("distilled", "forward_kl"), ("distilled", "js")]
    for row in rows[1:]:
        assert 0 < float(row["val_bpb"]) < 9 and float(row["tok_per_s"]) > 0 and float(row["peak_mb"]) > 0
        assert 0 <= float(row["top1_agree"]) <= 1
    for name in ("results.json", "results.md", "losses.png"):
        assert (run_dir / name).is_file()
    assert "forward_kl" in (run_dir / "results.md").read_text()
    # The teacher is cached: a second run loads it instead of training.
    again = CliRunner().invoke(app, ["distill-lm", *TINY, "-o", str(tmp_path / "again")])
    assert again.exit_code == 0 and "loaded from cache" in again.output


def test_cache_teacher_then_distill_from_cache(tmp_path):
    cache = tmp_path / "cache"
    result = CliRunner().invoke(app, ["cache-teacher", "--out", str(cache), "--k", "8", "--seq-len", "16",
                                      "--max-sequences", "40", "--teacher-steps", "3",
                                      "--max-train-bytes", "20000", "--sequences-per-shard", "16",
                                      "--batch-size", "8"])
    assert result.exit_code == 0, result.output
    index = json.loads((cache / "index.json").read_text())
    assert index["total_sequences"] == 40 and len(index["shards"]) == 3 and index["k"] == 8
    assert "bytes_per_token" in result.output
    result = CliRunner().invoke(app, ["distill-lm", *TINY, "--teacher-cache", str(cache), "-o", str(tmp_path / "runs")])
    assert result.exit_code == 0, result.output
    _, rows = _rows(tmp_path / "runs")
    assert rows[-1]["model"] == "distilled"


def test_local_hf_teacher_and_student(tmp_path):
    transformers = pytest.importorskip("transformers")
    for name, width in (("teacher", 32), ("student", 16)):
        config = transformers.GPT2Config(n_layer=1, n_embd=width, n_head=2, vocab_size=256, n_positions=64,
                                         bos_token_id=0, eos_token_id=0)
        transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / name)
    result = CliRunner().invoke(app, ["distill-lm", *TINY, "--teacher", str(tmp_path / "teacher"),
                                      "--student", str(tmp_path / "student"), "-o", str(tmp_path / "runs")])
    assert result.exit_code == 0, result.output
    _, rows = _rows(tmp_path / "runs")
    assert len(rows) == 3


def test_bad_arguments_are_reported(tmp_path):
    result = CliRunner().invoke(app, ["distill-lm", "--divergences", "kl", "-o", str(tmp_path)])
    assert result.exit_code != 0 and "unknown" in result.output.lower()
    result = CliRunner().invoke(app, ["distill-lm", "--teacher", str(tmp_path), "-o", str(tmp_path)])
    assert result.exit_code != 0 and "--student" in result.output


def test_distill_lm_refuses_to_run_once_per_rank(monkeypatch, tmp_path):
    """Under torchrun each rank would repeat the whole comparison: a clear error instead."""
    from typer.testing import CliRunner

    from divergent.cli import app

    monkeypatch.setenv("WORLD_SIZE", "2")
    result = CliRunner().invoke(app, ["distill-lm", "--out-dir", str(tmp_path)])
    assert result.exit_code != 0
    assert "runs in one process" in result.output
    assert not list(tmp_path.iterdir())
