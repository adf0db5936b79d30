"""Figures: structure of each plot, rendering to arrays, snapshot conveniences."""

from __future__ import annotations

import math

import matplotlib._pylab_helpers as pylab_helpers
import numpy as np
import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from attn_probe.outputs import plots
from attn_probe.aggregate import HeadAccumulator
from attn_probe.snapshot import Alert, Snapshot


def image_axes(fig: Figure):
    return [ax for ax in fig.axes if ax.images and ax.get_title()]


def make_snapshot(layers: int = 3, heads: int = 4, tokens: int = 6) -> Snapshot:
    """Layer i has per-head rank i + 1 + head / 10 (every sequence alike); last layer no data."""
    accumulator = HeadAccumulator()
    names = [f"blocks.{i}.attn" for i in range(layers)]
    for i, name in enumerate(names):
        rank = torch.tensor([[i + 1 + h / 10 for h in range(heads)]] * 2, dtype=torch.float64)
        if i == layers - 1:
            rank[:] = -1  # non-finite attention in every sequence
        accumulator.update(name, {
            "rank": rank, "columns": rank + 1, "entropy": torch.ones_like(rank),
            "sink": torch.full_like(rank, 0.5), "dominant": torch.zeros_like(rank),
        })
    attention = torch.softmax(torch.randn(heads, tokens, tokens), -1)
    return Snapshot(step=5, tau=0.9, layers=accumulator.compute(names),
                    samples={names[0]: attention})


def test_plots_are_not_registered_with_pyplot():
    before = pylab_helpers.Gcf.get_num_fig_managers()
    fig = plots.collapse_map(np.ones((2, 2)))
    assert isinstance(fig, Figure) and isinstance(fig.canvas, FigureCanvasAgg)
    plots.plot_to_array(fig)
    assert pylab_helpers.Gcf.get_num_fig_managers() == before


def test_plot_to_array_shape_and_dtype():
    fig = plots.max_rank_profile(np.array([4.0, 2.0, 1.0]))
    array = plots.plot_to_array(fig)
    width, height = fig.get_size_inches() * fig.dpi
    assert array.dtype == np.uint8 and array.ndim == 3 and array.shape[2] == 3
    assert array.shape[:2] == (round(height), round(width))
    assert array.flags["C_CONTIGUOUS"]
    # a bare Figure (no canvas attached by us) renders as well
    bare = Figure(figsize=(2, 1), dpi=50)
    bare.add_subplot().plot([0, 1])
    assert plots.plot_to_array(bare).shape == (50, 100, 3)


def test_collapse_map_small_grid_is_annotated():
    values = np.array([[1.0, 2.5, np.nan], [4.0, 1.0, 12.0]])
    fig = plots.collapse_map(values, layer_labels=["L00", "L01"], title="t", vmax=20)
    assert len(fig.axes) == 2  # map and colour bar
    ax = fig.axes[0]
    assert ax.get_title() == "t"
    assert [label.get_text() for label in ax.get_yticklabels()] == ["L00", "L01"]
    assert [label.get_text() for label in ax.get_xticklabels()] == ["H00", "H01", "H02"]
    texts = sorted(text.get_text() for text in ax.texts)
    assert texts == sorted(["1.0", "2.5", "4.0", "1.0", "12.0"])  # no text in the NaN cell
    image = ax.images[0]
    assert image.norm.vmax == 20 and image.norm.vmin == 1.0
    assert image.get_array().mask[0, 2]
    assert plots.plot_to_array(fig).dtype == np.uint8


def test_collapse_map_large_grid_not_annotated_and_capped():
    fig = plots.collapse_map(np.random.default_rng(0).uniform(1, 50, (40, 64)))
    assert len(fig.axes) == 2 and not fig.axes[0].texts
    width, height = fig.get_size_inches()
    assert width <= 12 + 1e-9 and height <= 12 + 1e-9
    assert len(fig.axes[0].get_xticks()) <= 32


def test_collapse_map_rejects_bad_labels():
    with pytest.raises(ValueError):
        plots.collapse_map(np.ones((2, 3)), layer_labels=["a"])


def test_collapse_map_for_snapshot():
    snapshot = make_snapshot()
    fig = plots.collapse_map_for(snapshot)
    ax = fig.axes[0]
    assert len(fig.axes) == 2
    assert [t.get_text() for t in ax.get_yticklabels()] == ["L00", "L01", "L02"]
    values = ax.images[0].get_array()
    np.testing.assert_allclose(values[0], [1.0, 1.1, 1.2, 1.3])
    np.testing.assert_allclose(values[1], [2.0, 2.1, 2.2, 2.3])
    assert values.mask[2].all()  # the layer without data is grey
    assert "rank@90%" in ax.get_title() and "5" in ax.get_title()
    columns = plots.collapse_map_for(snapshot, "columns")
    np.testing.assert_allclose(columns.axes[0].images[0].get_array()[0], [2.0, 2.1, 2.2, 2.3])


def test_max_rank_profile():
    fig = plots.max_rank_profile(np.array([6.0, np.nan, 1.0]), layer_labels=["a", "b", "c"],
                                 tau=0.95, title="profile")
    assert len(fig.axes) == 1
    ax = fig.axes[0]
    line = ax.lines[0]
    np.testing.assert_array_equal(line.get_xdata(), [0, 1, 2])
    np.testing.assert_array_equal(line.get_ydata(), [6.0, np.nan, 1.0])
    assert line.get_marker() == "o"
    assert ax.get_ylim()[0] == 0 and ax.get_ylim()[1] >= 6
    assert all(float(t).is_integer() for t in ax.get_yticks())
    assert "95" in ax.get_ylabel() and ax.get_title() == "profile"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b", "c"]
    empty = plots.max_rank_profile(np.full(2, np.nan))
    assert any(t.get_text() == "no data" for t in empty.axes[0].texts)


def test_max_rank_profile_for_snapshot():
    snapshot = make_snapshot()
    fig = plots.max_rank_profile_for(snapshot)
    ydata = fig.axes[0].lines[0].get_ydata()
    np.testing.assert_allclose(ydata[:2], [1.3, 2.3])
    assert math.isnan(ydata[2])


def test_head_profiles():
    rank = np.array([1.0, 3.0, np.nan])
    fig = plots.head_profiles(rank, rank + 1, title="L00", lazy=[True, False, False])
    assert len(fig.axes) == 1
    ax = fig.axes[0]
    assert len(ax.patches) == 6  # a rank bar and a columns bar per head
    assert [t.get_text() for t in ax.get_xticklabels()] == ["H00", "H01", "H02"]
    assert ax.get_xticklabels()[0].get_color() != ax.get_xticklabels()[1].get_color()
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["rank@90%", "columns@90%"]
    with pytest.raises(ValueError):
        plots.head_profiles(np.ones(2), np.ones(3))


def test_head_profiles_for_snapshot():
    snapshot = make_snapshot()
    for key in ("blocks.1.attn", "L01", 1):
        fig = plots.head_profiles_for(snapshot, key)
        heights = [bar.get_height() for bar in fig.axes[0].patches]
        np.testing.assert_allclose(heights[:4], [2.0, 2.1, 2.2, 2.3])
    with pytest.raises(KeyError):
        plots.head_profiles_for(snapshot, "nope")


def test_attention_heatmaps_grid():
    attention = torch.softmax(torch.randn(6, 5, 5), -1)
    fig = plots.attention_heatmaps(attention, title="L00", max_cols=4)
    panels = image_axes(fig)
    assert [ax.get_title() for ax in panels] == [f"H{h:02d}" for h in range(6)]
    assert len(fig.axes) == 12  # a colour bar per head (own colour scale)
    np.testing.assert_allclose(panels[2].images[0].get_array(), attention[2].numpy(), rtol=1e-6)
    assert panels[2].images[0].norm.vmax == pytest.approx(float(attention[2].max()))
    # two rows of panels: the fifth panel sits below the first
    assert panels[4].get_position().y0 < panels[0].get_position().y0
    assert panels[4].get_position().x0 == pytest.approx(panels[0].get_position().x0)


def test_attention_heatmaps_subset_shared_scale_and_crop():
    attention = np.random.default_rng(0).dirichlet(np.ones(30), size=(4, 30))
    fig = plots.attention_heatmaps(attention, heads=[3, 1], shared_scale=True, crop=10)
    panels = image_axes(fig)
    assert [ax.get_title() for ax in panels] == ["H03", "H01"]
    assert len(fig.axes) == 3  # one shared colour bar
    assert panels[0].images[0].get_array().shape == (10, 10)
    assert panels[0].images[0].norm.vmax == panels[1].images[0].norm.vmax
    with pytest.raises(ValueError):
        plots.attention_heatmaps(attention, heads=[4])
    with pytest.raises(ValueError):
        plots.attention_heatmaps(np.ones((2, 3, 4, 5)))
    with pytest.raises(ValueError, match="0 queries over 4 keys"):
        plots.attention_heatmaps(np.ones((2, 0, 4)))


def test_attention_heatmaps_draw_rectangles_of_queries_by_keys():
    """Cross-attention, an attention pooler, a crop below the key count: (heads, queries, keys)
    with queries != keys is drawn as it is, cells square, the axes named."""
    attention = np.random.default_rng(1).dirichlet(np.ones(17), size=(2, 8))  # 8 queries x 17
    fig = plots.attention_heatmaps(attention, title="pooler")
    panels = image_axes(fig)
    np.testing.assert_allclose(panels[1].images[0].get_array(), attention[1], rtol=1e-6)
    assert panels[0].get_xlabel() == "keys" and panels[0].get_ylabel() == "queries"
    box = panels[0].get_position().transformed(fig.transFigure)  # in pixels
    assert box.width / box.height == pytest.approx(17 / 8, rel=0.05)
    # a crop keeps the first queries and keys of each: 8 x 5
    cropped = image_axes(plots.attention_heatmaps(attention, crop=5))
    assert cropped[0].images[0].get_array().shape == (5, 5)
    tall = image_axes(plots.attention_heatmaps(attention.transpose(0, 2, 1)))  # 17 x 8
    box = tall[0].get_position().transformed(tall[0].figure.transFigure)
    assert box.height / box.width == pytest.approx(17 / 8, rel=0.05)
    one = plots.attention_heatmap(attention[0], title="H00")
    (ax,) = image_axes(one)
    assert ax.images[0].get_array().shape == (8, 17)
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("keys", "queries")


def test_attention_heatmaps_single_head_single_token():
    for attention in (torch.ones(1, 1, 1, requires_grad=True), np.ones((1, 1))):
        fig = plots.attention_heatmaps(attention, title="T=1")
        assert [ax.get_title() for ax in image_axes(fig)] == ["H00"]
        array = plots.plot_to_array(fig)
        assert array.dtype == np.uint8 and array.shape[2] == 3 and array.std() > 0
    zeros = plots.attention_heatmaps(np.zeros((1, 3, 3)))  # a blank head still has a scale
    assert image_axes(zeros)[0].images[0].norm.vmax == 1.0


#: The figure each kind of alert of these tests watches, and its reduction over heads.
WATCHES = {"logit": ("logit_spread", "max"), "entropy": ("entropy_norm_full", "mean"),
           "sink": ("sink_full", "max")}


def mark(kind: str, step: int, tag: str, value: float, severity: str = "warning") -> Alert:
    """An alert of ``kind`` in layer ``tag`` whose figure was ``value`` at ``step``."""
    figure, how = WATCHES[kind]
    return Alert(kind, f"m.{tag}", tag, (0,), step, figure, how, "above", value, 1.0, step,
                 value, f"{tag}: {kind}", severity=severity)


def test_plot_runs_draws_each_run_with_thresholds_and_its_first_warnings():
    steps = np.arange(0, 20, 5)
    runs = {
        "stable": plots.RunSeries(np.linspace(5, 2, 20), steps, [1.0, 8.0, 20.0, 30.0],
                                  [1.0, 0.6, 0.5, 0.45]),
        # L01's logit crosses at step 5 while L00's is the largest: the cross goes on L01's
        # own curve at L01's value (350), not on the largest (400)
        "unstable": plots.RunSeries(
            np.linspace(5, 3, 12), steps[:3], [1.0, 400.0, 900.0], [1.0, 0.05, 0.02],
            [mark("logit", 5, "L01", 350.0), mark("entropy", 5, "L01", 0.05),
             mark("entropy", 10, "L00", 0.02)],
            {"L01": ([1.0, 350.0, 600.0], [1.0, 0.05, 0.04]),
             "L00": ([1.0, 400.0, 900.0], [1.0, 0.3, 0.02])}),
    }
    fig = plots.plot_runs(runs, thresholds={"logit": 300.0, "entropy": 0.1}, title="demo")
    loss, logit, entropy = fig.axes
    assert logit.get_yscale() == "log" and entropy.get_ylim() == (0, 1.05)
    low, high = logit.get_ylim()
    assert low < 1.0 and high > 900.0
    dashed = lambda ax: [l.get_ydata()[0] for l in ax.get_lines()  # noqa: E731
                         if l.get_color() == "#b2182b" and l.get_linestyle() == "--"]
    assert dashed(logit) == [300.0] and dashed(entropy) == [0.1] and dashed(loss) == []
    marks = lambda ax: [(float(line.get_xdata()[0]), float(line.get_ydata()[0]))  # noqa: E731
                        for line in ax.get_lines() if line.get_marker() == "X"]
    # the first warnings only (step 5), each on its own layer's curve at its own value
    assert marks(logit) == [(5.0, 350.0)]
    assert marks(entropy) == [(5.0, 0.05)]
    assert [x for x, _ in marks(loss)] == [5.0]  # on the loss curve at that step
    curves = lambda ax: [list(line.get_ydata()) for line in ax.get_lines()]  # noqa: E731
    assert [1.0, 350.0, 600.0] in curves(logit) and [1.0, 0.05, 0.04] in curves(entropy)
    assert [1.0, 0.3, 0.02] not in curves(entropy)  # L00 warned later: not drawn
    texts = lambda ax: [t.get_text() for t in ax.texts]  # noqa: E731
    assert "L01" in texts(logit) and "L01" in texts(entropy)
    legend = [text.get_text() for text in fig.legends[0].get_texts()]
    assert legend == ["stable: no warning",
                      "unstable: first warning: logit in L01, entropy in L01 at step 5",
                      "first warning", "alert threshold"]
    # two layers warned at one step: both crosses, and one label naming both, highest first
    together = {"unstable": plots.RunSeries(
        np.linspace(5, 3, 12), steps[:3], [1.0, 400.0, 900.0], [1.0, 0.05, 0.02],
        [mark("logit", 5, "L00", 400.0), mark("logit", 5, "L01", 350.0)],
        {"L01": ([1.0, 350.0, 600.0], [1.0, 0.05, 0.04]),
         "L00": ([1.0, 400.0, 900.0], [1.0, 0.3, 0.02])})}
    both = plots.plot_runs(together).axes[1]
    assert sorted(marks(both)) == [(5.0, 350.0), (5.0, 400.0)]
    assert [(t.get_text(), t.xy) for t in both.texts] == [("L00, L01", (5, 400.0))]
    plain = plots.plot_runs(runs)  # no thresholds: no dashed line, no legend entry for it
    assert [t.get_text() for t in plain.legends[0].get_texts()][-1] == "first warning"
    assert plots.plot_to_array(fig).shape[1] > 2 * plots.plot_to_array(fig).shape[0]
    # the loss: faint as it is, solid as a centred moving average (shorter at the ends)
    faint, solid = [l.get_ydata() for l in loss.get_lines() if l.get_marker() != "X"][:2]
    assert list(faint) == list(runs["stable"].loss)
    assert solid[10] == pytest.approx(np.mean(runs["stable"].loss[6:15]))
    assert solid[0] == pytest.approx(np.mean(runs["stable"].loss[:5]))
    unsmoothed = plots.plot_runs(runs, smooth=1).axes[0]
    assert len([l for l in unsmoothed.get_lines() if l.get_marker() != "X"]) == 2
    with pytest.raises(ValueError, match="sampled steps"):
        plots.plot_runs({"bad": plots.RunSeries([1.0], [0, 5], [1.0], [1.0])})
    with pytest.raises(ValueError, match="at least one run"):
        plots.plot_runs({})


def test_run_series_for_takes_the_extremes_over_layers():
    def snapshot(step: int, logits, entropies) -> Snapshot:
        accumulator = HeadAccumulator()
        for name, logit, entropy in zip(("a", "b"), logits, entropies):
            ones = torch.ones(1, 2, dtype=torch.float64)
            accumulator.update(name, {
                "rank": ones, "columns": ones, "entropy": ones, "sink": ones,
                "dominant": ones.long(), "columns_full": ones, "dominant_full": ones.long(),
                "logit_spread": torch.tensor([logit], dtype=torch.float64),
                "entropy_norm_full": torch.tensor([entropy], dtype=torch.float64),
            })
        return Snapshot(step=step, tau=0.9, layers=accumulator.compute(["a", "b"]))

    history = [snapshot(0, [[1.0, 2.0], [0.5, 1.5]], [[1.0, 0.9], [0.95, 0.99]]),
               snapshot(5, [[400.0, 2.0], [9.0, 8.0]], [[0.01, 0.03], [0.5, 0.7]])]
    alert = mark("logit", 5, "L01", 9.0)
    sink = mark("sink", 5, "L00", 0.9, severity="info")
    series = plots.run_series_for([3.0, 2.5], history, [alert, sink])
    assert list(series.steps) == [0, 5] and list(series.loss) == [3.0, 2.5]
    assert list(series.logit_spread) == [2.0, 400.0]  # the largest head of any layer
    assert list(series.entropy) == pytest.approx([0.95, 0.02])  # the lowest layer mean
    assert series.alerts == (alert, sink)
    # the warned layer's own curves: its largest head, its mean entropy (not the info one's)
    (own_logit, own_entropy), = series.layers.values()
    assert list(series.layers) == ["L01"] and list(own_logit) == [1.5, 9.0]
    assert list(own_entropy) == pytest.approx([0.97, 0.6])
    assert np.isnan(plots.run_series_for([1.0], [make_snapshot()]).logit_spread[0])


def test_attention_heatmap_of_one_head_names_the_tokens():
    attention = torch.softmax(torch.randn(5, 7), -1)
    words = ["<s>", "Once", "upon", "a", "time", ",", "there"]
    fig = plots.attention_heatmap(attention, token_labels=words, title="L01 H02")
    ax = fig.axes[0]
    (image,) = ax.images
    np.testing.assert_array_equal(image.get_array(), attention.numpy())
    assert [t.get_text() for t in ax.get_xticklabels()] == words
    assert [t.get_text() for t in ax.get_yticklabels()] == words[:5]
    assert ax.get_title() == "L01 H02" and ax.get_xlabel() == "keys"
    many = plots.attention_heatmap(torch.eye(200), token_labels=[f"t{i}" for i in range(200)])
    assert len(many.axes[0].get_xticklabels()) <= 64  # thinned, evenly
    with pytest.raises(ValueError, match="got 3 token labels for 7 keys"):
        plots.attention_heatmap(attention, token_labels=words[:3])
    with pytest.raises(ValueError, match="one head"):
        plots.attention_heatmap(torch.ones(2, 3, 3))
