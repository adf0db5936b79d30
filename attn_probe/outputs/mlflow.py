"""MLflow output: the probe's scalars, alerts, pictures and settings in an MLflow run.

Needs ``mlflow`` (``pip install "attn_probe[mlflow]"``), imported at the first write. Any tracking
URI works; for a local store use SQLite (``sqlite:///mlflow.db``: MLflow 3 refuses new runs in
its old file store), and look at it with ``mlflow ui --backend-store-uri sqlite:///mlflow.db``.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from .tracker import TrackerOutput, import_tracker

if TYPE_CHECKING:
    from ..snapshot import Alert

__all__ = ["ALERTS_FOLDER", "MlflowOutput", "PARAM_PREFIX", "import_mlflow"]

#: Where the alerts go among the run's artifacts: ``attn_probe/alerts/step_00000100.json``.
ALERTS_FOLDER = "attn_probe/alerts"
#: The probe's settings are the run's parameters ``attn_probe.every``, ``attn_probe.capture.tau``...
PARAM_PREFIX = "attn_probe."
#: The most metrics one ``log_batch`` call takes (MLflow's limit).
_BATCH = 1000


def import_mlflow() -> Any:
    return import_tracker("mlflow", "MlflowOutput")


class MlflowOutput(TrackerOutput):
    """Logs each sampled step to an MLflow run, at the probe's step.

    Scalars as metrics under the same names as TensorBoard (:mod:`attn_probe.outputs.scalars`;
    MLflow draws ``/`` in a name as a group), the alerts new at a step as one JSON artifact
    ``attn_probe/alerts/step_NNNNNNNN.json`` (every field of every alert), on picture steps
    each picture with ``log_image(key=tag, step=step)`` (the UI's image slider), and the probe's
    settings once as the parameters ``attn_probe.*``.

    Args:
        tracking_uri: where the run lives (``sqlite:///mlflow.db``, a server's URL, ...).
            Default: MLflow's own (``MLFLOW_TRACKING_URI`` or ``mlflow.set_tracking_uri``).
            An experiment the output makes in a SQLite store keeps its artifacts (alerts,
            pictures) in ``mlartifacts/`` beside the store's file.
        run_id: a run of yours to log into (it stays yours). Default: the active run
            (``mlflow.active_run()``), else a new run in ``experiment`` named ``run_name``,
            made at the first write and ended by :meth:`close`.
        client: an ``mlflow.MlflowClient`` of yours (e.g. a Lightning ``MLFlowLogger``'s
            ``experiment``), used instead of one made for ``tracking_uri``.
        per_head, pictures_every, heatmaps, heatmap_crop, logit_cap: what is logged, as in
            :class:`~attn_probe.outputs.tracker.TrackerOutput`.
    """

    def __init__(self, tracking_uri: str | None = None, *, run_id: str | None = None,
                 experiment: str = "attn_probe", run_name: str | None = None,
                 client: Any = None, per_head: bool | str = True, pictures_every: int = 1000,
                 heatmaps: Mapping[str | int, Sequence[int] | None] | None = None,
                 heatmap_crop: int = 64, logit_cap: float | None = None) -> None:
        if client is not None and tracking_uri is not None:
            raise ValueError("pass tracking_uri (a client is made for it) or client, not both")
        super().__init__(per_head=per_head, pictures_every=pictures_every, heatmaps=heatmaps,
                         heatmap_crop=heatmap_crop, logit_cap=logit_cap)
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.run_name = run_name
        self._client = client
        self._run_id = run_id
        self._owns_run = False

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = import_mlflow().MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    @property
    def run_id(self) -> str:
        """The run written to (the active run, or one made at the first use)."""
        if self._run_id is None:
            mlflow = import_mlflow()
            active = mlflow.active_run() if self._client is None and self.tracking_uri is None \
                else None
            if active is not None:
                self._run_id = active.info.run_id
            else:
                client = self.client
                found = client.get_experiment_by_name(self.experiment)
                experiment_id = (found.experiment_id if found is not None
                                 else client.create_experiment(
                                     self.experiment, artifact_location=self._artifacts()))
                self._run_id = client.create_run(experiment_id, run_name=self.run_name
                                                 ).info.run_id
                self._owns_run = True
        return self._run_id

    def _artifacts(self) -> str | None:
        """Where a new experiment keeps its artifacts: beside a SQLite store's file
        (``mlartifacts/``, as ``mlflow server`` does), not in the current directory; MLflow's
        default elsewhere."""
        uri = self.tracking_uri or import_mlflow().get_tracking_uri()
        if not uri.startswith("sqlite:///") or uri.endswith(":memory:"):
            return None
        folder = Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts"
        return folder.as_uri()

    def log_settings(self, settings: dict[str, Any]) -> None:
        from mlflow.entities import Param

        params = [Param(PARAM_PREFIX + key, str(value)[:6000]) for key, value in settings.items()]
        for first in range(0, len(params), 100):
            self.client.log_batch(self.run_id, params=params[first:first + 100])

    def log_scalars(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(tag, value, now, step) for tag, value in values.items()]
        for first in range(0, len(metrics), _BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[first:first + _BATCH])

    def log_alerts(self, step: int, alerts: list["Alert"]) -> None:
        self.client.log_dict(self.run_id, {"step": step, "alerts": [
            dataclasses.asdict(alert) for alert in alerts]},
            f"{ALERTS_FOLDER}/step_{step:08d}.json")

    def log_pictures(self, step: int, pictures: dict[str, np.ndarray]) -> None:
        for tag, image in pictures.items():
            self.client.log_image(self.run_id, image, key=tag, step=step)

    def close(self) -> None:
        if self._closed:
            return
        super().close()
        if self._owns_run and self._run_id is not None:
            self.client.set_terminated(self._run_id)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(tracking_uri={self.tracking_uri!r}, "
                f"run_id={self._run_id!r})")
