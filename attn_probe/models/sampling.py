"""Token sampling from a language model: the one sampler of the command line, the examples and
the tests, with or without a key/value cache.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
from torch import nn


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (the CPU for a model without any)."""
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def next_token_logits(output: Any, vocab_size: int | None = None) -> torch.Tensor | None:
    """The (B, T, V) next-token logits in a model's output (``.logits``, a tensor, or the first
    tensor of a tuple), or None when it holds none of vocabulary ``vocab_size``."""
    candidate = getattr(output, "logits", None)
    if candidate is None:
        if isinstance(output, torch.Tensor):
            candidate = output
        elif isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
            candidate = output[0]
    if not isinstance(candidate, torch.Tensor) or candidate.dim() != 3:
        return None
    if vocab_size is not None and candidate.shape[-1] != vocab_size:
        return None
    return candidate


def _cache_argument(model: nn.Module) -> str | None:
    """Name of the forward argument that takes a key/value cache, if any."""
    params = inspect.signature(model.forward).parameters
    return next((name for name in ("past_key_values", "cache") if name in params), None)


@torch.no_grad()
def sample_tokens(
    model: nn.Module,
    n_sequences: int,
    length: int,
    *,
    bos: int = 1,
    generator: torch.Generator | None = None,
    temperature: float = 1.0,
    call: Callable[[torch.Tensor], Any] | None = None,
) -> torch.LongTensor:
    """Ancestral sampling of ``n_sequences`` sequences of ``length`` tokens starting with ``bos``.

    A Hugging Face model (its forward takes ``past_key_values`` and ``input_ids``) is fed one
    token at a time with its key/value cache; any other model re-runs the whole prefix through
    ``call(tokens)`` (default ``model(tokens)``) and must return next-token logits. Returns a
    LongTensor on the model's device. Deterministic for a given ``generator`` state (the
    generator must live on the model's device, or on the CPU when sampling there);
    ``temperature == 0`` decodes greedily.
    """
    if n_sequences < 1:
        raise ValueError(f"n_sequences must be >= 1, got {n_sequences}")
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if context is not None and length > context:
        raise ValueError(f"length {length} exceeds the model's context of {context} tokens")

    device = model_device(model)
    tokens = torch.full((n_sequences, length), bos, dtype=torch.long, device=device)
    cache_name = _cache_argument(model) if call is None else None
    cache = None
    for pos in range(1, length):
        if cache_name is None:
            out = (call or model)(tokens[:, :pos])
        elif cache is None:
            out = model(input_ids=tokens[:, :pos], use_cache=True)
        else:
            out = model(input_ids=tokens[:, pos - 1 : pos], use_cache=True, **{cache_name: cache})
        if cache_name is not None:
            cache = getattr(out, cache_name, None) or getattr(out, "past_key_values", None)
        logits = next_token_logits(out)
        if logits is None:
            raise ValueError(f"{type(model).__name__} returned no next-token logits to sample")
        logits = logits[:, -1, :].float()
        if temperature == 0:
            tokens[:, pos] = logits.argmax(dim=-1)
            continue
        probs = torch.softmax(logits / temperature, dim=-1)
        if generator is not None and generator.device != probs.device:
            probs = probs.to(generator.device)
        tokens[:, pos] = torch.multinomial(probs, 1, generator=generator).squeeze(-1).to(device)
    return tokens
