"""AttentionProbe for the Lightning ``Trainer``.

>>> import lightning as L
>>> from attn_probe.integrations.lightning import AttentionProbeCallback
>>> probe_cb = AttentionProbeCallback(every=100, max_sequences=2, max_tokens=256)
>>> trainer = L.Trainer(max_steps=10_000, callbacks=[probe_cb])
>>> trainer.fit(lit_module, train_loader)  # rank90/max/L00, ... next to the logger's files
>>> probe_cb.probe.history

Needs ``lightning`` (``pip install "attn_probe[lightning]"``); without it, importing this module
works but using :class:`AttentionProbeCallback` raises ``ImportError``.
"""

from __future__ import annotations

import os
from typing import Any

from .base import ProbeCallback, optional_base

_Callback, __getattr__ = optional_base(
    "lightning.pytorch", "Callback", label="Lightning", extra="lightning"
)

__all__ = ["AttentionProbeCallback", "default_log_dir"]


def default_log_dir(trainer: Any) -> str:
    """Where the callback logs when given neither ``log_dir`` nor ``writer``.

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


if _Callback is not None:

    class AttentionProbeCallback(ProbeCallback, _Callback):
        """Runs an :class:`~attn_probe.AttentionProbe` on the ``LightningModule``.

        Args:
            model: the module to watch (default: the ``LightningModule`` being fitted).
            **probe_kwargs: passed to :class:`~attn_probe.AttentionProbe`. Defaults:
                ``log_dir`` from :func:`default_log_dir` (unless ``writer`` is given) and
                ``every`` = the Trainer's ``log_every_n_steps`` (100 if that is 0).

        Steps are numbered as Lightning numbers them: step ``s`` is the work that leads to
        optimizer step ``s`` (``trainer.global_step == s`` while its batches run, 0-based),
        which is also the step Lightning logs that work's ``self.log`` values at. Lightning
        logs every ``log_every_n_steps`` steps counting from 1, that is at steps ``s`` with
        ``(s + 1) % n == 0`` (``n - 1``, ``2n - 1``, ...), so the probe samples the same steps
        (``offset=-1``: with ``every=n`` the steps ``every - 1``, ``2·every - 1``, ...), measures
        the *first* forward pass of a sampled step (its first micro-batch under
        ``accumulate_grad_batches``) and logs it at ``s``: beside the ``train_loss`` of that
        step. Pass ``offset=0`` to sample steps 0, every, 2·every, ... instead.

        The hooks are installed on ``on_train_start``, after the sanity-check validation, and
        a step is closed when the first batch of the next step starts (``on_train_batch_start``)
        and the last one on ``on_train_end``: validation runs after a step's last
        ``on_train_batch_end``, so its forward passes fall into a step whose measurement is
        already done and are never taken for training. The probe is :attr:`probe` (made on
        ``on_fit_start``); its hooks are removed on ``on_train_end`` / ``on_fit_end``, and on
        ``on_exception`` (then without any collective: other processes may be gone).

        Under DDP or FSDP every process runs the callback; each measures its own sequences,
        the figures are the mean over all processes and process 0 writes them.

        Example::

            import lightning as L
            from attn_probe.integrations.lightning import AttentionProbeCallback

            trainer = L.Trainer(
                max_steps=10_000, log_every_n_steps=50,
                callbacks=[AttentionProbeCallback(max_sequences=2, max_tokens=256)],
            )
            trainer.fit(lit_module, train_dataloader)
            # then: tensorboard --logdir lightning_logs
        """

        # lifecycle -------------------------------------------------------------------
        def __init__(self, model: Any = None, **probe_kwargs: Any) -> None:
            probe_kwargs.setdefault("offset", -1)  # Lightning logs at (s + 1) % n == 0
            super().__init__(model, **probe_kwargs)

        def on_fit_start(self, trainer, pl_module) -> None:
            self._make_probe(pl_module, lambda: default_log_dir(trainer),
                             lambda: int(trainer.log_every_n_steps) or 100)

        def on_train_start(self, trainer, pl_module) -> None:
            if self.probe is None:
                return
            self._open = int(trainer.global_step)
            self.probe.attach(step=self._open)

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if self.probe is None or self._open is None:
                return
            step = int(trainer.global_step)
            if step != self._open:
                # Optimizer steps happened since the open step began: close it (as step - 1,
                # the step whose batches just ran), open the current one.
                self.probe.step(step - 1)
                self._open = step

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
