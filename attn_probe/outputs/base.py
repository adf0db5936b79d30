"""The output protocol: how the probe hands what it measured to TensorBoard, a tracker, or your
own code.

An output is an :class:`Output`: the probe calls :meth:`Output.start` once when it is made (on
every process, so a bad setting fails everywhere at once) and then :meth:`Output.run_settings`
with its settings, :meth:`Output.write` with each
sampled step's :class:`~attn_probe.snapshot.Snapshot` (on the process that logs: process 0),
and :meth:`Output.close` once at the end, after an exception too. A snapshot carries the
step's figures, the alerts new at that step (``snapshot.alerts``) and, on the steps an output
asked for pictures (:meth:`Output.pictures`), the attention samples to draw.

A whole output of your own::

    class PrintAlerts(attn_probe.Output):
        def write(self, snapshot):
            for alert in snapshot.alerts:
                print(snapshot.step, alert.tag, alert.message)

    AttentionProbe(model, outputs=[PrintAlerts()])
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

if TYPE_CHECKING:
    from ..snapshot import Snapshot

__all__ = ["Output", "check_outputs"]


class Output:
    """Receives every sampled step's snapshot. Subclass it and implement :meth:`write`."""

    def start(self, layers: Sequence[str]) -> None:
        """Called once by the probe that will write here, on every process, with the names
        of the monitored modules in order (``L00`` is ``layers[0]``): check settings that
        name layers here and raise ``ValueError`` for a bad one. Opens nothing."""

    def run_settings(self, settings: Mapping[str, Any]) -> None:
        """Called once by the probe, after :meth:`start` and on every process, with its
        settings (``every``, ``offset``, ``capture``, ``alerts``, ``layers``): keep them to
        log with the first write, where the output records a run's settings. Opens nothing."""

    def pictures(self, step: int) -> int:
        """How many first tokens of each layer's attention this output draws at ``step``
        (0: no pictures at that step). The probe asks once per sampled step, before it is
        measured, and keeps that much of the first sequence's attention in
        ``snapshot.samples``."""
        return 0

    def write(self, snapshot: "Snapshot") -> None:
        """Log one sampled step: ``snapshot.step``, its layers' figures, the alerts new at this
        step, and ``snapshot.samples`` when :meth:`pictures` asked for them. An exception
        here is reported once and the other outputs go on."""
        raise NotImplementedError(f"{type(self).__name__} must implement write(snapshot)")

    def close(self) -> None:
        """Flush and release what this output opened. Called once, after the last write."""


def check_outputs(outputs: Iterable[Output]) -> list[Output]:
    """``outputs`` as a list of :class:`Output`, or ``TypeError`` saying what one is."""
    if isinstance(outputs, Output):
        outputs = [outputs]
    try:
        outputs = list(outputs)
    except TypeError:
        raise TypeError(f"outputs takes a list of attn_probe.Output objects, got {outputs!r}"
                        ) from None
    for output in outputs:
        if not isinstance(output, Output):
            raise TypeError(
                f"outputs: {output!r} is not an attn_probe.Output; subclass attn_probe.Output "
                "and implement write(snapshot), or use attn_probe.TensorBoardOutput(log_dir)"
            )
    return outputs
