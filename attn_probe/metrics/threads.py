"""The thread budget of the probe's own CPU work.

On a CPU the figures are many small float64 parallel regions (the batched ``eigvalsh`` of the
heads' Gram matrices, elementwise passes over blocks of queries). With torch's default of one
intra-op thread per core, each region waits for every thread of the pool; when another process
holds a core, that wait is a scheduler time slice, and a measurement that takes 0.1 s on a quiet
machine takes tens of seconds. One thread never waits for another: :func:`thread_budget` runs
the measurement with at most ``threads`` intra-op threads (``CaptureOptions.threads``, one by
default) and gives torch its own setting back afterwards, whatever happens inside. Measured in
``benchmarks/bench_busy_machine.py``, shown in ``docs/performance.md``.

Only CPU work is budgeted: a measurement of tensors on an accelerator runs as it is.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

__all__ = ["on_cpu", "thread_budget"]


def on_cpu(value: Any) -> bool:
    """Whether ``value`` (a tensor, or a dataclass holding tensors, as the recorder hands on)
    lives on the CPU: its first tensor does. Nothing to go by counts as the CPU."""
    if isinstance(value, Tensor):
        return value.device.type == "cpu"
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        for field in dataclasses.fields(value):
            item = getattr(value, field.name)
            if isinstance(item, Tensor):
                return item.device.type == "cpu"
    return True


@contextmanager
def thread_budget(threads: int | None, value: Any = None) -> Iterator[None]:
    """At most ``threads`` intra-op threads (``torch.set_num_threads``) while the block runs,
    and torch's own count again after it, on return or exception.

    ``None`` leaves torch's setting alone, as does a ``value`` (what is measured) on another
    device than the CPU. A budget above torch's own count does not raise it.
    """
    before = torch.get_num_threads()
    if threads is None or threads >= before or not on_cpu(value):
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)

