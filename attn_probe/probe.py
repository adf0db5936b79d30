"""AttentionProbe: watch attention collapse during training and log it.

>>> with attn_probe.AttentionProbe(model, log_dir="runs/exp1", every=100) as probe:
...     for batch in loader:
...         loss = train_step(model, batch)
...         probe.step()

Step ``s`` is the work between the ``s``-th and ``s+1``-th call of :meth:`AttentionProbe.step`
(counting from 0), or the ``global_step`` the caller passes. On a sampled step (0, every,
2·every, ...) each monitored module's *first* forward call is measured; later calls in the same
step (gradient accumulation, evaluation, activation recomputation) are not. The measurement is
logged at step ``s`` when ``step()`` closes it, so it lines up with the loss of that step. On
other steps every hook returns at once. A training framework that runs evaluation between
steps closes each step as soon as it is done (:meth:`AttentionProbe.close_step`) and opens the
next when it begins (:meth:`AttentionProbe.open_step`); ``step()`` is the two at once.

Data flow: hooks (:mod:`.attention`) -> attention A -> :func:`.metrics.head_metrics` ->
:class:`.aggregate.HeadAccumulator` (sums and counts, reduced across processes) ->
:class:`.snapshot.Snapshot` -> :mod:`.outputs` and the collapse callback.

``torch.compile``: hooks cannot see inside a compiled graph, so on sampled steps each forward
call of the probed model runs eagerly: Dynamo is disabled and ``force_eager`` is in force for
that call only, from its start to its return (or its exception). Every other step runs the
compiled code untouched, and compiled code elsewhere in the process is never affected.

The probe changes nothing outside itself and the model it watches, whatever raises where: its
hooks and wrappers hold it only weakly and go when it is detached or garbage-collected, and
copies of the model (``copy.deepcopy``, ``torch.save``) are not monitored.
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Callable, Iterable, Mapping, NamedTuple, Sequence

import numpy as np

from torch import Tensor, nn

from . import aggregate
from .aggregate import HeadAccumulator
from .attention import (
    DEFAULT_MATRIX_BUDGET, ModuleSelector, Observed, Recorder, plan_sites, probabilities,
)
from .metrics import DEFAULT_MEMORY_BUDGET, full_context_metrics, head_metrics
from .options import ONE_TOKEN, check_count, check_tau
from . import notices
from .alerts import AlertMonitor, AlertRules
from .snapshot import WARNS, Alert, CollapseRule, Snapshot, find_layer

AlertCallback = Callable[[Alert, Snapshot], None]


class AttentionProbe:
    """Measures rank@tau and columns@tau of every attention head on sampled training steps.

    Args:
        model: the model to watch (never modified: its outputs and gradients stay identical).
        log_dir: make a TensorBoard ``SummaryWriter`` there (written by process 0 only).
        writer: or log into your own ``SummaryWriter`` (flushed, never closed, by the probe).
        every: sample steps 0, every, 2·every, ...
        tau: energy / mass share for rank@tau and columns@tau (the paper uses 0.9).
        max_sequences: per sampled forward pass, measure the first sequences of the batch.
        max_tokens: rank@tau and the other figures of the attention matrix use its first
            ``max_tokens`` queries (and keys, where the crop is exact: causal attention); the
            ``*_full`` figures and ``max_logit`` cover every token of the measured sequences,
            streamed in bounded memory without the matrix.
        memory_budget: bytes of extra working memory the full-context pass may use per module.
        matrix_budget: the most bytes one module's float32 attention matrix may take per
            sampled pass (default 256 MiB; None: no bound); a module over it is not measured,
            with one warning saying how to crop.
        modules: which modules to watch (None: every attention module; names, globs, predicate).
        strategy: "auto", "intercept" or "adapter" (see :func:`attn_probe.capture`).
        per_head: log per-head scalars as well as per-layer ones.
        offset: sample the steps ``s`` with ``(s - offset) % every == 0`` (default 0: steps 0,
            every, 2·every, ...; -1: every-1, 2·every-1, ..., the steps Lightning logs at).
        images_every: write pictures on sampled steps that are multiples of this (default
            ``10 * every``); 0 disables pictures.
        heatmaps: layer -> heads whose attention heatmaps are drawn (default: first and last
            layer, heads 0-3; None as heads: 0-3). Layers are named as
            :func:`~attn_probe.snapshot.find_layer` takes them (module name, ``"L07"``, index,
            -1 for the last) and checked against the monitored modules when the probe is made;
            a head a layer turns out not to have is left out with a warning.
        heatmap_tokens: heatmaps show at most this many first queries and keys.
        alerts: the rule of each kind of collapse (:class:`~attn_probe.alerts.AlertRules`:
            ``logit``, ``entropy``, ``uniform``, ``lazy``, ``sink``; ``None`` turns a kind off).
        on_alert: ``fn(alert, snapshot)`` called for every new
            :class:`~attn_probe.snapshot.Alert`, on every process (decided from the figures
            reduced over all processes, so every process sees the same alerts at the same step).
            Without it, process 0 warns about each ``warning`` and ``critical`` alert once, at
            the line that closed the step; with it, the probe warns about none and the function
            decides what is printed. Every alert is also logged on the ``attn_probe`` logger
            (level INFO); ``info`` alerts (sinks, lazy layers) are never warned about.
        logit_cap: a QK-Clip threshold τ to watch (a dry run: nothing in the model changes):
            also log each head's factor ``min(1, τ / max_logit)`` and the share of heads above τ.
        history: keep every snapshot in :attr:`history` (pictures' samples are not kept).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        log_dir: str | None = None,
        writer=None,
        every: int = 100,
        offset: int = 0,
        tau: float = 0.9,
        max_sequences: int = 1,
        max_tokens: int = 256,
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
        matrix_budget: int | None = DEFAULT_MATRIX_BUDGET,
        modules: ModuleSelector = None,
        strategy: str = "auto",
        per_head: bool = True,
        images_every: int | None = None,
        heatmaps: Mapping[str | int, Sequence[int]] | None = None,
        heatmap_tokens: int = 64,
        alerts: AlertRules = AlertRules(),
        on_alert: AlertCallback | None = None,
        logit_cap: float | None = None,
        history: bool = True,
    ) -> None:
        check_count("every", every)
        if isinstance(offset, bool) or not isinstance(offset, int):
            raise ValueError(f"offset must be an int, got {offset!r}")
        tau = check_tau(tau)
        check_count("max_sequences", max_sequences)
        check_count("max_tokens", max_tokens, minimum=2, why=ONE_TOKEN)
        check_count("memory_budget", memory_budget)
        check_count("matrix_budget", matrix_budget, optional=True)
        check_count("heatmap_tokens", heatmap_tokens)
        check_count("images_every", images_every, optional=True, minimum=0)
        if log_dir is not None and writer is not None:
            raise ValueError("pass log_dir (the probe makes a SummaryWriter) or writer, not both")
        if logit_cap is not None and not logit_cap > 0:
            raise ValueError(f"logit_cap must be a positive number or None, got {logit_cap!r}")
        self.model, self.every, self.offset, self.tau = model, every, offset, float(tau)
        self.images_every = 10 * every if images_every is None else images_every
        self.rules, self.on_alert, self.keep_history = alerts, on_alert, history
        self.rule = alerts.lazy or CollapseRule()
        self._monitor = AlertMonitor(alerts)
        self.heatmap_tokens = heatmap_tokens
        self.max_tokens, self.memory_budget = max_tokens, memory_budget
        self.matrix_budget = matrix_budget
        self.sites = plan_sites(model, modules, strategy)
        heatmaps = _resolve_heatmaps(heatmaps, self.sites)
        self._heatmap_heads_checked: set[str] = set()
        self._recorder = Recorder(
            self.sites, _Measure(self), max_sequences=max_sequences, max_tokens=max_tokens,
            strict=False, root=model,
        )
        self._accumulator = HeadAccumulator()
        self._samples: dict[str, Tensor] = {}
        self.heatmaps = heatmaps  #: module name -> heads (None: the default heads), or None
        self._writer_args = dict(
            writer=writer, log_dir=log_dir, per_head=per_head, heatmaps=heatmaps,
            heatmap_tokens=heatmap_tokens, logit_cap=logit_cap,
        )
        self._writer = None
        self._close_writer: weakref.finalize | None = None
        self._next = 0  # the step the coming forward passes belong to
        self._warned_nonfinite = False
        self._warned_writer = False
        self.history: list[Snapshot] = []
        self.last: Snapshot | None = None

    # lifecycle ---------------------------------------------------------------------------
    def attach(self, step: int | None = None) -> "AttentionProbe":
        """Install the hooks (and the writer, on process 0). Idempotent.

        ``step``: the number of the step the coming forward passes belong to (default: where
        the counter stands, 0 for a new probe), e.g. the global step when resuming a run.
        """
        if step is not None:
            self._next = int(step)
        if self._recorder.attached:
            self._arm_for(self._next)
            return self
        if self._writer is None and aggregate.is_main_process() and (
            self._writer_args["writer"] is not None or self._writer_args["log_dir"] is not None
        ):
            from .outputs import TensorBoardWriter

            self._writer = TensorBoardWriter(**self._writer_args)
            # Closed by detach(), or when the probe is collected without it.
            self._close_writer = weakref.finalize(self, self._writer.close)
        self._recorder.attach()
        self._arm_for(self._next)
        return self

    def detach(self, *, collective: bool = True) -> None:
        """Log what was measured and not yet logged, remove every hook, flush and close.

        Under torch.distributed every process must call it (it joins the reduction of an open
        sampled step); pass ``collective=False`` after an exception, when other processes may
        never get there: the open step is then logged from this process's sequences alone.
        """
        collective = collective and aggregate.is_distributed()
        try:
            if self._recorder.armed and (self._accumulator or collective):
                self._publish(self._next, reduce=collective)
        finally:
            self._recorder.detach()
            if self._close_writer is not None:
                self._close_writer()  # self._writer.close(), once
                self._close_writer = None
            self._writer = None

    @property
    def attached(self) -> bool:
        return self._recorder.attached

    def __enter__(self) -> "AttentionProbe":
        return self.attach()

    def __exit__(self, exc_type, exc, tb) -> None:
        # After an exception other processes may not reach a collective: log locally only.
        self.detach(collective=exc_type is None)

    # the schedule ------------------------------------------------------------------------
    def is_sampled(self, step: int) -> bool:
        return (step - self.offset) % self.every == 0

    def step(self, global_step: int | None = None) -> Snapshot | None:
        """Close the current step (log what it measured) and open the next one.

        ``global_step``: the number of the step being closed, if you count steps yourself;
        the next step is then ``global_step + 1``. Returns the step's snapshot, if sampled.
        The same as :meth:`close_step` followed by :meth:`open_step`.
        """
        snapshot = self.close_step(global_step)
        self.open_step()
        return snapshot

    def close_step(self, global_step: int | None = None) -> Snapshot | None:
        """Close the current step like :meth:`step`, but open no step: forward passes until
        :meth:`open_step` belong to no step and are never measured.

        For a framework that runs other forward passes (evaluation) between the end of one
        training step and the start of the next, and wants a step's figures (and alerts) as
        soon as the step is done. Under torch.distributed, call it on every process.
        """
        current = self._next if global_step is None else int(global_step)
        snapshot = None
        if self._recorder.armed:  # the same on every process: the schedule decides it
            snapshot = self._publish(current, reduce=True)
        self._next = current + 1
        return snapshot

    def open_step(self, step: int | None = None) -> None:
        """Open step ``step`` (default: the one after the last closed): its forward passes
        are measured if it is sampled."""
        if step is not None:
            self._next = int(step)
        self._arm_for(self._next)

    @property
    def sampling(self) -> bool:
        """Whether the coming forward passes belong to a sampled step not closed yet."""
        return self._recorder.armed

    def _arm_for(self, step: int) -> None:
        if not self._recorder.attached:
            return
        if self.is_sampled(step):
            self._recorder.arm()
        else:
            self._recorder.disarm()

    def _images_due(self, step: int) -> bool:
        return self.images_every > 0 and step % self.images_every == 0

    # measuring ---------------------------------------------------------------------------
    def _measure(self, name: str, observed: Observed) -> None:
        """Where the hooks deliver: one module's attention at a sampled step."""
        try:
            attention = probabilities(observed, self.max_tokens, self.matrix_budget)
            figures = head_metrics(attention, self.tau)
            figures.update(full_context_metrics(observed, self.tau, self.memory_budget))
            self._accumulator.update(name, figures)
            if self._images_due(self._next) and self._writer is not None:
                t = self.heatmap_tokens
                self._samples[name] = attention[0, :, :t, :t].float().cpu()
        except Exception as error:  # measuring must never stop training
            notices.warn(f"attn_probe: could not measure {name!r}: {error}")

    def _publish(self, step: int, *, reduce: bool) -> Snapshot | None:
        self._recorder.disarm()
        if reduce and aggregate.is_distributed():
            self._accumulator.reduce(aggregate.all_gather_object)
        layers = self._accumulator.compute([s.name for s in self.sites], self.rule)
        samples, self._samples = self._samples, {}
        self._accumulator.reset()
        if not layers:
            return None
        snapshot = Snapshot(step=step, tau=self.tau, layers=layers, samples=samples)
        # Every process holds the reduced figures: every process decides the same alerts.
        snapshot = self._monitor.judge(snapshot)
        self.last = snapshot
        if self.keep_history:
            self.history.append(dataclasses.replace(snapshot, samples={}))
        if aggregate.is_main_process():
            if self._writer is not None:
                try:
                    self._writer.write(snapshot, images=self._images_due(step) and bool(samples))
                    self._writer.flush()
                except Exception as error:  # a full disk, say: writing must never stop training
                    if not self._warned_writer:
                        self._warned_writer = True
                        notices.warn(
                            f"attn_probe: could not write step {step} to TensorBoard: "
                            f"{type(error).__name__}: {error}; measuring goes on (in "
                            "probe.history), this warning is not repeated"
                        )
            self._warn(snapshot)
        for alert in snapshot.alerts:
            if self.on_alert is not None:
                self.on_alert(alert, snapshot)
        return snapshot

    def _warn(self, snapshot: Snapshot) -> None:
        """Tell the user, once, what this step brought: every alert is logged (the
        ``attn_probe`` logger, level INFO); alerts of severity ``warning`` and ``critical`` are
        also warned about at the user's line, unless ``on_alert`` decides what is printed."""
        self._check_heatmap_heads(snapshot)
        if snapshot.has_nonfinite and not self._warned_nonfinite:
            self._warned_nonfinite = True
            bad = [l.name for l in snapshot.layers if l.nonfinite.sum()]
            notices.warn(
                f"attn_probe: step {snapshot.step}: attention with NaN or Inf entries in "
                f"{', '.join(bad)}; those sequences are left out of the figures and counted "
                "under nonfinite/<layer>"
            )
        for alert in snapshot.alerts:
            line = f"attn_probe: {alert.severity}: {alert.message}" + (
                f" ({alert.cause})" if alert.cause else "")
            notices.inform(line)
            if alert.severity in WARNS and self.on_alert is None:
                notices.warn(line)

    @property
    def alerts(self) -> list[Alert]:
        """Every alert fired so far, in order."""
        return list(self._monitor.fired)

    def _check_heatmap_heads(self, snapshot: Snapshot) -> None:
        """Warn once per layer about chosen heads it does not have (known once it ran)."""
        for layer in snapshot.layers:
            heads = (self.heatmaps or {}).get(layer.name)
            if heads is None or layer.name in self._heatmap_heads_checked:
                continue
            self._heatmap_heads_checked.add(layer.name)
            missing = [h for h in heads if h >= layer.num_heads]
            if missing:
                notices.warn(
                    f"attn_probe: heatmaps: layer {layer.tag} ({layer.name}) has "
                    f"{layer.num_heads} heads (0 to {layer.num_heads - 1}); head"
                    f"{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))} "
                    "cannot be drawn"
                )

    @property
    def lazy_layers(self) -> list[str]:
        """Layers that have turned lazy so far."""
        lazy = {alert.layer for alert in self._monitor.fired if alert.kind == "lazy"}
        return [s.name for s in self.sites if s.name in lazy]


class _Measure:
    """The recorder's sink: :meth:`AttentionProbe._measure`, holding the probe weakly, so that
    probe and recorder form no cycle and a probe dropped without ``detach()`` goes at once (its
    recorder with it, whose finalizer removes the hooks)."""

    __slots__ = ("_probe",)

    def __init__(self, probe: AttentionProbe) -> None:
        self._probe = weakref.ref(probe)

    def __call__(self, name: str, observed: Observed) -> None:
        probe = self._probe()
        if probe is not None:
            probe._measure(name, observed)


class _Site(NamedTuple):
    name: str
    index: int


def _resolve_heatmaps(heatmaps: Mapping[str | int, Sequence[int] | None] | None,
                      sites: Sequence) -> dict[str, list[int] | None] | None:
    """``heatmaps`` with every layer resolved to a monitored module's name, or ``ValueError``
    for a layer that is not monitored or a head number that cannot be one."""
    if heatmaps is None:
        return None
    if not isinstance(heatmaps, Mapping):
        raise TypeError(f"heatmaps must map layers to head numbers, got {heatmaps!r}")
    layers = [_Site(site.name, i) for i, site in enumerate(sites)]
    resolved: dict[str, list[int] | None] = {}
    for key, heads in heatmaps.items():
        try:
            name = find_layer(layers, key).name
        except KeyError as error:
            raise ValueError(f"heatmaps: {error.args[0]}") from None
        if heads is None:
            resolved.setdefault(name, None)
            continue
        if isinstance(heads, (str, bytes)) or not isinstance(heads, Iterable):
            raise ValueError(f"heatmaps[{key!r}]: expected head numbers, got {heads!r}")
        heads = list(heads)
        for head in heads:
            if isinstance(head, bool) or not isinstance(head, (int, np.integer)) or head < 0:
                raise ValueError(
                    f"heatmaps[{key!r}]: heads are numbers from 0, got {head!r}"
                )
        merged = resolved.get(name) or []
        resolved[name] = merged + [int(h) for h in heads if int(h) not in merged]
    return resolved
