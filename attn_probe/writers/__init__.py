"""Outputs of :class:`~attn_probe.stats.Snapshot` objects."""

from .tensorboard import TensorBoardWriter

__all__ = ["TensorBoardWriter"]
