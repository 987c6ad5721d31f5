"""`divergent compare`'s answer: the marking rule, the verdict, one seed, the labelled subset, and a table readable in a log file."""

import os
import statistics
import subprocess
import sys

import pytest
import torch
from torch.utils.data import TensorDataset

from divergent.data.digits import load_digits_data
from divergent.data.vision import AugmentedImageDataset, ClassificationData
from divergent.experiments import compare
from divergent.experiments.compare import NO_TEACHER, CompareConfig, student_data

N_TEST = 100  # one test example = 0.01 of accuracy


def _run(name, seed, accuracy, ece=0.05):
    return {"name": name, "seed": seed, "status": "finished", "accuracy": accuracy, "ece": ece, "nll": 0.3,
            "brier": 0.1, "agreement": 0.9, "seconds": 1.0}


def _config(seeds=(0, 1, 2), rows=("forward_kl", "tvd", "js")):
    return CompareConfig(divergences=list(rows), seeds=list(seeds))


def _answer(config, runs):
    summary = compare._summarise(config, runs, N_TEST)
    return ({e["name"]: e for e in summary}, compare._verdict(config, summary, runs, N_TEST),
            {r["row"]: r for r in compare._table_rows(config, summary)})


def test_a_gain_above_its_spread_but_below_one_test_example_is_not_marked():
    """tvd beats forward_kl by 0.005 on every seed (spread 0) — half a test example: no mark."""
    runs = []
    for seed, base in enumerate([0.80, 0.85, 0.90]):
        runs += [_run(NO_TEACHER, seed, base - 0.05), _run("forward_kl", seed, base),
                 _run("tvd", seed, base + 0.005), _run("js", seed, base + 0.03 + 0.001 * seed)]
    summary, verdict, table = _answer(_config(), runs)
    assert summary["tvd"]["accuracy_diff"] == pytest.approx(0.005)
    assert summary["tvd"]["accuracy_diff_std"] == pytest.approx(0.0, abs=1e-12)
    assert summary["tvd"]["accuracy_significant"] is False
    assert table["tvd"]["Δacc vs forward_kl"] == "+0.0050 ± 0.0000"  # no mark
    # js: +0.031 ± 0.001 exceeds both its spread and one example: marked better.
    diffs = [0.03 + 0.001 * s for s in range(3)]
    assert summary["js"]["accuracy_diff"] == pytest.approx(statistics.fmean(diffs))
    assert summary["js"]["accuracy_diff_std"] == pytest.approx(statistics.stdev(diffs))
    assert table["js"]["Δacc vs forward_kl"].endswith(" better")
    assert table[NO_TEACHER]["Δacc vs forward_kl"].endswith(" worse")
    assert table[NO_TEACHER]["Δacc vs student alone"] == "reference"
    assert list(table["js"])[0] == "row"


def test_a_gain_above_one_test_example_but_within_its_spread_is_not_marked():
    runs = []
    for seed, (base, gain) in enumerate([(0.8, 0.06), (0.8, -0.02), (0.8, 0.02)]):
        runs += [_run(NO_TEACHER, seed, 0.7), _run("forward_kl", seed, base), _run("tvd", seed, base + gain),
                 _run("js", seed, base)]
    summary, _, table = _answer(_config(), runs)
    assert summary["tvd"]["accuracy_diff"] == pytest.approx(0.02)  # two test examples ...
    assert summary["tvd"]["accuracy_diff_std"] == pytest.approx(0.04)  # ... but a spread of four
    assert not summary["tvd"]["accuracy_significant"]
    assert not table["tvd"]["Δacc vs forward_kl"].endswith(("better", "worse"))


def test_lower_ece_is_marked_better_and_compared_with_the_student_alone_too():
    runs = []
    for seed in range(3):
        runs += [_run(NO_TEACHER, seed, 0.8, ece=0.02 + 0.001 * seed), _run("forward_kl", seed, 0.85, ece=0.08),
                 _run("tvd", seed, 0.85, ece=0.04 - 0.001 * seed), _run("js", seed, 0.85, ece=0.08)]
    summary, _, table = _answer(_config(), runs)
    assert summary["tvd"]["ece_diff"] == pytest.approx(-0.041)
    assert table["tvd"]["ΔECE vs forward_kl"].endswith(" better")
    assert summary["tvd"]["ece_diff_alone"] == pytest.approx(statistics.fmean([0.02, 0.018, 0.016]))
    assert table["tvd"]["ΔECE vs student alone"].endswith(" worse")


def test_verdict_names_the_best_row_its_paired_gains_and_the_rows_indistinguishable_from_it():
    accuracies = {NO_TEACHER: [0.80, 0.82, 0.81], "forward_kl": [0.86, 0.88, 0.87],
                  "tvd": [0.89, 0.90, 0.91], "js": [0.88, 0.91, 0.90]}
    runs = [_run(name, seed, acc) for name, values in accuracies.items() for seed, acc in enumerate(values)]
    _, verdict, _ = _answer(_config(), runs)
    assert verdict["best"] == "tvd" and verdict["metric"] == "test accuracy"
    gains = [t - a for t, a in zip(accuracies["tvd"], accuracies[NO_TEACHER])]
    assert f"{statistics.fmean(gains):+.4f} ± {statistics.stdev(gains):.4f} (better)" in verdict["text"]
    # tvd - js = (0.01, -0.01, 0.01): mean 0.0033 inside its spread 0.0115 -> indistinguishable;
    # tvd - forward_kl = (0.03, 0.02, 0.04): mean 0.03 above its spread 0.01 and one example -> distinguishable.
    assert verdict["indistinguishable"] == ["js"]
    assert "Indistinguishable from it: js." in verdict["text"]
    assert "vs forward_kl (baseline): accuracy +0.0300 ± 0.0100 (better)" in verdict["text"]


def test_one_seed_shows_n_a_and_marks_nothing():
    runs = [_run(NO_TEACHER, 0, 0.80), _run("forward_kl", 0, 0.90), _run("tvd", 0, 0.95), _run("js", 0, 0.85)]
    summary, verdict, table = _answer(_config(seeds=[0]), runs)
    assert verdict["single_seed"] and verdict["indistinguishable"] == []
    assert "n/a" in verdict["text"] and "± 0.0000" not in verdict["text"] and "better" not in verdict["text"]
    for row in table.values():
        for column, cell in row.items():
            assert "± 0.0" not in cell, (column, cell)
            assert not cell.endswith(("better", "worse")), (column, cell)
    assert table["tvd"]["test accuracy"] == "0.9500 ± n/a"
    assert table["tvd"]["Δacc vs forward_kl"] == "+0.0500 ± n/a"
    assert summary["tvd"]["accuracy_std"] is None
    assert "no spread" in compare._table_note(_config(seeds=[0]), N_TEST, True)


def test_labelled_subset_is_stratified_fixed_and_leaves_the_other_splits_alone():
    data = load_digits_data(split_seed=0)
    config = CompareConfig()
    assert config.labelled_fraction is None and config.students_labelled_fraction() == 0.1
    assert CompareConfig(dataset="cifar10").students_labelled_fraction() == 1.0
    subset = student_data(config, data)
    labels = data.train.tensors[1]
    kept = subset.train.tensors[1]
    assert len(kept) == pytest.approx(0.1 * len(labels), abs=10)
    for c in range(10):  # every class keeps its share (stratified), up to rounding
        assert abs(int((kept == c).sum()) - 0.1 * int((labels == c).sum())) <= 1
    again = student_data(config, data)
    assert torch.equal(again.train.tensors[0], subset.train.tensors[0])
    assert subset.val is data.val and subset.test is data.test
    assert student_data(CompareConfig(labelled_fraction=1.0), data) is data
    with pytest.raises(ValueError, match="labelled_fraction must be in"):
        CompareConfig(labelled_fraction=0.0)
    with pytest.raises(ValueError, match=r"no labelled training example of class\(es\)"):
        student_data(CompareConfig(labelled_fraction=0.001), data)


def test_labelled_subset_of_an_augmented_dataset_keeps_its_batches():
    images = torch.arange(20 * 3 * 4 * 4, dtype=torch.float32).view(20, 3, 4, 4)
    dataset = AugmentedImageDataset(images, torch.arange(20) % 2, augment=False)
    data = ClassificationData("x", dataset, TensorDataset(images[:2], torch.zeros(2)), TensorDataset(images[:2], torch.zeros(2)), 2, (3, 4, 4))
    subset = student_data(CompareConfig(dataset="cifar10", labelled_fraction=0.5), data).train
    assert len(subset) == 10 and sorted(subset.labels.tolist()) == [0] * 5 + [1] * 5
    inputs, labels = subset.get_batch(torch.tensor([0, 3]))
    assert torch.equal(inputs, images[subset.indices[[0, 3]]]) and torch.equal(labels, subset.labels[[0, 3]])


def test_table_is_not_wrapped_when_the_output_is_a_file(tmp_path):
    """`divergent compare ... > log.txt`: every row name and cell stays on one line (rich would fold at 80 columns)."""
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "FORCE_COLOR", "TTY_COMPATIBLE")}
    env["DIVERGENT_CACHE_DIR"] = str(tmp_path / "cache")
    log = tmp_path / "log.txt"
    with open(log, "w") as out:
        result = subprocess.run(
            [sys.executable, "-m", "divergent.cli", "compare", "-d", "forward_kl,sinkhorn-with-KD", "--seeds", "0,1",
             "--epochs", "1", "--teacher-epochs", "1", "--teacher-model", "mlp-8", "--student-model", "mlp-8",
             "-o", str(tmp_path / "runs")],
            stdout=out, stderr=subprocess.STDOUT, env=env, timeout=300,
        )
    text = log.read_text()
    assert result.returncode == 0, text
    lines = text.splitlines()
    for name in (NO_TEACHER, "forward_kl", "sinkhorn-with-KD"):
        (line,) = [line for line in lines if f"│ {name} " in line]
        assert line.count("±") >= 5  # the whole row on one line: accuracy, ECE, NLL, agreement, seconds, Δs
    header = next(line for line in lines if "┃ row " in line)
    assert "row" in header and "Δacc vs student alone" in header and "Δacc vs forward_kl" in header
    assert any(line.startswith("Verdict (test accuracy, mean of 2 seeds): best row ") for line in lines)
    assert any(line.startswith("teacher mlp-8: trained in ") and "cached at /" in line for line in lines)  # paths whole


def test_verdict_when_the_student_alone_is_best_says_no_distilled_row_beats_it():
    runs = []
    for seed in range(3):
        runs += [_run(NO_TEACHER, seed, 0.95 + 0.001 * seed), _run("forward_kl", seed, 0.90),
                 _run("tvd", seed, 0.91), _run("js", seed, 0.945 + 0.002 * seed)]
    _, verdict, _ = _answer(_config(), runs)
    assert verdict["best"] == NO_TEACHER
    assert "no distilled row beats the student trained without the teacher" in verdict["text"]
    assert "vs forward_kl (baseline): accuracy +0.0510 ± 0.0010 (better)" in verdict["text"]
    assert verdict["indistinguishable"] == ["js"]  # 0.005 ± 0.001 is under one test example (0.01)


def test_verdict_without_the_student_alone_and_with_a_failed_row():
    config = CompareConfig(divergences=["forward_kl", "tvd"], seeds=[0, 1, 2], include_student_alone=False)
    runs = [_run("forward_kl", s, 0.9 + 0.01 * s) for s in range(3)]
    runs += [{"name": "tvd", "seed": s, "status": "failed", "error": "NaN"} for s in range(3)]
    summary, verdict, table = _answer(config, runs)
    assert verdict["best"] == "forward_kl" and "student alone" not in verdict["text"]
    assert summary["tvd"]["failed"] == 3 and table["tvd"]["test accuracy"] == "failed"
    assert "Δacc vs student alone" not in table["forward_kl"]


def test_paired_difference_resolution_is_a_floor_on_what_is_marked():
    from divergent.experiments import report

    a, b = {0: 0.905, 1: 0.905, 2: 0.905}, {0: 0.9, 1: 0.9, 2: 0.9}
    assert report.paired_difference(a, b)["significant"]  # spread 0: the old rule marks half an example
    assert not report.paired_difference(a, b, resolution=0.01)["significant"]
    assert report.paired_difference({0: 0.95}, {0: 0.9}, resolution=0.01)["significant"] is False  # one seed


@pytest.mark.slow
def test_default_regime_answers_the_question(tmp_path, monkeypatch):
    """The embedded default (fresh teacher cache): some distilled row beats the student alone beyond spread and one example."""
    monkeypatch.setenv("DIVERGENT_CACHE_DIR", str(tmp_path / "cache"))
    quiet = compare.Console(file=open(os.devnull, "w"))
    results = compare.run_compare(CompareConfig(output_dir=str(tmp_path / "runs")), console=quiet)
    marked = [e["name"] for e in results["summary"]
              if e.get("accuracy_significant_alone") and e["accuracy_diff_alone"] > 0]
    assert marked, results["verdict"]["text"]
    assert results["verdict"]["best"] != NO_TEACHER


def test_print_table_to_a_non_terminal_keeps_every_cell_whole():
    import io

    from rich.console import Console

    from divergent.experiments import report

    console = Console(file=io.StringIO())  # not a terminal: rich would assume 80 columns
    assert not console.is_terminal and console.width == 80
    rows = [{"row": "sinkhorn-with-KD", **{f"Δ column {i}": "+0.0241 ± 0.0043 better" for i in range(6)}}]
    report.print_table(rows, list(rows[0]), title="wide", console=console)
    lines = console.file.getvalue().splitlines()
    (line,) = [line for line in lines if "sinkhorn-with-KD" in line]
    assert line.count("+0.0241 ± 0.0043 better") == 6
    assert console.width == 80  # the console is left as it was
