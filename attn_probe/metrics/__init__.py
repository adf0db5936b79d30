"""Attention → per-head figures: of the matrix, and of the whole sequence without the matrix.

* :mod:`.matrix` — A (B, H, T, S) → rank@tau, columns@tau, row entropy, sink mass, dominant
  column (:func:`head_metrics`), exact against the float64 reference, batched over heads;
* :mod:`.streamed` — q and k (or an eager softmax's own scores) → the same kind of figures over
  every token of the sequence, plus the logit figures, streamed over blocks of queries in bounded
  memory (:func:`full_context_stats`, :func:`full_context_metrics`);
  :mod:`.scores` gives them from an eager softmax's own scores, :mod:`.blocks` sizes the blocks;
* :mod:`.exact` — the tau count both share, its rounding margin and the float64 context;
* :mod:`.threads` — the thread budget the figures are computed under on the CPU.

Data flows from :mod:`attn_probe.attention` into here and on to :mod:`attn_probe.aggregate`.
"""

from .matrix import columns_at, dominant_column, head_metrics, rank_at, row_entropy, sink_mass
from .blocks import DEFAULT_MEMORY_BUDGET, block_rows
from .scores import scores_stats
from .streamed import full_context_metrics, full_context_stats
from .threads import thread_budget

__all__ = [
    "DEFAULT_MEMORY_BUDGET",
    "block_rows",
    "columns_at",
    "dominant_column",
    "full_context_metrics",
    "full_context_stats",
    "head_metrics",
    "rank_at",
    "row_entropy",
    "scores_stats",
    "sink_mass",
    "thread_budget",
]
