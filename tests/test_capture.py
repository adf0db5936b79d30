"""Capturing attention matrices: every strategy against the model's own attention weights.

Each model family is checked in float32 against attention probabilities the model itself
produces (Hugging Face ``output_attentions`` of an eager twin, the manual path of a nanoGPT
block, ``nn.MultiheadAttention``'s ``need_weights``, or an explicit softmax whose output is
checked against the module's own output).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attn_probe import capture
from attn_probe.attention import (
    CaptureError,
    attention_probabilities,
    find_attention_modules,
    register_adapter,
)
from attn_probe.attention.adapters import find_adapter
from reference import FIXTURE, FIXTURE_MISSING, no_hooks_left

try:
    import transformers
except ImportError:  # the Hugging Face tests skip; the rest run
    transformers = None

TOL = 1e-5


def max_error(got: torch.Tensor, want: torch.Tensor) -> float:
    assert got.shape == want.shape, (tuple(got.shape), tuple(want.shape))
    assert got.dtype == torch.float32
    assert not torch.isnan(got).any()
    return (got - want.float()).abs().max().item()


def assert_close_all(captured: dict, reference, label: str) -> float:
    """Compare captured matrices (in model order) with a sequence of reference matrices."""
    captured = list(captured.values())
    reference = list(reference)
    assert len(captured) == len(reference) > 0
    err = max(max_error(a, r) for a, r in zip(captured, reference))
    print(f"max-error {label}: {err:.3g}")
    assert err <= TOL, f"{label}: {err}"
    return err





# --- Hugging Face models -------------------------------------------------------------------


def hf_twins(cls, config):
    """(sdpa model, eager model) with the same weights, in eval mode."""
    torch.manual_seed(0)
    sdpa = cls._from_config(config, attn_implementation="sdpa").eval()
    eager = cls._from_config(config, attn_implementation="eager").eval()
    eager.load_state_dict(sdpa.state_dict())
    return sdpa, eager


def gpt2_config(**kw):
    return transformers.GPT2Config(
        n_layer=2, n_head=4, n_embd=32, vocab_size=97, n_positions=64,
        bos_token_id=0, eos_token_id=0, **kw,
    )


def llama_config():
    return transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=97, max_position_embeddings=64,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )


def bert_config():
    return transformers.BertConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        vocab_size=97, max_position_embeddings=64, pad_token_id=0,
    )


@pytest.fixture(scope="module")
def gpt2():
    pytest.importorskip("transformers")
    return hf_twins(transformers.GPT2LMHeadModel, gpt2_config())


@pytest.fixture(scope="module")
def llama():
    pytest.importorskip("transformers")
    return hf_twins(transformers.LlamaForCausalLM, llama_config())


@pytest.fixture(scope="module")
def bert():
    pytest.importorskip("transformers")
    return hf_twins(transformers.BertModel, bert_config())


def tokens(b=3, t=12, seed=1):
    return torch.randint(1, 97, (b, t), generator=torch.Generator().manual_seed(seed))


def test_gpt2_matches_eager(gpt2):
    model, eager = gpt2
    x = tokens()
    with torch.no_grad(), capture(model) as cap:
        model(x)
    assert [s.strategy for s in cap.sites] == ["intercept", "intercept"]
    assert_close_all(cap.attention, eager(x, output_attentions=True).attentions, "gpt2")


def test_gpt2_padding_matches_eager(gpt2):
    model, eager = gpt2
    x = tokens()
    mask = torch.ones_like(x)
    mask[1, 9:] = 0
    mask[2, 4:] = 0
    with torch.no_grad(), capture(model) as cap:
        model(x, attention_mask=mask)
    ref = eager(x, attention_mask=mask, output_attentions=True).attentions
    assert_close_all(cap.attention, ref, "gpt2 padded")


def test_llama_grouped_query_matches_eager(llama):
    model, eager = llama
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    x = tokens()
    with torch.no_grad(), capture(model) as cap:
        model(x)
    for a in cap.attention.values():
        assert a.shape == (3, model.config.num_attention_heads, 12, 12)
    assert_close_all(cap.attention, eager(x, output_attentions=True).attentions, "llama gqa")


def test_llama_left_padding_matches_eager(llama):
    model, eager = llama
    x = tokens()
    mask = torch.ones_like(x)
    mask[1, :5] = 0
    mask[2, :1] = 0
    with torch.no_grad(), capture(model) as cap:
        model(x, attention_mask=mask)
    ref = eager(x, attention_mask=mask, output_attentions=True).attentions
    assert_close_all(cap.attention, ref, "llama left-padded")
    # padding keys get no attention from real queries
    a = cap.attention["model.layers.0.self_attn"]
    assert a[1, :, 5:, :5].abs().max() == 0


def test_bert_padding_matches_eager(bert):
    model, eager = bert
    x = tokens()
    mask = torch.ones_like(x)
    mask[1, 8:] = 0
    mask[2, 3:] = 0
    with torch.no_grad(), capture(model) as cap:
        model(x, attention_mask=mask)
    assert cap.modules == ["encoder.layer.0.attention.self", "encoder.layer.1.attention.self"]
    ref = eager(x, attention_mask=mask, output_attentions=True).attentions
    assert_close_all(cap.attention, ref, "bert padded")
    a = cap.attention["encoder.layer.0.attention.self"]
    assert a[2, :, :, 3:].abs().max() == 0
    torch.testing.assert_close(a.sum(-1), torch.ones(3, 4, 12))


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_hf_eager_models_softmax_is_intercepted(family, request):
    """Eager attention calls softmax on the score tensor: its output is A."""
    _, eager = request.getfixturevalue(family)
    x = tokens()
    mask = torch.ones_like(x)
    mask[1, :3] = 0 if family == "llama" else 1
    mask[2, 9:] = 1 if family == "llama" else 0
    with torch.no_grad(), capture(eager) as cap:
        ref = eager(x, attention_mask=mask, output_attentions=True).attentions
    assert_close_all(cap.attention, ref, f"{family} eager softmax")


# --- nanoGPT ---------------------------------------------------------------------------------


class CausalSelfAttention(nn.Module):
    """A nanoGPT attention block: one c_attn Linear, flash (SDPA) or manual softmax path."""

    def __init__(self, n_embd=32, n_head=4, block_size=64, dropout=0.0, flash=True):
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.attn_dropout = nn.Dropout(dropout)
        self.resid_dropout = nn.Dropout(dropout)
        self.n_head, self.n_embd, self.dropout, self.flash = n_head, n_embd, dropout, flash
        self.register_buffer("bias", torch.tril(torch.ones(block_size, block_size))[None, None])
        self.att = None  # the manual path's probabilities, kept for the tests
        self.fail_after_attention = False

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if self.flash:
            y = F.scaled_dot_product_attention(
                q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
            )
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
            att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
            att = F.softmax(att, dim=-1)
            self.att = att.detach()
            att = self.attn_dropout(att)
            y = att @ v
        if self.fail_after_attention:
            raise ValueError("failing on purpose")
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class NanoBlock(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.ln_1 = nn.LayerNorm(32)
        self.attn = CausalSelfAttention(**kw)
        self.ln_2 = nn.LayerNorm(32)
        self.mlp = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    def __init__(self, n_layer=2, **kw):
        super().__init__()
        self.wte = nn.Embedding(97, 32)
        self.wpe = nn.Embedding(64, 32)
        self.blocks = nn.ModuleList(NanoBlock(**kw) for _ in range(n_layer))
        self.head = nn.Linear(32, 97)

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.size(1)))
        for block in self.blocks:
            x = block(x)
        return self.head(x)

    def set_flash(self, flash: bool):
        for block in self.blocks:
            block.attn.flash = flash


@pytest.fixture
def nanogpt():
    torch.manual_seed(0)
    return NanoGPT().eval()


def nano_reference(model, x):
    model.set_flash(False)
    try:
        with torch.no_grad():
            model(x)
        return [b.attn.att for b in model.blocks]
    finally:
        model.set_flash(True)


@pytest.mark.parametrize("strategy", ["auto", "intercept", "adapter"])
def test_nanogpt_flash_matches_manual_softmax(nanogpt, strategy):
    x = tokens()
    ref = nano_reference(nanogpt, x)
    with torch.no_grad(), capture(nanogpt, strategy=strategy) as cap:
        nanogpt(x)
    assert cap.modules == ["blocks.0.attn", "blocks.1.attn"]
    want = "adapter:nanogpt-c_attn" if strategy == "adapter" else "intercept"
    assert cap.sites[0].strategy.startswith(want)
    assert_close_all(cap.attention, ref, f"nanogpt {strategy}")


def test_adapter_sees_the_precision_the_model_used(nanogpt):
    """Under autocast the adapter's q and k are the model's bfloat16 ones, as intercepted."""
    x = tokens()
    got = {}
    for strategy in ("intercept", "adapter"):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            with capture(nanogpt, strategy=strategy) as cap:
                nanogpt(x)
        got[strategy] = cap.attention
    assert_close_all(got["adapter"], got["intercept"].values(), "nanogpt autocast")


def test_nanogpt_manual_path_is_intercepted(nanogpt):
    x = tokens()
    nanogpt.set_flash(False)
    with torch.no_grad(), capture(nanogpt) as cap:
        nanogpt(x)
    assert_close_all(cap.attention, [b.attn.att for b in nanogpt.blocks], "nanogpt manual")


# --- modded-nanogpt: merged qkvo_w, QK RMS norm, rotary, flex_attention ------------------------


class Rotary(nn.Module):
    """Rotates the two halves of each head's channels by position-dependent angles."""

    def __init__(self, head_dim: int, max_len: int):
        super().__init__()
        half = head_dim // 2
        freq = 1.0 / (1000.0 ** (torch.arange(half, dtype=torch.float32) / half))
        angle = torch.outer(torch.arange(max_len, dtype=torch.float32), freq)
        self.register_buffer("cos", angle.cos(), persistent=False)
        self.register_buffer("sin", angle.sin(), persistent=False)

    def forward(self, x):  # (B, T, H, D)
        cos = self.cos[None, : x.size(-3), None, :]
        sin = self.sin[None, : x.size(-3), None, :]
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).type_as(x)


class MergedAttention(nn.Module):
    def __init__(self, dim=32, num_heads=4, max_len=64):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkvo_w = nn.Parameter(torch.randn(4, dim, dim) / math.sqrt(dim))
        self.rotary = Rotary(self.head_dim, max_len)
        self.attn_scale = 0.12

    def forward(self, x, block_mask):
        from torch.nn.attention.flex_attention import flex_attention

        B, T = x.shape[:2]
        q, k, v = (
            F.linear(x, self.qkvo_w[:3].flatten(end_dim=1))
            .view(B, T, 3 * self.num_heads, self.head_dim)
            .chunk(3, dim=-2)
        )
        q = F.rms_norm(q, (q.size(-1),))
        k = F.rms_norm(k, (k.size(-1),))
        q, k = self.rotary(q), self.rotary(k)
        y = flex_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            block_mask=block_mask, scale=self.attn_scale,
        )
        return F.linear(y.transpose(1, 2).reshape(B, T, -1), self.qkvo_w[3])


class MergedModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(MergedAttention() for _ in range(2))

    def forward(self, x, block_mask):
        for layer in self.layers:
            x = x + layer(x, block_mask)
        return x


def merged_reference(module: MergedAttention, x, mask):
    """A written out with an explicit softmax, q and k computed independently of the adapter;
    also returns the attention output, to be checked against the module's own output."""
    B, T, _ = x.shape
    H, D = module.num_heads, module.head_dim
    w_q, w_k, w_v, w_o = module.qkvo_w
    q = (x @ w_q.T).view(B, T, H, D)
    k = (x @ w_k.T).view(B, T, H, D)
    v = (x @ w_v.T).view(B, T, H, D).transpose(1, 2)
    q = q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True) + torch.finfo(q.dtype).eps)
    k = k * torch.rsqrt(k.pow(2).mean(-1, keepdim=True) + torch.finfo(k.dtype).eps)
    q, k = module.rotary(q).transpose(1, 2), module.rotary(k).transpose(1, 2)
    scores = (q @ k.transpose(-2, -1)) * module.attn_scale
    a = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    y = (a @ v).transpose(1, 2).reshape(B, T, -1) @ w_o.T
    return a, y


def window_block_mask(T: int, block: int, window_blocks: int):
    """A sliding window made of block lists (as modded-nanogpt builds it): causal ``mask_mod``
    on the diagonal block, ``window_blocks - 1`` full blocks before it, nothing further back."""
    from torch.nn.attention.flex_attention import BlockMask

    n = T // block
    kv_num = torch.ones(1, 1, n, dtype=torch.int32)
    kv_idx = torch.zeros(1, 1, n, n, dtype=torch.int32)
    kv_idx[0, 0, :, 0] = torch.arange(n, dtype=torch.int32)
    full_num = torch.zeros(1, 1, n, dtype=torch.int32)
    full_idx = torch.zeros(1, 1, n, n, dtype=torch.int32)
    for i in range(n):
        before = list(range(i - 1, max(-1, i - window_blocks), -1))
        full_num[0, 0, i] = len(before)
        full_idx[0, 0, i, : len(before)] = torch.tensor(before, dtype=torch.int32)
    bm = BlockMask.from_kv_blocks(
        kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block,
        mask_mod=lambda b, h, q, kv: q >= kv,
    )
    pos = torch.arange(T)
    dense = (pos[:, None] >= pos[None, :]) & (
        pos[:, None] // block - pos[None, :] // block < window_blocks
    )
    return bm, dense


def merged_case(kind: str, B: int, T: int):
    """(BlockMask, boolean (B or 1, 1, T, T) mask it stands for)."""
    from torch.nn.attention.flex_attention import create_block_mask

    pos = torch.arange(T)
    causal = pos[:, None] >= pos[None, :]
    if kind == "causal":
        bm = create_block_mask(lambda b, h, q, kv: q >= kv, None, None, T, T, device="cpu",
                               BLOCK_SIZE=16)
        return bm, causal[None, None]
    if kind == "window":
        w = 7
        bm = create_block_mask(lambda b, h, q, kv: (q >= kv) & (q - kv < w), None, None, T, T,
                               device="cpu", BLOCK_SIZE=16)
        return bm, (causal & (pos[:, None] - pos[None, :] < w))[None, None]
    if kind == "documents":  # per-sequence document boundaries: mask_mod depends on b
        docs = torch.zeros(B, T, dtype=torch.long)
        docs[0, 11:] = 1
        docs[1, 5:] = 1
        docs[1, 29:] = 2
        bm = create_block_mask(
            lambda b, h, q, kv: (q >= kv) & (docs[b, q] == docs[b, kv]), B, None, T, T,
            device="cpu", BLOCK_SIZE=16,
        )
        return bm, (causal & (docs[:, :, None] == docs[:, None, :]))[:, None]
    if kind == "heads":  # a different mask per head
        bm = create_block_mask(lambda b, h, q, kv: (q >= kv) & ((h % 2 == 0) | (q - kv < 5)),
                               None, 4, T, T, device="cpu", BLOCK_SIZE=16)
        heads = torch.arange(4)[:, None, None]
        return bm, (causal & ((heads % 2 == 0) | (pos[:, None] - pos[None, :] < 5)))[None]
    if kind == "block-window":
        bm, dense = window_block_mask(T, 8, 2)
        return bm, dense[None, None]
    raise ValueError(kind)


@pytest.fixture(scope="module")
def merged_model():
    torch.manual_seed(0)
    return MergedModel().eval()


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("kind", ["causal", "window", "documents", "heads", "block-window"])
def test_merged_qkvo_adapter(merged_model, kind):
    B, T = 2, 48
    x = torch.randn(B, T, 32, generator=torch.Generator().manual_seed(2))
    block_mask, dense = merged_case(kind, B, T)
    with torch.no_grad(), capture(merged_model) as cap:
        merged_model(x, block_mask)
    assert [s.strategy for s in cap.sites] == ["adapter:merged-qkvo"] * 2
    layer = merged_model.layers[0]
    with torch.no_grad():
        want, y_ref = merged_reference(layer, x, dense)
        y = layer(x, block_mask)
    if kind != "block-window":
        # the reference is what flex_attention computed: same output. (Unfused, as on CPU
        # without torch.compile, flex_attention applies mask_mod alone and ignores which blocks
        # the BlockMask lists; the compiled kernels visit only the listed blocks, which is what
        # the adapter follows and the block-window case checks.)
        assert (y - y_ref).abs().max() < 1e-5
    err = max_error(cap.attention["layers.0"], want)
    print(f"max-error merged-qkvo {kind}: {err:.3g}")
    assert err <= TOL
    # cropped: the prefix's attention, for the first sequence only
    with torch.no_grad(), capture(merged_model, max_tokens=20, max_sequences=1) as cap:
        merged_model(x, block_mask)
    assert max_error(cap.attention["layers.0"], want[:1, :, :20, :20]) <= TOL


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_merged_qkvo_forced_interception_says_why(merged_model):
    block_mask, _ = merged_case("causal", 2, 16)
    with pytest.raises(CaptureError, match="strategy='auto'"):
        with torch.no_grad(), capture(merged_model, strategy="intercept"):
            merged_model(torch.randn(2, 16, 32), block_mask)
    assert no_hooks_left(merged_model)


# --- torch.nn.MultiheadAttention and nn.TransformerEncoderLayer ------------------------------


def mha_masks(kind: str, B: int, L: int, H: int):
    g = torch.Generator().manual_seed(3)
    padding = attn_mask = None
    if kind in ("padding", "padding+bool"):
        padding = torch.zeros(B, L, dtype=torch.bool)
        padding[1, 6:] = True  # True = ignore this key
    if kind in ("bool", "padding+bool"):
        attn_mask = torch.rand(L, L, generator=g) < 0.3
        attn_mask.fill_diagonal_(False)
    if kind == "float":
        attn_mask = torch.randn(L, L, generator=g)
        attn_mask[torch.rand(L, L, generator=g) < 0.3] = float("-inf")
        attn_mask.fill_diagonal_(0.0)
    if kind == "float3d":
        attn_mask = torch.randn(B * H, L, L, generator=g)
    return padding, attn_mask


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kind", ["none", "padding", "bool", "float", "float3d", "padding+bool"])
def test_multihead_attention(batch_first, kind):
    torch.manual_seed(0)
    B, L, E, H = 3, 10, 32, 4
    mha = nn.MultiheadAttention(E, H, batch_first=batch_first)
    x = torch.randn(B, L, E) if batch_first else torch.randn(L, B, E)
    padding, attn_mask = mha_masks(kind, B, L, H)
    with capture(mha) as cap:
        mha(x, x, x, key_padding_mask=padding, attn_mask=attn_mask, need_weights=False)
    assert cap.modules == [""]
    _, want = mha(x, x, x, key_padding_mask=padding, attn_mask=attn_mask,
                  need_weights=True, average_attn_weights=False)
    err = max_error(cap.attention[""], want)
    print(f"max-error multihead-attention {kind} batch_first={batch_first}: {err:.3g}")
    assert err <= TOL


def ran_op(name: str, fn) -> bool:
    """Whether ``fn()`` dispatched the aten operator ``name`` (to see fused fast paths run)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return any(e.name == name for e in prof.events())


@pytest.mark.parametrize("kind", ["none", "padding"])
def test_multihead_attention_fast_path(kind):
    torch.manual_seed(0)
    B, L, E, H = 3, 10, 32, 4
    mha = nn.MultiheadAttention(E, H, batch_first=True).eval()
    x = torch.randn(B, L, E)
    padding, _ = mha_masks(kind, B, L, H)
    with torch.no_grad(), capture(mha) as cap:
        fused = ran_op(
            "aten::_native_multi_head_attention",
            lambda: mha(x, x, x, key_padding_mask=padding, need_weights=False),
        )
        _, want = mha(x, x, x, key_padding_mask=padding, average_attn_weights=False)
    assert fused, "the fused fast path did not run"
    assert max_error(cap.attention[""], want) <= TOL


class EncoderStack(nn.Module):
    def __init__(self, norm_first: bool, batch_first: bool = True, dropout: float = 0.1):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(32, 4, 64, dropout=dropout, batch_first=batch_first,
                                       norm_first=norm_first)
            for _ in range(2)
        )

    def forward(self, x, padding=None):
        for layer in self.layers:
            x = layer(x, src_key_padding_mask=padding)
        return x


def encoder_reference(stack: EncoderStack, x, padding):
    """Each layer's self-attention weights on the input its self_attn actually sees."""
    out = []
    for layer in stack.layers:
        h = layer.norm1(x) if layer.norm_first else x
        attn, training = layer.self_attn, layer.self_attn.training
        attn.eval()  # weights before dropout, and no random numbers drawn
        try:
            out.append(attn(h, h, h, key_padding_mask=padding, average_attn_weights=False)[1])
        finally:
            attn.train(training)
        x = layer(x, src_key_padding_mask=padding)
    return out


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("train", [True, False])
def test_transformer_encoder_layer(norm_first, train):
    torch.manual_seed(0)
    stack = EncoderStack(norm_first).train(train)
    x = torch.randn(3, 10, 32)
    padding = torch.zeros(3, 10, dtype=torch.bool)
    padding[2, 7:] = True
    assert [n for n, _ in find_attention_modules(stack)] == ["layers.0", "layers.1"]
    torch.manual_seed(5)
    if train:
        with capture(stack) as cap:
            stack(x, padding)
    else:
        with torch.no_grad(), capture(stack) as cap:
            fused = ran_op("aten::_transformer_encoder_layer_fwd", lambda: stack(x, padding))
        assert fused, "the fused fast path did not run"
    # the layer's input in train mode depends on dropout: replay it with the same seed
    torch.manual_seed(5)
    with torch.no_grad():
        want = encoder_reference(stack, x, padding)
    assert_close_all(cap.attention, want, f"encoder-layer norm_first={norm_first} train={train}")


def test_fused_fast_paths_still_run_and_outputs_unchanged():
    torch.manual_seed(0)
    stack = EncoderStack(norm_first=False).eval()
    mha = nn.MultiheadAttention(32, 4, batch_first=True).eval()
    x = torch.randn(3, 10, 32)
    padding = torch.zeros(3, 10, dtype=torch.bool)
    padding[1, 6:] = True
    cases = [
        (stack, "aten::_transformer_encoder_layer_fwd", lambda: stack(x, padding)),
        (mha, "aten::_native_multi_head_attention",
         lambda: mha(x, x, x, key_padding_mask=padding, need_weights=False)[0]),
    ]
    for model, op, run in cases:
        with torch.no_grad():
            plain = run()
            out = []
            with capture(model) as cap:
                assert ran_op(op, lambda: out.append(run())), f"{op} did not run under capture"
        assert torch.equal(plain, out[0])
        assert len(cap.attention) == len(cap.modules) > 0
        assert no_hooks_left(model)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_transformer_encoder_nested_fast_path():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True)
    encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True).eval()
    x = torch.randn(3, 10, 32)
    padding = torch.zeros(3, 10, dtype=torch.bool)
    padding[1, 6:] = True
    padding[2, 8:] = True
    with torch.no_grad(), capture(encoder) as cap:
        encoder(x, src_key_padding_mask=padding)
    # reference: the same layers, slow path, padded positions zeroed as the nested path does
    with torch.no_grad():
        h = x.masked_fill(padding[..., None], 0.0)
        want = []
        for lyr in encoder.layers:
            want.append(lyr.self_attn(h, h, h, key_padding_mask=padding,
                                      average_attn_weights=False)[1])
            h = lyr(h, src_key_padding_mask=padding).masked_fill(padding[..., None], 0.0)
    real = ~padding[:, None, :, None]  # rows of padding queries are meaningless
    got = [a * real for a in cap.attention.values()]
    assert_close_all(dict(enumerate(got)), [w * real for w in want], "encoder nested")


# --- the real trained model ------------------------------------------------------------------


@pytest.mark.skipif(not FIXTURE.exists(), reason=FIXTURE_MISSING)
def test_stories260k_matches_eager():
    pytest.importorskip("transformers")
    from attn_probe.models.llama2c import load_llama2c
    from attn_probe.models.sampling import sample_tokens

    model = load_llama2c(FIXTURE, attn_implementation="sdpa")
    eager = load_llama2c(FIXTURE, attn_implementation="eager")
    x = sample_tokens(model, 2, 24, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), capture(model) as cap:
        model(x)
    assert len(cap.modules) == model.config.num_hidden_layers
    with torch.no_grad(), capture(eager) as cap_eager:  # eager: softmax interception
        ref = eager(x, output_attentions=True).attentions
    assert_close_all(cap_eager.attention, ref, "stories260K eager softmax")
    # Layer 0 is exact; deeper layers differ by a few 1e-6 because the two models' hidden states
    # drift apart (the SDPA kernel and eager attention round differently), not by the capture.
    assert max_error(cap.attention["model.layers.0.self_attn"], ref[0]) <= 1e-6
    assert_close_all(cap.attention, ref, "stories260K")
    with torch.no_grad(), capture(model, max_tokens=20) as cap:
        model(x)
    with torch.no_grad():
        ref = eager(x[:, :20], output_attentions=True).attentions
    assert_close_all(cap.attention, ref, "stories260K cropped")


# --- cropping --------------------------------------------------------------------------------


def test_causal_cropping_equals_prefix(gpt2, llama, nanogpt):
    x = tokens(t=16)
    for name, (model, eager) in {"gpt2": gpt2, "llama": llama}.items():
        with torch.no_grad(), capture(model, max_tokens=7) as cap:
            model(x)
        assert all(a.shape[-2:] == (7, 7) for a in cap.attention.values())
        with torch.no_grad():
            ref = eager(x[:, :7], output_attentions=True).attentions
        assert_close_all(cap.attention, ref, f"{name} cropped")
        rows = torch.stack(list(cap.attention.values())).sum(-1)
        torch.testing.assert_close(rows, torch.ones_like(rows))
    ref = nano_reference(nanogpt, x[:, :7])
    for strategy in ("intercept", "adapter"):
        with torch.no_grad(), capture(nanogpt, max_tokens=7, strategy=strategy) as cap:
            nanogpt(x)
        assert_close_all(cap.attention, ref, f"nanogpt cropped {strategy}")


def test_max_sequences_keeps_first_sequences(gpt2, nanogpt):
    x = tokens(b=5)
    for model in (gpt2[0], nanogpt):
        for strategy in ("intercept", "adapter") if model is nanogpt else ("auto",):
            with torch.no_grad(), capture(model, strategy=strategy) as full:
                model(x)
            with torch.no_grad(), capture(model, max_sequences=2, strategy=strategy) as few:
                model(x)
            for name, a in few.attention.items():
                assert a.shape[0] == 2
                assert torch.equal(a, full.attention[name][:2])


def test_bidirectional_cropping_is_top_left_of_true_probabilities(bert):
    model, eager = bert
    x = tokens()
    mask = torch.ones_like(x)
    mask[1, 9:] = 0
    with torch.no_grad(), capture(model, max_tokens=5) as cap:
        model(x, attention_mask=mask)
    with torch.no_grad():
        ref = eager(x, attention_mask=mask, output_attentions=True).attentions
    assert_close_all(cap.attention, [r[:, :, :5, :5] for r in ref], "bert cropped")
    # rows are the model's probabilities over all keys, so they need not sum to 1
    assert (next(iter(cap.attention.values())).sum(-1) < 1 - 1e-3).all()


# --- capturing changes nothing -------------------------------------------------------------


def make_gpt2():
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel._from_config(gpt2_config(), attn_implementation="sdpa")


def make_nanogpt_manual():
    torch.manual_seed(0)
    model = NanoGPT(dropout=0.2)
    model.set_flash(False)
    return model


def make_nanogpt_flash():
    torch.manual_seed(0)
    return NanoGPT(dropout=0.2)


def make_encoder():
    torch.manual_seed(0)
    return EncoderStack(norm_first=True, dropout=0.2)


def run_once(model, x, train: bool, with_capture: bool):
    model.train(train)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(123)
    if with_capture:
        with capture(model) as cap:
            out = model(x)
        assert cap.attention
    else:
        out = model(x)
    out = out.logits if hasattr(out, "logits") else out
    out.square().mean().backward()
    rng = torch.get_rng_state()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), grads, rng


@pytest.mark.parametrize(
    "make", [make_gpt2, make_nanogpt_manual, make_nanogpt_flash, make_encoder],
    ids=["gpt2", "nanogpt-manual", "nanogpt-flash", "encoder-layer"],
)
@pytest.mark.parametrize("train", [True, False])
def test_capture_changes_nothing(make, train):
    model = make()
    if make is make_encoder:
        x = torch.randn(3, 10, 32, generator=torch.Generator().manual_seed(0))
    else:
        x = tokens()
    out0, grads0, rng0 = run_once(model, x, train, with_capture=False)
    out1, grads1, rng1 = run_once(model, x, train, with_capture=True)
    assert torch.equal(out0, out1)
    assert torch.equal(rng0, rng1), "capturing consumed random numbers"
    assert grads0.keys() == grads1.keys() and grads0
    for name in grads0:
        assert torch.equal(grads0[name], grads1[name]), name
    assert no_hooks_left(model)


# --- discovery -------------------------------------------------------------------------------


def test_discovery_finds_exactly_the_attention_modules(gpt2, llama, bert, nanogpt, merged_model):
    names = lambda m: [n for n, _ in find_attention_modules(m)]  # noqa: E731
    assert names(gpt2[0]) == ["transformer.h.0.attn", "transformer.h.1.attn"]
    assert names(llama[0]) == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert names(bert[0]) == ["encoder.layer.0.attention.self", "encoder.layer.1.attention.self"]
    assert names(nanogpt) == ["blocks.0.attn", "blocks.1.attn"]
    assert names(merged_model) == ["layers.0", "layers.1"]
    mixed = nn.ModuleDict({"mha": nn.MultiheadAttention(8, 2), "enc": EncoderStack(False)})
    assert names(mixed) == ["mha", "enc.layers.0", "enc.layers.1"]


def test_discovery_selectors(gpt2):
    model = gpt2[0]
    pick = lambda sel: [n for n, _ in find_attention_modules(model, sel)]  # noqa: E731
    assert pick("transformer.h.1.attn") == ["transformer.h.1.attn"]
    assert pick(["transformer.h.0.attn", "transformer.h.1.attn"]) == [
        "transformer.h.0.attn", "transformer.h.1.attn"]
    assert pick("transformer.h.*.attn") == ["transformer.h.0.attn", "transformer.h.1.attn"]
    assert pick(lambda n, m: n.endswith("0.attn")) == ["transformer.h.0.attn"]
    x = tokens()
    with torch.no_grad(), capture(model, modules="transformer.h.1.attn") as cap:
        model(x)
    assert list(cap.attention) == ["transformer.h.1.attn"]
    with pytest.raises(LookupError, match="nope"):
        find_attention_modules(model, "nope.*")


def test_nothing_found_says_what_was_searched_for():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with pytest.raises(LookupError) as info:
        capture(model)
    message = str(info.value)
    assert "searched for" in message and "Attention" in message and "register_adapter" in message


class ExpAttention(nn.Module):
    """Attention normalised by hand (exp / sum): no kernel call that can be intercepted."""

    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.heads = heads
        self.wq, self.wk, self.wv = (nn.Linear(dim, dim) for _ in range(3))
        self.weights = None

    def scores(self, x):
        B, T, C = x.shape
        q = self.wq(x).view(B, T, self.heads, -1).transpose(1, 2)
        k = self.wk(x).view(B, T, self.heads, -1).transpose(1, 2)
        return q, k, (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))

    def forward(self, x):
        B, T, C = x.shape
        _, _, s = self.scores(x)
        e = torch.exp(s - s.amax(-1, keepdim=True))
        self.weights = (e / e.sum(-1, keepdim=True)).detach()
        v = self.wv(x).view(B, T, self.heads, -1).transpose(1, 2)
        return (self.weights @ v).transpose(1, 2).reshape(B, T, C)


def exp_adapter(module, args, kwargs, *, max_sequences, max_tokens):
    q, k, _ = module.scores(args[0])
    return attention_probabilities(q, k, max_sequences=max_sequences, max_tokens=max_tokens)


def test_unservable_module_and_register_adapter():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), ExpAttention())
    x = torch.randn(2, 5, 16)
    assert [n for n, _ in find_attention_modules(model)] == ["1"]
    with pytest.raises(CaptureError, match="register_adapter") as info:
        with capture(model):
            model(x)
    assert "'1'" in str(info.value) and "ExpAttention" in str(info.value)
    assert no_hooks_left(model)
    try:
        register_adapter(ExpAttention, exp_adapter)
        assert find_adapter(model[1]) is not None
        with torch.no_grad(), capture(model) as cap:
            model(x)
        assert cap.sites[0].strategy == "adapter:registered:ExpAttention"
        assert max_error(cap.attention["1"], model[1].weights) <= TOL
        # a registered class is found by discovery even without an attention-like name
        Renamed = type("Mixer", (ExpAttention,), {})
        assert [n for n, _ in find_attention_modules(nn.Sequential(Renamed()))] == ["0"]
    finally:
        register_adapter(ExpAttention, None)
    assert find_adapter(model[1]) is None
    with pytest.raises(CaptureError):
        with capture(model):
            model(x)


def test_register_adapter_rejects_bad_arguments():
    with pytest.raises(TypeError):
        register_adapter(int, exp_adapter)
    with pytest.raises(TypeError):
        register_adapter(ExpAttention, "not callable")


def test_invalid_arguments(gpt2):
    with pytest.raises(ValueError):
        capture(gpt2[0], max_tokens=0)
    with pytest.raises(ValueError):
        capture(gpt2[0], strategy="magic")
    with pytest.raises(TypeError):
        capture("not a module")
    with pytest.raises(CaptureError, match="no adapter"):
        capture(gpt2[0], strategy="adapter")


# --- several calls in one capture; cleanup ----------------------------------------------------


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


def test_nothing_left_behind_when_forward_raises(nanogpt):
    x = tokens()
    nanogpt.blocks[1].attn.fail_after_attention = True
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no silenced hook errors either
        with pytest.raises(ValueError, match="on purpose"):
            with capture(nanogpt) as cap:
                nanogpt(x)
    assert no_hooks_left(nanogpt)
    assert list(cap.attention) == ["blocks.0.attn"]
    nanogpt.blocks[1].attn.fail_after_attention = False
    with pytest.raises(KeyError):
        with capture(nanogpt):
            nanogpt(x)
            raise KeyError("raised in the block")
    assert no_hooks_left(nanogpt)
    with torch.no_grad():
        nanogpt(x)  # still a working model


# --- fully masked rows --------------------------------------------------------------------------


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
    with torch.no_grad(), capture(module, modules="") as cap:
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


# --- metrics over captured matrices (when that module exists) ---------------------------------


def test_capture_metrics(gpt2):
    pytest.importorskip("attn_probe.metrics")
    model = gpt2[0]
    with torch.no_grad(), capture(model) as cap:
        model(tokens())
    from attn_probe.metrics import head_metrics

    metrics = cap.metrics(tau=0.9)
    assert list(metrics) == cap.modules
    for name, per_head in metrics.items():
        want = head_metrics(cap.attention[name], 0.9)
        assert per_head.keys() == want.keys() >= {"rank", "columns", "entropy", "sink"}
        for key, value in per_head.items():
            assert value.shape == (3, 4)
            torch.testing.assert_close(value, want[key], equal_nan=True)
