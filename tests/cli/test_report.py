"""`attn-probe report LOGDIR`: one self-contained HTML page of the runs under a log directory,
read from the event files alone, parsed back here with html.parser.

Two real runs (tests/unstable_run.py: the unstable one raises alerts within 15 steps, the one
with QK-norm none) logged the way a user logs: the loss and the probe into one SummaryWriter.
"""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch
from torch.utils.tensorboard import SummaryWriter

import attn_probe
import unstable_run
from attn_probe.cli.main import main
from reference import check_report, read_html

STEPS, EVERY = 15, 5


def train(log_dir, qk_norm: bool) -> list:
    """The unstable run (with QK-norm: its cure) for 15 steps, the entropy rule's fast fall on;
    returns the probe's alerts."""
    model = unstable_run.unstable_gpt(qk_norm)
    optimizer = unstable_run.optimizer(model.parameters())
    batches = unstable_run.windows(unstable_run.BATCH * STEPS).view(STEPS, unstable_run.BATCH, -1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the probe warns about each alert
        with SummaryWriter(str(log_dir)) as writer, attn_probe.AttentionProbe(
            model, every=EVERY, capture=attn_probe.CaptureOptions(batch_rows=2),
            alerts=attn_probe.AlertRules(entropy=attn_probe.EntropyRule(fall=0.45)),
            outputs=[attn_probe.TensorBoardOutput(writer=writer, pictures_every=2 * EVERY)],
        ) as probe:
            for step, window in enumerate(batches):
                _, loss = model(window[:, :-1], window[:, 1:])
                optimizer.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), unstable_run.CLIP)
                optimizer.step()
                writer.add_scalar("train/loss", loss.item(), step)
                probe.step(step)
    return probe.alerts


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(log dir, run name -> alerts) of the two runs."""
    root = tmp_path_factory.mktemp("runs")
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        alerts = {"unstable": train(root / "unstable", False),
                  "qk_norm": train(root / "qk_norm", True)}
    finally:
        torch.set_num_threads(previous)
    assert {a.kind for a in alerts["unstable"]} >= {"logit", "entropy"} and not alerts["qk_norm"]
    return root, alerts


def test_report_of_every_run_side_by_side(runs, tmp_path, capsys):
    root, alerts = runs
    out = tmp_path / "page" / "report.html"
    assert main(["report", str(root), "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    page = check_report(out, runs=alerts)  # every alert with its fields; nothing outside
    # side by side: each section has one cell per run, in the runs' order
    headings = [attrs for tag, attrs in page.elements if tag == "h3"]
    assert len(headings) == 6 * 2
    assert "qk_norm" in page.text and page.text.index("qk_norm") < page.text.index("unstable")
    # where to look first: the first warning, its step, kinds and layers
    warned = [a for a in alerts["unstable"] if a.severity in ("warning", "critical")]
    step = min(a.step for a in warned)
    line = page.text[page.text.index("first warning: "):]
    line = line[:line.index(f"at step {step}")]
    for alert in (a for a in warned if a.step == step):
        assert f"{alert.kind} in" in line and alert.tag in line, (line, alert)
    assert "no warning" in page.text  # the QK-norm run
    alts = [attrs["alt"] for tag, attrs in page.elements if tag == "img"]
    for name in alerts:
        # the logit chart shows the figure the logit rule watches: the logit spread
        assert {f"{name}: training loss (train/loss)", f"{name}: logit_spread of every layer",
                f"{name}: normalised entropy of every layer",
                f"{name}: worst head state of each layer at each step",
                f"{name}: head states at step {2 * EVERY}"} <= set(alts)
    # the definitions of the figures the page draws
    for tag in ("max_logit/log10/Lxx", "entropy_norm_full/mean/Lxx", "health/Lxx"):
        assert tag in page.text


def test_report_of_one_run_into_its_directory(runs, tmp_path):
    root, alerts = runs
    run = tmp_path / "unstable"
    shutil.copytree(root / "unstable", run)
    assert main(["report", str(run)]) == 0  # by default LOGDIR/report.html
    check_report(run / "report.html", runs={"unstable": alerts["unstable"]})


def test_report_of_a_run_that_crashed(runs, tmp_path):
    """The last record cut off, as when a process dies while writing: the page shows what the
    file holds."""
    root, alerts = runs
    run = tmp_path / "crashed"
    shutil.copytree(root / "unstable", run)
    (path,) = run.glob("events.out.tfevents.*")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    assert main(["report", str(run)]) == 0
    page = read_html(run / "report.html")
    assert "first warning: " in page.text


@pytest.mark.parametrize("case", ["missing", "a file", "no event files", "not an event file",
                                  "out is a directory"])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, case):
    (tmp_path / "file.txt").write_text("x")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "events.out.tfevents.1.host").write_bytes(b"\x00garbage" * 64)
    good = tmp_path / "good"
    with SummaryWriter(str(good)) as writer:
        writer.add_scalar("train/loss", 1.0, 0)
    argv, says = {
        "missing": ([str(tmp_path / "nowhere")], "does not exist"),
        "a file": ([str(tmp_path / "file.txt")], "is not a directory"),
        "no event files": ([str(tmp_path / "empty")],
                           "no TensorBoard event files"),
        "not an event file": ([str(broken)], "is not a TensorBoard event file"),
        "out is a directory": ([str(good), "--out", str(tmp_path)], "is a directory"),
    }[case]
    (tmp_path / "empty").mkdir()
    assert main(["report", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("attn-probe report: error: ") and err.count("\n") == 1
    assert says in err
