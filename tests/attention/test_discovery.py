"""Discovery: which modules of a model are attention modules, by default and by selector."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from attn_probe import CaptureOptions, capture
from attn_probe.attention import find_attention_modules
from toy_models import EncoderStack, tokens


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
    with torch.no_grad(), capture(
        model, CaptureOptions(batch_rows=None, crop=None, modules="transformer.h.1.attn"),
    ) as cap:
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
    # Python's words: modules=..., not the command line's --modules
    assert "modules=['name'" in message and "--modules" not in message


def test_nothing_found_names_the_modules_that_look_like_attention(gpt2):
    class Mixer(nn.Module):  # no kernel discovery can see, but named like attention
        def __init__(self):
            super().__init__()
            self.attn = nn.Linear(4, 4)

        def forward(self, x):
            return self.attn(x)

    with pytest.raises(LookupError) as info:
        find_attention_modules(nn.Sequential(Mixer(), nn.ReLU(), Mixer()))
    assert "look like attention: 0.attn (Linear), 2.attn (Linear)." in str(info.value)
    assert info.value.example == "*.attn"
    with pytest.raises(LookupError) as info:  # a selector that misses: what discovery finds
        find_attention_modules(gpt2[0], ["transformer.h.*.atn"])
    message = str(info.value)
    assert message.startswith(
        "modules=['transformer.h.*.atn'] matched no module of GPT2LMHeadModel")
    cls = type(gpt2[0].transformer.h[0].attn).__name__  # GPT2SdpaAttention in transformers 4
    assert (f"look like attention: transformer.h.0.attn ({cls}), transformer.h.1.attn "
            f"({cls})") in message
