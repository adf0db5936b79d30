"""The Lightning Trainer callback in a real (tiny) training run.

The run trains a few steps with gradient accumulation and with validation between steps. A
recording callback keeps, for every optimizer step, the first micro-batch and the weights it ran
with; the test rebuilds those attention matrices with the tests' float64 reference
(``reference.GPTAttention``), computes rank@0.9 and columns@0.9 with the float64 reference count
and checks them against the event files, step for step. Validation batches must never be
measured.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
from extras_rule import extra
import torch

import unstable_run
from attn_probe.cli.report import write_report
from attn_probe.models.gpt import GPT, GPTConfig
from attn_probe import CaptureOptions, TensorBoardOutput
from reference import (
    assert_alert_logged,
    assert_logged,
    check_report,
    gpt_attention,
    no_hooks_left,
    read_scalars,
    reference_layer_means,
)

TAU = 0.9
TOL = 1e-9
MAX_SEQUENCES, MAX_TOKENS = 2, 16
GPT_CONFIG = dict(vocab_size=64, block_size=32, n_layer=2, n_head=4, n_embd=32)


def check_against_reference(scalars, want, step: int, layers: int) -> float:
    return assert_logged(scalars, want, step, layers, TOL)


def random_tokens(n: int, length: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


def lit_gpt_class(L, fail_at_step: int | None = None):
    """A LightningModule around the nanoGPT model (raising on ``fail_at_step`` if given)."""

    class LitGPT(L.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.gpt = GPT(GPTConfig(**GPT_CONFIG))
            with torch.no_grad():
                for block in self.gpt.transformer.h:
                    block.attn.c_attn.weight.mul_(20.0)

        def training_step(self, batch, batch_idx):
            _, loss = self.gpt(batch[:, :-1], batch[:, 1:])
            if self.trainer.global_step == fail_at_step:  # after the forward pass
                raise RuntimeError("failing on purpose")
            self.log("train_loss", loss)
            return loss

        def validation_step(self, batch, batch_idx):
            _, loss = self.gpt(batch[:, :-1], batch[:, 1:])
            self.log("val_loss", loss)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-2)

    return LitGPT


def test_lightning_trainer_logs_first_micro_batch_of_sampled_steps(tmp_path):
    L = extra("lightning")
    from lightning.pytorch.loggers import TensorBoardLogger

    from attn_probe.integrations.lightning import AttentionProbeCallback

    LitGPT = lit_gpt_class(L)

    seen: dict[int, tuple[torch.Tensor, dict]] = {}

    class Recorder(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step not in seen:  # the step's first micro-batch
                state = {k: v.detach().clone() for k, v in pl_module.gpt.state_dict().items()}
                seen[trainer.global_step] = (batch[:, :-1].clone(), state)

    train = torch.utils.data.DataLoader(
        random_tokens(48, 21, GPT_CONFIG["vocab_size"], seed=3), batch_size=3
    )
    val = torch.utils.data.DataLoader(random_tokens(6, 21, GPT_CONFIG["vocab_size"], seed=4),
                                      batch_size=3)
    logger = TensorBoardLogger(save_dir=str(tmp_path), name="lightning_logs")
    callback = AttentionProbeCallback(
        history=1000, capture=CaptureOptions(batch_rows=MAX_SEQUENCES, crop=MAX_TOKENS),
        outputs=[TensorBoardOutput(per_head="all")],
    )
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=6, accumulate_grad_batches=2,
        log_every_n_steps=2, logger=logger, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
        val_check_interval=2, limit_val_batches=1, num_sanity_val_steps=1,
        callbacks=[Recorder(), callback],
    )
    module = LitGPT()
    trainer.fit(module, train, val)

    probe = callback.probe
    assert probe.every == 2  # from log_every_n_steps
    assert no_hooks_left(module)
    log_dir = Path(logger.log_dir)  # the probe writes next to Lightning's own scalars
    scalars = read_scalars(log_dir)
    # Lightning logs every 2 steps counting from 1 (steps 1, 3, 5); the probe samples the same
    # steps, so each of its figures shares a step with the train_loss of that step.
    assert sorted(scalars["train_loss"]) == [1, 3, 5]
    for tag in ("rank90/max/L00", "rank90/max/L01", "columns90/max/L00", "sink_full/max/L01"):
        assert sorted(scalars[tag]) == [1, 3, 5], (tag, scalars[tag])

    worst, closest = 0.0, math.inf
    for step in (1, 3, 5):
        tokens, state = seen[step]
        model = GPT(GPTConfig(**GPT_CONFIG)).eval()
        model.load_state_dict(state)
        want, gap = reference_layer_means(
            gpt_attention(model, tokens, MAX_SEQUENCES, MAX_TOKENS), TAU)
        closest = min(closest, gap)
        worst = max(worst, check_against_reference(scalars, want, step, GPT_CONFIG["n_layer"]))
    print(f"lightning: worst |logged - reference| {worst:.3g}, closest decision {closest:.3g}")


def test_lightning_exception_removes_hooks_and_keeps_what_was_measured(tmp_path):
    L = extra("lightning")
    from attn_probe.integrations.lightning import AttentionProbeCallback

    module = lit_gpt_class(L, fail_at_step=3)()
    callback = AttentionProbeCallback(
        history=1000, every=2,
        capture=CaptureOptions(batch_rows=MAX_SEQUENCES, crop=MAX_TOKENS),
    )
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=6, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
        limit_val_batches=1, callbacks=[callback],
    )
    train = torch.utils.data.DataLoader(
        random_tokens(24, 21, GPT_CONFIG["vocab_size"], seed=5), batch_size=3
    )
    with pytest.raises(RuntimeError, match="failing on purpose"):
        trainer.fit(module, train, train)  # the sanity-check validation runs, unmeasured
    assert no_hooks_left(module)
    # step 3 was measured before the error: logged on the way out (locally, no collective)
    assert [s.step for s in callback.probe.history] == [1, 3]
    # without a logger: <default_root_dir>/attn_probe
    assert sorted(read_scalars(tmp_path / "attn_probe")["rank90/max/L00"]) == [1, 3]


def test_lightning_default_log_dir_without_logger(tmp_path):
    extra("lightning")
    from attn_probe.integrations.lightning import default_log_dir

    trainer = SimpleNamespace(loggers=[], default_root_dir=str(tmp_path))
    assert default_log_dir(trainer) == str(tmp_path / "attn_probe")


# --------------------------------------------------------------------------- stop_on


def unstable_lightning_run(L, tmp_path, name: str, **callback_options):
    """The unstable run (``tests/unstable_run.py``) in a Lightning ``Trainer``: 20 steps,
    logging and sampling every 4 (steps 3, 7, 11, ...), validating every 4: returns the
    trainer, the callback, the alerts its user ``on_alert`` saw, the warnings and the
    logger's scalars."""
    from lightning.pytorch.loggers import TensorBoardLogger

    from attn_probe.integrations.lightning import AttentionProbeCallback

    class LitUnstable(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.gpt = unstable_run.unstable_gpt()

        def training_step(self, batch, batch_idx):
            _, loss = self.gpt(batch[:, :-1], batch[:, 1:])
            self.log("train_loss", loss)
            return loss

        def validation_step(self, batch, batch_idx):
            _, loss = self.gpt(batch[:, :-1], batch[:, 1:])
            self.log("val_loss", loss)

        def configure_optimizers(self):
            return unstable_run.optimizer(self.parameters())

    seen = []
    callback = AttentionProbeCallback(
        history=1000, on_alert=lambda alert, snapshot: seen.append(alert),
        capture=CaptureOptions(batch_rows=2),
        **callback_options,
    )
    logger = TensorBoardLogger(save_dir=str(tmp_path / name), name="lightning_logs")
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=20, log_every_n_steps=4,
        gradient_clip_val=unstable_run.CLIP, val_check_interval=4, limit_val_batches=1,
        num_sanity_val_steps=0, logger=logger, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=str(tmp_path / name), callbacks=[callback],
    )
    module = LitUnstable()
    batch = unstable_run.BATCH
    train = torch.utils.data.DataLoader(unstable_run.windows(batch * 20), batch_size=batch)
    val = torch.utils.data.DataLoader(unstable_run.windows(batch, seed=1), batch_size=batch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, train, val)
    assert no_hooks_left(module)
    messages = [str(w.message) for w in caught]
    return trainer, callback, seen, messages, Path(logger.log_dir)


def test_lightning_stop_on_logit_stops_at_the_step_of_the_alert(tmp_path, single_thread):
    L = extra("lightning")

    # Without stop_on: the alerts fire and training runs to max_steps.
    trainer, callback, seen, messages, run = unstable_lightning_run(L, tmp_path, "full")
    scalars = read_scalars(run)
    sampled = [3, 7, 11, 15, 19]  # Lightning's steps are 0-based; it logs at (s + 1) % 4 == 0
    full = unstable_run.layer_figures(callback.probe.history)
    assert sorted(full) == sampled
    logit = next(a for a in callback.probe.alerts if a.kind == "logit")
    assert logit.tag == "L00"
    unstable_run.assert_clear_of_thresholds(full, until=logit.step, kind="logit")
    assert 3 <= logit.step < 19, full  # the collapse comes well before the end
    assert trainer.global_step == 20 and callback.stopped_by is None
    assert not [m for m in messages if "stopping training" in m]
    assert unstable_run.probe_steps(scalars) == set(sampled)

    # The same run with stop_on: it stops right after the step of the logit alert.
    trainer, callback, seen, messages, run = unstable_lightning_run(
        L, tmp_path, "stop", stop_on="logit")
    scalars = read_scalars(run)
    alert = callback.stopped_by
    assert alert is not None and (alert.kind, alert.tag, alert.step) == ("logit", logit.tag,
                                                                         logit.step)
    assert alert.value == pytest.approx(logit.value, rel=1e-6)  # the same run up to here
    # step s is the s-th optimizer step counting from 0: after it, global_step is s + 1
    assert trainer.global_step == alert.step + 1
    before = [step for step in sampled if step <= alert.step]
    assert [s.step for s in callback.probe.history] == before
    assert seen == callback.probe.alerts and alert in seen  # the user's on_alert, chained
    assert all(a.step <= alert.step for a in seen)  # nothing measured after the stop
    (stop_line,) = [m for m in messages if "stopping training" in m]
    assert f"after step {alert.step}" in stop_line and "'logit'" in stop_line
    # The event files: the alert at its step, no probe scalar after it, and Lightning's own
    # train_loss stops at the same step. The validation that Lightning runs on stopping is not
    # measured (2 sequences per step: the training batch's).
    assert_alert_logged(run, alert)
    # the report reads the framework's run: its loss, and every alert of the probe
    page = check_report(write_report(run, tmp_path / "report.html"), callback.probe.alerts)
    assert any(attrs.get("alt", "").endswith("training loss (train_loss)")
               for tag, attrs in page.elements if tag == "img")
    assert unstable_run.probe_steps(scalars) == set(before)
    assert max(scalars["train_loss"]) == alert.step
    assert {c for s in callback.probe.history for layer in s.layers
            for c in layer.counts.tolist()} == {2}
