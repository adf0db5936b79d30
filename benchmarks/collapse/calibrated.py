"""Self-calibrated thresholds, measured against the fixed defaults on the suite's records.

Each layer's healthy range is learned from the run's own first ``learn`` steps: its largest
logit spread ``S0`` and its lowest mean normalised entropy ``E0`` over them. After that, the layer
gets its own logit rule (``min_spread`` = ``factor`` × ``S0``, at least ``floor``; growth,
window and critical as the defaults) and its own entropy levels (``warning`` = ``E0`` /
``factor``, ``critical`` half of it, never above the defaults'). Nothing is warned while learning.

:func:`replay_calibrated` is :func:`.judge.replay` with these per-layer rules: each layer replayed
on its own (the logit and entropy rules look at one layer; the uniform rule, which compares
layers, keeps the defaults over the whole model).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from attn_probe.alerts import AlertMonitor, AlertRules
from attn_probe.snapshot import Alert


@dataclass(frozen=True)
class Calibration:
    learn: int = 20  #: steps the healthy range is learned over
    factor: float = 8.0  #: how far outside it a layer must go
    floor: float = 50.0  #: the lowest ``min_spread`` a layer may get


def layer_rules(history, name: str, rules: AlertRules, calibration: Calibration) -> AlertRules:
    """The rules of layer ``name`` learned from the measurements of the first steps."""
    early = [s.layer(name) for s in history if s.step < calibration.learn]
    spread = max((layer.reduce("logit_spread", "max") for layer in early), default=np.nan)
    entropy = min((layer.reduce("entropy_norm_full", "mean") for layer in early), default=np.nan)
    logit, fixed = rules.logit, rules.entropy
    if logit is not None and np.isfinite(spread):
        logit = dataclasses.replace(logit, min_spread=float(min(
            logit.critical, max(calibration.floor, calibration.factor * spread))))
    if fixed is not None and np.isfinite(entropy) and entropy > 0:
        warning = min(fixed.warning, entropy / calibration.factor)
        fixed = dataclasses.replace(fixed, warning=warning,
                                    critical=min(fixed.critical, warning / 2))
    return dataclasses.replace(rules, logit=logit, entropy=fixed, uniform=None, lazy=None,
                               sink=None)


def replay_calibrated(record: dict, rules: AlertRules,
                      calibration: Calibration = Calibration()) -> list[Alert]:
    history = sorted(record["history"], key=lambda s: s.step)
    if not history:
        return []
    alerts: list[Alert] = []
    for layer in history[0].layers:
        own = layer_rules(history, layer.name, rules, calibration)
        monitor = AlertMonitor(own)
        for snapshot in history:
            only = dataclasses.replace(snapshot, layers=(snapshot.layer(layer.name),))
            judged = monitor.judge(only)
            if snapshot.step >= calibration.learn:
                alerts += judged.alerts
    whole = AlertMonitor(dataclasses.replace(rules, logit=None, entropy=None))
    for snapshot in history:
        alerts += whole.judge(snapshot).alerts
    return sorted(alerts, key=lambda a: a.step)
