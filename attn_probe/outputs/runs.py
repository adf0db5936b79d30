"""Training runs side by side: the loss of each, its largest logit spread and the entropy of its
most collapsed layer, with each run's first warnings marked on the curves of the layers they
fired in and those layers named (:func:`plot_runs`, the demo's summary picture). What warned
first is the answer of :class:`attn_probe.alerts.Run`, as in the report and on the console."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable, Mapping, NamedTuple, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from ..alerts.run import Run
from .canvas import as_numpy, axes_at, new_plot

if TYPE_CHECKING:
    from ..snapshot import Alert, Snapshot

__all__ = ["PANELS", "RunSeries", "moving_average", "run_series_for", "plot_runs",
           "value_at"]


class RunSeries(NamedTuple):
    """One training run's curves for :func:`plot_runs`.

    ``loss`` holds the loss of steps 0, 1, 2, ...; ``steps`` the probe's sampled steps, with
    ``logit_spread`` (the largest over layers and heads) and ``entropy`` (the mean normalised
    entropy of the most collapsed layer: the lowest layer mean) at each; ``alerts`` the run's
    alerts (:class:`~attn_probe.snapshot.Alert`, ``info`` ones included: they never count as
    warnings); ``layers`` maps the tag of each warned layer to its own ``(logit_spread,
    entropy)`` at ``steps``, the curves its warnings are marked on.
    """

    loss: Any
    steps: Any
    logit_spread: Any
    entropy: Any
    alerts: Sequence["Alert"] = ()
    layers: Mapping[str, tuple[Any, Any]] = {}


#: Line colours of the runs of :func:`plot_runs`, in order (ColorBrewer Dark2), and their
#: dashes (runs whose curves lie on each other stay apart).
RUN_COLOURS = ("#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d")
RUN_DASHES = ("-", (0, (5, 2)), (0, (1.5, 1.5)), "-.")


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average over ``window`` points, over fewer at the ends (NaN-aware)."""
    if window <= 1 or values.size == 0:
        return values
    ok = np.isfinite(values)
    sums = np.concatenate([[0.0], np.cumsum(np.where(ok, values, 0.0))])
    counts = np.concatenate([[0], np.cumsum(ok)])
    index = np.arange(values.size)
    lo = np.clip(index - window // 2, 0, values.size)
    hi = np.clip(index + window // 2 + 1, 0, values.size)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (sums[hi] - sums[lo]) / (counts[hi] - counts[lo])


#: The figures of the panels after the loss, as ``(figure, reduction over heads)``: alerts on a
#: panel's figure are marked on it, on their layer's curve (``RunSeries.layers``, in this order).
PANELS = (("logit_spread", "max"), ("entropy_norm_full", "mean"))


def _cross(ax, x: float, y: float, colour: str) -> None:
    ax.plot([x], [y], linestyle="none", marker="X", markersize=9, color=colour,
            markeredgecolor="black", markeredgewidth=0.8, zorder=5)


def value_at(steps: np.ndarray, values: np.ndarray | None, step: int) -> float:
    """The value of a curve at ``step`` (NaN where it has none)."""
    if values is None:
        return float("nan")
    where = np.flatnonzero(steps == step)
    return float(values[where[0]]) if where.size else float("nan")


def _mark_alerts(ax, steps: np.ndarray, series: RunSeries, run: Run, column: int,
                 colour: str, dashes: Any) -> list[float]:
    """The run's first warnings on the figure of panel ``column`` (those at the first step any
    warning on it fired): each such layer's own curve (thin), a cross on it at the step of the
    warning, and the layers named beside them (one label beside the highest cross: crosses of
    one step would hide each other's). Returns the values drawn (for the axis limits)."""
    figure, reduction = PANELS[column]
    first = run.first_warning(figure)
    drawn: list[float] = []
    named: list[tuple[float, str]] = []
    if first is None:
        return drawn
    log = column == 0
    for alert in first.alerts:
        own = series.layers.get(alert.tag)
        values = None if own is None else as_numpy(own[column]).reshape(-1)
        if values is not None and values.shape == steps.shape:
            if log:
                values = np.where(values > 0, values, np.nan)
            ax.plot(steps, values, color=colour, linewidth=0.9, alpha=0.55, linestyle=dashes)
        else:
            values = None
        y = value_at(steps, values, alert.step)
        if not np.isfinite(y) and alert.reduction == reduction:
            y = float(alert.value)
        if not np.isfinite(y) or (log and y <= 0):
            continue
        _cross(ax, alert.step, y, colour)
        drawn.append(y)
        named.append((y, alert.tag))
    if named:
        top = max(y for y, _ in named)
        ax.annotate(", ".join(tag for _, tag in sorted(named, reverse=True)), (first.step, top),
                    xytext=(7, 3), textcoords="offset points", fontsize=8, fontweight="bold",
                    zorder=6)
    return drawn


def plot_runs(
    runs: Mapping[str, RunSeries],
    *,
    thresholds: Mapping[str, float] | None = None,
    title: str | None = None,
    smooth: int = 9,
) -> Figure:
    """Training runs side by side in three panels: the loss of every step, the largest logit
    spread of every sampled step (log scale) and the normalised entropy of the most collapsed
    layer, one line per run.

    ``thresholds``: levels to draw dashed (``"logit"`` on the logit panel, ``"entropy"`` on the
    entropy panel). On each panel of a figure (:data:`PANELS`), a run's first warnings on that
    figure (those at the first step any fired) are marked with a cross on the curve of the
    layer they fired in (drawn thin, named by its tag) at that layer's value; the loss curve
    gets a cross at the run's first warning, and the legend says what warned first, where and
    since when (:meth:`attn_probe.alerts.Run.first_warning`; ``info`` alerts never count). The report and TensorBoard show every alert.
    ``smooth``: the loss is drawn faint as it is and solid as a centred moving average over
    this many steps (1: no average).
    """
    if not runs:
        raise ValueError("plot_runs needs at least one run")
    thresholds = dict(thresholds or {})
    panel_w, panel_h, left, gap = 3.25, 2.7, 0.72, 0.2
    bottom, top = 0.5, 0.62 + (0.34 if title else 0.0)
    width = 3 * (left + panel_w) + gap
    fig = new_plot(width, bottom + panel_h + top)
    axes = [axes_at(fig, left + i * (left + panel_w), bottom, panel_w, panel_h)
            for i in range(3)]
    loss_ax, logit_ax, entropy_ax = axes

    handles, labels, logits = [], [], []
    for i, (name, series) in enumerate(runs.items()):
        colour, dashes = RUN_COLOURS[i % len(RUN_COLOURS)], RUN_DASHES[i % len(RUN_DASHES)]
        loss = as_numpy(series.loss).reshape(-1)
        steps = as_numpy(series.steps).reshape(-1)
        logit = as_numpy(series.logit_spread).reshape(-1)
        entropy = as_numpy(series.entropy).reshape(-1)
        if not steps.shape == logit.shape == entropy.shape:
            raise ValueError(f"run {name!r}: {steps.shape[0]} sampled steps, {logit.shape[0]} "
                             f"logit spreads and {entropy.shape[0]} entropies")
        loss_steps = np.arange(loss.shape[0])
        if smooth > 1:
            loss_ax.plot(loss_steps, loss, color=colour, linewidth=0.8, alpha=0.3)
            loss = moving_average(loss, smooth)
        (line,) = loss_ax.plot(loss_steps, loss, color=colour, linewidth=1.5, linestyle=dashes)
        logit = np.where(logit > 0, logit, np.nan)  # a log scale: 0 and below cannot be drawn
        logits.append(logit[np.isfinite(logit)])
        for ax, values in ((logit_ax, logit), (entropy_ax, entropy)):
            ax.plot(steps, values, color=colour, linewidth=1.5, linestyle=dashes, marker="o",
                    markersize=2.5)
        run = Run(name, tuple(series.alerts))
        logits.append(np.asarray(_mark_alerts(logit_ax, steps, series, run, 0, colour,
                                              dashes)))
        _mark_alerts(entropy_ax, steps, series, run, 1, colour, dashes)
        first = run.first_warning()
        if first and 0 <= first.step < loss.shape[0] and np.isfinite(loss[first.step]):
            _cross(loss_ax, first.step, loss[first.step], colour)
        handles.append(line)
        labels.append(f"{name}: {run.headline()}")

    for ax, kind, sign in ((logit_ax, "logit", ">"), (entropy_ax, "entropy", "<")):
        if kind in thresholds:
            ax.axhline(thresholds[kind], color="#b2182b", linewidth=1.0, linestyle="--")
            ax.text(0.98, thresholds[kind], f"{kind} alert: {sign} {thresholds[kind]:g}",
                    transform=ax.get_yaxis_transform(), ha="right", va="bottom", fontsize=8,
                    color="#b2182b")
    logit_ax.set_yscale("log")
    finite = np.concatenate(logits)
    if finite.size:
        low = float(finite.min()) / 2
        high = max(float(finite.max()), thresholds.get("logit", 0.0)) * 2.5
        logit_ax.set_ylim(low, high)
    entropy_ax.set_ylim(0, 1.05)

    loss_ax.set_title("training loss" + (f" ({smooth}-step average)" if smooth > 1 else ""),
                      fontsize=10)
    loss_ax.set_ylabel("cross-entropy (nats)", fontsize=9)
    logit_ax.set_title("largest logit spread (any layer, any head)", fontsize=10)
    logit_ax.set_ylabel("top score - mean score (log scale)", fontsize=9)
    entropy_ax.set_title("entropy of the most collapsed layer", fontsize=10)
    entropy_ax.set_ylabel("mean normalised entropy (1 = uniform)", fontsize=9)
    for ax in axes:
        ax.set_xlabel("step", fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=6))

    handles.append(Line2D([], [], linestyle="none", marker="X", markersize=9, color="grey",
                          markeredgecolor="black", markeredgewidth=0.8))
    labels.append("first warning")
    if thresholds:
        handles.append(Line2D([], [], color="#b2182b", linewidth=1.0, linestyle="--"))
        labels.append("alert threshold")
    height = fig.get_figheight()
    # Long headlines (several layers warned at once) take two columns, not one row off the figure.
    columns = len(handles) if sum(map(len, labels)) < 160 else 2
    fig.legend(handles, labels, loc="upper center", ncols=columns, fontsize=9,
               frameon=False, bbox_to_anchor=(0.5, 1 - (0.34 if title else 0.02) / height))
    if title:
        fig.suptitle(title, fontsize=11, y=1 - 0.06 / height, va="top")
    return fig


def run_series_for(losses: Sequence[float], snapshots: Sequence["Snapshot"],
                   alerts: Iterable["Alert"] = ()) -> RunSeries:
    """:class:`RunSeries` of a run: its losses, the probe's snapshots (``probe.history``) and
    alerts (``probe.alerts``)."""

    def over_layers(snapshot: "Snapshot", metric: str, how: str, pick) -> float:
        values = [layer.reduce(metric, how) for layer in snapshot.layers]
        values = [v for v in values if np.isfinite(v)]
        return float(pick(values)) if values else float("nan")

    def of_layer(tag: str, metric: str, how: str) -> np.ndarray:
        return np.asarray([next((layer.reduce(metric, how) for layer in s.layers
                                 if layer.tag == tag), float("nan")) for s in snapshots])

    fired = tuple(alerts)
    drawn = {figure for figure, _ in PANELS}
    tags = dict.fromkeys(a.tag for a in fired if a.warns and a.figure in drawn)
    return RunSeries(
        loss=np.asarray(losses, dtype=np.float64),
        steps=np.asarray([s.step for s in snapshots], dtype=np.int64),
        logit_spread=np.asarray([over_layers(s, "logit_spread", "max", max)
                                 for s in snapshots]),
        entropy=np.asarray([over_layers(s, "entropy_norm_full", "mean", min)
                            for s in snapshots]),
        alerts=fired,
        layers={tag: tuple(of_layer(tag, figure, how) for figure, how in PANELS)
                for tag in tags},
    )
