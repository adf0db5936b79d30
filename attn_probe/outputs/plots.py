"""Matplotlib plots of attention collapse.

A *plot* is a drawing; a *figure* is a measured number (:mod:`attn_probe.figures`). Every
function builds a :class:`matplotlib.figure.Figure` directly (Agg canvas, no pyplot, no global
registry), so it is safe in training processes, threads and notebooks alike: the plot is garbage
collected like any other object. The functions take plain arrays; the ``*_for`` variants are thin
conveniences that pull the arrays out of a :class:`~attn_probe.snapshot.Snapshot`.

Use :func:`plot_to_array` to turn a plot into an ``(height, width, 3)`` uint8 image, e.g. for
``SummaryWriter.add_image(..., dataformats="HWC")``. In a notebook a returned plot displays
itself as the cell's value.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ..snapshot import percent
from .canvas import (
    as_numpy, axes_at, clamp, colour_map, format_cell, label_ticks, new_plot, plot_to_array,
    text_colour, text_width,
)
from .runs import RunSeries, plot_runs, run_series_for

if TYPE_CHECKING:
    from ..snapshot import Snapshot

__all__ = [
    "attention_heatmap",
    "attention_heatmaps",
    "collapse_map",
    "collapse_map_for",
    "head_profiles",
    "head_profiles_for",
    "max_rank_profile",
    "max_rank_profile_for",
    "plot_runs",
    "plot_to_array",
    "RunSeries",
    "run_series_for",
]

#: Largest grid whose cells get their value written in them.
ANNOTATE_MAX = 16
_MAX_WIDTH = 12.0  # inches
_MAX_HEIGHT = 12.0


# ----------------------------------------------------------------------------------- helpers


def _layer_matrix(snapshot: "Snapshot", metric: str) -> np.ndarray:
    """(L, H_max) per-head means; NaN where a head has no data or a layer has fewer heads."""
    heads = max((layer.num_heads for layer in snapshot.layers), default=0)
    values = np.full((len(snapshot.layers), heads), np.nan)
    for row, layer in enumerate(snapshot.layers):
        per_head = np.asarray(layer.heads[metric], dtype=np.float64).copy()
        per_head[~layer.has_data] = np.nan
        values[row, : per_head.shape[0]] = per_head
    return values


# ------------------------------------------------------------------------------------- plots


def collapse_map(
    values: Any,
    *,
    layer_labels: Sequence[str] | None = None,
    head_labels: Sequence[str] | None = None,
    title: str | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
    colorbar_label: str | None = None,
    cmap: str = "viridis",
    annotate: bool | None = None,
) -> Figure:
    """Layer x head map of a per-head figure, e.g. mean rank@90% (lower = more collapsed).

    ``values`` is ``(L, H)``; NaN cells (no data) are drawn grey. The cell values are written
    in the cells when ``annotate`` is true, or, by default, when the grid is at most 16 x 16.
    """
    values = as_numpy(values)
    if values.ndim == 1:
        values = values[None, :]
    if values.ndim != 2:
        raise ValueError(f"collapse_map expects (layers, heads) values, got shape {values.shape}")
    layers, heads = values.shape
    if layer_labels is None:
        layer_labels = [f"L{i:02d}" for i in range(layers)]
    if head_labels is None:
        head_labels = [f"H{h:02d}" for h in range(heads)]
    if len(layer_labels) != layers or len(head_labels) != heads:
        raise ValueError(
            f"got {len(layer_labels)} layer labels and {len(head_labels)} head labels for a "
            f"{layers} x {heads} map"
        )
    if annotate is None:
        annotate = layers <= ANNOTATE_MAX and heads <= ANNOTATE_MAX

    finite = values[np.isfinite(values)]
    if vmin is None:
        vmin = float(finite.min()) if finite.size else 0.0
    if vmax is None:
        vmax = float(finite.max()) if finite.size else 1.0
    if vmax <= vmin:
        vmax = vmin + 1.0

    rotate = heads > 8
    cols = label_ticks(heads, 32)
    rows = label_ticks(layers, 40)
    y_size = 7 if layers > 24 else 8
    left = 0.3 + min(text_width([layer_labels[i] for i in rows], y_size), 2.5) + 0.1
    bottom = 0.4 + (min(text_width([head_labels[i] for i in cols], 7), 2.0) if rotate else 0.15)
    top = 0.35 if title else 0.12
    right = 1.15 if colorbar_label else 0.85
    cell_w, cell_h = (0.42, 0.3) if annotate else (0.25, 0.22)
    map_w = clamp(cell_w * heads, 2.4, _MAX_WIDTH - left - right)
    map_h = clamp(cell_h * layers, 1.2, _MAX_HEIGHT - top - bottom)
    fig = new_plot(left + map_w + right, bottom + map_h + top)
    ax = axes_at(fig, left, bottom, map_w, map_h)
    image = ax.imshow(
        np.ma.masked_invalid(values),
        cmap=colour_map(cmap),
        vmin=vmin,
        vmax=vmax,
        aspect="auto",
        interpolation="nearest",
    )
    bar = fig.colorbar(image, cax=axes_at(fig, left + map_w + 0.12, bottom, 0.15, map_h))
    if colorbar_label:
        bar.set_label(colorbar_label, fontsize=9)
    bar.ax.tick_params(labelsize=8)

    ax.set_xticks(cols, [head_labels[i] for i in cols], fontsize=7, rotation=90 if rotate else 0)
    ax.set_yticks(rows, [layer_labels[i] for i in rows], fontsize=y_size)
    ax.set_xlabel("head", fontsize=9)
    ax.set_ylabel("layer", fontsize=9)
    if title:
        ax.set_title(title, fontsize=10)

    if annotate:
        size = 7 if heads <= 8 else 6
        for (row, col), value in np.ndenumerate(values):
            if not np.isfinite(value):
                continue
            colour = text_colour(image.cmap(image.norm(value)))
            ax.text(col, row, format_cell(value), ha="center", va="center", fontsize=size,
                    color=colour)
    return fig


def collapse_map_for(snapshot: "Snapshot", metric: str = "rank", **kwargs: Any) -> Figure:
    """:func:`collapse_map` of a snapshot's per-head means of ``metric`` (default rank@tau).

    Rank and columns are at least 1, so their colour scale starts at 1 unless ``vmin`` is given.
    Keyword arguments go to :func:`collapse_map`.
    """
    pct = percent(snapshot.tau)
    names = {"rank": f"rank@{pct}%", "columns": f"columns@{pct}%"}
    label = names.get(metric, metric)
    values = _layer_matrix(snapshot, metric)
    if metric in ("rank", "columns") and "vmin" not in kwargs:
        finite = values[np.isfinite(values)]
        kwargs["vmin"] = min(1.0, float(finite.min())) if finite.size else 1.0
    kwargs.setdefault("layer_labels", [layer.tag for layer in snapshot.layers])
    kwargs.setdefault("title", f"mean {label} per head, step {snapshot.step}")
    kwargs.setdefault("colorbar_label", f"{label}\n(lower = more collapsed)" if metric in names
                      else label)
    return collapse_map(values, **kwargs)


def max_rank_profile(
    max_rank: Any,
    *,
    layer_labels: Sequence[str] | None = None,
    tau: float = 0.9,
    title: str | None = None,
) -> Figure:
    """MaxRank per layer (the largest per-head mean rank@tau): the collapse profile over depth.

    NaN entries (layers without data) leave a gap in the line.
    """
    max_rank = as_numpy(max_rank).reshape(-1)
    layers = max_rank.shape[0]
    if layer_labels is None:
        layer_labels = [f"L{i:02d}" for i in range(layers)]
    if len(layer_labels) != layers:
        raise ValueError(f"got {len(layer_labels)} layer labels for {layers} layers")
    pct = percent(tau)

    ticks = label_ticks(layers, 48)
    rotate = len(ticks) > 12
    bottom = 0.45 + (min(text_width([layer_labels[i] for i in ticks], 8), 2.0) if rotate
                     else 0.15)
    width = clamp(2.5 + 0.3 * layers, 5.0, _MAX_WIDTH)
    fig = new_plot(width, bottom + 2.4 + 0.35)
    ax = axes_at(fig, 0.7, bottom, width - 0.85, 2.4)
    x = np.arange(layers)
    ax.plot(x, max_rank, marker="o", markersize=4, linewidth=1.5, color="#3b528b",
            label=f"MaxRank@{pct}%")
    ax.axhline(1.0, color="#b2182b", linewidth=0.8, linestyle=":", label="rank 1 (collapsed)")
    finite = max_rank[np.isfinite(max_rank)]
    top = float(finite.max()) if finite.size else 1.0
    ax.set_ylim(0, max(2.0, top * 1.12))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True, nbins=6))
    if layers:
        ax.set_xlim(-0.5, layers - 0.5)
    ax.set_xticks(ticks, [layer_labels[i] for i in ticks], fontsize=8, rotation=90 if rotate else 0)
    ax.tick_params(axis="y", labelsize=8)
    ax.set_xlabel("layer", fontsize=9)
    ax.set_ylabel(f"max over heads of rank@{pct}%", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="best", frameon=False)
    if not finite.size:
        ax.text(0.5, 0.7, "no data", transform=ax.transAxes, ha="center", va="center",
                color="grey")
    ax.set_title(title or f"MaxRank@{pct}% per layer", fontsize=10)
    return fig


def max_rank_profile_for(snapshot: "Snapshot", *, title: str | None = None) -> Figure:
    """:func:`max_rank_profile` of a snapshot."""
    pct = percent(snapshot.tau)
    return max_rank_profile(
        snapshot.max_rank_profile(),
        layer_labels=[layer.tag for layer in snapshot.layers],
        tau=snapshot.tau,
        title=title or f"MaxRank@{pct}% per layer, step {snapshot.step}",
    )


def head_profiles(
    rank: Any,
    columns: Any,
    *,
    tau: float = 0.9,
    title: str | None = None,
    lazy: Any = None,
    ylabel: str = "mean over sequences",
) -> Figure:
    """Per-head rank@tau and columns@tau of one layer, as grouped bars.

    ``lazy`` (optional (H,) bools) marks collapsed heads: their labels are drawn red.
    ``ylabel`` says what the bars are of (default: means over sequences).
    """
    rank = as_numpy(rank).reshape(-1)
    columns = as_numpy(columns).reshape(-1)
    if rank.shape != columns.shape:
        raise ValueError(f"rank {rank.shape} and columns {columns.shape} differ in head count")
    heads = rank.shape[0]
    pct = percent(tau)

    rotate = heads > 12
    width = clamp(2.2 + 0.38 * heads, 4.5, _MAX_WIDTH)
    bottom = 0.85 if rotate else 0.6
    fig = new_plot(width, bottom + 2.2 + 0.35)
    ax = axes_at(fig, 0.7, bottom, width - 0.85, 2.2)
    x = np.arange(heads)
    width = 0.4
    ax.bar(x - width / 2, np.nan_to_num(rank, nan=0.0), width, label=f"rank@{pct}%",
           color="#3b528b")
    ax.bar(x + width / 2, np.nan_to_num(columns, nan=0.0), width, label=f"columns@{pct}%",
           color="#5ec962")
    ax.axhline(1.0, color="#b2182b", linewidth=0.8, linestyle=":")
    finite = np.concatenate([rank[np.isfinite(rank)], columns[np.isfinite(columns)]])
    ax.set_ylim(0, max(2.0, float(finite.max()) * 1.12 if finite.size else 2.0))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True, nbins=6))
    ticks = label_ticks(heads, 32)
    ax.set_xticks(ticks, [f"H{h:02d}" for h in ticks], fontsize=7, rotation=90 if rotate else 0)
    if heads:
        ax.set_xlim(-0.6, heads - 0.4)
    if lazy is not None:
        lazy = np.asarray(lazy, dtype=bool).reshape(-1)
        for label, h in zip(ax.get_xticklabels(), ticks):
            if h < lazy.shape[0] and lazy[h]:
                label.set_color("#b2182b")
    ax.tick_params(axis="y", labelsize=8)
    ax.set_xlabel("head" + (" (red: lazy)" if lazy is not None and lazy.any() else ""),
                  fontsize=9)
    ax.set_ylabel(ylabel, fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, frameon=False, ncols=2, loc="upper right")
    if title:
        ax.set_title(title, fontsize=10)
    return fig


def head_profiles_for(snapshot: "Snapshot", layer: "str | int", *,
                      title: str | None = None) -> Figure:
    """:func:`head_profiles` of one layer of a snapshot (by name, tag ``"L07"`` or index)."""
    summary = snapshot.layer(layer)
    has_data = summary.has_data
    rank = np.where(has_data, summary.heads["rank"], np.nan)
    columns = np.where(has_data, summary.heads["columns"], np.nan)
    return head_profiles(
        rank,
        columns,
        tau=snapshot.tau,
        lazy=summary.lazy,
        title=title or f"{summary.tag} {summary.name}, step {snapshot.step}",
    )


def attention_heatmaps(
    attention: Any,
    *,
    heads: Sequence[int] | None = None,
    title: str | None = None,
    max_cols: int = 4,
    shared_scale: bool = False,
    crop: int | None = None,
    cmap: str = "magma",
) -> Figure:
    """Grid of per-head heatmaps of attention probabilities: keys on x, queries on y.

    ``attention`` is ``(H, queries, keys)`` (or ``(queries, keys)`` for one head), a tensor or
    an array: square for self-attention, a rectangle for cross-attention, an attention pooler or
    a crop below the key count. ``heads`` picks heads (default: all); ``crop`` keeps the first
    ``crop`` queries and keys. Each head gets its own colour scale from 0 and a colour bar, or,
    with ``shared_scale``, one scale and one colour bar for all.
    """
    attention = as_numpy(attention, np.float32)
    if attention.ndim == 2:
        attention = attention[None]
    if attention.ndim != 3:
        raise ValueError(f"expected (heads, queries, keys) attention, got shape "
                         f"{attention.shape}")
    if crop is not None:
        attention = attention[:, :crop, :crop]
    num_heads, queries, keys = attention.shape
    if queries == 0 or keys == 0:
        raise ValueError(f"no attention to draw: {queries} queries over {keys} keys")
    heads = list(range(num_heads)) if heads is None else [int(h) for h in heads]
    if not heads:
        raise ValueError("no heads to draw")
    bad = [h for h in heads if not 0 <= h < num_heads]
    if bad:
        raise ValueError(f"heads {bad} out of range for {num_heads} heads")
    if max_cols < 1:
        raise ValueError(f"max_cols must be >= 1, got {max_cols}")

    cols = min(max_cols, len(heads))
    rows = math.ceil(len(heads) / cols)
    # One panel: y tick labels and "queries" | image | colour bar and its labels; above it the
    # head title, below it the x tick labels and "keys". The image's longer side is ``side``
    # and its cells are square (a rectangle of queries x keys keeps its shape).
    pad_left, pad_bottom, pad_title = 0.5, 0.45, 0.28
    pad_right = 0.2 if shared_scale else 0.62
    shared_bar = 0.95 if shared_scale else 0.0
    suptitle = 0.32 if title else 0.05
    side = min(
        1.8,
        (_MAX_WIDTH - shared_bar) / cols - pad_left - pad_right,
        (_MAX_HEIGHT - suptitle) / rows - pad_bottom - pad_title,
    )
    side = max(side, 0.6)
    image_w = max(side * min(1.0, keys / queries), 0.3)
    image_h = max(side * min(1.0, queries / keys), 0.3)
    cell_w = pad_left + image_w + pad_right
    cell_h = pad_title + image_h + pad_bottom
    width = max(cols * cell_w + shared_bar, 2.6 if title else 0.0)
    height = rows * cell_h + suptitle
    fig = new_plot(width, height)
    colormap = colour_map(cmap)

    def top(values: np.ndarray) -> float:
        finite = values[np.isfinite(values)]
        peak = float(finite.max()) if finite.size else 0.0
        return peak if peak > 0 else 1.0

    shared_vmax = top(attention[heads]) if shared_scale else None
    locator_kwargs = {"integer": True, "nbins": 4, "min_n_ticks": 1}
    image = None
    for slot, head in enumerate(heads):
        row, col = divmod(slot, cols)
        x0 = col * cell_w + pad_left
        y0 = height - suptitle - (row + 1) * cell_h + pad_bottom
        ax = axes_at(fig, x0, y0, image_w, image_h)
        image = ax.imshow(
            np.ma.masked_invalid(attention[head]),
            cmap=colormap,
            vmin=0.0,
            vmax=shared_vmax if shared_scale else top(attention[head]),
            interpolation="nearest",
            aspect="auto",
        )
        ax.set_title(f"H{head:02d}", fontsize=9, pad=3)
        ax.xaxis.set_major_locator(MaxNLocator(**locator_kwargs))
        ax.yaxis.set_major_locator(MaxNLocator(**locator_kwargs))
        ax.tick_params(labelsize=7, length=2, pad=1.5)
        ax.set_xlabel("keys", fontsize=8, labelpad=1)
        if col == 0:
            ax.set_ylabel("queries", fontsize=8, labelpad=1)
        if not shared_scale:
            bar = fig.colorbar(image, cax=axes_at(fig, x0 + image_w + 0.06, y0, 0.08, image_h))
            bar.ax.tick_params(labelsize=6, length=2, pad=1.5)
            bar.locator = MaxNLocator(nbins=4)
            bar.update_ticks()
    if shared_scale and image is not None:
        grid_h = rows * cell_h - pad_bottom - pad_title
        bar = fig.colorbar(image, cax=axes_at(fig, cols * cell_w + 0.05, pad_bottom, 0.15,
                                               grid_h))
        bar.ax.tick_params(labelsize=7)
        bar.set_label("attention probability", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10, y=1 - 0.06 / height, va="top")
    return fig


def attention_heatmap(
    attention: Any,
    *,
    token_labels: Sequence[str] | None = None,
    title: str | None = None,
    cmap: str = "magma",
    size: float = 5.0,
) -> Figure:
    """One head's attention probabilities, keys on x, queries on y, ``size`` inches on the
    longer side (cells are square: a rectangle of queries x keys keeps its shape).

    ``attention`` is ``(queries, keys)``. ``token_labels`` (at least ``keys`` strings: the
    tokens of the sequence) name the rows and columns; at most 64 are written per axis, evenly
    thinned.
    """
    attention = as_numpy(attention, np.float32)
    if attention.ndim != 2:
        raise ValueError(f"expected (queries, keys) attention of one head, got shape "
                         f"{attention.shape}")
    queries, keys = attention.shape
    if token_labels is not None:
        token_labels = [str(label) for label in token_labels]
        if len(token_labels) < keys:
            raise ValueError(f"got {len(token_labels)} token labels for {keys} keys")
    rows, cols = label_ticks(queries, 64), label_ticks(keys, 64)
    points = 7 if max(queries, keys) <= 32 else 5
    margin = 0.55
    if token_labels is not None:
        margin = 0.35 + min(text_width([token_labels[i] for i in rows + cols], points), 1.6)
    top = 0.35 if title else 0.15
    image_w = max(size * min(1.0, keys / max(queries, 1)), 0.5)
    image_h = max(size * min(1.0, queries / max(keys, 1)), 0.5)
    fig = new_plot(margin + image_w + 0.95, margin + image_h + top)
    ax = axes_at(fig, margin, margin, image_w, image_h)
    finite = attention[np.isfinite(attention)]
    peak = float(finite.max()) if finite.size else 0.0
    image = ax.imshow(np.ma.masked_invalid(attention), cmap=colour_map(cmap), vmin=0.0,
                      vmax=peak if peak > 0 else 1.0, interpolation="nearest", aspect="auto")
    bar = fig.colorbar(image, cax=axes_at(fig, margin + image_w + 0.12, margin, 0.15, image_h))
    bar.set_label("attention probability", fontsize=8)
    bar.ax.tick_params(labelsize=7)
    if token_labels is None:
        locator = {"integer": True, "nbins": 8, "min_n_ticks": 1}
        ax.xaxis.set_major_locator(MaxNLocator(**locator))
        ax.yaxis.set_major_locator(MaxNLocator(**locator))
        ax.tick_params(labelsize=7)
    else:
        ax.set_xticks(cols, [token_labels[i] for i in cols], fontsize=points, rotation=90)
        ax.set_yticks(rows, [token_labels[i] for i in rows], fontsize=points)
        ax.tick_params(length=2, pad=1)
    ax.set_xlabel("keys", fontsize=9)
    ax.set_ylabel("queries", fontsize=9)
    if title:
        ax.set_title(title, fontsize=10)
    return fig
