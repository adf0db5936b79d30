"""A training run as its alerts, and the one answer to "what warned first, where, since when".

:class:`Run` is built from a live probe (``Run(name, probe.alerts)``) or from what an output
wrote (:attr:`attn_probe.outputs.events.RunEvents.run`, the alerts read back from the event
files); the report, the summary picture and the console all ask it, so they agree. Only the
severities of :data:`~attn_probe.snapshot.WARNS` warn: a run whose alerts are all ``info``
(attention sinks, lazy layers) has no warning.
"""

from __future__ import annotations

from dataclasses import dataclass
from ..snapshot import SEVERITIES, Alert


def layer_order(tag: str) -> tuple[int, str]:
    """Sort key of a layer tag: ``L2`` before ``L10`` (by number, not text)."""
    digits = tag[1:]
    return (int(digits), tag) if digits.isdigit() else (-1, tag)


@dataclass(frozen=True)
class FirstWarning:
    """The warnings of the first step at which any fired."""

    alerts: tuple[Alert, ...]  #: as they fired, at least one

    @property
    def step(self) -> int:
        return self.alerts[0].step

    @property
    def since(self) -> int:
        """The earliest step the windows of these warnings start at (a rise or fall counted
        from then; ``step`` when one measurement decided)."""
        return min(alert.since for alert in self.alerts)

    @property
    def tags(self) -> tuple[str, ...]:
        """The layers that warned, in layer order."""
        return tuple(sorted(dict.fromkeys(a.tag for a in self.alerts), key=layer_order))

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(alert.kind for alert in self.alerts))

    def text(self) -> str:
        """``logit in L03, entropy in L02, L03 and L04 at step 40 (since step 25)``."""
        parts = []
        for kind in self.kinds:
            tags = sorted(dict.fromkeys(a.tag for a in self.alerts if a.kind == kind),
                          key=layer_order)
            names = ", ".join(tags[:-1]) + " and " + tags[-1] if len(tags) > 1 else tags[0]
            parts.append(f"{kind} in {names}")
        since = f" (since step {self.since})" if self.since != self.step else ""
        return f"{', '.join(parts)} at step {self.step}{since}"


@dataclass(frozen=True)
class Run:
    """One run's alerts, in step order (as they fired within a step)."""

    name: str
    alerts: tuple[Alert, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "alerts", tuple(sorted(self.alerts, key=lambda a: a.step)))

    @property
    def warnings(self) -> tuple[Alert, ...]:
        """The alerts a person is warned about (:data:`~attn_probe.snapshot.WARNS`)."""
        return tuple(alert for alert in self.alerts if alert.warns)

    @property
    def information(self) -> tuple[Alert, ...]:
        """The ``info`` alerts: logged, never a warning."""
        return tuple(alert for alert in self.alerts if not alert.warns)

    def first_warning(self, figure: str | None = None) -> FirstWarning | None:
        """The warnings of the first step any warned (of ``figure`` only, when given); None
        when nothing warned."""
        warned = [a for a in self.warnings if figure is None or a.figure == figure]
        if not warned:
            return None
        return FirstWarning(tuple(a for a in warned if a.step == warned[0].step))

    @property
    def worst_severity(self) -> str | None:
        """The most urgent severity of the run's alerts (by :data:`SEVERITIES`, not by name);
        None without alerts."""
        if not self.alerts:
            return None
        return max((alert.severity for alert in self.alerts), key=SEVERITIES.index)

    @property
    def layers(self) -> tuple[str, ...]:
        """The layers with an alert, in layer order."""
        return tuple(sorted(dict.fromkeys(a.tag for a in self.alerts), key=layer_order))

    def headline(self) -> str:
        """``first warning: logit in L03 at step 40 (since step 25)``, or ``no warning``
        (with the count of ``info`` alerts when there are any)."""
        first = self.first_warning()
        if first is not None:
            return f"first warning: {first.text()}"
        info = len(self.information)
        return "no warning" + (f" ({info} alert{'s' * (info != 1)} for information: "
                               f"{', '.join(dict.fromkeys(a.kind for a in self.information))})"
                               if info else "")
