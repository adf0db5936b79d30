"""Key/value heads a model repeats (or tiles) for the kernel before calling SDPA: the kernel
gets H identical-by-group key heads, but the model has H_kv key projections. The probe's
``kv_head`` figure names the true groups, and the QK-Clip dry run gives the heads of one group
one factor, from the group's largest max logit (one key projection is scaled for all of them),
against a float64 reference from the model's own weights."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attn_probe

B, T, DIM, HEADS, KV_HEADS = 2, 24, 32, 4, 2
GROUP = HEADS // KV_HEADS


class RepeatedKVAttention(nn.Module):
    """Llama-style attention that copies its key/value heads up to the query heads itself:
    ``"repeat"`` as Hugging Face's ``repeat_kv`` (query head h reads key head h // group),
    ``"tile"`` as ``k.repeat`` (query head h reads key head h % H_kv)."""

    def __init__(self, layout: str):
        super().__init__()
        self.layout, self.head_dim = layout, DIM // HEADS
        self.q_proj = nn.Linear(DIM, HEADS * self.head_dim, bias=False)
        self.k_proj = nn.Linear(DIM, KV_HEADS * self.head_dim, bias=False)
        self.v_proj = nn.Linear(DIM, KV_HEADS * self.head_dim, bias=False)

    def heads(self, x):
        q = self.q_proj(x).view(B, T, HEADS, -1).transpose(1, 2)
        k = self.k_proj(x).view(B, T, KV_HEADS, -1).transpose(1, 2)
        v = self.v_proj(x).view(B, T, KV_HEADS, -1).transpose(1, 2)
        return q, k, v

    def expand(self, t):
        if self.layout == "repeat":
            return t[:, :, None].expand(B, KV_HEADS, GROUP, T, self.head_dim).reshape(
                B, HEADS, T, self.head_dim)
        return t.repeat(1, GROUP, 1, 1)

    def reads(self, h: int) -> int:
        """The key/value head query head ``h`` reads."""
        return h // GROUP if self.layout == "repeat" else h % KV_HEADS

    def forward(self, x):
        q, k, v = self.heads(x)
        y = F.scaled_dot_product_attention(q, self.expand(k), self.expand(v), is_causal=True)
        return y.transpose(1, 2).reshape(B, T, DIM)


def reference_max_logits(module: RepeatedKVAttention, x) -> np.ndarray:
    """(H,) float64 largest causal score of each head in the first sequence (the one the probe
    measures by default), from the weights."""
    with torch.no_grad():
        q, k, _ = (t[:1].double() for t in module.heads(x))
    out = []
    for h in range(HEADS):
        scores = q[:, h] @ k[:, module.reads(h)].mT / math.sqrt(module.head_dim)
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        out.append(float(scores.masked_fill(~causal, -math.inf).max()))
    return np.array(out)


@pytest.mark.parametrize("layout", ["repeat", "tile"])
def test_repeated_key_heads_are_one_group(layout):
    torch.manual_seed(7)
    module = RepeatedKVAttention(layout)
    with torch.no_grad():
        module.q_proj.weight.mul_(3.0)  # logits well above the cap below
    x = torch.randn(B, T, DIM)
    with attn_probe.AttentionProbe(module, every=1) as probe:
        with torch.no_grad():
            module(x)
        snapshot = probe.step()
    (layer,) = snapshot.layers
    groups = [module.reads(h) for h in range(HEADS)]
    assert layer.heads["kv_head"].tolist() == groups

    max_logits = reference_max_logits(module, x)
    np.testing.assert_allclose(layer.heads["max_logit"], max_logits, rtol=1e-6)
    cap = 0.5 * float(max_logits.min())
    shared = np.array([max(max_logits[g] for g in range(HEADS) if groups[g] == groups[h])
                       for h in range(HEADS)])
    want = np.minimum(1.0, cap / shared)
    per_head = np.minimum(1.0, cap / max_logits)
    assert not np.allclose(want, per_head)  # separate groups would give other factors
    np.testing.assert_allclose(layer.qk_clip(cap), want, rtol=1e-6)
