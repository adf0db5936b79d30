"""The loaders under both front ends (attn_probe.models.loading, .inputs, .shards), called as a
library: keyword arguments, and bad input as one ``ValueError`` line in the API's words, which
the command line says with its own options; what does not stop loading is warned at the
caller's line, and said by ``attn-probe analyze`` with its options."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from attn_probe.cli import main
from attn_probe.cli.analyze import OPTION_NAMES
from attn_probe.models.inputs import load_inputs
from attn_probe.models.loading import load_model
from attn_probe.models.messages import InputError
from attn_probe.models.shards import SHARD_MAGIC, read_shard
from toy_models import small_gpt


def write_shard(path: Path, tokens: np.ndarray, magic: int = SHARD_MAGIC) -> Path:
    header = np.zeros(256, dtype="<i4")
    header[:3] = (magic, 1, tokens.size)
    path.write_bytes(header.tobytes() + tokens.astype("<u2").tobytes())
    return path


@pytest.fixture(scope="module")
def loaded(single_thread):
    return load_model(small_gpt().eval())


def test_a_short_shard_is_cut_and_warned_in_each_front_ends_words(loaded, tmp_path, capsys):
    tokens = np.arange(50) % 64
    shard = write_shard(tmp_path / "short.bin", tokens)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found = load_inputs(loaded, shard, sequences=5, tokens=20)
    assert torch.equal(found.ids, torch.from_numpy(tokens[:40]).view(2, 20))
    assert found.description == f"token shard {shard}"
    (warning,) = caught
    assert warning.category is UserWarning and warning.filename == __file__
    assert str(warning.message) == (f"token shard {shard} holds only 2 sequences of 20 tokens; "
                                    "measuring 2 instead of sequences 5")

    out = tmp_path / "out"
    status = main(["analyze", "toy_models:small_gpt", "--data", str(shard), "--sequences", "5",
                   "--tokens", "20", "--out", str(out)])
    err = capsys.readouterr().err
    assert status == 0, err
    assert (f"attn-probe analyze: warning: token shard {shard} holds only 2 sequences of 20 "
            "tokens; measuring 2 instead of --sequences 5") in err.splitlines()
    assert np.load(out / "tokens.npy").shape == (2, 20)


@pytest.mark.parametrize("call, python, command_line", [
    (lambda loaded, root: load_inputs(loaded, root / "odd {name}.txt"),
     "inputs {root}/odd {{name}}.txt: no such file",
     "--data {root}/odd {{name}}.txt: no such file"),
    (lambda loaded, root: load_inputs(loaded, sequences=2, tokens=25),
     "tokens 25 is longer than the model's context of 24 tokens",
     "--tokens 25 is longer than the model's context of 24 tokens"),
    (lambda loaded, root: load_inputs(loaded, [[1, 2, 64]]),
     "inputs holds token id 64, outside the model's vocabulary of 64 ids (0 to 63)", None),
    (lambda loaded, root: load_inputs(loaded, write_shard(root / "ids.bin", np.full(8, 70)),
                                      sequences=1, tokens=8),
     "token shard {root}/ids.bin holds token id 70, outside the model's vocabulary of 64 ids",
     "token shard {root}/ids.bin holds token id 70, outside the model's vocabulary of 64 ids"),
    (lambda loaded, root: load_inputs(loaded, "plain words"),
     "inputs is text, which needs a tokenizer, and only a Hugging Face model directory brings "
     "one; pass tokenizer=, token ids, a token shard, or inputs=None to sample",
     "--data is text, which needs a tokenizer, and only a Hugging Face model directory brings "
     "one; give a token shard (.bin) or leave out --data to sample"),
    (lambda loaded, root: load_model(str(root / "nope.bin")),
     "model '{root}/nope.bin': no such file or directory; model must be a Hugging Face model",
     "MODEL '{root}/nope.bin': no such file or directory; MODEL must be a Hugging Face model"),
    (lambda loaded, root: load_model(write_shard(root / "data.bin", np.arange(8))),
     "{root}/data.bin is a token shard (data), not a model; pass it with inputs",
     "{root}/data.bin is a token shard (data), not a model; pass it with --data"),
    (lambda loaded, root: read_shard(write_shard(root / "x.bin", np.arange(8), magic=7)),
     "{root}/x.bin: not a token shard: magic number 7, expected 20240520",
     "{root}/x.bin: not a token shard: magic number 7, expected 20240520"),
])
def test_bad_input_names_the_keyword_and_the_command_line_its_option(loaded, tmp_path, call,
                                                                       python, command_line):
    with pytest.raises(ValueError) as raised:
        call(loaded, tmp_path)
    error = raised.value
    assert isinstance(error, InputError)
    root = str(tmp_path)
    assert str(error).startswith(python.format(root=root)), str(error)
    if command_line is not None:
        assert error.worded(OPTION_NAMES).startswith(command_line.format(root=root))
    assert "\n" not in str(error)


def test_a_model_is_taken_as_it_is_and_anything_else_is_refused():
    model = small_gpt().train()
    loaded = load_model(model)
    assert loaded.model is model and model.training
    assert (loaded.vocab_size, loaded.context, loaded.hf) == (64, 24, False)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, a Hugging Face model "
                                        "directory"):
        load_model(42)
