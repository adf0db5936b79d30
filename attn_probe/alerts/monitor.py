"""Snapshot after snapshot: the tracks the rules look back on, the alerts that fire (each once
per kind, layer and severity), and every head's state."""

from __future__ import annotations

import dataclasses

from ..snapshot import SEVERITIES, Alert, Snapshot
from .rules import AlertRules
from .states import head_states
from .track import LayerTrack, ModelView


class AlertMonitor:
    """Turns each snapshot's conditions into alerts that fire once: per kind and layer (per head
    for ``sink``), and again only at a higher severity (a ``warning`` may become ``critical``
    later). Keeps a bounded track of every layer for the rules that look back."""

    def __init__(self, rules: AlertRules) -> None:
        self.rules = rules
        self.fired: list[Alert] = []
        self.tracks: dict[str, LayerTrack] = {}
        self._level: dict[tuple, int] = {}  # what fired -> highest severity so far

    def judge(self, snapshot: Snapshot) -> Snapshot:
        """``snapshot`` with its new alerts, the state of every head, and its layers' lazy heads
        marked by the lazy rule (:meth:`AlertRules.judge_lazy`)."""
        snapshot = dataclasses.replace(
            snapshot, layers=tuple(self.rules.judge_lazy(layer) for layer in snapshot.layers),
            lazy_rule=self.rules.lazy)
        tracks = []
        for layer in snapshot.layers:
            track = self.tracks.setdefault(layer.name, LayerTrack(self.rules.lookback))
            track.add(snapshot.step, layer)
            tracks.append(track)
        model = ModelView(snapshot.tau, tracks)
        new = []
        for track in tracks:
            for alert in self.rules.check(track, model):
                key = (alert.kind, alert.layer) + (alert.heads if alert.kind == "sink" else ())
                level = SEVERITIES.index(alert.severity)
                if level > self._level.get(key, -1):
                    self._level[key] = level
                    new.append(alert)
        self.fired.extend(new)
        states = {track.now.layer.name: head_states(track, self.rules) for track in tracks}
        return dataclasses.replace(snapshot, alerts=tuple(new), states=states)

    def update(self, snapshot: Snapshot) -> list[Alert]:
        """The new alerts of ``snapshot`` (see :meth:`judge`)."""
        return list(self.judge(snapshot).alerts)
