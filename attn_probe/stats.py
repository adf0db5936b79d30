"""Aggregation of per-sequence head metrics into per-head and per-layer figures.

State is kept as sums and counts (the torchmetrics way), so averaging over sequences, over the
forward passes of a measured step and over distributed ranks is one mechanism: add sums, add
counts, divide once in :meth:`HeadAccumulator.compute`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

import numpy as np
import torch

#: Per-head figures averaged over sequences. ``first_key_dominant`` is the share of sequences in
#: which key 0 is the column with the most squared mass (the attention sink dominates).
METRICS = ("rank", "columns", "entropy", "sink", "first_key_dominant")


@dataclass(frozen=True)
class CollapseRule:
    """When a head, and a layer, count as lazy (collapsed).

    A head is lazy when its mean rank@tau is at most ``max_rank`` and its mean columns@tau is at
    most ``max_columns``: every query attends to (nearly) the same single key, as in the deep
    layers of the paper "When Attention Collapses". A layer is lazy when at least
    ``min_lazy_share`` of its heads are lazy (default: all of them).
    """

    max_rank: float = 1.5
    max_columns: float = 1.5
    min_lazy_share: float = 1.0

    def __post_init__(self) -> None:
        if self.max_rank < 1 or self.max_columns < 1:
            raise ValueError(
                f"CollapseRule thresholds must be >= 1 (got max_rank={self.max_rank}, "
                f"max_columns={self.max_columns}): rank and columns are at least 1"
            )
        if not 0 < self.min_lazy_share <= 1:
            raise ValueError(
                f"CollapseRule.min_lazy_share must be in (0, 1], got {self.min_lazy_share}"
            )

    def lazy_heads(self, rank: np.ndarray, columns: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore"):
            return (rank <= self.max_rank) & (columns <= self.max_columns)


@dataclass(frozen=True)
class LayerSummary:
    """One attention module's figures at one measured step."""

    name: str  #: module name, as in ``model.named_modules()``
    index: int  #: position among the monitored modules (the ``L07`` in tag names)
    heads: Mapping[str, np.ndarray]  #: metric -> (H,) mean over sequences (NaN: no data)
    sequences: np.ndarray  #: (H,) sequences with finite attention that went into the means
    nonfinite: np.ndarray  #: (H,) sequences whose attention had NaN or Inf entries
    lazy: np.ndarray  #: (H,) bool, per the collapse rule
    rule: CollapseRule = field(default_factory=CollapseRule)

    @property
    def num_heads(self) -> int:
        return int(self.sequences.shape[0])

    @property
    def tag(self) -> str:
        return f"L{self.index:02d}"

    def reduce(self, metric: str, how: str) -> float:
        """``max``, ``mean`` or ``min`` over heads of a per-head metric (NaN if no head has data)."""
        values = self.heads[metric][self.sequences > 0]
        if values.size == 0:
            return float("nan")
        return float({"max": np.max, "mean": np.mean, "min": np.min}[how](values))

    @property
    def lazy_share(self) -> float:
        has_data = self.sequences > 0
        return float(self.lazy[has_data].mean()) if has_data.any() else float("nan")

    @property
    def is_lazy(self) -> bool:
        share = self.lazy_share
        return bool(share == share and share >= self.rule.min_lazy_share)


@dataclass(frozen=True)
class Snapshot:
    """Everything measured at one step: the input of writers, plots and callbacks."""

    step: int
    tau: float
    layers: tuple[LayerSummary, ...]
    #: layer name -> (H, T, T) float32 CPU attention of the first measured sequence (for heatmaps)
    samples: Mapping[str, torch.Tensor] = field(default_factory=dict)

    def max_rank_profile(self) -> np.ndarray:
        """MaxRank per layer: the largest per-head mean rank@tau (the paper's profile)."""
        return np.array([layer.reduce("rank", "max") for layer in self.layers])

    @property
    def has_nonfinite(self) -> bool:
        return any(layer.nonfinite.sum() > 0 for layer in self.layers)


class HeadAccumulator:
    """Sums and counts of per-sequence head metrics, per layer.

    ``update`` adds a batch of per-sequence metrics, ``merge`` adds another accumulator's state
    (another forward pass, another rank), ``compute`` divides once, ``reset`` empties.
    """

    def __init__(self) -> None:
        self._sums: dict[str, np.ndarray] = {}  # layer -> (H, len(METRICS)) float64
        self._counts: dict[str, np.ndarray] = {}  # layer -> (H,) int64
        self._nonfinite: dict[str, np.ndarray] = {}  # layer -> (H,) int64

    def __bool__(self) -> bool:
        return bool(self._counts)

    def update(self, layer: str, metrics: Mapping[str, torch.Tensor]) -> None:
        """Add per-sequence metrics of one layer: each value is a (B, H) tensor.

        Sequences whose attention held NaN or Inf (``rank == -1``) are counted as non-finite
        and kept out of the means.
        """
        rank = metrics["rank"]
        if rank.dim() != 2:
            raise ValueError(f"expected (sequences, heads) metrics, got shape {tuple(rank.shape)}")
        finite = rank >= 0
        values = torch.stack(
            [
                rank.double(),
                metrics["columns"].double(),
                metrics["entropy"].double(),
                metrics["sink"].double(),
                (metrics["dominant"] == 0).double(),
            ],
            dim=-1,
        )
        values = torch.where(finite.unsqueeze(-1), values, torch.zeros_like(values))
        state = {
            "sums": values.sum(0).cpu().numpy(),
            "counts": finite.sum(0).cpu().numpy().astype(np.int64),
            "nonfinite": (~finite).sum(0).cpu().numpy().astype(np.int64),
        }
        self.merge({layer: state})

    def state(self) -> dict[str, dict[str, np.ndarray]]:
        """A picklable copy of the state, for reduction across processes."""
        return {
            name: {
                "sums": self._sums[name].copy(),
                "counts": self._counts[name].copy(),
                "nonfinite": self._nonfinite[name].copy(),
            }
            for name in self._counts
        }

    def merge(self, state: Mapping[str, Mapping[str, np.ndarray]]) -> None:
        for name, part in state.items():
            if name not in self._counts:
                self._sums[name] = np.zeros_like(part["sums"], dtype=np.float64)
                self._counts[name] = np.zeros_like(part["counts"], dtype=np.int64)
                self._nonfinite[name] = np.zeros_like(part["nonfinite"], dtype=np.int64)
            if self._counts[name].shape != part["counts"].shape:
                raise ValueError(
                    f"layer {name!r}: cannot merge {part['counts'].shape[0]} heads into "
                    f"{self._counts[name].shape[0]}; every process must probe the same model"
                )
            self._sums[name] += part["sums"]
            self._counts[name] += part["counts"]
            self._nonfinite[name] += part["nonfinite"]

    def reduce(self, all_gather: Callable[[object], Iterable[object]]) -> None:
        """Replace the state by the sum over processes.

        ``all_gather`` takes this process's picklable state and returns every process's (e.g. a
        wrapper of ``torch.distributed.all_gather_object``). A process with nothing measured
        contributes an empty state, so no process waits on a collective the others skip.
        """
        states = list(all_gather(self.state()))
        self.reset()
        for state in states:
            self.merge(state)

    def compute(
        self, order: Iterable[str], rule: CollapseRule = CollapseRule()
    ) -> tuple[LayerSummary, ...]:
        """Per-head means and lazy flags for each layer in ``order`` that has any data."""
        summaries = []
        for index, name in enumerate(order):
            if name not in self._counts:
                continue
            counts = self._counts[name]
            with np.errstate(invalid="ignore", divide="ignore"):
                means = self._sums[name] / counts[:, None]
            means[counts == 0] = np.nan
            heads = {metric: means[:, i] for i, metric in enumerate(METRICS)}
            summaries.append(
                LayerSummary(
                    name=name,
                    index=index,
                    heads=heads,
                    sequences=counts.copy(),
                    nonfinite=self._nonfinite[name].copy(),
                    lazy=rule.lazy_heads(heads["rank"], heads["columns"]),
                    rule=rule,
                )
            )
        return tuple(summaries)

    def reset(self) -> None:
        self._sums.clear()
        self._counts.clear()
        self._nonfinite.clear()
