"""Offline measurement (attn_probe.protocol): capture() of the matrices of one pass, and
rank_profile, the paper's N x T protocol, against the float64 reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import attn_probe
from attn_probe import capture
from attn_probe.attention import CaptureError
from reference import GPTAttention, gpt_attention, no_hooks_left, reference_counts
from toy_models import assert_close_all, small_gpt, tokens


# --- capture() -------------------------------------------------------------------------------


def test_invalid_arguments(gpt2):
    with pytest.raises(ValueError):
        capture(gpt2[0], attn_probe.CaptureOptions(batch_rows=None, crop=0))
    with pytest.raises(ValueError):
        capture(gpt2[0], attn_probe.CaptureOptions(batch_rows=None, crop=None, strategy="magic"))
    with pytest.raises(TypeError):
        capture("not a module")
    with pytest.raises(CaptureError, match="no adapter"):
        capture(gpt2[0], attn_probe.CaptureOptions(batch_rows=None, crop=None, strategy="adapter"))


def test_first_call_recorded_calls_counted_reset_rearms(gpt2):
    model, eager = gpt2
    x1, x2 = tokens(seed=1), tokens(seed=2)
    with torch.no_grad():
        ref1 = eager(x1, output_attentions=True).attentions
        ref2 = eager(x2, output_attentions=True).attentions
    with torch.no_grad(), capture(model) as cap:
        model(x1)
        model(x2)
        assert cap.calls == {"transformer.h.0.attn": 2, "transformer.h.1.attn": 2}
        assert_close_all(cap.attention, ref1, "gpt2 first call")
        cap.reset()
        assert cap.attention == {}
        model(x2)
        assert cap.calls == {"transformer.h.0.attn": 3, "transformer.h.1.attn": 3}
        assert_close_all(cap.attention, ref2, "gpt2 after reset")
    assert no_hooks_left(model)
    before = {n: a.clone() for n, a in cap.attention.items()}
    with torch.no_grad():
        model(x1)  # after the block: nothing recorded, nothing counted
    assert cap.calls["transformer.h.0.attn"] == 3
    assert all(torch.equal(before[n], a) for n, a in cap.attention.items())


def test_capture_metrics(gpt2):
    model = gpt2[0]
    with torch.no_grad(), capture(model) as cap:
        model(tokens())
    from attn_probe.metrics import head_metrics

    metrics = cap.metrics(tau=0.9)
    assert list(metrics) == cap.modules
    for name, per_head in metrics.items():
        want = head_metrics(cap.attention[name], 0.9)
        assert want.keys() >= {"rank", "columns", "entropy", "sink"}
        # the matrix's figures, and the whole sequence's (tests/test_full_context*.py)
        assert per_head.keys() == want.keys() | {
            "columns_full", "entropy_full", "entropy_norm_full", "sink_full",
            "sink_logit_full", "dominant_full", "tokens_full", "max_logit", "logit_spread",
            "query_norm", "key_norm", "kv_head"}
        for key, value in per_head.items():
            assert value.shape == (3, 4)
            if key in want:
                torch.testing.assert_close(value, want[key], equal_nan=True)


# --- rank_profile ----------------------------------------------------------------------------


def gpt_batches(n: int, b: int = 4, t: int = 24, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 64, (b, t), generator=g) for _ in range(n)]


def test_rank_profile_matches_reference():
    model = small_gpt().eval()
    data = gpt_batches(3, b=4)
    with GPTAttention(model, batch_rows=4, crop=24) as ref:
        snapshot = attn_probe.rank_profile(model, data, sequences=10)
    for layer in range(2):
        a = torch.cat([call[layer] for call in ref.calls])[:10]
        rank, columns, _ = reference_counts(a)
        np.testing.assert_allclose(snapshot.layers[layer].heads["rank"], rank.mean(0).numpy())
        np.testing.assert_allclose(snapshot.layers[layer].heads["columns"],
                                   columns.mean(0).numpy())
        assert snapshot.layers[layer].counts.tolist() == [10] * 4
    np.testing.assert_allclose(
        snapshot.max_rank_profile(), [l.heads["rank"].max() for l in snapshot.layers])


def test_rank_profile_samples_keep_the_first_sequence():
    model = small_gpt().eval()
    first, second = gpt_batches(2, b=3, t=20, seed=5)
    snapshot = attn_probe.rank_profile(
        model, [first, second], samples=True, sequences=6,
        capture=attn_probe.CaptureOptions(batch_rows=None, crop=12),
    )
    names = [layer.name for layer in snapshot.layers]
    assert list(snapshot.samples) == names == ["transformer.h.0.attn", "transformer.h.1.attn"]
    options = attn_probe.CaptureOptions(batch_rows=None, crop=12)
    with torch.no_grad(), capture(model, options) as cap:
        model(first[:1])
    for name in names:
        sample = snapshot.samples[name]
        assert sample.shape == (4, 12, 12) and sample.dtype == torch.float32
        assert sample.device.type == "cpu"
        torch.testing.assert_close(sample, cap.attention[name][0], rtol=0, atol=1e-6)
    # kept from the first batch: the second batch's first sequence differs
    options = attn_probe.CaptureOptions(batch_rows=None, crop=12)
    with torch.no_grad(), capture(model, options) as cap:
        model(second[:1])
    assert not torch.allclose(snapshot.samples[names[0]], cap.attention[names[0]][0])
    without = attn_probe.rank_profile(
        model, [first], sequences=3, capture=attn_probe.CaptureOptions(batch_rows=None, crop=12),
    )
    assert dict(without.samples) == {}


def test_rank_profile_progress_stops_at_max_sequences_and_needs_batches():
    model = small_gpt().eval()
    seen = []
    snapshot = attn_probe.rank_profile(
        model, gpt_batches(5, b=4, t=8), on_batch=seen.append, sequences=10,
    )
    assert seen == [4, 8, 10]  # the third batch is measured in part, the rest not at all
    assert all(layer.counts.tolist() == [10] * 4 for layer in snapshot.layers)
    with pytest.raises(ValueError, match="no batches"):
        attn_probe.rank_profile(model, [], sequences=10)


def test_another_crop_is_rebuilt_without_running_the_model():
    """Capture.matrix / metrics(crop=...) of a recorded call equal the float64 reference
    cropped to that many tokens, and a capture made with that crop; nothing runs the model."""
    model = small_gpt().eval()
    x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(5))
    reference = [a[:1] for a in gpt_attention(model, x)]
    names = ["transformer.h.0.attn", "transformer.h.1.attn"]
    with torch.no_grad(), capture(model, attn_probe.CaptureOptions(batch_rows=1, crop=12)) as cap:
        model(x)
    options = attn_probe.CaptureOptions(batch_rows=1, crop=5)
    with torch.no_grad(), capture(model, options) as cropped:
        model(x)
    calls = []
    handle = model.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        for layer, name in enumerate(names):
            assert cap.matrix(name) is cap.attention[name]
            for t in (5, 16):
                got = cap.matrix(name, t)
                assert got.shape == (1, 4, t, t)
                assert (got.double() - reference[layer][..., :t, :t]).abs().max() < 1e-6
            assert torch.equal(cap.matrix(name, 5), cropped.attention[name])
        only = cap.metrics(0.9, modules=[names[1]], crop=5)
        assert list(only) == [names[1]]
        want = cropped.metrics(0.9)[names[1]]
        assert only[names[1]].keys() == want.keys()
        for figure, values in want.items():
            assert torch.allclose(only[names[1]][figure], values, equal_nan=True), figure
        rank, columns, _ = reference_counts(reference[1][..., :5, :5])
        assert torch.equal(only[names[1]]["rank"].double(), rank)
        assert torch.equal(only[names[1]]["columns"].double(), columns)
    finally:
        handle.remove()
    assert calls == []
    with pytest.raises(KeyError, match="nothing was recorded for"):
        cap.metrics(0.9, modules=["transformer.h.9.attn"])
    with pytest.raises(ValueError, match="crop must be an int >= 2"):
        cap.matrix(names[0], 1)

