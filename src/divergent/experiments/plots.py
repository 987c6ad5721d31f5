"""PNG figures for classifier runs: reliability diagrams, training curves, accuracy vs ECE.

Uses matplotlib's non-interactive Agg backend, so it works on headless machines.
Each function writes one PNG and returns its path.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["plot_reliability", "plot_training_curves", "plot_accuracy_vs_ece"]


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _grid(n: int) -> tuple[int, int]:
    cols = min(n, 3)
    return math.ceil(n / cols), cols


def plot_reliability(bins_by_name: Mapping[str, Mapping[str, Sequence[float]]], path: str | Path, title: str = "Reliability") -> Path:
    """One reliability diagram per entry: accuracy per confidence bin against the diagonal.

    ``bins_by_name`` maps a label to the dict from
    :func:`divergent.metrics.classification.reliability_bins` (possibly with an
    ``"ece"`` key, shown in the panel title). Bars show the accuracy of each bin;
    the gap to the diagonal is the calibration error of that bin.
    """
    path = Path(path)
    names = list(bins_by_name)
    if not names:
        raise ValueError("bins_by_name is empty: nothing to plot")
    rows, cols = _grid(len(names))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        bins = bins_by_name[name]
        lower, upper = bins["lower"], bins["upper"]
        width = [u - l for l, u in zip(lower, upper)]
        acc = [0.0 if (a != a) else a for a in bins["accuracy"]]  # empty bins (NaN) drawn empty
        ax.bar(lower, acc, width=width, align="edge", edgecolor="black", color="tab:blue", alpha=0.8, label="accuracy")
        ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
        label = name if "ece" not in bins else f"{name}\nECE {bins['ece']:.3f}"
        ax.set_title(label, fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence")
        ax.set_ylabel("accuracy")
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle(title)
    return _save(fig, path)


def plot_training_curves(
    curves_by_name: Mapping[str, Sequence[Mapping[str, float]]],
    path: str | Path,
    metrics: Sequence[str] = ("train_loss", "val_accuracy"),
    title: str = "Training curves",
) -> Path:
    """Per-epoch curves, one line per entry and one panel per metric.

    ``curves_by_name`` maps a label to a list of per-epoch dicts holding
    ``epoch`` and the ``metrics`` keys (as in a trainer's ``history``).
    """
    path = Path(path)
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.5), squeeze=False)
    for ax, metric in zip(axes.flat, metrics):
        for name, history in curves_by_name.items():
            points = [(h["epoch"], h[metric]) for h in history if metric in h]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, label=name)
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes.flat[-1].legend(fontsize=7)
    fig.suptitle(title)
    return _save(fig, path)


def plot_accuracy_vs_ece(
    points: Sequence[Mapping[str, float | str]], path: str | Path, title: str = "Test accuracy vs ECE"
) -> Path:
    """Scatter of test accuracy against ECE, one marker per run, coloured by ``name``.

    ``points`` is a list of dicts with ``name``, ``accuracy`` and ``ece``. Up and to
    the left is better (accurate and calibrated).
    """
    path = Path(path)
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    names = list(dict.fromkeys(str(p["name"]) for p in points))
    cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    for i, name in enumerate(names):
        mine = [p for p in points if p["name"] == name]
        ax.scatter([p["ece"] for p in mine], [p["accuracy"] for p in mine], color=cmap(i % cmap.N), label=name, s=28)
    ax.set_xlabel("ECE (15 bins)")
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    ax.set_title(title)
    return _save(fig, path)
