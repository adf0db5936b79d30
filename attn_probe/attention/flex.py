"""What a ``flex_attention`` call does to its scores, evaluated on any block of them.

``torch.nn.attention.flex_attention.flex_attention(q, k, v, score_mod, block_mask, scale,
enable_gqa)`` computes ``s = scale · q·k``, then ``score_mod(s, b, h, q_idx, kv_idx)``, then
keeps the keys its ``BlockMask`` allows, and takes the softmax. :class:`FlexScoring` holds the
two functions and the block lists of one call and applies them to a block of float64 scores of
one sequence (some heads, some query rows, some keys), so that the streamed figures
(:mod:`attn_probe.metrics.streamed`) and the matrix (:mod:`.rebuild`) see the scores the kernel
saw, in bounded memory: nothing of size T × T is ever built.

Which keys the block mask allows: every key of a *full* block, the keys of a *partial* block
where ``mask_mod`` allows, none of an unlisted block, as the compiled kernels visit them (a
window built from the block lists, as modded-nanogpt builds its sliding windows, is honoured);
the unfused kernel applies ``mask_mod`` alone, and the two agree for every ``BlockMask`` that
``create_block_mask`` makes. ``score_mod`` and ``mask_mod`` are evaluated with
``torch.vmap`` over heads, queries and keys (the way ``flex_attention``'s unfused kernel
evaluates them), at the true positions of the sequence: position-dependent modifications
(ALiBi, relative biases, document ids of packed sequences) see the indices the kernel gave them.
A flex call's sequences are measured at their input positions, as the mask says: with documents
packed in one sequence each query's figures are over the keys of its own document, and the sink
figure is the attention on the sequence's first key (which only the first document sees).

How the calls are seen: a ``flex_attention`` call reaches the higher-order operator
``flex_attention`` with the query and key as the kernel got them (key/value heads not repeated
for grouped-query attention), the ``score_mod``, the ``BlockMask`` as a tuple whose last item is
``mask_mod``, and the scale with its default filled in. Run eagerly, that operator is dispatched
through the torch-function modes, where the recorder's interception sees it; the recorder runs a
sampled module's forward under ``torch.compiler.set_stance("force_eager")``, because
``flex_attention`` otherwise compiles the operator with ``fullgraph=True`` and Dynamo would
trace into the interception mode.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

#: The name of the higher-order operator every ``flex_attention`` call reaches.
HOP_NAME = "flex_attention"

# Entries of the block table: what a (query block, key block) pair is.
_UNLISTED, _PARTIAL, _FULL = 0, 1, 2


def is_flex_call(func: Any) -> bool:
    """Whether ``func`` (as a torch-function mode sees it) is ``flex_attention``'s operator."""
    return isinstance(func, torch._ops.HigherOrderOperator) and getattr(
        func, "__name__", None) == HOP_NAME


def _index_context() -> contextlib.AbstractContextManager:
    """Indexing a tensor with a vmapped 0-d index (``doc_id[q_idx]``), as ``flex_attention``'s
    own kernels allow it."""
    try:
        from torch._dynamo._trace_wrapped_higher_order_op import TransformGetItemToIndex
    except ImportError:  # a torch without it: plain indexing
        return contextlib.nullcontext()
    return TransformGetItemToIndex()


def _over_heads_rows_keys(fn: Callable, with_score: bool) -> Callable:
    """``fn(b, h, q_idx, kv_idx)`` (``fn(score, b, h, q_idx, kv_idx)``), written for 0-d
    tensors, made to take ``h`` (H,), ``q_idx`` (N,), ``kv_idx`` (W,) (and scores (H, N, W))
    and return (H, N, W); ``b`` stays one sequence's 0-d index."""
    prefix = (0,) if with_score else ()
    for axis in (3, 2, 1):  # keys innermost, then queries, then heads
        dims = [None, None, None, None]
        dims[axis] = 0
        fn = torch.vmap(fn, in_dims=prefix + tuple(dims), out_dims=0)
    return fn


def _block_table(num_blocks: Tensor | None, indices: Tensor | None, kv_blocks: int,
                 value: int) -> Tensor | None:
    """(B', H', query blocks, key blocks) int8: ``value`` where the lists name the block."""
    if num_blocks is None or indices is None:
        return None
    cols = indices.size(-1)
    listed = torch.arange(cols, device=indices.device) < num_blocks.unsqueeze(-1)
    target = torch.where(listed, indices.long(), kv_blocks)  # unlisted entries: a spare column
    table = torch.zeros((*indices.shape[:-1], kv_blocks + 1), dtype=torch.int8,
                        device=indices.device)
    table.scatter_(-1, target.clamp(max=kv_blocks), value)
    return table[..., :kv_blocks]


@dataclass(frozen=True, eq=False)
class FlexScoring:
    """The ``score_mod``, ``mask_mod`` and block lists of one ``flex_attention`` call.

    ``blocks`` (B' or 1, H' or 1, query blocks, key blocks) int8: 0 unlisted, 1 partial (ask
    ``mask_mod``), 2 full; ``block_size`` (query rows, keys) per block. ``score_mod`` and
    ``mask_mod`` None where the call had none (or the identity / the mask that allows all).
    """

    score_mod: Callable | None
    mask_mod: Callable | None
    blocks: Tensor
    block_size: tuple[int, int]

    @classmethod
    def of_call(cls, score_mod: Callable | None, block_mask: Any) -> "FlexScoring":
        """From the operator's ``score_mod`` and its block mask (a ``BlockMask`` or the
        ``BlockMask.as_tuple()`` the operator gets)."""
        if not isinstance(block_mask, tuple):
            block_mask = block_mask.as_tuple()
        kv_num, kv_idx, full_num, full_idx = block_mask[2:6]
        q_block, kv_block, mask_mod = block_mask[-3], block_mask[-2], block_mask[-1]
        kv_len = int(block_mask[1])
        kv_blocks = max(1, -(-kv_len // int(kv_block)))
        table = _block_table(kv_num, kv_idx, kv_blocks, _PARTIAL)
        full = _block_table(full_num, full_idx, kv_blocks, _FULL)
        if full is not None:
            table = torch.maximum(table, full)
        from torch.nn.attention import flex_attention as flex

        if score_mod is getattr(flex, "_identity", None):
            score_mod = None
        if mask_mod is getattr(flex, "noop_mask", None):
            mask_mod = None
        return cls(score_mod, mask_mod, table, (int(q_block), int(kv_block)))

    def _table(self, b: int, h0: int, heads: int, r0: int, r1: int, k0: int, k1: int) -> Tensor:
        """(heads or 1, r1 - r0, k1 - k0) block kinds of sequence ``b``'s heads ``h0 ...``,
        rows and keys."""
        table = self.blocks[b if self.blocks.size(0) > 1 else 0]
        if table.size(0) > 1:  # block lists per head
            table = table[h0:h0 + heads]
        device = table.device
        rows = torch.arange(r0, r1, device=device) // self.block_size[0]
        keys = torch.arange(k0, k1, device=device) // self.block_size[1]
        rows = rows.clamp_(max=table.size(-2) - 1)
        keys = keys.clamp_(max=table.size(-1) - 1)
        return table[:, rows][:, :, keys]

    def key_end(self, b: int, r0: int, r1: int, keys: int) -> int:
        """One past the last key any head's rows ``[r0, r1)`` of sequence ``b`` may see (at
        most ``keys``): keys of blocks the lists leave out are never attended to."""
        table = self.blocks[b if self.blocks.size(0) > 1 else 0]
        rows = slice(r0 // self.block_size[0], (r1 - 1) // self.block_size[0] + 1)
        listed = (table[:, rows] != _UNLISTED).any(dim=0).any(dim=0).nonzero()
        if listed.numel() == 0:
            return 0
        return min(keys, (int(listed[-1]) + 1) * self.block_size[1])

    def apply(self, scores: Tensor, b: int, h0: int, r0: int, k0: int) -> Tensor:
        """Apply ``score_mod`` in place to ``scores`` (heads ``h0 ...``, rows ``r0 ...``, keys
        ``k0 ...`` of sequence ``b``; (H, N, W)) and return which of them the block mask allows
        (H, N, W) bool. Scores the mask leaves out keep whatever ``score_mod`` made of them."""
        heads, n, w = scores.shape
        device = scores.device
        kind = self._table(b, h0, heads, r0, r0 + n, k0, k0 + w).expand(heads, n, w)
        allowed = kind == _FULL
        partial = kind == _PARTIAL
        index = (torch.tensor(b, device=device), torch.arange(h0, h0 + heads, device=device),
                 torch.arange(r0, r0 + n, device=device), torch.arange(k0, k0 + w, device=device))
        with torch.no_grad(), _index_context():
            if self.mask_mod is None:
                allowed |= partial
            elif bool(partial.any()):
                mask = _over_heads_rows_keys(self.mask_mod, False)(*index)
                allowed |= partial & mask.to(device=device, dtype=torch.bool)
            if self.score_mod is not None:
                modified = _over_heads_rows_keys(self.score_mod, True)(scores, *index)
                scores.copy_(modified)
        return allowed
