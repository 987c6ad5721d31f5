"""PNG figures for classifier runs: reliability diagrams, training curves, accuracy vs ECE.

Uses matplotlib's non-interactive Agg backend, so it works on headless machines.
Each function writes one PNG and returns the matplotlib ``Figure`` it drew (closed,
so it holds no window; its axes can still be inspected). Rows keep one colour across
every figure (:func:`row_styles`): 20 distinct colours, then line styles and markers
vary, so no two of up to 80 rows look alike. Every figure has one legend, outside the axes.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

__all__ = ["row_styles", "pool_reliability_bins", "plot_reliability", "plot_training_curves", "plot_accuracy_vs_ece",
           "plot_panels", "plot_mean_band_panels", "plot_mean_std_scatter"]

_LINESTYLES = ("-", "--", ":", "-.")
_MARKERS = ("o", "s", "^", "D")


def _palette() -> list[tuple[float, ...]]:
    """20 distinct qualitative colours: tab10, then the ten lighter shades of tab20."""
    dark = [plt.get_cmap("tab10")(i) for i in range(10)]
    light = [plt.get_cmap("tab20")(2 * i + 1) for i in range(10)]
    return dark + light


def row_styles(names: Sequence[str]) -> dict[str, dict]:
    """A colour, line style and marker per name, in order: 20 colours, then the style varies.

    >>> styles = row_styles([f"row{i}" for i in range(21)])
    >>> len({s["color"] for s in list(styles.values())[:20]}), styles["row20"]["linestyle"]
    (20, '--')
    """
    palette = _palette()
    styles = {}
    for i, name in enumerate(dict.fromkeys(names)):
        cycle = i // len(palette)
        styles[name] = {"color": palette[i % len(palette)], "linestyle": _LINESTYLES[cycle % len(_LINESTYLES)],
                        "marker": _MARKERS[cycle % len(_MARKERS)]}
    return styles


def _save(fig: Figure, path: str | Path) -> Figure:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return fig


def _legend_outside(fig: Figure, styles: Mapping[str, dict], names: Sequence[str], *, kind: str = "line") -> None:
    """One legend for the whole figure, to the right of every axes."""
    if kind == "line":
        handles = [Line2D([], [], color=styles[n]["color"], linestyle=styles[n]["linestyle"], lw=2) for n in names]
    else:
        handles = [Line2D([], [], color=styles[n]["color"], marker=styles[n]["marker"], linestyle="none", markersize=7)
                   for n in names]
    fig.legend(handles, list(names), loc="outside right upper", fontsize=8, frameon=False)


def pool_reliability_bins(bins_list: Sequence[Mapping[str, Sequence[float]]]) -> dict[str, list[float]]:
    """The reliability bins of several runs pooled: as if every run's predictions were one set.

    Each input is a dict from :func:`divergent.metrics.classification.reliability_bins` with the
    same bin edges; per bin, counts add and accuracy/confidence are count-weighted means
    (NaN for a bin empty in every run).

    >>> a = {"lower": [0.0, 0.5], "upper": [0.5, 1.0], "accuracy": [0.0, 1.0], "confidence": [0.4, 0.9], "count": [1, 3]}
    >>> b = {"lower": [0.0, 0.5], "upper": [0.5, 1.0], "accuracy": [float("nan"), 0.0], "confidence": [float("nan"), 0.7], "count": [0, 1]}
    >>> pool_reliability_bins([a, b])["accuracy"], pool_reliability_bins([a, b])["count"]
    ([0.0, 0.75], [1.0, 4.0])
    """
    if not bins_list:
        raise ValueError("bins_list is empty: nothing to pool")
    first = bins_list[0]
    for bins in bins_list[1:]:
        if list(bins["lower"]) != list(first["lower"]) or list(bins["upper"]) != list(first["upper"]):
            raise ValueError("reliability bins to pool must share their bin edges")
    pooled: dict[str, list[float]] = {"lower": list(first["lower"]), "upper": list(first["upper"]),
                                      "accuracy": [], "confidence": [], "count": []}
    for k in range(len(first["lower"])):
        count = sum(float(b["count"][k]) for b in bins_list)
        pooled["count"].append(count)
        for key in ("accuracy", "confidence"):
            total = sum(float(b["count"][k]) * float(b[key][k]) for b in bins_list if b["count"][k] > 0)
            pooled[key].append(total / count if count > 0 else float("nan"))
    return pooled


def _pooled_ece(bins: Mapping[str, Sequence[float]]) -> float:
    """ECE of pooled bins: Σ_b (|B_b| / N) · |acc(B_b) − conf(B_b)|."""
    n = sum(bins["count"])
    return sum(c / n * abs(a - f) for c, a, f in zip(bins["count"], bins["accuracy"], bins["confidence"]) if c > 0)


def plot_reliability(
    bins_by_name: Mapping[str, Sequence[Mapping[str, Sequence[float]]] | Mapping[str, Sequence[float]]],
    path: str | Path,
    title: str = "Reliability on the test split",
    *,
    references: Sequence[str] = (),
) -> Figure:
    """One reliability diagram per row, pooled over seeds, with the number of predictions per bin under it.

    ``bins_by_name`` maps a label to one dict from
    :func:`divergent.metrics.classification.reliability_bins` or to a list of them (one per
    seed), which are pooled (:func:`pool_reliability_bins`). Upper panel: the accuracy of each
    confidence bin (bars) against the diagonal — the gap is that bin's calibration error. The
    title gives the ECE as mean ± std over seeds when the dicts carry an ``"ece"`` key (the
    numbers of the results table) and the ECE of the pooled bins. Lower panel: how many
    predictions fell in each bin (log scale), so a large gap in a nearly empty bin reads as
    what it is. Two axes per row. ``references`` (e.g. the teacher) are drawn hatched and take
    no colour, so every other row keeps the colour it has in the other figures.
    """
    names = list(bins_by_name)
    if not names:
        raise ValueError("bins_by_name is empty: nothing to plot")
    styles = row_styles([n for n in names if n not in references])
    cols = min(len(names), 4)
    rows = math.ceil(len(names) / cols)
    fig = plt.figure(figsize=(3.1 * cols, 3.6 * rows), layout="constrained")
    outer = fig.add_gridspec(rows, cols)
    for i, name in enumerate(names):
        runs = bins_by_name[name]
        runs = [runs] if isinstance(runs, Mapping) else list(runs)
        bins = pool_reliability_bins(runs)
        inner = outer[i // cols, i % cols].subgridspec(2, 1, height_ratios=[3, 1], hspace=0.05)
        ax = fig.add_subplot(inner[0])
        counts_ax = fig.add_subplot(inner[1], sharex=ax)
        lower, upper = bins["lower"], bins["upper"]
        width = [u - l for l, u in zip(lower, upper)]
        acc = [0.0 if a != a else a for a in bins["accuracy"]]  # empty bins (NaN) drawn empty
        if name in references:  # white, hatched: no row colour is taken
            ax.bar(lower, acc, width=width, align="edge", edgecolor="black", linewidth=0.5, color="white", hatch="///")
        else:
            ax.bar(lower, acc, width=width, align="edge", edgecolor="black", linewidth=0.5,
                   color=styles[name]["color"], alpha=0.85)
        ax.plot([0, 1], [0, 1], "--", color="gray", linewidth=1)
        n = int(sum(bins["count"]))
        eces = [float(r["ece"]) for r in runs if "ece" in r]
        if len(eces) == len(runs) and len(runs) > 1:
            ece = f"ECE {sum(eces) / len(eces):.3f} ± {_std(eces):.3f} over {len(runs)} seeds, pooled {_pooled_ece(bins):.3f}"
        else:
            ece = f"ECE {_pooled_ece(bins):.3f}" + (f" pooled over {len(runs)} seeds" if len(runs) > 1 else "")
        ax.set_title(f"{name}\n{ece}\n{n} predictions", fontsize=7.5)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.tick_params(labelbottom=False, labelsize=7)
        ax.set_ylabel("accuracy", fontsize=8)
        counts_ax.bar(lower, [max(c, 0) for c in bins["count"]], width=width, align="edge", color="dimgray")
        counts_ax.set_yscale("symlog", linthresh=1)
        counts_ax.set_ylim(0, max(max(bins["count"]), 1) * 3)
        counts_ax.set_xlabel("confidence", fontsize=8)
        counts_ax.set_ylabel("count", fontsize=7)
        counts_ax.tick_params(labelsize=6)
    fig.suptitle(f"{title} — dashed: perfect calibration")
    return _save(fig, path)


def _mean_band(histories: Sequence[Sequence[Mapping[str, float]]], metric: str):
    """Per-epoch mean, min and max of ``metric`` over the histories that have it at that epoch."""
    by_epoch: dict[float, list[float]] = {}
    for history in histories:
        for record in history:
            if metric in record and record[metric] == record[metric]:
                by_epoch.setdefault(record["epoch"], []).append(float(record[metric]))
    epochs = sorted(by_epoch)
    return (epochs, [sum(by_epoch[e]) / len(by_epoch[e]) for e in epochs],
            [min(by_epoch[e]) for e in epochs], [max(by_epoch[e]) for e in epochs])


def plot_training_curves(
    curves_by_name: Mapping[str, Sequence[Sequence[Mapping[str, float]]] | Sequence[Mapping[str, float]]],
    path: str | Path,
    *,
    loss: str = "train_loss",
    shared: Sequence[tuple[str, str]] = (("val_accuracy", "validation accuracy"), ("val_nll", "validation NLL (nats)")),
    title: str = "Training curves",
) -> Figure:
    """Each row's training objective in its own panel; comparable validation metrics overlaid.

    ``curves_by_name`` maps a row to one history or a list of histories (one per seed), each
    a list of per-epoch dicts with ``epoch`` and the metric keys (a trainer's ``history``).
    The rows optimise different objectives, whose values are not comparable (a method's loss
    may sit near 60 while a KL sits near 0.1), so ``loss`` gets one small panel per row with
    its own y-axis. The ``shared`` metrics (key, label) measure the same thing for every row
    and share one panel each. Lines are means over seeds, bands their min–max.
    Axes: one per row plus one per shared metric.
    """
    names = list(curves_by_name)
    if not names:
        raise ValueError("curves_by_name is empty: nothing to plot")
    styles = row_styles(names)
    histories = {n: ([h] if h and isinstance(h[0], Mapping) else list(h)) for n, h in curves_by_name.items()}
    cols = min(len(names), 5)
    loss_rows = math.ceil(len(names) / cols)
    fig = plt.figure(figsize=(2.8 * cols + 1.5, 2.2 * loss_rows + 3.2), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[2.2 * loss_rows, 3.2])
    loss_axes = top.subplots(loss_rows, cols, squeeze=False)
    for ax, name in zip(loss_axes.flat, names):
        epochs, mean, low, high = _mean_band(histories[name], loss)
        ax.plot(epochs, mean, color=styles[name]["color"], linestyle=styles[name]["linestyle"])
        ax.fill_between(epochs, low, high, color=styles[name]["color"], alpha=0.25, linewidth=0)
        ax.set_title(name, fontsize=8, color=styles[name]["color"])
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(loss_axes.flat)[len(names):]:
        ax.remove()
    top.suptitle(f"training objective ({loss}) per row — each its own objective and y-axis", fontsize=9)
    top.supxlabel("epoch", fontsize=8)
    shared_axes = bottom.subplots(1, len(shared), squeeze=False)
    for ax, (metric, label) in zip(shared_axes.flat, shared):
        for name in names:
            epochs, mean, low, high = _mean_band(histories[name], metric)
            if epochs:
                ax.plot(epochs, mean, color=styles[name]["color"], linestyle=styles[name]["linestyle"], lw=1.2)
                ax.fill_between(epochs, low, high, color=styles[name]["color"], alpha=0.12, linewidth=0)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    _legend_outside(fig, styles, names)
    seeds = max(len(h) for h in histories.values())
    fig.suptitle(f"{title}" + (f" — mean over {seeds} seeds, band min–max" if seeds > 1 else ""))
    return _save(fig, path)


def _mean_std_points(points: Sequence[Mapping[str, float | str]], x: str, y: str):
    """A new axes with every run faint and each row's mean ± std (both directions) on top: (fig, ax, names, styles)."""
    names = list(dict.fromkeys(str(p["name"]) for p in points))
    if not names:
        raise ValueError("points is empty: nothing to plot")
    styles = row_styles(names)
    fig, ax = plt.subplots(figsize=(6.8, 4.6), layout="constrained")
    for name in names:
        xs = [float(p[x]) for p in points if p["name"] == name]
        ys = [float(p[y]) for p in points if p["name"] == name]
        style = styles[name]
        ax.scatter(xs, ys, color=style["color"], marker=style["marker"], s=12, alpha=0.35, linewidths=0)
        ax.errorbar(sum(xs) / len(xs), sum(ys) / len(ys), xerr=_std(xs), yerr=_std(ys), color=style["color"],
                    marker=style["marker"], markersize=7, capsize=3, elinewidth=1.2, markeredgecolor="black",
                    markeredgewidth=0.5)
    return fig, ax, names, styles


def plot_accuracy_vs_ece(
    points: Sequence[Mapping[str, float | str]], path: str | Path, title: str = "Test accuracy vs ECE"
) -> Figure:
    """Per-row mean test accuracy against mean ECE, with ± one standard deviation over seeds in both directions.

    ``points`` is a list of dicts with ``name``, ``accuracy`` and ``ece`` (one per run); the
    runs of a row are drawn faintly behind its mean. The better corner — accurate and
    calibrated, top left — is marked.
    """
    fig, ax, names, styles = _mean_std_points(points, "ece", "accuracy")
    ax.set_xlabel("ECE (15 bins) — lower is better")
    ax.set_ylabel("test accuracy — higher is better")
    ax.grid(alpha=0.3)
    ax.margins(0.15)
    ax.annotate("better", xy=(0.02, 0.98), xycoords="axes fraction", ha="left", va="top", fontsize=10,
                fontweight="bold", color="darkgreen")
    ax.annotate("", xy=(0.02, 0.90), xytext=(0.14, 0.78), xycoords="axes fraction",
                arrowprops={"arrowstyle": "->", "color": "darkgreen", "lw": 1.5})
    seeds = max(sum(1 for p in points if p["name"] == n) for n in names)
    ax.set_title(f"{title}: mean ± std over {seeds} seeds" if seeds > 1 else f"{title} (one seed: no spread)", fontsize=10)
    _legend_outside(fig, styles, names, kind="marker")
    return _save(fig, path)


def _std(values: Sequence[float]) -> float:
    """Sample standard deviation (0 for one value: drawn as no bar)."""
    if len(values) < 2:
        return 0.0
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _finish_panel(ax, label: str, xlabel: str, reference: tuple[str, float] | None) -> None:
    """Title, x label, grid, and a reference value as a dashed grey line (e.g. the teacher's)."""
    if reference is not None:
        ref_label, value = reference
        ax.axhline(value, color="gray", linestyle="--", linewidth=1)
        ax.annotate(ref_label, xy=(1.0, value), xycoords=("axes fraction", "data"), ha="right", va="bottom",
                    fontsize=7, color="gray")
    ax.set_xlabel(xlabel)
    ax.set_title(label, fontsize=10)
    ax.grid(alpha=0.3)


def plot_panels(
    series: Mapping[str, Mapping[str, Sequence[tuple[float, float]]]],
    panels: Sequence[tuple[str, str]],
    path: str | Path,
    *,
    xlabel: str = "training step",
    references: Mapping[str, tuple[str, float]] | None = None,
    title: str = "",
) -> Figure:
    """One panel per quantity, one line per run, one legend outside: never two quantities on one axis.

    ``series`` maps a run's label to ``{key: [(x, y), ...]}``; ``panels`` lists ``(key, label)``,
    one panel each with its own y-axis; ``references`` maps a key to ``(label, y)`` drawn as a
    dashed grey line in that panel (e.g. the teacher's value). Axes: one per panel.
    """
    names = list(series)
    if not names or not panels:
        raise ValueError("plot_panels needs at least one run and one panel")
    styles = row_styles(names)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels) + 1.5, 3.8), squeeze=False, layout="constrained")
    for ax, (key, label) in zip(axes.flat, panels):
        for name in names:
            points = series[name].get(key, [])
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker=styles[name]["marker"], markersize=3, color=styles[name]["color"],
                        linestyle=styles[name]["linestyle"])
        _finish_panel(ax, label, xlabel, references.get(key) if references else None)
    _legend_outside(fig, styles, names)
    if title:
        fig.suptitle(title, fontsize=11)
    return _save(fig, path)


def plot_mean_band_panels(
    histories_by_name: Mapping[str, Sequence[Sequence[Mapping[str, float]]]],
    panels: Sequence[tuple[str, str]],
    path: str | Path,
    *,
    x: str = "step",
    xlabel: str = "training step",
    references: Mapping[str, tuple[str, float]] | None = None,
    title: str = "",
) -> Figure:
    """One panel per quantity; per row the mean over seeds with a ± one standard deviation band; one legend outside.

    ``histories_by_name`` maps a row to its histories, one per seed (lists of records holding ``x``
    and the panel keys). At each ``x`` the mean and sample std are over the seeds that recorded it.
    ``references`` maps a key to ``(label, y)``, drawn as a dashed grey line (e.g. the teacher).
    """
    names = [n for n, histories in histories_by_name.items() if histories]
    if not names or not panels:
        raise ValueError("plot_mean_band_panels needs at least one row with a history and one panel")
    styles = row_styles(names)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels) + 1.5, 3.8), squeeze=False, layout="constrained")
    seeds = max(len(histories_by_name[n]) for n in names)
    for ax, (key, label) in zip(axes.flat, panels):
        for name in names:
            by_x: dict[float, list[float]] = {}
            for history in histories_by_name[name]:
                for record in history:
                    if key in record and x in record and record[key] == record[key]:
                        by_x.setdefault(float(record[x]), []).append(float(record[key]))
            if not by_x:
                continue
            xs = sorted(by_x)
            mean = [sum(by_x[v]) / len(by_x[v]) for v in xs]
            std = [_std(by_x[v]) for v in xs]
            style = styles[name]
            ax.plot(xs, mean, color=style["color"], linestyle=style["linestyle"], marker=style["marker"], markersize=3)
            ax.fill_between(xs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                            color=style["color"], alpha=0.15, linewidth=0)
        _finish_panel(ax, label, xlabel, references.get(key) if references else None)
    _legend_outside(fig, styles, names)
    band = f" — mean ± std over {seeds} seeds" if seeds > 1 else " (one seed: no band)"
    fig.suptitle(f"{title}{band}", fontsize=11)
    return _save(fig, path)


def plot_mean_std_scatter(
    points: Sequence[Mapping[str, float | str]],
    path: str | Path,
    *,
    xlabel: str,
    ylabel: str,
    title: str = "",
    better: str = "",
) -> Figure:
    """Per-row mean of ``y`` against mean of ``x`` with ± one standard deviation over seeds in both directions.

    ``points`` holds one dict per run with ``name``, ``x`` and ``y``; the runs are drawn faintly
    behind their row's mean. ``better``: a corner to mark ("upper left", "upper right", ...).
    """
    fig, ax, names, styles = _mean_std_points(points, "x", "y")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.margins(0.15)
    if better:
        vertical, horizontal = better.split()
        ax.annotate("better", xy=(0.02 if horizontal == "left" else 0.98, 0.98 if vertical == "upper" else 0.02),
                    xycoords="axes fraction", ha=horizontal, va="top" if vertical == "upper" else "bottom",
                    fontsize=10, fontweight="bold", color="darkgreen")
    seeds = max(sum(1 for p in points if p["name"] == n) for n in names)
    suffix = f": mean ± std over {seeds} seeds" if seeds > 1 else " (one seed: no spread)"
    ax.set_title(f"{title}{suffix}", fontsize=10)
    _legend_outside(fig, styles, names, kind="marker")
    return _save(fig, path)
