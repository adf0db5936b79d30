"""A Snapshot as tables: per-layer and per-head rows, a terminal table, CSV and JSON files, and
rows of figures as an HTML table; and alerts as a markdown table that reads back
(:func:`alerts_markdown`, :func:`parse_alerts_markdown`: the form in which TensorBoard's Text
tab shows them and ``attn-probe report`` reads them)."""

from __future__ import annotations

import csv
import html
import math
import json
import re
from pathlib import Path
from typing import Iterable

from ..figures import FIGURES, table_columns
from ..snapshot import Alert, Snapshot, finite, percent


def layer_rows(snapshot: Snapshot) -> list[dict]:
    """One row per layer: a column ``{figure}/{how}`` for each reduction over heads of each
    figure the registry puts in tables (:func:`~attn_probe.figures.table_columns`; NaN where
    the layer has no such figure), e.g. ``rank/max``, MaxRank; then the share of lazy heads.
    Figures ending in ``_full`` (and the logit figures) cover every token of the sequences,
    the others the attention matrix of the crop."""
    columns = table_columns()
    return [
        {
            "layer": layer.tag,
            "module": layer.name,
            "heads": layer.num_heads,
            "sequences": layer.sequences,
            **{column: layer.reduce(figure, column.rpartition("/")[2])
               for column, figure in columns},
            "lazy_share": layer.lazy_share,
            "lazy": layer.is_lazy,
        }
        for layer in snapshot.layers
    ]


def head_rows(snapshot: Snapshot) -> list[dict]:
    """One row per (layer, head): the per-head means over sequences."""
    return [
        {
            "layer": layer.tag,
            "module": layer.name,
            "head": h,
            "sequences": int(layer.counts[h]),
            **{metric: float(layer.heads[metric][h]) if metric in layer.heads else math.nan
               for metric in FIGURES},
            "lazy": layer.lazy is not None and bool(layer.lazy[h]),
        }
        for layer in snapshot.layers
        for h in range(layer.num_heads)
    ]


def format_table(snapshot: Snapshot) -> str:
    """The per-layer table printed at the end of a run."""
    p = percent(snapshot.tau)
    header = (f"{'layer':<6} {'module':<30} {'max rank' + str(p):>10} {'mean rank':>9} "
              f"{'max cols' + str(p):>10} {'entropy':>8} {'sink':>6} {'max logit':>9} "
              f"{'lazy heads':>10}")
    lines = [header, "-" * len(header)]
    rows = layer_rows(snapshot)
    for row in rows:
        module = row["module"] if len(row["module"]) <= 30 else "…" + row["module"][-29:]
        lines.append(
            f"{row['layer']:<6} {module:<30} {row['rank/max']:>10.2f} {row['rank/mean']:>9.2f} "
            f"{row['columns/max']:>10.2f} {row['entropy/mean']:>8.3f} {row['sink/mean']:>6.3f} "
            f"{row['max_logit/max']:>9.1f} {row['lazy_share']:>10.0%}"
            + ("  LAZY" if row["lazy"] else "")
        )
    tokens = {row["tokens_full/max"] for row in rows if finite(row["tokens_full/max"])}
    if tokens:
        lines.append(f"max logit: over all {', '.join(f'{t:.0f}' for t in sorted(tokens))} "
                     "tokens of each sequence; the other columns: its attention matrix "
                     "(cropped to the first crop tokens)")
    return "\n".join(lines)


def _clean(value):
    return None if isinstance(value, float) and not finite(value) else value


def write_tables(snapshot: Snapshot, out: str | Path) -> list[Path]:
    """``layers.csv``, ``heads.csv`` and ``profile.json`` in ``out``; returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, rows in (("layers.csv", layer_rows(snapshot)), ("heads.csv", head_rows(snapshot))):
        with open(out / name, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else [])
            writer.writeheader()
            writer.writerows(rows)
        written.append(out / name)
    document = {
        "tau": snapshot.tau,
        "max_rank_profile": [_clean(float(v)) for v in snapshot.max_rank_profile()],
        "lazy_layers": [layer.name for layer in snapshot.layers if layer.is_lazy],
        "layers": [{k: _clean(v) for k, v in row.items()} for row in layer_rows(snapshot)],
        "heads": [{k: _clean(v) for k, v in row.items()} for row in head_rows(snapshot)],
    }
    (out / "profile.json").write_text(json.dumps(document, indent=2))
    written.append(out / "profile.json")
    return written


def html_table(rows: list[dict], columns: dict[str, str]) -> str:
    """``rows`` as an HTML ``<table>``: one column per key of ``columns`` (key -> header, both
    escaped), numbers written with 3 significant digits (empty for NaN), right-aligned."""

    def cell(value: object) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if finite(value) else ""
        return html.escape(str(value))

    pad = 'style="padding: 1px 8px; text-align: right"'
    head = "".join(f"<th {pad}>{html.escape(title)}</th>" for title in columns.values())
    body = "".join(
        "<tr>" + "".join(f"<td {pad}>{cell(row.get(key, ''))}</td>" for key in columns) + "</tr>"
        for row in rows
    )
    return (f'<table style="border-collapse: collapse"><thead><tr>{head}</tr></thead>'
            f"<tbody>{body}</tbody></table>")


#: The columns of :func:`alerts_markdown`: header -> the :class:`~attn_probe.snapshot.Alert` field.
ALERT_COLUMNS = {
    "step": "step", "layer": "tag", "module": "layer", "kind": "kind", "severity": "severity",
    "heads": "heads", "figure": "figure", "reduction": "reduction", "condition": "condition",
    "value": "value", "threshold": "threshold", "since": "since", "since_value": "since_value",
    "cause": "cause", "message": "message",
}


def _cell(value: object) -> str:
    if isinstance(value, tuple):
        value = ", ".join(str(v) for v in value)
    elif isinstance(value, float):
        value = format(value, ".7g")  # float32 precision, as TensorBoard keeps scalars
    text = " ".join(str(value).split())  # one line: a markdown row cannot hold a newline
    return text.replace("\\", "\\\\").replace("|", "\\|")


def alerts_markdown(alerts: Iterable[Alert]) -> str:
    """A markdown table of ``alerts``, one row each with every field of
    :class:`~attn_probe.snapshot.Alert` (:data:`ALERT_COLUMNS`); :func:`parse_alerts_markdown`
    reads it back."""
    fields = list(ALERT_COLUMNS.values())
    lines = ["| " + " | ".join(ALERT_COLUMNS) + " |", "|" + " --- |" * len(fields)]
    lines += ["| " + " | ".join(_cell(getattr(alert, f)) for f in fields) + " |"
              for alert in alerts]
    return "\n".join(lines)


_SPLIT = re.compile(r"(?<!\\)((?:\\\\)*)\|")


def _cells(line: str) -> list[str]:
    """The cells of one markdown table row (``\\|`` is a ``|`` in a cell, ``\\\\`` a backslash)."""
    inner = line.strip()[1:-1] if line.strip().startswith("|") else line.strip()
    # split at each | that an even number of backslashes precedes
    parts, start = [], 0
    for match in _SPLIT.finditer(inner):
        parts.append(inner[start:match.end() - 1])
        start = match.end()
    parts.append(inner[start:])
    unescape = lambda cell: re.sub(r"\\(.)", r"\1", cell.strip())  # noqa: E731
    return [unescape(cell) for cell in parts]


def markdown_rows(text: str) -> list[list[str]]:
    """The cells of each row of a markdown table in ``text``, its header and separator left
    out (other text is ignored)."""
    lines = [line for line in text.splitlines() if line.strip().startswith("|")]
    return [_cells(line) for line in lines[2:]]


def parse_alerts_markdown(text: str) -> list[Alert]:
    """The alerts of a table written by :func:`alerts_markdown` (other text is ignored; a table
    whose header is not :data:`ALERT_COLUMNS` gives none)."""
    lines = [line for line in text.splitlines() if line.strip().startswith("|")]
    if len(lines) < 2 or _cells(lines[0]) != list(ALERT_COLUMNS):
        return []
    alerts = []
    for line in lines[2:]:
        row = dict(zip(ALERT_COLUMNS.values(), _cells(line)))
        if len(row) != len(ALERT_COLUMNS):
            continue
        alerts.append(Alert(
            kind=row["kind"], layer=row["layer"], tag=row["tag"],
            heads=tuple(int(h) for h in row["heads"].split(",") if h.strip()),
            step=int(row["step"]), figure=row["figure"], reduction=row["reduction"],
            condition=row["condition"], value=float(row["value"]),
            threshold=float(row["threshold"]), since=int(row["since"]),
            since_value=float(row["since_value"]), message=row["message"],
            severity=row["severity"], cause=row["cause"],
        ))
    return alerts
