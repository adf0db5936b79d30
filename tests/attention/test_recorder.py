"""The recorder: interception of the kernel calls (SDPA and eager softmax) in real model families,
first call recorded, nothing changed in the model's computation, nothing left behind."""

from __future__ import annotations

import copy
import warnings

import pytest
from extras_rule import extra
import torch
from torch import nn

from attn_probe import CaptureOptions, capture
from reference import FIXTURE, no_hooks_left
from toy_models import (
    padding_zeroed,
    EncoderStack,
    NanoGPT,
    assert_close_all,
    nano_reference,
    gpt2_config,
    max_error,
    ran_op,
    tokens,
    transformers,
)


# --- Hugging Face models --------------------------------------------------------------------------


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
    assert_close_all(cap.attention, [padding_zeroed(r, mask) for r in ref], "gpt2 padded")


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
    assert_close_all(cap.attention, [padding_zeroed(r, mask) for r in ref], "llama left-padded")
    # input positions: sequence 1's 5 padding tokens are zero rows and columns in front
    a = cap.attention["model.layers.0.self_attn"]
    assert a.shape[-1] == 12 and a[1, :, :5].abs().max() == 0 and a[1, :, :, :5].abs().max() == 0
    torch.testing.assert_close(a[1, :, 5:].sum(-1), torch.ones(4, 7))


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
    assert_close_all(cap.attention, [padding_zeroed(r, mask) for r in ref], "bert padded")
    a = cap.attention["encoder.layer.0.attention.self"]
    assert a[2, :, :, 3:].abs().max() == 0 and a[2, :, 3:].abs().max() == 0
    real_rows = torch.arange(12) < mask.sum(1, keepdim=True)  # (3, 12): padding rows are zero
    torch.testing.assert_close(a.sum(-1), real_rows[:, None].expand(3, 4, 12).float())


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
    assert_close_all(cap.attention, [padding_zeroed(r, mask) for r in ref],
                     f"{family} eager softmax")


# --- nanoGPT --------------------------------------------------------------------------------------


def test_nanogpt_manual_path_is_intercepted(nanogpt):
    x = tokens()
    nanogpt.set_flash(False)
    with torch.no_grad(), capture(nanogpt) as cap:
        nanogpt(x)
    assert_close_all(cap.attention, [b.attn.att for b in nanogpt.blocks], "nanogpt manual")


# --- fused fast paths -----------------------------------------------------------------------------


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


# --- the real trained model -----------------------------------------------------------------------


def test_stories260k_matches_eager():
    extra("transformers")
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
    with torch.no_grad(), capture(model, CaptureOptions(batch_rows=None, crop=20)) as cap:
        model(x)
    with torch.no_grad():
        ref = eager(x[:, :20], output_attentions=True).attentions
    assert_close_all(cap.attention, ref, "stories260K cropped")


# --- capturing changes nothing --------------------------------------------------------------------


def make_gpt2():
    extra("transformers")
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


# --- cleanup --------------------------------------------------------------------------------------


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


@pytest.mark.parametrize("strategy", ["intercept", "adapter"])
def test_a_shallow_copy_of_a_monitored_module_is_not_measured(nanogpt, strategy):
    """``copy.copy`` of a monitored attention module shares its hook dictionaries: run while
    the capture is armed, before the model, it is neither measured nor counted, and the model's
    own layer is measured as if it were alone."""
    x = tokens()
    want = nano_reference(nanogpt, x)
    attn = nanogpt.blocks[0].attn
    with torch.no_grad(), capture(
        nanogpt, CaptureOptions(batch_rows=None, crop=None, strategy=strategy),
    ) as cap:
        twin = copy.copy(attn)
        assert twin._forward_pre_hooks is attn._forward_pre_hooks  # the hooks fire for it
        twin(torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(4)))
        nanogpt(x)
    assert_close_all(cap.attention, want, "nanogpt beside a shallow copy")
    assert cap.calls == {"blocks.0.attn": 1, "blocks.1.attn": 1}
    assert no_hooks_left(nanogpt)
