"""Rebuilding A from the q, k and mask a kernel was given: masks, fully masked rows, shapes, and
cropping to the first sequences and tokens."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attn_probe import CaptureOptions, capture
from attn_probe.attention import attention_probabilities
from toy_models import TOL, assert_close_all, max_error, nano_reference, tokens


def test_rebuild_direct_masks_and_shapes():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 4, 8, generator=g), torch.randn(2, 3, 4, 8, generator=g)
    mask = torch.zeros(2, 1, 4, 4)
    mask[1, :, 0] = float("-inf")
    a = attention_probabilities(q, k, attn_mask=mask)
    assert a[1, :, 0].abs().max() == 0 and not torch.isnan(a).any()
    want = torch.softmax(q[0] @ k[0].transpose(-1, -2) / math.sqrt(8), -1)
    torch.testing.assert_close(a[0], want)
    # one head, (B, L, E), with a per-sequence (B, L, S) mask
    m3 = torch.rand(2, 4, 4, generator=g) < 0.6
    m3[:, torch.arange(4), torch.arange(4)] = True
    a3 = attention_probabilities(q[:, 0], k[:, 0], attn_mask=m3)
    want = F.scaled_dot_product_attention(q[:, 0], k[:, 0], torch.eye(4).expand(2, 4, 4),
                                          attn_mask=m3)
    assert a3.shape == (2, 1, 4, 4)
    assert max_error(a3[:, 0], want) <= TOL


# --- fully masked rows ----------------------------------------------------------------------------


class MaskedSDPA(nn.Module):
    def __init__(self, manual: bool):
        super().__init__()
        self.proj = nn.Linear(8, 16)
        self.manual = manual

    def forward(self, x, mask):
        B, T, _ = x.shape
        q, k = self.proj(x).view(B, T, 2, 2, 4).permute(2, 0, 3, 1, 4)
        if self.manual:
            s = (q @ k.transpose(-2, -1)) / 2.0
            return F.softmax(s.masked_fill(~mask, float("-inf")), dim=-1) @ k
        return F.scaled_dot_product_attention(q, k, k, attn_mask=mask)


@pytest.mark.parametrize("manual", [False, True], ids=["sdpa", "softmax"])
def test_fully_masked_rows_are_zero(manual):
    torch.manual_seed(0)
    module = MaskedSDPA(manual)
    x = torch.randn(2, 6, 8)
    mask = torch.rand(2, 1, 6, 6) < 0.7
    mask[..., torch.arange(6), torch.arange(6)] = True
    mask[0, :, 3] = False  # query 3 of sequence 0 may see no key
    with torch.no_grad(), capture(
        module, CaptureOptions(batch_rows=None, crop=None, modules=""),
    ) as cap:
        module(x, mask)
    a = cap.attention[""]
    assert not torch.isnan(a).any()
    assert a[0, :, 3].abs().max() == 0
    q, k = module.proj(x).view(2, 6, 2, 2, 4).permute(2, 0, 3, 1, 4)
    want = torch.softmax(((q @ k.transpose(-2, -1)) / 2.0).masked_fill(~mask, float("-inf")), -1)
    keep = torch.ones(2, 1, 6, 1, dtype=torch.bool)
    keep[0, :, 3] = False
    assert max_error(a * keep, (want * keep).detach().nan_to_num()) <= TOL


def test_fully_masked_rows_multihead_attention():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 2, batch_first=True)
    x = torch.randn(2, 5, 16)
    blocked = torch.zeros(5, 5, dtype=torch.bool)
    blocked[2] = True  # query 2 may see nothing
    with torch.no_grad(), capture(mha) as cap:
        mha(x, x, x, attn_mask=blocked, need_weights=False)
    a = cap.attention[""]
    assert not torch.isnan(a).any() and a[:, :, 2].abs().max() == 0
    _, want = mha(x, x, x, attn_mask=blocked, average_attn_weights=False)
    rows = torch.arange(5) != 2
    assert max_error(a[:, :, rows], want[:, :, rows]) <= TOL


# --- cropping -------------------------------------------------------------------------------------


def test_causal_cropping_equals_prefix(gpt2, llama, nanogpt):
    x = tokens(t=16)
    for name, (model, eager) in {"gpt2": gpt2, "llama": llama}.items():
        with torch.no_grad(), capture(model, CaptureOptions(batch_rows=None, crop=7)) as cap:
            model(x)
        assert all(a.shape[-2:] == (7, 7) for a in cap.attention.values())
        with torch.no_grad():
            ref = eager(x[:, :7], output_attentions=True).attentions
        assert_close_all(cap.attention, ref, f"{name} cropped")
        rows = torch.stack(list(cap.attention.values())).sum(-1)
        torch.testing.assert_close(rows, torch.ones_like(rows))
    ref = nano_reference(nanogpt, x[:, :7])
    for strategy in ("intercept", "adapter"):
        with torch.no_grad(), capture(
            nanogpt, CaptureOptions(batch_rows=None, crop=7, strategy=strategy),
        ) as cap:
            nanogpt(x)
        assert_close_all(cap.attention, ref, f"nanogpt cropped {strategy}")


def test_max_sequences_keeps_first_sequences(gpt2, nanogpt):
    x = tokens(b=5)
    for model in (gpt2[0], nanogpt):
        for strategy in ("intercept", "adapter") if model is nanogpt else ("auto",):
            with torch.no_grad(), capture(
                model, CaptureOptions(batch_rows=None, crop=None, strategy=strategy),
            ) as full:
                model(x)
            with torch.no_grad(), capture(
                model, CaptureOptions(batch_rows=2, crop=None, strategy=strategy),
            ) as few:
                model(x)
            for name, a in few.attention.items():
                assert a.shape[0] == 2
                assert torch.equal(a, full.attention[name][:2])


def test_bidirectional_cropping_keeps_every_key(bert):
    """Cropping bidirectional attention to 5 queries keeps all 12 keys: each row is the query's
    whole distribution (summing to 1), the model's own."""
    model, eager = bert
    x = tokens()
    mask = torch.ones_like(x)
    mask[1, 9:] = 0
    with torch.no_grad(), capture(model, CaptureOptions(batch_rows=None, crop=5)) as cap:
        model(x, attention_mask=mask)
    with torch.no_grad():
        ref = eager(x, attention_mask=mask, output_attentions=True).attentions
    assert_close_all(cap.attention, [r[:, :, :5, :] for r in ref], "bert cropped")
    for attention in cap.attention.values():
        assert attention.shape[-2:] == (5, 12)
        torch.testing.assert_close(attention.sum(-1), torch.ones(3, 4, 5))
