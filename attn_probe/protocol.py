"""Offline measurement: the attention matrices of one pass, and the paper's N × T protocol.

:func:`capture` records every monitored head's attention matrix during forward passes you run
yourself. :func:`rank_profile` runs the protocol of "When Attention Collapses" (arXiv
2404.08634): N = 100 sequences of T = 100 tokens, each head's rank@tau averaged over the
sequences, and a layer's MaxRank the largest of its heads' averages.

>>> with attn_probe.capture(model, CaptureOptions(batch_rows=4, crop=128)) as cap:
...     model(tokens)
>>> cap.attention["model.layers.0.self_attn"].shape     # (B, H, T, T), float32
>>> cap.metrics(tau=0.9)["model.layers.0.self_attn"]["rank"]   # (B, H) rank@90%
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import Tensor, nn

from .aggregate import HeadAccumulator
from .alerts import AlertMonitor, AlertRules
from .attention import (
    AttentionInputs, AttentionScores, Observed, Recorder, plan_sites, probabilities,
)
from .metrics import full_context_metrics, head_metrics, thread_budget
from .options import EVERYTHING, ONE_TOKEN, CaptureOptions, check_capture, check_count, check_tau
from .snapshot import Snapshot


class Capture:
    """Attention matrices of the forward passes inside a ``with`` block, by module name.

    Inside one block each module's attention is taken from its *first* forward call; later
    calls are counted in :attr:`calls` but not recorded. :meth:`reset` makes the next call
    count again (one capture per batch, as :func:`rank_profile` does). Use :func:`capture` to
    make one.

    What one process sees: under tensor parallelism its own heads, numbered from 0 (head ``h``
    of the process holding slice ``r`` of ``tp`` is the model's head ``r·H/tp + h``), under
    context parallelism its own chunk of queries; ``tensor_parallel`` and
    ``context_parallel`` are the probe's options and are refused here.
    """

    def __init__(self, model: nn.Module, options: CaptureOptions = EVERYTHING) -> None:
        self.options = check_capture(options)
        if options.tensor_parallel is not None or options.context_parallel is not None:
            raise ValueError(
                "capture() and rank_profile() measure one process's heads and tokens, without "
                "collectives; tensor_parallel and context_parallel are AttentionProbe's: leave "
                "them None here")
        self.sites = plan_sites(model, options.modules, options.strategy)
        self._attention: dict[str, Tensor] = {}
        self._observed: dict[str, Observed] = {}
        self._recorder = Recorder(
            self.sites, self._record, batch_rows=options.batch_rows, crop=options.crop,
            strict=True, root=model,
        )

    def _record(self, name: str, observed: Observed) -> None:
        self._attention[name] = probabilities(observed, self.options.crop,
                                              self.options.matrix_budget,
                                              at_input_positions=True)
        if isinstance(observed, AttentionInputs):  # keep q and k as they were at this call
            observed = dataclasses.replace(
                observed, query=observed.query.clone(), key=observed.key.clone(),
                attn_mask=None if observed.attn_mask is None else observed.attn_mask.clone(),
            )
        if isinstance(observed, (AttentionInputs, AttentionScores)):
            observed = dataclasses.replace(observed, as_given=None)  # the model's own tensors
        self._observed[name] = observed

    def _measured(self, name: str, crop: int | None = None) -> Tensor:
        """The matrix the figures measure: as :attr:`attention` (or :meth:`matrix`, for
        another crop), padding left out."""
        if crop is not None and crop != self.options.crop:
            return self.matrix(name, crop)
        observed = self._observed[name]
        if isinstance(observed, Tensor) or observed.key_padding is None:
            return self._attention[name]
        return probabilities(observed, self.options.crop, self.options.matrix_budget)

    @property
    def modules(self) -> list[str]:
        return [site.name for site in self.sites]

    @property
    def attention(self) -> dict[str, Tensor]:
        """Module name -> (B, H, T, S) float32 attention probabilities, in model order. Row i
        and column j are positions i and j of the input (the first ``crop``); the rows
        and columns of padding are zero."""
        return {n: self._attention[n] for n in self.modules if n in self._attention}

    @property
    def calls(self) -> dict[str, int]:
        """Forward calls seen per module since the capture started."""
        return dict(self._recorder.calls)

    def matrix(self, name: str, crop: int | None = None) -> Tensor:
        """``name``'s (B, H, T, S) attention cropped to the first ``crop`` tokens (None:
        as recorded), rebuilt from what its kernel was given: another crop of the recorded
        call, without running the model again. At the recorded crop this is
        :attr:`attention` (input positions); at another crop a padded sequence's real tokens
        come first (padding left out, as the figures measure it)."""
        attention = self.attention[name]
        if crop is None or crop == self.options.crop:
            return attention
        check_count("crop", crop, minimum=2, why=ONE_TOKEN)
        return probabilities(self._observed[name], crop, self.options.matrix_budget)

    def metrics(self, tau: float | None = None, *, modules: Iterable[str] | None = None,
                crop: int | None = None) -> dict[str, dict[str, Tensor]]:
        """Module name -> figure -> (B, H) tensor: ``rank``, ``columns``, ``entropy``, ``sink``,
        ``dominant`` of the (cropped) matrix, and, where the capture saw q and k (or an eager
        softmax's scores), the full-sequence ``*_full`` figures and ``max_logit``
        (see :mod:`attn_probe.metrics.streamed`). Padding is left out: a padded sequence
        gives the figures of the same sequence run alone, its first ``crop`` real
        tokens. ``tau``: default the options'; ``modules``: only these recorded modules
        (default: all); ``crop``: the figures of another crop (see :meth:`matrix`)."""
        tau = self.options.tau if tau is None else check_tau(tau)
        names = list(self.attention) if modules is None else list(modules)
        missing = [name for name in names if name not in self._attention]
        if missing:
            raise KeyError(f"nothing was recorded for {missing}; recorded: {list(self.attention)}")
        return {name: _figures(self._measured(name, crop), self._observed[name], tau,
                               self.options)
                for name in names}

    def reset(self) -> None:
        """Forget what was recorded; the next forward call of each module is recorded."""
        self._attention.clear()
        self._observed.clear()
        self._recorder.arm()

    def __enter__(self) -> "Capture":
        self._recorder.attach()
        self._recorder.arm()
        return self

    def __exit__(self, *exc) -> None:
        self._recorder.detach()

    def __iter__(self) -> Iterator[tuple[str, Tensor]]:
        return iter(self.attention.items())


def capture(model: nn.Module, options: CaptureOptions = EVERYTHING) -> Capture:
    """Record the attention probabilities of ``model``'s attention modules during the forward
    passes run inside the ``with`` block.

    ``options`` (:class:`~attn_probe.CaptureOptions`) says which modules and how much of each
    call; by default every row of the batch and every token. In :attr:`Capture.attention` row i
    and column j are positions i and j of the input, and the rows and columns of padding are
    zero; :meth:`Capture.metrics` leaves padding out. For causal attention the first ``crop``
    tokens give exactly the attention of that prefix. A call whose float32 matrix would take
    more than ``options.matrix_budget`` bytes raises ``MemoryError`` saying how to crop, before
    anything is allocated.
    """
    return Capture(model, options)


def _figures(attention: Tensor, observed: Observed, tau: float,
             options: CaptureOptions) -> dict[str, Tensor]:
    """Every per-head figure of one module and pass: the matrix's and the full sequence's."""
    with thread_budget(options.threads, attention):
        figures = head_metrics(attention, tau)
        figures.update(full_context_metrics(observed, tau, options.memory_budget))
    return figures


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
    sequences: int = 100,
    capture: CaptureOptions = EVERYTHING,
    alerts: AlertRules | None = AlertRules(),
    samples: bool = False,
    on_batch: Callable[[int], None] | None = None,
) -> Snapshot:
    """Per-head mean rank@tau, columns@tau, entropy and sink mass over ``sequences``
    sequences (the paper's N).

    ``batches`` yields model inputs: a token tensor (``model(x)``), a tuple (``model(*x)``) or a
    dict (``model(**x)``), batch first. Batches are consumed until ``sequences`` sequences
    have been measured; runs under ``torch.no_grad`` and leaves the model's mode as it is.
    ``capture`` (:class:`~attn_probe.CaptureOptions`): which modules, tau, and the crop of the
    matrices (default: every token). The result is a :class:`~attn_probe.snapshot.Snapshot`:
    ``snapshot.layers[i].heads["rank"]`` is layer i's per-head average,
    ``snapshot.max_rank_profile()`` the MaxRank per layer; the ``*_full`` figures and
    ``max_logit`` cover every token of each sequence even when the crop is shorter;
    ``snapshot.alerts`` holds what ``alerts`` (see :mod:`attn_probe.alerts`; None: none) finds
    in the averaged figures, whose lazy rule also marks the lazy heads (none without it). With
    ``samples=True`` it keeps each layer's attention of the first sequence in
    ``snapshot.samples`` (for heatmaps; at input positions, as :attr:`Capture.attention`).
    ``on_batch(n)`` is called with the sequences measured so far (for a progress bar).
    """
    check_count("sequences", sequences)
    options = check_capture(capture)
    accumulator = HeadAccumulator()
    kept: dict[str, Tensor] = {}
    measured = 0
    with Capture(model, options) as cap:
        for batch in batches:
            take = min(_batch_size(batch), options.batch_rows or math.inf, sequences - measured)
            cap.reset()
            with torch.no_grad():
                _call(model, batch)
            for name, attention in cap.attention.items():
                if attention.shape[-2] < 2:
                    raise ValueError(
                        f"rank_profile: {name} attended over {attention.shape[-2]} token; "
                        f"give batches of at least 2 tokens ({ONE_TOKEN})"
                    )
            for name, figures in cap.metrics().items():
                accumulator.update(name, {k: v[:take] for k, v in figures.items()})
            for name, attention in cap.attention.items():
                if samples and name not in kept:
                    kept[name] = attention[0].float().cpu()
            measured += take
            if on_batch is not None:
                on_batch(measured)
            if measured >= sequences:
                break
        order = cap.modules
    if measured == 0:
        raise ValueError("rank_profile got no batches: pass an iterable of model inputs")
    snapshot = Snapshot(step=0, tau=options.tau, layers=accumulator.compute(order),
                        samples=kept)
    if alerts is not None:
        snapshot = AlertMonitor(alerts).judge(snapshot)
    return snapshot
