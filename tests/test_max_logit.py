"""The logit figures of every head — the max logit and the logit spread (largest top score minus
the mean of a query's allowed scores) — equal a float64 reference built from the same q, k, scale
and mask: on every model family the capture tests cover (causal, padded, grouped-query,
bidirectional, sliding-window, soft-capped), through interception of SDPA, of an eager softmax,
and through an adapter. The references here never touch attn_probe: the Hugging Face ones record
the eager twin's own softmax input; the others recompute the scores from the module's weights.
The QK-Clip dry run's factors are checked against the reference max logits, one factor per
key/value group under grouped-query attention."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attn_probe import CaptureOptions, capture
from toy_models import small_gpt, tokens

BLOCKED = -1e4  # additive mask entries at or below take no mass (-inf, finfo.min, -10000)


def max_allowed(scores: torch.Tensor, real: torch.Tensor | None = None) -> torch.Tensor:
    """(B, H, L, S) scores as the softmax saw them -> (B, H) float64 max over allowed pairs,
    leaving out the query rows of padding (``real`` (B, L): 1 for a real token)."""
    return logit_figures(scores, real)[0]


def logit_figures(scores: torch.Tensor,
                  real: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H) max logit and logit spread: the largest allowed score, and the largest over
    query rows of (the row's largest allowed score - the mean of its allowed scores)."""
    scores = scores.double()
    allowed = scores > BLOCKED
    if real is not None:
        allowed = allowed & real.bool()[:, None, :, None]
    top = torch.where(allowed, scores, -math.inf).amax(-1)  # (B, H, L)
    mean = torch.where(allowed, scores, 0.0).sum(-1) / allowed.sum(-1).clamp_min(1)
    spread = torch.where(allowed.any(-1), top - mean, -math.inf)
    return top.amax(-1), spread.amax(-1)


def assert_logit_figures(got: dict, scores: torch.Tensor, real: torch.Tensor | None = None,
                         tol: float = 1e-5) -> None:
    max_logit, spread = logit_figures(scores, real)
    torch.testing.assert_close(got["max_logit"], max_logit, rtol=tol, atol=tol)
    torch.testing.assert_close(got["logit_spread"], spread, rtol=tol, atol=tol)


def softmax_inputs(model, *args, **kwargs) -> list[torch.Tensor]:
    """The score tensors the model's eager attention hands to softmax, in call order."""
    seen, original = [], F.softmax

    def recording(input, *a, **k):
        if input.dim() == 4:
            seen.append(input.detach().clone())
        return original(input, *a, **k)

    F.softmax = recording
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        F.softmax = original
    return seen


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
@pytest.mark.parametrize("kernel", ["sdpa", "eager"])
def test_hugging_face_models_padded(family, kernel, request):
    """Causal (GPT-2), grouped-query with rotary embeddings (Llama), bidirectional (BERT), each
    with padding on both sides of the batch."""
    sdpa, eager = request.getfixturevalue(family)
    x = tokens()
    mask = torch.ones_like(x)
    mask[1, 9:] = 0
    if family == "llama":
        mask[2, :3] = 0  # left padding too
    with torch.no_grad(), capture(sdpa if kernel == "sdpa" else eager) as cap:
        (sdpa if kernel == "sdpa" else eager)(x, attention_mask=mask)
        figures = cap.metrics()
    want = softmax_inputs(eager, x, attention_mask=mask)
    assert len(want) == len(figures) == 2
    for got, scores in zip(figures.values(), want):
        assert_logit_figures(got, scores, mask, tol=2e-5)


def test_demo_gpt_causal():
    model = small_gpt(seed=3).eval()
    x = torch.randint(0, 64, (3, 24), generator=torch.Generator().manual_seed(0))
    inputs = []
    hooks = [block.attn.register_forward_pre_hook(lambda m, a: inputs.append(a[0]))
             for block in model.transformer.h]
    try:
        with torch.no_grad(), capture(model, CaptureOptions(batch_rows=None, crop=8)) as cap:
            model(x)
            figures = cap.metrics()
    finally:
        for hook in hooks:
            hook.remove()
    for block, h, got in zip(model.transformer.h, inputs, figures.values()):
        attn = block.attn
        qkv = F.linear(h.double(), attn.c_attn.weight.double(), attn.c_attn.bias.double())
        q, k, _ = qkv.view(3, 24, 3, attn.n_head, -1).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
        scores = scores.masked_fill(~torch.ones(24, 24, dtype=torch.bool).tril(), -math.inf)
        # the crop to 8 tokens leaves the max logit over all 24
        assert_logit_figures(got, scores)


class WindowedOrCapped(nn.Module):
    """Sliding-window attention through SDPA, or soft-capped eager attention (Gemma 2 style:
    scores -> cap * tanh(scores / cap) before the softmax)."""

    def __init__(self, kind: str, window: int = 4, cap: float = 5.0):
        super().__init__()
        self.kind, self.window, self.cap = kind, window, cap
        self.proj = nn.Linear(16, 32)

    def qk(self, x):
        b, t, _ = x.shape
        return self.proj(x).view(b, t, 2, 4, 4).permute(2, 0, 3, 1, 4)

    def window_mask(self, t: int) -> torch.Tensor:
        i = torch.arange(t)
        return (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < self.window)

    def forward(self, x):
        q, k = self.qk(x)
        if self.kind == "window":
            return F.scaled_dot_product_attention(q, k, k, attn_mask=self.window_mask(x.size(1)))
        scores = q @ k.transpose(-2, -1) * 3.0  # a large scale, so that the cap bites
        scores = self.cap * torch.tanh(scores / self.cap)
        scores = scores.masked_fill(~self.window_mask(x.size(1)).tril(), -math.inf)
        return F.softmax(scores, dim=-1) @ k


@pytest.mark.parametrize("kind", ["window", "softcap"])
def test_sliding_window_and_soft_capped(kind):
    torch.manual_seed(0)
    module = WindowedOrCapped(kind, window=16 if kind == "softcap" else 4)
    x = torch.randn(2, 12, 16)
    with torch.no_grad(), capture(
        module, CaptureOptions(batch_rows=None, crop=None, modules=""),
    ) as cap:
        module(x)
        (got,) = cap.metrics().values()
    q, k = (t.double() for t in module.qk(x))
    t = x.size(1)
    if kind == "window":
        scores = (q @ k.transpose(-2, -1) / 2.0).masked_fill(~module.window_mask(t), -math.inf)
    else:
        scores = module.cap * torch.tanh(q @ k.transpose(-2, -1) * 3.0 / module.cap)
        scores = scores.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), -math.inf)
        assert max_allowed(scores).max() < module.cap  # the logits the softmax saw: capped
    assert_logit_figures(got, scores)


def test_adapter_path_multihead_attention():
    """nn.MultiheadAttention is served by an adapter that rebuilds q and k from its weights."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=True).eval()
    x = torch.randn(2, 9, 16)
    with torch.no_grad(), capture(mha) as cap:
        mha(x, x, x, need_weights=False)
        (got,) = cap.metrics().values()
    w_q, w_k = mha.in_proj_weight.double()[:16], mha.in_proj_weight.double()[16:32]
    b_q, b_k = mha.in_proj_bias.double()[:16], mha.in_proj_bias.double()[16:32]
    q = F.linear(x.double(), w_q, b_q).view(2, 9, 4, 4).transpose(1, 2)
    k = F.linear(x.double(), w_k, b_k).view(2, 9, 4, 4).transpose(1, 2)
    assert_logit_figures(got, q @ k.transpose(-2, -1) / 2.0)


def test_qk_clip_takes_one_factor_per_key_value_group(llama):
    """Llama with 4 query heads over 2 key/value heads: the heads of a group share the factor
    of the group's largest max logit, min(1, cap / max)."""
    from attn_probe import rank_profile

    model = llama[0]
    x = tokens()
    snapshot = rank_profile(model, [{"input_ids": x}], sequences=x.shape[0])
    want = softmax_inputs(llama[1], x)
    for layer, scores in zip(snapshot.layers, want):
        per_head = max_allowed(scores).amax(0).numpy()  # over the sequences
        heads = per_head.shape[0]
        groups = model.config.num_key_value_heads
        assert layer.heads["kv_head"].tolist() == [h // (heads // groups) for h in range(heads)]
        group_max = per_head.reshape(groups, -1).max(1).repeat(heads // groups)
        cap = float(per_head.min() + per_head.max()) / 2  # some groups above, some below
        np.testing.assert_allclose(layer.qk_clip(cap), np.minimum(1.0, cap / group_max),
                                   rtol=1e-5)
