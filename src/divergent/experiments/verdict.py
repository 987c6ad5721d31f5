"""One answer for every comparison over rows and seeds: the marking rule, the summary, the verdict and the report.

``compare`` (classifiers), ``distill-lm --seeds`` (language models), ``rl --compare`` (RL
regularisers) and ``fdpg --compare`` all train several *rows* (divergences, methods,
regularisers) on the same *seeds* and ask which row to use. They answer with the same
plain rule, written here once:

- a row is compared with a reference row (the student alone, a baseline) **seed by seed**:
  the per-seed differences d_s = row_s − reference_s give a mean and a sample standard
  deviation;
- the difference is **marked** ("better"/"worse") only when at least two seeds are shared
  and |mean| exceeds both that standard deviation (the seed spread) and the metric's
  **resolution**: the smallest change the evaluation can show — one test example of
  accuracy (1/n_test), one held-out prompt of pass@k, one evaluation example's share of an
  evaluation loss. Neither seed noise nor a single example is read as a win. This is a rule
  a reader can check, not a p-value.

A metric is described by :class:`Metric` (its key in the per-run dicts, its name, which
direction is better, its resolution). The pieces:

- :func:`paired_difference` — the rule on two ``{seed: value}`` maps;
- :func:`summarise` — per row: mean ± std over seeds of any metrics, and the paired
  differences of the compared metrics with each reference;
- :func:`mean_std_cell`, :func:`difference_cell`, :func:`difference_column` — the table's
  ``"0.9000 ± 0.0100"`` and ``"+0.0241 ± 0.0043 better"`` cells (``n/a`` with one seed);
- :func:`verdict` — the verdict line: the best row, its paired gains, the rows
  indistinguishable from it;
- :func:`table_note` and :func:`report_markdown` — the note under the table and the
  ``report.md`` skeleton (title, verdict, sections).

Example (hand-checkable: ``js`` beats ``forward_kl`` by 0.03 ± 0.01 on three seeds, far
beyond one of 100 test examples; ``tvd`` by half an example, which is not marked)::

    >>> from divergent.experiments import verdict as v
    >>> accuracy = v.Metric("accuracy", "test accuracy", resolution=1 / 100, short="accuracy")
    >>> runs = [{"name": n, "seed": s, "accuracy": a}
    ...         for s, base in enumerate([0.80, 0.85, 0.90])
    ...         for n, a in [("forward_kl", base), ("tvd", base + 0.005), ("js", base + 0.02 + 0.01 * s)]]
    >>> summary = v.summarise(runs, ["forward_kl", "tvd", "js"], [accuracy], {"": "forward_kl"})
    >>> rows = {e["name"]: e for e in summary}
    >>> v.difference_column(rows["js"], accuracy, "", "forward_kl")
    '+0.0300 ± 0.0100 better'
    >>> v.difference_column(rows["tvd"], accuracy, "", "forward_kl")
    '+0.0050 ± 0.0000'
    >>> v.mean_std_cell(rows["js"], "accuracy")
    '0.8800 ± 0.0600'
    >>> print(v.verdict(summary, runs, accuracy, baseline="forward_kl")["text"])  # doctest: +NORMALIZE_WHITESPACE
    Verdict (test accuracy, mean of 3 seeds): best row **js** at 0.8800; vs forward_kl (baseline):
    accuracy +0.0300 ± 0.0100 (better). Every other row is distinguishable from it. A difference counts
    when its mean over seeds exceeds both the std of the per-seed differences and one test example (0.0100).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "Metric",
    "mean_std",
    "paired_difference",
    "mark",
    "format_difference",
    "finished_by_seed",
    "summarise",
    "mean_std_cell",
    "difference_cell",
    "difference_column",
    "verdict",
    "table_note",
    "report_markdown",
    "NO_SPREAD_TEXT",
]

NO_SPREAD_TEXT = (" With one seed there is no spread across seeds, so no difference can be told from seed noise"
                  " (n/a); run with several seeds (--seeds 0,1,2).")


@dataclass(frozen=True)
class Metric:
    """One compared quantity.

    key: its key in the per-run dicts (``"accuracy"``, ``"loss"``, ``"rouge_l"``).
    name: how the verdict names it (``"test accuracy"``, ``"evaluation loss"``).
    higher_is_better: direction of "better" (False for a loss, ECE, perplexity).
    resolution: the smallest difference the evaluation can show, in the metric's units:
        one test example of accuracy is 1/n_test; see the module docstring. >= 0.
    digits: decimals of its cells.
    short: its name inside a verdict clause (``"accuracy"``, ``"ECE"``); default ``name``.
    unit: what one resolution step is, as the verdict says it (``"one test example"``).
    """

    key: str
    name: str
    higher_is_better: bool = True
    resolution: float = 0.0
    digits: int = 4
    short: str | None = None
    unit: str = "one test example"

    def __post_init__(self) -> None:
        if not isinstance(self.resolution, (int, float)) or math.isnan(self.resolution) or self.resolution < 0:
            raise ValueError(f"Metric {self.key!r}: resolution must be a number >= 0, got {self.resolution!r}")
        if self.digits < 0:
            raise ValueError(f"Metric {self.key!r}: digits must be >= 0, got {self.digits}")

    @property
    def clause_name(self) -> str:
        return self.short or self.name


# ----------------------------------------------------------------------------- the rule


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value).

    >>> mean_std([1.0, 2.0, 3.0])
    (2.0, 1.0)
    """
    values = [float(v) for v in values]
    if not values:
        raise ValueError("mean_std needs at least one value, got an empty sequence")
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, std


def paired_difference(
    a_by_seed: Mapping[Any, float], b_by_seed: Mapping[Any, float], *, resolution: float = 0.0
) -> dict[str, Any]:
    """Paired comparison of two rows run on the same seeds (and splits).

    The differences d_s = a_s - b_s over the shared seeds s give ``mean_diff`` and
    ``std_diff`` (sample standard deviation; 0 for one seed, where no spread is known).
    ``significant`` is True when at least two seeds are shared and |mean_diff| exceeds
    both std_diff and ``resolution`` — the smallest difference the measurement can
    show, e.g. one test example (1/n_test) of accuracy: the difference is larger than
    its own spread across seeds and than one example, so it is unlikely to be seed noise
    or a single example alone. This is deliberately a plain rule a reader can check, not
    a p-value.

    >>> r = paired_difference({0: 0.9, 1: 0.92, 2: 0.91}, {0: 0.8, 1: 0.83, 2: 0.80})
    >>> round(r["mean_diff"], 4), r["n"], r["significant"]
    (0.1, 3, True)
    >>> paired_difference({0: 0.902, 1: 0.902}, {0: 0.9, 1: 0.9}, resolution=1 / 359)["significant"]
    False
    """
    seeds = [s for s in a_by_seed if s in b_by_seed]
    if not seeds:
        raise ValueError("paired_difference needs at least one seed present in both inputs")
    diffs = [float(a_by_seed[s]) - float(b_by_seed[s]) for s in seeds]
    mean, std = mean_std(diffs)
    return {
        "mean_diff": mean,
        "std_diff": std,
        "n": len(diffs),
        "significant": len(diffs) >= 2 and abs(mean) > std and abs(mean) > resolution,
    }


def mark(mean_diff: float, significant: bool, *, higher_is_better: bool = True) -> str:
    """``"better"``/``"worse"`` for a marked difference (row − reference), ``""`` for an unmarked one.

    >>> mark(-0.02, True, higher_is_better=False), mark(-0.02, True), mark(0.5, False)
    ('better', 'worse', '')
    """
    if not significant:
        return ""
    return "better" if (mean_diff > 0) == higher_is_better else "worse"


def format_difference(paired: Mapping[str, Any], digits: int = 4, *, star: bool = False) -> str:
    """A :func:`paired_difference` as ``"+0.100 ± 0.010"`` (``± n/a`` for one seed), with `` *`` when marked and ``star``.

    >>> format_difference(paired_difference({0: 0.6, 1: 0.61}, {0: 0.5, 1: 0.5}), 3, star=True)
    '+0.105 ± 0.007 *'
    """
    spread = "n/a" if paired["n"] < 2 else f"{paired['std_diff']:.{digits}f}"
    text = f"{paired['mean_diff']:+.{digits}f} ± {spread}"
    return text + (" *" if star and paired["significant"] else "")


# ----------------------------------------------------------------------------- summary over seeds


def _finished(row: Mapping[str, Any]) -> bool:
    return row.get("status", "finished") == "finished"


def finished_by_seed(rows: Sequence[Mapping[str, Any]], name: str, *, name_key: str = "name") -> dict[Any, Mapping[str, Any]]:
    """``{seed: run}`` of the finished runs of row ``name`` (a run without ``status`` counts as finished)."""
    return {r["seed"]: r for r in rows if r[name_key] == name and _finished(r)}


def summarise(
    rows: Sequence[Mapping[str, Any]],
    names: Sequence[str],
    compared: Sequence[Metric],
    references: Mapping[str, str],
    *,
    described: Sequence[str] | None = None,
    name_key: str = "name",
) -> list[dict[str, Any]]:
    """One entry per row name, in the order of ``names``.

    rows: per-run dicts with ``name_key``, ``"seed"``, the metrics, and optionally ``"status"``
        (anything but ``"finished"`` counts as failed).
    compared: the metrics compared with the references (paired differences).
    references: ``{suffix: reference row}``; e.g. ``{"": "forward_kl", "_alone": "student alone"}``.
    described: keys averaged over seeds (default: the ``compared`` keys).

    An entry holds ``name``, ``runs`` (finished seeds), ``failed``; ``{key}_mean`` and ``{key}_std``
    (``None`` with one seed: no spread is known) for every described key; and, for each reference
    and compared metric, ``{key}_diff{suffix}``, ``{key}_diff{suffix}_std`` (``None`` with one shared
    seed) and ``{key}_significant{suffix}`` (the rule of :func:`paired_difference` with the metric's
    resolution). A row is not compared with itself, nor with a reference without a shared seed.
    """
    described = [m.key for m in compared] if described is None else list(described)
    by_name = {name: finished_by_seed(rows, name, name_key=name_key) for name in names}
    for reference in references.values():
        by_name.setdefault(reference, finished_by_seed(rows, reference, name_key=name_key))
    summary = []
    for name in names:
        runs = by_name[name]
        entry: dict[str, Any] = {"name": name, "runs": len(runs),
                                 "failed": sum(1 for r in rows if r[name_key] == name and not _finished(r))}
        if not runs:
            summary.append(entry)
            continue
        for key in described:
            mean, std = mean_std([r[key] for r in runs.values()])
            entry[f"{key}_mean"], entry[f"{key}_std"] = mean, (std if len(runs) > 1 else None)
        for suffix, reference in references.items():
            if name == reference:
                continue
            other = by_name[reference]
            if not any(seed in other for seed in runs):
                continue
            for metric in compared:
                paired = paired_difference({s: r[metric.key] for s, r in runs.items()},
                                           {s: r[metric.key] for s, r in other.items()}, resolution=metric.resolution)
                entry[f"{metric.key}_diff{suffix}"] = paired["mean_diff"]
                entry[f"{metric.key}_diff{suffix}_std"] = paired["std_diff"] if paired["n"] > 1 else None
                entry[f"{metric.key}_significant{suffix}"] = paired["significant"]
        summary.append(entry)
    return summary


# ----------------------------------------------------------------------------- cells


def mean_std_cell(entry: Mapping[str, Any], key: str, digits: int = 4) -> str:
    """``"0.9000 ± 0.0100"`` (``± n/a`` with one seed); ``"failed"`` when no run of the row finished."""
    if f"{key}_mean" not in entry:
        return "failed"
    std = entry[f"{key}_std"]
    return f"{entry[f'{key}_mean']:.{digits}f} ± " + ("n/a" if std is None else f"{std:.{digits}f}")


def difference_cell(entry: Mapping[str, Any], metric: Metric, suffix: str = "") -> tuple[str, str | None]:
    """A summary entry's paired difference as ``"+0.0241 ± 0.0043"`` and its mark: "better", "worse", "" or None (one seed)."""
    mean, std = entry[f"{metric.key}_diff{suffix}"], entry[f"{metric.key}_diff{suffix}_std"]
    digits = metric.digits
    if std is None:
        return f"{mean:+.{digits}f} ± n/a", None
    return (f"{mean:+.{digits}f} ± {std:.{digits}f}",
            mark(mean, entry[f"{metric.key}_significant{suffix}"], higher_is_better=metric.higher_is_better))


def difference_column(entry: Mapping[str, Any], metric: Metric, suffix: str, reference: str) -> str:
    """The table cell of a difference: ``"reference"`` on the reference row, ``"failed"``, ``"no shared seed"``, or the difference with its mark."""
    if entry["name"] == reference:
        return "reference"
    if f"{metric.key}_diff{suffix}" not in entry:
        return "failed" if not entry["runs"] else "no shared seed"
    text, marked = difference_cell(entry, metric, suffix)
    return f"{text} {marked}" if marked else text


# ----------------------------------------------------------------------------- verdict and report


def verdict(
    summary: Sequence[Mapping[str, Any]],
    rows: Sequence[Mapping[str, Any]],
    primary: Metric,
    *,
    alone: str | None = None,
    baseline: str | None = None,
    secondary: Sequence[Metric] = (),
    name_key: str = "name",
    alone_best_text: str = " — no distilled row beats the student trained without the teacher",
) -> dict[str, Any]:
    """The verdict line: the best row by mean ``primary``, its paired gains, the rows indistinguishable from it.

    ``summary`` comes from :func:`summarise` with references ``{"": baseline, "_alone": alone}``
    (either may be None: no clause). Clauses show ``primary`` then ``secondary`` metrics. Two rows
    are indistinguishable when their paired ``primary`` difference is not marked by the rule. One
    seed gives no spread: gains are shown ``± n/a`` and nothing is called better or indistinguishable.
    Returns ``{"metric", "best", <primary.key>, "single_seed", "indistinguishable", "one_example", "text"}``.
    """
    one_example = primary.resolution
    ranked = [e for e in summary if e["runs"]]
    if not ranked:
        return {"metric": primary.name, "best": None, "text": "Verdict: no row finished; nothing to compare."}
    choose = max if primary.higher_is_better else min
    best = choose(ranked, key=lambda e: e[f"{primary.key}_mean"])
    by_name = {e["name"]: finished_by_seed(rows, e["name"], name_key=name_key) for e in ranked}
    single_seed = max(e["runs"] for e in ranked) < 2

    def gain(metric: Metric, suffix: str) -> str:
        if f"{metric.key}_diff{suffix}" not in best:
            return "no shared seed"
        text, marked = difference_cell(best, metric, suffix)
        return text if marked is None else f"{text} ({marked or 'not distinguishable'})"

    def clause(suffix: str) -> str:
        return ", ".join(f"{m.clause_name} {gain(m, suffix)}" for m in (primary, *secondary))

    clauses = []
    if alone is not None and best["name"] != alone:
        clauses.append(f"vs {alone}: {clause('_alone')}")
    if baseline is not None and best["name"] != baseline:
        clauses.append(f"vs {baseline} (baseline): {clause('')}")
    indistinguishable = []
    if not single_seed:
        for entry in ranked:
            if entry is best:
                continue
            mine, theirs = by_name[best["name"]], by_name[entry["name"]]
            if not any(seed in theirs for seed in mine):
                continue
            paired = paired_difference({s: r[primary.key] for s, r in mine.items()},
                                       {s: r[primary.key] for s, r in theirs.items()}, resolution=one_example)
            if not paired["significant"]:
                indistinguishable.append(entry["name"])
    seeds = f"mean of {best['runs']} seeds" if not single_seed else "one seed"
    value = best[f"{primary.key}_mean"]
    text = f"Verdict ({primary.name}, {seeds}): best row **{best['name']}** at {value:.{primary.digits}f}"
    if alone is not None and best["name"] == alone:
        text += alone_best_text
    if clauses:
        text += "; " + "; ".join(clauses)
    text += "."
    if single_seed:
        text += NO_SPREAD_TEXT
    elif indistinguishable:
        text += f" Indistinguishable from it: {', '.join(indistinguishable)}."
    else:
        text += " Every other row is distinguishable from it."
    if not single_seed:
        text += (f" A difference counts when its mean over seeds exceeds both the std of the per-seed differences"
                 f" and {primary.unit} ({_resolution_text(primary)}).")
    return {"metric": primary.name, "best": best["name"], primary.key: value, "single_seed": single_seed,
            "indistinguishable": indistinguishable, "one_example": one_example, "text": text}


def _resolution_text(metric: Metric) -> str:
    """The resolution as the verdict prints it: 4 decimals, or 3 significant digits when that would show 0."""
    if metric.resolution == 0 or metric.resolution >= 5e-5:
        return f"{metric.resolution:.4f}"
    return f"{metric.resolution:.3g}"


def table_note(single_seed: bool, resolution_text: str, *, extra: str = "") -> str:
    """The paragraph under a comparison table: how Δ is computed and when it is marked.

    resolution_text: what one resolution step is, with its value, e.g. ``"one test example (1/100 = 0.0100)"``.
    extra: a sentence inserted before the closing one (e.g. ``"Lower ECE is better. "``).
    """
    if single_seed:
        return ("One seed: the ± columns are n/a (no spread across seeds is known) and no row is marked better or "
                "worse; run with several seeds (--seeds 0,1,2) to tell a difference from seed noise.")
    return (f"Δ = mean over seeds of the per-seed difference (row − reference, same seed and split) ± its standard "
            f"deviation; marked better/worse only when |Δ| exceeds both that deviation and {resolution_text}. "
            f"{extra}Without a mark a row is indistinguishable from the reference at this number of seeds.")


def report_markdown(title: str, verdict_text: str, intro: str, sections: Sequence[tuple[str, str]]) -> str:
    """``report.md`` of a comparison: ``# title``, the verdict line first, an introduction, then ``## heading`` sections.

    >>> print(report_markdown("divergent x", "Verdict: ...", "Two seeds.", [("Results", "| a |")]))
    # divergent x
    <BLANKLINE>
    Verdict: ...
    <BLANKLINE>
    Two seeds.
    <BLANKLINE>
    ## Results
    <BLANKLINE>
    | a |
    <BLANKLINE>
    """
    parts = [f"# {title}", verdict_text, intro] + [f"## {heading}\n\n{body}" for heading, body in sections]
    return "\n\n".join(parts) + "\n"
