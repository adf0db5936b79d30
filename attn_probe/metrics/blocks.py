"""How a streaming pass divides its work so that it fits a memory budget.

Memory and cost
---------------
Besides its inputs the pass holds, in float64: the keys of one chunk of key heads
(``S * E`` per head), two score buffers of ``block * S`` per query head of the chunk (the
scores, then their exponentials), the scaled query block, the column masses (``H * S``, and
one block's), and per-row figures (``H * L``: maximum, entropy, attention on key 0, sink-logit
mass, allowed-key count); with a user mask or gaps in the padding, one boolean ``block * S``
per mask head; for a ``flex_attention`` call, per head, the block kinds, ``mask_mod``'s mask and
``score_mod``'s float64 temporaries (counted as 40 bytes per score).  The chunk and the block are chosen so that all of this, plus room for the BLAS
library to pack one key head's panel, fits ``memory_budget`` less a sixteenth kept for small
temporaries.  The key copy is also capped at 8 MiB and the score buffers at 16 MiB, because
larger ones fall out of the cache and are slower: the default 64 MiB is a bound the pass
usually stays well below (measured peak growth 25 MiB at ``T = 4096``, 28 MiB at 8192, for
``H = 8``, ``E = 64``).  The block never shrinks below one row nor the chunk below one key
head, so a budget below that minimum is exceeded by it.

Per block the work is one float64 GEMM, one ``exp`` and a few elementwise sweeps of the score
block.  With ``is_causal`` a block computes only the keys its last query can see (half the
work overall) and masks the triangle on its diagonal part only; no ``(L, S)`` mask is ever
built, and a user ``attn_mask`` is sliced to the block's rows, never expanded.  On 2 CPU
cores the pass takes about 1.8 times as long as the SDPA call it observes at ``T = 4096``
(``benchmarks/bench_full_context.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..options import DEFAULT_MEMORY_BUDGET

__all__ = ["DEFAULT_MEMORY_BUDGET", "BlockPlan", "block_rows", "plan_blocks"]

# Bytes held per score entry: the float64 scores and their float64 exponentials.
_SCORE_BYTES = 16
# Bytes per mask entry (per mask head) while a general mask is built: the boolean matrix and
# one temporary of the same size.
_MASK_BYTES = 2
# Bytes per score entry of a flex_attention call's block: block kinds and masks (int8, bool),
# the float64 result of score_mod and about three temporaries of it.
_FLEX_BYTES = 40
# Float64 vectors of block length alive at once per head (shift, sums, weights, ...).
_ROW_VECTORS = 12
# Share of the budget (1 / _RESERVE) left for what the plan does not count: allocator
# rounding, small temporaries.
_RESERVE = 16
# Upper bounds on the float64 key copy of a head chunk and on a block's two score buffers:
# larger ones fall out of the cache and are slower (measured on 2 cores with a 32 MiB L3),
# whatever the budget allows.
_KEYS_BYTES = 8 * 2**20
_BLOCK_BYTES = 16 * 2**20


def block_rows(heads: int, keys: int, budget: int, *, extra_per_row: int = 0) -> int:
    """Query rows per block so that the block's working memory fits ``budget`` bytes (>= 1).

    A block row holds two float64 score rows (scores and exponentials) for each of ``heads``
    heads over ``keys`` keys, i.e. ``16 * heads * keys`` bytes, plus ``extra_per_row`` bytes
    (the float64 query row, mask rows, per-row vectors).
    """
    per_row = _SCORE_BYTES * heads * keys + extra_per_row
    return max(1, int(budget) // max(1, per_row))


@dataclass(frozen=True)
class BlockPlan:
    """Key heads per chunk and query rows per block."""

    kv_chunk: int
    rows: int


def plan_blocks(heads: int, kv_heads: int, length: int, keys: int, dim: int, mask_heads: int,
                budget: int, *, row_figures: int, flex: bool = False) -> BlockPlan:
    """Key-head chunk and block rows such that everything the pass holds fits ``budget``.

    Held for the whole pass: the column masses (running sums and one block's), the
    ``row_figures`` per-row figures of all heads, and room for the BLAS library to pack one key head's panel (MKL's
    batched GEMM keeps such a buffer from its first call).  Per chunk: the float64 key copy,
    at most ``_KEYS_BYTES`` and half of what is left.  Per block row: the two score rows of
    each of the chunk's heads, its query row, per-row vectors and ``mask_heads`` boolean mask
    rows (``flex``: a ``flex_attention`` call's block mask and ``score_mod`` evaluated per
    head); the score buffers are capped at ``_BLOCK_BYTES``, and blocks of 8 rows or more are
    rounded down to a multiple of 8 (BLAS kernels work in panels of 8 rows).
    """
    group = heads // kv_heads
    usable = budget - budget // _RESERVE
    key_head = keys * dim * 8
    fixed = heads * (2 * keys + row_figures * length) * 8 + key_head  # + BLAS packing of k
    kv_chunk = max(1, min(kv_heads, min(_KEYS_BYTES, (usable - fixed) // 2) // key_head))
    chunk_heads = kv_chunk * group
    left = usable - fixed - kv_chunk * key_head
    extra = (chunk_heads * (dim + _ROW_VECTORS) * 8
             + min(mask_heads, chunk_heads) * keys * (_FLEX_BYTES if flex else _MASK_BYTES))
    rows = min(block_rows(chunk_heads, keys, left, extra_per_row=extra),
               block_rows(chunk_heads, keys, _BLOCK_BYTES))
    if rows >= 8:
        rows -= rows % 8
    return BlockPlan(kv_chunk=kv_chunk, rows=min(rows, max(1, length)))
