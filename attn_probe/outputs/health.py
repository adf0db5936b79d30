"""Head health pictures: every head of every layer coloured by its state at one step
(:func:`head_state_map`), and each layer's worst state over the sampled steps
(:func:`health_timeline`), which shows when each layer went wrong.

States are :class:`~attn_probe.snapshot.HeadState` codes, decided by the alert rules
(:attr:`Snapshot.states <attn_probe.snapshot.Snapshot.states>`); colours and labels come from
:data:`~attn_probe.snapshot.HEAD_STATES`, the same in every picture and in the legend.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import numpy as np
from matplotlib.colors import BoundaryNorm, ListedColormap
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from ..snapshot import HEAD_STATES, HeadState
from .canvas import as_numpy, axes_at, clamp, label_ticks, new_plot, text_width

if TYPE_CHECKING:
    from ..snapshot import Snapshot

__all__ = ["head_state_map", "head_state_map_for", "health_timeline", "layer_timeline",
           "worst_states"]

_MAX_WIDTH = 12.0  # inches
_MAX_HEIGHT = 10.0
#: The marker of an alert on the timeline (and in its legend).
ALERT_MARKER = dict(marker="X", markersize=8, color="white", markeredgecolor="black",
                    markeredgewidth=1.0, linestyle="none")


def worst_states(snapshot: "Snapshot") -> np.ndarray:
    """(L,) the worst (largest) :class:`~attn_probe.snapshot.HeadState` of each layer's heads
    at ``snapshot.step``; ``NO_DATA`` for a layer without states."""
    return np.array([
        int(np.max(snapshot.states[layer.name], initial=HeadState.NO_DATA))
        if layer.name in snapshot.states else int(HeadState.NO_DATA)
        for layer in snapshot.layers
    ], dtype=np.int64)


def _state_colours() -> tuple[ListedColormap, BoundaryNorm]:
    codes = sorted(HEAD_STATES)
    cmap = ListedColormap([HEAD_STATES[code][1] for code in codes])
    return cmap, BoundaryNorm(np.arange(len(codes) + 1) - 0.5, len(codes))


def _codes(states: Any) -> np.ndarray:
    codes = as_numpy(states)
    if codes.ndim != 2:
        raise ValueError(f"expected a 2-d array of head states, got shape {codes.shape}")
    known = np.isin(codes, [int(code) for code in HEAD_STATES])
    return np.where(known, codes, int(HeadState.NO_DATA))


def _legend(fig: Figure, left: float, top: float, states: Iterable[int],
            alerts: bool = False) -> None:
    """The state legend (every state, so that a colour always means the same) at ``left`` inches
    from the plot's left edge, its top ``top`` inches from the bottom."""
    handles: list[Any] = [
        Patch(facecolor=HEAD_STATES[HeadState(code)][1], edgecolor="#555555", linewidth=0.5,
              label=HEAD_STATES[HeadState(code)][0])
        for code in states
    ]
    if alerts:
        handles.append(Line2D([], [], label="alert fired", **ALERT_MARKER))
    width, height = fig.get_size_inches()
    fig.legend(handles=handles, loc="upper left", fontsize=8, frameon=False,
               bbox_to_anchor=(left / width, top / height), title="head state",
               title_fontsize=8, alignment="left")


def _layout(rows: int, cols: int, row_labels: Sequence[str], cell: tuple[float, float],
            title: str | None, x_labels: Sequence[str], max_width: float = _MAX_WIDTH):
    """A plot for a rows x cols grid with a legend column on the right: (figure, axes, the
    legend's left edge and top in inches). ``x_labels``: the column labels that are shown."""
    y_ticks = label_ticks(rows, 40)
    left = 0.3 + min(text_width([row_labels[i] for i in y_ticks], 8), 2.5) + 0.1
    rotate = len(x_labels) > 8
    bottom = 0.45 + (min(text_width(x_labels, 7), 1.2) if rotate else 0.15)
    top = 0.35 if title else 0.12
    legend_w = 1.55
    grid_w = clamp(cell[0] * cols, 2.0, max_width - left - legend_w)
    grid_h = clamp(cell[1] * rows, 1.9, _MAX_HEIGHT - top - bottom)
    fig = new_plot(left + grid_w + legend_w, bottom + grid_h + top)
    ax = axes_at(fig, left, bottom, grid_w, grid_h)
    return fig, ax, left + grid_w + 0.1, bottom + grid_h


def _draw_grid(ax, codes: np.ndarray, row_labels: Sequence[str], col_labels: Sequence[str],
               max_cols: int) -> None:
    cmap, norm = _state_colours()
    rows, cols = codes.shape
    ax.imshow(codes, cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
    if rows <= 40 and cols <= 64:  # thin white lines between cells, where cells are visible
        ax.set_xticks(np.arange(cols + 1) - 0.5, minor=True)
        ax.set_yticks(np.arange(rows + 1) - 0.5, minor=True)
        ax.grid(which="minor", color="white", linewidth=0.6)
        ax.tick_params(which="minor", length=0)
    x_ticks, y_ticks = label_ticks(cols, max_cols), label_ticks(rows, 40)
    ax.set_xticks(x_ticks, [col_labels[i] for i in x_ticks], fontsize=7,
                  rotation=90 if len(x_ticks) > 8 else 0)
    ax.set_yticks(y_ticks, [row_labels[i] for i in y_ticks], fontsize=8)
    ax.set_ylabel("layer", fontsize=9)


def head_state_map(
    states: Any,
    *,
    layer_labels: Sequence[str] | None = None,
    head_labels: Sequence[str] | None = None,
    title: str | None = None,
) -> Figure:
    """Layer x head grid, each cell coloured by its head's state, with the legend of states.

    ``states``: ``(L, H)`` :class:`~attn_probe.snapshot.HeadState` codes (a layer with fewer
    heads: ``NO_DATA`` in the missing cells).
    """
    codes = _codes(states)
    layers, heads = codes.shape
    layer_labels = list(layer_labels or [f"L{i:02d}" for i in range(layers)])
    head_labels = list(head_labels or [f"H{h:02d}" for h in range(heads)])
    if len(layer_labels) != layers or len(head_labels) != heads:
        raise ValueError(f"got {len(layer_labels)} layer labels and {len(head_labels)} head "
                         f"labels for a {layers} x {heads} grid")
    fig, ax, legend_x, legend_top = _layout(layers, heads, layer_labels, (0.32, 0.26), title,
                                            [head_labels[i] for i in label_ticks(heads, 32)])
    _draw_grid(ax, codes, layer_labels, head_labels, 32)
    ax.set_xlabel("head", fontsize=9)
    if title:
        ax.set_title(title, fontsize=10)
    _legend(fig, legend_x, legend_top, sorted(HEAD_STATES))
    return fig


def head_state_map_for(snapshot: "Snapshot", **kwargs: Any) -> Figure:
    """:func:`head_state_map` of ``snapshot.states`` (layers without states: ``NO_DATA``)."""
    heads = max((layer.num_heads for layer in snapshot.layers), default=0)
    codes = np.full((len(snapshot.layers), heads), int(HeadState.NO_DATA))
    for row, layer in enumerate(snapshot.layers):
        if layer.name in snapshot.states:
            layer_states = np.asarray(snapshot.states[layer.name])
            codes[row, : layer_states.shape[0]] = layer_states
    kwargs.setdefault("layer_labels", [layer.tag for layer in snapshot.layers])
    kwargs.setdefault("title", f"head states, step {snapshot.step}")
    return head_state_map(codes, **kwargs)


def health_timeline(
    steps: Sequence[int],
    states: Any,
    *,
    layer_labels: Sequence[str] | None = None,
    alerts: Iterable[tuple[int, int]] = (),
    title: str | None = None,
    max_width: float = _MAX_WIDTH,
) -> Figure:
    """Layer x sampled step grid of each layer's worst head state: when each layer went wrong.

    ``states``: ``(L, S)`` :class:`~attn_probe.snapshot.HeadState` codes at the ``S`` sampled
    ``steps`` (``NO_DATA`` where a layer was not measured); ``alerts``: ``(step, row)`` pairs
    marked with a cross (an alert of the layer in that row fired at that step); ``max_width``:
    the widest the plot may be, in inches (columns get narrower).
    """
    codes = _codes(states)
    steps = [int(step) for step in steps]
    layers, count = codes.shape
    if count != len(steps):
        raise ValueError(f"{len(steps)} steps for {count} columns of states")
    layer_labels = list(layer_labels or [f"L{i:02d}" for i in range(layers)])
    if len(layer_labels) != layers:
        raise ValueError(f"got {len(layer_labels)} layer labels for {layers} layers")
    step_labels = [str(step) for step in steps]
    most = clamp(int((max_width - 2.5) / 0.2), 4, 24)  # step labels that fit side by side
    fig, ax, legend_x, legend_top = _layout(layers, count, layer_labels, (0.22, 0.26), title,
                                            [step_labels[i] for i in label_ticks(count, most)],
                                            max_width)
    _draw_grid(ax, codes, layer_labels, step_labels, most)
    ax.set_xlabel("sampled step", fontsize=9)
    column = {step: i for i, step in enumerate(steps)}
    marks = sorted({(column[step], row) for step, row in alerts
                    if step in column and 0 <= row < layers})
    if marks:
        xs, ys = zip(*marks)
        ax.plot(xs, ys, zorder=5, **ALERT_MARKER)
    if title:
        ax.set_title(title, fontsize=10)
    _legend(fig, legend_x, legend_top, sorted(HEAD_STATES), alerts=bool(marks))
    return fig


def layer_timeline(layers: Mapping[str, tuple[Sequence[int], Sequence[int]]],
                   alerts: Iterable[tuple[int, str]] = (), **options: Any) -> Figure:
    """:func:`health_timeline` of per-layer series: layer tag -> (steps, worst state at each),
    one row per layer in the mapping's order, a column per step any layer has (``NO_DATA``
    where a layer has none); ``alerts``: ``(step, layer tag)`` pairs. ``options`` go to
    :func:`health_timeline` (``title``, ``max_width``)."""
    steps = sorted({int(step) for series_steps, _ in layers.values() for step in series_steps})
    column = {step: i for i, step in enumerate(steps)}
    codes = np.full((len(layers), len(steps)), int(HeadState.NO_DATA))
    for row, (series_steps, values) in enumerate(layers.values()):
        for step, value in zip(series_steps, values):
            codes[row, column[int(step)]] = int(value)
    rows = {tag: i for i, tag in enumerate(layers)}
    return health_timeline(steps, codes, layer_labels=list(layers),
                           alerts=[(step, rows[tag]) for step, tag in alerts if tag in rows],
                           **options)
