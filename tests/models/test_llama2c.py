"""Tests for loading llama2.c checkpoints into Hugging Face Llama.

Most tests use ``stories260K.bin``, a small trained Llama from the llama2.c project, read from
``../shared/fixtures/`` relative to the repository root; they are skipped where it is absent.
"""

from __future__ import annotations

import hashlib
import math
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
from extras_rule import extra
import torch

from attn_probe.models.llama2c import load_llama2c
from attn_probe.models.sampling import sample_tokens
from reference import mean_next_token_loss
from reference import FIXTURE

FIXTURE_SHA256 = "9414d5a285453a7eab631713d171753232c978f6f97654211469aff8be93c8d6"


# --------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def fixture_path() -> Path:
    return FIXTURE


@pytest.fixture(scope="module")
def hf():
    return extra("transformers")


@pytest.fixture(scope="module")
def model(fixture_path, hf):
    return load_llama2c(fixture_path)


@pytest.fixture(scope="module")
def samples(model) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1234)
    return sample_tokens(model, 8, 64, generator=gen, temperature=1.0)


@pytest.fixture(scope="module")
def own_loss(model, samples) -> float:
    return mean_next_token_loss(model, samples)


def _read_raw(path: Path) -> tuple[dict[str, int], dict[str, np.ndarray]]:
    """Independent reader of the legacy llama2.c layout, used as the reference."""
    raw = path.read_bytes()
    names = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "max_seq_len")
    cfg = dict(zip(names, struct.unpack("<7i", raw[:28])))
    d, h, n = cfg["dim"], cfg["hidden_dim"], cfg["n_layers"]
    hd = d // cfg["n_heads"]
    v = abs(cfg["vocab_size"])
    flat = np.frombuffer(raw, dtype="<f4", offset=28)
    order = [
        ("emb", (v, d)),
        ("att_norm", (n, d)),
        ("wq", (n, cfg["n_heads"] * hd, d)),
        ("wk", (n, cfg["n_kv_heads"] * hd, d)),
        ("wv", (n, cfg["n_kv_heads"] * hd, d)),
        ("wo", (n, d, cfg["n_heads"] * hd)),
        ("ffn_norm", (n, d)),
        ("w1", (n, h, d)),
        ("w2", (n, d, h)),
        ("w3", (n, h, d)),
        ("norm", (d,)),
        ("cos", (cfg["max_seq_len"], hd // 2)),
        ("sin", (cfg["max_seq_len"], hd // 2)),
    ]
    if cfg["vocab_size"] < 0:
        order.append(("out", (v, d)))
    out, pos = {}, 0
    for name, shape in order:
        size = int(np.prod(shape))
        out[name] = flat[pos : pos + size].reshape(shape)
        pos += size
    assert pos == flat.size
    return cfg, out


def _reference_layer0_attention(path: Path, tokens: torch.Tensor):
    """Layer-0 attention of a llama2.c model computed directly from the raw arrays in float64,
    with adjacent-pair rotary applied as a complex multiplication (as llama2.c does).

    Returns (probabilities (B, H, T, T), attention block output before the residual (B, T, dim)).
    """
    cfg, a = _read_raw(path)
    n_heads, n_kv = cfg["n_heads"], cfg["n_kv_heads"]
    dim = cfg["dim"]
    hd = dim // n_heads
    f64 = lambda x: torch.from_numpy(np.array(x, dtype=np.float64))  # noqa: E731

    x = f64(a["emb"])[tokens]  # (B, T, dim)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * f64(a["att_norm"][0])
    bsz, t, _ = x.shape
    q = (x @ f64(a["wq"][0]).T).view(bsz, t, n_heads, hd)
    k = (x @ f64(a["wk"][0]).T).view(bsz, t, n_kv, hd)
    v = (x @ f64(a["wv"][0]).T).view(bsz, t, n_kv, hd)

    freqs = 1.0 / (10000.0 ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    angles = torch.outer(torch.arange(t, dtype=torch.float64), freqs)  # (T, hd/2)
    rot = torch.polar(torch.ones_like(angles), angles)[None, :, None, :]

    def rotate(z: torch.Tensor) -> torch.Tensor:
        zc = torch.view_as_complex(z.reshape(*z.shape[:-1], hd // 2, 2).contiguous())
        return torch.view_as_real(zc * rot).reshape(z.shape)

    q, k = rotate(q), rotate(k)
    rep = n_heads // n_kv
    k = k.repeat_interleave(rep, dim=2)
    v = v.repeat_interleave(rep, dim=2)
    q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # (B, H, T, hd)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    scores = scores.masked_fill(~causal, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    ctx = (probs @ v).transpose(1, 2).reshape(bsz, t, n_heads * hd)
    out = ctx @ f64(a["wo"][0]).T
    return probs, out


def _write_llama2c(path: Path, header, arrays) -> None:
    with open(path, "wb") as fh:
        fh.write(struct.pack("<7i", *header))
        for arr in arrays:
            fh.write(np.asarray(arr, dtype="<f4").tobytes())


# --------------------------------------------------------------------------------------------
# Tests on the trained fixture
# --------------------------------------------------------------------------------------------


def test_fixture_sha256(fixture_path):
    digest = hashlib.sha256(fixture_path.read_bytes()).hexdigest()
    assert digest == FIXTURE_SHA256


def test_loaded_config(model, hf):
    assert isinstance(model, hf.LlamaForCausalLM)
    assert not model.training
    cfg = model.config
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (64, 172, 5)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (8, 4)
    assert (cfg.vocab_size, cfg.max_position_embeddings) == (512, 512)
    assert cfg.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert next(model.parameters()).dtype == torch.float32


def test_sampling_shape_and_determinism(model, samples):
    assert samples.shape == (8, 64)
    assert samples.dtype == torch.long
    assert torch.all(samples[:, 0] == 1)
    assert int(samples.min()) >= 0 and int(samples.max()) < 512
    # Same generator state, same tokens; the batch is sampled jointly, so compare a short prefix.
    first = sample_tokens(model, 2, 16, generator=torch.Generator().manual_seed(99))
    again = sample_tokens(model, 2, 16, generator=torch.Generator().manual_seed(99))
    other = sample_tokens(model, 2, 16, generator=torch.Generator().manual_seed(100))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_loss_on_own_samples_far_below_random(model, own_loss):
    random_tokens = torch.randint(0, 512, (8, 64), generator=torch.Generator().manual_seed(7))
    random_loss = mean_next_token_loss(model, random_tokens)
    assert own_loss < 4.0, own_loss
    assert random_loss > 8.0, random_loss


def test_rotary_permutation_matters(fixture_path, hf, samples, own_loss):
    unpermuted = load_llama2c(fixture_path, _permute_rotary=False)
    bad_loss = mean_next_token_loss(unpermuted, samples)
    assert bad_loss > own_loss + 1.5, (own_loss, bad_loss)


def test_layer0_attention_matches_adjacent_pair_reference(fixture_path, hf, samples):
    eager = load_llama2c(fixture_path, attn_implementation="eager")
    tokens = samples[:3]
    captured = {}

    def hook(module, args, output):
        captured["out"] = output[0] if isinstance(output, tuple) else output

    handle = eager.model.layers[0].self_attn.register_forward_hook(hook)
    try:
        with torch.no_grad():
            result = eager(input_ids=tokens, output_attentions=True, use_cache=False)
    finally:
        handle.remove()

    ref_probs, ref_out = _reference_layer0_attention(fixture_path, tokens)
    hf_probs = result.attentions[0].double()
    assert hf_probs.shape == ref_probs.shape == (3, 8, 64, 64)
    assert (hf_probs - ref_probs).abs().max().item() <= 1e-5
    hf_out = captured["out"].double()
    assert hf_out.shape == ref_out.shape
    assert (hf_out - ref_out).abs().max().item() <= 1e-5


def test_file_rope_tables_match_theta_10000(fixture_path):
    # The stored tables are not used by the loader, but they confirm theta and the pair layout.
    cfg, a = _read_raw(fixture_path)
    hd = cfg["dim"] // cfg["n_heads"]
    freqs = 1.0 / (10000.0 ** (np.arange(0, hd, 2) / hd))
    angles = np.outer(np.arange(cfg["max_seq_len"]), freqs)
    assert np.abs(a["cos"] - np.cos(angles)).max() < 1e-4
    assert np.abs(a["sin"] - np.sin(angles)).max() < 1e-4


def test_truncated_file_raises_value_error(fixture_path, hf, tmp_path):
    truncated = tmp_path / "truncated.bin"
    truncated.write_bytes(fixture_path.read_bytes()[:-1000])
    with pytest.raises(ValueError) as info:
        load_llama2c(truncated)
    message = str(info.value)
    assert "truncated.bin" in message
    assert "expected 1056540 bytes" in message
    assert f"found {1056540 - 1000} bytes" in message


def test_bf16_dtype(fixture_path, hf, samples, own_loss):
    bf16 = load_llama2c(fixture_path, dtype=torch.bfloat16)
    assert next(bf16.parameters()).dtype == torch.bfloat16
    assert abs(mean_next_token_loss(bf16, samples) - own_loss) < 0.2


# --------------------------------------------------------------------------------------------
# Tests on small synthetic files (no fixture needed)
# --------------------------------------------------------------------------------------------

_TINY = dict(dim=16, hidden=24, layers=1, heads=4, kv=2, vocab=32, seq=16)


def _tiny_arrays(rng: np.random.Generator, untied: bool):
    keys = ("dim", "hidden", "layers", "heads", "kv", "vocab", "seq")
    d, h, n, nh, kv, v, s = (_TINY[k] for k in keys)
    hd = d // nh
    arrays = [
        rng.standard_normal((v, d)),
        1 + 0.1 * rng.standard_normal((n, d)),
        0.2 * rng.standard_normal((n, nh * hd, d)),
        0.2 * rng.standard_normal((n, kv * hd, d)),
        0.2 * rng.standard_normal((n, kv * hd, d)),
        0.2 * rng.standard_normal((n, d, nh * hd)),
        1 + 0.1 * rng.standard_normal((n, d)),
        0.2 * rng.standard_normal((n, h, d)),
        0.2 * rng.standard_normal((n, d, h)),
        0.2 * rng.standard_normal((n, h, d)),
        1 + 0.1 * rng.standard_normal((d,)),
        np.zeros((s, hd // 2)),
        np.zeros((s, hd // 2)),
    ]
    if untied:
        arrays.append(rng.standard_normal((v, d)))
    header = (d, h, n, nh, kv, -v if untied else v, s)
    return header, arrays


def test_untied_classifier_and_rotary_row_order(hf, tmp_path):
    rng = np.random.default_rng(0)
    header, arrays = _tiny_arrays(rng, untied=True)
    path = tmp_path / "untied.bin"
    _write_llama2c(path, header, arrays)
    model = load_llama2c(path)
    assert model.config.vocab_size == _TINY["vocab"]
    assert not model.config.tie_word_embeddings
    np.testing.assert_array_equal(
        model.lm_head.weight.detach().numpy(), arrays[-1].astype(np.float32)
    )
    np.testing.assert_array_equal(
        model.model.embed_tokens.weight.detach().numpy(), arrays[0].astype(np.float32)
    )
    # Row 2i of each head goes to i, row 2i+1 to i + head_dim/2.
    hd = _TINY["dim"] // _TINY["heads"]
    wq = arrays[2][0].astype(np.float32)
    q_proj = model.model.layers[0].self_attn.q_proj.weight.detach().numpy()
    for head in range(_TINY["heads"]):
        base = head * hd
        for i in range(hd // 2):
            np.testing.assert_array_equal(q_proj[base + i], wq[base + 2 * i])
            np.testing.assert_array_equal(q_proj[base + hd // 2 + i], wq[base + 2 * i + 1])
    # v is not rotated, so it is loaded as stored.
    np.testing.assert_array_equal(
        model.model.layers[0].self_attn.v_proj.weight.detach().numpy(),
        arrays[4][0].astype(np.float32),
    )
    tokens = sample_tokens(model, 2, 5, generator=torch.Generator().manual_seed(0))
    assert tokens.shape == (2, 5)
    assert math.isfinite(mean_next_token_loss(model, tokens))


def test_tied_tiny_file_loads(hf, tmp_path):
    header, arrays = _tiny_arrays(np.random.default_rng(1), untied=False)
    path = tmp_path / "tied.bin"
    _write_llama2c(path, header, arrays)
    model = load_llama2c(path)
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_untied_file_missing_classifier_is_rejected(hf, tmp_path):
    # A tied-size payload under a negative vocab_size header lacks the classifier.
    header, arrays = _tiny_arrays(np.random.default_rng(2), untied=False)
    header = header[:5] + (-header[5],) + header[6:]
    path = tmp_path / "no_classifier.bin"
    _write_llama2c(path, header, arrays)
    with pytest.raises(ValueError, match="no_classifier.bin.*expected .* bytes.*found .* bytes"):
        load_llama2c(path)


def test_trailing_data_and_tiny_files_are_rejected(hf, tmp_path):
    header, arrays = _tiny_arrays(np.random.default_rng(3), untied=False)
    path = tmp_path / "trailing.bin"
    _write_llama2c(path, header, arrays + [np.zeros(3)])
    with pytest.raises(ValueError, match="trailing.bin"):
        load_llama2c(path)
    stub = tmp_path / "stub.bin"
    stub.write_bytes(b"\x00" * 10)
    with pytest.raises(ValueError, match="stub.bin"):
        load_llama2c(stub)
    bad_header = tmp_path / "bad_header.bin"
    bad_header.write_bytes(struct.pack("<7i", 16, 24, 1, 3, 2, 32, 16))
    with pytest.raises(ValueError, match="bad_header.bin.*divisible"):
        load_llama2c(bad_header)


def test_missing_transformers_gives_install_hint(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match=r'pip install "attn_probe\[hf\]"'):
        load_llama2c(tmp_path / "whatever.bin")
