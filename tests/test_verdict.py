"""The one marking rule, summary, verdict and report shared by compare, distill-lm --seeds, rl --compare and fdpg --compare.

Every expected number below is computed by hand in the test (or in its comment), not by the code under test.
"""

import math

import pytest

from divergent.experiments import report, verdict as v

LOSS = v.Metric("loss", "evaluation loss", higher_is_better=False, resolution=0.01, digits=3, unit="one evaluation example")
ACC = v.Metric("accuracy", "test accuracy", resolution=0.01, short="accuracy")


def _runs(values: dict[str, list[float]], key: str = "loss") -> list[dict]:
    return [{"name": name, "seed": seed, key: value} for name, per_seed in values.items()
            for seed, value in enumerate(per_seed)]


def test_paired_difference_by_hand():
    """d = (0.1, 0.2, 0.3): mean 0.2, sample std 0.1 — beyond both the spread and a resolution of 0.05."""
    result = v.paired_difference({0: 1.1, 1: 1.2, 2: 1.3}, {0: 1.0, 1: 1.0, 2: 1.0}, resolution=0.05)
    assert result["mean_diff"] == pytest.approx(0.2)
    assert result["std_diff"] == pytest.approx(0.1)
    assert (result["n"], result["significant"]) == (3, True)
    assert not v.paired_difference({0: 1.1, 1: 1.2, 2: 1.3}, {0: 1.0, 1: 1.0, 2: 1.0}, resolution=0.25)["significant"]


def test_the_spread_blocks_a_mark_and_only_shared_seeds_are_paired():
    """d = (0.3, -0.1) on the shared seeds 0 and 1: mean 0.1, std 0.2828 > 0.1: not marked; seed 2 is unpaired."""
    result = v.paired_difference({0: 0.5, 1: 0.1, 2: 9.0}, {0: 0.2, 1: 0.2, 5: 0.0})
    assert result["n"] == 2
    assert result["mean_diff"] == pytest.approx(0.1)
    assert result["std_diff"] == pytest.approx(math.sqrt(0.08))
    assert not result["significant"]


def test_one_seed_is_never_marked_and_no_shared_seed_raises():
    assert v.paired_difference({0: 5.0}, {0: 1.0})["significant"] is False
    with pytest.raises(ValueError, match="at least one seed"):
        v.paired_difference({0: 1.0}, {1: 1.0})


def test_report_re_exports_the_same_rule():
    assert report.paired_difference is v.paired_difference and report.mean_std is v.mean_std


def test_lower_is_better_marks_a_lower_loss_better():
    """Loss: distilled 2.0/2.1/2.2 vs alone 2.5/2.5/2.6 → Δ = (−0.5, −0.4, −0.4): mean −0.4333, std 0.0577: better."""
    runs = _runs({"alone": [2.5, 2.5, 2.6], "fkl": [2.0, 2.1, 2.2], "rkl": [2.504, 2.503, 2.605]})
    summary = {e["name"]: e for e in v.summarise(runs, ["alone", "fkl", "rkl"], [LOSS], {"_alone": "alone"})}
    assert summary["fkl"]["loss_diff_alone"] == pytest.approx(-1.3 / 3)
    assert summary["fkl"]["loss_diff_alone_std"] == pytest.approx(math.sqrt(((0.1 / 3) ** 2 * 2 + (0.2 / 3) ** 2) / 2))
    assert v.difference_column(summary["fkl"], LOSS, "_alone", "alone") == "-0.433 ± 0.058 better"
    # rkl: +0.004 ± 0.001 is beyond its spread but under one evaluation example (0.01): not marked.
    assert v.difference_column(summary["rkl"], LOSS, "_alone", "alone") == "+0.004 ± 0.001"
    assert v.difference_column(summary["alone"], LOSS, "_alone", "alone") == "reference"
    assert v.mean_std_cell(summary["fkl"], "loss", 3) == "2.100 ± 0.100"
    assert v.mark(-0.4, True, higher_is_better=False) == "better"
    assert v.mark(-0.4, True, higher_is_better=True) == "worse"


def test_failed_rows_one_seed_and_no_shared_seed_cells():
    runs = _runs({"alone": [1.0], "fkl": [0.8]}) + [{"name": "rkl", "seed": 0, "status": "failed"},
                                                    {"name": "js", "seed": 7, "loss": 0.5}]
    summary = {e["name"]: e for e in v.summarise(runs, ["alone", "fkl", "rkl", "js"], [LOSS], {"_alone": "alone"})}
    assert summary["fkl"]["loss_std"] is None and v.mean_std_cell(summary["fkl"], "loss", 3) == "0.800 ± n/a"
    assert v.difference_cell(summary["fkl"], LOSS, "_alone") == ("-0.200 ± n/a", None)
    assert (summary["rkl"]["runs"], summary["rkl"]["failed"]) == (0, 1)
    assert v.mean_std_cell(summary["rkl"], "loss") == "failed"
    assert v.difference_column(summary["rkl"], LOSS, "_alone", "alone") == "failed"
    assert v.difference_column(summary["js"], LOSS, "_alone", "alone") == "no shared seed"


def test_verdict_picks_the_lowest_loss_and_names_the_indistinguishable_rows():
    """fkl 2.0/2.1/2.2 is best (mean 2.1); js 2.002/2.103/2.201 differs by 0.002 ± 0.001 < 0.01: indistinguishable."""
    runs = _runs({"alone": [2.5, 2.5, 2.6], "fkl": [2.0, 2.1, 2.2], "js": [2.002, 2.103, 2.201],
                  "rkl": [2.3, 2.4, 2.5]})
    names = ["alone", "fkl", "js", "rkl"]
    summary = v.summarise(runs, names, [LOSS], {"": "rkl", "_alone": "alone"})
    answer = v.verdict(summary, runs, LOSS, alone="alone", baseline="rkl")
    assert answer["best"] == "fkl" and answer["loss"] == pytest.approx(2.1)
    assert answer["indistinguishable"] == ["js"]
    text = answer["text"]
    assert text.startswith("Verdict (evaluation loss, mean of 3 seeds): best row **fkl** at 2.100; ")
    assert "vs alone: evaluation loss -0.433 ± 0.058 (better)" in text
    assert "vs rkl (baseline): evaluation loss -0.300 ± 0.000 (better)" in text
    assert "Indistinguishable from it: js." in text
    assert text.endswith("and one evaluation example (0.0100).")


def test_verdict_with_one_seed_says_so_and_marks_nothing():
    runs = _runs({"alone": [0.5], "fkl": [0.9]}, key="accuracy")
    summary = v.summarise(runs, ["alone", "fkl"], [ACC], {"_alone": "alone"})
    answer = v.verdict(summary, runs, ACC, alone="alone")
    assert answer["single_seed"] and answer["indistinguishable"] == []
    assert "vs alone: accuracy +0.4000 ± n/a;" not in answer["text"]  # no mark word, not even "not distinguishable"
    assert "vs alone: accuracy +0.4000 ± n/a." in answer["text"]
    assert v.NO_SPREAD_TEXT in answer["text"]


def test_verdict_when_the_student_alone_is_best_and_when_nothing_finished():
    runs = _runs({"alone": [0.9, 0.91], "fkl": [0.5, 0.52]}, key="accuracy")
    summary = v.summarise(runs, ["alone", "fkl"], [ACC], {"_alone": "alone"})
    assert "no distilled row beats the student trained without the teacher" in v.verdict(summary, runs, ACC, alone="alone")["text"]
    failed = [{"name": "fkl", "seed": 0, "status": "failed"}]
    assert v.verdict(v.summarise(failed, ["fkl"], [ACC], {}), failed, ACC)["best"] is None


def test_a_tiny_resolution_is_printed_with_significant_digits_not_as_zero():
    tiny = v.Metric("loss", "evaluation loss", higher_is_better=False, resolution=1 / 40_000, unit="one evaluation token")
    runs = _runs({"a": [1.0, 1.1], "b": [1.5, 1.6]})
    answer = v.verdict(v.summarise(runs, ["a", "b"], [tiny], {}), runs, tiny)
    assert answer["text"].endswith("one evaluation token (2.5e-05).")


def test_metric_and_table_note_and_report_skeleton():
    with pytest.raises(ValueError, match="resolution"):
        v.Metric("loss", "loss", resolution=-1.0)
    note = v.table_note(False, "one evaluation example (0.0100)", extra="Lower loss is better. ")
    assert "exceeds both that deviation and one evaluation example (0.0100). Lower loss is better. Without" in note
    assert v.table_note(True, "x").startswith("One seed: the ± columns are n/a")
    text = v.report_markdown("t", "Verdict: x.", "intro", [("A", "a"), ("B", "b")])
    assert text == "# t\n\nVerdict: x.\n\nintro\n\n## A\n\na\n\n## B\n\nb\n"


def test_format_difference_star_style_of_rl():
    """rl --compare writes '+0.100 ± 0.010 *': d = (0.09, 0.10, 0.11)."""
    paired = v.paired_difference({0: 0.59, 1: 0.60, 2: 0.61}, {0: 0.5, 1: 0.5, 2: 0.5}, resolution=0.05)
    assert v.format_difference(paired, 3, star=True) == "+0.100 ± 0.010 *"
    assert v.format_difference(v.paired_difference({0: 0.6}, {0: 0.5}), 3, star=True) == "+0.100 ± n/a"
