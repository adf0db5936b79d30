"""torchtitan on the CPU.

Its Llama3 debug model (built from its own config, random weights) probed with no adapter:
every ``FlexAttention`` module is intercepted, and its matrices and figures equal a float64
reference written out from each call's own query and key and from the packed documents'
positions. The measurement pass of ``attn_probe.integrations.torchtitan`` logging into
torchtitan's own ``TensorBoardLogger`` at torchtitan's step (read back from the event file), and
the config module of docs/distributed.md parsed by torchtitan's ``ConfigManager``.

Forward passes only: torchtitan's training step needs a GPU (``flex_attention`` has no backward
on the CPU), so ``AttentionProbeTrainer.train_step`` is not run here."""

from __future__ import annotations

import math
import re
import sys

import numpy as np
import pytest
import torch
from extras_rule import extra

import attn_probe
from reference import REPO, flex_scores, no_hooks_left, read_scalars, score_figures

pytestmark = [
    pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile",
                               "ignore::DeprecationWarning"),
    pytest.mark.slow,
    pytest.mark.usefixtures("single_thread"),
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
    with torch.no_grad(), attn_probe.capture(
            model, attn_probe.CaptureOptions(batch_rows=None, crop=CROP)) as cap:
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
                                       capture=attn_probe.CaptureOptions(crop=CROP)) as probe:
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


EVERY = 5


def batch():
    """A torchtitan batch: input tokens, per-document positions, labels."""
    tokens, positions, _ = packed_batch()
    return {"input": tokens, "positions": positions}, tokens.roll(-1, dims=1)


def test_measurement_pass_logs_into_torchtitans_tensorboard_logger(debug_model, tmp_path):
    from torchtitan.components.metrics import TensorBoardLogger

    from attn_probe.integrations import torchtitan as integration

    model = debug_model
    logger = TensorBoardLogger(str(tmp_path))
    config = integration.ProbeConfig(every=EVERY, batch_rows=2, crop=32)
    probe = config.probe(model, logger).attach(step=0)
    input_dict, labels = batch()
    snapshots = {}
    try:
        for step in range(1, 11):  # torchtitan numbers its steps from 1
            rows, _ = integration.rows(input_dict, labels, config.batch_rows)
            with torch.compiler.set_stance("force_eager"):  # torchtitan compiles the masks
                masks = model.get_attention_masks(rows["positions"])
            snapshots[step] = integration.measure(probe, model, step, rows["input"],
                                                  positions=rows["positions"],
                                                  attention_masks=masks)
            assert not probe.sampling  # the training forward pass that follows is not measured
    finally:
        probe.detach()
        logger.close()
    assert no_hooks_left(model)
    assert [s for s, snap in snapshots.items() if snap is not None] == [5, 10]
    scalars = read_scalars(tmp_path)
    assert scalars, "nothing logged"
    assert all(tag.startswith("attn_probe/") for tag in scalars)
    for step in (5, 10):
        snapshot = snapshots[step]
        assert len(snapshot.layers) == 6
        for layer in snapshot.layers:
            assert layer.heads["tokens_full"].tolist() == [T] * 16  # every token of each sequence
            logged = scalars[f"attn_probe/max_logit/max/{layer.tag}"][step]
            assert math.isclose(logged, layer.reduce("max_logit", "max"), rel_tol=1e-6)
            logged = scalars[f"attn_probe/entropy_norm_full/mean/{layer.tag}"][step]
            assert math.isclose(logged, layer.reduce("entropy_norm_full", "mean"), rel_tol=1e-6)
    assert set(scalars["attn_probe/max_logit/max/L00"]) == {5, 10}


def test_docs_config_module_parses_with_torchtitans_config_manager(debug_model, tmp_path,
                                                                   monkeypatch):
    """The config module of docs/distributed.md, as written there, read by torchtitan's own
    command-line parser with the probe's options on the command line."""
    from torchtitan.config import ConfigManager

    from attn_probe.integrations import torchtitan as integration

    docs = (REPO / "docs" / "distributed.md").read_text()
    (code,) = re.findall(r"```python\n(# probed_llama3\.py.*?)```", docs, flags=re.S)
    (tmp_path / "probed_llama3.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "probed_llama3", raising=False)
    config = ConfigManager().parse_args([
        "--module", "probed_llama3", "--config", "llama3_8b_probed",
        "--attn_probe.every", "50", "--attn_probe.crop", "128", "--training.steps", "7",
    ])
    assert isinstance(config, integration.AttentionProbeTrainer.Config)
    assert type(config)._owner is integration.AttentionProbeTrainer  # what config.build() makes
    assert (config.attn_probe.every, config.attn_probe.crop, config.attn_probe.batch_rows) == (
        50, 128, 1)
    assert config.training.steps == 7
    assert config.model_spec.flavor == "8B"  # the rest is torchtitan's own 8B config
