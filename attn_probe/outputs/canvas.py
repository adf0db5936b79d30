"""What every plot of :mod:`attn_probe.outputs` is drawn with: a matplotlib figure laid out in
inches on its own Agg canvas (no pyplot, no global registry), array conversion, colours, tick
thinning, and rendering a plot to an RGB array."""

from __future__ import annotations

import math
from typing import Any, Sequence

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import LogFormatter

__all__ = [
    "DPI", "NAN_COLOUR", "as_numpy", "axes_at", "clamp", "colour_map", "plot_to_array",
    "format_cell", "label_ticks", "new_plot", "plain_log_ticks", "text_colour", "text_width",
]

DPI = 100
#: The colour of a cell without data.
NAN_COLOUR = "#d9d9d9"


def new_plot(width: float, height: float) -> Figure:
    """An empty plot of ``width`` x ``height`` inches on its own Agg canvas."""
    # Margins are laid out by hand, in inches: a layout engine would cost more than the drawing.
    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def axes_at(fig: Figure, left: float, bottom: float, width: float, height: float):
    """Axes at a position given in inches from the figure's lower left corner."""
    fig_w, fig_h = fig.get_size_inches()
    return fig.add_axes((left / fig_w, bottom / fig_h, width / fig_w, height / fig_h))


def text_width(labels: Sequence[str], points: float) -> float:
    """Rough width in inches of the longest label at a font size (no renderer needed)."""
    longest = max((len(str(label)) for label in labels), default=0)
    return 0.6 * points / 72 * longest


def clamp(value: float, low: float, high: float) -> float:
    """``value`` within ``[low, high]``."""
    return max(low, min(high, value))


def as_numpy(values: Any, dtype: Any = np.float64) -> np.ndarray:
    """A NumPy copy of an array-like or a (possibly CUDA, possibly grad-tracking) tensor."""
    if hasattr(values, "detach"):  # torch.Tensor, without importing torch here
        values = values.detach().float().cpu().numpy()
    return np.array(values, dtype=dtype)


def colour_map(name: str):
    """A matplotlib colour map that draws NaN in grey."""
    return matplotlib.colormaps[name].with_extremes(bad=NAN_COLOUR)


def label_ticks(count: int, max_labels: int) -> list[int]:
    """Positions of the tick labels to show: all of them, or an even thinning."""
    if count <= max_labels:
        return list(range(count))
    step = math.ceil(count / max_labels)
    return list(range(0, count, step))


def format_cell(value: float) -> str:
    """A value written in a grid cell: no decimals from 100 up, one below, nothing for NaN."""
    if not np.isfinite(value):
        return ""
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.1f}"


class _PlainLogFormatter(LogFormatter):
    """Labels the ticks matplotlib's log formatter would, written as plain numbers (0.3, 2000)."""

    def __call__(self, x: float, pos: int | None = None) -> str:
        return f"{x:g}" if super().__call__(x, pos) else ""


def plain_log_ticks(axis) -> None:
    """Tick labels of a log-scaled axis as plain numbers; over less than about two decades the
    minor ticks between powers of ten are labelled too."""
    axis.set_major_formatter(_PlainLogFormatter())
    axis.set_minor_formatter(_PlainLogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))


def text_colour(rgba: Sequence[float]) -> str:
    """Black or white, whichever reads better on a cell of colour ``rgba``."""
    r, g, b = rgba[:3]
    return "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"


def plot_to_array(fig: Figure) -> np.ndarray:
    """Render a plot to an ``(height, width, 3)`` uint8 RGB array (Agg; nothing is closed)."""
    canvas = fig.canvas
    if not isinstance(canvas, FigureCanvasAgg):
        canvas = FigureCanvasAgg(fig)
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    return np.ascontiguousarray(rgba[..., :3], dtype=np.uint8)
