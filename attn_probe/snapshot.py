"""The data model: one layer's figures, alerts, everything measured at one step.

:class:`LayerSummary` holds one attention module's per-head figures at one step and
:class:`Snapshot` all layers of that step; they are what :mod:`attn_probe.aggregate` computes and
what outputs, callbacks and users read. :func:`find_layer` is the one way to name a layer (module
name, tag ``"L07"``, index, or a negative position from the end) and :func:`percent` the one way
to write tau in tags and titles.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Mapping, Protocol, Sequence, TypeVar

import numpy as np
import torch

from .figures import FIGURES


#: Heads drawn by default in attention heatmaps, in the first and the last layer.
DEFAULT_HEATMAP_HEADS = (0, 1, 2, 3)


def percent(tau: float) -> int:
    """tau as the whole percentage used in tags and titles (0.9 -> 90)."""
    return int(round(tau * 100))


def layer_tag(index: int) -> str:
    """The tag of the ``index``-th monitored layer: ``L07``."""
    return f"L{index:02d}"


@dataclass(frozen=True)
class LayerSummary:
    """One attention module's figures at one measured step."""

    name: str  #: module name, as in ``model.named_modules()``
    index: int  #: position among the monitored modules (the ``L07`` in tag names)
    heads: Mapping[str, np.ndarray]  #: figure -> (H,) over sequences (NaN: no data)
    counts: np.ndarray  #: (H,) sequences with finite attention in each head's crop figures
    nonfinite: np.ndarray  #: (H,) sequences whose attention had NaN or Inf entries
    #: (H,) sequences in each head's full-context figures (0 where the capture saw no q and k)
    full_counts: np.ndarray | None = None
    #: (H,) bool: the heads the lazy rule (``AlertRules.lazy``, :class:`~attn_probe.alerts.LazyRule`)
    #: found lazy; None where no lazy rule judged the layer
    lazy: np.ndarray | None = None
    #: whether the lazy rule found the layer lazy (enough of its heads lazy)
    is_lazy: bool = False

    @property
    def num_heads(self) -> int:
        return int(self.counts.shape[0])

    @property
    def sequences(self) -> int:
        """Sequences measured: the most any head got (heads differ only on NaN attention)."""
        return int(self.counts.max(initial=0))

    @property
    def has_data(self) -> np.ndarray:
        """(H,) bool: heads with at least one finite sequence."""
        return self.counts > 0

    @property
    def tag(self) -> str:
        return layer_tag(self.index)

    def counts_of(self, figure: str) -> np.ndarray:
        """(H,) sequences behind ``figure`` of each head."""
        if FIGURES[figure].scope == "full":
            return self.full_counts if self.full_counts is not None else 0 * self.counts
        return self.counts

    def reduce(self, metric: str, how: str) -> float:
        """``max``, ``mean`` or ``min`` over heads of a per-head figure (NaN if no head has
        data, or the summary has no such figure)."""
        if metric not in self.heads:
            return float("nan")
        values = self.heads[metric][self.counts_of(metric) > 0]
        if values.size == 0:
            return float("nan")
        return float({"max": np.max, "mean": np.mean, "min": np.min}[how](values))

    def qk_clip(self, cap: float) -> np.ndarray:
        """(H,) QK-Clip factors ``min(1, cap / max_logit)`` (Kimi K2): how much each head's q
        and k would be scaled by a clip at ``cap`` (NaN where a head has no max logit). Under
        grouped-query attention the heads reading one key/value head share its key projection,
        so they share one factor, from the largest max logit of the group (as Megatron-LM
        clips)."""
        logit = self.heads["max_logit"].copy()
        groups = self.heads.get("kv_head")
        if groups is not None:
            for group in np.unique(groups[np.isfinite(groups)]):
                members = groups == group
                with np.errstate(invalid="ignore"):
                    logit[members] = np.nanmax(logit[members]) if np.isfinite(
                        logit[members]).any() else np.nan
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(np.isfinite(logit), np.minimum(1.0, cap / np.maximum(logit, 0)),
                            np.nan)

    @property
    def lazy_share(self) -> float:
        """The share of the heads with data that the lazy rule found lazy (NaN: none judged)."""
        has_data = self.has_data
        if self.lazy is None or not has_data.any():
            return float("nan")
        return float(self.lazy[has_data].mean())


class HeadState(IntEnum):
    """What one head's attention does at one step, from the least to the most alarming (the
    worst state of a layer is the largest of its heads'). :data:`HEAD_STATES` gives each a
    label, a colour and a meaning; :mod:`attn_probe.alerts` decides them."""

    NO_DATA = 0
    HEALTHY = 1
    SHARP = 2
    SINK = 3
    UNIFORM = 4
    ONE_HOT = 5
    EXPLODING = 6


#: State -> (label, colour, what it means), for legends and reports.
HEAD_STATES: dict[HeadState, tuple[str, str, str]] = {
    HeadState.NO_DATA: ("no data", "#f0f0f0", "not measured at this step"),
    HeadState.HEALTHY: ("healthy", "#1a9850", "attention spread over several keys"),
    HeadState.SHARP: ("sharp", "#66bd63", "most queries focus on few keys (previous-token and "
                                           "similar heads: normal)"),
    HeadState.SINK: ("sink", "#5e3c99", "half or more of the attention on the first key "
                                        "(an attention sink: normal in trained models)"),
    HeadState.UNIFORM: ("uniform", "#fee08b", "every allowed key weighted alike: the head "
                                              "passes no information"),
    HeadState.ONE_HOT: ("one-hot", "#f46d43", "each query on a single key: entropy collapsed, "
                                              "softmax saturated"),
    HeadState.EXPLODING: ("logits exploding", "#a50026", "attention logits growing without "
                                                          "bound"),
}

#: Alert severities, from the least to the most urgent.
SEVERITIES = ("info", "warning", "critical")
#: The severities a person is warned about (``info`` is only logged).
WARNS = SEVERITIES[1:]


#: What an alert's figure did (:attr:`Alert.condition`): passed a level upwards (``above``: the
#: value is at or above the threshold) or downwards (``below``: below it; at or below for the
#: lazy rule), or changed within a window of measurements (``grew``: rose since the step
#: ``since`` and is at or above the threshold; ``fell``: dropped since ``since`` and is at or
#: below the threshold).
CONDITIONS = ("above", "below", "grew", "fell")
_SIGNS = {"above": "≥", "below": "<", "grew": "≥", "fell": "≤"}


def figure_text(value: float) -> str:
    """A measured figure in a sentence or a table cell: 1,497, 31.8, 4.71, 0.0018."""
    if not math.isfinite(value):
        return str(value)
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


@dataclass(frozen=True)
class Alert:
    """One kind of collapse seen in one layer at one step, and what was measured.

    ``figure`` is the figure the rule watched (a name of :data:`attn_probe.figures.FIGURES`),
    reduced over the layer's heads by ``reduction`` (``max``, ``mean``, ``min``; over the heads
    the alert names for ``logit``, ``sink`` and ``lazy``). ``value`` and ``threshold`` are in that
    figure's unit: ``value`` is the figure at ``step``, ``threshold`` the level the
    ``condition`` compares it with. The
    window the condition spans starts at step ``since``, where the figure was ``since_value``:
    the earlier measurement a rise or a fall is counted from, the first of a run of
    measurements, or ``step`` itself when one measurement decides (``since_value`` is then
    ``value``). A fall's size is :attr:`change` (negative), never ``value``.
    """

    kind: str  #: "logit", "entropy", "uniform", "lazy" or "sink" (see :mod:`attn_probe.alerts`)
    layer: str  #: module name
    tag: str  #: ``L07``
    heads: tuple[int, ...]  #: the heads involved
    step: int
    figure: str  #: the figure the rule watched (``logit_spread``, ``entropy_norm_full``, ...)
    reduction: str  #: how the heads' figures make ``value``: ``max``, ``mean`` or ``min``
    condition: str  #: one of :data:`CONDITIONS`
    value: float  #: the figure at ``step``
    threshold: float  #: the level ``value`` was compared with, in the figure's unit
    since: int  #: the step the condition's window starts at (``step``: this measurement alone)
    since_value: float  #: the figure at ``since``
    message: str  #: one line for people
    severity: str = "warning"  #: one of :data:`SEVERITIES`
    cause: str = ""  #: why the figure moved and what to do, when known

    def __post_init__(self) -> None:
        if self.condition not in CONDITIONS:
            raise ValueError(f"Alert.condition must be one of {CONDITIONS}, got "
                             f"{self.condition!r}")
        if self.severity not in SEVERITIES:
            raise ValueError(f"Alert.severity must be one of {SEVERITIES}, got "
                             f"{self.severity!r}")

    @property
    def warns(self) -> bool:
        """Whether a person is warned (:data:`WARNS`; ``info`` alerts are only logged)."""
        return self.severity in WARNS

    @property
    def change(self) -> float:
        """How far the figure moved within the window: ``value - since_value`` (0 when one
        measurement decides)."""
        return self.value - self.since_value

    @property
    def level_text(self) -> str:
        """The threshold with its condition: ``≥ 1,000``, ``< 0.05``, ``grew to ≥ 100``,
        ``fell to ≤ 0.3``."""
        level = f"{_SIGNS[self.condition]} {figure_text(self.threshold)}"
        return f"{self.condition} to {level}" if self.condition in ("grew", "fell") else level

    @property
    def condition_text(self) -> str:
        """The condition in the figure's words: ``logit_spread (max) grew from 12 at step 20
        to 450 (≥ 100)``, ``entropy_norm_full (mean) 0.031 < 0.05``."""
        what = f"{self.figure} ({self.reduction})"
        level = f"{_SIGNS[self.condition]} {figure_text(self.threshold)}"
        if self.condition in ("grew", "fell"):
            return (f"{what} {self.condition} from {figure_text(self.since_value)} at step "
                    f"{self.since} to {figure_text(self.value)} ({level})")
        if self.since != self.step:
            return f"{what} {figure_text(self.value)} {level} since step {self.since}"
        return f"{what} {figure_text(self.value)} {level}"

    def __str__(self) -> str:
        return self.message


class _Layer(Protocol):
    name: str
    index: int


L = TypeVar("L", bound=_Layer)


def find_layer(layers: Sequence[L], key: str | int) -> L:
    """The layer that ``key`` names among ``layers`` (objects with ``name`` and ``index``).

    ``key``: a module name, a tag (``"L07"``, ``"l7"``), a monitored-layer index (``7``), or a
    negative position counted from the end of ``layers`` (``-1``: the last). ``KeyError``
    listing the layers when none matches.
    """
    if isinstance(key, str):
        tag = key[1:] if key[:1] in ("L", "l") and key[1:].isdigit() else None
        for layer in layers:
            if key == layer.name or (tag is not None and int(tag) == layer.index):
                return layer
    elif isinstance(key, (int, np.integer)) and not isinstance(key, bool):
        if key < 0 and -len(layers) <= key:
            return layers[key]
        for layer in layers:
            if layer.index == key:
                return layer
    known = ", ".join(f"{layer_tag(layer.index)} ({layer.name})" for layer in layers) or "none"
    raise KeyError(f"no layer {key!r}; the layers are: {known}")


def default_heatmaps(layers: Sequence[_Layer]) -> dict[str, list[int]]:
    """Layer name -> heads drawn when the user chose none: the first and the last layer, heads
    ``DEFAULT_HEATMAP_HEADS``."""
    if not layers:
        return {}
    return {layer.name: list(DEFAULT_HEATMAP_HEADS) for layer in (layers[0], layers[-1])}


@dataclass(frozen=True)
class Snapshot:
    """Everything measured at one step: the input of outputs, rules and callbacks."""

    step: int
    tau: float
    layers: tuple[LayerSummary, ...]
    #: layer name -> (H, queries, keys) float32 CPU attention of the first measured sequence, at
    #: most the heatmaps' crop of each (for heatmaps)
    samples: Mapping[str, torch.Tensor] = field(default_factory=dict)
    #: the alerts that fired at this step (see :mod:`attn_probe.alerts`)
    alerts: tuple[Alert, ...] = ()
    #: layer name -> (H,) :class:`HeadState` codes of its heads (decided by the alert rules)
    states: Mapping[str, np.ndarray] = field(default_factory=dict)
    #: the lazy rule that marked the layers' lazy heads (``AlertRules.lazy``, recorded by the
    #: monitor that judged the snapshot; None: none did), for outputs that say what it was
    lazy_rule: Any = None

    def layer(self, key: str | int) -> LayerSummary:
        """The layer named by ``key`` (see :func:`find_layer`)."""
        return find_layer(self.layers, key)

    def max_rank_profile(self) -> np.ndarray:
        """MaxRank per layer: the largest per-head mean rank@tau (the paper's profile)."""
        return np.array([layer.reduce("rank", "max") for layer in self.layers])

    @property
    def has_data(self) -> bool:
        return any(layer.has_data.any() for layer in self.layers)

    @property
    def has_nonfinite(self) -> bool:
        return any(layer.nonfinite.sum() > 0 for layer in self.layers)


def finite(value: float) -> bool:
    """Not NaN and not infinite (figures that are not are left out of outputs)."""
    return math.isfinite(value)
