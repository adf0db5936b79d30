"""One model of a run (attn_probe.alerts.Run): what warned first, where and since when, the
same answer in the report, the summary picture and the console; ``info`` alerts never warn.

A real probe watches a model whose only attention module gives the first key about 60 % of every
query's attention (an attention sink, ``info``, in a lazy layer, ``info``): its run has alerts
and no warning, and every output says so.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

import attn_probe
from attn_probe.alerts import Run
from attn_probe.cli import narrate
from attn_probe.cli.demo import DemoConfig, DemoResult
from attn_probe.notices import AttentionWarning
from attn_probe.outputs import plots
from attn_probe.outputs.events import RunEvents, read_run
from attn_probe.outputs.report import render_report
from attn_probe.snapshot import Alert
from reference import read_html
from test_notices import D, T, Fixed


def alert(kind: str, step: int, tag: str, severity: str = "warning", since: int | None = None,
          heads=(0,)) -> Alert:
    figure = {"logit": "logit_spread", "entropy": "entropy_norm_full", "sink": "sink_full",
              "lazy": "rank"}[kind]
    return Alert(kind, f"blocks.{tag}", tag, tuple(heads), step, figure, "max", "above", 1.0,
                 0.5, step if since is None else since, 1.0, f"{tag}: {kind} at {step}",
                 severity=severity)


def test_the_first_warning_is_of_the_first_step_any_warned_and_info_never_warns():
    run = Run("r", (alert("sink", 0, "L10", "info"), alert("entropy", 15, "L2", since=5),
                    alert("logit", 15, "L10", "critical"), alert("logit", 10, "L2", since=0),
                    alert("lazy", 5, "L3", "info")))
    assert [a.step for a in run.alerts] == [0, 5, 10, 15, 15]  # in step order
    first = run.first_warning()
    assert (first.step, first.since, first.kinds, first.tags) == (10, 0, ("logit",), ("L2",))
    assert first.text() == "logit in L2 at step 10 (since step 0)"
    assert run.headline() == "first warning: logit in L2 at step 10 (since step 0)"
    # of one figure: the entropy's first warning, two layers in layer order (L2 before L10)
    assert run.first_warning("entropy_norm_full").alerts[0].step == 15
    both = Run("r", (alert("entropy", 15, "L10"), alert("entropy", 15, "L2")))
    assert both.first_warning().tags == ("L2", "L10") == both.layers
    assert both.first_warning().text() == "entropy in L2 and L10 at step 15"
    # the worst severity by urgency, not by name ("warning" > "critical" as text)
    assert run.worst_severity == "critical"
    assert Run("r", (alert("logit", 5, "L0"), alert("sink", 0, "L0", "info"))
               ).worst_severity == "warning"
    information = Run("r", (alert("sink", 0, "L0", "info"), alert("lazy", 0, "L1", "info")))
    assert information.first_warning() is None and information.warnings == ()
    assert information.headline() == "no warning (2 alerts for information: sink, lazy)"
    assert Run("r").headline() == "no warning" and Run("r").worst_severity is None


def test_the_report_names_the_worst_severity_by_urgency(tmp_path):
    """A run with a warning and then a critical alert: the page says critical."""
    run = RunEvents("r", tmp_path, alerts=(alert("sink", 0, "L00", "info"),
                                           alert("logit", 5, "L01", "warning"),
                                           alert("logit", 10, "L01", "critical")))
    page = read_html_text(render_report([run], title="t"), tmp_path)
    assert "worst severity critical" in page
    assert "first warning: logit in L01 at step 5" in page


def read_html_text(page: str, where: Path) -> str:
    path = where / "page.html"
    path.write_text(page, encoding="utf-8")
    return " ".join(read_html(path).text.split())


def test_a_run_with_only_info_alerts_says_no_warning_everywhere(tmp_path):
    model = nn.Sequential(Fixed(first=3.0))  # about 60 % on key 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with attn_probe.AttentionProbe(model, every=1, log_dir=str(tmp_path / "run"),
                                       history=2) as probe:
            for _ in range(2):
                model(torch.randn(2, T, D))
                probe.step()
    alerts = probe.alerts
    assert alerts and {a.severity for a in alerts} == {"info"}, alerts
    assert {a.kind for a in alerts} == {"sink", "lazy"}
    # the console: the probe warned about nothing, the demo's summary says no warning
    assert not [w for w in caught if issubclass(w.category, AttentionWarning)]
    result = DemoResult(str(tmp_path / "run"), [3.0, 2.9], list(probe.history), 1.0,
                        DemoConfig(name="run", steps=2), alerts)
    summary = narrate.run_summary(result)
    assert "no warning (2 alerts for information: lazy, sink)" in summary
    assert "warnings, the first" not in summary
    assert "no warning" in narrate.what_the_runs_show([result])
    # the report, from the event files alone
    read = read_run(tmp_path / "run", "run")
    assert [(a.kind, a.severity) for a in read.alerts] == [(a.kind, a.severity) for a in alerts]
    page = read_html_text(render_report([read], title="t"), tmp_path)
    assert "no warning" in page and "first warning" not in page
    assert "worst severity info" in page
    # the summary picture: no cross, the legend says no warning
    figure = plots.plot_runs({"run": plots.run_series_for(result.losses, result.snapshots,
                                                            alerts)})
    legend = [text.get_text() for text in figure.legends[0].get_texts()]
    assert legend[0] == "run: no warning (2 alerts for information: lazy, sink)"
    assert not [line for ax in figure.axes for line in ax.get_lines()
                if line.get_marker() == "X" and len(line.get_xdata()) == 1]
    assert np.isfinite(plots.run_series_for(result.losses, result.snapshots).entropy).all()
