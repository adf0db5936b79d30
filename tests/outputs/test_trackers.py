"""The trackers' outputs (JSON Lines, MLflow, Weights & Biases) written from one probe run and
read back with each library's own reader: every scalar series under the TensorBoard names, the
alerts with every field, the pictures, the settings; the same values in every output; a
tracker that fails mid-run is reported once and the others keep everything."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import warnings
from pathlib import Path

import pytest

from attn_probe import Output, TensorBoardOutput
from attn_probe.figures import definitions
from attn_probe.outputs import health
from attn_probe.outputs.events import read_run
from attn_probe.outputs.jsonl import JsonlOutput
from attn_probe.outputs.scalars import Scalars
from attn_probe.outputs.tracker import flat_settings
from attn_probe.snapshot import Alert
from extras_rule import extra
from reference import read_scalars
from trackers_run import (ALERTS, STEPS, feed, mlflow_artifacts, mlflow_run, mlflow_scalars,
                          mlflow_store, probe_snapshots, wandb_config, wandb_history,
                          wandb_records)

#: Pictures at the first and the last sampled step (the outputs' default: the first only).
EVERY = dict(pictures_every=4)
PICTURES = {"health/heads", "health/timeline", "collapse_map/rank90", "profile/max_rank90",
            "attention/L00", "attention/L01"}


@pytest.fixture(scope="module")
def run():
    return probe_snapshots()


@pytest.fixture
def store(tmp_path, monkeypatch):
    """The URI of a new MLflow SQLite store in ``tmp_path`` (the current directory there)."""
    extra("mlflow")
    monkeypatch.chdir(tmp_path)
    return mlflow_store(tmp_path)


def expected_scalars(snapshots) -> dict[str, dict[int, float]]:
    """tag -> step -> value, from the snapshots' own figures through the one scalar table."""
    table, out = Scalars(), {}
    for snapshot in snapshots:
        for tag, value in table(snapshot, health.worst_states(snapshot)).items():
            out.setdefault(tag, {})[snapshot.step] = value
    return out


def test_the_scalars_are_the_snapshots_figures(run):
    snapshots, _, _ = run
    scalars = expected_scalars(snapshots)
    layer = snapshots[1].layers[1]
    assert scalars["rank90/max/L01"][2] == layer.reduce("rank", "max")
    assert scalars["max_logit/log10/L01"][2] == math.log10(layer.reduce("max_logit", "max"))
    assert scalars["entropy_norm_full/mean/L00"][4] == snapshots[2].layers[0].reduce(
        "entropy_norm_full", "mean")
    assert scalars["alert/logit"] == {0: 0.0, 2: 0.0, 4: 1.0}
    # per-head scalars from the step an alert names the heads (the most extreme first)
    assert set(scalars["max_logit/head/L01/H01"]) == {4}
    assert all(set(series) == set(STEPS) for tag, series in scalars.items() if "/head/" not in tag)


def test_jsonl_read_back_as_a_run(run, tmp_path):
    snapshots, settings, _ = run
    path = tmp_path / "probe.jsonl"
    feed(JsonlOutput(path), snapshots, settings)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[0]["format"] == "attn_probe" and lines[0]["settings"] == flat_settings(settings)
    assert lines[0]["settings"]["capture.tau"] == 0.9 and lines[0]["settings"]["every"] == 2
    assert [line["step"] for line in lines[2:]] == list(STEPS)
    back = read_run(path)
    assert back.definitions == tuple(map(tuple, lines[1]["definitions"]))
    assert ("rank90/max/Lxx", next(m for t, m in back.definitions if t == "rank90/max/Lxx")) \
        in definitions(tau=0.9, lazy=snapshots[0].lazy_rule)
    want = expected_scalars(snapshots)
    assert {tag: dict(zip(s.tolist(), v.tolist())) for tag, (s, v) in back.scalars.items()} == want
    assert back.alerts == ALERTS  # every field
    assert lines[-1]["alerts"] == [json.loads(json.dumps(dataclasses.asdict(a))) for a in ALERTS]


def test_a_crashed_jsonl_reads_up_to_its_last_whole_line(run, tmp_path):
    snapshots, settings, _ = run
    path = tmp_path / "probe.jsonl"
    feed(JsonlOutput(path), snapshots, settings)
    text = path.read_text()
    path.write_text(text[: len(text) - 40])  # the last step's line cut short
    back = read_run(path)
    assert back.last_step == 2 and back.alerts == ()
    path.write_text(text.replace('"step": 2', '"step": "two"'))
    with pytest.raises(ValueError, match=r"probe.jsonl, line 4: not a record of the probe"):
        read_run(path)


@pytest.mark.slow
def test_mlflow_sqlite_store_read_back(run, store, tmp_path):
    from attn_probe.outputs.mlflow import MlflowOutput

    snapshots, settings, _ = run
    uri = store
    feed(MlflowOutput(uri, run_name="probe", **EVERY), snapshots, settings)
    client, found = mlflow_run(uri)
    assert found.info.run_name == "probe" and found.info.status == "FINISHED"
    assert mlflow_scalars(client, found) == expected_scalars(snapshots)
    params = found.data.params
    assert params["attn_probe.capture.tau"] == "0.9" and params["attn_probe.every"] == "2"
    assert params["attn_probe.layers"] == "transformer.h.0.attn, transformer.h.1.attn"
    artifacts = mlflow_artifacts(client, found.info.run_id)
    assert "attn_probe/alerts/step_00000004.json" in artifacts
    assert found.info.artifact_uri.startswith((tmp_path / "mlartifacts").as_uri())
    import mlflow

    alerts = mlflow.artifacts.load_dict(
        f"{found.info.artifact_uri}/attn_probe/alerts/step_00000004.json")
    assert alerts["step"] == 4
    assert [Alert(**{k: tuple(v) if isinstance(v, list) else v for k, v in a.items()})
            for a in alerts["alerts"]] == list(ALERTS)
    # one picture per tag and step (MLflow writes "/" in a key as "~")
    for tag in PICTURES:
        for step in (0, 4):
            name = f"images/{tag.replace('/', '~')}+step+{step}+"
            assert [a for a in artifacts if a.startswith(name) and a.endswith(".png")], name


@pytest.mark.slow
def test_wandb_offline_run_read_back(run, tmp_path, monkeypatch):
    extra("wandb")
    from attn_probe.outputs.wandb import WandbOutput

    monkeypatch.setenv("WANDB_SILENT", "true")
    snapshots, settings, _ = run
    feed(WandbOutput(mode="offline", dir=tmp_path, project="probe", **EVERY), snapshots,
         settings)
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    records = wandb_records(run_dir)
    history = wandb_history(records)
    assert [row["_step"] for row in history] == list(STEPS)
    got: dict[str, dict[int, float]] = {}
    for row in history:
        for key, value in row.items():
            if not key.startswith("_") and isinstance(value, (int, float)) and "." not in key:
                got.setdefault(key, {})[row["_step"]] = float(value)
    assert got == expected_scalars(snapshots)
    config = wandb_config(records)["attn_probe"]
    assert config == flat_settings(settings)
    for row in (history[0], history[2]):
        for tag in PICTURES:
            assert row[f"{tag}._type"] == "image-file"
            assert (run_dir / "files" / row[f"{tag}.path"]).stat().st_size > 1000
    assert "alerts._type" not in history[0] and "health/heads._type" not in history[1]
    table = json.loads((run_dir / "files" / history[-1]["alerts.path"]).read_text())
    assert table["columns"] == [f.name for f in dataclasses.fields(Alert)]
    rows = [dict(zip(table["columns"], row)) for row in table["data"]]
    assert [Alert(**{**row, "heads": tuple(json.loads(row["heads"]))}) for row in rows] == \
        list(ALERTS)


@pytest.mark.slow
def test_the_same_values_in_every_output(run, store, tmp_path, monkeypatch):
    """TensorBoard (float32 in its event file), JSON Lines, MLflow and W&B of one run."""
    extra("wandb")
    from attn_probe.outputs.mlflow import MlflowOutput
    from attn_probe.outputs.wandb import WandbOutput

    monkeypatch.setenv("WANDB_SILENT", "true")
    snapshots, settings, _ = run
    uri = store
    outputs = [TensorBoardOutput(str(tmp_path / "tb"), pictures_every=0),
               JsonlOutput(tmp_path / "run.jsonl"), MlflowOutput(uri, pictures_every=0),
               WandbOutput(mode="offline", dir=tmp_path / "wb", pictures_every=0)]
    for output in outputs:
        feed(output, snapshots, settings)
    tensorboard = read_scalars(tmp_path / "tb")
    jsonl = {tag: dict(zip(s.tolist(), v.tolist()))
             for tag, (s, v) in read_run(tmp_path / "run.jsonl").scalars.items()}
    mlflow = mlflow_scalars(*mlflow_run(uri))
    (run_dir,) = (tmp_path / "wb" / "wandb").glob("offline-run-*")
    wandb = {}
    for row in wandb_history(wandb_records(run_dir)):
        for key, value in row.items():
            if key in jsonl:
                wandb.setdefault(key, {})[row["_step"]] = value
    assert jsonl == mlflow == wandb
    assert set(tensorboard) == set(jsonl)
    for tag, series in jsonl.items():
        assert set(tensorboard[tag]) == set(series)
        for step, value in series.items():
            assert tensorboard[tag][step] == pytest.approx(value, rel=1e-6, abs=1e-30), tag


def test_a_full_disk_is_reported_once_and_the_others_keep_every_step(tmp_path):
    """A JSON Lines file on a full disk (``/dev/full``: every write fails with ENOSPC) beside
    TensorBoard, in a real probe run."""
    full = JsonlOutput("/dev/full")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        snapshots, _, probe = probe_snapshots([full, TensorBoardOutput(str(tmp_path))])
    failed = [str(w.message) for w in caught if "JsonlOutput" in str(w.message)]
    assert len(failed) == 1 and "No space left on device" in failed[0], failed
    assert "the other outputs and the measurement go on" in failed[0]
    scalars = read_scalars(tmp_path)
    assert sorted(scalars["rank90/max/L00"]) == list(STEPS)
    assert [s.step for s in snapshots] == list(STEPS)


@pytest.mark.slow
def test_an_mlflow_store_that_fails_mid_run(store, tmp_path):
    """In a real probe run, the MLflow run's artifact folder is replaced by a file after the
    first step: MLflow can no longer store the alerts or pictures (a real ``OSError``), the probe
    reports it once and goes on, and the JSON Lines file beside it keeps every step and alert."""
    from attn_probe.outputs.mlflow import MlflowOutput

    mlflow = MlflowOutput(store, pictures_every=4)

    class BreakTheStore(Output):
        def write(self, snapshot):
            if snapshot.step == 0:  # after MLflow wrote step 0
                uri = mlflow.client.get_run(mlflow.run_id).info.artifact_uri
                folder = Path(uri.removeprefix("file://"))
                shutil.rmtree(folder)
                folder.write_text("not a folder")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        snapshots, _, _ = probe_snapshots(
            [mlflow, BreakTheStore(), JsonlOutput(tmp_path / "run.jsonl")])
    failed = [str(w.message) for w in caught if "MlflowOutput" in str(w.message)]
    assert len(failed) == 1 and "failed at step" in failed[0], failed
    back = read_run(tmp_path / "run.jsonl")
    assert back.last_step == 4 and [s.step for s in snapshots] == list(STEPS)


def test_outputs_open_nothing_before_their_first_write(run, tmp_path):
    """What every process does with an output (the probe writes on process 0 only): making it,
    ``start``, ``run_settings``, ``pictures`` and ``close`` open no file, run or store."""
    snapshots, settings, _ = run
    outputs = [TensorBoardOutput(str(tmp_path / "tb")), JsonlOutput(tmp_path / "run.jsonl")]
    from attn_probe.outputs.mlflow import MlflowOutput
    from attn_probe.outputs.wandb import WandbOutput

    outputs += [MlflowOutput(f"sqlite:///{tmp_path / 'mlflow.db'}"),
                WandbOutput(mode="offline", dir=tmp_path / "wandb")]
    for output in outputs:
        output.start([layer.name for layer in snapshots[0].layers])
        output.run_settings(settings)
        assert output.pictures(0) == (0 if isinstance(output, JsonlOutput) else 64)
        output.close()
    assert list(tmp_path.iterdir()) == []
