"""`divergent rl` end to end at a tiny size: files written, tables printed, resume skips finished runs."""

import json

import torch
from typer.testing import CliRunner

from divergent.cli import app
from divergent.train.checkpoint import load_checkpoint

TINY = ["--steps", "2", "--warm-steps", "3", "--eval-samples", "4", "--max-operand", "9", "--n-test", "8",
        "--threads", "2"]


def test_rl_single_run_writes_results(tmp_path):
    result = CliRunner().invoke(app, ["rl", "--regulariser", "reverse_kl", "--estimator", "k2", *TINY,
                                      "-o", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "pass@1" in result.output and "training reward" in result.output
    (run_dir,) = tmp_path.glob("rl-*")
    for name in ("results.csv", "results.json", "report.md", "pass_at_k.png", "history.csv", "config.yaml"):
        assert (run_dir / name).is_file(), name
    saved = json.loads((run_dir / "results.json").read_text())
    assert saved["method"] == "reverse_kl" and set(saved["pass_at_k"]) == {"1", "2", "3", "4"}
    checkpoint = load_checkpoint(next((run_dir / "checkpoints").glob("step_2.pt")))
    assert checkpoint["config"]["kl_estimator"] == "k2"


def test_rl_kdrl_trains_its_own_teacher(tmp_path):
    result = CliRunner().invoke(app, ["rl", "--regulariser", "kdrl", "--estimator", "full", *TINY, "-o", str(tmp_path)])
    assert result.exit_code == 0, result.output
    (run_dir,) = tmp_path.glob("rl-*")
    history = (run_dir / "history.csv").read_text()
    assert "kdrl_beta" in history.splitlines()[0]


def test_rl_compare_and_resume(tmp_path):
    config = tmp_path / "grpo.yaml"
    config.write_text("dph_probe_prompts: 16\nprompts_per_step: 4\ngroup_size: 4\n")
    args = ["rl", "--compare", "--seeds", "0", *TINY, "--config", str(config), "-o", str(tmp_path)]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    (run_dir,) = tmp_path.glob("rl-compare-*")
    summary = (run_dir / "report.md").read_text()
    for method in ("none", "reverse_kl", "dph_forward_kl", "dph_js", "base (warm start)"):
        assert method in summary
    saved = json.loads((run_dir / "results.json").read_text())
    assert saved["config"]["prompts_per_step"] == 4 and saved["config"]["dph_probe_prompts"] == 16
    assert (run_dir / "pass_at_k.png").is_file() and (run_dir / "summary.csv").is_file()
    before = (run_dir / "results.csv").read_text()
    again = CliRunner().invoke(app, ["rl", "--compare", "--seeds", "0", *TINY, "--config", str(config),
                                     "--resume", str(run_dir)])
    assert again.exit_code == 0, again.output
    # Finished runs are read back, not retrained (train_seconds included), and the base
    # evaluation is seeded: the table is identical.
    assert (run_dir / "results.csv").read_text() == before


def test_rl_bad_options(tmp_path):
    result = CliRunner().invoke(app, ["rl", "--regulariser", "entropy", *TINY, "-o", str(tmp_path)])
    assert result.exit_code != 0
    assert "regulariser" in result.output
    result = CliRunner().invoke(app, ["rl", "--coefficient", "0.1", *TINY, "-o", str(tmp_path)])
    assert result.exit_code != 0 and "coefficient" in result.output
