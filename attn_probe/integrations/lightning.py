"""AttentionProbe for the Lightning ``Trainer``.

>>> import lightning as L
>>> from attn_probe.integrations.lightning import AttentionProbeCallback
>>> probe_cb = AttentionProbeCallback(every=100, capture=CaptureOptions(batch_rows=2))
>>> trainer = L.Trainer(max_steps=10_000, callbacks=[probe_cb])
>>> trainer.fit(lit_module, train_loader)  # rank90/max/L00, ... in every logger of the Trainer
>>> probe_cb.probe.last

Needs ``lightning`` (``pip install "attn_probe[lightning]"``); without it, importing this module
works but using :class:`AttentionProbeCallback` raises ``ImportError``.
"""

from __future__ import annotations

import os
from typing import Any

from ..outputs import TensorBoardOutput
from ..outputs.tracker import TrackerOutput
from .base import FrameworkOutput, ProbeCallback, optional_base

_Callback, __getattr__ = optional_base(
    "lightning.pytorch", "Callback", label="Lightning", extra="lightning"
)

__all__ = ["AttentionProbeCallback", "LightningLoggersOutput", "LoggerOutput", "default_log_dir"]


def default_log_dir(trainer: Any) -> str:
    """Where a ``TensorBoardOutput()`` given no directory logs.

    The first logger's directory (``trainer.log_dir``: a ``TensorBoardLogger``'s
    ``.../version_N``, so the probe's scalars join the run's own), else
    ``<default_root_dir>/attn_probe``. Call it on every process (``trainer.log_dir``
    broadcasts from process 0).
    """
    if trainer.loggers:
        log_dir = trainer.log_dir
        if log_dir:
            return str(log_dir)
    return os.path.join(trainer.default_root_dir, "attn_probe")


class LightningLoggersOutput(FrameworkOutput):
    """The Lightning callback's default output: every logger in ``trainer.loggers``
    (:class:`LoggerOutput` each), at Lightning's step; with no logger, TensorBoard in
    ``<default_root_dir>/attn_probe``.

    ``per_head``, ``pictures_every``, ``logit_cap``: as in
    :class:`~attn_probe.outputs.tracker.TrackerOutput`.
    """

    def __init__(self, trainer: Any, *, per_head: bool | str = True, pictures_every: int = 1000,
                 logit_cap: float | None = None) -> None:
        super().__init__(lambda: os.path.join(trainer.default_root_dir, "attn_probe"),
                         per_head=per_head, pictures_every=pictures_every, logit_cap=logit_cap)
        self.trainer = trainer

    def find(self) -> list[TrackerOutput]:
        return [LoggerOutput(logger, logit_cap=self.logit_cap) for logger in self.trainer.loggers]


class LoggerOutput(TrackerOutput):
    """Stores into one Lightning logger: scalars with ``logger.log_metrics(values, step)``
    (every logger takes them: CSV, TensorBoard, W&B, MLflow, ...); alerts, pictures and the
    settings where ``logger.experiment`` can hold them: a TensorBoard ``SummaryWriter``
    (:class:`~attn_probe.outputs.TensorBoardOutput`), a W&B run
    (:class:`~attn_probe.outputs.wandb.WandbOutput`), an MLflow client
    (:class:`~attn_probe.outputs.mlflow.MlflowOutput`); other loggers get the settings with
    ``log_hyperparams``."""

    def __init__(self, logger: Any, *, logit_cap: float | None = None) -> None:
        super().__init__(logit_cap=logit_cap)
        self.logger = logger
        self.experiment = _experiment_output(logger, logit_cap)

    def first_write(self, snapshot) -> None:
        if self.experiment is not None:
            self.experiment.first_write(snapshot)

    def log_scalars(self, step: int, values: dict[str, float]) -> None:
        self.logger.log_metrics(values, step=step)

    def log_alerts(self, step: int, alerts) -> None:
        if self.experiment is not None:
            self.experiment.log_alerts(step, alerts)

    def log_pictures(self, step: int, pictures) -> None:
        if self.experiment is not None:
            self.experiment.log_pictures(step, pictures)

    def log_settings(self, settings: dict[str, Any]) -> None:
        if self.experiment is not None:
            self.experiment.log_settings(settings)
        else:
            self.logger.log_hyperparams({"attn_probe": settings})

    def flush(self) -> None:
        if self.experiment is not None:
            self.experiment.flush()
        self.logger.save()

    def close(self) -> None:
        super().close()
        if self.experiment is not None:
            self.experiment.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({type(self.logger).__name__})"


def _experiment_output(logger: Any, logit_cap: float | None) -> TrackerOutput | None:
    """What stores alerts and pictures into ``logger.experiment``, where it can hold them."""
    from lightning.pytorch import loggers
    from torch.utils.tensorboard import SummaryWriter

    if isinstance(logger, loggers.TensorBoardLogger) and isinstance(logger.experiment,
                                                                     SummaryWriter):
        return TensorBoardOutput(writer=logger.experiment, logit_cap=logit_cap)
    if isinstance(logger, loggers.WandbLogger):
        from ..outputs.wandb import WandbOutput

        return WandbOutput(run=logger.experiment, logit_cap=logit_cap)
    if isinstance(logger, loggers.MLFlowLogger):
        from ..outputs.mlflow import MlflowOutput

        return MlflowOutput(client=logger.experiment, run_id=logger.run_id, logit_cap=logit_cap)
    return None


if _Callback is not None:

    class AttentionProbeCallback(ProbeCallback, _Callback):
        """Runs an :class:`~attn_probe.AttentionProbe` on the ``LightningModule``.

        Args:
            model: the module to watch (default: the ``LightningModule`` being fitted).
            stop_on: the kinds of alert that stop training (``"lazy"``, ``"entropy"``,
                ``"logit"``, ``"sink"``; see :mod:`attn_probe.alerts`), e.g.
                ``("logit", "entropy")``; checked here (``ValueError`` for anything else, or for
                a kind that ``alerts`` turns off). Default: none.
            every, offset, capture, alerts, outputs, log_dir, on_alert, history: as in
                :class:`~attn_probe.AttentionProbe`, checked when the callback is made.
                Defaults: ``every`` = the Trainer's ``log_every_n_steps`` (100 if that is 0);
                with neither ``outputs`` nor ``log_dir``, every logger of the Trainer
                (:class:`LightningLoggersOutput`: scalars through each logger's
                ``log_metrics``, alerts and pictures where its ``experiment`` holds them);
                a ``TensorBoardOutput()`` with no directory logs in :func:`default_log_dir`.

        Steps are numbered as Lightning numbers them: step ``s`` is the work that leads to
        optimizer step ``s`` (``trainer.global_step == s`` while its batches run, 0-based),
        which is also the step Lightning logs that work's ``self.log`` values at. Lightning
        logs every ``log_every_n_steps`` steps counting from 1, that is at steps ``s`` with
        ``(s + 1) % n == 0`` (``n - 1``, ``2n - 1``, ...), so the probe samples the same steps
        (``offset=-1``: with ``every=n`` the steps ``every - 1``, ``2·every - 1``, ...), measures
        the *first* forward pass of a sampled step (its first micro-batch under
        ``accumulate_grad_batches``) and logs it at ``s``: beside the ``train_loss`` of that
        step. Pass ``offset=0`` to sample steps 0, every, 2·every, ... instead.

        The hooks are installed on ``on_train_start``, after the sanity-check validation. A
        step is closed, its figures logged and its alerts decided, on the
        ``on_train_batch_end`` of its last batch (the one after which ``global_step`` has
        moved on), and the next one is opened on its first ``on_train_batch_start``:
        validation runs in between, so its forward passes belong to no step and are never
        taken for training. The probe is :attr:`probe` (made on ``on_fit_start``); its hooks
        are removed on ``on_train_end`` / ``on_fit_end``, and on ``on_exception`` (then
        without any collective: other processes may be gone).

        Stopping (``stop_on``): the first alert of one of those kinds, at sampled step ``s``,
        sets ``trainer.should_stop`` in that ``on_train_batch_end``, which the fit loop checks
        right after (after the validation Lightning runs on stopping): training ends after
        step ``s``, with ``trainer.global_step == s + 1 == alert.step + 1`` (optimizer steps
        done, counting from 1, while steps are numbered from 0), and the event files hold the
        alert's marker at ``s`` beside that step's ``train_loss``, and nothing of the probe
        after it. ``min_steps`` / ``min_epochs`` still hold: Lightning goes on until they are
        met, and the probe goes on measuring. The alert is :attr:`stopped_by` (None when no
        alert stopped training), and a warning says why training stopped. Under DDP or FSDP
        the decision comes from the alerts every process computes from the figures reduced
        over all of them (the probe's ``on_alert``): every process stops after the same step.

        Under DDP or FSDP every process runs the callback; each measures its own sequences,
        the figures are the mean over all processes and process 0 writes them.

        Example::

            import lightning as L
            from attn_probe.integrations.lightning import AttentionProbeCallback

            trainer = L.Trainer(
                max_steps=10_000, log_every_n_steps=50,
                callbacks=[AttentionProbeCallback(capture=CaptureOptions(batch_rows=2),
                                                  stop_on=("logit", "entropy"))],
            )
            trainer.fit(lit_module, train_dataloader)
            # the probe's charts are in the Trainer's loggers (TensorBoard by default:
            # tensorboard --logdir lightning_logs)
        """

        # lifecycle -------------------------------------------------------------------
        def __init__(self, model: Any = None, *, offset: int = -1, **settings: Any) -> None:
            # offset=-1: Lightning logs at the steps s with (s + 1) % n == 0.
            super().__init__(model, offset=offset, **settings)

        def on_fit_start(self, trainer, pl_module) -> None:
            self._make_probe(pl_module, lambda: default_log_dir(trainer),
                             lambda: int(trainer.log_every_n_steps) or 100,
                             lambda: LightningLoggersOutput(trainer))

        def on_train_start(self, trainer, pl_module) -> None:
            if self.probe is None:
                return
            self._open_step(int(trainer.global_step))

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if self.probe is None or not self.probe.attached:
                return
            step = int(trainer.global_step)
            if self._open is not None and step != self._open:
                # Not closed at its last batch's end: close it (as step - 1, the step whose
                # batches just ran).
                if self._close(step - 1):
                    trainer.should_stop = True
            if self._open is None:
                self._open_step(step)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if self.probe is None or self._open is None:
                return
            step = int(trainer.global_step)
            if step != self._open:
                # The optimizer stepped: the open step (step - 1) is done. Closing it here,
                # before the fit loop checks should_stop, stops training right after it;
                # validation, which follows, is not measured.
                if self._close(step - 1):
                    trainer.should_stop = True

        def on_train_end(self, trainer, pl_module) -> None:
            self._finish()

        def on_fit_end(self, trainer, pl_module) -> None:
            self._finish()

        def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
            if self.probe is None:
                return
            self._open = None
            # Other processes may never get here: log locally, no collective.
            self.probe.detach(collective=False)
