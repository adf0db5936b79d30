"""The paper's protocol on a model at rest: average rank@tau over N sequences, MaxRank per layer.

"When Attention Collapses" (arXiv 2404.08634) measures N = 100 sequences of T = 100 tokens:
each head's rank@0.9 is averaged over the sequences, and a layer's MaxRank is the largest of
its heads' averages. :func:`rank_profile` does exactly that on any model ``capture`` supports.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import nn

from .capture import ModuleSelector, capture
from .metrics import head_metrics
from .stats import CollapseRule, HeadAccumulator, Snapshot


def _call(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def _batch_size(batch: Any) -> int:
    if isinstance(batch, dict):
        batch = batch.get("input_ids", next(iter(batch.values())))
    elif isinstance(batch, (tuple, list)):
        batch = batch[0]
    return int(batch.shape[0]) if isinstance(batch, torch.Tensor) and batch.dim() > 0 else 1


def rank_profile(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    n_sequences: int = 100,
    tau: float = 0.9,
    max_tokens: int | None = None,
    modules: ModuleSelector = None,
    strategy: str = "auto",
    rule: CollapseRule = CollapseRule(),
    on_batch: Callable[[int], None] | None = None,
) -> Snapshot:
    """Per-head mean rank@tau, columns@tau, entropy and sink mass over ``n_sequences`` sequences.

    ``batches`` yields model inputs: a token tensor (``model(x)``), a tuple (``model(*x)``) or a
    dict (``model(**x)``), batch first. Batches are consumed until ``n_sequences`` sequences have
    been measured; runs under ``torch.no_grad`` and leaves the model's mode as it is. The result
    is a :class:`~attn_probe.stats.Snapshot`: ``snapshot.layers[i].heads["rank"]`` is layer i's
    per-head average, ``snapshot.max_rank_profile()`` the MaxRank per layer. ``on_batch(n)``
    is called with the sequences measured so far (for a progress bar).
    """
    if n_sequences < 1:
        raise ValueError(f"n_sequences must be >= 1, got {n_sequences}")
    accumulator = HeadAccumulator()
    measured = 0
    with capture(model, modules=modules, max_tokens=max_tokens, strategy=strategy) as cap:
        for batch in batches:
            take = min(_batch_size(batch), n_sequences - measured)
            cap.reset()
            with torch.no_grad():
                _call(model, batch)
            for name, attention in cap.attention.items():
                accumulator.update(name, head_metrics(attention[:take], tau))
            measured += take
            if on_batch is not None:
                on_batch(measured)
            if measured >= n_sequences:
                break
        order = cap.modules
    if measured == 0:
        raise ValueError("rank_profile got no batches: pass an iterable of model inputs")
    return Snapshot(step=0, tau=tau, layers=accumulator.compute(order, rule))
