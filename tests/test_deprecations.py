"""Names of the previous release still work, and say what replaced them (attn_probe._compat).

Each old name is checked to do what the new one does, not only to warn.
"""

from __future__ import annotations

import importlib
import sys
import warnings

import numpy as np
import pytest
import torch

import attn_probe
from attn_probe._compat import MOVED_MODULES
from attn_probe.attention import attention_probabilities, register_adapter
from attn_probe.attention.adapters import find_adapter
from attn_probe.cli.main import build_parser
from attn_probe.outputs import figures
from attn_probe.protocol import capture, rank_profile
from toy_models import ExpAttention, exp_adapter, small_gpt


def test_capture_is_the_function_and_the_stages_are_modules():
    assert attn_probe.capture is capture and callable(attn_probe.capture)
    adapters = importlib.import_module("attn_probe.attention.adapters")
    assert adapters.register_adapter is register_adapter
    assert attn_probe.attention.adapters is adapters


def test_old_capture_module_path():
    with pytest.deprecated_call(match="attn_probe.attention"):
        from attn_probe.capture import attention_probabilities as old
    assert old is attention_probabilities
    assert attn_probe.capture is capture  # the module path did not shadow the function


def test_old_plots_module():
    with pytest.deprecated_call(match="attn_probe.outputs.figures"):
        collapse_map = attn_probe.plots.collapse_map
    assert collapse_map is figures.collapse_map


#: The public names of each old module in the previous release (its __all__, or what it defined).
OLD_NAMES = {
    "attn_probe.capture": ["Capture", "CaptureError", "attention_probabilities", "capture",
                           "find_attention_modules", "plan_sites", "register_adapter"],
    "attn_probe.stats": ["METRICS", "CollapseRule", "LayerSummary", "Snapshot",
                         "HeadAccumulator"],
    "attn_probe.profile": ["rank_profile"],
    "attn_probe.plots": ["attention_heatmaps", "collapse_map", "collapse_map_for",
                         "figure_to_array", "head_profiles", "head_profiles_for",
                         "max_rank_profile", "max_rank_profile_for"],
    "attn_probe.report": ["layer_rows", "head_rows", "format_table", "write_tables"],
    "attn_probe.writers": ["TensorBoardWriter"],
    "attn_probe.writers.tensorboard": ["TensorBoardWriter", "LAYOUT_CATEGORY"],
    "attn_probe.distributed": ["is_distributed", "is_main_process", "all_gather_object"],
    "attn_probe.gpt": ["GPTConfig", "CausalSelfAttention", "MLP", "Block", "GPT"],
    "attn_probe.llama2c": ["load_llama2c", "sample_tokens", "mean_next_token_loss"],
    "attn_probe.demo": ["builtin_corpus", "DemoConfig", "DemoResult", "run_demo"],
    "attn_probe.full_context": ["DEFAULT_MEMORY_BUDGET", "block_rows", "full_context_metrics",
                                "full_context_stats", "scores_stats"],
    "attn_probe.analyze": ["LoadedModel", "add_arguments", "load_model", "parse_heads",
                           "read_shard", "run_analyze"],
}

#: Old names the move dropped on purpose: a loss only the tests used went to tests/reference.py.
LOST = {("attn_probe.llama2c", "mean_next_token_loss")}


def test_every_moved_module_is_listed():
    assert set(OLD_NAMES) == set(MOVED_MODULES)


@pytest.mark.parametrize("old, name", [
    (old, name) for old, names in OLD_NAMES.items() for name in names
    if (old, name) not in LOST
])
def test_old_module_paths_keep_their_names(old, name):
    moved = importlib.import_module(old)  # the old path still imports
    with pytest.deprecated_call(match=f"{old} is deprecated, use attn_probe"):
        value = getattr(moved, name)
    new = [importlib.import_module(m) for m in MOVED_MODULES[old]]
    assert value is getattr(next(m for m in new if hasattr(m, name)), name)


@pytest.mark.parametrize("old, name", sorted(LOST))
def test_names_dropped_on_purpose_are_gone(old, name):
    moved = importlib.import_module(old)
    with pytest.deprecated_call(), pytest.raises(AttributeError, match=name):
        getattr(moved, name)


def test_old_module_paths_do_not_invent_names():
    with pytest.deprecated_call(), pytest.raises(AttributeError):
        getattr(sys.modules["attn_probe.plots"], "no_such_name_anywhere")


def test_rank_profile_n_sequences():
    model = small_gpt().eval()
    tokens = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(0))
    with pytest.deprecated_call(match="n_sequences= is deprecated, use max_sequences="):
        old = rank_profile(model, [tokens], n_sequences=3)
    new = rank_profile(model, [tokens], max_sequences=3)
    for a, b in zip(old.layers, new.layers):
        assert a.counts.tolist() == [3] * 4
        np.testing.assert_array_equal(a.heads["rank"], b.heads["rank"])


def test_register_adapter_none_unregisters():
    handle = register_adapter(ExpAttention, exp_adapter)
    try:
        assert find_adapter(ExpAttention()) is not None
        with pytest.deprecated_call(match="remove"):
            register_adapter(ExpAttention, None)
        assert find_adapter(ExpAttention()) is None
    finally:
        handle.remove()


def test_attention_heatmaps_max_tokens():
    attention = np.random.default_rng(0).dirichlet(np.ones(12), size=(2, 12))
    with pytest.deprecated_call(match="max_tokens= is deprecated, use tokens="):
        fig = figures.attention_heatmaps(attention, max_tokens=5)
    shapes = [ax.images[0].get_array().shape for ax in fig.axes if ax.images and ax.get_title()]
    assert shapes == [(5, 5), (5, 5)]


@pytest.mark.parametrize("command, old, new, value, dest", [
    (["analyze", "model"], "--n", "--sequences", "7", "sequences"),
    (["analyze", "model"], "--heads", "--heatmaps", "0:1,-1:*", "heatmaps"),
    (["demo"], "--logdir", "--log-dir", "tb", "log_dir"),
])
def test_old_command_line_options(command, old, new, value, dest, capsys):
    """The old spellings still set the new options, and say so on stderr; the new ones don't."""
    with pytest.deprecated_call(match=f"{old} is deprecated, use {new}"):
        parsed = build_parser().parse_args([*command, old, value])
    assert f"{old} is deprecated, use {new}" in capsys.readouterr().err
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert getattr(build_parser().parse_args([*command, new, value]), dest) == \
            getattr(parsed, dest) == (int(value) if dest == "sequences" else value)


@pytest.mark.parametrize("old, new, value", [
    ("heatmap_heads", "heatmaps", {0: [1]}),
    ("max_heatmap_tokens", "heatmap_tokens", 16),
])
def test_tensorboard_writer_renamed_arguments(tmp_path, old, new, value):
    from attn_probe.outputs import TensorBoardWriter

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        writer = TensorBoardWriter(log_dir=str(tmp_path), **{old: value})
    writer.close()
    assert any(issubclass(w.category, DeprecationWarning) and new in str(w.message)
               for w in caught)
    assert getattr(writer, new) == value
