"""`divergent explore`: the restricted-student picture."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from divergent.cli import app
from divergent.experiments.explore import fit


def test_reverse_kl_seeks_a_mode_and_forward_kl_covers_all():
    """The textbook contrast: reverse KL puts (nearly) all mass on one mode, forward KL on all three."""
    reverse = fit("reverse_kl", steps=150)
    forward = fit("forward_kl", steps=150)
    assert max(reverse.mode_mass) > 0.95
    assert min(forward.mode_mass) > 0.2
    assert forward.student_entropy > forward.teacher_entropy > reverse.student_entropy


def test_cli_writes_table_csv_json_png(tmp_path):
    result = CliRunner().invoke(app, ["explore", "--divergences", "forward_kl,reverse_kl", "--steps", "40",
                                      "--out-dir", str(tmp_path)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "forward_kl" in result.output and "reverse_kl" in result.output
    (run,) = list(tmp_path.iterdir())
    assert (run / "explore.png").stat().st_size > 10_000
    data = json.loads((run / "results.json").read_text())
    assert [r["name"] for r in data["results"]] == ["forward_kl", "reverse_kl"]
    assert (run / "results.csv").read_text().startswith("divergence,mass_A")


def test_cli_unknown_divergence_is_a_clear_error(tmp_path):
    result = CliRunner().invoke(app, ["explore", "--divergences", "kl", "--out-dir", str(tmp_path)])
    assert result.exit_code != 0
    assert "unknown divergence 'kl'" in result.output
