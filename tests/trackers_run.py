"""One small probe run for the tracker tests, and the trackers' own readers.

:func:`probe_snapshots` runs the demo GPT under a probe whose output keeps every snapshot (with
its attention samples and head states); the alerts of the last step are added by hand (the run
is too short for a rule to fire), so that every output gets alerts with every field. The
readers use each library's own: TensorBoard's ``EventAccumulator`` (:mod:`reference`), MLflow's
``MlflowClient``, W&B's transaction-log reader (``wandb leet inspect --json``).
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from attn_probe import AttentionProbe, Output
from attn_probe.snapshot import Alert
from toy_models import small_gpt

STEPS = (0, 2, 4)
ALERTS = (
    Alert(kind="logit", layer="transformer.h.1.attn", tag="L01", heads=(1, 3), step=4,
          figure="logit_spread", reduction="max", condition="grew", value=621.25,
          threshold=300.0, since=0, since_value=12.5,
          message="L01 (transformer.h.1.attn): attention logits grew to 621.2",
          severity="critical", cause="query and key norms grew | lower the learning rate"),
    Alert(kind="sink", layer="transformer.h.0.attn", tag="L00", heads=(0,), step=4,
          figure="sink_full", reduction="max", condition="above", value=0.75, threshold=0.5,
          since=4, since_value=0.75, message="L00: an attention sink", severity="info"),
)


class Keep(Output):
    """Keeps every snapshot; asks for pictures of ``crop`` tokens at every step."""

    def __init__(self, crop: int = 8) -> None:
        self.crop, self.snapshots, self.settings = crop, [], {}

    def run_settings(self, settings):
        self.settings = dict(settings)

    def pictures(self, step):
        return self.crop

    def write(self, snapshot):
        self.snapshots.append(snapshot)


def probe_snapshots(outputs=()):
    """The snapshots of a 5-step run sampled every 2 steps (the last with :data:`ALERTS`), the
    probe's settings, and the probe (its ``outputs`` written to by the probe itself)."""
    torch.manual_seed(0)
    model = small_gpt()
    keep = Keep()
    probe = AttentionProbe(model, every=2, outputs=[keep, *outputs])
    data = torch.randint(0, 64, (5, 2, 17), generator=torch.Generator().manual_seed(1))
    with probe:
        for batch in data:
            model(batch[:, :-1], batch[:, 1:])
            probe.step()
    snapshots = keep.snapshots
    snapshots[-1] = dataclasses.replace(snapshots[-1], alerts=ALERTS)
    return snapshots, keep.settings, probe


def feed(output, snapshots, settings) -> None:
    """What the probe does with an output, on the process that logs."""
    output.start([layer.name for layer in snapshots[0].layers])
    output.run_settings(settings)
    for snapshot in snapshots:
        output.pictures(snapshot.step)
        output.write(snapshot)
    output.close()


# ------------------------------------------------------------------------------------ MLflow

_EMPTY_STORE: list[Path] = []


def mlflow_store(folder: Path) -> str:
    """The URI of a new MLflow SQLite store ``folder/mlflow.db``: a copy of one whose tables
    were made once in this process (MLflow's migrations take seconds)."""
    from mlflow import MlflowClient

    if not _EMPTY_STORE:
        template = Path(tempfile.mkdtemp(prefix="attn_probe_mlflow_")) / "mlflow.db"
        atexit.register(shutil.rmtree, template.parent, True)
        MlflowClient(tracking_uri=f"sqlite:///{template}").search_experiments()
        _EMPTY_STORE.append(template)
    shutil.copy(_EMPTY_STORE[0], folder / "mlflow.db")
    return f"sqlite:///{folder / 'mlflow.db'}"


def mlflow_run(uri: str):
    """(client, the one run) of the store at ``uri``."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    return client, run


def mlflow_scalars(client, run) -> dict[str, dict[int, float]]:
    return {key: {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
            for key in run.data.metrics}


def mlflow_artifacts(client, run_id: str, path: str | None = None) -> list[str]:
    found = []
    for item in client.list_artifacts(run_id, path):
        found += mlflow_artifacts(client, run_id, item.path) if item.is_dir else [item.path]
    return found


# --------------------------------------------------------------------------------------- W&B

def wandb_records(run_dir: Path) -> list[dict]:
    """Every record of an offline run's ``.wandb`` file, read by W&B's own reader."""
    done = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json",
                           str(run_dir)],
                          capture_output=True, text=True, timeout=60, check=True)
    return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]


def wandb_history(records) -> list[dict]:
    return [r["history"]["item"] for r in records if r["type"] == "history"]


def wandb_config(records) -> dict:
    config: dict = {}
    for record in records:
        update = (record.get("config") or record.get("run", {}).get("config") or {}).get(
            "update", {})
        config.update(update)
    return config
