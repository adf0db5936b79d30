"""Reading event files back (attn_probe.outputs.events): runs found as TensorBoard finds them,
scalars with one value a step, the latest image, the alerts; crashed and broken files."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from torch.utils.tensorboard import SummaryWriter

from attn_probe.outputs.events import EventsError, find_runs, read_run, read_runs
from attn_probe.outputs.tables import alerts_markdown
from attn_probe.snapshot import Alert

ALERT = Alert("logit", "blocks.3.attn", "L03", (1, 2), 20, "logit_spread", "max", "grew", 621.25,
              300.0, 10, 12.5, "L03 (blocks.3.attn): attention logits grew to 621.2",
              "critical", "query and key norms grew | lower the learning rate")


def write_run(path, *, rewrite_step_1: bool = False) -> None:
    with SummaryWriter(str(path)) as writer:
        for step in range(4):
            writer.add_scalar("train/loss", 5.0 - step, step)
            writer.add_scalar("health/L03", float(step % 3), step)
        writer.add_image("health/heads", np.array([[[0.0]], [[0.5]], [[1.0]]]), 0)
        writer.add_image("health/heads", np.array([[[1.0]], [[0.0]], [[0.0]]]), 3)
        writer.add_text("alerts", alerts_markdown([ALERT]), 20)
    if rewrite_step_1:  # a second writer in the same run (a framework's and the probe's)
        with SummaryWriter(str(path)) as writer:
            writer.add_scalar("train/loss", 42.0, 1)
            writer.add_text("alerts", alerts_markdown([ALERT]), 20)  # the same alert again


def test_a_run_read_back(tmp_path):
    write_run(tmp_path / "a", rewrite_step_1=True)
    run = read_run(tmp_path / "a")
    steps, values = run.scalars["train/loss"]
    # one value a step, ascending: the latest write of step 1 wins
    assert steps.tolist() == [0, 1, 2, 3] and values.tolist() == [5.0, 42.0, 3.0, 2.0]
    assert run.loss[0] == "train/loss" and run.last_step == 3
    assert list(run.layers("health")) == ["L03"]
    step, png = run.images["health/heads"]
    with Image.open(io.BytesIO(png)) as picture:
        assert step == 3 and picture.convert("RGB").getpixel((0, 0)) == (255, 0, 0)
    assert run.alerts == (ALERT,)  # every field, written twice, read once


def test_runs_are_the_directories_that_hold_event_files(tmp_path):
    write_run(tmp_path / "b" / "deeper")
    write_run(tmp_path / "a")
    (tmp_path / "empty").mkdir()
    assert find_runs(tmp_path) == [tmp_path / "a", tmp_path / "b" / "deeper"]
    assert [run.name for run in read_runs(tmp_path)] == ["a", "b/deeper"]
    assert [run.name for run in read_runs(tmp_path / "a")] == ["a"]


def test_a_crashed_run_reads_up_to_its_last_whole_record(tmp_path):
    write_run(tmp_path)
    (path,) = tmp_path.glob("events.out.tfevents.*")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 40])  # the last record cut off
    run = read_run(tmp_path)
    assert run.scalars["train/loss"][0].tolist() == [0, 1, 2, 3]
    assert run.alerts == ()  # the alert table was the last record


def test_what_cannot_be_read_is_an_error_saying_so(tmp_path):
    with pytest.raises(EventsError, match="does not exist"):
        find_runs(tmp_path / "nothing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(EventsError, match="is not a directory"):
        find_runs(tmp_path / "file")
    with pytest.raises(EventsError, match="no TensorBoard event files"):
        find_runs(tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "events.out.tfevents.1.host").write_bytes(b"not an event file" * 50)
    with pytest.raises(EventsError, match="is not a TensorBoard event file"):
        read_runs(tmp_path)
    (broken / "events.out.tfevents.1.host").write_bytes(b"")  # made, nothing written yet
    assert read_run(broken).scalars == {}


def test_layers_read_back_in_layer_order_and_each_head_s_sink_alert_apart(tmp_path):
    """Twelve layers written in a shuffled order, unpadded (``L2``, ``L10``): read back L0 to
    L11, not in text order (L10 before L2). Sink alerts of three heads of one layer at one step
    are three alerts, as the probe fired them."""
    order = np.random.default_rng(0).permutation(12)
    sinks = [Alert("sink", "blocks.2.attn", "L2", (head,), 5, "sink_full", "max", "above",
                   0.5 + head / 10, 0.5, 5, 0.5 + head / 10, f"head {head} became a sink", "info")
             for head in (0, 3, 7)]
    with SummaryWriter(str(tmp_path)) as writer:
        for index in order:
            writer.add_scalar(f"health/L{index}", float(index % 7), 5)
        writer.add_text("alerts", alerts_markdown(sinks), 5)
    run = read_run(tmp_path)
    assert list(run.layers("health")) == [f"L{index}" for index in range(12)]
    assert run.alerts == tuple(sinks)
