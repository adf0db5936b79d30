"""Sums and counts: per-sequence head metrics merged over passes and processes into layer figures.

State is kept the torchmetrics way: each state is declared once, in :data:`STATES`, with the
reduction that merges two of them, so adding the sequences of another forward pass and adding
another process's sequences are one mechanism (:meth:`HeadAccumulator.merge`), and
:meth:`HeadAccumulator.compute` divides once. The torch.distributed facts the probe needs (who
writes, gathering every process's state) live here too, safe to call without a process group.
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping

import numpy as np
import torch
import torch.distributed as dist

from .figures import FIGURES
from .snapshot import LayerSummary

MEANS = tuple(f.name for f in FIGURES.values() if f.over_sequences == "mean")
MAXIMA = tuple(f.name for f in FIGURES.values() if f.over_sequences == "max")


def derived(heads: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The ``"derived"`` figures of :data:`~attn_probe.figures.FIGURES` from the combined
    others: ``alignment = logit_spread / (query_norm * key_norm)``."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return {"alignment": heads["logit_spread"] / (heads["query_norm"] * heads["key_norm"])}

#: Each state of one layer: (name, dtype, reduction, the reduction's identity: what a head
#: that measured nothing holds). ``sums``: (H, len(MEANS)) sums of the figures averaged over
#: sequences; ``maxima``: (H, len(MAXIMA)) largest values of the others; ``counts``: (H, 2)
#: finite sequences behind the crop and the full-context figures; ``nonfinite``: (H,)
#: sequences whose attention had NaN or Inf entries.
STATES: tuple[tuple[str, type, Callable[[np.ndarray, np.ndarray], np.ndarray], float], ...] = (
    ("sums", np.float64, np.add, 0),
    ("maxima", np.float64, np.maximum, -np.inf),
    ("counts", np.int64, np.add, 0),
    ("nonfinite", np.int64, np.add, 0),
)
_GROUPS = ("crop", "full")

State = Mapping[str, Mapping[str, np.ndarray]]  # layer -> state name -> array


class HeadAccumulator:
    """Per-layer sums and counts of per-sequence head metrics.

    ``update`` adds a batch of per-sequence metrics, ``merge`` adds another accumulator's state
    (another forward pass, another process), ``compute`` divides once, ``reset`` empties.
    """

    def __init__(self) -> None:
        self._layers: dict[str, dict[str, np.ndarray]] = {}

    def __bool__(self) -> bool:
        return bool(self._layers)

    def update(self, layer: str, metrics: Mapping[str, torch.Tensor], *, first_head: int = 0,
               num_heads: int | None = None) -> None:
        """Add per-sequence figures of one layer: each value is a (B, H) tensor.

        ``first_head`` and ``num_heads``: the H heads are heads ``first_head`` to
        ``first_head + H - 1`` of a layer of ``num_heads`` (default: H) heads, split over
        processes (tensor parallelism); the others hold the reductions' identities, so that
        merging processes combines each head only with itself.

        ``metrics`` holds what :func:`~attn_probe.metrics.head_metrics` returns and, where the
        capture saw q and k, what :func:`~attn_probe.metrics.full_context_metrics`
        returns. Sequences whose attention held NaN or Inf (``rank == -1``) are counted as
        non-finite and kept out of the figures.
        """
        rank = metrics["rank"]
        if rank.dim() != 2:
            raise ValueError(f"expected (sequences, heads) metrics, got shape {tuple(rank.shape)}")
        per_sequence = dict(metrics, first_key_dominant=metrics["dominant"] == 0)
        finite = {"crop": rank >= 0, "full": torch.zeros_like(rank, dtype=torch.bool)}
        if "columns_full" in metrics:
            finite["full"] = metrics["columns_full"] >= 0
            per_sequence["first_key_dominant_full"] = metrics["dominant_full"] == 0

        def stacked(names: tuple[str, ...], empty: float) -> torch.Tensor:
            columns = []
            for name in names:
                ok = finite[FIGURES[name].scope]
                value = per_sequence.get(name)
                value = torch.full_like(rank, empty, dtype=torch.float64) if value is None \
                    else value.double()
                columns.append(torch.where(ok, value, torch.full_like(value, empty)))
            return torch.stack(columns, dim=-1)

        part = {
            "sums": stacked(MEANS, 0.0).sum(0).cpu().numpy(),
            "maxima": stacked(MAXIMA, -np.inf).amax(0).cpu().numpy(),
            "counts": torch.stack([finite[g] for g in _GROUPS], -1).sum(0).cpu().numpy(),
            "nonfinite": (~finite["crop"]).sum(0).cpu().numpy(),
        }
        heads = rank.size(1)
        if num_heads is not None and num_heads != heads:
            if not 0 <= first_head <= num_heads - heads:
                raise ValueError(f"heads {first_head} to {first_head + heads - 1} are not heads "
                                 f"of a layer of {num_heads}")
            for name, dtype, _, identity in STATES:
                placed = np.full((num_heads,) + part[name].shape[1:], identity, dtype=dtype)
                placed[first_head:first_head + heads] = part[name]
                part[name] = placed
        self.merge({layer: part})

    def state(self) -> dict[str, dict[str, np.ndarray]]:
        """A picklable copy of the state, for reduction across processes."""
        return {layer: {name: s.copy() for name, s in states.items()}
                for layer, states in self._layers.items()}

    def merge(self, state: State) -> None:
        """Combine another state into this one, each array by its declared reduction."""
        for layer, part in state.items():
            mine = self._layers.get(layer)
            if mine is None:
                self._layers[layer] = {name: np.array(part[name], dtype=dtype)
                                       for name, dtype, _, _ in STATES}
                continue
            if mine["counts"].shape != part["counts"].shape:
                raise ValueError(
                    f"layer {layer!r}: cannot merge {part['counts'].shape[0]} heads into "
                    f"{mine['counts'].shape[0]}; every process must probe the same model"
                )
            for name, _, reduction, _ in STATES:
                mine[name] = reduction(mine[name], part[name])

    def reduce(self, all_gather: Callable[[object], Iterable[object]]) -> None:
        """Replace the state by the combination over processes.

        ``all_gather`` takes this process's picklable state and returns every process's (e.g.
        :func:`all_gather_object`). A process with nothing measured contributes an empty state,
        so no process waits on a collective the others skip.
        """
        states = list(all_gather(self.state()))
        self.reset()
        for state in states:
            self.merge(state)

    def compute(self, order: Iterable[str]) -> tuple[LayerSummary, ...]:
        """Per-head means for each layer in ``order`` that has any data (lazy heads are the
        lazy rule's to mark: :meth:`attn_probe.alerts.AlertRules.judge_lazy`)."""
        summaries = []
        for index, name in enumerate(order):
            if name not in self._layers:
                continue
            state = self._layers[name]
            counts = state["counts"]
            group = {g: counts[:, i] for i, g in enumerate(_GROUPS)}
            heads = {}
            with np.errstate(invalid="ignore", divide="ignore"):
                for i, figure in enumerate(MEANS):
                    heads[figure] = state["sums"][:, i] / group[FIGURES[figure].scope]
            for i, figure in enumerate(MAXIMA):
                heads[figure] = state["maxima"][:, i].copy()
            heads.update(derived(heads))
            for figure, values in heads.items():
                values[group[FIGURES[figure].scope] == 0] = np.nan
            summaries.append(LayerSummary(
                name=name, index=index, heads=heads, counts=group["crop"].copy(),
                nonfinite=state["nonfinite"].copy(), full_counts=group["full"].copy(),
            ))
        return tuple(summaries)

    def reset(self) -> None:
        self._layers.clear()


# ------------------------------------------------------------------------ torch.distributed


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_main_process() -> bool:
    """Process 0 writes files; every process measures."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def all_gather_object(obj: object) -> list[object]:
    """Every process's ``obj`` (just ``[obj]`` without a process group).

    A collective over the default group: every process must call it, the same number of times.
    With NCCL the objects travel through the current CUDA device, so each process must have
    called ``torch.cuda.set_device(local_rank)`` first (as torchrun scripts do).
    """
    if not is_distributed():
        return [obj]
    gathered: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered
