"""The few torch.distributed facts the probe needs, safe to call without a process group."""

from __future__ import annotations

import torch.distributed as dist


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_main_process() -> bool:
    """Process 0 writes files; every process measures."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def all_gather_object(obj: object) -> list[object]:
    """Every process's ``obj`` (just ``[obj]`` without a process group).

    A collective over the default group: every process must call it, the same number of times.
    With NCCL the objects travel through the current CUDA device, so each process must have
    called ``torch.cuda.set_device(local_rank)`` first (as torchrun scripts do).
    """
    if not is_distributed():
        return [obj]
    gathered: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered
