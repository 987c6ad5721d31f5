"""The figures of `compare` and `distill-lm`: what each draws, read from the matplotlib figure objects (not pixels)."""

import math

import pytest
import torch
from matplotlib.colors import to_rgba

from divergent.experiments.plots import (
    plot_accuracy_vs_ece,
    plot_panels,
    plot_reliability,
    plot_training_curves,
    pool_reliability_bins,
    row_styles,
)
from divergent.metrics.classification import reliability_bins


def _history(scale: float, epochs: int = 5, shift: float = 0.0):
    return [{"epoch": e, "train_loss": scale / e + shift, "val_accuracy": 0.5 + 0.08 * e, "val_nll": 1.0 / e}
            for e in range(1, epochs + 1)]


def test_palette_has_twenty_distinct_colours_then_varies_line_style():
    styles = row_styles([f"row {i}" for i in range(45)])
    first20 = [to_rgba(styles[f"row {i}"]["color"]) for i in range(20)]
    assert len(set(first20)) == 20
    looks = {(to_rgba(s["color"]), s["linestyle"], s["marker"]) for s in styles.values()}
    assert len(looks) == 45  # no two rows drawn alike
    assert styles["row 20"]["color"] == styles["row 0"]["color"] and styles["row 20"]["linestyle"] != styles["row 0"]["linestyle"]


def test_pooled_bins_equal_the_bins_of_the_pooled_predictions():
    """Pooling per-seed bins gives what binning every seed's predictions together gives."""
    generator = torch.Generator().manual_seed(0)
    logits = [torch.randn(50 + 10 * k, 6, generator=generator) * (1 + k) for k in range(3)]
    labels = [torch.randint(0, 6, (len(x),), generator=generator) for x in logits]
    pooled = pool_reliability_bins([reliability_bins(x, y) for x, y in zip(logits, labels)])
    direct = reliability_bins(torch.cat(logits), torch.cat(labels))
    assert pooled["count"] == direct["count"]
    for key in ("accuracy", "confidence"):
        for a, b in zip(pooled[key], direct[key]):
            assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, abs=1e-6)


def test_pooling_bins_with_other_edges_is_refused():
    a = reliability_bins(torch.randn(10, 3), torch.zeros(10, dtype=torch.long))
    b = reliability_bins(torch.randn(10, 3), torch.zeros(10, dtype=torch.long), n_bins=5)
    with pytest.raises(ValueError, match="bin edges"):
        pool_reliability_bins([a, b])


def test_training_curves_give_each_objective_its_own_axis(tmp_path):
    """A loss near 60 and a KL near 0.1 each get a panel scaled to their own values; one legend, outside."""
    curves = {"big objective": [_history(60.0, shift=60.0), _history(61.0, shift=60.0)],
              "small kl": [_history(0.1), _history(0.12)], "ce": _history(2.0)}
    fig = plot_training_curves(curves, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 0
    axes = fig.get_axes()
    assert len(axes) == 3 + 2  # one panel per row + validation accuracy + validation NLL
    by_title = {ax.get_title(): ax for ax in axes}
    assert by_title["big objective"].get_ylim()[0] > 50
    assert by_title["small kl"].get_ylim()[1] < 1
    assert len(fig.legends) == 1 and all(ax.get_legend() is None for ax in axes)
    assert [t.get_text() for t in fig.legends[0].get_texts()] == list(curves)


def test_reliability_has_a_count_panel_under_every_diagram_and_pools_seeds(tmp_path):
    generator = torch.Generator().manual_seed(1)
    seeds = [reliability_bins(torch.randn(40, 4, generator=generator), torch.randint(0, 4, (40,), generator=generator))
             for _ in range(3)]
    bins = {"teacher": seeds[0], "a": [{**b, "ece": 0.1} for b in seeds], "b": seeds[:2]}
    fig = plot_reliability(bins, tmp_path / "rel.png", references=["teacher"])
    axes = fig.get_axes()
    assert len(axes) == 2 * 3
    titles = [ax.get_title() for ax in axes if ax.get_title()]
    assert any(t.startswith("a\n") and "120 predictions" in t and "over 3 seeds" in t for t in titles)
    assert any(t.startswith("b\n") and "80 predictions" in t for t in titles)
    count_axes = [ax for ax in axes if ax.get_ylabel() == "count"]
    assert len(count_axes) == 3
    # The counts drawn under row "a" are the pooled counts of its three seeds.
    heights = [p.get_height() for p in count_axes[1].patches]
    assert heights == pytest.approx([sum(b["count"][k] for b in seeds) for k in range(len(heights))])


def test_accuracy_vs_ece_draws_means_with_error_bars_both_ways_and_the_better_corner(tmp_path):
    points = [{"name": "x", "accuracy": a, "ece": e} for a, e in [(0.90, 0.05), (0.92, 0.03), (0.91, 0.04)]]
    points += [{"name": "y", "accuracy": 0.95, "ece": 0.02}]
    fig = plot_accuracy_vs_ece(points, tmp_path / "acc.png")
    (ax,) = fig.get_axes()
    bars = ax.containers
    assert len(bars) == 2  # one errorbar per row
    x_bar = bars[0]
    data_line, _caps, bar_collections = x_bar.lines
    xs, ys = data_line.get_data()
    assert xs[0] == pytest.approx(0.04) and ys[0] == pytest.approx(0.91)
    # Sample std of (0.05, 0.03, 0.04) and of (0.90, 0.92, 0.91) is 0.01: both bars span mean ± 0.01.
    assert x_bar.has_xerr and x_bar.has_yerr
    segments = [seg for collection in bar_collections for seg in collection.get_segments()]
    spans = sorted(round(float(abs(seg[1] - seg[0]).max()), 6) for seg in segments)
    assert spans == pytest.approx([0.02, 0.02])
    assert any(t.get_text() == "better" for t in ax.texts)
    assert len(fig.legends) == 1 and ax.get_legend() is None


def test_panels_put_each_quantity_on_its_own_axis(tmp_path):
    series = {"student a": {"eval_loss": [(0, 3.0), (10, 2.0)], "eval_kl_teacher": [(0, 0.5), (10, 0.2)]},
              "student b": {"eval_loss": [(0, 3.1), (10, 2.5)], "eval_kl_teacher": [(0, 0.6), (10, 0.3)]}}
    panels = [("eval_loss", "cross-entropy"), ("eval_kl_teacher", "KL")]
    fig = plot_panels(series, panels, tmp_path / "p.png", references={"eval_loss": ("teacher", 1.5)})
    axes = fig.get_axes()
    assert [ax.get_title() for ax in axes] == ["cross-entropy", "KL"]
    assert all(len(ax.get_lines()) >= 2 for ax in axes)
    assert len(fig.legends) == 1


@pytest.mark.parametrize("function, arg", [(plot_reliability, {}), (plot_training_curves, {}), (plot_accuracy_vs_ece, [])])
def test_empty_input_is_an_error(tmp_path, function, arg):
    with pytest.raises(ValueError, match="empty"):
        function(arg, tmp_path / "x.png")
