"""The demo GPT (attn_probe.models.gpt), and the tests' float64 reference of its attention.

reference.GPTAttention is what the probe, protocol, integration and distributed tests compare
with; here it is checked against the model itself: its A, applied to the model's own v and
output projection, must give back what each attention module returned.
"""

from __future__ import annotations

import torch

from reference import GPTAttention, gpt_attention
from toy_models import small_gpt


def test_reference_attention_reproduces_each_attention_module_output():
    model = small_gpt(seed=2).eval()
    with torch.no_grad():  # sharper attention than the initialisation gives
        for block in model.transformer.h:
            block.attn.c_attn.weight.mul_(10.0)
    tokens = torch.randint(0, 64, (3, 20), generator=torch.Generator().manual_seed(0))
    inputs, outputs = {}, {}

    def keep(index):
        def hook(module, args, out):
            inputs[index], outputs[index] = args[0], out
        return hook

    hooks = [block.attn.register_forward_hook(keep(i))
             for i, block in enumerate(model.transformer.h)]
    try:
        attentions = gpt_attention(model, tokens)
    finally:
        for hook in hooks:
            hook.remove()
    for i, block in enumerate(model.transformer.h):
        a = attentions[i]
        b, t, c = inputs[i].shape
        heads = block.attn.n_head
        assert a.shape == (b, heads, t, t) and a.dtype == torch.float64
        torch.testing.assert_close(a.sum(-1), torch.ones(b, heads, t, dtype=torch.float64))
        assert (a.triu(1) == 0).all()  # causal
        v = torch.nn.functional.linear(inputs[i].double(), block.attn.c_attn.weight.double(),
                                       block.attn.c_attn.bias.double())[..., 2 * c:]
        v = v.view(b, t, heads, c // heads).transpose(1, 2)
        y = (a @ v).transpose(1, 2).reshape(b, t, c)
        y = torch.nn.functional.linear(y, block.attn.c_proj.weight.double(),
                                       block.attn.c_proj.bias.double())
        torch.testing.assert_close(y.float(), outputs[i], rtol=1e-4, atol=1e-5)
        assert a.amax(-1).mean() > 0.3  # not near-uniform: the check has teeth


def test_reference_records_one_entry_per_forward_and_crops():
    model = small_gpt().eval()
    tokens = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    with GPTAttention(model, batch_rows=2, crop=5) as ref, torch.no_grad():
        model(tokens)
        model(tokens[:, :10])
    assert len(ref.calls) == 2 and sorted(ref.calls[0]) == [0, 1]
    full = gpt_attention(model, tokens)
    for layer in range(2):
        assert ref.calls[0][layer].shape == (2, 4, 5, 5)
        # causal: the first 5 tokens' attention is the top-left corner of the full one
        torch.testing.assert_close(ref.calls[0][layer], full[layer][:2, :, :5, :5])
        torch.testing.assert_close(ref.calls[1][layer], ref.calls[0][layer])
    assert all(not block.attn._forward_pre_hooks for block in model.transformer.h)
