"""What the rules look back on: the recent measurements of one layer, and of the whole model.

A :class:`LayerTrack` keeps the summaries of one layer measured within the longest window of the
rules (:attr:`~.rules.AlertRules.lookback` training steps), and at least the two latest: memory
stays bounded however long training runs. The rules' windows are counted in training steps, so
that a rule means the same at any sampling interval: :meth:`LayerTrack.window` and
:meth:`LayerTrack.span` are what a rule looks back on. :class:`ModelView` is what a rule may
know about the other layers at the same step.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..snapshot import LayerSummary


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

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self.points: deque[Point] = deque()

    def add(self, step: int, layer: LayerSummary) -> None:
        self.points.append(Point(step, layer))
        while len(self.points) > 2 and self.points[1].step <= step - self.keep:
            self.points.popleft()

    @property
    def now(self) -> Point:
        return self.points[-1]

    def window(self, steps: int, *, reach: bool = False) -> list[Point]:
        """The points before :attr:`now` measured at most ``steps`` training steps before it,
        oldest first. Where the sampling interval is coarser than ``steps`` there are none;
        with ``reach`` the one measurement before now stands in for them (a window that looks
        back at least one measurement)."""
        now = self.now.step
        before = [p for p in list(self.points)[:-1] if now - p.step <= steps]
        if reach and not before and len(self.points) > 1:
            before = [self.points[-2]]
        return before

    def span(self, steps: int) -> list[Point] | None:
        """The points that cover the last ``steps`` training steps, oldest first: from the
        latest measured at least ``steps`` steps before :attr:`now` through now (None while the
        track does not reach back that far). Where the sampling interval is coarser than
        ``steps``, that is the measurement before now and now."""
        points = list(self.points)
        now = self.now.step
        reach = [i for i, p in enumerate(points) if now - p.step >= steps]
        return points[reach[-1]:] if reach else None

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
