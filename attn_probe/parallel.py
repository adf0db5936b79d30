"""Heads and tokens split over processes: tensor and context parallelism.

Under **tensor parallelism** each process runs a slice of every attention module's heads (its
``wq, wk, wv`` column-parallel, ``wo`` row-parallel): the kernel sees the local heads, numbered
from 0 on every process. :meth:`Parallelism.heads` says where they sit among the module's
heads, so that the accumulator keeps each head at its global index and the reduction over
processes only ever merges a head with itself (the same head on another data-parallel
replica). The split is found once per module: the process group the user names
(``CaptureOptions.tensor_parallel``), or else the module's own weights, when they are DTensors
sharded on their output dimension (``ColwiseParallel`` in ``parallelize_module``) over a device
mesh dimension: that dimension's size is the number of slices, this process's coordinate along
it its slice. A module whose declared number of heads (``n_heads``, ``num_heads``, ``n_head``,
``num_attention_heads``, or its ``config``'s) is a multiple of the heads its kernel sees, under
a process group, with neither, is left out with one warning: its heads are split, and nothing
says how.

Under **context parallelism** each process holds a chunk of one sequence's queries and attends
over the keys of the whole sequence (all-gathered), with a mask built from global positions.
:meth:`Parallelism.whole_sequence` gathers the chunks' query rows (and mask rows) of the
measured sequences over the context-parallel group, puts them in sequence order, and hands
the whole sequence to the group's first process, which measures it as if it had run unsplit;
the others measure nothing of that module (``CaptureOptions.context_parallel`` names the
group, ``context_layout`` the layout). Every figure is then the unsplit one: the crop is
the sequence's first tokens wherever they live, keys that the mask blocks for one chunk are not
taken for padding, and the sequence is counted once. Layouts: ``"contiguous"`` (process ``r``
of the group holds the ``r``-th chunk; chunks of any length) and ``"head_tail"`` (the
sequence cut into ``2W`` chunks, process ``r`` holding chunks ``r`` and ``2W-1-r``, one after
the other: the load-balanced layout of causal context parallelism). The keys the kernel sees
are the whole sequence's, in sequence order; or its own chunk's only (an adapter that rebuilds
q and k from the chunk's tokens), and then they are gathered too, in the same layout, and
``is_causal`` means causal over the whole sequence. What cannot be put together (a matrix from
a user adapter, a softmax or a per-query mask over the chunk's keys only) is left out, with one
warning.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import notices
from .attention import AttentionInputs, AttentionScores, Observed
from .options import CaptureOptions

#: Module attributes that declare a module's number of (query) heads, in the order looked at.
HEAD_COUNT_NAMES = ("n_heads", "num_heads", "n_head", "num_attention_heads")


def process_group(group: Any) -> "dist.ProcessGroup":
    """The process group of a ``ProcessGroup`` or of a one-dimensional ``DeviceMesh`` (what
    :class:`~attn_probe.CaptureOptions` takes as a group)."""
    return group if isinstance(group, dist.ProcessGroup) else group.get_group()


@dataclass(frozen=True)
class HeadShard:
    """This process's slice of a module's heads: slice ``index`` of ``count`` equal ones."""

    index: int = 0
    count: int = 1

    def globalise(self, figures: dict[str, Tensor]) -> tuple[dict[str, Tensor], int, int]:
        """``figures`` with ``kv_head`` numbered among the module's key/value heads, the
        global index of the first local head and the module's number of heads."""
        heads = next(iter(figures.values())).size(-1)
        if self.count == 1:
            return figures, 0, heads
        figures = dict(figures)
        kv = figures.get("kv_head")
        if kv is not None:  # key/value heads are split into as many equal slices
            local = int(kv.max()) + 1  # this slice's key/value heads (repeated ones count once)
            figures["kv_head"] = torch.where(kv >= 0, kv + self.index * max(local, 1), kv)
        return figures, self.index * heads, self.count * heads


UNSPLIT = HeadShard()


def declared_heads(module: nn.Module) -> int | None:
    """The number of heads ``module`` says it has (an attribute, or its config's), if any."""
    for owner in (module, getattr(module, "config", None)):
        for name in HEAD_COUNT_NAMES:
            value = getattr(owner, name, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def dtensor_split(module: nn.Module) -> tuple[HeadShard | None, str]:
    """The head slice that ``module``'s DTensor weights sharded on their output dimension
    give (None where there are none), or ``(None, why)`` when they disagree."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a build without distributed tensors
        return None, ""
    found: dict[tuple, HeadShard] = {}
    for parameter in module.parameters():
        if not isinstance(parameter, DTensor):
            continue
        mesh = parameter.device_mesh
        for dim, placement in enumerate(parameter.placements):
            if placement.is_shard(0) and mesh.size(dim) > 1:
                key = (tuple(mesh.mesh.flatten().tolist()), tuple(mesh.mesh.shape), dim)
                found[key] = HeadShard(mesh.get_local_rank(dim), mesh.size(dim))
    if len(found) > 1:
        return None, "its weights are sharded on their output dimension over several mesh " \
            "dimensions"
    return (next(iter(found.values())) if found else None), ""


class Parallelism:
    """The tensor- and context-parallel groups of one probe (``tensor_parallel``,
    ``context_parallel`` and ``context_layout`` of its :class:`~attn_probe.CaptureOptions`),
    and what was found per module."""

    def __init__(self, options: CaptureOptions) -> None:
        self.tensor_parallel = options.tensor_parallel
        self.context_parallel = options.context_parallel
        self.context_layout = options.context_layout
        self._shards: dict[str, HeadShard | None] = {}
        self._warned: set[str] = set()

    # tensor parallelism ------------------------------------------------------------------
    def heads(self, name: str, module: nn.Module, local_heads: int) -> HeadShard | None:
        """Where ``module``'s local heads sit among its heads (None: it cannot be told, and
        the module is not measured; said once)."""
        if name not in self._shards:
            self._shards[name] = self._find_shard(name, module, local_heads)
        return self._shards[name]

    def _find_shard(self, name: str, module: nn.Module, local_heads: int) -> HeadShard | None:
        if self.tensor_parallel is not None:
            group = process_group(self.tensor_parallel)
            return HeadShard(dist.get_rank(group), dist.get_world_size(group))
        shard, why = dtensor_split(module)
        if shard is not None:
            return shard
        declared = declared_heads(module)
        if not why and declared is not None and declared > local_heads \
                and declared % local_heads == 0 and dist.is_available() \
                and dist.is_initialized() and dist.get_world_size() > 1:
            why = (f"it declares {declared} heads and its kernel sees {local_heads}: its heads "
                   "are split over processes, and its weights are no DTensors that say how")
        if why:
            self._warn_once("heads", (
                f"attn_probe: {name!r} (and any other module like it) is not measured: {why}; "
                "name the group with tensor_parallel= so that each head keeps its own figures"))
            return None
        return UNSPLIT

    # context parallelism -----------------------------------------------------------------
    def whole_sequence(self, name: str, observed: Observed) -> Observed | None:
        """The measured sequences whole, on the context-parallel group's first process (None
        on the others); ``observed`` itself without context parallelism. A collective over the
        group: every process of it calls it for the same modules."""
        if self.context_parallel is None:
            return observed
        group = process_group(self.context_parallel)
        if dist.get_world_size(group) == 1:
            return observed
        layout = self.context_layout
        try:
            if isinstance(observed, AttentionInputs):
                whole = _whole_inputs(observed, group, layout)
            elif isinstance(observed, AttentionScores):
                whole = _whole_scores(observed, group, layout)
            else:  # a user adapter's own matrix
                raise NotWhole("its adapter hands over a matrix, not q and k")
        except NotWhole as why:
            self._warn_once(name, f"attn_probe: {name!r} is not measured under context "
                                  f"parallelism: {why}")
            return None
        return whole if dist.get_rank(group) == 0 else None

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            notices.warn(message)


def local_heads(observed: Observed) -> int:
    """The number of query heads in what the recorder observed."""
    if isinstance(observed, AttentionInputs):
        return observed.query.size(1)
    if isinstance(observed, AttentionScores):
        return observed.scores.size(1)
    return observed.size(1)


def _gather(t: Tensor, group, layout: str, dim: int = 2) -> Tensor:
    """``t``'s chunks along ``dim`` (queries, or keys) of every process of ``group``, in
    sequence order; chunks may differ in length."""
    t = t.contiguous()
    length = torch.tensor([t.size(dim)], dtype=torch.int64, device=t.device)
    lengths = [torch.empty_like(length) for _ in range(dist.get_world_size(group))]
    dist.all_gather(lengths, length, group=group)
    lengths = [int(n) for n in lengths]
    longest = max(lengths)
    wire = t.to(torch.uint8) if t.dtype == torch.bool else t
    if wire.size(dim) < longest:
        pad = list(wire.shape)
        pad[dim] = longest - wire.size(dim)
        wire = torch.cat([wire, wire.new_zeros(pad)], dim=dim)
    parts = [torch.empty_like(wire) for _ in lengths]
    dist.all_gather(parts, wire, group=group)
    parts = [p.narrow(dim, 0, n).to(t.dtype) for p, n in zip(parts, lengths)]
    if layout == "head_tail":  # process r: chunks r and 2W-1-r
        heads = [p.narrow(dim, 0, n // 2) for p, n in zip(parts, lengths)]
        tails = [p.narrow(dim, n // 2, n - n // 2) for p, n in zip(parts, lengths)]
        parts = heads + tails[::-1]
    return torch.cat(parts, dim=dim)


class NotWhole(ValueError):
    """A chunk of a sequence whose whole cannot be put together from what the kernel got."""


def _whole_inputs(observed: AttentionInputs, group, layout: str) -> AttentionInputs:
    """The kernel call of the whole sequences: every chunk's query rows and mask rows, the
    padding found again over the whole sequence (one chunk's blocked keys are not padding).

    A call that got its own chunk's keys only (an adapter rebuilding q and k from the chunk's
    tokens) gets every chunk's keys, and ``is_causal`` then means causal over the whole
    sequence; a mask of its own per query cannot be extended (:class:`NotWhole`)."""
    given = observed.as_given or observed
    query, key, mask = given.query, given.key, given.attn_mask
    if mask is not None:
        mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    if key.size(2) == query.size(2):  # this chunk's keys only
        if mask is not None and mask.size(2) > 1:
            raise NotWhole("its kernel got its chunk's keys only, with a mask per query")
        key = _gather(key, group, layout)
        if mask is not None and mask.size(3) > 1:  # a mask per key (padding)
            mask = _gather(mask, group, layout, dim=3)
        whole = AttentionInputs.of(_gather(query, group, layout), key, attn_mask=mask,
                                   is_causal=given.is_causal, scale=given.scale)
        return dataclasses.replace(whole, sink_logits=observed.sink_logits)
    if given.is_causal:  # what the kernel did with this chunk: top-left aligned
        causal = torch.ones(query.size(2), key.size(2), dtype=torch.bool,
                            device=query.device).tril()
        mask = causal if mask is None else (mask & causal if mask.dtype == torch.bool
                                            else mask.masked_fill(~causal, float("-inf")))
    if mask is not None and mask.size(2) == query.size(2):  # a row per query
        mask = _gather(mask, group, layout)
    whole = AttentionInputs.of(_gather(query, group, layout), key, attn_mask=mask,
                               scale=given.scale)
    return dataclasses.replace(whole, sink_logits=observed.sink_logits)


def _whole_scores(observed: AttentionScores, group, layout: str) -> AttentionScores:
    """An eager softmax's scores and probabilities of the whole sequences (a learned sink
    column put back, so that it is split off again as it was)."""
    given = observed.as_given or observed
    scores, probs = given.scores, given.probs
    if scores.size(-1) == scores.size(2):
        raise NotWhole("its softmax saw its chunk's keys only")
    if given.sink_mass is not None:
        scores = torch.cat([scores, scores.new_zeros(scores.shape[:3] + (1,))], dim=-1)
        probs = torch.cat([probs, given.sink_mass.unsqueeze(-1)], dim=-1)
    return AttentionScores.of(_gather(scores, group, layout), _gather(probs, group, layout))
