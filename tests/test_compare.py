"""`divergent compare` end to end on a tiny setting: outputs, teacher cache, resume, CLI, shipped configs."""

import csv
import json
import signal
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

import divergent.experiments.compare as compare_module
from divergent.cli import app
from divergent.experiments.compare import NO_TEACHER, CompareConfig, CompareInterrupted, resume_compare, run_compare
from divergent.config import load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("compare*.yaml"))


def _tiny(tmp_path, **kw):
    settings = dict(divergences=["forward_kl", "tvd"], methods=["pskd"], seeds=[0, 1], epochs=2, teacher_epochs=3,
                    teacher_model="mlp-32", student_model="mlp-8", output_dir=str(tmp_path / "runs"))
    settings.update(kw)
    return CompareConfig(**settings)


def _quiet():
    return Console(file=open("/dev/null", "w"), width=200)


def _metrics(results):
    return {(r["name"], r["seed"]): (r["accuracy"], r["nll"], r["ece"]) for r in results["runs"]}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("compare")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DIVERGENT_CACHE_DIR", str(tmp_path / "cache"))
        results = run_compare(_tiny(tmp_path), console=_quiet())
    return tmp_path, results


def test_compare_writes_table_files_and_figures(finished):
    _, results = finished
    run_dir = Path(results["run_dir"])
    for name in ("results.csv", "summary.csv", "results.json", "report.md", "config.yaml",
                 "reliability.png", "training_curves.png", "accuracy_vs_ece.png"):
        assert (run_dir / name).stat().st_size > 0, name
    rows = list(csv.DictReader(open(run_dir / "results.csv")))
    assert len(rows) == 4 * 2  # (student alone + 3 rows) x 2 seeds
    assert {r["name"] for r in rows} == {NO_TEACHER, "forward_kl", "tvd", "pskd"}
    for r in rows:
        assert 0.0 <= float(r["accuracy"]) <= 1.0 and float(r["nll"]) > 0 and 0 <= float(r["agreement"]) <= 1
    report = (run_dir / "report.md").read_text()
    assert "| row | test accuracy | ECE |" in report and "divergent compare --config" in report
    assert json.loads((run_dir / "results.json").read_text())["config"]["seeds"] == [0, 1]


def test_summary_is_a_paired_comparison_with_the_baseline(finished):
    _, results = finished
    runs = {(r["name"], r["seed"]): r for r in results["runs"]}
    tvd = next(s for s in results["summary"] if s["name"] == "tvd")
    diffs = [runs[("tvd", s)]["accuracy"] - runs[("forward_kl", s)]["accuracy"] for s in (0, 1)]
    assert tvd["accuracy_diff"] == pytest.approx(sum(diffs) / 2)
    spread = abs(diffs[0] - diffs[1]) / 2**0.5  # sample std of two values
    assert tvd["accuracy_diff_std"] == pytest.approx(spread)
    assert tvd["accuracy_significant"] == (abs(sum(diffs) / 2) > spread)
    baseline = next(s for s in results["summary"] if s["name"] == "forward_kl")
    assert "accuracy_diff" not in baseline


def test_teacher_is_cached_and_reused(finished, monkeypatch):
    tmp_path, results = finished
    assert results["teacher"]["cached"] is False
    monkeypatch.setenv("DIVERGENT_CACHE_DIR", str(tmp_path / "cache"))
    config = _tiny(tmp_path, divergences=["forward_kl"], methods=[], seeds=[0])
    again = run_compare(config, console=_quiet())
    assert again["teacher"]["cached"] is True
    assert again["teacher"]["test"] == results["teacher"]["test"]
    # Same seed, same split, same teacher: the same student.
    assert _metrics(again)[("forward_kl", 0)] == _metrics(results)[("forward_kl", 0)]


def test_interrupted_compare_resumes_to_the_same_results(finished, monkeypatch):
    tmp_path, results = finished
    monkeypatch.setenv("DIVERGENT_CACHE_DIR", str(tmp_path / "cache"))
    real_train = compare_module.train_classifier
    calls = {"n": 0}

    class CtrlCAtStep3:
        def __init__(self, bar):
            self.bar, self.count = bar, 0

        def advance(self, task):
            self.bar.advance(task)
            self.count += 1
            if self.count == 3:
                signal.raise_signal(signal.SIGINT)

    def interrupting_train(*args, progress=None, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # the third student run gets Ctrl-C after 3 steps
            progress = CtrlCAtStep3(progress)
        return real_train(*args, progress=progress, **kwargs)

    monkeypatch.setattr(compare_module, "train_classifier", interrupting_train)
    with pytest.raises(CompareInterrupted) as info:
        run_compare(_tiny(tmp_path, output_dir=str(tmp_path / "again")), console=_quiet())
    run_dir = info.value.run_dir
    assert not (run_dir / "results.csv").exists()
    assert len(list(run_dir.glob("runs/*/seed*/result.json"))) == 2
    monkeypatch.setattr(compare_module, "train_classifier", real_train)
    resumed = resume_compare(run_dir, console=_quiet())
    assert _metrics(resumed) == _metrics(results)


def test_cli_runs_a_tiny_comparison_from_yaml_with_overrides(tmp_path, monkeypatch):
    monkeypatch.setenv("DIVERGENT_CACHE_DIR", str(tmp_path / "cache"))
    yaml_file = tmp_path / "tiny.yaml"
    yaml_file.write_text("divergences: [forward_kl, js]\nseeds: [0]\nepochs: 1\nteacher_epochs: 1\n"
                         "teacher_model: mlp-16\nstudent_model: mlp-8\ninclude_student_alone: false\n")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["compare", "--config", str(yaml_file), "--divergences", "forward_kl,tvd",
                                      "-o", str(out), "--set", "lr=0.005"])
    assert result.exit_code == 0, result.output
    (run_dir,) = out.iterdir()
    config = load_config(CompareConfig, run_dir / "config.yaml")
    assert config.divergences == ["forward_kl", "tvd"] and config.lr == 0.005 and config.epochs == 1
    assert {r["name"] for r in csv.DictReader(open(run_dir / "results.csv"))} == {"forward_kl", "tvd"}


def test_cli_unknown_key_lists_the_valid_ones(tmp_path):
    result = CliRunner().invoke(app, ["compare", "--set", "epoch=3"])
    assert result.exit_code == 2
    assert "unknown config key 'epoch'" in result.output and "epochs" in result.output and "teacher_model" in result.output


def test_unknown_row_and_missing_cifar_give_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown method 'kl'.*forward_kl"):
        CompareConfig(divergences=["kl"], baseline="kl")
    with pytest.raises(ValueError, match="baseline 'forward_kl' must be one of"):
        CompareConfig(divergences=["tvd"], baseline="forward_kl")
    assert CompareConfig(divergences=["tvd", "js"]).baseline == "tvd"  # none named: the first row
    with pytest.raises(FileNotFoundError, match="cifar-100-python"):
        run_compare(CompareConfig(dataset="cifar100", data_dir=str(tmp_path), output_dir=str(tmp_path / "r")), console=_quiet())


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    config = load_config(CompareConfig, path)
    assert config.entries()


def test_default_config_file_is_the_defaults_written_out():
    assert load_config(CompareConfig, CONFIGS[0].parent / "compare.yaml") == CompareConfig()


def test_compare_reads_cifar_from_data_dir(tmp_path, monkeypatch):
    """A CIFAR-10 comparison on a tiny fake release (48 images) runs end to end."""
    import pickle

    import numpy as np

    monkeypatch.setenv("DIVERGENT_CACHE_DIR", str(tmp_path / "cache"))
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as handle:
            pickle.dump({b"data": rng.integers(0, 256, (8, 3072), dtype=np.uint8), b"labels": list(range(8))}, handle)
    config = CompareConfig(dataset="cifar10", data_dir=str(tmp_path), divergences=["forward_kl"], seeds=[0], epochs=1,
                           teacher_epochs=1, teacher_model="cnn-4", student_model="mlp-8", batch_size=16,
                           output_dir=str(tmp_path / "runs"))
    results = run_compare(config, console=_quiet())
    assert len(results["runs"]) == 2


def test_teacher_preparing_and_online_rows_run_in_compare(tmp_path, monkeypatch):
    """`mcmi` fine-tunes (and caches) a teacher copy; `dml` trains its own teacher alongside."""
    monkeypatch.setenv("DIVERGENT_CACHE_DIR", str(tmp_path / "cache"))
    config = _tiny(tmp_path, divergences=["forward_kl"], methods=["mcmi", "dml"], seeds=[0], epochs=1, mcmi_epochs=1,
                   include_student_alone=False)
    results = run_compare(config, console=_quiet())
    assert [r["name"] for r in results["runs"]] == ["forward_kl", "mcmi", "dml"]
    assert all(r["status"] == "finished" for r in results["runs"])
    assert len(list((tmp_path / "cache" / "teachers").glob("*-mcmi.pt"))) == 1


def test_report_opens_with_the_verdict_and_says_why_this_regime(finished):
    _, results = finished
    run_dir = Path(results["run_dir"])
    lines = (run_dir / "report.md").read_text().splitlines()
    assert lines[0].startswith("# divergent compare") and lines[2] == results["verdict"]["text"]
    assert lines[2].startswith("Verdict (test accuracy, mean of 2 seeds): best row **")
    text = "\n".join(lines)
    assert "## Why this regime" in text and "labelled_fraction: 0.1" in text and "of the 1078 training examples" in text
    header = next(csv.reader(open(run_dir / "summary.csv")))
    assert {"accuracy_diff", "accuracy_diff_alone", "ece_diff_alone_std", "ece_significant_alone"} <= set(header)
