"""A plot over training steps with one line per series (a run's loss, or one line per layer),
its alert thresholds and the points where alerts fired (:func:`step_curves`): the charts of
``attn-probe report``."""

from __future__ import annotations

from typing import Any, Iterable, Mapping, NamedTuple

import numpy as np
from matplotlib.cm import ScalarMappable
from matplotlib.colors import BoundaryNorm, ListedColormap
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .canvas import as_numpy, axes_at, colour_map, label_ticks, new_plot, plain_log_ticks
from .runs import moving_average

__all__ = ["Mark", "step_curves"]

#: Colours of up to ten series (matplotlib's tab10); more series are coloured by position.
TEN_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
               "#7f7f7f", "#bcbd22", "#17becf")
THRESHOLD_COLOUR = "#b2182b"


class Mark(NamedTuple):
    """A point where an alert fired, on the line of series ``series``."""

    series: str
    step: int
    value: float
    text: str = ""  #: written beside the point


def _colours(count: int) -> list[str] | np.ndarray:
    if count <= len(TEN_COLOURS):
        return list(TEN_COLOURS[:count])
    return colour_map("viridis")(np.linspace(0, 0.92, count))


def step_curves(
    series: Mapping[str, tuple[Any, Any]],
    *,
    title: str,
    ylabel: str,
    log: bool = False,
    ylim: tuple[float, float] | None = None,
    thresholds: Mapping[str, float] | None = None,
    marks: Iterable[Mark] = (),
    smooth: int = 1,
    events: Iterable[tuple[int, str]] = (),
    width: float = 5.0,
    height: float = 2.8,
) -> Figure:
    """One line per entry of ``series`` (label -> (steps, values)), coloured in order, named in
    a legend (up to ten) or on a colour bar (more: the order, e.g. depth).

    ``log``: a log y scale (values at or below 0 are left out); ``thresholds``: text -> value,
    drawn dashed; ``marks``: crosses on the lines where alerts fired; ``smooth``: also draw each
    line as a centred moving average over this many points, solid, the values faint;
    ``events``: ``(step, text)`` drawn as dotted vertical lines (the first alert, say).
    """
    labels = list(series)
    colours = _colours(len(labels))
    many = len(labels) > len(TEN_COLOURS)
    if many:
        right = 0.95  # the colour bar
    elif len(labels) > 1:
        right = 0.55 + 0.07 * min(max(len(label) for label in labels), 12)  # the legend
    else:
        right = 0.15
    left, bottom, top = 0.7, 0.45, 0.3
    fig = new_plot(width, height)
    ax = axes_at(fig, left, bottom, width - left - right, height - bottom - top)
    lines = {}
    for label, colour in zip(labels, colours):
        steps, values = (as_numpy(v).reshape(-1) for v in series[label])
        if log:
            values = np.where(values > 0, values, np.nan)
        if smooth > 1:
            ax.plot(steps, values, color=colour, linewidth=0.8, alpha=0.3)
            values = moving_average(values, smooth)
        (lines[label],) = ax.plot(steps, values, color=colour, linewidth=1.3, label=label,
                                  marker="o" if steps.size <= 60 else None, markersize=2)
    for text, value in (thresholds or {}).items():
        ax.axhline(value, color=THRESHOLD_COLOUR, linewidth=1.0, linestyle="--")
        ax.text(0.98, value, text, transform=ax.get_yaxis_transform(), ha="right",
                va="bottom", fontsize=7, color=THRESHOLD_COLOUR)
    for mark in marks:
        if mark.series not in lines or not np.isfinite(mark.value) or (log and mark.value <= 0):
            continue
        ax.plot([mark.step], [mark.value], linestyle="none", marker="X", markersize=8,
                color=lines[mark.series].get_color(), markeredgecolor="black",
                markeredgewidth=0.8, zorder=5)
        if mark.text:
            ax.annotate(mark.text, (mark.step, mark.value), xytext=(5, 4),
                        textcoords="offset points", fontsize=7, zorder=6)
    for step, text in events:
        ax.axvline(step, color="#555555", linewidth=0.9, linestyle=":")
        ax.text(step, 0.97, f" {text}", transform=ax.get_xaxis_transform(), ha="left",
                va="top", fontsize=7, color="#333333")
    if log:
        ax.set_yscale("log")
        plain_log_ticks(ax.yaxis)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set_title(title, fontsize=9)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.set_xlabel("step", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=6))
    if many:
        bar_cmap = ListedColormap(colours)
        norm = BoundaryNorm(np.arange(len(labels) + 1) - 0.5, len(labels))
        cax = axes_at(fig, width - right + 0.12, bottom, 0.13, height - bottom - top)
        bar = fig.colorbar(ScalarMappable(norm=norm, cmap=bar_cmap), cax=cax)
        ticks = label_ticks(len(labels), 8)
        bar.set_ticks(ticks, labels=[labels[i] for i in ticks])
        bar.ax.tick_params(labelsize=7)
    elif len(labels) > 1:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False,
                  handlelength=1.2)
    return fig
