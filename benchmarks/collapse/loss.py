"""What the loss alone shows, measured on the suite's records: the evidence for (or against)
letting the probe take the loss.

* :func:`spikes` — OLMo-core's stability monitor: a step whose loss is more than ``sigmas``
  standard deviations above the mean of the ``window`` steps before it;
* :func:`stall` — the first step at which the loss, a trailing mean over ``window`` steps, has
  fallen by less than ``share`` of itself over the ``window`` steps before (the loss stalling
  against its own trend), from ``start`` on.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .judge import trailing_mean


def spikes(losses: Sequence[float], window: int = 128, sigmas: float = 6.0,
           start: int = 20) -> list[int]:
    """The steps (from ``start``) whose loss is more than ``sigmas`` standard deviations above
    the mean of the ``window`` steps before it."""
    values = np.asarray(losses, dtype=np.float64)
    found = []
    for step in range(start, values.size):
        before = values[max(0, step - window):step]
        spread = before.std()
        if spread > 0 and values[step] > before.mean() + sigmas * spread:
            found.append(step)
    return found


def stall(losses: Sequence[float], window: int = 20, share: float = 0.01,
          start: int = 20) -> int | None:
    """The first step from ``start`` at which the trailing mean has fallen by less than
    ``share`` of itself over the last ``window`` steps (None: never)."""
    mean = trailing_mean(losses, window)
    for step in range(max(start, window), mean.size):
        if mean[step - window] - mean[step] < share * mean[step]:
            return step
    return None
