"""What attn_probe.explore accepts, as attn-probe analyze does: a module, a llama2.c file, a
Hugging Face model directory or a factory; token ids, text with a tokenizer, a token shard, or
sequences sampled from the model. Mistakes are one line in explore's own words; and
``import attn_probe`` needs none of the optional dependencies."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import attn_probe
from attn_probe.models.shards import SHARD_MAGIC
from attn_probe.models.sampling import sample_tokens
from attn_probe.notebook.sources import load_source
from extras_rule import extra
from reference import FIXTURE, gpt_attention, repo_env
from toy_models import small_gpt

WORDS = "the cat sat on a mat and saw dog run".split()


@pytest.fixture(scope="module")
def gpt(single_thread):
    return small_gpt().eval()


def heatmap(view) -> np.ndarray:
    (image,) = view.shown["heatmap"].axes[0].images
    return np.asarray(image.get_array())


def word_tokenizer():
    """A real (fast) Hugging Face tokenizer of one id per word of WORDS."""
    transformers = extra("transformers")
    tokenizers = extra("tokenizers")
    vocab = {"[UNK]": 0, **{word: i + 1 for i, word in enumerate(WORDS)}}
    model = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    model.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=model, unk_token="[UNK]")


def test_llama2c_file_with_sequences_sampled_from_it():
    extra("transformers")
    extra("ipywidgets")
    from attn_probe.models.llama2c import load_llama2c

    source = load_source(FIXTURE, sequences=3, tokens=12)
    eager = load_llama2c(FIXTURE, attn_implementation="eager")
    want = sample_tokens(eager, 3, 12, bos=1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(source.tokens, want)
    assert source.description.startswith("sampled from the model")
    view = attn_probe.explore(str(FIXTURE), want, widget=True, layer="L03", head=6)
    assert view.layer.options[3] == ("L03 model.layers.3.self_attn", "model.layers.3.self_attn")
    with torch.no_grad():
        own = eager(want[:1], output_attentions=True).attentions
    np.testing.assert_allclose(heatmap(view), own[3][0, 6].numpy(), atol=1e-5)


def test_hugging_face_directory_and_text_name_the_tokens(tmp_path):
    transformers = extra("transformers")
    extra("ipywidgets")
    tokenizer = word_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    config = transformers.LlamaConfig(
        vocab_size=len(WORDS) + 1, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
        bos_token_id=1, eos_token_id=0)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path)
    text = "the cat sat on a mat and saw a dog"
    view = attn_probe.explore(tmp_path, text, widget=True, layer=-1, head=1)
    ids = torch.tensor([[WORDS.index(w) + 1 for w in text.split()]])
    assert torch.equal(view.explorer.tokens, ids)
    axes = view.shown["heatmap"].axes[0]
    assert [t.get_text() for t in axes.get_xticklabels()] == text.split()
    eager = transformers.LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    with torch.no_grad():
        own = eager(ids, output_attentions=True).attentions
    np.testing.assert_allclose(heatmap(view), own[1][0, 1].numpy(), atol=1e-5)


def test_text_with_a_tokenizer_object(gpt):
    extra("ipywidgets")
    tokenizer = word_tokenizer()
    view = attn_probe.explore(gpt, "a dog saw the cat run", tokenizer=tokenizer, widget=True)
    ids = torch.tensor([[WORDS.index(w) + 1 for w in "a dog saw the cat run".split()]])
    assert torch.equal(view.explorer.tokens, ids)
    assert [t.get_text() for t in view.shown["heatmap"].axes[0].get_yticklabels()] == \
        "a dog saw the cat run".split()
    np.testing.assert_allclose(heatmap(view), gpt_attention(gpt, ids)[0][0, 0].numpy(),
                               atol=1e-6)


def test_token_shard_and_factory(tmp_path, gpt):
    tokens = np.arange(50, dtype=np.uint16) % 64
    header = np.zeros(256, dtype="<i4")
    header[:3] = (SHARD_MAGIC, 1, tokens.size)
    shard = tmp_path / "tokens.bin"
    shard.write_bytes(header.tobytes() + tokens.astype("<u2").tobytes())
    source = load_source(gpt, shard, sequences=2, tokens=20)
    assert torch.equal(source.tokens, torch.from_numpy(tokens[:40].astype(np.int64)).view(2, 20))
    assert source.description == f"token shard {shard}"
    figures = attn_probe.explore("toy_models:small_gpt", str(shard), sequences=2, tokens=20,
                                 head=2)
    (image,) = figures["heatmap"].axes[0].images
    want = gpt_attention(small_gpt().eval(), source.tokens[:1])[0][0, 2]
    np.testing.assert_allclose(image.get_array(), want.numpy(), atol=1e-6)


@pytest.mark.parametrize("model, inputs, kwargs, error, needle", [
    ("gpt", "the cat sat", {}, ValueError,
     "inputs is text, which needs a tokenizer, and only a Hugging Face model directory brings "
     "one; pass tokenizer=, token ids, a token shard, or inputs=None to sample"),
    ("nope.bin", None, {}, ValueError, "model 'nope.bin': no such file or directory; model must "
     "be a Hugging Face model directory"),
    ("gpt", Path("nope.txt"), {}, ValueError, "inputs nope.txt: no such file"),
    ("gpt", [[1, 2, 70]], {}, ValueError,
     "inputs holds token id 70, outside the model's vocabulary of 64 ids"),
    ("gpt", "SHARD", {"tokens": 22}, ValueError,
     "has only 20 tokens, fewer than one sequence of tokens 22"),
    ("gpt", "SHARD", {"tokens": 30}, ValueError,
     "tokens 30 is longer than the model's context of 24 tokens"),
    ("gpt", torch.ones(2, 5), {}, ValueError, "token ids must be integers"),
    ("gpt", [[1]], {}, ValueError, "inputs hold 1 token per sequence; give at least 2"),
    ("gpt", torch.ones(1, 30, dtype=torch.long), {}, ValueError,
     "inputs of 30 tokens are longer than the model's context of 24 tokens"),
    (42, None, {}, TypeError, "model must be a torch.nn.Module"),
    ("gpt", [[1, 2]], {"token_strings": ["a"]}, ValueError,
     "token_strings must give one string per token"),
])
def test_mistakes_are_one_line_in_explores_words(gpt, tmp_path, model, inputs, kwargs, error,
                                                 needle):
    if inputs == "SHARD":
        header = np.zeros(256, dtype="<i4")
        header[:3] = (SHARD_MAGIC, 1, 20)
        inputs = tmp_path / "short.bin"
        inputs.write_bytes(header.tobytes() + np.zeros(20, "<u2").tobytes())
    with pytest.raises(error) as raised:
        load_source(gpt if model == "gpt" else model, inputs, **kwargs)
    message = str(raised.value)
    assert needle in message and "\n" not in message and "--" not in message


OPTIONAL_MISSING = """
import sys
for name in ("ipywidgets", "IPython", "ipykernel", "nbclient", "nbformat", "transformers",
             "lightning", "tokenizers", "accelerate"):
    sys.modules[name] = None  # as if not installed: importing it raises ImportError
import torch
import attn_probe
from toy_models import small_gpt
model, ids = small_gpt().eval(), torch.randint(0, 64, (2, 8))
try:
    attn_probe.explore(model, ids, widget=True)
except ImportError as error:
    print("widget:", error)
print("figures:", sorted(attn_probe.explore(model, ids)))
try:
    attn_probe.explore(sys.argv[1], widget=False)
except ImportError as error:
    print("model:", error)
"""


def test_without_the_extras_import_works_and_explore_says_which_extra():
    tests = str(FIXTURE.parents[1])
    done = subprocess.run([sys.executable, "-c", OPTIONAL_MISSING, str(FIXTURE)],
                          capture_output=True,
                          text=True, timeout=240, env=repo_env(PYTHONPATH=tests))
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == [
        'widget: attn_probe.explore needs ipywidgets: pip install "attn_probe[notebook]"',
        "figures: ['head_profiles', 'heatmap', 'max_rank_profile']",
        'model: this model needs Hugging Face transformers: pip install "attn_probe[hf]"',
    ]
