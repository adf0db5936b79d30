"""The callbacks' default: the probe logs through the loggers the framework's run set up, found
without guessing. Lightning: a CSV logger and a TensorBoard logger at once. Hugging Face:
``report_to=["tensorboard"]`` (the TensorBoardCallback's own writer), ``["mlflow"]`` (the active
MLflow run) and ``["wandb"]`` offline (the active W&B run). Each is read back with its own
reader, and its values are the probe's."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from attn_probe import CaptureOptions
from extras_rule import extra
from reference import read_images, read_scalars
from .test_lightning import GPT_CONFIG, lit_gpt_class, random_tokens
from trackers_run import (mlflow_run, mlflow_scalars, mlflow_store, wandb_config, wandb_history,
                          wandb_records)

CAPTURE = CaptureOptions(batch_rows=2, crop=16)
TAGS = ("rank90/max/L00", "max_logit/log10/L01", "entropy_norm_full/mean/L00", "health/L01")


def probe_values(probe, tag: str) -> dict[int, float]:
    """step -> the value of ``tag`` in the probe's own history (through the one scalar table)."""
    from attn_probe.outputs import health
    from attn_probe.outputs.scalars import Scalars

    table, out = Scalars(), {}
    for snapshot in probe.history:
        values = table(snapshot, health.worst_states(snapshot))
        if tag in values:
            out[snapshot.step] = values[tag]
    return out


@pytest.mark.slow
def test_lightning_logs_to_a_csv_and_a_tensorboard_logger_at_once(tmp_path):
    L = extra("lightning")
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    from attn_probe.integrations.lightning import AttentionProbeCallback

    loggers = [CSVLogger(str(tmp_path), name="csv"), TensorBoardLogger(str(tmp_path), name="tb")]
    callback = AttentionProbeCallback(capture=CAPTURE, history=10)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=4, log_every_n_steps=2, logger=loggers,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=str(tmp_path), limit_val_batches=0, callbacks=[callback],
    )
    train = torch.utils.data.DataLoader(
        random_tokens(12, 21, GPT_CONFIG["vocab_size"], seed=3), batch_size=3)
    trainer.fit(lit_gpt_class(L)(), train)
    probe = callback.probe
    assert [s.step for s in probe.history] == [1, 3]  # Lightning's steps

    with open(Path(loggers[0].log_dir) / "metrics.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    tensorboard = read_scalars(Path(loggers[1].log_dir))
    for tag in TAGS:
        want = probe_values(probe, tag)
        assert sorted(want) == [1, 3], tag
        in_csv = {int(row["step"]): float(row[tag]) for row in rows if row.get(tag)}
        assert in_csv == pytest.approx(want, rel=1e-6), tag  # CSV: the text of a float
        assert tensorboard[tag] == pytest.approx(want, rel=1e-6), tag  # float32
    assert sorted(tensorboard["train_loss"]) == [1, 3]  # the same run as Lightning's own
    # the TensorBoard logger's writer holds the pictures too (the first sampled step)
    assert {"health/heads", "attention/L00"} <= set(read_images(Path(loggers[1].log_dir)))


def hf_trainer(tmp_path, report_to, **callback_options):
    """A Hugging Face Trainer of a tiny GPT-2 over 4 steps, logging every 2, with the probe."""
    transformers = extra("transformers")
    extra("accelerate", reason="transformers.Trainer needs accelerate")
    from attn_probe.integrations.huggingface import AttentionProbeCallback

    config = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=32, vocab_size=97,
                                     n_positions=32, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel._from_config(config, attn_implementation="sdpa")
    train = list(random_tokens(24, 16, config.vocab_size, seed=1))
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=4, logging_steps=2,
        per_device_train_batch_size=3, learning_rate=1e-2, report_to=report_to, use_cpu=True,
        save_strategy="no", disable_tqdm=True, dataloader_num_workers=0, seed=0)
    callback = AttentionProbeCallback(capture=CAPTURE, history=10, **callback_options)
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=train, callbacks=[callback],
        data_collator=lambda f: {"input_ids": torch.stack(f), "labels": torch.stack(f)})
    trainer.train()
    assert [s.step for s in callback.probe.history] == [2, 4]
    return trainer, callback.probe


@pytest.mark.slow
def test_huggingface_logs_into_the_tensorboard_callbacks_own_writer(tmp_path, monkeypatch):
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    trainer, probe = hf_trainer(tmp_path, ["tensorboard"])
    from transformers.integrations import TensorBoardCallback

    (tensorboard,) = [c for c in trainer.callback_handler.callbacks
                      if isinstance(c, TensorBoardCallback)]
    # the run the callback named (it closed its writer at the end of training)
    run = Path(getattr(tensorboard, "logging_dir", None) or trainer.args.logging_dir)
    scalars = read_scalars(run)
    assert sorted(scalars["train/loss"]) == [2, 4]
    for tag in TAGS:
        assert scalars[tag] == pytest.approx(probe_values(probe, tag), rel=1e-6), tag
    # one event file: the probe wrote through the Trainer's writer, it opened none of its own
    assert len(list(run.glob("events.out.tfevents.*"))) == 1


@pytest.mark.slow
def test_huggingface_logs_into_the_active_mlflow_run(tmp_path, monkeypatch):
    extra("mlflow")
    monkeypatch.chdir(tmp_path)
    uri = mlflow_store(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "hf")
    trainer, probe = hf_trainer(tmp_path, ["mlflow"])
    client, run = mlflow_run(uri)
    scalars = mlflow_scalars(client, run)
    assert sorted(scalars["loss"]) == [2, 4]  # the Trainer's own, at the same steps
    for tag in TAGS:
        assert scalars[tag] == probe_values(probe, tag), tag
    assert run.data.params["attn_probe.every"] == "2"
    assert run.data.params["learning_rate"] == "0.01"  # the Trainer's own parameters beside


@pytest.mark.slow
def test_huggingface_logs_into_the_active_wandb_run(tmp_path, monkeypatch):
    wandb = extra("wandb")
    wandb.teardown()  # W&B reads its environment once a process: read it again
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    trainer, probe = hf_trainer(tmp_path, ["wandb"])
    from attn_probe.outputs.wandb import STEP_METRIC

    wandb.finish()  # the Trainer leaves its run open; finishing it writes the whole log

    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    records = wandb_records(run_dir)
    history = wandb_history(records)
    assert sorted(row["train/global_step"] for row in history if "train/loss" in row) == [2, 4]
    for tag in TAGS:
        got = {row[STEP_METRIC]: row[tag] for row in history if tag in row}
        assert got == probe_values(probe, tag), tag
    assert wandb_config(records)["attn_probe"]["every"] == 2
