"""AttentionProbe for the Hugging Face ``transformers.Trainer``.

>>> from transformers import Trainer, TrainingArguments
>>> from attn_probe.integrations.huggingface import AttentionProbeCallback
>>> args = TrainingArguments(output_dir="out", logging_steps=50, max_steps=1000)
>>> probe_cb = AttentionProbeCallback(capture=CaptureOptions(batch_rows=2))
>>> trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[probe_cb])
>>> trainer.train()          # rank90/max/L00, ... beside train/loss, wherever report_to logs
>>> probe_cb.probe.last   # the last snapshot, also after training

Needs ``transformers`` (``pip install "attn_probe[hf]"``); without it, importing this module
works but using :class:`AttentionProbeCallback` raises ``ImportError``.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from ..outputs import TensorBoardOutput
from ..outputs.tracker import TrackerOutput
from .base import FrameworkOutput, ProbeCallback, optional_base

_TrainerCallback, __getattr__ = optional_base(
    "transformers", "TrainerCallback", label="Hugging Face", extra="hf"
)

__all__ = ["AttentionProbeCallback", "ReportToOutput", "default_log_dir", "trainer_callbacks"]


def trainer_callbacks(callback: Any) -> list[Any]:
    """The callbacks of the ``Trainer`` that is calling ``callback`` now (from one of its
    events): the ``CallbackHandler`` whose event loop is on the call stack, holding
    ``callback``. Empty when no Trainer is calling it."""
    from transformers.trainer_callback import CallbackHandler

    frame = sys._getframe(1)
    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, CallbackHandler) and any(c is callback for c in owner.callbacks):
            return list(owner.callbacks)
        frame = frame.f_back
    return []


def _writer_dir(callbacks: list[Any]) -> str | None:
    """The directory of the ``TensorBoardCallback``'s own writer, when it has one."""
    from transformers.integrations import TensorBoardCallback

    for callback in callbacks:
        writer = getattr(callback, "tb_writer", None)
        if isinstance(callback, TensorBoardCallback) and writer is not None:
            return str(writer.log_dir)
    return None


def default_log_dir(args: Any, callbacks: list[Any] = ()) -> str:
    """Where a ``TensorBoardOutput()`` given no directory logs: the directory of the writer of
    the Trainer's own ``TensorBoardCallback`` (in ``callbacks``, :func:`trainer_callbacks`), so
    that the probe's scalars and the Trainer's ``train/loss`` are one TensorBoard run; else
    ``args.logging_dir`` where ``TrainingArguments`` has one (transformers 4); else
    ``<output_dir>/attn_probe``."""
    found = _writer_dir(list(callbacks))
    if found:
        return found
    logging_dir = getattr(args, "logging_dir", None)
    if logging_dir:
        return str(logging_dir)
    return os.path.join(getattr(args, "output_dir", None) or ".", "attn_probe")


class ReportToOutput(FrameworkOutput):
    """The Hugging Face callback's default output: the integrations ``report_to`` started, at
    the Trainer's global step — the ``TensorBoardCallback``'s own writer
    (:class:`~attn_probe.outputs.TensorBoardOutput`), the active W&B run
    (:class:`~attn_probe.outputs.wandb.WandbOutput`), the active MLflow run
    (:class:`~attn_probe.outputs.mlflow.MlflowOutput`); with none of them, TensorBoard in
    :func:`default_log_dir`.

    Args:
        callbacks: the Trainer's callbacks (:func:`trainer_callbacks`), where the integrations
            are looked up at the first write (after they started their runs).
        args: the ``TrainingArguments`` (for the fallback directory).
        per_head, pictures_every, logit_cap: as in
            :class:`~attn_probe.outputs.tracker.TrackerOutput`.
    """

    def __init__(self, callbacks: list[Any], args: Any, *, per_head: bool | str = True,
                 pictures_every: int = 1000, logit_cap: float | None = None) -> None:
        super().__init__(lambda: default_log_dir(args, callbacks), per_head=per_head,
                         pictures_every=pictures_every, logit_cap=logit_cap)
        self.callbacks = callbacks

    def find(self) -> list[TrackerOutput]:
        from transformers.integrations import MLflowCallback, TensorBoardCallback, WandbCallback

        found: list[TrackerOutput] = []
        for callback in self.callbacks:
            if isinstance(callback, TensorBoardCallback):
                if getattr(callback, "tb_writer", None) is not None:
                    found.append(TensorBoardOutput(writer=callback.tb_writer,
                                                   logit_cap=self.logit_cap))
            elif isinstance(callback, WandbCallback):
                from ..outputs.wandb import WandbOutput, import_wandb

                if import_wandb().run is not None:
                    found.append(WandbOutput(run=import_wandb().run, logit_cap=self.logit_cap))
            elif isinstance(callback, MLflowCallback):
                from ..outputs.mlflow import MlflowOutput, import_mlflow

                active = import_mlflow().active_run()
                if active is not None:
                    found.append(MlflowOutput(run_id=active.info.run_id,
                                              logit_cap=self.logit_cap))
        return found


if _TrainerCallback is not None:

    class AttentionProbeCallback(ProbeCallback, _TrainerCallback):
        """Runs an :class:`~attn_probe.AttentionProbe` on the ``Trainer``'s model.

        Args:
            model: the module to watch (default: the ``model`` the Trainer hands to callbacks).
            stop_on: the kinds of alert that stop training (``"lazy"``, ``"entropy"``,
                ``"logit"``, ``"sink"``; see :mod:`attn_probe.alerts`), e.g.
                ``("logit", "entropy")``; checked here (``ValueError`` for anything else, or for
                a kind that ``alerts`` turns off). Default: none.
            every, offset, capture, alerts, outputs, log_dir, on_alert, history: as in
                :class:`~attn_probe.AttentionProbe`, checked when the callback is made.
                Defaults: ``every`` = the Trainer's ``logging_steps`` (in steps, also when
                given as a fraction of the run); with neither ``outputs`` nor ``log_dir``, the
                integrations ``report_to`` started (:class:`ReportToOutput`: the
                ``TensorBoardCallback``'s writer, the W&B run, the MLflow run); a
                ``TensorBoardOutput()`` with no directory logs in :func:`default_log_dir`.

        Steps are numbered as the Trainer numbers them: optimizer step ``N`` (1-based) is the
        ``N``-th update, and the Trainer logs its loss at ``global_step == N``. The probe
        samples the steps ``N`` that are multiples of ``every`` (with the default ``every``
        exactly the steps the Trainer logs), measures the *first* forward pass of step ``N``
        (its first micro-batch under gradient accumulation, with the weights left by update
        ``N - 1``) and logs it at step ``N``.

        A step is closed, its figures logged and its alerts decided, on ``on_step_end``, and
        the next one is opened on ``on_step_begin``: evaluation and checkpointing run between
        the two, so their forward passes belong to no step and are never taken for training.
        For the same reason the hooks are installed at the first step, after
        ``eval_on_start``. The :class:`~attn_probe.AttentionProbe` is :attr:`probe` (made on
        ``on_train_begin``); its hooks are removed on ``on_train_end``.

        Stopping (``stop_on``): the first alert of one of those kinds, at sampled step ``N``,
        sets ``control.should_training_stop`` in ``on_step_end`` of step ``N``, which the
        Trainer checks right after (after that step's logging, evaluation and saving): training
        ends with ``state.global_step == N == alert.step``, and the event files hold the
        alert's marker at ``N`` and nothing of the probe after it. The alert is
        :attr:`stopped_by` (None when no alert stopped training), and a warning says why
        training stopped. Under DDP or FSDP the decision comes from the alerts every process
        computes from the figures reduced over all of them (the probe's ``on_alert``): every
        process stops after the same step.

        The Trainer calls no callback when ``train()`` raises, so after an exception the probe
        stays attached to the model until ``callback.probe.detach(collective=False)`` or until
        the callback is garbage-collected. It holds nothing process-wide meanwhile (no compiler
        stance, no mode: see :class:`~attn_probe.AttentionProbe`), so compiled code and other
        models are unaffected; a next ``trainer.train()`` replaces it.

        Under DDP or FSDP every process runs the callback; each measures its own sequences,
        the figures are the mean over all processes and process 0 writes them.

        Example::

            from attn_probe.integrations.huggingface import AttentionProbeCallback

            trainer = Trainer(
                model=model,
                args=TrainingArguments(output_dir="out", logging_steps=50),
                train_dataset=train_dataset,
                callbacks=[AttentionProbeCallback(capture=CaptureOptions(batch_rows=2),
                                                  stop_on=("logit", "entropy"))],
            )
            trainer.train()  # the probe's charts are wherever report_to logs
        """

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            if self.model is None and model is None:
                raise ValueError(
                    "AttentionProbeCallback: no model to watch (the Trainer passed none); "
                    "give one with AttentionProbeCallback(model=...)"
                )
            # The integrations report_to started come first among the Trainer's callbacks:
            # their runs are open by now.
            callbacks = trainer_callbacks(self)
            self._make_probe(
                model, lambda: default_log_dir(args, callbacks),
                lambda: getattr(state, "logging_steps", None) or args.logging_steps,
                lambda: ReportToOutput(callbacks, args),
            )

        def on_step_begin(self, args, state, control, **kwargs):
            if self.probe is None:
                return
            if self._open is not None:  # not closed at its end (no on_step_end came)
                self._close(state.global_step)
            self._open_step(state.global_step + 1)

        def on_step_end(self, args, state, control, **kwargs):
            # global_step is the step that just ended: its measurement is complete. Closing
            # it here, before the Trainer checks should_training_stop, stops training right
            # after the step of the alert; evaluation, which follows, is not measured.
            if self.probe is not None and self._open is not None:
                if self._close(state.global_step):
                    control.should_training_stop = True

        def on_train_end(self, args, state, control, **kwargs):
            self._finish()
