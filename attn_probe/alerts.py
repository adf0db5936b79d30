"""Snapshot → alerts: one rule for each way attention collapses, and what has fired already.

Four kinds, each decided per layer from a :class:`~attn_probe.snapshot.Snapshot`:

* ``lazy`` — the paper's lazy layer: every head at rank@tau and columns@tau near 1
  (:class:`~attn_probe.snapshot.CollapseRule`);
* ``entropy`` — entropy collapse (Zhai et al. 2023): the layer's mean *normalised* row entropy
  over the whole sequence (each query's entropy divided by the log of the number of keys it may
  see; 1 is uniform attention) falls below :attr:`EntropyRule.min_entropy`. A single low-entropy
  head (a previous-token head) is normal, so the rule looks at the mean over heads;
* ``logit`` — logit growth (Dehghani et al. 2023; Wortsman et al. 2023): the layer's largest
  scaled pre-softmax score ``q·k·scale`` over the measured sequences exceeds
  :attr:`LogitRule.max_logit`;
* ``sink`` — informational, not an alarm: a head starts to put most of its mass on the first key
  (an attention sink emerges, Xiao et al. 2023).

An :class:`~attn_probe.snapshot.Alert` is an event: it fires once, at the first sampled step at
which its condition holds, per kind and layer (per head for ``sink``). :class:`AlertMonitor`
remembers what fired.
Why the defaults are what they are is written in ``docs/alerts.md``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from .snapshot import Alert, CollapseRule, HeadState, LayerSummary, Snapshot, percent

KINDS = ("lazy", "entropy", "logit", "sink")


@dataclass(frozen=True)
class EntropyRule:
    """``entropy`` fires when a layer's mean normalised entropy over heads (``entropy_norm_full``,
    over every token of the measured sequences) is below ``min_entropy``."""

    min_entropy: float = 0.1

    def __post_init__(self) -> None:
        if not 0 < self.min_entropy < 1:
            raise ValueError(f"EntropyRule.min_entropy must be in (0, 1), got {self.min_entropy}")


@dataclass(frozen=True)
class LogitRule:
    """``logit`` fires when a layer's max attention logit exceeds ``max_logit``."""

    max_logit: float = 300.0

    def __post_init__(self) -> None:
        if not self.max_logit > 0:
            raise ValueError(f"LogitRule.max_logit must be positive, got {self.max_logit}")


@dataclass(frozen=True)
class SinkRule:
    """``sink`` fires for a head whose mean attention on the first key (``sink_full``) reaches
    ``min_mass``."""

    min_mass: float = 0.5

    def __post_init__(self) -> None:
        if not 0 < self.min_mass <= 1:
            raise ValueError(f"SinkRule.min_mass must be in (0, 1], got {self.min_mass}")


@dataclass(frozen=True)
class AlertRules:
    """The rule of each kind; ``None`` turns a kind off."""

    lazy: CollapseRule | None = field(default_factory=CollapseRule)
    entropy: EntropyRule | None = field(default_factory=EntropyRule)
    logit: LogitRule | None = field(default_factory=LogitRule)
    sink: SinkRule | None = field(default_factory=SinkRule)

    def check(self, layer: LayerSummary, step: int, tau: float) -> list[Alert]:
        """Every condition that holds in ``layer`` (stateless: see :class:`AlertMonitor`)."""
        found = []
        heads_with_data = tuple(int(h) for h in np.flatnonzero(layer.has_data))
        if self.lazy is not None and layer.is_lazy:
            p = percent(tau)
            found.append(Alert(
                "lazy", layer.name, layer.tag, tuple(int(h) for h in np.flatnonzero(layer.lazy)),
                step, layer.lazy_share, self.lazy.min_lazy_share,
                f"{layer.tag} ({layer.name}) is lazy at step {step}: max rank@{p} "
                f"{layer.reduce('rank', 'max'):.2f}, max columns@{p} "
                f"{layer.reduce('columns', 'max'):.2f}, {layer.lazy_share:.0%} of heads lazy",
            ))
        entropy = layer.reduce("entropy_norm_full", "mean")
        if self.entropy is not None and entropy < self.entropy.min_entropy:
            found.append(Alert(
                "entropy", layer.name, layer.tag, heads_with_data, step, entropy,
                self.entropy.min_entropy,
                f"{layer.tag} ({layer.name}): attention entropy collapsed at step {step}: mean "
                f"normalised entropy {entropy:.3f} < {self.entropy.min_entropy:g} "
                f"({layer.reduce('entropy_full', 'mean'):.3f} nats; 1 = uniform)",
            ))
        logit = layer.reduce("max_logit", "max")
        if self.logit is not None and logit > self.logit.max_logit:
            over = layer.heads["max_logit"] > self.logit.max_logit
            found.append(Alert(
                "logit", layer.name, layer.tag, tuple(int(h) for h in np.flatnonzero(over)),
                step, logit, self.logit.max_logit,
                f"{layer.tag} ({layer.name}): attention logits grew to {logit:.1f} at step "
                f"{step} (> {self.logit.max_logit:g}) in head{'s' if over.sum() > 1 else ''} "
                f"{', '.join(str(int(h)) for h in np.flatnonzero(over))}",
            ))
        if self.sink is not None:
            sink = layer.heads["sink_full"]
            with np.errstate(invalid="ignore"):
                heads = np.flatnonzero(sink >= self.sink.min_mass)
            found.extend(Alert(
                "sink", layer.name, layer.tag, (int(h),), step, float(sink[h]),
                self.sink.min_mass,
                f"{layer.tag} ({layer.name}): head {h} became an attention sink at step {step}: "
                f"{sink[h]:.0%} of its attention on the first key",
            ) for h in heads)
        return found


#: Normalised entropy above which a head counts as uniform, and below which as sharp.
UNIFORM_ENTROPY = 0.99
SHARP_ENTROPY = 0.4


def head_states(layer: LayerSummary, rules: "AlertRules") -> np.ndarray:
    """(H,) :class:`~attn_probe.snapshot.HeadState` codes of ``layer``'s heads, the most
    alarming that applies: logits past the logit rule, entropy below the entropy rule
    (one-hot), uniform attention, an attention sink, a sharp head, else healthy."""
    heads = layer.heads
    states = np.full(layer.num_heads, HeadState.HEALTHY, dtype=np.int8)
    entropy = heads.get("entropy_norm_full", np.full(layer.num_heads, np.nan))
    with np.errstate(invalid="ignore"):
        states[entropy < SHARP_ENTROPY] = HeadState.SHARP
        if rules.sink is not None:
            states[heads.get("sink_full", entropy) >= rules.sink.min_mass] = HeadState.SINK
        states[entropy > UNIFORM_ENTROPY] = HeadState.UNIFORM
        if rules.entropy is not None:
            states[entropy < rules.entropy.min_entropy] = HeadState.ONE_HOT
        if rules.logit is not None:
            states[heads.get("max_logit", entropy) > rules.logit.max_logit] = HeadState.EXPLODING
    counts = layer.full_counts if layer.full_counts is not None else layer.counts
    states[(counts == 0) & (layer.counts == 0)] = HeadState.NO_DATA
    return states


class AlertMonitor:
    """Turns the conditions of each snapshot into alerts that fire once: per kind and layer,
    and for ``sink`` per head."""

    def __init__(self, rules: AlertRules) -> None:
        self.rules = rules
        self.fired: list[Alert] = []
        self._seen: set[tuple] = set()

    def judge(self, snapshot: Snapshot) -> Snapshot:
        """``snapshot`` with its new alerts (:meth:`update`) and every head's state."""
        alerts = tuple(self.update(snapshot))
        states = {layer.name: head_states(layer, self.rules) for layer in snapshot.layers}
        return dataclasses.replace(snapshot, alerts=alerts, states=states)

    def update(self, snapshot: Snapshot) -> list[Alert]:
        """The new alerts of ``snapshot``, in layer order."""
        new = []
        for layer in snapshot.layers:
            for alert in self.rules.check(layer, snapshot.step, snapshot.tau):
                key = (alert.kind, alert.layer) + (alert.heads if alert.kind == "sink" else ())
                if key not in self._seen:
                    self._seen.add(key)
                    new.append(alert)
        self.fired.extend(new)
        return new
