"""Domain mixing in ``distill-lm`` (``--domain-column COL --mixing ddk|uniform|proportional``).

What :mod:`divergent.experiments.lm` calls when the data has domains: reading the data
grouped by domain, the teacher's perplexity per domain, one
:class:`divergent.train.ddk.DomainMixingTrainer` per student, and the report — per domain
and student, the teacher's and the student's perplexity before and after training, their
ratio (what DDK weighs by), the share of training examples drawn from the domain and the
final weight; ``domains.csv``, a section of ``report.md`` and ``domain_weights.png`` (each
student's weights over the steps).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from divergent.data.domains import DomainData, load_domain_data
from divergent.experiments import report
from divergent.train.ddk import DomainMixingTrainer, domain_perplexities

__all__ = ["DomainSetup", "load_domains", "with_teacher", "domain_trainer", "domain_row", "report_domains"]


@dataclass
class DomainSetup:
    """The data by domain, the mixing rule and settings, and the teacher's perplexity per domain."""

    data: DomainData
    mixing: str
    interval: int
    smoothing: float
    column: str
    teacher_ppl: list[float] | None = None
    teachers: dict[str, str] | None = None  # {domain: teacher} with one teacher per domain


def load_domains(config: Any, tokenizer: Any) -> tuple[DomainSetup, tuple[list, list, str, dict]]:
    """The config's data by ``config.domain_column``, and ``(train, eval, description, stats)`` over all domains."""
    data = load_domain_data(config.data, tokenizer, config.domain_column, eval_data=config.eval_data or None,
                            eval_fraction=config.eval_fraction, max_length=config.length(), packing=config.packing,
                            seed=config.seed, max_eval_examples=config.max_eval_examples)
    description = "; ".join([data.train_stats.describe(), data.eval_stats.describe(), *data.notes])
    stats = {"train": data.train_stats.__dict__, "eval": data.eval_stats.__dict__}
    setup = DomainSetup(data=data, mixing=config.mixing_rule(), interval=config.ddk_interval,
                        smoothing=float(config.ddk_smoothing), column=config.domain_column)
    return setup, (data.all_train(), data.all_eval(), description, stats)


def with_teacher(domains: DomainSetup, teacher: torch.nn.Module, *, batch_size: int, device: torch.device,
                 pad_token_id: int, vocab_size: int | None) -> DomainSetup:
    """``domains`` with the teacher's perplexity on each domain's evaluation rows (measured once)."""
    domains.teacher_ppl = domain_perplexities(teacher, [domains.data.eval[name] for name in domains.data.names],
                                              batch_size=batch_size, device=device, pad_token_id=pad_token_id,
                                              vocab_size=vocab_size)
    return domains


def domain_trainer(domains: DomainSetup, student: torch.nn.Module, teacher: torch.nn.Module | None, config: Any, *,
                   eval_batch_size: int, **kwargs: Any) -> DomainMixingTrainer:
    """One student's trainer drawing its batches by the domain mixing (kwargs: LMTrainer's)."""
    return DomainMixingTrainer(student, teacher, domains.data.train, domains.data.eval, config, mixing=domains.mixing,
                               interval=domains.interval, smoothing=domains.smoothing, teacher_ppl=domains.teacher_ppl,
                               eval_batch_size=eval_batch_size, **kwargs)


def domain_row(trainer: DomainMixingTrainer, domains: DomainSetup) -> dict[str, Any]:
    """What a student's result keeps of its domain mixing (plain values, for result.json)."""
    history = trainer.domain_history
    return {"names": list(domains.data.names), "mixing": domains.mixing, "teacher_ppl": domains.teacher_ppl,
            "before": history[0]["student_ppl"], "after": history[-1]["student_ppl"],
            "drawn": history[-1]["drawn"], "final_weights": history[-1]["weights"], "history": history,
            "measure_seconds": trainer.measure_seconds}


def _table(rows: list[dict[str, Any]], domains: DomainSetup) -> list[dict[str, Any]]:
    table = []
    for row in rows:
        info = row.get("domains")
        if not info:
            continue
        total = max(sum(info["drawn"]), 1)
        for i, name in enumerate(info["names"]):
            teacher = info["teacher_ppl"][i] if info["teacher_ppl"] else None
            table.append({
                "model": row.get("label", row["model"]), "domain": name,
                **({"teacher": domains.teachers[name]} if domains.teachers else {}),
                "train_examples": len(domains.data.train[name]), "eval_examples": len(domains.data.eval[name]),
                "teacher_ppl": teacher, "ppl_before": info["before"][i], "ppl_after": info["after"][i],
                "ratio_before": info["before"][i] / teacher if teacher else None,
                "ratio_after": info["after"][i] / teacher if teacher else None,
                "drawn_share": info["drawn"][i] / total, "final_weight": info["final_weights"][i],
            })
    return table


def _weights_plot(rows: list[dict[str, Any]], domains: DomainSetup, path: Path, title: str) -> Path | None:
    """One panel per student: each domain's weight over the steps (constant between measurements)."""
    from divergent.experiments.plots import plot_panels

    rows = [r for r in rows if r.get("domains")]
    if not rows:
        return None
    series: dict[str, dict[str, list[tuple[float, float]]]] = {name: {} for name in domains.data.names}
    panels = []
    for row in rows:
        label = row.get("label", row["model"])
        panels.append((label, f"{label}: domain weights"))
        history = row["domains"]["history"]
        for i, name in enumerate(domains.data.names):
            points = []
            for h, after in zip(history, history[1:] + [None]):
                points.append((h["step"], h["weights"][i]))
                if after is not None:
                    points.append((after["step"], h["weights"][i]))  # held until the next measurement
            series[name][label] = points
    plot_panels(series, panels, path, xlabel="training step", title=title)
    return path


_COLUMNS = ["model", "domain", "teacher_ppl", "ppl_before", "ppl_after", "ratio_before", "ratio_after",
            "drawn_share", "final_weight"]


def report_domains(rows: list[dict[str, Any]], domains: DomainSetup, run_dir: Path, console: Console) -> str:
    """Print the per-domain table, write ``domains.csv`` and ``domain_weights.png``; the report.md section."""
    table = _table(rows, domains)
    if not table:
        return ""
    columns = _COLUMNS[:2] + ["teacher"] + _COLUMNS[2:] if domains.teachers else _COLUMNS
    report.print_table(table, columns, title=f"per domain ({domains.mixing} mixing by {domains.column!r})",
                       console=console)
    report.write_csv(table, run_dir / "domains.csv")
    plot = _weights_plot(rows, domains, run_dir / "domain_weights.png",
                         f"{domains.mixing} mixing by {domains.column!r}")
    rule = {"ddk": f"DDK (r = softmax(ppl_S/ppl_T) at step 0, then every {domains.interval} steps "
                   f"ψ = r·exp(ppl_S/ppl_T), r ← {domains.smoothing:g}·ψ/Σψ + {1 - domains.smoothing:g}/N)",
            "uniform": "uniform (every domain equally often)",
            "proportional": "proportional (each domain by its share of the training rows)"}[domains.mixing]
    return f"""
## Domains

Domains by the column `{domains.column}`, drawn by {rule}.{" Each domain has its own teacher (column teacher)." if domains.teachers else ""} Per student and domain: the teacher's and
the student's perplexity on the domain's evaluation rows before and after training, their ratio
ppl_S/ppl_T (what DDK weighs by), the share of training examples drawn from the domain and the
final weight. Also in `domains.csv`.

{report.markdown_table(table, columns)}
{'' if plot is None else chr(10) + '![domain weights](domain_weights.png)' + chr(10)}"""
