"""AttentionProbe for the Hugging Face ``transformers.Trainer``.

>>> from transformers import Trainer, TrainingArguments
>>> from attn_probe.integrations.huggingface import AttentionProbeCallback
>>> args = TrainingArguments(output_dir="out", logging_steps=50, max_steps=1000)
>>> probe_cb = AttentionProbeCallback(capture=CaptureOptions(batch_rows=2))
>>> trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[probe_cb])
>>> trainer.train()          # rank90/max/L00, ... beside train/loss in out/runs/<time>_<host>
>>> probe_cb.probe.last   # the last snapshot, also after training

Needs ``transformers`` (``pip install "attn_probe[hf]"``); without it, importing this module
works but using :class:`AttentionProbeCallback` raises ``ImportError``.
"""

from __future__ import annotations

import os
import socket
from datetime import datetime, timedelta
from typing import Any

from .base import ProbeCallback, optional_base

_TrainerCallback, __getattr__ = optional_base(
    "transformers", "TrainerCallback", label="Hugging Face", extra="hf"
)

__all__ = ["AttentionProbeCallback", "default_log_dir"]


#: How long before the probe's ``on_train_begin`` the Trainer's TensorBoardCallback may have
#: named its run directory (it does so in its own ``on_train_begin``, just before).
_RUN_NAME_WINDOW_S = 60


def _run_name(when: datetime) -> str:
    """``runs/<Mon DD_HH-MM-SS>_<host>``: the run directory transformers (and torch's
    ``SummaryWriter``) name after the time and the host."""
    return os.path.join("runs", when.strftime("%b%d_%H-%M-%S") + "_" + socket.gethostname())


def default_log_dir(args: Any, now: datetime | None = None) -> str:
    """Where the callback logs when given neither ``log_dir`` nor ``writer``: the directory the
    Trainer's own ``TensorBoardCallback`` writes to, so that the probe's scalars and the
    Trainer's ``train/loss`` are one TensorBoard run.

    That is ``args.logging_dir`` where ``TrainingArguments`` still has one (transformers 4),
    else the ``TENSORBOARD_LOGGING_DIR`` environment variable when set, else
    ``<output_dir>/runs/<Mon DD_HH-MM-SS>_<host>``, named by the TensorBoardCallback at the
    time it started (transformers 5): with ``report_to`` including ``"tensorboard"``, the newest
    such directory made in the last minute, else (no TensorBoard callback runs) a new name
    of that form for ``now``.
    """
    logging_dir = getattr(args, "logging_dir", None)
    if logging_dir:
        return str(logging_dir)
    env = os.environ.get("TENSORBOARD_LOGGING_DIR")
    if env:
        return os.path.expanduser(env)
    output_dir = getattr(args, "output_dir", None) or "."
    now = now or datetime.now()
    report_to = getattr(args, "report_to", None) or []
    if "tensorboard" in ([report_to] if isinstance(report_to, str) else list(report_to)):
        for seconds in range(_RUN_NAME_WINDOW_S + 1):
            candidate = os.path.join(output_dir, _run_name(now - timedelta(seconds=seconds)))
            if os.path.isdir(candidate):
                return candidate
    return os.path.join(output_dir, _run_name(now))


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
                given as a fraction of the run); with neither ``outputs`` nor ``log_dir``,
                TensorBoard in :func:`default_log_dir`.

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
            trainer.train()  # then: tensorboard --logdir out/runs
        """

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            if self.model is None and model is None:
                raise ValueError(
                    "AttentionProbeCallback: no model to watch (the Trainer passed none); "
                    "give one with AttentionProbeCallback(model=...)"
                )
            self._make_probe(
                model, lambda: default_log_dir(args),
                lambda: getattr(state, "logging_steps", None) or args.logging_steps,
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
