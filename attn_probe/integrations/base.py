"""What the framework callbacks share: the optional import of the framework, the probe's
defaults (logging through the trackers the framework's run set up: :class:`FrameworkOutput`),
opening and closing steps, and stopping training on an alert (``stop_on``).

A callback class is built on :class:`ProbeCallback` and on its framework's callback base, which
:func:`optional_base` imports without making the integration module fail to import.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Callable, Iterable

import numpy as np

from .. import aggregate, notices
from ..alerts import KINDS, AlertRules
from ..options import CaptureOptions
from ..outputs import Output, TensorBoardOutput
from ..outputs.tracker import TrackerOutput
from ..probe import AlertCallback, AttentionProbe, check_settings
from ..snapshot import Alert

if TYPE_CHECKING:
    from ..snapshot import Snapshot


def optional_base(module: str, name: str, *, label: str, extra: str,
                  exported: tuple[str, ...] = ("AttentionProbeCallback",),
                  ) -> tuple[type | None, Callable]:
    """The class ``module.name`` (None when the framework is missing), and a module
    ``__getattr__`` for the integration module that raises ``ImportError`` saying what to
    install when one of ``exported`` (its classes built on the framework) is asked for without
    the framework."""
    try:
        base = getattr(importlib.import_module(module), name)
        error: ImportError | None = None
    except ImportError as missing:
        base, error = None, missing

    def module_getattr(attribute: str) -> Any:
        if attribute in exported and error is not None:
            raise ImportError(
                f"the {label} {attribute} needs {module.split('.')[0]}: "
                f'pip install "attn_probe[{extra}]" ({error})'
            )
        raise AttributeError(attribute)

    return base, module_getattr


class FrameworkOutput(TrackerOutput):
    """The callbacks' default output: the probe's scalars, alerts, pictures and settings,
    decided once (:class:`~attn_probe.outputs.tracker.TrackerOutput`) and stored in every
    tracker the framework's run has set up, found at the first write by :meth:`find` (on the
    process that logs, so other processes open nothing); where the run has none, in
    TensorBoard in ``fallback_dir()``, and an information line says where.

    A tracker that raises is reported once and the others go on.
    """

    def __init__(self, fallback_dir: Callable[[], str], *, per_head: bool | str = True,
                 pictures_every: int = 1000, logit_cap: float | None = None) -> None:
        super().__init__(per_head=per_head, pictures_every=pictures_every, logit_cap=logit_cap)
        self._fallback_dir = fallback_dir
        self._sinks: list[TrackerOutput] | None = None
        self._failed: set[int] = set()

    def find(self) -> list[TrackerOutput]:
        """The trackers of the framework's run, each as a :class:`TrackerOutput` that stores
        into it (none: the fallback)."""
        raise NotImplementedError

    @property
    def sinks(self) -> list[TrackerOutput]:
        if self._sinks is None:
            self._sinks = self.find()
            if not self._sinks:
                log_dir = self._fallback_dir()
                notices.inform(f"attn_probe: the training run has no logger the probe can "
                               f"write to; logging to TensorBoard in {log_dir}")
                self._sinks = [TensorBoardOutput(log_dir, logit_cap=self.logit_cap)]
        return self._sinks

    def _each(self, method: str, *args: Any) -> None:
        for sink in self.sinks:
            try:
                getattr(sink, method)(*args)
            except Exception as error:  # one tracker down: the others keep what was measured
                if id(sink) not in self._failed:
                    self._failed.add(id(sink))
                    notices.warn(
                        f"attn_probe: {sink!r}.{method}() failed: {type(error).__name__}: "
                        f"{error}; the other trackers go on, this warning is not repeated")

    def first_write(self, snapshot: "Snapshot") -> None:
        self._each("first_write", snapshot)

    def log_scalars(self, step: int, values: dict[str, float]) -> None:
        self._each("log_scalars", step, values)

    def log_alerts(self, step: int, alerts: list[Alert]) -> None:
        self._each("log_alerts", step, alerts)

    def log_pictures(self, step: int, pictures: dict[str, np.ndarray]) -> None:
        self._each("log_pictures", step, pictures)

    def log_settings(self, settings: dict[str, Any]) -> None:
        self._each("log_settings", settings)

    def flush(self) -> None:
        self._each("flush")

    def close(self) -> None:
        if self._closed:
            return
        super().close()
        if self._sinks is not None:
            self._each("close")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._sinks!r})"


def check_stop_on(stop_on: str | Iterable[str] | None, alerts: Any = None) -> tuple[str, ...]:
    """``stop_on`` as a tuple of distinct kinds of alert, or ``ValueError``: every kind must be
    one of :data:`attn_probe.alerts.KINDS`, and not turned off in ``alerts`` (the
    :class:`~attn_probe.alerts.AlertRules` given to the probe), where it could never fire."""
    if stop_on is None:
        return ()
    if isinstance(stop_on, str):
        stop_on = (stop_on,)
    known = ", ".join(repr(kind) for kind in KINDS)
    try:
        kinds = tuple(stop_on)
    except TypeError:
        raise ValueError(
            f"stop_on must be kinds of alert ({known}), got {stop_on!r}"
        ) from None
    for kind in kinds:
        if not isinstance(kind, str) or kind not in KINDS:
            raise ValueError(f"stop_on: {kind!r} is not a kind of alert; the kinds are {known}")
    rules = AlertRules() if alerts is None else alerts
    for kind in kinds:
        if getattr(rules, kind, True) is None:
            raise ValueError(
                f"stop_on: {kind!r} alerts are turned off (alerts=AlertRules({kind}=None)), "
                "so they could never stop training"
            )
    return tuple(dict.fromkeys(kinds))


class ProbeCallback:
    """The framework-independent half of a callback: makes the probe with the framework's
    defaults, closes the step that is open, and decides whether an alert stops training.

    ``model``: the module to watch (default: the one the framework hands over); ``every``
    (default: the framework's logging interval), ``offset``, ``capture``, ``alerts``,
    ``outputs``, ``log_dir``, ``on_alert``, ``history``: as in
    :class:`~attn_probe.AttentionProbe`, and checked here, when the callback is made; with
    neither ``outputs`` nor ``log_dir`` the probe logs through the framework's own loggers (a
    :class:`FrameworkOutput`); a ``TensorBoardOutput()`` given no directory logs in the
    framework's log directory. ``stop_on``: the
    kinds of alert (of :data:`attn_probe.alerts.KINDS`) that stop training, checked here
    (``ValueError``).

    The decision to stop comes from the alerts of each closed step, which every process
    decides from the figures reduced over all of them: every process decides the same, at the
    same step. :attr:`stopped_by` is the first alert of a ``stop_on`` kind (None while there is
    none); the framework half asks its trainer to stop when :meth:`_close` says so.
    """

    def __init__(
        self,
        model: Any = None,
        *,
        every: int | None = None,
        offset: int = 0,
        capture: CaptureOptions = CaptureOptions(),
        alerts: AlertRules = AlertRules(),
        outputs: Iterable[Output] = (),
        log_dir: str | None = None,
        on_alert: AlertCallback | None = None,
        history: int = 0,
        stop_on: str | Iterable[str] | None = (),
    ) -> None:
        super().__init__()
        self.model = model
        self.settings = dict(offset=offset, capture=capture, alerts=alerts, on_alert=on_alert,
                             history=history)
        self.outputs = check_settings(every=1 if every is None else every, outputs=outputs,
                                      log_dir=log_dir, **self.settings)
        self.every = every
        self.stop_on = check_stop_on(stop_on, alerts)
        self.probe: AttentionProbe | None = None
        self.stopped_by: Alert | None = None  #: the alert that stopped training
        self._open: int | None = None  # the step the coming forward passes belong to

    def _make_probe(self, target: Any, log_dir: Callable[[], str], every: Callable[[], int],
                    trackers: Callable[[], Output] | None = None) -> None:
        """A new probe on ``self.model`` or ``target``; ``log_dir()``, ``every()`` and
        ``trackers()`` give the framework's defaults for options the user left out (no
        ``trackers``: TensorBoard in ``log_dir()``)."""
        if trackers is None:
            trackers = lambda: TensorBoardOutput(log_dir())  # noqa: E731
        if self.probe is not None:
            self.probe.detach()
        for output in self.outputs:
            if isinstance(output, TensorBoardOutput):
                output.default_to(log_dir())
        self.probe = AttentionProbe(
            self.model if self.model is not None else target,
            every=max(1, int(every())) if self.every is None else self.every,
            outputs=self.outputs or [trackers()], **self.settings)
        self.stopped_by = None
        self._open = None

    def _alerted(self, alert: Alert) -> None:
        """Take note of an alert (on every process): the first of a ``stop_on`` kind stops
        training, and process 0 says so."""
        if self.stopped_by is not None or alert.kind not in self.stop_on:
            return
        self.stopped_by = alert
        if aggregate.is_main_process():
            notices.warn(
                f"attn_probe: stopping training after step {alert.step} on a {alert.kind!r} "
                f"alert (stop_on={self.stop_on!r}): {alert.message}"
            )

    def _open_step(self, step: int) -> None:
        """Measure the coming forward passes as step ``step`` (installing the hooks first)."""
        self._open = step
        if self.probe.attached:
            self.probe.open_step(step)
        else:
            self.probe.attach(step=step)

    def _close(self, step: int) -> bool:
        """Close the open step as ``step`` on every process, opening none (so that forward
        passes until the next :meth:`_open_step`, evaluation, are not measured); whether
        training should stop now (an alert of a ``stop_on`` kind has fired, the same answer on
        every process)."""
        if self.probe is not None and self._open is not None:
            self._open = None
            snapshot = self.probe.close_step(step)
            for alert in snapshot.alerts if snapshot is not None else ():
                self._alerted(alert)
        return self.stopped_by is not None

    def _finish(self) -> None:
        """Close the last step on every process, then remove the hooks."""
        if self.probe is None:
            return
        if self._open is not None:
            self._close(self._open)
        self.probe.detach()
