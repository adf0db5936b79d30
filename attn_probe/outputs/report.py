"""One self-contained HTML page of training runs, from what their event files hold
(:class:`~attn_probe.outputs.events.RunEvents`): where to look first, then side by side the loss,
every layer's attention logit and entropy with the alerts marked, the timeline of head health,
the latest head states, the table of alerts, and what each figure means.

Pictures are inline PNGs (``data:`` URIs) and the style is in the page: it opens from disk in
any browser, with no network. :func:`render_report` builds the page.
"""

from __future__ import annotations

import base64
import html
import io
import re
from typing import TYPE_CHECKING, Sequence


from ..figures import SERIES, Series, definitions
from ..snapshot import HEAD_STATES, HeadState, figure_text
from .curves import Mark, step_curves
from .events import LOSS_TAGS
from .health import layer_timeline
from .runs import value_at

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from .events import RunEvents

__all__ = ["render_report"]

#: The logit figures a chart can show: the chart shows the first a run has whose figure one of
#: its alerts watched, else the first it has.
LOGIT_SERIES = tuple(s for s in SERIES if s.how == "log10")
ENTROPY_SERIES = next(s for s in SERIES
                      if s.figure.name == "entropy_norm_full" and s.how == "mean")
#: Words for the logit figures on a chart's axis.
_LOGIT_WORDS = {"logit_spread": "largest logit spread (max - mean score)",
                "max_logit": "largest attention logit q·k·scale"}

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", "DejaVu Sans", sans-serif;
       margin: 1.2em 1.6em; color: #222; }
h1 { font-size: 1.4em; margin-bottom: 0.2em; }
h2 { font-size: 1.1em; margin: 1.4em 0 0.4em; border-bottom: 1px solid #ccc; }
.note { color: #555; font-size: 0.9em; }
.runs { display: grid; gap: 0.6em 1.4em; overflow-x: auto;
        grid-template-columns: repeat(var(--runs), minmax(420px, 1fr)); }
.runs > h2, .runs > .wide { grid-column: 1 / -1; }
.cell { min-width: 0; }
.cell h3 { font-size: 1em; margin: 0.2em 0; }
.cell img { max-width: 100%; height: auto; display: block; }
table { border-collapse: collapse; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.45em; text-align: left; vertical-align: top; }
th { background: #f2f2f2; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.sev-critical { background: #f8d0d0; font-weight: bold; }
.sev-warning { background: #fde6c4; }
.sev-info { background: #dde8f6; }
.swatch { display: inline-block; width: 0.9em; height: 0.9em; border: 1px solid #888;
          vertical-align: middle; margin-right: 0.3em; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: 0.15em 1em; font-size: 0.9em; }
dt { font-family: ui-monospace, "DejaVu Sans Mono", monospace; }
dd { margin: 0; }
"""


def _png(figure: "Figure") -> str:
    """A figure as a ``data:`` URI of a PNG."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return _data_uri(buffer.getvalue())


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _img(uri: str, alt: str) -> str:
    return f'<img src="{uri}" alt="{html.escape(alt)}">'


def _prefix(series: Series) -> str:
    """The part of a series' tags before the layer (the report's series hold no tau)."""
    return series.prefix("")


def _logit_series(run: "RunEvents") -> Series | None:
    """The logit figure the run's chart shows: the first of :data:`LOGIT_SERIES` the run has
    whose figure one of its alerts watched, else the first it has."""
    present = [series for series in LOGIT_SERIES if run.layers(_prefix(series))]
    watched = {alert.figure for alert in run.alerts}
    return next((s for s in present if s.figure.name in watched),
                present[0] if present else None)


def _marks(run: "RunEvents", series: Series, layers: dict) -> list[Mark]:
    """Crosses at the run's alerts on ``series``' figure, on the alerted layer's own line: at
    the alert's value where it is the series' reduction, else at the line's value; the layers
    of the first such alert are named (the others by their colour)."""
    fired = [alert for alert in run.alerts
             if alert.figure == series.figure.name and alert.tag in layers]
    first = min((alert.step for alert in fired), default=None)
    marks = []
    for alert in fired:
        value = (alert.value if alert.reduction == series.reduction
                 else value_at(*layers[alert.tag], alert.step))
        marks.append(Mark(alert.tag, alert.step, value, alert.tag if alert.step == first else ""))
    return marks


def _thresholds(run: "RunEvents", series: Series) -> dict[str, float]:
    """The levels the run's alerts on ``series``' figure compared it with, each named by its
    condition (``alert: fell to ≤ 0.3``)."""
    found = {(alert.level_text, alert.threshold) for alert in run.alerts
             if alert.figure == series.figure.name}
    return {f"alert: {text}": value for text, value in sorted(found, key=lambda f: f[1])}


def _loss_chart(run: "RunEvents") -> str:
    loss = run.loss
    if loss is None:
        return (f'<p class="note">No training loss in this run (none of the tags '
                f'{", ".join(LOSS_TAGS)}).</p>')
    tag, (steps, values) = loss
    warning = run.run.first_warning()
    first = [(warning.step, "first warning")] if warning is not None else []
    figure = step_curves({tag: (steps, values)}, title=f"training loss ({tag})",
                         ylabel="loss", smooth=9 if steps.size > 30 else 1, events=first)
    return _img(_png(figure), f"{run.name}: training loss ({tag})")


def _logit_chart(run: "RunEvents") -> str:
    series = _logit_series(run)
    if series is None:
        return '<p class="note">No attention logit in this run.</p>'
    layers = {tag: (steps, 10 ** values)
              for tag, (steps, values) in run.layers(_prefix(series)).items()}
    figure = step_curves(
        layers, title=f"{_LOGIT_WORDS.get(series.figure.name, series.figure.name)}, per layer",
        ylabel=f"{series.figure.name} (log scale)", log=True,
        thresholds=_thresholds(run, series), marks=_marks(run, series, layers),
    )
    return _img(_png(figure), f"{run.name}: {series.figure.name} of every layer")


def _entropy_chart(run: "RunEvents") -> str:
    layers = run.layers(_prefix(ENTROPY_SERIES))
    if not layers:
        return '<p class="note">No normalised entropy in this run.</p>'
    figure = step_curves(
        layers, title="mean normalised entropy, per layer", ylabel="1 = uniform, 0 = one-hot",
        ylim=(0, 1.05), thresholds=_thresholds(run, ENTROPY_SERIES),
        marks=_marks(run, ENTROPY_SERIES, layers),
    )
    return _img(_png(figure), f"{run.name}: normalised entropy of every layer")


def _timeline(run: "RunEvents") -> str:
    layers = run.layers("health")
    if not layers:
        return '<p class="note">No head states in this run (logged by attn_probe from this ' \
               'version on).</p>'
    figure = layer_timeline(layers, [(alert.step, alert.tag) for alert in run.alerts],
                            title="worst head state of each layer", max_width=5.0)
    return _img(_png(figure), f"{run.name}: worst head state of each layer at each step")


def _head_states(run: "RunEvents") -> str:
    if "health/heads" not in run.images:
        return '<p class="note">No picture of head states in this run.</p>'
    step, png = run.images["health/heads"]
    return _img(_data_uri(png), f"{run.name}: head states at step {step}")


def _alert_table(runs: Sequence["RunEvents"]) -> str:
    """Every alert of every run, in step order within a run."""
    alerts = [(run, alert) for run in runs for alert in run.alerts]
    if not alerts:
        return '<p class="note">No alert in any run.</p>'
    head = ("run", "step", "layer", "kind", "heads", "severity", "figure", "condition",
            "value", "threshold", "since", "cause")
    rows = []
    for run, alert in alerts:
        severity = html.escape(alert.severity)
        since = (f"{figure_text(alert.since_value)} at step {alert.since}"
                 if alert.since != alert.step else "—")
        cells = [
            f"<td>{html.escape(run.name)}</td>",
            f'<td class="num">{alert.step}</td>',
            f'<td title="{html.escape(alert.layer)}">{html.escape(alert.tag)}</td>',
            f"<td>{html.escape(alert.kind)}</td>",
            f"<td>{html.escape(', '.join(map(str, alert.heads)))}</td>",
            f'<td class="sev-{severity}">{severity}</td>',
            f"<td>{html.escape(alert.figure)} ({html.escape(alert.reduction)})</td>",
            f"<td>{html.escape(alert.condition)}</td>",
            f'<td class="num">{figure_text(alert.value)}</td>',
            f'<td class="num">{figure_text(alert.threshold)}</td>',
            f'<td class="num">{since}</td>',
            f"<td>{html.escape(alert.cause) or '—'}</td>",
        ]
        rows.append(f'<tr title="{html.escape(alert.message)}">{"".join(cells)}</tr>')
    header = "".join(f"<th>{name}</th>" for name in head)
    return (f'<table class="alerts"><tr>{header}</tr>{"".join(rows)}</table>'
            '<p class="note">Point at a row for the alert\'s message, at a layer for its '
            "module.</p>")


def _where_to_look(run: "RunEvents") -> str:
    """A few lines: what the run logged, its first alert, the worst layer at its last step."""
    items = []
    last = run.last_step
    if run.loss is not None:
        _, (steps, values) = run.loss
        items.append(f"{steps.size} steps of loss: {figure_text(values[0])} at step {steps[0]} → "
                     f"{figure_text(values[-1])} at step {steps[-1]}")
    elif last is not None:
        items.append(f"logged up to step {last}")
    model = run.run
    items.append(f"<b>{html.escape(model.headline())}</b>")
    if model.alerts:
        count, layers = len(model.alerts), len(model.layers)
        items.append(f"{count} alert{'s' * (count != 1)} in {layers} layer"
                     f"{'s' * (layers != 1)} ({', '.join(model.layers)}), worst severity "
                     f"{model.worst_severity}")
    health = run.layers("health")
    if health:
        final = {tag: int(values[-1]) for tag, (_, values) in health.items()}
        code = max(final.values())
        label = HEAD_STATES[HeadState(code)][0] if code in HEAD_STATES.keys() else str(code)
        tags = [tag for tag, value in final.items() if value == code]
        shown = ", ".join(tags[:6]) + (f" and {len(tags) - 6} more" if len(tags) > 6 else "")
        items.append(f"at the last sampled step the worst head state is <b>{label}</b> "
                     f"({shown})")
    return "<ul>" + "".join(f"<li>{item}</li>" for item in items) + "</ul>"


_RANK_TAG = re.compile(r"rank(\d+)/max/L\d+$")


def _run_definitions(run: "RunEvents") -> tuple[tuple[str, str], ...]:
    """(tag, meaning) of the run's scalars: as the run wrote them, at its tau and rules; else
    from the registry, at the tau its tags say (the lazy rule's thresholds by name)."""
    if run.definitions:
        return run.definitions
    found = {int(m.group(1)) for tag in run.scalars if (m := _RANK_TAG.match(tag))}
    tau = found.pop() / 100 if len(found) == 1 else None
    return tuple(definitions(tau=tau))


def _definitions(runs: Sequence["RunEvents"]) -> str:
    """What each tag means, at each run's tau and rules: a line that differs between runs is
    given for each, with the runs it holds for."""
    meanings: dict[str, dict[str, list[str]]] = {}
    for run in runs:
        for tag, about in _run_definitions(run):
            meanings.setdefault(tag, {}).setdefault(about, []).append(run.name)
    rows = []
    for tag, by_meaning in meanings.items():
        for about, names in by_meaning.items():
            note = f" ({', '.join(names)})" if len(by_meaning) > 1 else ""
            rows.append((tag, about + note))
    items = "".join(f"<dt>{html.escape(tag)}</dt><dd>{html.escape(about)}</dd>"
                    for tag, about in rows)
    states = "".join(
        f'<dt><span class="swatch" style="background:{colour}"></span>{html.escape(label)}'
        f"</dt><dd>{html.escape(meaning)}</dd>"
        for label, colour, meaning in HEAD_STATES.values())
    return (f"<h2>What the figures mean</h2><dl>{items}</dl>"
            f"<h2>Head states</h2><dl>{states}</dl>"
            '<p class="note">Each figure is measured per head on sampled steps and reduced '
            "over the heads of a layer; <code>_full</code> figures and the logits cover every "
            "token of the measured sequences, rank and columns the first <code>crop</code> "
            "tokens. Alerts fire once, at the first sampled step at which their condition "
            "holds.</p>")


def render_report(runs: Sequence["RunEvents"], *, title: str, source: str = "") -> str:
    """The HTML page of ``runs`` side by side (one column each); ``source`` says where the
    event files were read from. First what answers "which layer, which head, since when":
    where to look, the alerts of every run, the timeline of head health; then the curves."""
    sections = (
        ("Where to look first", _where_to_look),
        ("Alerts", None),
        ("Head health over time", _timeline),
        ("Attention logits", _logit_chart),
        ("Attention entropy", _entropy_chart),
        ("Training loss", _loss_chart),
        ("Head states at the latest picture", _head_states),
    )
    body = []
    for heading, part in sections:
        body.append(f"<h2>{heading}</h2>")
        if part is None:  # one table of every run's alerts, the whole width
            body.append(f'<div class="wide">{_alert_table(runs)}</div>')
            continue
        for run in runs:
            body.append(f'<div class="cell"><h3>{html.escape(run.name)}</h3>{part(run)}</div>')
    note = f"Read from the event files under {html.escape(source)}. " if source else ""
    names = ", ".join(html.escape(run.name) for run in runs)
    return (
        "<!DOCTYPE html>\n"
        f'<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{STYLE}</style></head><body>"
        f"<h1>{html.escape(title)}</h1>"
        f'<p class="note">{note}{len(runs)} run{"s" * (len(runs) != 1)}: {names}. Crosses '
        "mark alerts, on the line of the layer they fired in; dashed lines are alert "
        "thresholds.</p>"
        f'<div class="runs" style="--runs: {len(runs)}">{"".join(body)}</div>'
        f"{_definitions(runs)}</body></html>\n"
    )
