"""Load llama2.c checkpoints into Hugging Face ``LlamaForCausalLM``.

The llama2.c "legacy" checkpoint format is a header of seven little-endian int32 values::

    dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, max_seq_len

followed by float32 arrays (``nn.Linear`` layout, ``(out_features, in_features)``), each stacked
over layers where it has a layer axis:

==============================  =====================================
token embedding                 (vocab, dim)
attention RMSNorm weight        (layers, dim)
wq                              (layers, n_heads * head_dim, dim)
wk                              (layers, n_kv_heads * head_dim, dim)
wv                              (layers, n_kv_heads * head_dim, dim)
wo                              (layers, dim, n_heads * head_dim)
feed-forward RMSNorm weight     (layers, dim)
w1 (gate)                       (layers, hidden_dim, dim)
w2 (down)                       (layers, dim, hidden_dim)
w3 (up)                         (layers, hidden_dim, dim)
final RMSNorm weight            (dim,)
RoPE cos table, sin table       (max_seq_len, head_dim / 2) each
classifier (only if untied)     (vocab, dim)
==============================  =====================================

A negative ``vocab_size`` in the header means the output classifier is *not* tied to the token
embedding and is stored after the RoPE tables.

llama2.c rotates *adjacent* channel pairs ``(0, 1), (2, 3), ...`` of each head, whereas the Hugging
Face Llama rotates the two *halves* of each head (channel ``j`` with ``j + head_dim / 2``). Both use
frequency ``theta ** (-2 i / head_dim)`` for pair ``i``, so the rows of ``wq`` and ``wk`` are
permuted within each head (row ``2 i`` -> ``i``, row ``2 i + 1`` -> ``i + head_dim / 2``); the
attention scores, and hence the whole network, are then unchanged.

The file is read with :mod:`numpy` only; nothing in it is ever executed or unpickled.
"""

from __future__ import annotations

import inspect
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .optional import import_transformers

if TYPE_CHECKING:  # pragma: no cover
    from transformers import LlamaForCausalLM

__all__ = ["load_llama2c"]

_HEADER = struct.Struct("<7i")
_FLOAT_BYTES = 4
_RMS_NORM_EPS = 1e-5
_ROPE_THETA = 10000.0
_BOS_ID = 1
_EOS_ID = 2


@dataclass(frozen=True)
class _Header:
    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    max_seq_len: int
    shared_classifier: bool

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def array_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """Names and shapes of the float32 arrays, in file order."""
        d, h, n, hd = self.dim, self.hidden_dim, self.n_layers, self.head_dim
        q_rows = self.n_heads * hd
        kv_rows = self.n_kv_heads * hd
        shapes: list[tuple[str, tuple[int, ...]]] = [
            ("tok_embeddings", (self.vocab_size, d)),
            ("attention_norm", (n, d)),
            ("wq", (n, q_rows, d)),
            ("wk", (n, kv_rows, d)),
            ("wv", (n, kv_rows, d)),
            ("wo", (n, d, q_rows)),
            ("ffn_norm", (n, d)),
            ("w1", (n, h, d)),
            ("w2", (n, d, h)),
            ("w3", (n, h, d)),
            ("norm", (d,)),
            ("freq_cis_real", (self.max_seq_len, hd // 2)),
            ("freq_cis_imag", (self.max_seq_len, hd // 2)),
        ]
        if not self.shared_classifier:
            shapes.append(("output", (self.vocab_size, d)))
        return shapes

    def expected_floats(self) -> int:
        return sum(int(np.prod(shape)) for _, shape in self.array_shapes())

    def expected_bytes(self) -> int:
        return _HEADER.size + _FLOAT_BYTES * self.expected_floats()


def _read_header(path: Path, file_size: int) -> tuple[_Header, str]:
    if file_size < _HEADER.size:
        raise ValueError(
            f"{path}: not a llama2.c checkpoint: expected a {_HEADER.size}-byte header of 7 int32 "
            f"values, found a file of only {file_size} bytes"
        )
    with open(path, "rb") as fh:
        raw = fh.read(_HEADER.size)
    dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, max_seq_len = _HEADER.unpack(raw)
    header_text = (
        f"dim={dim}, hidden_dim={hidden_dim}, n_layers={n_layers}, n_heads={n_heads}, "
        f"n_kv_heads={n_kv_heads}, vocab_size={vocab_size}, max_seq_len={max_seq_len}"
    )
    problems = []
    for name, value in (
        ("dim", dim),
        ("hidden_dim", hidden_dim),
        ("n_layers", n_layers),
        ("n_heads", n_heads),
        ("n_kv_heads", n_kv_heads),
        ("max_seq_len", max_seq_len),
    ):
        if value <= 0:
            problems.append(f"{name} must be positive")
    if vocab_size == 0:
        problems.append("vocab_size must be non-zero")
    if not problems:
        if dim % n_heads:
            problems.append("dim must be divisible by n_heads")
        elif (dim // n_heads) % 2:
            problems.append("head_dim = dim / n_heads must be even for rotary embeddings")
        if n_heads % n_kv_heads:
            problems.append("n_heads must be divisible by n_kv_heads")
    if problems:
        raise ValueError(
            f"{path}: not a valid llama2.c (legacy format) checkpoint: header ({header_text}) is "
            f"inconsistent: {'; '.join(problems)}"
        )
    return _Header(
        dim=dim,
        hidden_dim=hidden_dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        vocab_size=abs(vocab_size),
        max_seq_len=max_seq_len,
        shared_classifier=vocab_size > 0,
    ), header_text


def _read_llama2c_arrays(path: str | os.PathLike[str]) -> tuple[_Header, dict[str, np.ndarray]]:
    """Parse a legacy llama2.c checkpoint into its header and named float32 arrays."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"llama2.c checkpoint not found: {path}")
    file_size = path.stat().st_size
    header, header_text = _read_header(path, file_size)
    expected = header.expected_bytes()
    if file_size != expected:
        shorter = "truncated" if file_size < expected else "has trailing data"
        tied = "tied" if header.shared_classifier else "untied"
        raise ValueError(
            f"{path}: file size does not match its llama2.c header ({header_text}; {tied} "
            f"classifier): expected {expected} bytes ({_HEADER.size}-byte header + "
            f"{header.expected_floats()} float32 values), found {file_size} bytes; the file is "
            f"{shorter} or is not a legacy-format llama2.c checkpoint"
        )
    flat = np.fromfile(path, dtype="<f4", count=header.expected_floats(), offset=_HEADER.size)
    arrays: dict[str, np.ndarray] = {}
    pos = 0
    for name, shape in header.array_shapes():
        n = int(np.prod(shape))
        arrays[name] = flat[pos : pos + n].reshape(shape)
        pos += n
    if header.shared_classifier:
        arrays["output"] = arrays["tok_embeddings"]
    return header, arrays


def _interleaved_to_half_split(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the output rows of a q/k projection, within each head, from adjacent-pair rotary
    order (pairs (0, 1), (2, 3), ...) to half-split order (pairs (0, hd/2), (1, hd/2 + 1), ...)."""
    rows, cols = w.shape
    head_dim = rows // n_heads
    return (
        w.reshape(n_heads, head_dim // 2, 2, cols).transpose(1, 2).reshape(rows, cols).contiguous()
    )


def _build_config(transformers: Any, header: _Header, attn_implementation: str) -> Any:
    LlamaConfig = transformers.LlamaConfig
    kwargs: dict[str, Any] = dict(
        hidden_size=header.dim,
        intermediate_size=header.hidden_dim,
        num_hidden_layers=header.n_layers,
        num_attention_heads=header.n_heads,
        num_key_value_heads=header.n_kv_heads,
        vocab_size=header.vocab_size,
        max_position_embeddings=header.max_seq_len,
        hidden_act="silu",
        rms_norm_eps=_RMS_NORM_EPS,
        tie_word_embeddings=header.shared_classifier,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=_BOS_ID,
        eos_token_id=_EOS_ID,
        attn_implementation=attn_implementation,
    )
    params = inspect.signature(LlamaConfig.__init__).parameters
    if "rope_parameters" in params:
        # Newer transformers: rotary settings are grouped in one dict.
        kwargs["rope_parameters"] = {"rope_type": "default", "rope_theta": _ROPE_THETA}
    else:
        kwargs["rope_theta"] = _ROPE_THETA
        kwargs["rope_scaling"] = None
    if "head_dim" in params:
        kwargs["head_dim"] = header.head_dim
    return LlamaConfig(**kwargs)


def load_llama2c(
    path: str | os.PathLike[str],
    *,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
    _permute_rotary: bool = True,
) -> "LlamaForCausalLM":
    """Load a legacy-format llama2.c checkpoint as a Hugging Face ``LlamaForCausalLM``.

    Args:
        path: the ``.bin`` checkpoint written by llama2.c's legacy exporter.
        attn_implementation: passed to the config (``"sdpa"``, ``"eager"``, ...). Use ``"eager"``
            to get attention probabilities from ``output_attentions=True``.
        dtype: parameter dtype of the returned model.

    Returns:
        The model in eval mode, on the CPU.

    Raises:
        ValueError: the file is truncated, has trailing data, or its header is inconsistent.
        ImportError: transformers is not installed.
    """
    transformers = import_transformers("loading llama2.c checkpoints")
    header, arrays = _read_llama2c_arrays(path)
    config = _build_config(transformers, header, attn_implementation)

    def t(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32).copy())

    def rotary(w: np.ndarray, n_heads: int) -> torch.Tensor:
        w_t = t(w)
        return _interleaved_to_half_split(w_t, n_heads) if _permute_rotary else w_t

    state: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": t(arrays["tok_embeddings"]),
        "model.norm.weight": t(arrays["norm"]),
        "lm_head.weight": t(arrays["output"]),
    }
    for i in range(header.n_layers):
        p = f"model.layers.{i}."
        state[p + "input_layernorm.weight"] = t(arrays["attention_norm"][i])
        state[p + "self_attn.q_proj.weight"] = rotary(arrays["wq"][i], header.n_heads)
        state[p + "self_attn.k_proj.weight"] = rotary(arrays["wk"][i], header.n_kv_heads)
        state[p + "self_attn.v_proj.weight"] = t(arrays["wv"][i])
        state[p + "self_attn.o_proj.weight"] = t(arrays["wo"][i])
        state[p + "post_attention_layernorm.weight"] = t(arrays["ffn_norm"][i])
        state[p + "mlp.gate_proj.weight"] = t(arrays["w1"][i])
        state[p + "mlp.down_proj.weight"] = t(arrays["w2"][i])
        state[p + "mlp.up_proj.weight"] = t(arrays["w3"][i])

    model = transformers.LlamaForCausalLM(config)
    expected_keys = set(model.state_dict().keys())
    if header.shared_classifier and "lm_head.weight" not in expected_keys:
        del state["lm_head.weight"]  # tied weights not listed separately by this version
    model.load_state_dict(state, strict=True)
    if header.shared_classifier:
        model.tie_weights()
    model = model.to(dtype=dtype)
    model.eval()
    return model
