"""Padding is left out of the figures: a padded sequence gives exactly the figures of the same
sequence run alone, for every figure (the matrix's and the full sequence's), left or right
padded, in a Hugging Face decoder (Llama, rotary, grouped-query) and encoder (BERT). The
captured matrices keep input positions: the model's own attention weights, padding zero. An
additive mask counts the keys a query may attend to as a boolean one does."""

from __future__ import annotations

import math

import pytest
import torch

from attn_probe import CaptureOptions, capture, rank_profile
from attn_probe.attention import AttentionInputs
from attn_probe.metrics import full_context_metrics
from toy_models import tokens

LENGTHS = (12, 7, 3)


def figures_alone(model, x: torch.Tensor, **call) -> list[dict[str, dict[str, torch.Tensor]]]:
    """Per sequence, every figure of every layer, the sequence run by itself (no padding)."""
    out = []
    for b, length in enumerate(LENGTHS):
        with torch.no_grad(), capture(model) as cap:
            model(x[b: b + 1, :length], **call)
        out.append(cap.metrics())
    return out


def padded(x: torch.Tensor, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The sequences of ``LENGTHS`` in one batch of 12 tokens, padded on ``side`` with id 0."""
    batch = torch.zeros(len(LENGTHS), 12, dtype=torch.long)
    mask = torch.zeros_like(batch)
    for b, length in enumerate(LENGTHS):
        where = slice(12 - length, 12) if side == "left" else slice(0, length)
        batch[b, where], mask[b, where] = x[b, :length], 1
    return batch, mask


@pytest.mark.parametrize("family", ["llama", "bert"])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("kernel", ["sdpa", "eager"])
def test_padded_batch_gives_the_figures_of_each_sequence_alone(family, side, kernel, request):
    """SDPA: padding read from the boolean mask the kernel gets; eager: from the scores the
    model's own softmax sees (an additive mask of the dtype's minimum)."""
    sdpa, eager = request.getfixturevalue(family)
    model = sdpa if kernel == "sdpa" else eager
    x = tokens()
    batch, mask = padded(x, side)
    # positions as in the sequence alone (BERT's are absolute; Llama's rotary ones relative)
    positions = (mask.cumsum(1) - 1).clamp_min(0)
    with torch.no_grad(), capture(model) as cap:
        model(batch, attention_mask=mask, position_ids=positions)
    together = cap.metrics()
    alone = figures_alone(model, x)
    assert set(together) == set(alone[0]) and len(together) == 2
    for layer, figures in together.items():
        assert {"rank", "columns", "entropy", "sink", "dominant", "entropy_full",
                "entropy_norm_full", "sink_full", "max_logit", "columns_full",
                "dominant_full", "tokens_full"} <= set(figures)
        for name, value in figures.items():
            for b in range(len(LENGTHS)):
                want = alone[b][layer][name][0]
                if value.dtype.is_floating_point:
                    torch.testing.assert_close(value[b], want, rtol=1e-5, atol=1e-5, equal_nan=True,
                                               msg=f"{layer} {name} sequence {b}")
                else:
                    assert torch.equal(value[b], want), (layer, name, b, value[b], want)
    assert together[layer]["tokens_full"][:, 0].tolist() == list(LENGTHS)


@pytest.mark.parametrize("family", ["llama", "bert"])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("kernel", ["sdpa", "eager"])
def test_captured_attention_keeps_input_positions(family, side, kernel, request):
    """``capture().attention`` is the model's own ``output_attentions`` (eager twin): row i and
    column j are positions i and j of the input, at real positions to float32 rounding and
    exactly 0 at padding; so are the heatmap samples ``rank_profile`` keeps (sequence 0)."""
    sdpa, eager = request.getfixturevalue(family)
    model = sdpa if kernel == "sdpa" else eager
    batch, mask = padded(tokens(), side)
    batch, mask = batch.flip(0), mask.flip(0)  # sequence 0 padded too: the samples' sequence
    with torch.no_grad(), capture(model) as cap:
        model(batch, attention_mask=mask)
    with torch.no_grad():
        want = eager(batch, attention_mask=mask, output_attentions=True).attentions
    real = mask.bool()
    pairs = real[:, None, :, None] & real[:, None, None, :]  # (B, 1, T, T): both real
    assert len(cap.attention) == len(want) == 2
    for (name, got), ref in zip(cap.attention.items(), want):
        assert got.shape == ref.shape == (3, 4, 12, 12), name
        pairs_h = pairs.expand_as(got)
        assert got[~pairs_h].abs().max() == 0, name
        torch.testing.assert_close(got[pairs_h], ref[pairs_h], rtol=0, atol=1e-6, msg=name)
        # each real query's row is its whole distribution over the real keys
        torch.testing.assert_close(got.sum(-1), real[:, None].expand(3, 4, 12).float())
    snapshot = rank_profile(
        model, [{"input_ids": batch, "attention_mask": mask}], samples=True, sequences=3,
    )
    for name, got in cap.attention.items():
        torch.testing.assert_close(snapshot.samples[name], got[0], rtol=0, atol=0)
    # crop crops positions: the first 8 queries (and keys, where exact: causal Llama)
    with torch.no_grad(), capture(model, CaptureOptions(batch_rows=None, crop=8)) as cropped:
        model(batch, attention_mask=mask)
    keys = 8 if family == "llama" else 12
    for name, got in cropped.attention.items():
        assert got.shape == (3, 4, 8, keys), name
        torch.testing.assert_close(got, cap.attention[name][:, :, :8, :keys], rtol=0, atol=1e-6)


@pytest.mark.parametrize("blocking", [torch.finfo(torch.float32).min, -10000.0, -math.inf])
def test_additive_mask_gives_the_figures_of_the_boolean_mask(blocking):
    """An additive mask that blocks with ``finfo.min`` or -10000 (what transformers 4 hands
    SDPA, and older models add) counts the keys a query may attend to as the boolean mask does:
    the same figures, ``entropy_norm_full`` (entropy over the log of those keys) included."""
    torch.manual_seed(0)
    q, k = torch.randn(2, 3, 10, 8), torch.randn(2, 3, 10, 8)
    allowed = torch.ones(10, 10, dtype=torch.bool).tril().repeat(2, 1, 1, 1)
    allowed[1, ..., 7:] = False  # the second sequence is right-padded to 10 tokens
    additive = torch.zeros(allowed.shape).masked_fill(~allowed, blocking)
    want = full_context_metrics(AttentionInputs.of(q, k, attn_mask=allowed), 0.9)
    got = full_context_metrics(AttentionInputs.of(q, k, attn_mask=additive), 0.9)
    assert set(got) == set(want)
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=1e-9, atol=1e-12, msg=name)
    # the normaliser really is the causal count: query i of sequence 0 sees i + 1 keys
    p = torch.softmax((q[0].double() @ k[0].double().mT / math.sqrt(8)).masked_fill(
        ~allowed[0, 0], -math.inf), dim=-1)
    entropy = -torch.xlogy(p, p).sum(-1)[:, 1:]
    norm = (entropy / torch.arange(2, 11, dtype=torch.float64).log()).mean(-1)
    torch.testing.assert_close(got["entropy_norm_full"][0], norm, rtol=1e-9, atol=1e-12)
