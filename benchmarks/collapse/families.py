"""The model families of the collapse suite, all built from configs (no download) for byte-level
text (vocabulary 256), and what the training loop needs of each: the model, its next-token (or
masked-token) logits, and where the query and key weights of a layer are.

* ``gpt`` — the project's own nanoGPT-style :class:`attn_probe.models.gpt.GPT` (the demo's);
* ``llama`` — Hugging Face ``LlamaForCausalLM``: RMSNorm, rotary positions, SwiGLU, grouped-query
  attention (4 query heads share 2 key/value heads), no biases;
* ``gpt2`` — Hugging Face ``GPT2LMHeadModel``: learned positions, one fused ``c_attn``
  ``Conv1D`` (its weight is (in, 3·width): queries, keys and values are *columns*);
* ``encoder`` — Hugging Face ``ModernBertForMaskedLM``: a bidirectional encoder (pre-norm,
  rotary positions, GeGLU, one fused ``Wqkv``, every layer global) trained by masked-language
  modelling, with one extra token id, :data:`MASK`, for the masked bytes. ``BertForMaskedLM``
  (post-norm, learned absolute positions) was tried first and left out: at this size it stayed
  at the loss of byte frequencies alone (3.1, attention uniform) for 840 steps at peak rates of
  1e-3, 3e-3 and 1e-2, and with sinusoidal or larger initial position embeddings, so no recipe
  could end worse than its twin; ModernBERT reached 2.4 in 300 steps.

Every Hugging Face model runs ``attn_implementation="sdpa"`` and has no dropout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from attn_probe.models.gpt import GPT, GPTConfig

#: Byte-level vocabulary, and the encoder's extra id for a masked byte.
VOCAB = 256
MASK = VOCAB

#: A parameter and the index of the part of it that belongs to one layer's queries and keys.
Rows = list[tuple[Tensor, tuple[slice, ...]]]


@dataclass(frozen=True)
class Shape:
    """The size of every family's model."""

    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 64


@dataclass(frozen=True)
class Family:
    """How to build, run and reach into one family's model."""

    name: str
    build: Callable[[Shape], nn.Module]
    #: ``logits(model, tokens)`` -> (B, T, vocabulary)
    logits: Callable[[nn.Module, Tensor], Tensor]
    #: ``qk_rows(model, layer)``: the query and key weights (and biases) of ``layer``
    qk_rows: Callable[[nn.Module, int], Rows]
    #: trained by masked-language modelling (bidirectional) instead of next-token prediction
    masked: bool = False


def _transformers():
    try:
        import transformers
    except ImportError as error:
        raise ImportError(
            'the llama, gpt2 and encoder families need Hugging Face transformers: '
            'pip install "attn_probe[hf]"'
        ) from error
    return transformers


def _hf(cls_name: str, config) -> nn.Module:
    cls = getattr(_transformers(), cls_name)
    model = cls._from_config(config, attn_implementation="sdpa")
    assert model.config._attn_implementation == "sdpa", model.config._attn_implementation
    return model


def _hf_logits(model: nn.Module, tokens: Tensor) -> Tensor:
    return model(input_ids=tokens).logits


# --- gpt --------------------------------------------------------------------------------------


def _build_gpt(shape: Shape) -> nn.Module:
    return GPT(GPTConfig(vocab_size=VOCAB, block_size=shape.block_size, n_layer=shape.n_layer,
                         n_head=shape.n_head, n_embd=shape.n_embd))


def _gpt_logits(model: nn.Module, tokens: Tensor) -> Tensor:
    return model(tokens)[0]


def _gpt_rows(model: nn.Module, layer: int) -> Rows:
    linear = model.transformer.h[layer].attn.c_attn  # nn.Linear: (3·width, width), rows q|k|v
    qk = slice(0, 2 * model.config.n_embd)
    return [(linear.weight, (qk, slice(None))), (linear.bias, (qk,))]


# --- llama ------------------------------------------------------------------------------------


def _build_llama(shape: Shape) -> nn.Module:
    config = _transformers().LlamaConfig(
        hidden_size=shape.n_embd, intermediate_size=4 * shape.n_embd,
        num_hidden_layers=shape.n_layer, num_attention_heads=shape.n_head,
        num_key_value_heads=shape.n_head // 2, vocab_size=VOCAB,
        max_position_embeddings=shape.block_size, bos_token_id=0, eos_token_id=0,
        pad_token_id=0,
    )
    return _hf("LlamaForCausalLM", config)


def _llama_rows(model: nn.Module, layer: int) -> Rows:
    attn = model.model.layers[layer].self_attn
    return [(p, (slice(None),)) for linear in (attn.q_proj, attn.k_proj)
            for p in (linear.weight, linear.bias) if p is not None]


# --- gpt2 -------------------------------------------------------------------------------------


def _build_gpt2(shape: Shape) -> nn.Module:
    config = _transformers().GPT2Config(
        n_layer=shape.n_layer, n_head=shape.n_head, n_embd=shape.n_embd, vocab_size=VOCAB,
        n_positions=shape.block_size, bos_token_id=0, eos_token_id=0,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    return _hf("GPT2LMHeadModel", config)


def _gpt2_rows(model: nn.Module, layer: int) -> Rows:
    conv = model.transformer.h[layer].attn.c_attn  # Conv1D: (width, 3·width), columns q|k|v
    qk = slice(0, 2 * model.config.n_embd)
    return [(conv.weight, (slice(None), qk)), (conv.bias, (qk,))]


def add_key_bias(model: nn.Module, norm: float, seed: int = 0) -> None:
    """Add one constant vector of length ``norm`` per head (the same in every layer) to every
    layer's key bias of a ``gpt2`` model. Each query's scores all move by the same amount
    (``q·b·scale``), which softmax ignores: attention, outputs and gradients do not change, but
    the raw largest logit does."""
    width, heads = model.config.n_embd, model.config.n_head
    vector = torch.randn(heads, width // heads, generator=torch.Generator().manual_seed(seed))
    vector = (vector * (norm / vector.norm(dim=1, keepdim=True))).flatten()
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_attn.bias[width : 2 * width] += vector


# --- encoder ----------------------------------------------------------------------------------


def _build_encoder(shape: Shape) -> nn.Module:
    transformers = _transformers()
    if not hasattr(transformers, "ModernBertForMaskedLM"):
        raise ImportError(f"the encoder family is ModernBERT, which needs Hugging Face "
                          f"transformers >= 4.48 (this is {transformers.__version__}): "
                          "pip install -U transformers")
    # Every layer global: layer_types since transformers 5, global_attn_every_n_layers before.
    config = transformers.ModernBertConfig(
        hidden_size=shape.n_embd, intermediate_size=2 * shape.n_embd,
        num_hidden_layers=shape.n_layer, num_attention_heads=shape.n_head,
        layer_types=["full_attention"] * shape.n_layer, global_attn_every_n_layers=1,
        vocab_size=VOCAB + 1,
        max_position_embeddings=shape.block_size, pad_token_id=0, mask_token_id=MASK,
        bos_token_id=0, eos_token_id=0, cls_token_id=0, sep_token_id=0,
    )
    return _hf("ModernBertForMaskedLM", config)


def _encoder_rows(model: nn.Module, layer: int) -> Rows:
    linear = model.model.layers[layer].attn.Wqkv  # nn.Linear: (3·width, width), rows q|k|v
    qk = slice(0, 2 * model.config.hidden_size)
    return [(linear.weight, (qk, slice(None)))] + (
        [(linear.bias, (qk,))] if linear.bias is not None else [])


def mask_bytes(tokens: Tensor, share: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``(inputs, targets)`` for masked-language modelling: ``share`` of the bytes (at least one
    per sequence) replaced by :data:`MASK` in the inputs, their bytes as targets, -100 (ignored)
    elsewhere."""
    chosen = torch.rand(tokens.shape, generator=generator) < share
    chosen[torch.arange(len(tokens)), torch.randint(tokens.shape[1], (len(tokens),),
                                                    generator=generator)] = True
    return tokens.masked_fill(chosen, MASK), tokens.masked_fill(~chosen, -100)


FAMILIES: dict[str, Family] = {
    "gpt": Family("gpt", _build_gpt, _gpt_logits, _gpt_rows),
    "llama": Family("llama", _build_llama, _hf_logits, _llama_rows),
    "gpt2": Family("gpt2", _build_gpt2, _hf_logits, _gpt2_rows),
    "encoder": Family("encoder", _build_encoder, _hf_logits, _encoder_rows, masked=True),
}
