"""A Snapshot as tables: per-layer and per-head rows, a terminal table, CSV and JSON files, and
rows of figures as an HTML table."""

from __future__ import annotations

import csv
import html
import math
import json
from pathlib import Path

from ..snapshot import METRICS, Snapshot, finite, percent


def layer_rows(snapshot: Snapshot) -> list[dict]:
    """One row per layer: MaxRank (max over heads of the per-head mean rank@tau) and friends;
    names ending in ``_full`` (and ``max_logit``) cover every token of the sequences, the others
    the matrix of the first ``max_tokens`` tokens."""
    return [
        {
            "layer": layer.tag,
            "module": layer.name,
            "heads": layer.num_heads,
            "sequences": layer.sequences,
            "max_rank": layer.reduce("rank", "max"),
            "mean_rank": layer.reduce("rank", "mean"),
            "min_rank": layer.reduce("rank", "min"),
            "max_columns": layer.reduce("columns", "max"),
            "mean_columns": layer.reduce("columns", "mean"),
            "entropy": layer.reduce("entropy", "mean"),
            "sink": layer.reduce("sink", "mean"),
            "max_logit": layer.reduce("max_logit", "max"),
            "tokens_full": layer.reduce("tokens_full", "max"),
            "max_columns_full": layer.reduce("columns_full", "max"),
            "entropy_full": layer.reduce("entropy_full", "mean"),
            "entropy_norm_full": layer.reduce("entropy_norm_full", "mean"),
            "sink_full": layer.reduce("sink_full", "mean"),
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
               for metric in METRICS},
            "lazy": bool(layer.lazy[h]),
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
            f"{row['layer']:<6} {module:<30} {row['max_rank']:>10.2f} {row['mean_rank']:>9.2f} "
            f"{row['max_columns']:>10.2f} {row['entropy']:>8.3f} {row['sink']:>6.3f} "
            f"{row['max_logit']:>9.1f} {row['lazy_share']:>10.0%}"
            + ("  LAZY" if row["lazy"] else "")
        )
    tokens = {row["tokens_full"] for row in rows if finite(row["tokens_full"])}
    if tokens:
        lines.append(f"max logit: over all {', '.join(f'{t:.0f}' for t in sorted(tokens))} "
                     "tokens of each sequence; the other columns: its attention matrix "
                     "(cropped where max_tokens says)")
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
