"""Tables (attn_probe.outputs.tables): per-layer and per-head rows, the terminal table, and the
CSV and JSON files read back, for a Snapshot built by hand."""

from __future__ import annotations

import dataclasses
import csv
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from attn_probe.outputs.tables import (
    alerts_markdown,
    format_table,
    head_rows,
    layer_rows,
    parse_alerts_markdown,
    write_tables,
)
from attn_probe.alerts import LazyRule
from attn_probe.figures import FIGURES as REGISTRY
from attn_probe.snapshot import (
    CONDITIONS,
    SEVERITIES,
    Alert,
    LayerSummary,
    Snapshot,
)
from reference import markdown_rows

METRICS = tuple(REGISTRY)

NAN = float("nan")

# Per-head figures of three layers. Layer 1 is lazy (every head at rank 1 and one column);
# head 1 of layer 2 never saw finite attention (NaN figures, no sequence).
FIGURES = {
    "blocks.0.attn": dict(rank=[3.5, 6.25, 2.0], columns=[4.0, 7.5, 2.5],
                          entropy=[1.25, 2.5, 0.75], sink=[0.125, 0.25, 0.5],
                          first_key_dominant=[0.0, 0.5, 1.0], counts=[4, 4, 4]),
    "blocks.1.attn": dict(rank=[1.0, 1.25, 1.0], columns=[1.0, 1.0, 1.5],
                          entropy=[0.0625, 0.125, 0.0], sink=[0.875, 0.75, 1.0],
                          first_key_dominant=[1.0, 1.0, 1.0], counts=[4, 4, 4]),
    "blocks.2.attn": dict(rank=[2.0, NAN, 1.0], columns=[3.0, NAN, 1.0],
                          entropy=[0.5, NAN, 0.25], sink=[0.5, NAN, 0.25],
                          first_key_dominant=[0.25, NAN, 0.5], counts=[4, 0, 4],
                          nonfinite=[0, 4, 0]),
}


def by_hand() -> Snapshot:
    rule = LazyRule()
    layers = []
    for index, (name, f) in enumerate(FIGURES.items()):
        heads = {m: np.array(f[m], dtype=float) for m in METRICS if m in f}
        counts = np.array(f["counts"])
        layers.append(rule.judge(LayerSummary(
            name=name, index=index, heads=heads, counts=counts,
            nonfinite=np.array(f.get("nonfinite", [0, 0, 0])))))
    return Snapshot(step=0, tau=0.9, layers=tuple(layers))


def expected_layer(name: str) -> dict:
    f = FIGURES[name]
    has = np.array(f["counts"]) > 0
    rank, columns = np.array(f["rank"])[has], np.array(f["columns"])[has]
    lazy = (rank <= 1.5) & (columns <= 1.5)
    return {
        "rank/max": rank.max(), "rank/mean": rank.mean(), "rank/min": rank.min(),
        "columns/max": columns.max(), "columns/mean": columns.mean(),
        "entropy/mean": np.array(f["entropy"])[has].mean(),
        "sink/mean": np.array(f["sink"])[has].mean(),
        "lazy_share": lazy.mean(), "sequences": max(f["counts"]),
    }


def test_layer_rows():
    rows = layer_rows(by_hand())
    assert [row["layer"] for row in rows] == ["L00", "L01", "L02"]
    assert [row["module"] for row in rows] == list(FIGURES)
    assert [row["heads"] for row in rows] == [3, 3, 3]
    for row, name in zip(rows, FIGURES):
        for key, value in expected_layer(name).items():
            assert row[key] == pytest.approx(value), (name, key)
    assert [row["lazy"] for row in rows] == [False, True, False]


def test_head_rows():
    rows = head_rows(by_hand())
    assert len(rows) == 9
    assert [(row["layer"], row["head"]) for row in rows[:4]] == [
        ("L00", 0), ("L00", 1), ("L00", 2), ("L01", 0)]
    for row in rows:
        f = FIGURES[row["module"]]
        h = row["head"]
        assert row["sequences"] == f["counts"][h]
        for metric in METRICS:
            want = f[metric][h] if metric in f else NAN  # no full-context figures here
            assert row[metric] == pytest.approx(want, nan_ok=True), (row, metric)
    assert [row["lazy"] for row in rows if row["layer"] == "L01"] == [True, True, True]
    assert math.isnan(rows[7]["rank"]) and rows[7]["sequences"] == 0


def test_format_table():
    text = format_table(by_hand())
    header, rule, *lines = text.splitlines()
    assert "max rank90" in header and "max cols90" in header and "lazy heads" in header
    assert set(rule) == {"-"} and len(rule) == len(header)
    assert len(lines) == 3
    assert lines[0].split()[:3] == ["L00", "blocks.0.attn", "6.25"]
    assert lines[1].endswith("100%  LAZY")
    assert "LAZY" not in lines[0] and "LAZY" not in lines[2]
    assert lines[2].split()[2:4] == ["2.00", "1.50"]  # max and mean rank over the heads with data
    long = Snapshot(step=0, tau=0.8, layers=(
        LayerSummary(name="model." * 10 + "attn", index=0,
                     heads={m: np.ones(1) for m in METRICS}, counts=np.ones(1, dtype=int),
                     nonfinite=np.zeros(1, dtype=int), lazy=np.ones(1, dtype=bool)),))
    table = format_table(long)
    line = table.splitlines()[2]
    assert "max rank80" in table and "…" in line and line.split()[1].endswith(".attn")


def test_write_tables_read_back(tmp_path):
    snapshot = by_hand()
    written = write_tables(snapshot, tmp_path / "out")
    assert [p.name for p in written] == ["layers.csv", "heads.csv", "profile.json"]

    with open(tmp_path / "out" / "layers.csv", newline="") as f:
        layers = list(csv.DictReader(f))
    for row, name in zip(layers, FIGURES):
        assert row["module"] == name
        for key, value in expected_layer(name).items():
            assert float(row[key]) == pytest.approx(value), (name, key)
    assert [row["lazy"] for row in layers] == ["False", "True", "False"]

    with open(tmp_path / "out" / "heads.csv", newline="") as f:
        heads = list(csv.DictReader(f))
    assert len(heads) == 9
    for row in heads:
        figures = FIGURES[row["module"]]
        h = int(row["head"])
        assert int(row["sequences"]) == figures["counts"][h]
        for metric in METRICS:
            want = figures[metric][h] if metric in figures else NAN
            assert float(row[metric]) == pytest.approx(want, nan_ok=True)

    def no_nan(token):
        raise AssertionError(f"{token} in JSON")

    document = json.loads((tmp_path / "out" / "profile.json").read_text(),
                          parse_constant=no_nan)  # strict JSON: NaN is written as null
    assert document["tau"] == 0.9
    assert document["max_rank_profile"] == [6.25, 1.25, 2.0]
    assert document["lazy_layers"] == ["blocks.1.attn"]
    assert [row["module"] for row in document["layers"]] == list(FIGURES)
    for row, name in zip(document["layers"], FIGURES):
        for key, value in expected_layer(name).items():
            assert row[key] == pytest.approx(value), (name, key)
    assert [row["lazy"] for row in document["layers"]] == [False, True, False]
    missing = document["heads"][7]
    assert (missing["module"], missing["head"]) == ("blocks.2.attn", 1)
    assert all(missing[metric] is None for metric in METRICS)
    assert missing["sequences"] == 0 and missing["lazy"] is False


def test_json_writes_null_for_a_layer_without_data(tmp_path):
    empty = LayerSummary(name="dead", index=0, heads={m: np.full(2, NAN) for m in METRICS},
                         counts=np.zeros(2, dtype=int), nonfinite=np.full(2, 3),
                         lazy=np.zeros(2, dtype=bool))
    write_tables(Snapshot(step=0, tau=0.9, layers=(empty,)), tmp_path)
    document = json.loads((tmp_path / "profile.json").read_text())
    assert document["max_rank_profile"] == [None]
    (row,) = document["layers"]
    for key in ("rank/max", "rank/mean", "rank/min", "entropy/mean", "sink/mean", "lazy_share"):
        assert row[key] is None, key
    assert row["lazy"] is False and document["lazy_layers"] == []


def test_write_tables_of_a_snapshot_without_layers(tmp_path):
    # the data model allows a snapshot without layers, and format_table copes with it
    empty = Snapshot(step=0, tau=0.9, layers=())
    assert len(format_table(empty).splitlines()) == 2
    write_tables(empty, tmp_path)
    with open(tmp_path / "layers.csv", newline="") as f:
        assert list(csv.DictReader(f)) == []
    assert json.loads((tmp_path / "profile.json").read_text())["layers"] == []


def test_html_table_escapes_and_leaves_nan_empty():
    import html.parser

    from attn_probe.outputs.tables import html_table

    cells: list[str] = []

    class Cells(html.parser.HTMLParser):
        def handle_data(self, data):
            cells.append(data)

    text = html_table([{"layer": "L00 <a&b>", "rank": 2.34567, "lazy": True},
                       {"layer": "L01", "rank": float("nan"), "lazy": False}],
                      {"layer": "layer", "rank": "rank@90%"})
    Cells().feed(text)
    assert cells == ["layer", "rank@90%", "L00 <a&b>", "2.35", "L01"]
    assert text.count("<tr>") == 3 and text.count("<td ") == 4  # the NaN cell is empty


# ------------------------------------------------------------------- alerts as a markdown table

text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)


@settings(max_examples=60, deadline=None)
@given(kind=text, module=text, message=text, cause=text, severity=st.sampled_from(SEVERITIES),
       heads=st.lists(st.integers(0, 63), max_size=5), step=st.integers(0, 10**7),
       value=st.floats(allow_nan=False, allow_infinity=False, width=32),
       threshold=st.floats(allow_nan=True, allow_infinity=True),
       figure=text, reduction=st.sampled_from(["max", "mean", "min"]),
       condition=st.sampled_from(CONDITIONS), since=st.integers(0, 10**7),
       since_value=st.floats(allow_nan=True, allow_infinity=False, width=32))
def test_alerts_markdown_reads_back(kind, module, message, cause, severity, heads, step, value,
                                    threshold, figure, reduction, condition, since, since_value):
    """Every field of an alert survives the table, whatever its text holds (pipes, backslashes,
    newlines become one line: a table row cannot hold more); the tests' own reader of markdown
    tables finds the same cells."""
    alert = Alert(kind, module, "L07", tuple(heads), step, figure, reduction, condition, value,
                  threshold, since, since_value, message, severity, cause)
    table = alerts_markdown([alert, alert])
    one_line = lambda s: " ".join(s.split())  # noqa: E731
    for back in parse_alerts_markdown(table):
        assert (back.kind, back.layer, back.message, back.cause, back.figure) == tuple(
            one_line(s) for s in (kind, module, message, cause, figure))
        assert (back.tag, back.heads, back.step, back.severity) == ("L07", tuple(heads), step,
                                                                    severity)
        assert (back.reduction, back.condition, back.since) == (reduction, condition, since)
        assert back.value == pytest.approx(value, rel=1e-6, abs=1e-30)
        assert (math.isnan(back.since_value) if math.isnan(since_value)
                else back.since_value == pytest.approx(since_value, rel=1e-6, abs=1e-30))
        assert (math.isnan(back.threshold) if math.isnan(threshold)
                else back.threshold == pytest.approx(threshold, rel=1e-6))
    rows = markdown_rows(table)
    assert len(rows) == 2 and rows[0]["module"] == one_line(module)
    assert rows[0]["message"] == one_line(message) and rows[0]["cause"] == one_line(cause)


def test_a_table_of_something_else_has_no_alerts():
    assert parse_alerts_markdown("| a | b |\n| --- | --- |\n| 1 | 2 |") == []
    assert parse_alerts_markdown("no table here") == []
    assert parse_alerts_markdown(alerts_markdown([])) == []


def test_layers_no_lazy_rule_judged_have_no_lazy_head():
    """``AlertRules(lazy=None)``: the tables say no head is lazy and no share is known."""
    snapshot = by_hand()
    unjudged = Snapshot(step=0, tau=0.9, layers=tuple(
        dataclasses.replace(layer, lazy=None, is_lazy=False) for layer in snapshot.layers))
    assert not any(row["lazy"] for row in head_rows(unjudged))
    assert all(math.isnan(row["lazy_share"]) and not row["lazy"]
               for row in layer_rows(unjudged))
