"""attn_probe.explore's view, driven from Python as a person would (pickers set, buttons
pressed): what each view shows against the float64 reference attention of the demo GPT, against
capture() and against rank_profile on the same inputs; and that only another sequence runs the
model again."""

from __future__ import annotations

import html.parser
import sys
import threading
import types

import numpy as np
import pytest
import torch

import attn_probe
from attn_probe.notebook import in_notebook
from extras_rule import extra
from reference import gpt_attention, reference_columns, reference_rank
from toy_models import small_gpt

extra("ipywidgets")

TOKENS = torch.randint(1, 64, (6, 20), generator=torch.Generator().manual_seed(3))
LAYERS = ["transformer.h.0.attn", "transformer.h.1.attn", "transformer.h.2.attn"]


class Rows(html.parser.HTMLParser):
    """The header and the body cells of an HTML table, as text."""

    def __init__(self, text: str):
        super().__init__()
        self.rows: list[list[str]] = []
        self._cell: list[str] | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append("".join(self._cell))
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def table(text: str) -> dict[str, list[str]]:
    """Column header -> the column's cells."""
    header, *body = Rows(text).rows
    return {title: [row[i] for row in body] for i, title in enumerate(header)}


def shown_image(view, name: str) -> np.ndarray:
    (image,) = view.shown[name].axes[0].images
    return np.asarray(image.get_array())


@pytest.fixture(scope="module")
def model(single_thread):
    return small_gpt(n_layer=3).eval()


@pytest.fixture
def calls(model):
    """Forward passes of the model from now on."""
    count = []
    handle = model.register_forward_pre_hook(lambda *_: count.append(1))
    yield count
    handle.remove()


@pytest.fixture
def view(model):
    return attn_probe.explore(model, TOKENS, widget=True, batch_size=2)


def reference(model, sequence: int = 0) -> list[torch.Tensor]:
    return [a[0] for a in gpt_attention(model, TOKENS[sequence : sequence + 1])]


def test_the_pickers_name_layers_as_the_package_does(view):
    assert view.layer.options == tuple((f"L{i:02d} {name}", name) for i, name in
                                       enumerate(LAYERS))
    assert [label for label, _ in view.head.options] == ["H00", "H01", "H02", "H03"]


def test_heatmap_and_per_head_figures_follow_the_pickers(model, view, calls):
    ref = reference(model)
    options = attn_probe.CaptureOptions(batch_rows=1, crop=None)
    with attn_probe.capture(model, options) as cap, torch.no_grad():
        model(TOKENS[:1])
    figures = cap.metrics(0.9)
    calls.clear()  # the reference and capture() passes
    for layer in (2, 1):
        for head in (3, 0):
            view.layer.value = LAYERS[layer]
            view.head.value = head
            shown = shown_image(view, "heatmap")
            np.testing.assert_allclose(shown, ref[layer][head].numpy(), atol=1e-6)
            np.testing.assert_allclose(shown, cap.attention[LAYERS[layer]][0, head].numpy())
        want = figures[LAYERS[layer]]
        got = table(view.table.value)
        assert got["head"] == ["H00", "H01", "H02", "H03"]
        assert [float(v) for v in got["rank@90%"]] == \
            [reference_rank(a) for a in ref[layer]] == want["rank"][0].tolist()
        assert [float(v) for v in got["columns@90%"]] == \
            [reference_columns(a) for a in ref[layer]] == want["columns"][0].tolist()
        for column, figure in (("entropy (nats)", "entropy_full"), ("sink (key 0)", "sink_full"),
                               ("max logit", "max_logit"),
                               ("entropy / log(keys)", "entropy_norm_full")):
            assert got[column] == [f"{v:.3g}" for v in want[figure][0].tolist()], column
        bars = [patch.get_height() for patch in view.shown["heads"].axes[0].patches]
        assert bars == [reference_rank(a) for a in ref[layer]] + \
            [reference_columns(a) for a in ref[layer]]
    assert calls == []  # layers and heads came from the first forward pass


def test_tau_and_crop_reuse_the_forward_pass(model, view, calls):
    ref = reference(model)
    calls.clear()
    view.layer.value = LAYERS[1]
    view.tau.value = 0.5
    got = table(view.table.value)
    assert [float(v) for v in got["rank@50%"]] == [reference_rank(a, 0.5) for a in ref[1]]
    view.crop.value = 7
    view.head.value = 2
    assert shown_image(view, "heatmap").shape == (7, 7)
    np.testing.assert_allclose(shown_image(view, "heatmap"), ref[1][2, :7, :7].numpy(),
                               atol=1e-6)
    got = table(view.table.value)
    assert [float(v) for v in got["rank@50%"]] == \
        [reference_rank(a[:7, :7], 0.5) for a in ref[1]]
    assert [float(v) for v in got["columns@50%"]] == \
        [reference_columns(a[:7, :7], 0.5) for a in ref[1]]
    assert calls == [] and view.explorer.runs == 1
    view.sequence.value = 4  # another sequence: the one change that runs the model
    assert len(calls) == 1 and view.explorer.runs == 2
    np.testing.assert_allclose(shown_image(view, "heatmap"),
                               reference(model, 4)[1][2, :7, :7].numpy(), atol=1e-6)
    assert table(view.table.value)["rank@50%"] == \
        [f"{reference_rank(a[:7, :7], 0.5)}" for a in reference(model, 4)[1]]


def profile_line(view) -> np.ndarray:
    line = view.shown["profile"].axes[0].lines[0]
    return np.asarray(line.get_ydata(), dtype=np.float64)


def test_run_measures_max_rank_over_every_sequence(model, view):
    view.tau.value = 0.8
    view.crop.value = 12
    view.run.click()
    view.wait(60)
    want = attn_probe.rank_profile(
        model, TOKENS.split(2), sequences=6,
        capture=attn_probe.CaptureOptions(batch_rows=None, crop=12, tau=0.8),
    )
    np.testing.assert_array_equal(profile_line(view), want.max_rank_profile())
    assert view.progress.value == 6
    assert view.status.value == "MaxRank@80% over 6 of 6 sequences"
    got = table(view.profile_table.value)
    assert got["layer"] == ["L00", "L01", "L02"] and got["module"] == LAYERS
    assert got["MaxRank@80%"] == [f"{v:.3g}" for v in want.max_rank_profile()]
    view.tau.value = 0.9  # the profile shown is no longer that of the controls
    assert "press Run" in view.status.value


def test_cancel_keeps_what_was_measured(model, view):
    view.progress.observe(lambda change: change.new >= 4 and view.cancel.click(), "value")
    view.run.click()
    view.wait(60)
    assert view.status.value == "cancelled: MaxRank@90% over 4 of 6 sequences"
    assert not view.run.disabled and view.cancel.disabled
    want = attn_probe.rank_profile(model, TOKENS[:4].split(2), sequences=4)
    np.testing.assert_array_equal(profile_line(view), want.max_rank_profile())


def test_views_stay_live_while_max_rank_runs(model, view):
    """A layer switched (from another thread, as the browser's does) while the MaxRank run is
    between two batches is drawn at once, not after the run."""
    switched = []

    def on_progress(change):
        if change.new == 2 and not switched:
            person = threading.Thread(target=setattr, args=(view.layer, "value", LAYERS[2]))
            person.start()
            person.join(30)
            switched.append(not person.is_alive())

    view.progress.observe(on_progress, "value")
    view.run.click()
    view.wait(90)
    assert switched == [True]
    assert view.status.value == "MaxRank@90% over 6 of 6 sequences"
    np.testing.assert_allclose(shown_image(view, "heatmap"), reference(model)[2][0].numpy(),
                               atol=1e-6)


def test_another_sequence_shows_its_own_per_head_figures(model, view):
    """The table and the per-head bars follow the sequence picked: every figure of the layer
    is that sequence's, never the one shown before (the test checks the two differ)."""
    view.layer.value = LAYERS[1]
    view.crop.value = 9
    before = table(view.table.value)
    view.sequence.value = 4
    options = attn_probe.CaptureOptions(batch_rows=1, crop=None)
    with attn_probe.capture(model, options) as cap, torch.no_grad():
        model(TOKENS[4:5])
    want = cap.metrics(0.9, crop=9)[LAYERS[1]]
    got = table(view.table.value)
    for column, figure in (("max logit", "max_logit"), ("entropy (nats)", "entropy_full")):
        assert got[column] == [f"{v:.3g}" for v in want[figure][0].tolist()], column
    assert got["max logit"] != before["max logit"], "the two sequences should differ"
    ref = reference(model, 4)[1]
    assert [float(v) for v in got["rank@90%"]] == [reference_rank(a[:9, :9]) for a in ref]
    bars = [patch.get_height() for patch in view.shown["heads"].axes[0].patches]
    assert bars == [reference_rank(a[:9, :9]) for a in ref] + \
        [reference_columns(a[:9, :9]) for a in ref]
    assert "sequence 4" in view.shown["heads"].axes[0].get_title()


def test_a_profile_of_another_crop_is_flagged_and_the_slider_comes_back(model, view):
    """While MaxRank runs the crop and sequence sliders are held; afterwards they move
    again, and a crop other than the profile's says that the profile shown is not of it
    (and that Run measures it), until the crop is back."""
    held = []
    view.progress.observe(lambda _: held.append((view.crop.disabled,
                                                 view.sequence.disabled)), "value")
    view.run.click()
    view.wait(60)
    assert held and set(held) == {(True, True)}
    assert not view.crop.disabled and not view.sequence.disabled and not view.run.disabled
    measured = "MaxRank@90% over 6 of 6 sequences"
    assert view.status.value == measured and view.explorer.profile_is_current
    assert "first 20 tokens" in view.shown["profile"].axes[0].get_title()

    view.crop.value = 12
    assert not view.explorer.profile_is_current
    assert view.status.value == ("the profile shown is at tau 0.9, first 20 tokens: press Run "
                                 "to measure it at tau 0.9, first 12 tokens")
    view.crop.value = 20
    assert view.explorer.profile_is_current and view.status.value == measured

    view.crop.value = 12
    view.run.click()
    view.wait(60)
    want = attn_probe.rank_profile(
        model, TOKENS.split(2), sequences=6,
        capture=attn_probe.CaptureOptions(batch_rows=None, crop=12))
    np.testing.assert_array_equal(profile_line(view), want.max_rank_profile())
    assert view.status.value == measured and not view.crop.disabled
    view.tau.value = 0.7
    assert view.status.value == ("the profile shown is at tau 0.9, first 12 tokens: press Run "
                                 "to measure it at tau 0.7, first 12 tokens")


def test_cancel_before_the_first_batch_measures_nothing(view):
    cancel = threading.Event()
    cancel.set()
    assert view.explorer.run_profile(cancel) is None
    assert view.explorer.profile is None


def test_token_strings_label_the_axes(model):
    words = [[f"w{i}.{j}" for j in range(20)] for i in range(6)]
    view = attn_probe.explore(model, TOKENS, token_strings=words, widget=True,
                              capture=attn_probe.CaptureOptions(crop=9))
    axes = view.shown["heatmap"].axes[0]
    assert [t.get_text() for t in axes.get_xticklabels()] == words[0][:9]
    assert [t.get_text() for t in axes.get_yticklabels()] == words[0][:9]
    view.sequence.value = 2
    axes = view.shown["heatmap"].axes[0]
    assert [t.get_text() for t in axes.get_xticklabels()] == words[2][:9]


def test_outside_a_notebook_explore_returns_the_figures(model):
    assert not in_notebook()
    figures = attn_probe.explore(model, TOKENS, layer="L02", head=1, batch_size=4)
    assert sorted(figures) == ["head_profiles", "heatmap", "max_rank_profile"]
    (image,) = figures["heatmap"].axes[0].images
    np.testing.assert_allclose(image.get_array(), reference(model)[2][1].numpy(), atol=1e-6)
    want = attn_probe.rank_profile(model, TOKENS.split(4), sequences=6)
    line = figures["max_rank_profile"].axes[0].lines[0]
    np.testing.assert_array_equal(line.get_ydata(), want.max_rank_profile())


def test_a_notebook_is_an_ipython_shell_with_a_kernel(monkeypatch):
    shell = types.SimpleNamespace()
    ipython = types.SimpleNamespace(get_ipython=lambda: shell)
    monkeypatch.setitem(sys.modules, "IPython", ipython)
    assert not in_notebook()  # a terminal IPython: no kernel
    shell.kernel = object()
    assert in_notebook()
    ipython.get_ipython = lambda: None  # IPython imported, but no shell running
    assert not in_notebook()
    monkeypatch.delitem(sys.modules, "IPython")
    assert not in_notebook()


def test_bad_choices_are_one_line(model, view):
    with pytest.raises(ValueError, match="leave batch_rows out of capture"):
        attn_probe.explore(model, TOKENS, capture=attn_probe.CaptureOptions(batch_rows=4))
    with pytest.raises(TypeError, match="capture takes attn_probe.CaptureOptions"):
        attn_probe.explore(model, TOKENS, capture=0.9)
    with pytest.raises(KeyError, match="no layer 'L07'; the layers are: L00"):
        attn_probe.explore(model, TOKENS, layer="L07", widget=True)
    with pytest.raises(ValueError, match="head 4 out of range: L00 transformer.h.0.attn has 4"):
        attn_probe.explore(model, TOKENS, head=4, widget=True)
    with pytest.raises(ValueError, match="crop must be at most the 20 tokens"):
        view.explorer.set_crop(21)


def test_the_capture_options_choose_what_is_measured(model):
    """``capture`` picks the modules, where tau and the crop start (a crop beyond the
    sequence, or None, is all of it), for the views and the MaxRank run alike."""
    options = attn_probe.CaptureOptions(modules="transformer.h.[02].attn", tau=0.7, crop=None)
    view = attn_probe.explore(model, TOKENS, capture=options, widget=True, batch_size=3)
    assert [name for _, name in view.layer.options] == [LAYERS[0], LAYERS[2]]
    assert (view.tau.value, view.crop.value) == (0.7, 20)
    assert [float(v) for v in table(view.table.value)["rank@70%"]] == \
        [reference_rank(a, 0.7) for a in reference(model)[0]]
    view.run.click()
    view.wait(60)
    want = attn_probe.rank_profile(model, TOKENS.split(3), sequences=6, capture=options)
    assert [layer.name for layer in want.layers] == [LAYERS[0], LAYERS[2]]
    np.testing.assert_array_equal(profile_line(view), want.max_rank_profile())
    long = attn_probe.explore(model, TOKENS, capture=attn_probe.CaptureOptions(crop=500),
                              widget=True)
    assert long.explorer.crop == 20
