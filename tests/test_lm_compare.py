"""`divergent distill-lm --seeds`: every row on every seed, the shared marking rule and verdict, generation
quality, GKD λ rows, resume after SIGKILL, and one-line errors — at toy sizes."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from divergent.cli import app
from divergent.experiments import lm_compare
from divergent.experiments.lm import DistillLMConfig

pytest.importorskip("transformers")
import lm_helpers as H  # noqa: E402

TINY_DATA = ["--steps", "4", "--teacher-steps", "3", "--batch-size", "4", "--set", "max_train_bytes=20000",
             "--set", "max_val_bytes=4000", "--set", "max_eval_examples=4", "--threads", "1",
             "--set", "checkpoint_every=2", "--set", "evaluations=2"]
TINY = [*TINY_DATA, "--set", "max_new_tokens=8"]
SRC = str(Path(__file__).resolve().parents[1] / "src")


def _run(args):
    return CliRunner().invoke(app, args)


def _run_dir(root: Path) -> Path:
    (run_dir,) = [p for p in root.iterdir() if p.name.startswith("distill-lm-")]
    return run_dir


def _csv(path: Path) -> list[dict]:
    with open(path) as handle:
        return list(csv.DictReader(handle))


def test_rows_names_and_baseline():
    config = DistillLMConfig(divergences=["forward_kl", "reverse_kl"], seeds=[0, 1], on_policy_fractions=[0, 0.5])
    rows = lm_compare.comparison_rows(config)
    assert [r.name for r in rows] == ["student alone", "forward_kl λ=0", "forward_kl λ=0.5", "reverse_kl λ=0",
                                      "reverse_kl λ=0.5"]
    assert [r.on_policy for r in rows] == [0.0, 0.0, 0.5, 0.0, 0.5]
    assert lm_compare.baseline_row(config) == "forward_kl λ=0"
    one = DistillLMConfig(divergences=["js", "tvd"], seeds=[0], baseline="tvd", include_scratch=False)
    assert [r.name for r in lm_compare.comparison_rows(one)] == ["js", "tvd"]
    assert lm_compare.baseline_row(one) == "tvd"


def test_rouge_l_and_distinct_n_by_hand():
    # LCS("a b c d", "a x c y") = "a c": P = R = 2/4, F = 0.5; "a b" vs "b a": LCS 1, F = 0.5.
    assert lm_compare.rouge_l(["a b c d", "a b", "p q"], ["a x c y", "b a", "r s"]) == pytest.approx([0.5, 0.5, 0.0])
    # Unigrams a b a b c: 3 distinct of 5; bigrams ab ba ab bc: 3 distinct of 4.
    assert lm_compare.distinct_n(["a b a", "b c"], 1) == pytest.approx(3 / 5)
    assert lm_compare.distinct_n(["a b a b c"], 2) == pytest.approx(3 / 4)
    assert lm_compare.distinct_n(["", "x"], 2) == 0.0


def test_default_data_comparison_over_seeds_writes_the_shared_report(tmp_path):
    result = _run(["distill-lm", *TINY, "-d", "forward_kl,reverse_kl", "--seeds", "0,1", "--generation-prompts", "3",
                   "-o", str(tmp_path)])
    assert result.exit_code == 0, result.output
    run_dir = _run_dir(tmp_path)
    runs = _csv(run_dir / "results.csv")
    assert sorted((r["name"], r["seed"]) for r in runs) == sorted(
        (n, s) for n in ("student alone", "forward_kl", "reverse_kl") for s in ("0", "1"))
    for seed in (0, 1):
        for row in ("student-alone", "forward_kl", "reverse_kl"):
            assert (run_dir / f"seed{seed}" / "runs" / row / "result.json").is_file()
            assert (run_dir / f"seed{seed}" / "runs" / row / "generation.json").is_file()
    summary = {r["name"]: r for r in _csv(run_dir / "summary.csv")}
    # The paired difference is the mean over seeds of row − student alone, recomputed here from results.csv.
    by = {(r["name"], r["seed"]): float(r["loss"]) for r in runs}
    diffs = [by[("forward_kl", s)] - by[("student alone", s)] for s in ("0", "1")]
    assert float(summary["forward_kl"]["loss_diff_alone"]) == pytest.approx(sum(diffs) / 2)
    for row in runs:
        assert 0.0 <= float(row["rouge_l"]) <= 1.0 and 0.0 <= float(row["distinct_1"]) <= 1.0
    text = (run_dir / "report.md").read_text().splitlines()
    assert text[0] == "# divergent distill-lm — which divergence"
    assert text[2].startswith("Verdict (evaluation loss, mean of 2 seeds): best row **")
    assert "## Why this regime" in text and "## Results" in text
    for name in ("curves.png", "rouge_vs_kl.png", "results.json", "config.yaml"):
        assert (run_dir / name).is_file()
    results = json.loads((run_dir / "results.json").read_text())
    assert results["resolutions"]["top1_agreement"] == pytest.approx(1 / 4)  # four evaluation examples
    assert results["resolutions"]["rouge_l"] == pytest.approx(1 / 3)  # three held-out prompts


def test_prompt_completion_data_with_on_policy_rows_and_a_reward_that_raises(tmp_path, monkeypatch):
    """--on-policy 0,1 gives two rows per divergence; a reward that raises scores 0 and is counted, not fatal."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "flaky_reward.py").write_text(
        "def score(prompts, completions, **kw):\n    raise RuntimeError('broken reward')\n")
    teacher, student, _ = H.save_pair(tmp_path)
    data = H.write_jsonl(tmp_path / "pc.jsonl", H.prompt_completion_rows(24))
    result = _run(["distill-lm", "--teacher", str(teacher), "--student", str(student), "--data", str(data),
                   "-d", "forward_kl", "--seeds", "0,1", "--on-policy", "0,1", "--steps", "2", "--batch-size", "2",
                   "--generation-prompts", "2", "--reward", "flaky_reward:score", "--threads", "1",
                   "--set", "max_new_tokens=4", "--set", "evaluations=1", "--set", "reward_timeout=0",
                   "--eval-fraction", "0.2", "-o", "runs"])
    assert result.exit_code == 0, result.output
    assert "generations scored 0 because the reward raised" in " ".join(result.output.split())
    run_dir = _run_dir(tmp_path / "runs")
    assert "14 generations scored 0 because the reward raised" in (run_dir / "report.md").read_text()  # 7 × 2
    runs = _csv(run_dir / "results.csv")
    assert sorted({r["name"] for r in runs}) == ["forward_kl λ=0", "forward_kl λ=1", "student alone"]
    for row in runs:
        assert float(row["reward"]) == 0.0 and int(row["reward_errors"]) == 2  # both generations counted
        assert float(row["rouge_l_teacher"]) >= 0.0


def test_bad_input_is_one_line_exit_2(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "import_fails.py").write_text("raise RuntimeError('cannot import me')\n")
    cases = [
        (["-d", "reverse_kll", "--seeds", "0,1"], "did you mean 'reverse_kl'"),
        (["--seeds", "0,1,0"], "seeds must be distinct"),
        (["--seeds", "0,1", "-d", "forward_kl,tvd", "--baseline", "js"], "baseline 'js' must be one of divergences"),
        (["--seeds", "0,1", "--on-policy", "0,1.5"], "on_policy_fractions must be distinct values in [0, 1]"),
        (["--seeds", "0", "--reward", "import_fails:score"], "import_fails"),
        (["--seeds", "0", "--reward", "exactt"], "did you mean 'exact'"),
        (["--seeds", "0", "--reward", "exact", "--generation-prompts", "0"], "set generation_prompts >= 1"),
        (["--set", "seeds=[]", "--on-policy", "0,1"], "give seeds too"),
        (["--seeds", "0", "--set", "max_new_tokens=120"], "exceed the student's context of 128"),
    ]
    for args, message in cases:
        result = _run(["distill-lm", *args, *TINY_DATA, "-o", "runs"])  # toy sizes, should a case ever run
        assert result.exit_code == 2, (args, result.output)
        assert message in " ".join(result.output.split()), (args, result.output)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    shown = subprocess.run([sys.executable, "-m", "divergent.cli", "distill-lm", "--seeds", "1,1", "-o", "runs"],
                           capture_output=True, text=True, env=env, cwd=tmp_path)
    assert shown.returncode == 2 and shown.stderr.count("\n") == 1 and "Traceback" not in shown.stderr


def _compare_results(got_dir: Path, want_dir: Path) -> None:
    got = {(r["name"], r["seed"]): r for r in _csv(got_dir / "results.csv")}
    want = {(r["name"], r["seed"]): r for r in _csv(want_dir / "results.csv")}
    assert got.keys() == want.keys()
    for key, row in want.items():
        for metric in ("loss", "kl_teacher", "top1_agreement", "rouge_l", "rouge_l_sampled", "distinct_2"):
            assert float(got[key][metric]) == pytest.approx(float(row[metric]), rel=1e-6), (key, metric)


def test_an_interrupted_comparison_resumes_to_the_uninterrupted_results(tmp_path, monkeypatch):
    """Stopped after seed 0's rows are kept (before seed 1's distilled row is evaluated); --resume ends as the whole run."""
    from divergent.train.run import RunInterrupted

    args = [*TINY, "-d", "forward_kl", "--seeds", "0,1", "--generation-prompts", "2"]
    whole = _run(["distill-lm", *args, "-o", str(tmp_path / "whole")])
    assert whole.exit_code == 0, whole.output
    real = lm_compare._with_generation

    def stop_at_seed1_forward_kl(run, folder, compute):
        if run["seed"] == 1 and run["name"] == "forward_kl":
            raise RunInterrupted(0, None, "stopped by the test")
        return real(run, folder, compute)

    monkeypatch.setattr(lm_compare, "_with_generation", stop_at_seed1_forward_kl)
    stopped = _run(["distill-lm", *args, "-o", str(tmp_path / "stopped")])
    assert stopped.exit_code == 130, stopped.output
    run_dir = _run_dir(tmp_path / "stopped")
    assert (run_dir / "seed1" / "runs" / "forward_kl" / "result.json").is_file()
    assert not (run_dir / "seed1" / "runs" / "forward_kl" / "generation.json").exists()
    monkeypatch.setattr(lm_compare, "_with_generation", real)
    resumed = _run(["distill-lm", "--resume", str(run_dir)])
    assert resumed.exit_code == 0, resumed.output
    assert "student alone: already finished" in resumed.output
    _compare_results(run_dir, _run_dir(tmp_path / "whole"))


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_uninterrupted_results(tmp_path):
    """Kill -9 in the middle of the comparison; --resume keeps each finished (row, seed) and ends as the whole run."""
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    args = [*TINY, "--steps", "6", "-d", "forward_kl", "--seeds", "0,1", "--generation-prompts", "2"]
    whole = _run(["distill-lm", *args, "-o", str(tmp_path / "whole")])
    assert whole.exit_code == 0, whole.output
    process = subprocess.Popen([sys.executable, "-m", "divergent.cli", "distill-lm", *args, "-o",
                                str(tmp_path / "killed")], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    marker = None
    while time.time() < deadline and process.poll() is None:
        found = list((tmp_path / "killed").glob("distill-lm-*/seed1/runs/student-alone/generation.json"))
        if found:
            marker = found[0]
            break
        time.sleep(0.05)
    if process.poll() is None:
        os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert marker is not None, "the run finished or stalled before seed 1's first row was kept"
    run_dir = _run_dir(tmp_path / "killed")
    assert not (run_dir / "results.csv").exists()
    resumed = _run(["distill-lm", "--resume", str(run_dir)])
    assert resumed.exit_code == 0, resumed.output
    assert "student alone: already finished" in resumed.output
    _compare_results(run_dir, _run_dir(tmp_path / "whole"))


def test_the_embedded_default_is_the_comparison_and_your_models_stay_one_run():
    default = DistillLMConfig()
    assert default.seeds == [0, 1, 2]
    assert default.divergences == ["forward_kl", "reverse_kl", "js", "tvd", "skew_kl", "alpha_beta"]
    assert DistillLMConfig(seeds=[]).divergences == ["forward_kl"]  # the single run of one seed
    yours = DistillLMConfig(teacher="t", student="s", data="rows.jsonl")
    assert (yours.seeds, yours.divergences) == ([], ["forward_kl"])


def test_a_comparison_through_config(tmp_path):
    config = tmp_path / "compare.yaml"
    config.write_text("steps: 2\nteacher_steps: 3\nbatch_size: 4\nmax_train_bytes: 20000\nmax_val_bytes: 4000\n"
                      "max_eval_examples: 3\nnum_threads: 1\nevaluations: 1\nmax_new_tokens: 4\n"
                      "generation_prompts: 2\nseeds: [3, 5]\ndivergences: [tvd, js]\nbaseline: js\n")
    result = _run(["distill-lm", "-c", str(config), "-o", str(tmp_path)])
    assert result.exit_code == 0, result.output
    run_dir = _run_dir(tmp_path)
    runs = _csv(run_dir / "results.csv")
    assert sorted({(r["name"], r["seed"]) for r in runs}) == sorted(
        (n, s) for n in ("student alone", "tvd", "js") for s in ("3", "5"))
    summary = {r["name"]: r for r in _csv(run_dir / "summary.csv")}
    assert "loss_diff" not in summary["js"] or summary["js"]["loss_diff"] == ""  # js is the baseline itself
    assert summary["tvd"]["loss_diff"] != ""
