"""attn_probe inside a torchtitan training run (``pip install "attn_probe[torchtitan]"``).

torchtitan's language models run on ``flex_attention``; the probe intercepts those calls with no
adapter (see :mod:`attn_probe.attention.flex`). What this module adds is the run:

* :class:`AttentionProbeTrainer`, a ``torchtitan.trainer.Trainer`` whose ``Config`` has an
  ``attn_probe`` section (:class:`ProbeConfig`). Name it in your config module (see
  ``docs/distributed.md``) and every torchtitan option and command line stays as it was, with
  ``--attn_probe.every`` and the others added.
* On a sampled step (torchtitan's step number, every ``attn_probe.every`` steps) the trainer
  takes the first ``batch_rows`` sequences of the step's batch and runs them once through the
  model **without autograd, before the training forward pass**, with the probe measuring: the
  weights the step trains are the ones measured. The training step itself then runs untouched
  (compiled where it was). A sampled forward pass runs eagerly, and eager ``flex_attention`` is
  the unfused kernel, which materialises ``(B, H, T, T)`` scores per layer: measured inside the
  training step, autograd would keep them for every layer; in the measurement pass they live one
  layer at a time, for ``batch_rows`` sequences.
* The figures go to torchtitan's own loggers (TensorBoard and/or Weights & Biases, whatever
  ``metrics.enable_tensorboard`` / ``metrics.enable_wandb`` turned on, on the rank that logs) at
  torchtitan's step: :func:`metrics_logger_output` makes one of its loggers an output of the
  probe (numbers only: that is what those loggers take).
* :func:`measure` runs one measurement pass, for a loop of your own.

What needs a GPU: torchtitan's training step (``flex_attention`` has no backward on the CPU),
so :class:`AttentionProbeTrainer` as a whole runs on GPUs only; the measurement pass, the
loggers and the figures are tested on the CPU. Pipeline and context parallelism are refused
with a message (the measurement pass needs the whole model and whole sequences in one
process).
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn

from ..options import CaptureOptions
from ..outputs.tracker import TrackerOutput
from ..probe import AttentionProbe
from ..snapshot import Snapshot
from .base import optional_base

_Trainer, __getattr__ = optional_base(
    "torchtitan.trainer", "Trainer", label="torchtitan", extra="torchtitan",
    exported=("AttentionProbeTrainer",),
)

__all__ = ["AttentionProbeTrainer", "MetricsLoggerOutput", "ProbeConfig", "measure",
           "metrics_logger_output", "with_probe"]


class MetricsLoggerOutput(TrackerOutput):
    """The probe's output into a torchtitan logger (``TensorBoardLogger``, ``WandBLogger``,
    their ``LoggerContainer``: anything with ``log(metrics: dict, step: int)``): the scalars
    every output logs (:mod:`attn_probe.outputs.scalars`), tags prefixed with ``prefix``, in one
    ``log`` call a step. Alerts and pictures have no place in those loggers and are left out
    (the alerts still go to the ``attn_probe`` logger and, from ``warning`` up, to warnings).
    ``per_head``, ``logit_cap``: as :class:`~attn_probe.outputs.tracker.TrackerOutput` takes
    them."""

    def __init__(self, logger: Any, prefix: str = "attn_probe/", *,
                 per_head: bool | str = True, logit_cap: float | None = None) -> None:
        if not callable(getattr(logger, "log", None)):
            raise TypeError(f"expected a torchtitan logger with log(metrics, step), got {logger!r}")
        super().__init__(per_head=per_head, pictures_every=0, logit_cap=logit_cap)
        self.logger, self.prefix = logger, prefix

    def log_scalars(self, step: int, values: dict[str, float]) -> None:
        if values:
            self.logger.log({self.prefix + tag: value for tag, value in values.items()}, step)


def metrics_logger_output(logger: Any, *, prefix: str = "attn_probe/",
                          **options: Any) -> MetricsLoggerOutput:
    """:class:`MetricsLoggerOutput` of ``logger`` (``options``: ``per_head``, ``logit_cap``)."""
    return MetricsLoggerOutput(logger, prefix, **options)


def measure(probe: AttentionProbe, model: nn.Module, step: int, *args: Any,
            **kwargs: Any) -> Snapshot | None:
    """Step ``step``'s measurement: when it is sampled, run ``model(*args, **kwargs)`` once
    without autograd while the probe measures, then close the step (logging it; every process
    must call this, as a collective). The probe is left measuring nothing, so the training
    forward pass that follows runs as without it. Returns the step's snapshot, if sampled."""
    probe.open_step(step)
    if not probe.sampling:
        return None
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        snapshot = probe.close_step(step)
    return snapshot


@dataclass(kw_only=True, slots=True)
class ProbeConfig:
    """The ``attn_probe`` section of :class:`AttentionProbeTrainer`'s config (on the command
    line: ``--attn_probe.every 50``)."""

    enable: bool = True
    """Whether to measure at all"""
    every: int = 100
    """Measure every this many steps (torchtitan's step numbers)"""
    batch_rows: int = 1
    """Sequences of a sampled step's batch that the measurement pass runs"""
    crop: int = 256
    """Tokens of each sequence whose attention matrix gives rank@90% and columns@90% (the
    *_full figures cover every token)"""
    per_head: bool = True
    """Per-head scalars for the heads an alert names"""
    logit_cap: float | None = None
    """A QK-Clip threshold to watch (a dry run): each head's factor min(1, cap / max logit)"""
    prefix: str = "attn_probe/"
    """Prefix of the probe's tags in torchtitan's loggers"""

    def probe(self, model: nn.Module, logger: Any) -> AttentionProbe:
        """The probe this section describes, on ``model``, logging into ``logger``."""
        return AttentionProbe(model, every=self.every,
                              capture=CaptureOptions(batch_rows=self.batch_rows, crop=self.crop),
                              outputs=[metrics_logger_output(logger, prefix=self.prefix,
                                                             per_head=self.per_head,
                                                             logit_cap=self.logit_cap)])


def rows(input_dict: dict[str, Any], labels: torch.Tensor, n: int
         ) -> tuple[dict[str, Any], torch.Tensor]:
    """The first ``n`` sequences of a torchtitan batch (tensors are cut, other values kept)."""
    cut = {k: v[:n] if isinstance(v, torch.Tensor) and v.dim() > 0 else v
           for k, v in input_dict.items()}
    return cut, labels[:n]


if _Trainer is not None:

    class AttentionProbeTrainer(_Trainer):
        """torchtitan's ``Trainer`` with the probe: see the module docstring."""

        @dataclass(kw_only=True, slots=True)
        class Config(_Trainer.Config):
            attn_probe: ProbeConfig = field(default_factory=ProbeConfig)

        def __init__(self, config: "AttentionProbeTrainer.Config") -> None:
            super().__init__(config)
            self.attn_probe: AttentionProbe | None = None
            section = config.attn_probe
            if not section.enable:
                return
            if len(self.model_parts) != 1:
                raise NotImplementedError(
                    "attn_probe measures the whole model in one process; with pipeline "
                    "parallelism set attn_probe.enable=False"
                )
            if self.parallel_dims.cp_enabled:
                raise NotImplementedError(
                    "attn_probe in torchtitan does not measure context-parallel sequences yet "
                    "(each chunk would be measured as a sequence); set attn_probe.enable=False "
                    "or parallelism.context_parallel_degree=1"
                )
            self.attn_probe = section.probe(self.model_parts[0], self.metrics_processor.logger)
            self.attn_probe.attach(step=self.step)

        def train_step(self, data_iterator: Iterator) -> Any:
            probe = self.attn_probe
            if probe is not None and probe.is_sampled(self.step):
                batch = next(data_iterator)
                data_iterator = itertools.chain([batch], data_iterator)
                self._measure(*batch)
            elif probe is not None:
                probe.open_step(self.step)  # measuring nothing
            return super().train_step(data_iterator)

        def _measure(self, input_dict: dict[str, Any], labels: torch.Tensor) -> None:
            input_dict, labels = rows(input_dict, labels, self.config.attn_probe.batch_rows)
            input_dict = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v
                          for k, v in input_dict.items()}
            seen = self.ntokens_seen  # the measurement pass is no training
            inputs, _, extra = self.post_dataloading_process(input_dict, labels.to(self.device))
            self.ntokens_seen = seen
            measure(self.attn_probe, self.model_parts[0], self.step, inputs, **extra)

        def close(self) -> None:
            if self.attn_probe is not None:
                self.attn_probe.detach()
            super().close()


def with_probe(config: Any, **options: Any) -> "AttentionProbeTrainer.Config":
    """An :class:`AttentionProbeTrainer` config with everything of the torchtitan trainer
    config ``config`` (a model's ``config_registry`` function's result) and an ``attn_probe``
    section of ``options`` (:class:`ProbeConfig`'s fields)."""
    if _Trainer is None:
        __getattr__("AttentionProbeTrainer")  # raises ImportError saying what to install
    if not isinstance(config, _Trainer.Config):
        raise TypeError(f"expected a torchtitan Trainer.Config, got {type(config).__name__}")
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.init}
    fields.pop("attn_probe", None)
    return AttentionProbeTrainer.Config(**fields, attn_probe=ProbeConfig(**options))
