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

import collections
import dataclasses
import weakref
from typing import Callable, Iterable

from torch import Tensor, nn

from . import aggregate
from .aggregate import HeadAccumulator
from .attention import Observed, Recorder, plan_sites, probabilities
from .metrics import full_context_metrics, head_metrics, thread_budget
from .options import CaptureOptions, check_capture, check_count
from . import notices
from .parallel import Parallelism, local_heads
from .alerts import AlertMonitor, AlertRules
from .outputs import Output, TensorBoardOutput, check_outputs
from .snapshot import Alert, Snapshot

AlertCallback = Callable[[Alert, Snapshot], None]


class AttentionProbe:
    """Measures every attention head on sampled training steps and hands the figures to its
    outputs.

    Args:
        model: the model to watch (never modified: its outputs and gradients stay identical).
        every: sample steps 0, every, 2·every, ...
        offset: sample the steps ``s`` with ``(s - offset) % every == 0`` (default 0; -1:
            every-1, 2·every-1, ..., the steps Lightning logs at).
        capture: which modules, and how much of each call, are measured
            (:class:`~attn_probe.CaptureOptions`: modules, strategy, tau, batch_rows, crop,
            budgets).
        alerts: the rule of each kind of collapse (:class:`~attn_probe.AlertRules`: ``logit``,
            ``entropy``, ``uniform``, ``lazy``, ``sink``; ``None`` turns a kind off).
        outputs: where each sampled step goes (:class:`~attn_probe.Output` objects, e.g.
            :class:`~attn_probe.TensorBoardOutput`); written by process 0 only.
        log_dir: short for ``outputs=[TensorBoardOutput(log_dir)]`` (added to ``outputs``).
        on_alert: ``fn(alert, snapshot)`` called for every new :class:`~attn_probe.Alert`, on
            every process (decided from the figures reduced over all processes, so every
            process sees the same alerts at the same step). Without it, process 0 warns about
            each ``warning`` and ``critical`` alert once, at the line that closed the step;
            with it, the probe warns about none and the function decides what is printed.
            Every alert is also logged on the ``attn_probe`` logger (level INFO); ``info``
            alerts (sinks, lazy layers) are never warned about.
        history: keep the last ``history`` snapshots in :attr:`history` (without attention
            samples); 0 keeps none (:attr:`last` always holds the latest).

    Every argument is checked here, on every process: a mistake raises before training starts.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        every: int = 100,
        offset: int = 0,
        capture: CaptureOptions = CaptureOptions(),
        alerts: AlertRules = AlertRules(),
        outputs: Iterable[Output] = (),
        log_dir: str | None = None,
        on_alert: AlertCallback | None = None,
        history: int = 0,
    ) -> None:
        self.outputs: list[Output] = check_settings(
            every=every, offset=offset, capture=capture, alerts=alerts, outputs=outputs,
            log_dir=log_dir, on_alert=on_alert, history=history)
        self.capture = capture
        self.model, self.every, self.offset = model, every, offset
        self.rules, self.on_alert = alerts, on_alert
        self._monitor = AlertMonitor(alerts)
        self.sites = plan_sites(model, capture.modules, capture.strategy)
        self._modules = {site.name: site.module for site in self.sites}
        self._parallel = Parallelism(capture)
        layers = [site.name for site in self.sites]
        settings = dict(every=every, offset=offset, capture=capture, alerts=alerts,
                        layers=layers)
        for output in self.outputs:
            output.start(layers)
            output.run_settings(settings)
        self._recorder = Recorder(
            self.sites, _Measure(self), batch_rows=capture.batch_rows,
            crop=capture.crop, strict=False, root=model,
        )
        self._accumulator = HeadAccumulator()
        self._samples: dict[str, Tensor] = {}
        self._picture_crop = 0  # tokens of attention kept for the outputs' pictures this step
        # Closes the outputs once: at detach(), or when the probe is collected without it.
        self._close_outputs = weakref.finalize(self, _close, self.outputs)
        self._failed: set[int] = set()  # outputs that raised once (reported once)
        self._next = 0  # the step the coming forward passes belong to
        self._warned_nonfinite = False
        #: the last ``history`` snapshots, oldest first (without attention samples)
        self.history: collections.deque[Snapshot] = collections.deque(maxlen=history)
        self.last: Snapshot | None = None

    # lifecycle ---------------------------------------------------------------------------
    def attach(self, step: int | None = None) -> "AttentionProbe":
        """Install the hooks. Idempotent.

        ``step``: the number of the step the coming forward passes belong to (default: where
        the counter stands, 0 for a new probe), e.g. the global step when resuming a run.
        """
        if step is not None:
            self._next = int(step)
        if self._recorder.attached:
            self._arm_for(self._next)
            return self
        self._recorder.attach()
        self._arm_for(self._next)
        return self

    def detach(self, *, collective: bool = True) -> None:
        """Log what was measured and not yet logged, remove every hook, close the outputs.

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
            self._close_outputs()

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
            self._picture_crop = max((self._call_output(output, "pictures", step) or 0
                                      for output in self.outputs), default=0)
            self._recorder.arm()
        else:
            self._recorder.disarm()

    # measuring ---------------------------------------------------------------------------
    def _measure(self, name: str, observed: Observed) -> None:
        """Where the hooks deliver: one module's attention at a sampled step."""
        try:
            observed = self._parallel.whole_sequence(name, observed)  # a collective under CP
            if observed is None:  # measured by another process of the context-parallel group
                return
            shard = self._parallel.heads(name, self._modules[name], local_heads(observed))
            if shard is None:  # split heads, and nothing says how: said once
                return
            options = self.capture
            with thread_budget(options.threads, observed):
                attention = probabilities(observed, options.crop, options.matrix_budget)
                figures = head_metrics(attention, options.tau)
                figures.update(full_context_metrics(observed, options.tau, options.memory_budget))
            figures, first, heads = shard.globalise(figures)
            self._accumulator.update(name, figures, first_head=first, num_heads=heads)
            # Pictures show this process's heads: the model's first ones on process 0.
            if self._picture_crop and first == 0:
                t = self._picture_crop
                self._samples[name] = attention[0, :, :t, :t].float().cpu()
        except Exception as error:  # measuring must never stop training
            notices.warn(f"attn_probe: could not measure {name!r}: {error}")

    def _publish(self, step: int, *, reduce: bool) -> Snapshot | None:
        self._recorder.disarm()
        if reduce and aggregate.is_distributed():
            self._accumulator.reduce(aggregate.all_gather_object)
        layers = self._accumulator.compute([s.name for s in self.sites])
        samples, self._samples = self._samples, {}
        self._accumulator.reset()
        if not layers:
            return None
        snapshot = Snapshot(step=step, tau=self.capture.tau, layers=layers, samples=samples)
        # Every process holds the reduced figures: every process decides the same alerts.
        snapshot = self._monitor.judge(snapshot)
        self.last = snapshot
        if self.history.maxlen:
            self.history.append(dataclasses.replace(snapshot, samples={}))
        if aggregate.is_main_process():
            for output in self.outputs:
                self._call_output(output, "write", snapshot)
            self._warn(snapshot)
        for alert in snapshot.alerts:
            if self.on_alert is not None:
                self.on_alert(alert, snapshot)
        return snapshot

    def _warn(self, snapshot: Snapshot) -> None:
        """Tell the user, once, what this step brought: every alert is logged (the
        ``attn_probe`` logger, level INFO); alerts of severity ``warning`` and ``critical`` are
        also warned about at the user's line, unless ``on_alert`` decides what is printed."""
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
            if alert.warns and self.on_alert is None:
                notices.warn(line)

    @property
    def alerts(self) -> list[Alert]:
        """Every alert fired so far, in order."""
        return list(self._monitor.fired)

    def _call_output(self, output: Output, method: str, *args):
        """``output.method(*args)``; an output that raises is reported once (its name, the
        step, the error) and the other outputs and the training go on."""
        try:
            return getattr(output, method)(*args)
        except Exception as error:  # a full disk, a tracker offline: never stop training
            if id(output) not in self._failed:
                self._failed.add(id(output))
                notices.warn(
                    f"attn_probe: {type(output).__name__}.{method}() failed at step "
                    f"{self._next}: {type(error).__name__}: {error}; the other outputs and "
                    "the measurement go on, this warning is not repeated for this output"
                )
            return None

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


def check_settings(*, every: int, offset: int, capture: CaptureOptions, alerts: AlertRules,
                   outputs: Iterable[Output], log_dir: str | None,
                   on_alert: AlertCallback | None, history: int) -> list[Output]:
    """Check the arguments of :class:`AttentionProbe` (the callbacks check theirs with it
    when they are made); the outputs to write to, with ``log_dir``'s TensorBoard output."""
    check_count("every", every)
    if isinstance(offset, bool) or not isinstance(offset, int):
        raise ValueError(f"offset must be an int, got {offset!r}")
    check_capture(capture)
    if not isinstance(alerts, AlertRules):
        raise TypeError(f"alerts takes attn_probe.AlertRules(...), got {alerts!r}")
    if on_alert is not None and not callable(on_alert):
        raise TypeError(f"on_alert must be a function fn(alert, snapshot), got {on_alert!r}")
    check_count("history", history, minimum=0)
    checked = check_outputs(outputs)
    if log_dir is not None:
        checked.append(TensorBoardOutput(log_dir))
    return checked


def _close(outputs: list[Output]) -> None:
    """Close every output, on the process that wrote to them (the others never opened any)."""
    if not aggregate.is_main_process():
        return
    for output in outputs:
        try:
            output.close()
        except Exception as error:
            notices.warn(f"attn_probe: {type(output).__name__}.close() failed: "
                         f"{type(error).__name__}: {error}")
