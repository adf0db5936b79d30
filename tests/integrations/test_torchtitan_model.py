"""torchtitan's Llama3 debug model (built from its own config, random weights, on CPU) probed
with no adapter: every ``FlexAttention`` module is intercepted, and its matrices and figures
equal a float64 reference written out from each call's own query and key and from the packed
documents' positions. Forward passes only: ``flex_attention`` has no backward on CPU."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from extras_rule import extra

import attn_probe
from reference import flex_scores, no_hooks_left, score_figures

pytestmark = [
    pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile",
                               "ignore::DeprecationWarning"),
    pytest.mark.slow,
]

B, T, CROP = 2, 160, 48
RTOL = 1e-9


@pytest.fixture(scope="module")
def debug_model():
    extra("torchtitan")
    from torchtitan.models.llama3 import model_registry

    torch.manual_seed(0)
    model = model_registry("debugmodel").model.build()
    model.init_states()
    with torch.no_grad():  # sharper attention than at initialisation: decisions far from ties
        for block in model.layers.values():
            block.attention.qkv_linear.wqkv.weight.mul_(4.0)
    return model.eval()


def packed_batch():
    """Tokens and per-document positions (each sequence packs documents of its own lengths),
    the attention masks torchtitan builds from them, and the mask they stand for."""
    tokens = torch.randint(0, 2048, (B, T), generator=torch.Generator().manual_seed(1))
    lengths = ([70, 90], [25, 100, 35])
    positions = torch.stack([torch.cat([torch.arange(n) for n in seq]) for seq in lengths])
    documents = (positions == 0).cumsum(dim=1)
    pos = torch.arange(T)
    dense = (pos[:, None] >= pos[None, :]) & (documents[:, :, None] == documents[:, None, :])
    return tokens, positions, dense[:, None]


def calls_of(model):
    """Forward pre-hooks that keep what each ``FlexAttention`` module is called with."""
    calls, handles = {}, []
    for name, module in model.named_modules():
        if type(module).__name__ == "FlexAttention":
            def keep(module, args, kwargs, name=name):
                calls[name] = (args[0].detach().clone(), args[1].detach().clone(),
                               kwargs.get("scale"))
            handles.append(module.register_forward_pre_hook(keep, with_kwargs=True))
    return calls, handles


def test_debug_model_measured_exactly_without_adapter(debug_model):
    model = debug_model
    tokens, positions, dense = packed_batch()
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):
        masks = model.get_attention_masks(positions)  # torchtitan compiles create_block_mask
        calls, handles = calls_of(model)
        try:
            plain = model(tokens, positions, masks)
        finally:
            for handle in handles:
                handle.remove()
    with torch.no_grad(), attn_probe.capture(model, max_tokens=CROP) as cap:
        out = model(tokens, positions, masks)
    assert torch.equal(out, plain)
    assert len(cap.modules) == 6
    assert all(s.strategy == "intercept" for s in cap.sites)
    assert no_hooks_left(model)
    figures = cap.metrics()
    for name in cap.modules:
        q, k, scale = calls[name.removesuffix(".inner_attention") + ".inner_attention"]
        head_dim = q.size(-1)
        scores = flex_scores(q.transpose(1, 2), k.transpose(1, 2),
                             scale=1 / math.sqrt(head_dim) if scale is None else scale,
                             allowed=dense)
        prefix = torch.softmax(scores[:, :, :CROP, :CROP], dim=-1)  # causal: the prefix's own
        torch.testing.assert_close(cap.attention[name].double(), prefix, rtol=0, atol=5e-6)
        want, got = score_figures(scores), figures[name]
        for ours, theirs in (("entropy_full", "entropy"), ("sink_full", "sink"),
                             ("max_logit", "max_logit"), ("logit_spread", "logit_spread")):
            torch.testing.assert_close(got[ours], want[theirs], rtol=RTOL, atol=1e-13)
        assert torch.equal(got["columns_full"], want["columns"]), name
        assert torch.equal(got["tokens_full"], want["tokens"]), name


def test_probe_logs_every_layer_of_the_debug_model(debug_model, tmp_path):
    """The probe in a loop: all six layers measured (no 'no kernel call' warning), each head's
    max logit that of the reference's first sequence."""
    import warnings

    model = debug_model
    tokens, positions, dense = packed_batch()
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):
        masks = model.get_attention_masks(positions)
    calls, handles = calls_of(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a site the probe cannot measure warns
        warnings.filterwarnings("ignore", "flex_attention called without torch.compile")
        with attn_probe.AttentionProbe(model, every=1, log_dir=str(tmp_path),
                                       max_tokens=CROP) as probe:
            with torch.no_grad():
                model(tokens, positions, masks)
            snapshot = probe.step()
    for handle in handles:
        handle.remove()
    assert len(snapshot.layers) == 6 and snapshot.has_data
    for layer in snapshot.layers:
        q, k, _ = calls[layer.name]
        scores = flex_scores(q[:1].transpose(1, 2), k[:1].transpose(1, 2),
                             scale=1 / math.sqrt(q.size(-1)), allowed=dense[:1])
        want = score_figures(scores)["max_logit"][0].numpy()
        np.testing.assert_allclose(layer.heads["max_logit"], want, rtol=1e-9)
