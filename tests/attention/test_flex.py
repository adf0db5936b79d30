"""Generic ``flex_attention`` calls, intercepted with no adapter: the matrices and the
full-sequence figures against a float64 reference written out from the call's own inputs
(``tests/reference.py``: scores, the score modification, the mask), for document masking,
sliding windows, soft-capping, ALiBi, a learned relative bias, grouped-query attention and a
given scale. Forward passes only: ``flex_attention`` has no backward on CPU."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from attn_probe import CaptureOptions, capture
from reference import flex_scores, no_hooks_left, score_figures

pytestmark = [
    pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile",
                               "ignore:`torch.jit.script_method` is deprecated"),
    pytest.mark.usefixtures("single_thread"),
]

B, T, DIM, HEADS, KV_HEADS = 2, 64, 32, 4, 2
RTOL = 1e-9


class FlexSelfAttention(nn.Module):
    """Grouped-query self-attention through ``flex_attention`` (4 query heads, 2 key/value
    heads), with whatever ``block_mask``, ``score_mod`` and ``scale`` the caller gives."""

    def __init__(self):
        super().__init__()
        self.head_dim = DIM // HEADS
        self.wq = nn.Linear(DIM, HEADS * self.head_dim, bias=False)
        self.wk = nn.Linear(DIM, KV_HEADS * self.head_dim, bias=False)
        self.wv = nn.Linear(DIM, KV_HEADS * self.head_dim, bias=False)
        self.wo = nn.Linear(HEADS * self.head_dim, DIM, bias=False)

    def qkv(self, x):
        b, t, _ = x.shape
        q = self.wq(x).view(b, t, HEADS, -1).transpose(1, 2)
        k = self.wk(x).view(b, t, KV_HEADS, -1).transpose(1, 2)
        v = self.wv(x).view(b, t, KV_HEADS, -1).transpose(1, 2)
        return q, k, v

    def forward(self, x, block_mask=None, score_mod=None, scale=None):
        from torch.nn.attention.flex_attention import flex_attention

        q, k, v = self.qkv(x)
        y = flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale,
                           enable_gqa=True)
        return self.wo(y.transpose(1, 2).reshape(x.shape))


class FlexModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(FlexSelfAttention() for _ in range(2))

    def forward(self, x, block_mask=None, score_mod=None, scale=None):
        for layer in self.layers:
            x = x + layer(x, block_mask, score_mod, scale)
        return x


POS = torch.arange(T)
CAUSAL = POS[:, None] >= POS[None, :]
# Two sequences, each packed with documents of its own lengths.
DOCS = torch.stack([torch.bucketize(POS, torch.tensor([23, 51]), right=True),
                    torch.bucketize(POS, torch.tensor([9, 40, 57]), right=True)])
SLOPES = torch.tensor([2.0 ** -(i + 1) for i in range(HEADS)])
BIAS = torch.randn(HEADS, 2 * T - 1, generator=torch.Generator().manual_seed(5))
CAP = 2.0


def case(kind: str):
    """(block_mask or None, score_mod or None, scale, the reference's modification, the
    reference's dense mask)."""
    from torch.nn.attention.flex_attention import create_block_mask

    def block_mask(mask_mod, batch=None):
        return create_block_mask(mask_mod, batch, None, T, T, device="cpu", BLOCK_SIZE=16)

    if kind == "documents":  # packed documents, causal within each; depends on the sequence
        def mask_mod(b, h, q, kv):
            return (q >= kv) & (DOCS[b, q] == DOCS[b, kv])
        dense = CAUSAL & (DOCS[:, :, None] == DOCS[:, None, :])
        return block_mask(mask_mod, B), None, None, None, dense[:, None]
    if kind == "window+softcap":  # sliding window of 20, tanh soft-capping of the logits
        def mask_mod(b, h, q, kv):
            return (q >= kv) & (q - kv < 20)

        def softcap(score, b, h, q, kv):
            return CAP * torch.tanh(score / CAP)
        dense = CAUSAL & (POS[:, None] - POS[None, :] < 20)
        return (block_mask(mask_mod), softcap, 0.5,
                lambda s, b, h, q, kv: CAP * torch.tanh(s / CAP), dense)
    if kind == "alibi":  # causal with a per-head linear distance penalty
        def alibi(score, b, h, q, kv):
            return score + SLOPES[h] * (kv - q)
        return (block_mask(lambda b, h, q, kv: q >= kv), alibi, None,
                lambda s, b, h, q, kv: s + SLOPES.double()[h] * (kv - q), CAUSAL)
    if kind == "relative-bias":  # bidirectional, no block mask, a learned bias per distance
        def relative(score, b, h, q, kv):
            return score + BIAS[h, q - kv + T - 1]
        return (None, relative, 0.3,
                lambda s, b, h, q, kv: s + BIAS.double()[h, q - kv + T - 1], None)
    raise ValueError(kind)


def references(layer: FlexSelfAttention, x, kind):
    """Float64 scores of the call ``layer`` makes on ``x`` (its own q and k), and the output
    they give (to check the reference against the kernel)."""
    _, _, scale, modify, dense = case(kind)
    q, k, v = layer.qkv(x)
    scores = flex_scores(q, k, scale=1 / math.sqrt(layer.head_dim) if scale is None else scale,
                         modify=modify, allowed=dense)
    a = torch.softmax(scores, dim=-1)
    y = a @ v.double().repeat_interleave(HEADS // KV_HEADS, dim=1)
    return scores, layer.wo(y.transpose(1, 2).reshape(x.shape).float())


@pytest.mark.parametrize("kind", ["documents", "window+softcap", "alibi", "relative-bias"])
def test_flex_calls_measured_exactly(kind):
    torch.manual_seed(0)
    model = FlexModel().eval()
    x = torch.randn(B, T, DIM, generator=torch.Generator().manual_seed(1))
    block_mask, score_mod, scale, _, _ = case(kind)
    with torch.no_grad():
        # unprobed, as the probe runs a sampled forward: eagerly (and without compiling the
        # kernel on first use, which only costs time here)
        with torch.compiler.set_stance("force_eager"):
            plain = model(x, block_mask, score_mod, scale)
            inputs = [x, x + model.layers[0](x, block_mask, score_mod, scale)]
        with capture(model) as cap:
            out = model(x, block_mask, score_mod, scale)
        figures = cap.metrics()
        # each layer's reference from the input the layer got
        refs = [references(layer, h, kind) for layer, h in zip(model.layers, inputs)]
    assert torch.equal(out, plain)  # the probe changes nothing
    for h, (_, y), want in zip(inputs, refs, [inputs[1], out]):
        torch.testing.assert_close(h + y, want, rtol=1e-5, atol=1e-5)  # what the kernel made
    refs = [scores for scores, _ in refs]
    assert [s.strategy for s in cap.sites] == ["intercept", "intercept"]
    assert no_hooks_left(model)
    for name, scores in zip(cap.modules, refs):
        torch.testing.assert_close(cap.attention[name].double(), torch.softmax(scores, dim=-1),
                                   rtol=0, atol=2e-6)
        want = score_figures(scores)
        got = figures[name]
        for figure in ("entropy", "sink", "max_logit", "logit_spread"):
            torch.testing.assert_close(got[f"{figure}_full" if figure in ("entropy", "sink")
                                           else figure], want[figure], rtol=RTOL, atol=1e-13,
                                       msg=lambda m, f=figure: f"{kind} {name} {f}: {m}")
        assert torch.equal(got["columns_full"], want["columns"]), (kind, name)
        assert torch.equal(got["tokens_full"], want["tokens"]), (kind, name)
        assert got["kv_head"].tolist() == [[0, 0, 1, 1]] * B  # grouped-query heads


def test_softcap_bounds_the_measured_logit():
    """The logit figures are those of the scores the softmax saw: after soft-capping, never
    above the cap, although the raw q·k go far beyond it."""
    model = FlexModel().eval()
    with torch.no_grad():
        for layer in model.layers:
            layer.wq.weight.mul_(20.0)
        block_mask, score_mod, scale, _, _ = case("window+softcap")
        x = torch.randn(B, T, DIM)
        with capture(model) as cap:
            model(x, block_mask, score_mod, scale)
        q, k, _ = model.layers[0].qkv(x)
    raw = float(flex_scores(q, k, scale=scale).max())
    figures = cap.metrics()["layers.0"]
    assert raw > 5 * CAP
    assert float(figures["max_logit"].max()) <= CAP
    assert float(figures["max_logit"].max()) > 0.9 * CAP


def test_crop_of_a_flex_call_is_the_prefix():
    """crop crops the queries, and the keys where no kept query sees further."""
    model = FlexModel().eval()
    block_mask, score_mod, scale, modify, dense = case("documents")
    x = torch.randn(B, T, DIM)
    with torch.no_grad(), capture(model, CaptureOptions(batch_rows=1, crop=30)) as cap:
        model(x, block_mask, score_mod, scale)
    scores, _ = references(model.layers[0], x, "documents")
    assert cap.attention["layers.0"].shape == (1, HEADS, 30, 30)
    torch.testing.assert_close(cap.attention["layers.0"].double(),
                               torch.softmax(scores[:1, :, :30, :30], dim=-1), rtol=0, atol=2e-6)


def test_compiled_flex_attention_keeps_working_and_is_measured():
    """``torch.compile(flex_attention)`` as torchtitan calls it: the probed forward runs it
    eagerly (Dynamo never traces the interception), with the same output and figures."""
    from torch.nn.attention.flex_attention import flex_attention

    compiled = torch.compile(flex_attention)

    class CompiledFlexAttention(FlexSelfAttention):
        def forward(self, x, block_mask=None, score_mod=None, scale=None):
            q, k, v = self.qkv(x)
            y = compiled(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale,
                         enable_gqa=True)
            return self.wo(y.transpose(1, 2).reshape(x.shape))

    torch.manual_seed(3)
    layer = CompiledFlexAttention().eval()
    block_mask, score_mod, scale, _, _ = case("alibi")
    x = torch.randn(B, T, DIM)
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):
        plain = layer(x, block_mask, score_mod, scale)  # compiled kernels need a C++ toolchain
    with torch.no_grad(), capture(layer) as cap:
        out = layer(x, block_mask, score_mod, scale)
    assert torch.equal(out, plain)
    scores, _ = references(layer, x, "alibi")
    torch.testing.assert_close(cap.attention[""].double(), torch.softmax(scores, dim=-1),
                               rtol=0, atol=2e-6)


@pytest.mark.slow
def test_compiled_model_with_flex_calls_under_the_probe():
    """A model compiled whole (``aot_eager``: inductor has no CPU lowering of this flex call),
    probed every other step: every step's output is the eager model's, the unsampled steps run
    the compiled graph, and the sampled ones are measured exactly."""
    import attn_probe

    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(5)
    model = FlexModel().eval()
    compiled = torch.compile(model, backend="aot_eager")
    block_mask, score_mod, scale, _, _ = case("alibi")
    x = torch.randn(B, T, DIM)
    try:
        with torch.no_grad():
            with torch.compiler.set_stance("force_eager"):
                want = model(x, block_mask, score_mod, scale)
            scores, _ = references(model.layers[0], x, "alibi")
            snapshots = []
            with attn_probe.AttentionProbe(model, every=2) as probe:
                for _ in range(4):
                    assert torch.equal(compiled(x, block_mask, score_mod, scale), want)
                    snapshots.append(probe.step())
    finally:
        torch._dynamo.reset()  # the compiled flex graphs stay with this test
    assert [s is not None for s in snapshots] == [True, False, True, False]
    assert counters["stats"]["unique_graphs"] >= 1  # the unsampled steps ran compiled code
    first = score_figures(scores[:1])["max_logit"][0].numpy()
    for snapshot in snapshots[::2]:
        torch.testing.assert_close(torch.from_numpy(snapshot.layers[0].heads["max_logit"]),
                                   torch.from_numpy(first), rtol=1e-9, atol=0)


def test_per_head_block_mask_in_small_head_chunks():
    """A block mask with lists per head (a window on odd heads only), streamed one key/value
    head at a time (a small memory budget): each chunk of heads gets its own heads' blocks."""
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q, kv):
        return (q >= kv) & ((h % 2 == 0) | (q - kv < 9))

    block_mask = create_block_mask(mask_mod, None, HEADS, T, T, device="cpu", BLOCK_SIZE=16)
    heads = torch.arange(HEADS)[:, None, None]
    dense = CAUSAL & ((heads % 2 == 0) | (POS[:, None] - POS[None, :] < 9))
    model = FlexModel().eval()
    x = torch.randn(B, T, DIM)
    options = CaptureOptions(batch_rows=None, crop=None, memory_budget=32 * 2**10)
    with torch.no_grad(), capture(model, options) as cap:
        model(x, block_mask)
    q, k, _ = model.layers[0].qkv(x)
    scores = flex_scores(q, k, scale=1 / math.sqrt(DIM // HEADS), allowed=dense)
    got, want = cap.metrics()["layers.0"], score_figures(scores)
    torch.testing.assert_close(got["entropy_full"], want["entropy"], rtol=RTOL, atol=1e-13)
    assert torch.equal(got["tokens_full"], want["tokens"])
    assert torch.equal(got["columns_full"], want["columns"])
