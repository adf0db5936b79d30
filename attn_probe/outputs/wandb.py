"""Weights & Biases output: the probe's scalars, alerts, pictures and settings in a W&B run.

Needs ``wandb`` (``pip install "attn_probe[wandb]"``), imported at the first write. Works offline
with no account and no network: ``WandbOutput(mode="offline", dir=...)`` or ``WANDB_MODE=offline``
(``wandb sync`` uploads the run later).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from .tracker import TrackerOutput, import_tracker

if TYPE_CHECKING:
    from ..snapshot import Alert

__all__ = ["ALERTS_KEY", "STEP_METRIC", "WandbOutput", "import_wandb"]

#: The step key logged with every row when the run is someone else's (a framework's), whose
#: own step W&B counts: the probe's charts are drawn against it.
STEP_METRIC = "attn_probe/step"


def import_wandb() -> Any:
    return import_tracker("wandb", "WandbOutput")


def alert_row(alert: "Alert") -> list[Any]:
    """An alert's fields as a table row: numbers and text as they are, anything else (the
    heads) as JSON text."""
    return [value if value is None or isinstance(value, (bool, int, float, str))
            else json.dumps(value) for value in dataclasses.asdict(alert).values()]


def alert_columns(alert: "Alert") -> list[str]:
    return [field.name for field in dataclasses.fields(alert)]


#: The key of the alerts table.
ALERTS_KEY = "alerts"


class WandbOutput(TrackerOutput):
    """Logs each sampled step to a Weights & Biases run, at the probe's step.

    Scalars under the same names as TensorBoard (:mod:`attn_probe.outputs.scalars`), the alerts
    new at a step as a ``wandb.Table`` under ``alerts`` (one row per alert, every field), on
    picture steps each picture as a ``wandb.Image`` under its tag, and the probe's settings
    once in ``run.config["attn_probe"]``.

    Args:
        run: a run of yours to log into (it stays yours: :meth:`close` does not finish it).
            Default: the active run (``wandb.run``), else a new run made at the first write with
            ``project``, ``name``, ``dir``, ``mode`` (``"offline"`` needs no account), finished
            by :meth:`close`.
        per_head, pictures_every, heatmaps, heatmap_crop, logit_cap: what is logged, as in
            :class:`~attn_probe.outputs.tracker.TrackerOutput`.

    In a run the probe did not start, W&B counts its own steps: the probe logs its step as
    :data:`STEP_METRIC` with every row and draws its charts against it.
    """

    def __init__(self, run: Any = None, *, project: str | None = None, name: str | None = None,
                 dir: str | os.PathLike | None = None, mode: str | None = None,
                 per_head: bool | str = True, pictures_every: int = 1000,
                 heatmaps: Mapping[str | int, Sequence[int] | None] | None = None,
                 heatmap_crop: int = 64, logit_cap: float | None = None) -> None:
        if mode not in (None, "online", "offline", "disabled"):
            raise ValueError(f"mode must be 'online', 'offline', 'disabled' or None, got {mode!r}")
        super().__init__(per_head=per_head, pictures_every=pictures_every, heatmaps=heatmaps,
                         heatmap_crop=heatmap_crop, logit_cap=logit_cap)
        self._run = run
        self._owns_run = False
        self._init = {key: value for key, value in dict(
            project=project, name=name, dir=None if dir is None else os.fspath(dir),
            mode=mode).items() if value is not None}
        self._defined: set[str] = set()
        self._row: dict[str, Any] = {}
        self._step = 0

    @property
    def run(self) -> Any:
        """The run written to (the active run, or one started at the first use)."""
        if self._run is None:
            wandb = import_wandb()
            if wandb.run is not None:
                self._run = wandb.run
            else:
                if "dir" in self._init:
                    os.makedirs(self._init["dir"], exist_ok=True)
                self._run = wandb.init(**self._init)
                self._owns_run = True
        return self._run

    def log_settings(self, settings: dict[str, Any]) -> None:
        self.run.config.update({"attn_probe": settings}, allow_val_change=True)

    def log_scalars(self, step: int, values: dict[str, float]) -> None:
        self._step = step
        self._row.update(values)

    def log_alerts(self, step: int, alerts: list["Alert"]) -> None:
        wandb = import_wandb()
        self._row[ALERTS_KEY] = wandb.Table(columns=alert_columns(alerts[0]),
                                               data=[alert_row(alert) for alert in alerts])

    def log_pictures(self, step: int, pictures: dict[str, np.ndarray]) -> None:
        wandb = import_wandb()
        for tag, image in pictures.items():
            self._row[tag] = wandb.Image(image, caption=f"{tag}, step {step}")

    def flush(self) -> None:
        row, self._row = self._row, {}
        if not row:
            return
        run = self.run
        if self._owns_run:
            run.log(row, step=self._step)
            return
        for tag in row:  # draw the probe's charts against its own step
            prefix = tag.split("/", 1)[0]
            if prefix not in self._defined:
                self._defined.add(prefix)
                run.define_metric(f"{prefix}/*" if "/" in tag else prefix,
                                  step_metric=STEP_METRIC)
        run.log({**row, STEP_METRIC: self._step})

    def close(self) -> None:
        if self._closed:
            return
        super().close()
        if self._owns_run and self._run is not None:
            self._run.finish()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(run={self._run!r}, {self._init!r})"
