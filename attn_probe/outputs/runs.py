"""Training runs side by side: the loss of each, its largest attention logit and the entropy of
its most collapsed layer, with the alerts marked (:func:`run_summary`, the demo's summary
picture)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable, Mapping, NamedTuple, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from .canvas import as_numpy, axes_at, new_figure

if TYPE_CHECKING:
    from ..snapshot import Alert, Snapshot

__all__ = ["RunSeries", "run_series_for", "run_summary"]


class RunSeries(NamedTuple):
    """One training run's curves for :func:`run_summary`.

    ``loss`` holds the loss of steps 0, 1, 2, ...; ``steps`` the probe's sampled steps, with
    ``max_logit`` (the largest over layers and heads) and ``entropy`` (the mean normalised entropy
    of the most collapsed layer: the lowest layer mean) at each; ``alerts`` maps an alert kind
    (``"logit"``, ``"entropy"``) to the steps at which it fired.
    """

    loss: Any
    steps: Any
    max_logit: Any
    entropy: Any
    alerts: Mapping[str, Sequence[int]] = {}


#: Line colours of the runs of :func:`run_summary`, in order (ColorBrewer Dark2), and their
#: dashes (runs whose curves lie on each other stay apart).
RUN_COLOURS = ("#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d")
RUN_DASHES = ("-", (0, (5, 2)), (0, (1.5, 1.5)), "-.")


def _moving_average(values: np.ndarray, window: int) -> np.ndarray:
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


def _alert_marks(ax, x: np.ndarray, y: np.ndarray, steps: Iterable[int], colour: str) -> None:
    """Markers on a curve at the steps where an alert fired (steps the curve lacks are skipped)."""
    where = {int(step): i for i, step in enumerate(x)}
    points = [(x[where[s]], y[where[s]]) for s in sorted(set(steps)) if s in where]
    points = [(px, py) for px, py in points if np.isfinite(py)]
    if points:
        px, py = zip(*points)
        ax.plot(px, py, linestyle="none", marker="X", markersize=9, color=colour,
                markeredgecolor="black", markeredgewidth=0.8, zorder=5)


def run_summary(
    runs: Mapping[str, RunSeries],
    *,
    thresholds: Mapping[str, float] | None = None,
    title: str | None = None,
    smooth: int = 9,
) -> Figure:
    """Training runs side by side in three panels: the loss of every step, the largest attention
    logit of every sampled step (log scale) and the normalised entropy of the most collapsed
    layer, one line per run.

    ``thresholds``: the alert thresholds, drawn dashed (``"logit"`` on the logit panel,
    ``"entropy"`` on the entropy panel). Each run's ``logit`` and ``entropy`` alerts are marked
    with a cross on the panel of their figure and on the loss curve; other kinds are not drawn.
    ``smooth``: the loss is drawn faint as it is and solid as a centred moving average over
    this many steps (1: no average).
    """
    if not runs:
        raise ValueError("run_summary needs at least one run")
    thresholds = dict(thresholds or {})
    panel_w, panel_h, left, gap = 3.25, 2.7, 0.72, 0.2
    bottom, top = 0.5, 0.62 + (0.34 if title else 0.0)
    width = 3 * (left + panel_w) + gap
    fig = new_figure(width, bottom + panel_h + top)
    axes = [axes_at(fig, left + i * (left + panel_w), bottom, panel_w, panel_h)
            for i in range(3)]
    loss_ax, logit_ax, entropy_ax = axes

    handles, labels, logits = [], [], []
    for i, (name, series) in enumerate(runs.items()):
        colour, dashes = RUN_COLOURS[i % len(RUN_COLOURS)], RUN_DASHES[i % len(RUN_DASHES)]
        loss = as_numpy(series.loss).reshape(-1)
        steps = as_numpy(series.steps).reshape(-1)
        logit = as_numpy(series.max_logit).reshape(-1)
        entropy = as_numpy(series.entropy).reshape(-1)
        if not steps.shape == logit.shape == entropy.shape:
            raise ValueError(f"run {name!r}: {steps.shape[0]} sampled steps, {logit.shape[0]} "
                             f"max logits and {entropy.shape[0]} entropies")
        loss_steps = np.arange(loss.shape[0])
        if smooth > 1:
            loss_ax.plot(loss_steps, loss, color=colour, linewidth=0.8, alpha=0.3)
            loss = _moving_average(loss, smooth)
        (line,) = loss_ax.plot(loss_steps, loss, color=colour, linewidth=1.5, linestyle=dashes)
        logit = np.where(logit > 0, logit, np.nan)  # a log scale: 0 and below cannot be drawn
        logits.append(logit[np.isfinite(logit)])
        for ax, values in ((logit_ax, logit), (entropy_ax, entropy)):
            ax.plot(steps, values, color=colour, linewidth=1.5, linestyle=dashes, marker="o",
                    markersize=2.5)
        alerts = series.alerts or {}
        _alert_marks(logit_ax, steps, logit, alerts.get("logit", ()), colour)
        _alert_marks(entropy_ax, steps, entropy, alerts.get("entropy", ()), colour)
        _alert_marks(loss_ax, loss_steps, loss,
                     [*alerts.get("logit", ()), *alerts.get("entropy", ())], colour)
        handles.append(line)
        labels.append(name)

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
    logit_ax.set_title("largest attention logit (any layer, any head)", fontsize=10)
    logit_ax.set_ylabel("max q·k·scale (log scale)", fontsize=9)
    entropy_ax.set_title("entropy of the most collapsed layer", fontsize=10)
    entropy_ax.set_ylabel("mean normalised entropy (1 = uniform)", fontsize=9)
    for ax in axes:
        ax.set_xlabel("step", fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=6))

    handles += [
        Line2D([], [], linestyle="none", marker="X", markersize=9, color="grey",
               markeredgecolor="black", markeredgewidth=0.8),
        Line2D([], [], color="#b2182b", linewidth=1.0, linestyle="--"),
    ]
    labels += ["alert fired", "alert threshold"]
    height = fig.get_figheight()
    fig.legend(handles, labels, loc="upper center", ncols=len(handles), fontsize=9,
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

    fired: dict[str, list[int]] = {}
    for alert in alerts:
        fired.setdefault(alert.kind, []).append(alert.step)
    return RunSeries(
        loss=np.asarray(losses, dtype=np.float64),
        steps=np.asarray([s.step for s in snapshots], dtype=np.int64),
        max_logit=np.asarray([over_layers(s, "max_logit", "max", max) for s in snapshots]),
        entropy=np.asarray([over_layers(s, "entropy_norm_full", "mean", min)
                            for s in snapshots]),
        alerts=fired,
    )
