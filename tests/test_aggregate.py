"""Sums and counts (attn_probe.aggregate): HeadAccumulator update, merge, reduce and compute
against numpy sums written here, and the process-group facts without a process group."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch

from attn_probe.aggregate import (
    HeadAccumulator,
    all_gather_object,
    is_distributed,
    is_main_process,
)
from attn_probe.alerts import LazyRule
from attn_probe.figures import FIGURES

HEADS = 3


def batch(rng: np.random.Generator, sequences: int, heads: int = HEADS,
          nonfinite: float = 0.0) -> dict[str, np.ndarray]:
    """Per-sequence metrics as the metrics stage hands them over, (B, H) each; a ``nonfinite``
    share of (sequence, head) entries had NaN attention (rank -1, the others NaN)."""
    bad = rng.random((sequences, heads)) < nonfinite
    rank = rng.integers(1, 9, (sequences, heads)).astype(np.float64)
    columns = rng.integers(1, 9, (sequences, heads)).astype(np.float64)
    entropy = rng.uniform(0.0, 2.0, (sequences, heads))
    sink = rng.uniform(0.0, 1.0, (sequences, heads))
    dominant = rng.integers(0, 3, (sequences, heads))
    rank[bad], columns[bad], dominant[bad] = -1, -1, -1
    entropy[bad], sink[bad] = np.nan, np.nan
    # the full-context figures, with their own non-finite entries (columns_full -1)
    full_bad = bad | (rng.random((sequences, heads)) < nonfinite)
    full = {name: rng.uniform(0.0, 2.0, (sequences, heads))
            for name in ("entropy_full", "entropy_norm_full", "sink_full", "sink_logit_full",
                         "max_logit")}
    full["max_logit"] = rng.normal(0.0, 50.0, (sequences, heads))
    full["logit_spread"] = rng.uniform(0.0, 30.0, (sequences, heads))
    full["query_norm"] = rng.uniform(0.5, 3.0, (sequences, heads))
    full["key_norm"] = rng.uniform(0.5, 3.0, (sequences, heads))
    full["kv_head"] = np.broadcast_to(np.arange(heads) // 2, (sequences, heads)).copy()
    full["columns_full"] = rng.integers(1, 30, (sequences, heads)).astype(np.float64)
    full["dominant_full"] = rng.integers(0, 3, (sequences, heads))
    full["tokens_full"] = rng.integers(2, 100, (sequences, heads)).astype(np.float64)
    for value in full.values():
        value[full_bad] = -1 if value.dtype.kind == "i" else np.nan
    full["columns_full"][full_bad] = -1
    return {"rank": rank, "columns": columns, "entropy": entropy, "sink": sink,
            "dominant": dominant, **full}


def tensors(metrics: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in metrics.items()}


def concat(*batches: dict) -> dict[str, np.ndarray]:
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def expected(metrics: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per-head means (or, for max_logit, maxima) over the finite sequences of the matrix's and
    the full sequence's figures, their counts and non-finite counts, from numpy."""
    finite = metrics["rank"] >= 0
    full = metrics["columns_full"] >= 0
    crop_values = {
        "rank": metrics["rank"],
        "columns": metrics["columns"],
        "entropy": metrics["entropy"],
        "sink": metrics["sink"],
        "first_key_dominant": (metrics["dominant"] == 0).astype(np.float64),
    }
    full_values = {name: metrics[name] for name in (
        "columns_full", "entropy_full", "entropy_norm_full", "sink_full", "sink_logit_full",
        "tokens_full", "query_norm", "key_norm")}
    full_values["first_key_dominant_full"] = (metrics["dominant_full"] == 0).astype(np.float64)
    out = {"counts": finite.sum(0), "full_counts": full.sum(0), "nonfinite": (~finite).sum(0)}
    for ok, values in ((finite, crop_values), (full, full_values)):
        count = ok.sum(0)
        for name, v in values.items():
            total = np.where(ok, v, 0.0).sum(0)
            with np.errstate(invalid="ignore", divide="ignore"):
                out[name] = np.where(count > 0, total / count, np.nan)
    for name in ("max_logit", "logit_spread", "kv_head"):
        highest = np.where(full, metrics[name], -np.inf).max(0)
        out[name] = np.where(full.sum(0) > 0, highest, np.nan)
    out["alignment"] = out["logit_spread"] / (out["query_norm"] * out["key_norm"])
    return out


def assert_layer_equals(summary, want: dict[str, np.ndarray]) -> None:
    assert summary.counts.tolist() == want["counts"].tolist()
    assert summary.full_counts.tolist() == want["full_counts"].tolist()
    assert summary.nonfinite.tolist() == want["nonfinite"].tolist()
    assert set(summary.heads) == set(FIGURES)
    for name in FIGURES:
        np.testing.assert_allclose(summary.heads[name], want[name], rtol=1e-12, atol=0,
                                   equal_nan=True, err_msg=name)


def test_update_and_compute_equal_numpy_means():
    rng = np.random.default_rng(0)
    first, second = batch(rng, 4, nonfinite=0.25), batch(rng, 3, nonfinite=0.25)
    other = batch(rng, 5)
    acc = HeadAccumulator()
    acc.update("a", tensors(first))
    acc.update("b", tensors(other))
    acc.update("a", tensors(second))  # a second forward pass of the same step
    a, b = acc.compute(["a", "b"])
    assert_layer_equals(a, expected(concat(first, second)))
    assert_layer_equals(b, expected(other))
    assert (a.name, a.index, b.name, b.index) == ("a", 0, "b", 1)
    assert a.nonfinite.sum() > 0  # the case is not trivial


def test_merging_two_states_equals_updating_with_the_concatenated_batch():
    rng = np.random.default_rng(1)
    x, y = batch(rng, 6, nonfinite=0.2), batch(rng, 4, nonfinite=0.2)
    left, right, together = HeadAccumulator(), HeadAccumulator(), HeadAccumulator()
    left.update("layer", tensors(x))
    right.update("layer", tensors(y))
    right.update("only_right", tensors(batch(rng, 2)))
    together.update("layer", tensors(concat(x, y)))
    left.merge(right.state())
    merged, want = left.state(), together.state()
    assert set(merged) == {"layer", "only_right"}
    assert merged["layer"]["counts"].tolist() == want["layer"]["counts"].tolist()
    assert merged["layer"]["nonfinite"].tolist() == want["layer"]["nonfinite"].tolist()
    np.testing.assert_allclose(merged["layer"]["sums"], want["layer"]["sums"], rtol=1e-14)
    assert_layer_equals(left.compute(["layer"])[0], expected(concat(x, y)))


def test_reduce_combines_every_process_state():
    rng = np.random.default_rng(2)
    mine, theirs = batch(rng, 3), batch(rng, 5, nonfinite=0.3)
    acc, peer = HeadAccumulator(), HeadAccumulator()
    acc.update("layer", tensors(mine))
    peer.update("layer", tensors(theirs))
    gathered = []

    def all_gather(state):  # two processes: this one, then the peer
        gathered.append(pickle.loads(pickle.dumps(state)))  # states travel pickled
        return [state, peer.state()]

    acc.reduce(all_gather)
    assert len(gathered) == 1 and set(gathered[0]) == {"layer"}
    assert_layer_equals(acc.compute(["layer"])[0], expected(concat(mine, theirs)))

    # a process that measured nothing contributes an empty state, and still gets the result
    idle = HeadAccumulator()
    assert not idle
    idle.reduce(lambda state: [state, acc.state()])
    assert_layer_equals(idle.compute(["layer"])[0], expected(concat(mine, theirs)))


def test_reduce_without_process_group_keeps_the_state():
    assert not is_distributed() and is_main_process()
    assert all_gather_object({"x": 1}) == [{"x": 1}]
    rng = np.random.default_rng(3)
    data = batch(rng, 4)
    acc = HeadAccumulator()
    acc.update("layer", tensors(data))
    acc.reduce(all_gather_object)
    assert_layer_equals(acc.compute(["layer"])[0], expected(data))


def test_layer_with_only_nonfinite_sequences():
    rng = np.random.default_rng(4)
    broken = batch(rng, 3, nonfinite=1.0)
    partly = batch(rng, 3)
    partly["rank"][:, 1] = -1  # head 1 never had finite attention
    acc = HeadAccumulator()
    acc.update("broken", tensors(broken))
    acc.update("partly", tensors(partly))
    broken_layer, partly_layer = acc.compute(["broken", "partly"])
    assert broken_layer.counts.tolist() == [0] * HEADS
    assert broken_layer.nonfinite.tolist() == [3] * HEADS
    for name in FIGURES:
        assert np.isnan(broken_layer.heads[name]).all(), name
    judged = LazyRule().judge(broken_layer)
    assert not broken_layer.has_data.any() and not judged.lazy.any() and not judged.is_lazy
    assert math.isnan(broken_layer.reduce("rank", "max"))
    assert partly_layer.has_data.tolist() == [True, False, True]
    assert np.isnan(partly_layer.heads["rank"][1])
    assert_layer_equals(partly_layer, expected(partly))


def test_head_count_mismatch_is_an_error():
    rng = np.random.default_rng(5)
    acc = HeadAccumulator()
    acc.update("layer", tensors(batch(rng, 2, heads=3)))
    with pytest.raises(ValueError, match="cannot merge 4 heads into 3"):
        acc.update("layer", tensors(batch(rng, 2, heads=4)))
    other = HeadAccumulator()
    other.update("layer", tensors(batch(rng, 2, heads=2)))
    with pytest.raises(ValueError, match="same model"):
        acc.merge(other.state())
    with pytest.raises(ValueError, match="sequences, heads"):
        acc.update("layer", {k: v[0] for k, v in tensors(batch(rng, 2)).items()})


def test_compute_order_rule_state_copy_and_reset():
    rng = np.random.default_rng(6)
    lazy = batch(rng, 2)
    lazy["rank"][:], lazy["columns"][:] = 1.0, 1.0
    busy = batch(rng, 2)
    busy["rank"][:], busy["columns"][:] = 3.0, 4.0
    acc = HeadAccumulator()
    acc.update("late", tensors(busy))
    acc.update("early", tensors(lazy))
    # the order given, not the order of updates; a layer without data keeps its place
    early, late = acc.compute(["early", "missing", "late"])
    assert (early.name, early.index, late.name, late.index) == ("early", 0, "late", 2)
    # lazy heads are the lazy rule's to mark, not aggregation's
    assert early.lazy is None and late.lazy is None
    early, late = (LazyRule().judge(layer) for layer in (early, late))
    assert early.is_lazy and early.lazy.all() and not late.lazy.any()
    loose = LazyRule(max_rank=3.0, max_columns=4.0).judge(acc.compute(["late"])[0])
    assert loose.lazy.all() and loose.is_lazy

    state = acc.state()
    state["late"]["counts"][:] = 99  # a copy: the accumulator is unchanged
    assert acc.compute(["late"])[0].counts.tolist() == [2] * HEADS
    acc.reset()
    assert not acc and acc.compute(["early", "late"]) == ()
