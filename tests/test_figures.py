"""The registry of figures (attn_probe.figures): the reference page is generated from it, and the
tags, table columns and definitions a run writes are the ones it declares, at the run's own tau
and lazy rule."""

from __future__ import annotations

import html
import re

import numpy as np
import pytest

from attn_probe.figures import FIGURES, LAYER_TAGS, SERIES, Figure, markdown, table_columns
from attn_probe.outputs import TensorBoardOutput
from attn_probe.outputs.events import read_run
from attn_probe.outputs.report import render_report
from attn_probe.outputs.tables import layer_rows
from attn_probe.alerts import LazyRule
from attn_probe.snapshot import LayerSummary, Snapshot
from reference import REPO, read_scalars, read_texts


def test_the_reference_page_is_the_registrys():
    page = (REPO / "docs" / "figures.md").read_text()
    assert page == markdown(), (
        "docs/figures.md is out of date: regenerate it with the command at its top")
    # every figure, every tag and every other tag is on it
    for figure in FIGURES.values():
        assert f"| `{figure.name}` |" in page
    for series in SERIES:
        assert f"`{series.prefix('{P}')}/Lxx`" in page
    for tag, _ in LAYER_TAGS:
        assert f"`{tag}`" in page


def test_a_bad_row_is_refused():
    with pytest.raises(ValueError, match="scope must be 'crop' or 'full'"):
        Figure("x", "keys", "window", "mean", "a figure")
    with pytest.raises(ValueError, match="reductions over heads"):
        Figure("x", "keys", "crop", "mean", "a figure", over_heads=("median",))
    with pytest.raises(ValueError, match="headline figure must be logged"):
        Figure("x", "keys", "crop", "mean", "a figure", headline=True)


def one_layer(rule: LazyRule) -> Snapshot:
    """One layer of four heads: every registry figure, rank and columns near 2, judged by the
    lazy ``rule`` (as the alert monitor does)."""
    heads = {name: np.array([2.0, 2.25, 1.75, 8.0]) for name in FIGURES}
    layer = LayerSummary(name="blocks.0.attn", index=0, heads=heads,
                         counts=np.full(4, 2), nonfinite=np.zeros(4, dtype=int),
                         full_counts=np.full(4, 2))
    return Snapshot(step=3, tau=0.8, layers=(rule.judge(layer),), lazy_rule=rule)


def test_the_tags_columns_and_definitions_of_a_run_are_the_registrys(tmp_path):
    rule = LazyRule(max_rank=2.5, max_columns=3.0)
    snapshot = one_layer(rule)
    with TensorBoardOutput(str(tmp_path), per_head=False, pictures_every=0) as output:
        output.write(snapshot)

    # the scalars: one per logged reduction of each figure (tau 0.8: rank80), value checked
    # against the reduction of the per-head values by numpy
    scalars = read_scalars(tmp_path)
    values = np.array([2.0, 2.25, 1.75, 8.0])
    reduce = {"max": values.max(), "mean": values.mean(), "min": values.min(),
              "log10": np.log10(values.max())}
    for series in SERIES:
        assert scalars[series.tag(80, "L00")] == {3: pytest.approx(reduce[series.how])}
    logged = {tag for tag in scalars if tag.endswith("/L00")}
    assert logged == {series.tag(80, "L00") for series in SERIES} | {"lazy_share/L00"}
    # lazy at the run's rule: rank and columns at most 2.5 and 3 in three heads of four
    assert scalars["lazy_share/L00"] == {3: pytest.approx(0.75)}

    # the table: a column for each reduction the registry puts in tables
    (row,) = layer_rows(snapshot)
    for column, figure in table_columns():
        how = column.rpartition("/")[2]
        assert row[column] == pytest.approx(reduce[how]), column

    # the definitions at the run's tau and rule, in TensorBoard's Text tab and in the report
    ((step, text),) = read_texts(tmp_path)["figures/text_summary"]
    assert step == 3
    assert "| rank80/max/Lxx |" in text and "{P}" not in text and "tau" not in text
    assert "mean rank@80% at most 2.5 and mean columns@80% at most 3" in text
    run = read_run(tmp_path)
    assert dict(run.definitions)["lazy_share/Lxx"].startswith("the share of the layer's heads")
    page = html.unescape(render_report([run], title="one run"))
    assert "at most 2.5 and mean columns@80% at most 3" in page
    assert "1.5" not in page
    assert re.search(r"<dt>rank80/max/Lxx</dt><dd>largest over heads: rank@80%", page)


def test_a_run_that_wrote_no_definitions_gets_the_registrys_at_its_tau(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(tmp_path)) as writer:  # as an older version wrote it
        writer.add_scalar("rank90/max/L00", 2.0, 0)
    page = html.unescape(render_report([read_run(tmp_path)], title="old"))
    assert "<dt>rank90/max/Lxx</dt><dd>largest over heads: rank@90%" in page
    assert "at most the lazy rule's max_rank" in page
