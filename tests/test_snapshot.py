"""The data model (attn_probe.snapshot) and the lazy rule that marks its layers: one layer's
figures, the layer lookup,
percent, default heatmaps. Layers are built by hand, so nothing here depends on aggregation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from attn_probe.alerts import LazyRule
from attn_probe.snapshot import (
    DEFAULT_HEATMAP_HEADS,
    LayerSummary,
    Snapshot,
    default_heatmaps,
    find_layer,
    percent,
)

NAN = float("nan")


def layer(name: str, index: int, rank, columns, counts, nonfinite=None,
          rule: LazyRule = LazyRule()) -> LayerSummary:
    """A LayerSummary with the given per-head figures (entropy and sink arbitrary), judged by
    the lazy ``rule``."""
    rank, columns = np.array(rank, dtype=float), np.array(columns, dtype=float)
    heads = {"rank": rank, "columns": columns, "entropy": np.ones_like(rank),
             "sink": np.full_like(rank, 0.5), "first_key_dominant": np.zeros_like(rank)}
    counts = np.array(counts, dtype=np.int64)
    nonfinite = np.zeros_like(counts) if nonfinite is None else np.array(nonfinite)
    return rule.judge(LayerSummary(name=name, index=index, heads=heads, counts=counts,
                                   nonfinite=nonfinite))


def figures(rank, columns) -> LayerSummary:
    rank, columns = np.array(rank, dtype=float), np.array(columns, dtype=float)
    counts = np.ones(rank.shape, dtype=np.int64)
    return LayerSummary(name="x", index=0, heads={"rank": rank, "columns": columns},
                        counts=counts, nonfinite=0 * counts)


# --- LazyRule ----------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, needle", [
    (dict(max_rank=0.99), "max_rank=0.99"),
    (dict(max_columns=0.5), "max_columns=0.5"),
    (dict(min_lazy_share=0.0), "min_lazy_share"),
    (dict(min_lazy_share=1.01), "min_lazy_share"),
    (dict(min_lazy_share=-0.5), "min_lazy_share"),
])
def test_lazy_rule_rejects_impossible_thresholds(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        LazyRule(**kwargs)


def test_lazy_rule_accepts_its_bounds():
    rule = LazyRule(max_rank=1, max_columns=1, min_lazy_share=1.0)
    assert (rule.max_rank, rule.max_columns, rule.min_lazy_share) == (1, 1, 1.0)
    assert LazyRule(min_lazy_share=1e-9).min_lazy_share == 1e-9


def test_lazy_heads_need_both_rank_and_columns_within_the_rule():
    rule = LazyRule()  # rank <= 1.5 and columns <= 1.5
    rank = [1.0, 1.5, 1.5, 1.51, 1.0, NAN, 1.0]
    columns = [1.0, 1.5, 1.51, 1.0, 4.0, 1.0, NAN]
    assert rule.lazy_heads(figures(rank, columns)).tolist() == [
        True, True, False, False, False, False, False]
    loose = LazyRule(max_rank=2.0, max_columns=4.0)
    assert loose.lazy_heads(figures(rank, columns)).tolist() == [
        True, True, True, True, True, False, False]


def test_a_layer_no_lazy_rule_judged_has_no_lazy_heads():
    unjudged = figures([1.0, 1.0], [1.0, 1.0])
    assert unjudged.lazy is None and math.isnan(unjudged.lazy_share) and not unjudged.is_lazy
    assert LazyRule().judge(unjudged).is_lazy


# --- LayerSummary ------------------------------------------------------------------------------


def test_layer_summary_reduces_over_heads_with_data_only():
    # head 2 has no finite sequence: its NaN figures are left out
    summary = layer("blocks.3.attn", 3, rank=[1.0, 4.0, NAN, 2.5], columns=[1.0, 6.0, NAN, 3.0],
                    counts=[5, 5, 0, 5], nonfinite=[0, 0, 5, 0])
    assert summary.reduce("rank", "max") == 4.0
    assert summary.reduce("rank", "min") == 1.0
    assert summary.reduce("rank", "mean") == pytest.approx((1.0 + 4.0 + 2.5) / 3)
    assert summary.reduce("columns", "mean") == pytest.approx((1.0 + 6.0 + 3.0) / 3)
    assert summary.num_heads == 4 and summary.sequences == 5
    assert summary.has_data.tolist() == [True, True, False, True]
    assert summary.tag == "L03"
    # one lazy head among the three with data
    assert summary.lazy.tolist() == [True, False, False, False]
    assert summary.lazy_share == pytest.approx(1 / 3)
    assert not summary.is_lazy


def test_layer_without_data_has_nan_figures_and_is_not_lazy():
    summary = layer("x", 0, rank=[NAN, NAN], columns=[NAN, NAN], counts=[0, 0],
                    nonfinite=[3, 3])
    for how in ("max", "mean", "min"):
        assert math.isnan(summary.reduce("rank", how))
    assert math.isnan(summary.lazy_share)
    assert not summary.is_lazy
    assert summary.sequences == 0


def test_is_lazy_follows_min_lazy_share():
    rank, columns, counts = [1.0, 1.0, 1.0, 3.0], [1.0, 1.0, 1.0, 5.0], [2, 2, 2, 2]
    assert not layer("a", 0, rank, columns, counts).is_lazy  # default: every head
    assert layer("a", 0, rank, columns, counts, rule=LazyRule(min_lazy_share=0.75)).is_lazy
    assert not layer("a", 0, rank, columns, counts,
                     rule=LazyRule(min_lazy_share=0.76)).is_lazy
    assert layer("a", 0, [1.0, 1.2], [1.0, 1.4], [2, 2]).is_lazy


# --- finding a layer ---------------------------------------------------------------------------


@pytest.fixture
def layers():
    # indices are positions among the monitored modules: 7 of them, three kept here
    return (layer("enc.0.attn", 0, [1.0], [1.0], [1]),
            layer("enc.3.attn", 3, [2.0], [2.0], [1]),
            layer("enc.7.attn", 7, [3.0], [3.0], [1]))


@pytest.mark.parametrize("key, name", [
    ("enc.3.attn", "enc.3.attn"),   # module name
    ("L07", "enc.7.attn"),          # tag
    ("l7", "enc.7.attn"),           # tag, lower case, no padding
    ("L3", "enc.3.attn"),
    (3, "enc.3.attn"),              # index among the monitored modules
    (np.int64(7), "enc.7.attn"),
    (0, "enc.0.attn"),
    (-1, "enc.7.attn"),             # negative: position from the end
    (-3, "enc.0.attn"),
])
def test_find_layer(layers, key, name):
    assert find_layer(layers, key).name == name
    assert Snapshot(step=0, tau=0.9, layers=layers).layer(key).name == name


@pytest.mark.parametrize("key", ["enc.5.attn", "L05", "L", "x7", 5, 1, -4, True, 2.0, None])
def test_unknown_layer_is_a_key_error_listing_the_layers(layers, key):
    with pytest.raises(KeyError) as info:
        find_layer(layers, key)
    message = str(info.value)
    assert repr(key) in message
    assert "L00 (enc.0.attn), L03 (enc.3.attn), L07 (enc.7.attn)" in message


def test_find_layer_among_no_layers():
    with pytest.raises(KeyError, match="none"):
        find_layer((), 0)


# --- percent, default heatmaps, Snapshot --------------------------------------------------------


@pytest.mark.parametrize("tau, p", [(0.9, 90), (0.95, 95), (0.8, 80), (1.0, 100), (0.999, 100),
                                    (0.5, 50), (0.123, 12)])
def test_percent(tau, p):
    assert percent(tau) == p


def test_default_heatmaps_first_and_last_layer(layers):
    heads = list(DEFAULT_HEATMAP_HEADS)
    assert heads == [0, 1, 2, 3]
    assert default_heatmaps(layers) == {"enc.0.attn": heads, "enc.7.attn": heads}
    assert default_heatmaps(layers[:1]) == {"enc.0.attn": heads}
    assert default_heatmaps(()) == {}


def test_snapshot_profile_and_flags():
    a = layer("a", 0, rank=[2.0, 5.0], columns=[3.0, 6.0], counts=[4, 4])
    b = layer("b", 1, rank=[NAN, NAN], columns=[NAN, NAN], counts=[0, 0], nonfinite=[4, 4])
    snapshot = Snapshot(step=3, tau=0.9, layers=(a, b), samples={"a": torch.zeros(2, 3, 3)})
    profile = snapshot.max_rank_profile()
    assert profile[0] == 5.0 and math.isnan(profile[1])
    assert snapshot.has_data and snapshot.has_nonfinite
    clean = Snapshot(step=3, tau=0.9, layers=(a,))
    assert clean.has_data and not clean.has_nonfinite
    empty = Snapshot(step=3, tau=0.9, layers=(b,))
    assert not empty.has_data
