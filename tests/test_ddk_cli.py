"""`divergent distill-lm --domain-column COL --mixing ddk|uniform|proportional` as a user runs it: the
per-domain report (table, domains.csv, report.md, domain_weights.png), the weights in results.json
following DDK's rule, resume after Ctrl-C equal to the uninterrupted run, and one-line errors."""

import csv
import json
import random
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from divergent.cli import app
from signal_helpers import ctrl_c_in_drive

TINY = ["--steps", "6", "--teacher-steps", "3", "--batch-size", "4", "--max-length", "32", "--threads", "1",
        "--set", "max_eval_examples=3", "--set", "evaluations=2"]


def _corpus(path, n=24, extra_prose=0):
    """Three domains of different difficulty for a byte-level model: words, digits, code lines."""
    rng = random.Random(0)
    words = "the cat sat on a mat while dogs ran across green fields".split()
    rows = []
    for i in range(n):
        rows.append({"text": " ".join(rng.choice(words) for _ in range(6)), "kind": "prose"})
        rows.append({"text": " ".join(str(rng.randint(0, 999)) for _ in range(6)), "kind": "numbers"})
        rows.append({"text": f"def f{i}(x):\n    return x * {i}", "kind": "code"})
    rows += [{"text": f"a dog and a cat number {i}", "kind": "prose"} for i in range(extra_prose)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _run_dir(root):
    (run_dir,) = [p for p in root.iterdir() if p.name.startswith("distill-lm-")]
    return run_dir


def _csv(path):
    with open(path) as handle:
        return list(csv.DictReader(handle))


def test_ddk_run_reports_per_domain_and_follows_the_update_rule(tmp_path):
    data = _corpus(tmp_path / "mix.jsonl")
    result = CliRunner().invoke(app, ["distill-lm", *TINY, "--data", str(data), "--domain-column", "kind",
                                      "--mixing", "ddk", "--ddk-interval", "2", "--ddk-smoothing", "0.5",
                                      "--hard-weight", "1", "--soft-weight", "0.2", "-o", str(tmp_path / "runs")])
    assert result.exit_code == 0, result.output
    run_dir = _run_dir(tmp_path / "runs")
    assert "per domain (ddk mixing by 'kind')" in result.output
    for name in ("domains.csv", "domain_weights.png", "report.md", "results.json"):
        assert (run_dir / name).is_file(), name
    assert "## Domains" in (run_dir / "report.md").read_text()
    table = _csv(run_dir / "domains.csv")
    assert [(r["model"], r["domain"]) for r in table] == [
        (m, d) for m in ("scratch", "forward_kl") for d in ("code", "numbers", "prose")]
    results = json.loads((run_dir / "results.json").read_text())
    for row in results["rows"]:
        info = row["domains"]
        history = info["history"]
        assert [h["step"] for h in history] == [0, 2, 4, 6]
        teacher = np.array(info["teacher_ppl"])
        ratio = np.array(history[0]["student_ppl"]) / teacher
        np.testing.assert_allclose(history[0]["weights"], np.exp(ratio) / np.exp(ratio).sum(), rtol=1e-9)
        for before, after in zip(history[:2], history[1:3]):
            psi = np.array(before["weights"]) * np.exp(np.array(after["student_ppl"]) / teacher)
            np.testing.assert_allclose(after["weights"], 0.5 * psi / psi.sum() + 0.5 / 3, rtol=1e-9)
        assert sum(info["drawn"]) == 6 * 4
        # the table's numbers are the result's
        mine = [r for r in table if r["model"] == row["label"]]
        assert [float(r["ppl_after"]) for r in mine] == pytest.approx(info["after"], rel=1e-3)
        assert [float(r["teacher_ppl"]) for r in mine] == pytest.approx(info["teacher_ppl"], rel=1e-3)


@pytest.mark.parametrize("mixing, expected", [("uniform", [1 / 3] * 3), ("proportional", [0.25, 0.25, 0.5])])
def test_fixed_mixings_run_and_report(tmp_path, mixing, expected):
    data = _corpus(tmp_path / "mix.jsonl", extra_prose=24)
    result = CliRunner().invoke(app, ["distill-lm", *TINY, "--steps", "2", "--data", str(data), "--domain-column",
                                      "kind", "--mixing", mixing, "--set", "include_scratch=false",
                                      "-o", str(tmp_path / "runs")])
    assert result.exit_code == 0, result.output
    table = _csv(_run_dir(tmp_path / "runs") / "domains.csv")
    weights = [float(r["final_weight"]) for r in table]
    # held out: round(0.05 * 24) = 1 row of code and numbers, 2 of prose: 23, 23, 46 training rows
    assert weights == pytest.approx(expected)


def test_interrupted_ddk_run_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    from divergent.experiments import lm as experiment

    data = _corpus(tmp_path / "mix.jsonl")
    args = [*TINY, "--data", str(data), "--domain-column", "kind", "--ddk-interval", "2", "-d", "forward_kl",
            "--set", "include_scratch=false", "--set", "checkpoint_every=2"]
    reference = CliRunner().invoke(app, ["distill-lm", *args, "-o", str(tmp_path / "reference")])
    assert reference.exit_code == 0, reference.output
    ctrl_c_in_drive(monkeypatch, experiment, 3)  # between two DDK updates (2 and 4)
    first = CliRunner().invoke(app, ["distill-lm", *args, "-o", str(tmp_path / "runs")])
    assert first.exit_code == 130, first.output
    monkeypatch.undo()
    run_dir = _run_dir(tmp_path / "runs")
    resumed = CliRunner().invoke(app, ["distill-lm", "--resume", str(run_dir)])
    assert resumed.exit_code == 0, resumed.output
    got = json.loads((run_dir / "results.json").read_text())["rows"][0]
    want = json.loads((_run_dir(tmp_path / "reference") / "results.json").read_text())["rows"][0]
    assert [h["weights"] for h in got["domains"]["history"]] == [h["weights"] for h in want["domains"]["history"]]
    assert got["domains"]["drawn"] == want["domains"]["drawn"]
    assert got["domains"]["after"] == pytest.approx(want["domains"]["after"], rel=1e-9)
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-9)


def test_bad_domain_input_is_one_line_exit_2(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _corpus(tmp_path / "mix.jsonl")
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps({"text": "1 2 3", "kind": k}) + "\n"
                                                 for k in ("prose", "numbers")))
    (tmp_path / "lonely.jsonl").write_text("".join(json.dumps({"text": f"row {i}", "kind": "a" if i else "b"}) + "\n"
                                                   for i in range(5)))
    data = ["--data", "mix.jsonl"]
    cases = [
        ([*data, "--domain-column", "topic"], "mix.jsonl: no domain column 'topic'; found columns ['text', 'kind']"),
        ([*data, "--domain-column", "kind", "--eval-data", "eval.jsonl"],
         "eval.jsonl: domain 'code' has no evaluation rows"),
        (["--data", "lonely.jsonl", "--domain-column", "kind"], "domain 'b' has 1 row, too few to hold evaluation rows"),
        ([*data, "--mixing", "ddk"], "mixing 'ddk' draws rows by domain and needs a domain column"),
        ([*data, "--domain-column", "kind", "--mixing", "ddkk"], "did you mean 'ddk'"),
        ([*data, "--domain-column", "kind", "--ddk-interval", "0"], "ddk_interval must be an int >= 1"),
        ([*data, "--domain-column", "kind", "--ddk-smoothing", "1.5"], "ddk_smoothing must be in [0, 1]"),
        (["--domain-column", "kind"], "domain_column 'kind' needs --data FILE"),
    ]
    for args, message in cases:
        result = CliRunner().invoke(app, ["distill-lm", *TINY, *args, "-o", "runs"])
        assert result.exit_code == 2, (args, result.output)
        assert message in " ".join(result.output.split()), (args, result.output)
    # as a user sees it: one line on stderr, no traceback, no run folder
    process = subprocess.run([sys.executable, "-m", "divergent.cli", "distill-lm", *data, "--domain-column", "topic",
                              "-o", "runs"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert process.returncode == 2
    assert process.stderr.count("\n") == 1 and "Traceback" not in process.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_user_hf_models_with_a_domain_column(tmp_path):
    """A tiny Llama pair with their tokenizer (tests/lm_helpers.py) and prompt/completion rows in two domains."""
    pytest.importorskip("transformers")
    import lm_helpers as H

    teacher, student, _ = H.save_pair(tmp_path)
    rows = [{**row, "task": "parity"} for row in H.prompt_completion_rows(12)]
    rows += [{"prompt": f"what is {i} plus {i}?", "completion": f" {2 * i}.", "task": "sums"} for i in range(12)]
    data = H.write_jsonl(tmp_path / "tasks.jsonl", rows)
    result = CliRunner().invoke(app, ["distill-lm", "--teacher", str(teacher), "--student", str(student), "--data",
                                      str(data), "--domain-column", "task", "--ddk-interval", "1", "--steps", "3",
                                      "--batch-size", "4", "--threads", "1", "--set", "include_scratch=false",
                                      "-o", str(tmp_path / "runs")])
    assert result.exit_code == 0, result.output
    row = json.loads((_run_dir(tmp_path / "runs") / "results.json").read_text())["rows"][0]
    assert row["domains"]["names"] == ["parity", "sums"]
    assert [h["step"] for h in row["domains"]["history"]] == [0, 1, 2, 3]
    assert all(p > 1 for p in row["domains"]["teacher_ppl"] + row["domains"]["after"])
