"""Fixtures shared by the test modules, and the rule that CI may not skip the optional
dependencies' tests (:mod:`extras_rule`).

The test tree mirrors the package (tests/attention/ for attn_probe/attention/, ...). Every test
file, at any depth, imports the shared helpers by their plain names (``from reference import
...``, ``from toy_models import ...``): this directory is put on ``sys.path`` here, before any
test module is imported.
"""

import sys
from pathlib import Path

TESTS = str(Path(__file__).resolve().parent)
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)

import pytest  # noqa: E402
import torch  # noqa: E402

from toy_models import (  # noqa: E402
    MergedModel,
    NanoGPT,
    bert_config,
    gpt2_config,
    hf_twins,
    llama_config,
    transformers,
)


# CI may not skip the optional dependencies' tests (see extras_rule.py).
from extras_rule import extra, pytest_make_collect_report, pytest_runtest_makereport  # noqa: E402,F401,E501


@pytest.fixture(scope="module")
def single_thread():
    """Tiny matrices and models: intra-op threads only add synchronisation overhead, badly so on
    a busy machine. Restores the thread count after the module."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# Small models of the capture tests (tests/attention/, tests/test_protocol.py). The tests only
# run them forward, so one of each serves the whole session.


@pytest.fixture(scope="session")
def gpt2():
    """(sdpa model, eager twin) of a tiny GPT-2."""
    extra("transformers")
    return hf_twins(transformers.GPT2LMHeadModel, gpt2_config())


@pytest.fixture(scope="session")
def llama():
    """(sdpa model, eager twin) of a tiny Llama with grouped-query attention."""
    extra("transformers")
    return hf_twins(transformers.LlamaForCausalLM, llama_config())


@pytest.fixture(scope="session")
def bert():
    """(sdpa model, eager twin) of a tiny BERT (bidirectional)."""
    extra("transformers")
    return hf_twins(transformers.BertModel, bert_config())


@pytest.fixture
def nanogpt():
    """A fresh two-block nanoGPT (tests switch its flash path and make it fail on purpose)."""
    torch.manual_seed(0)
    return NanoGPT().eval()


@pytest.fixture(scope="session")
def merged_model():
    """Two modded-nanogpt attention layers (merged qkvo_w, rotary, flex_attention)."""
    torch.manual_seed(0)
    return MergedModel().eval()
