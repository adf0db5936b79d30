"""Adapters: A rebuilt from a module's input and its own weights (nanoGPT, modded-nanogpt's
merged qkvo with flex_attention, nn.MultiheadAttention, nn.TransformerEncoderLayer, registered
adapters), and the choice between adapter and interception."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from attn_probe import CaptureOptions, capture
from attn_probe.attention import CaptureError, find_attention_modules, register_adapter
from attn_probe.attention.adapters import find_adapter
from reference import no_hooks_left
from toy_models import (
    TOL,
    EncoderStack,
    ExpAttention,
    MergedAttention,
    assert_close_all,
    exp_adapter,
    max_error,
    nano_reference,
    ran_op,
    tokens,
    padding_zeroed,
)


# --- nanoGPT --------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["auto", "intercept", "adapter"])
def test_nanogpt_flash_matches_manual_softmax(nanogpt, strategy):
    x = tokens()
    ref = nano_reference(nanogpt, x)
    with torch.no_grad(), capture(
        nanogpt, CaptureOptions(batch_rows=None, crop=None, strategy=strategy),
    ) as cap:
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
            with capture(
                nanogpt, CaptureOptions(batch_rows=None, crop=None, strategy=strategy),
            ) as cap:
                nanogpt(x)
        got[strategy] = cap.attention
    assert_close_all(got["adapter"], got["intercept"].values(), "nanogpt autocast")


# --- modded-nanogpt: merged qkvo_w, QK RMS norm, rotary, flex_attention ---------------------------


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
    with torch.no_grad(), capture(merged_model, CaptureOptions(batch_rows=1, crop=20)) as cap:
        merged_model(x, block_mask)
    assert max_error(cap.attention["layers.0"], want[:1, :, :20, :20]) <= TOL


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_merged_qkvo_intercepted_like_the_adapter(merged_model):
    """strategy='intercept' sees the module's flex_attention call itself: the same matrices as
    the adapter's and the reference's."""
    B, T = 2, 48
    x = torch.randn(B, T, 32, generator=torch.Generator().manual_seed(4))
    block_mask, dense = merged_case("documents", B, T)
    with torch.no_grad(), capture(
            merged_model, CaptureOptions(batch_rows=None, crop=None, strategy="intercept"),
    ) as cap:
        merged_model(x, block_mask)
    assert [s.strategy for s in cap.sites] == ["intercept"] * 2
    with torch.no_grad():
        want, _ = merged_reference(merged_model.layers[0], x, dense)
    assert max_error(cap.attention["layers.0"], want) <= TOL
    assert no_hooks_left(merged_model)


# --- torch.nn.MultiheadAttention and nn.TransformerEncoderLayer -----------------------------------


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
    if padding is not None:  # padding is left out of what is measured
        want = padding_zeroed(want, ~padding)
    err = max_error(cap.attention[""], want)
    print(f"max-error multihead-attention {kind} batch_first={batch_first}: {err:.3g}")
    assert err <= TOL


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
    if padding is not None:
        want = padding_zeroed(want, ~padding)
    assert max_error(cap.attention[""], want) <= TOL


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
        want = [padding_zeroed(a, ~padding) for a in encoder_reference(stack, x, padding)]
    assert_close_all(cap.attention, want, f"encoder-layer norm_first={norm_first} train={train}")


# --- registered adapters --------------------------------------------------------------------------


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
    handle = register_adapter(ExpAttention, exp_adapter)
    try:
        assert find_adapter(model[1]) is not None
        with torch.no_grad(), capture(model) as cap:
            model(x)
        assert cap.sites[0].strategy == "adapter:registered:ExpAttention"
        assert max_error(cap.attention["1"], model[1].weights) <= TOL
        # a registered class is found by discovery even without an attention-like name
        Renamed = type("Mixer", (ExpAttention,), {})
        assert [n for n, _ in find_attention_modules(nn.Sequential(Renamed()))] == ["0"]
    finally:
        handle.remove()
    assert find_adapter(model[1]) is None
    with pytest.raises(CaptureError):
        with capture(model):
            model(x)


def test_register_adapter_rejects_bad_arguments():
    with pytest.raises(TypeError):
        register_adapter(int, exp_adapter)
    with pytest.raises(TypeError):
        register_adapter(ExpAttention, "not callable")


def test_register_adapter_handle_and_replace():
    module = ExpAttention()

    def other_adapter(module, args, kwargs, *, batch_rows, crop):
        return exp_adapter(module, args, kwargs, batch_rows=batch_rows,
                           crop=crop)

    first = register_adapter(ExpAttention, exp_adapter)
    try:
        assert find_adapter(module).fn is exp_adapter
        with pytest.raises(ValueError, match="replace=True"):
            register_adapter(ExpAttention, other_adapter)
        assert find_adapter(module).fn is exp_adapter  # the refused one changed nothing
        second = register_adapter(ExpAttention, other_adapter, replace=True)
        assert find_adapter(module).fn is other_adapter
        first.remove()  # a replaced registration's handle leaves the new one alone
        assert find_adapter(module).fn is other_adapter
        second.remove()
        assert find_adapter(module) is None
        second.remove()  # idempotent
        with register_adapter(ExpAttention, exp_adapter):
            assert find_adapter(module).fn is exp_adapter
        assert find_adapter(module) is None
    finally:  # leave no registration behind, whatever failed
        register_adapter(ExpAttention, exp_adapter, replace=True).remove()
