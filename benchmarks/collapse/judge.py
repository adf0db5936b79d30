"""Judging recorded runs: replay alert rules over a record, and measure each run against its
healthy twin (the ``healthy`` run of its family): was it damaged, when, and was it warned first.

* *damage step*: the first step at which the run's loss, a trailing mean over :data:`WINDOW`
  steps, is at least :data:`DAMAGE` times its twin's at the same step, the first
  :data:`WINDOW` steps left out (whatever the sampling interval: damage is a property of the
  training, not of how often it is watched);
* *damaged*: its mean loss over the last :data:`TAIL` of the steps is at least :data:`DAMAGE`
  times the twin's over the same steps;
* *lead*: damage step − step of its first ``warning`` or ``critical`` alert (zero or positive:
  warned in time, at or before the damage);
* *false alarms*: the ``warning`` and ``critical`` alerts of a healthy run
  (:data:`HEALTHY_RECIPES`).

A record is replayed at a coarser sampling interval than it was trained with by dropping
measurements (:func:`subsample`): what a probe with that ``every`` would have seen, since the
probe leaves training unchanged. At interval ``every`` a damaged run is *in reach* when its damage
step is at least two intervals after the first measurement (a warning in time needs a
measurement that could show it); the others are reported, not counted.
"""

from __future__ import annotations

import glob
import os
import pickle
import statistics
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from attn_probe.alerts import AlertMonitor, AlertRules
from attn_probe.snapshot import WARNS, Alert

DAMAGE = 1.10
WINDOW = 5
TAIL = 0.1
#: Recipes that train healthily by design: every warning they get is a false alarm.
HEALTHY_RECIPES = ("healthy", "sharp", "key_bias")
TWIN = "healthy"


#: What every record holds (``runs.train`` writes more).
RECORD_KEYS = ("config", "losses", "history", "alerts")


class RecordError(ValueError):
    """A file that is not a readable record of the suite."""


#: Classes a record may name that have moved since it was written -> where they are now. The
#: lazy rule each layer summary carried (``snapshot.CollapseRule``) is ``alerts.LazyRule``;
#: a replay marks the layers' lazy heads again by the rules it is given.
MOVED = {("attn_probe.snapshot", "CollapseRule"): ("attn_probe.alerts.rules", "LazyRule")}


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        return super().find_class(*MOVED.get((module, name), (module, name)))


def load_record(path: str) -> dict:
    """The record pickled at ``path``; :class:`RecordError` saying why when it cannot be read
    (a record holds attn_probe's ``Snapshot`` and ``Alert``: it loads where those classes are
    as they were when it was written, or moved as :data:`MOVED` says)."""
    try:
        with open(path, "rb") as file:
            record = _Unpickler(file).load()
    except Exception as error:  # unpickling garbage raises almost anything
        raise RecordError(f"cannot read the record {path}: {type(error).__name__}: "
                          f"{error}") from error
    if not (isinstance(record, dict) and all(key in record for key in RECORD_KEYS)):
        raise RecordError(f"{path} is not a record of the collapse suite (no "
                          f"{', '.join(RECORD_KEYS)})")
    return record


def load_records(directory: str) -> list[dict]:
    """Every record (``*.pkl``) in ``directory``, by file name."""
    return [load_record(path) for path in sorted(glob.glob(os.path.join(directory, "*.pkl")))]


def replay(record: dict, rules: AlertRules) -> list[Alert]:
    """The alerts ``rules`` raise over the record's snapshots, fed to a fresh
    :class:`~attn_probe.alerts.AlertMonitor` in step order, as the probe does while training."""
    monitor = AlertMonitor(rules)
    for snapshot in sorted(record["history"], key=lambda s: s.step):
        monitor.judge(snapshot)
    return list(monitor.fired)


def subsample(record: dict, every: int) -> dict:
    """``record`` as a probe sampling every ``every`` steps would have recorded it: the
    measurements at steps that are a multiple of ``every`` after its first (``every`` a multiple
    of the record's own interval)."""
    own = record["config"]["every"]
    if every < 1 or every % own:
        raise ValueError(f"a record sampled every {own} steps replays only at multiples of "
                         f"{own}, not every {every}")
    history = sorted(record["history"], key=lambda s: s.step)
    first = history[0].step if history else 0
    return record | {"history": [s for s in history if (s.step - first) % every == 0],
                     "config": record["config"] | {"every": every}}


def first_alerts(alerts: Sequence[Alert]) -> dict[tuple[str, str], Alert]:
    """(kind, severity) -> the first alert of that kind and severity."""
    first: dict[tuple[str, str], Alert] = {}
    for alert in sorted(alerts, key=lambda a: a.step):
        first.setdefault((alert.kind, alert.severity), alert)
    return first


def trailing_mean(losses: Sequence[float], window: int = WINDOW) -> np.ndarray:
    """Mean of each step's loss and the ``window - 1`` before it (fewer at the start); a
    non-finite loss counts as infinite."""
    values = np.asarray(losses, dtype=np.float64)
    values = np.where(np.isfinite(values), values, np.inf)
    sums = np.concatenate([[0.0], np.cumsum(values)])
    index = np.arange(1, values.size + 1)
    low = np.maximum(index - window, 0)
    with np.errstate(invalid="ignore"):
        return (sums[index] - sums[low]) / (index - low)


def damage_step(losses: Sequence[float], twin: Sequence[float], skip: int) -> int | None:
    """The first step from ``skip`` on at which the trailing mean of ``losses`` is at least
    :data:`DAMAGE` times that of ``twin`` (None: never)."""
    n = min(len(losses), len(twin))
    run, reference = trailing_mean(losses[:n]), trailing_mean(twin[:n])
    with np.errstate(invalid="ignore"):
        hits = np.flatnonzero(run[skip:] >= DAMAGE * reference[skip:])
    return int(hits[0]) + skip if hits.size else None


def final_losses(losses: Sequence[float], twin: Sequence[float]) -> tuple[float, float]:
    """Mean loss of the run and of its twin over the last :data:`TAIL` of the steps both have."""
    n = min(len(losses), len(twin))
    tail = max(1, round(TAIL * n))
    run = np.asarray(losses[:n], dtype=np.float64)[n - tail:]
    reference = np.asarray(twin[:n], dtype=np.float64)[n - tail:]
    run = np.where(np.isfinite(run), run, np.inf)
    return float(run.mean()), float(reference.mean())


@dataclass
class Verdict:
    """One run judged against its twin, under one set of alerts."""

    config: dict
    final: float
    twin_final: float
    damaged: bool
    damage: int | None
    alerts: list[Alert] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.config['family']}-{self.config['recipe']}"

    @property
    def healthy(self) -> bool:
        """A run healthy by design (its warnings are false alarms)."""
        return self.config["recipe"] in HEALTHY_RECIPES

    @property
    def warning(self) -> Alert | None:
        """The first ``warning`` or ``critical`` alert."""
        return next((a for a in sorted(self.alerts, key=lambda a: a.step)
                     if a.severity in WARNS), None)

    @property
    def info(self) -> Alert | None:
        """The first ``info`` alert."""
        return next((a for a in sorted(self.alerts, key=lambda a: a.step)
                     if a.severity == "info"), None)

    @property
    def every(self) -> int:
        """The sampling interval the alerts were raised at."""
        return self.config["every"]

    @property
    def in_reach(self) -> bool:
        """Damaged at least two sampling intervals after the first measurement (step 0)."""
        return self.damaged and self.damage is not None and self.damage >= 2 * self.every

    @property
    def lead(self) -> int | None:
        warning = self.warning
        if self.damage is None or warning is None:
            return None
        return self.damage - warning.step

    @property
    def false_alarms(self) -> int | None:
        if not self.healthy:
            return None
        return sum(a.severity in WARNS for a in self.alerts)


def twins(records: Sequence[dict]) -> dict[str, dict]:
    """Family -> its ``healthy`` record."""
    return {r["config"]["family"]: r for r in records if r["config"]["recipe"] == TWIN}


def judge(record: dict, twin: dict, alerts: Sequence[Alert]) -> Verdict:
    """``record`` against ``twin`` (its family's healthy run), with ``alerts``."""
    losses, reference = record["losses"], twin["losses"]
    final, twin_final = final_losses(losses, reference)
    return Verdict(
        config=record["config"], final=final, twin_final=twin_final,
        damaged=final >= DAMAGE * twin_final,
        damage=damage_step(losses, reference, skip=WINDOW),
        alerts=list(alerts),
    )


def judge_suite(records: Sequence[dict], rules: AlertRules | None = None,
                every: int | None = None,
                replayer: Callable[[dict, AlertRules], list[Alert]] = replay) -> list[Verdict]:
    """Every record judged against its family's twin, with the alerts the probe raised while
    training (``rules`` None) or those ``rules`` raise when ``replayer`` replays them over it,
    sampled every ``every`` steps (None: as trained; see :func:`subsample`)."""
    if every is not None:
        if rules is None:
            raise ValueError("replaying at another interval needs the rules to replay")
        records = [subsample(r, every) for r in records]
    twin_of = twins(records)
    missing = sorted({r["config"]["family"] for r in records} - set(twin_of))
    if missing:
        raise ValueError(f"no {TWIN!r} run (the healthy twin) for {', '.join(missing)} among "
                         "the records: it is what the other runs are measured against")
    return [
        judge(r, twin_of[r["config"]["family"]],
              r["alerts"] if rules is None else replayer(r, rules))
        for r in records
    ]


@dataclass(frozen=True)
class Summary:
    every: int
    damaged: int  #: damaged runs in reach at this interval
    warned_in_time: int
    median_lead: float | None
    false_alarms: int
    healthy_runs: int
    families: int
    out_of_reach: int = 0  #: damaged runs whose damage came before two intervals

    def __str__(self) -> str:
        lead = "none" if self.median_lead is None else f"{self.median_lead:+g} steps"
        early = (f" ({self.out_of_reach} more damaged before step {2 * self.every}, out of "
                 "reach)" if self.out_of_reach else "")
        return (f"every {self.every}: damaged runs warned in time: {self.warned_in_time} of "
                f"{self.damaged}{early}; median lead: {lead}; false alarms on healthy runs: "
                f"{self.false_alarms} over {self.healthy_runs} runs of {self.families} families")


def summarise(verdicts: Sequence[Verdict]) -> Summary:
    """At one sampling interval: the damaged runs in reach warned at or before their damage step
    (lead >= 0), their median lead (of those warned at all), and the false alarms of the
    healthy runs."""
    everies = {v.every for v in verdicts}
    if len(everies) > 1:
        raise ValueError(f"verdicts of several sampling intervals: {sorted(everies)}")
    damaged = [v for v in verdicts if v.in_reach]
    leads = [v.lead for v in damaged if v.lead is not None]
    healthy = [v for v in verdicts if v.healthy]
    return Summary(
        every=everies.pop() if everies else 0,
        damaged=len(damaged), warned_in_time=sum(lead >= 0 for lead in leads),
        median_lead=statistics.median(leads) if leads else None,
        false_alarms=sum(v.false_alarms for v in healthy), healthy_runs=len(healthy),
        families=len({v.config["family"] for v in healthy}),
        out_of_reach=sum(v.damaged and not v.in_reach for v in verdicts),
    )
