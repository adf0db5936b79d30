"""Attention probabilities from the query and key a kernel was given.

Every capture strategy ends here: interception hands over the arguments of
``scaled_dot_product_attention``, adapters recompute q and k from a module's weights. This file
turns (q, k, mask) into A = softmax(q·kᵀ·scale + mask) exactly as the kernel defines it, for the
sampled sequences and tokens only.

Cropping to ``max_tokens`` keeps the first T queries and the first T keys. When the mask stops
those queries from seeing any later key (causal attention, sliding windows, left-aligned padding)
the cropped matrix is exactly the attention matrix of the T-token prefix. Otherwise
(bidirectional attention) the rows are still the model's true probabilities over *all* keys,
restricted to the first T columns, so they may sum to less than 1.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _as_4d(mask: Tensor) -> Tensor:
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    return mask


def _take_sequences(t: Tensor, n: int) -> Tensor:
    return t[:n] if t.size(0) > n else t


def _sees_beyond(mask: Tensor | None, t: int, s: int) -> bool:
    """Whether any of the first ``t`` queries may attend to a key at position >= ``t``."""
    if t >= s:
        return False
    if mask is None:
        return True
    tail = mask[..., :t, t:]
    if mask.dtype == torch.bool:
        return bool(tail.any())
    return bool((tail > -math.inf).any())


def attention_probabilities(
    query: Tensor,
    key: Tensor,
    *,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    max_sequences: int | None = None,
    max_tokens: int | None = None,
) -> Tensor:
    """Rebuild A (B, H, T, S) in float32 from the inputs of an SDPA call.

    Follows ``torch.nn.functional.scaled_dot_product_attention``: ``query`` (B, H, L, E),
    ``key`` (B, H_kv, S, E) with H a multiple of H_kv (grouped-query heads are expanded to the
    query heads), ``attn_mask`` broadcastable to (B, H, L, S), boolean (True = may attend) or
    additive, ``is_causal`` aligned to the top-left corner, ``scale`` defaulting to 1/sqrt(E).
    Only the first ``max_sequences`` sequences and ``max_tokens`` tokens are materialised.
    Queries that may attend to no key at all get a row of zeros, not NaN.
    """
    if query.dim() == 3:  # (B, L, E): one head; a (B, L, S) mask is per sequence
        query, key = query.unsqueeze(1), key.unsqueeze(1)
        if attn_mask is not None and attn_mask.dim() == 3:
            attn_mask = attn_mask.unsqueeze(1)
    if query.dim() != 4 or key.dim() != 4:
        raise ValueError(
            f"expected query (B, H, L, E) and key (B, H_kv, S, E), got {tuple(query.shape)} "
            f"and {tuple(key.shape)}"
        )
    n = query.size(0) if max_sequences is None else min(query.size(0), max_sequences)
    heads, kv_heads = query.size(1), key.size(1)
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads cannot share {kv_heads} key heads evenly")
    length, keys = query.size(2), key.size(2)
    t = length if max_tokens is None else min(length, max_tokens)
    s_out = keys if max_tokens is None else min(keys, max_tokens)

    with torch.no_grad(), torch.autocast(query.device.type, enabled=False):
        q = _take_sequences(query.detach(), n)[:, :, :t].float()
        k = _take_sequences(key.detach(), n)
        mask = None
        if attn_mask is not None:
            mask = _take_sequences(_as_4d(attn_mask.detach()), n)[..., :t, :]
        if is_causal:
            causal = torch.ones(t, keys, dtype=torch.bool, device=q.device).tril()
            mask = causal if mask is None else _combine(mask, causal)
        s = keys if _sees_beyond(mask, t, keys) else min(keys, max(t, s_out))
        k = k[:, :, :s].float()
        if kv_heads != heads:
            k = k.repeat_interleave(heads // kv_heads, dim=1)
        scores = torch.matmul(q, k.transpose(-2, -1))
        scores.mul_(1.0 / math.sqrt(q.size(-1)) if scale is None else scale)
        if mask is not None:
            mask = mask[..., :s]
            if mask.dtype == torch.bool:
                scores.masked_fill_(~mask, -math.inf)
            else:
                scores.add_(mask.float())
        blocked = torch.isneginf(scores).all(dim=-1, keepdim=True)
        probs = torch.softmax(scores, dim=-1).masked_fill_(blocked, 0.0)
        return probs[..., :s_out]


def _combine(mask: Tensor, causal: Tensor) -> Tensor:
    if mask.dtype == torch.bool:
        return mask & causal
    return torch.where(causal, mask.float(), -math.inf)
