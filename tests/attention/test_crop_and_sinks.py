"""What the matrix covers: cropping keeps every key where the crop would not be exact
(bidirectional and cross attention, additive masks), learned sink logits are no key, and the
matrix's size is bounded before it is allocated."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import attn_probe
from attn_probe import capture
from reference import reference_counts
from toy_models import small_gpt


def mha(embed: int = 16, heads: int = 4, seed: int = 0) -> nn.MultiheadAttention:
    torch.manual_seed(seed)
    return nn.MultiheadAttention(embed, heads, batch_first=True).eval()


def test_crop_under_an_additive_mask_keeps_every_key():
    """Queries that may see keys beyond the crop keep them: with an additive mask that allows
    them (0.0, not True) the rows stay whole distributions, equal to the module's own."""
    module = mha()
    x = torch.randn(2, 9, 16, generator=torch.Generator().manual_seed(1))
    bias = torch.zeros(9, 9)
    bias[:, 7] = -math.inf  # nobody sees key 7; every other key is open to every query
    bias[2, 3] = -2.5
    options = attn_probe.CaptureOptions(batch_rows=None, crop=4)
    with torch.no_grad(), capture(module, options) as cap:
        module(x, x, x, attn_mask=bias, need_weights=False)
    _, want = module(x, x, x, attn_mask=bias, average_attn_weights=False)
    (got,) = cap.attention.values()
    # key 7 is attended by no query: padding, a zero column at its position
    assert got.shape == (2, 4, 4, 9) and got[..., 7].abs().max() == 0
    torch.testing.assert_close(got, want[:, :, :4], rtol=0, atol=1e-6)
    torch.testing.assert_close(got.sum(-1), torch.ones(2, 4, 4))


def test_cross_attention_longer_than_max_tokens_is_measured_over_all_keys():
    module = mha()
    g = torch.Generator().manual_seed(2)
    queries, memory = torch.randn(2, 10, 16, generator=g), torch.randn(2, 400, 16, generator=g)
    options = attn_probe.CaptureOptions(batch_rows=None, crop=256)
    with torch.no_grad(), capture(module, options) as cap:
        module(queries, memory, memory, need_weights=False)
        figures = cap.metrics()
    _, want = module(queries, memory, memory, average_attn_weights=False)
    (got,) = cap.attention.values()
    assert got.shape == (2, 4, 10, 400)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    torch.testing.assert_close(got.sum(-1), torch.ones(2, 4, 10))
    (per_head,) = figures.values()
    assert (per_head["tokens_full"] == 10).all()


class EagerEncoderAttention(nn.Module):
    """Bidirectional attention with an explicit softmax (no SDPA): interception takes the
    softmax's own scores and probabilities."""

    def __init__(self, dim: int = 16, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        probs = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.size(-1)), dim=-1)
        self.weights = probs  # the module's own attention weights
        return (probs @ v).transpose(1, 2).reshape(b, t, c)


def test_eager_bidirectional_crop_keeps_every_key():
    """Cropping an eager softmax's bidirectional attention keeps the first queries and every
    key: each row is the query's whole distribution (summing to 1), and the figures are those
    of that T x S matrix."""
    torch.manual_seed(0)
    module = EagerEncoderAttention()
    x = torch.randn(2, 12, 16, generator=torch.Generator().manual_seed(3)) * 3
    options = attn_probe.CaptureOptions(batch_rows=None, crop=5)
    with torch.no_grad(), capture(module, options) as cap:
        module(x)
        figures = cap.metrics()
    (got,) = cap.attention.values()
    torch.testing.assert_close(got.sum(-1), torch.ones(2, 4, 5))
    assert got.shape == (2, 4, 5, 12)  # queries cropped, every key kept
    torch.testing.assert_close(got, module.weights[:, :, :5], rtol=0, atol=1e-7)
    (per_head,) = figures.values()
    want = reference_counts(module.weights[:, :, :5])
    assert torch.equal(per_head["rank"], want[0]) and torch.equal(per_head["columns"], want[1])
    assert (per_head["tokens_full"] == 12).all()  # the whole-sequence figures see every query


class SinkLogitAttention(nn.Module):
    """Eager attention with a learned per-head sink logit: an extra score column that takes
    probability mass in the softmax and is dropped after it (it is no key)."""

    def __init__(self, dim: int = 16, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.sinks = nn.Parameter(torch.tensor([2.0, -1.0, 0.5, 4.0]))

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
        causal = torch.ones(t, t, dtype=torch.bool).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
        sinks = self.sinks.view(1, -1, 1, 1).expand(b, -1, t, 1)
        probs = torch.softmax(torch.cat([scores, sinks], dim=-1), dim=-1)
        self.weights = probs[..., :-1]  # the module's own attention weights
        self.sink_share = probs[..., -1]
        return (self.weights @ v).transpose(1, 2).reshape(b, t, c)


def test_learned_sink_logits_are_no_key_and_their_mass_is_reported():
    torch.manual_seed(0)
    module = SinkLogitAttention()
    x = torch.randn(3, 20, 16)
    with torch.no_grad(), capture(module) as cap:
        module(x)
        figures = cap.metrics()
    (got,) = cap.attention.values()
    assert got.shape == (3, 4, 20, 20)  # the model's own keys, not a 21st column
    torch.testing.assert_close(got, module.weights, rtol=0, atol=1e-7)
    (per_head,) = figures.values()
    share = module.sink_share.double().mean(dim=-1)  # per sequence and head
    torch.testing.assert_close(per_head["sink_logit_full"], share, rtol=1e-6, atol=1e-9)
    # the heads keep their real spread over keys: no phantom single column
    assert (per_head["columns"] > 1).all() and (per_head["dominant"] < 20).all()


def test_matrix_budget_is_checked_before_anything_is_allocated():
    model = small_gpt().eval()
    x = torch.randint(0, 64, (2, 16))
    with pytest.raises(MemoryError, match=r"\(2, 4, 16, 16\) float32.*crop="):
        with torch.no_grad(), capture(
            model, attn_probe.CaptureOptions(batch_rows=None, crop=None, matrix_budget=1000),
        ) as cap:
            model(x)
    with torch.no_grad(), capture(
        model,
        attn_probe.CaptureOptions(batch_rows=None, crop=None, matrix_budget=2 * 4 * 16 * 16 * 4),
    ) as cap:
        model(x)  # exactly at the budget: fine
    assert len(cap.attention) == 2
    # the probe never stops training for it: one warning, the step goes on unmeasured
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with attn_probe.AttentionProbe(
            model, every=1, capture=attn_probe.CaptureOptions(matrix_budget=1000), history=1000,
        ) as probe:
            model(x)
            probe.step()
    assert any("matrix_budget" in str(w.message) for w in caught)
    assert list(probe.history) == []
