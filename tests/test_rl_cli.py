"""`divergent rl` on the embedded task end to end at a tiny size: files written, tables printed, resume with the run's own settings."""

import json

from typer.testing import CliRunner

from divergent.cli import app
from divergent.io import load_state

TINY = ["--steps", "2", "--warm-steps", "3", "--eval-samples", "4", "--max-operand", "9", "--n-test", "8",
        "--threads", "1"]


def test_rl_single_run_writes_results(tmp_path):
    result = CliRunner().invoke(app, ["rl", "--regulariser", "reverse_kl", "--estimator", "k2", *TINY,
                                      "-o", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "pass@1" in result.output and "training reward" in result.output
    (run_dir,) = tmp_path.glob("rl-*")
    for name in ("results.csv", "results.json", "report.md", "pass_at_k.png", "history.csv", "config.yaml",
                 "model/config.json"):
        assert (run_dir / name).is_file(), name
    saved = json.loads((run_dir / "results.json").read_text())
    assert saved["method"] == "reverse_kl" and set(saved["pass_at_k"]) == {"1", "2", "3", "4"}
    checkpoint = load_state(run_dir / "checkpoints" / "step_2.ckpt")
    assert checkpoint["config"]["kl_estimator"] == "k2"


def test_rl_kdrl_trains_its_own_teacher(tmp_path):
    result = CliRunner().invoke(app, ["rl", "--regulariser", "kdrl", "--estimator", "full", *TINY, "-o", str(tmp_path)])
    assert result.exit_code == 0, result.output
    (run_dir,) = tmp_path.glob("rl-*")
    history = (run_dir / "history.csv").read_text()
    assert "kdrl_beta" in history.splitlines()[0]


def test_rl_resume_continues_with_the_runs_own_steps(tmp_path):
    """The known bug: --resume ignored the run's --steps and skipped a batch. Now it reads config.yaml."""
    args = ["rl", "--regulariser", "dph", *TINY, "--set", "steps=4", "--set", "checkpoint_every=1",
            "--set", "dph_probe_prompts=16", "--set", "prompts_per_step=4", "--set", "group_size=4"]
    args.remove("--steps"), args.remove("2")
    full = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "a")])
    assert full.exit_code == 0, full.output
    (full_dir,) = (tmp_path / "a").glob("rl-*")
    partial = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "b")])
    assert partial.exit_code == 0, partial.output
    (run_dir,) = (tmp_path / "b").glob("rl-*")
    # Make it look interrupted after step 2: drop the results and the later checkpoints.
    for name in ("results.json", "checkpoints/step_4.ckpt", "checkpoints/step_3.ckpt"):
        (run_dir / name).unlink(missing_ok=True)
    again = CliRunner().invoke(app, ["rl", "--resume", str(run_dir)])
    assert again.exit_code == 0, again.output
    steps = [line.split(",")[0] for line in (run_dir / "history.csv").read_text().splitlines()[1:]]
    assert steps == ["1", "2", "3", "4"]
    a, b = (json.loads((d / "results.json").read_text()) for d in (full_dir, run_dir))
    assert a["pass_at_k"] == b["pass_at_k"] and a["reward_curve"] == b["reward_curve"]
    refused = CliRunner().invoke(app, ["rl", "--resume", str(run_dir), "--steps", "9"])
    assert refused.exit_code == 2 and "--resume continues with the run's own saved settings" in refused.output


def test_rl_compare_and_resume(tmp_path):
    config = tmp_path / "grpo.yaml"
    config.write_text("dph_probe_prompts: 16\nprompts_per_step: 4\ngroup_size: 4\nseeds: [0]\n")
    args = ["rl", "--compare", *TINY, "--config", str(config), "-o", str(tmp_path)]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    (run_dir,) = tmp_path.glob("rl-compare-*")
    summary = (run_dir / "report.md").read_text()
    for method in ("none", "reverse_kl", "dph_forward_kl", "dph_js", "base (initial policy)"):
        assert method in summary
    saved = json.loads((run_dir / "results.json").read_text())
    assert saved["config"]["prompts_per_step"] == 4 and saved["config"]["dph_probe_prompts"] == 16
    assert (run_dir / "pass_at_k.png").is_file() and (run_dir / "summary.csv").is_file()
    before = (run_dir / "results.csv").read_text()
    again = CliRunner().invoke(app, ["rl", "--resume", str(run_dir)])
    assert again.exit_code == 0, again.output
    # Finished runs are read back, not retrained (train_seconds included), and the base
    # evaluation is kept: the table is identical.
    assert (run_dir / "results.csv").read_text() == before


def test_rl_bad_options_are_one_line_errors(tmp_path):
    result = CliRunner().invoke(app, ["rl", "--regulariser", "revers_kl", *TINY, "-o", str(tmp_path)])
    assert result.exit_code == 2
    assert "did you mean 'reverse_kl'" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(app, ["rl", "--coefficient", "0.1", *TINY, "-o", str(tmp_path)])
    assert result.exit_code == 2 and "--coefficient does not apply to regulariser 'none'" in result.output
    result = CliRunner().invoke(app, ["rl", "--set", "advantage_std=median", *TINY, "-o", str(tmp_path)])
    assert result.exit_code == 2 and "advantage_std" in result.output
    result = CliRunner().invoke(app, ["rl", "--reward", "exact", *TINY, "-o", str(tmp_path)])
    assert result.exit_code == 2 and "--prompts" in result.output
    assert not list(tmp_path.glob("rl-*"))  # a run that fails before training leaves no folder


def test_rl_grpo_options_are_config_keys(tmp_path):
    result = CliRunner().invoke(app, ["rl", "--regulariser", "reverse_kl", *TINY, "-o", str(tmp_path),
                                      "--set", "advantage_std=population", "--set", "dual_clip=3",
                                      "--set", "log_ratio_clamp=20", "--set", "kl_log_ratio_clamp=20",
                                      "--set", "kl_value_clamp=10", "--set", "top_p=0.9"])
    assert result.exit_code == 0, result.output
    (run_dir,) = tmp_path.glob("rl-*")
    saved = load_state(run_dir / "checkpoints" / "step_2.ckpt")["config"]
    assert (saved["advantage_std"], saved["dual_clip"], saved["log_ratio_clamp"], saved["kl_log_ratio_clamp"],
            saved["kl_value_clamp"], saved["top_p"]) == ("population", 3.0, 20.0, 20.0, 10.0, 0.9)


def test_comparison_marks_only_differences_beyond_spread_and_one_prompt():
    from divergent.experiments.rl import aggregate

    def run(method, seed, p1, p16):
        return {"method": method, "seed": seed, "pass@1": p1, "pass@4": p1, "pass@16": p16,
                "distinct_correct": 1, "mean_length": 3.0}

    results = [run("none", s, 0.50, 0.80) for s in range(3)]
    # pass@1: +0.10 with spread 0.01 -> marked; pass@16: +0.02 with spread 0.001, below one prompt (1/20) -> not.
    results += [run("dph", s, 0.60 + 0.01 * (s - 1), 0.82 + 0.001 * (s - 1)) for s in range(3)]
    rows = {r["method"]: r for r in aggregate(results, n_test=20)}
    assert rows["dph"]["pass@1 vs none"] == "+0.100 ± 0.010 *"
    assert rows["dph"]["pass@16 vs none"] == "+0.020 ± 0.001"
    one_seed = {r["method"]: r for r in aggregate([results[0], results[3]], n_test=20)}
    assert one_seed["dph"]["pass@1 vs none"] == "+0.090 ± n/a"
