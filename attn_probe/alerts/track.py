"""What the rules look back on: the recent measurements of one layer, and of the whole model.

A :class:`LayerTrack` keeps the last :data:`KEEP` summaries of one layer (memory stays bounded
however long training runs). :class:`ModelView` is what a rule may know about the other layers
at the same step.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..snapshot import LayerSummary

#: Summaries kept per layer: more than any rule's window.
KEEP = 32


@dataclass(frozen=True)
class Point:
    """One layer measured at one step."""

    step: int
    layer: LayerSummary

    def figure(self, name: str, how: str) -> float:
        """``max``/``mean``/``min`` over heads of a figure (NaN without data)."""
        return self.layer.reduce(name, how)

    def heads(self, name: str) -> np.ndarray:
        """(H,) per-head values of a figure (NaN where a head has no data or no such figure)."""
        values = self.layer.heads.get(name)
        if values is None:
            return np.full(self.layer.num_heads, np.nan)
        return np.where(self.layer.counts_of(name) > 0, values, np.nan)


class LayerTrack:
    """The recent :class:`Point`\\ s of one layer, oldest first."""

    def __init__(self, keep: int = KEEP) -> None:
        self.points: deque[Point] = deque(maxlen=keep)

    def add(self, step: int, layer: LayerSummary) -> None:
        self.points.append(Point(step, layer))

    @property
    def now(self) -> Point:
        return self.points[-1]

    def last(self, samples: int) -> list[Point]:
        """The latest ``samples`` points (fewer at the start), oldest first."""
        return list(self.points)[-samples:]

    def __len__(self) -> int:
        return len(self.points)


@dataclass(frozen=True)
class ModelView:
    """Every layer of the model measured at the current step, with its recent history: what a
    rule about one layer may compare it with."""

    tau: float
    tracks: Sequence[LayerTrack]

    def others(self, track: LayerTrack) -> list[LayerTrack]:
        return [other for other in self.tracks if other is not track]
