"""`attn-probe demo`: three runs (stable; unstable, whose queries and keys take steps 30 times
larger; the same with QK-norm) into one log directory, one TensorBoard run each, a summary per
run, a summary picture and the HTML report.

End to end in a subprocess with tiny options (the logs and how many tags they hold, the head
health pictures, the console, the picture, the report), and in process at settings that collapse
within 15 steps (the demo's width at 64 tokens): the unstable run's event files and report hold
its warnings, the other runs' none, and the console names them.
"""

from __future__ import annotations

import dataclasses
import io
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from attn_probe.cli.demo import RUNS, DemoConfig, demo_configs, run_demo
from attn_probe.cli.main import main, report_demo
from reference import (
    assert_alert_logged,
    check_report,
    logged_alerts,
    read_html,
    read_images,
    read_scalars,
    repo_env,
    scalar_events,
)

#: Figures every run logs for every layer, besides the loss.
PROBE_TAGS = ("rank90/max", "max_logit/max", "max_logit/log10", "entropy_norm_full/mean",
              "health")
#: The most scalar tags a layer may have (the alerts' per-head scalars aside).
TAGS_PER_LAYER = 15


def tags_per_layer(scalars: dict) -> dict[str, int]:
    """Layer (``L00``) -> how many scalar tags end in it."""
    counts: dict[str, int] = {}
    for tag in scalars:
        last = tag.rsplit("/", 1)[-1]
        if re.fullmatch(r"L\d\d", last):
            counts[last] = counts.get(last, 0) + 1
    return counts


def logged_alert(row: dict) -> SimpleNamespace:
    """An alert as the event files' table holds it (read by the tests' own reader)."""
    heads = tuple(int(h) for h in row["heads"].split(", ")) if row["heads"] else ()
    return SimpleNamespace(step=int(row["step"]), tag=row["layer"], kind=row["kind"],
                           heads=heads, severity=row["severity"],
                           cause="" if row["cause"] == "—" else row["cause"],
                           value=float(row["value"]), threshold=float(row["threshold"]),
                           figure=row["figure"], reduction=row["reduction"],
                           condition=row["condition"], since=int(row["since"]),
                           since_value=float(row["since_value"]))


def assert_summary_picture(path):
    with Image.open(path) as png:
        png.load()  # decodes the whole picture
        assert png.format == "PNG"
        width, height = png.size
    assert 800 <= width <= 2000 and 250 <= height <= 1000 and width > 2 * height


def test_demo_subprocess_writes_three_runs_and_a_summary(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "attn_probe.cli", "demo", "--steps", "6", "--every", "2",
         "--pictures-every", "4", "--layers", "2", "--batch-size", "4", "--log-dir", "tb"],
        cwd=tmp_path, env=repo_env(), capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "tensorboard --logdir tb" in done.stdout
    assert "tb/summary.png" in done.stdout.replace("\\", "/")
    assert "tb/report.html" in done.stdout.replace("\\", "/")
    # --steps is every run's length
    steps = {"stable": 6, "unstable": 6, "unstable_qk_norm": 6}
    for name, count in steps.items():
        assert f"{name}: {count} steps in" in done.stdout
        assert f"{name} [" in done.stderr and f"{count}/{count}" in done.stderr  # its bar

    for name, count in steps.items():
        scalars = read_scalars(tmp_path / "tb" / name)
        assert sorted(scalars["train/loss"]) == list(range(count)), name
        assert sorted(scalars["train/lr"]) == list(range(count)), name
        for tag in PROBE_TAGS:
            for layer in ("L00", "L01"):
                assert sorted(scalars[f"{tag}/{layer}"]) == list(range(0, count, 2)), (name, tag)
    lrs = {name: read_scalars(tmp_path / "tb" / name)["train/lr"] for name in steps}
    assert lrs["unstable"] == lrs["stable"] == lrs["unstable_qk_norm"]  # the same schedule
    stable_lr = [lr for _, lr in sorted(lrs["stable"].items())]  # one-cycle: up to 3e-3, down
    assert max(stable_lr) <= 3e-3 * (1 + 1e-6) and stable_lr[-1] < max(stable_lr) / 10

    kinds = {f"alert/{kind}" for kind in ("logit", "entropy", "uniform", "lazy", "sink")}
    for name, count in steps.items():
        run = tmp_path / "tb" / name
        scalars = read_scalars(run)
        # a few cards a person reads: at most 15 per layer; besides them the loss, the learning
        # rate, the count of each kind of alert and, in the run that collapses, per-head
        # scalars of the heads its alerts named
        per_layer = tags_per_layer(scalars)
        assert set(per_layer) == {"L00", "L01"}, per_layer
        assert max(per_layer.values()) <= TAGS_PER_LAYER, (name, per_layer)
        per_head = {tag for tag in scalars if re.search(r"/head/L\d\d/H\d\d$", tag)}
        assert bool(per_head) == (name == "unstable"), (name, per_head)
        assert {tag for tag in scalars if not re.search(r"/L\d\d$", tag)} - per_head == {
            "train/loss", "train/lr", *kinds}, name
        images = read_images(run)
        for tag in ("health/heads", "health/timeline", "collapse_map/rank90"):
            assert [image.step for image in images[tag]] == list(range(0, count, 4)), (name, tag)
            for image in images[tag]:
                with Image.open(io.BytesIO(image.png)) as png:
                    png.load()  # decodes
                    assert png.format == "PNG" and png.size == (image.width, image.height)
    # every alert the event files hold is in the report (the unstable run collapses already)
    logged = {name: [logged_alert(row) for row in logged_alerts(tmp_path / "tb" / name)]
              for name in steps}
    assert logged["unstable"] and not logged["stable"]
    page = check_report(tmp_path / "tb" / "report.html", runs=logged)
    for name, count in steps.items():
        assert f"{name} {count} steps of loss" in page.text
    # per run: the loss, the logits, the entropy, the timeline and the latest head states
    assert len([tag for tag, _ in page.elements if tag == "img"]) == 5 * len(steps)
    assert_summary_picture(tmp_path / "tb" / "summary.png")


def test_demo_runs_option_picks_runs_and_bad_options_are_one_line_errors(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["demo", "--runs", "unstable,nope"])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "'nope'" in err and "stable," in err
    for bad in (["--steps", "0"], ["--every", "0"], ["--pictures-every", "-1"]):
        assert main(["demo", *bad]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"attn-probe demo: error: {bad[0]} must be") and err.count("\n") == 1
    configs = demo_configs(DemoConfig(log_dir="x", steps=40), ["unstable_qk_norm", "stable"])
    assert [(c.name, c.steps, c.qk_norm, c.lr, c.qk_step) for c in configs] == [
        ("unstable_qk_norm", 40, True, 3e-3, 30.0), ("stable", 40, False, 3e-3, 1.0)]
    assert configs[0].log_dir.replace("\\", "/") == "x/unstable_qk_norm"


def test_demo_replaces_its_own_earlier_runs_and_nothing_else(tmp_path, capsys, single_thread):
    """A second demo into the same directory replaces the runs it writes again (TensorBoard
    shows each step once); it deletes nothing it did not write, and refuses, in one line, to
    replace a run directory that holds anything else."""
    log_dir = tmp_path / "tb"
    tiny = ["--steps", "2", "--every", "1", "--pictures-every", "0", "--layers", "1",
            "--batch-size", "1", "--log-dir", str(log_dir)]
    steps = {"stable": [0, 1], "unstable": [0, 1], "unstable_qk_norm": [0, 1]}

    def check_each_step_once():
        for name, want in steps.items():
            scalars = scalar_events(log_dir / name)
            for tag in ("train/loss", "train/lr", "rank90/max/L00", "max_logit/max/L00"):
                assert [step for step, _ in scalars[tag]] == want, (name, tag)
            assert len(list((log_dir / name).glob("events.out.tfevents.*"))) == 1, name

    assert main(["demo", *tiny]) == 0
    out = capsys.readouterr().out
    assert "replacing" not in out
    check_each_step_once()
    (tmp_path / "notes.txt").write_text("mine")  # beside the log directory: not the demo's
    (log_dir / "README").write_text("mine")      # in it, beside the runs: not the demo's either

    assert main(["demo", *tiny]) == 0
    check_each_step_once()
    out = capsys.readouterr().out
    assert out.splitlines()[0] == (f"attn-probe demo: replacing the earlier stable, unstable, "
                                   f"unstable_qk_norm runs in {log_dir}")

    # --runs: only the runs named are replaced; the others' files stay as they were
    kept = {name: sorted((log_dir / name).iterdir()) for name in ("stable", "unstable_qk_norm")}
    assert main(["demo", *tiny, "--runs", "unstable"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == (
        f"attn-probe demo: replacing the earlier unstable run in {log_dir}")
    assert {name: sorted((log_dir / name).iterdir()) for name in kept} == kept
    check_each_step_once()
    # its report is of the run it trained, not of every run under the log directory
    page = read_html(log_dir / "report.html")
    assert len([tag for tag, _ in page.elements if tag == "h3"]) == 6  # one cell a section
    assert "unstable_qk_norm" not in page.text and "unstable" in page.text

    # a file the demo did not write in a run's directory, even one whose name starts as an
    # event file's does: one line, exit 2, nothing deleted
    (log_dir / "unstable" / "events.csv").write_text("mine")
    before = sorted(p for p in tmp_path.rglob("*"))
    assert main(["demo", *tiny]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1, err
    assert err.startswith(f"attn-probe demo: error: {log_dir / 'unstable'} holds 'events.csv', "
                          "which the demo did not write"), err
    assert sorted(p for p in tmp_path.rglob("*")) == before
    assert (tmp_path / "notes.txt").read_text() == (log_dir / "README").read_text() == "mine"
    assert (log_dir / "unstable" / "events.csv").read_text() == "mine"


def test_demo_log_dir_naming_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("mine")
    for log_dir, says in [(tmp_path / "file", "exists and is not a directory"),
                          (tmp_path / "file" / "tb", "cannot make the directory")]:
        assert main(["demo", "--steps", "2", "--log-dir", str(log_dir)]) == 2
        out, err = capsys.readouterr()
        assert out == "" and err.count("\n") == 1, err
        assert err.startswith(f"attn-probe demo: error: --log-dir {log_dir}") and says in err
    assert (tmp_path / "file").read_text() == "mine"


def test_demo_trains_on_one_thread_and_gives_the_others_back(tmp_path):
    """One thread by default (on a busy 2-core machine two were 3-4 times slower), restored
    after the run: the demo may run inside another program."""
    previous, seen = torch.get_num_threads(), []
    torch.set_num_threads(2)
    try:
        config = DemoConfig(log_dir=str(tmp_path), steps=2, n_layer=1, batch_size=1,
                            block_size=8, every=1, pictures_every=0)
        assert config.threads == 1
        run_demo(config, progress=lambda *_: seen.append(torch.get_num_threads()))
        assert seen == [1, 1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)


def test_query_and_key_steps_are_scaled_and_nothing_else():
    """qk_step: after an optimiser step the query and key rows of every block moved exactly
    qk_step times as far as with qk_step 1 from the same state; the value rows and every other
    parameter moved the same."""
    from attn_probe.cli.demo import _scaled_qk_steps
    from attn_probe.models.gpt import GPT, GPTConfig

    moved = {}
    for factor in (1.0, 3.0):
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=32, block_size=8, n_layer=2, n_head=2, n_embd=16))
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        x = torch.randint(0, 32, (2, 9), generator=torch.Generator().manual_seed(1))
        model(x[:, :-1], x[:, 1:])[1].backward()
        with _scaled_qk_steps(model, factor):
            optimizer.step()
        moved[factor] = {n: p.detach() - before[n] for n, p in model.named_parameters()}
    for name, step in moved[1.0].items():
        scaled = moved[3.0][name]
        if "c_attn" in name:
            torch.testing.assert_close(scaled[:32], 3 * step[:32])  # q and k rows
            torch.testing.assert_close(scaled[32:], step[32:])  # v rows
        else:
            torch.testing.assert_close(scaled, step, msg=name)


@pytest.mark.slow
def test_unstable_run_raises_alerts_and_the_others_none(tmp_path, capsys, recwarn,
                                                        single_thread):
    base = DemoConfig(log_dir=str(tmp_path), block_size=64, batch_size=8, n_layer=2,
                      every=5, pictures_every=0, batch_rows=2)
    configs = [dataclasses.replace(c, steps=15) for c in demo_configs(base, RUNS)]
    results = {r.name: r for r in report_demo(configs, str(tmp_path))}
    out, err = capsys.readouterr()

    logged = {name: {(row["kind"], row["layer"]) for row in logged_alerts(tmp_path / name)}
              for name in RUNS}
    assert ("logit", "L00") in logged["unstable"]
    assert not [kind for name in ("stable", "unstable_qk_norm") for kind, _ in logged[name]
                if kind in ("logit", "entropy")]
    for name in RUNS:
        for alert in results[name].alerts:
            assert_alert_logged(tmp_path / name, alert)
    # the report: every alert of every run in its table, and where to look first says when
    # and where the unstable run collapsed
    page = check_report(tmp_path / "report.html",
                        runs={name: result.alerts for name, result in results.items()})
    for name in RUNS:
        scalars = read_scalars(tmp_path / name)
        assert sorted(scalars["train/loss"]) == list(range(15))
        assert all(f"{tag}/L01" in scalars for tag in PROBE_TAGS)

    # the progress bar counts the alerts (the probe warns about none: the demo's on_alert
    # counts them), the run's summary names each warning and says why the first came, the
    # closing paragraph says when and where it came and what QK-norm did
    assert "15/15 " in err and f"alerts {len(results['unstable'].alerts)}" in err
    assert not [w for w in recwarn if "attn_probe:" in str(w.message)]
    unstable = out[out.index("unstable: 15 steps"):out.index("unstable_qk_norm: 15 steps")]
    warned = [a for a in results["unstable"].alerts if a.severity in ("warning", "critical")]
    assert warned and warned[0].tag == "L00" and warned[0].step == 5
    for tag in {alert.tag for alert in warned}:  # a line per layer: its first, then the rest
        mine = [alert for alert in warned if alert.tag == tag]
        (line,) = [line for line in unstable.splitlines() if f" {tag}  step " in line]
        assert f"{mine[0].severity:<8} {mine[0].kind:<8} {tag}  step {mine[0].step:<4} " in line
        for alert in mine[1:]:
            assert f"{alert.kind} {alert.severity} ({alert.step})" in line
    assert " ".join(f"why: {warned[0].cause}".split()) in " ".join(unstable.split())
    for name in ("stable", "unstable_qk_norm"):
        assert "no warning" in out[out.index(f"{name}: 15 steps"):]
    paragraph = " ".join(out[out.index("The stable run"):].split())
    assert f"at step {warned[0].step} the probe warned that L00's" in paragraph
    assert "With QK-norm the same setting raised no warning" in paragraph
    line = page.text[page.text.index("first warning: "):]
    line = line[:line.index(f"at step {warned[0].step}")]
    for alert in (a for a in warned if a.step == warned[0].step):
        assert f"{alert.kind} in" in line and alert.tag in line, (line, alert)
    assert_summary_picture(tmp_path / "summary.png")


def test_short_demos_run_and_a_run_too_short_to_schedule_is_one_line(tmp_path, capsys,
                                                                     single_thread):
    """Any --steps from 2 up trains (at 10, PyTorch's one-cycle schedule with a 10 % warm-up
    divides by zero); 1 is refused in one line. From 15 steps on the schedule is PyTorch's
    one-cycle with 10 % warm-up, as it always was."""
    from attn_probe.cli.demo import one_cycle

    for steps in (2, 3, 9, 10, 11, 14, 15, 40, 150):
        config = DemoConfig(steps=steps)
        lrs = []
        for pct_start in (None, 0.1):
            optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=config.lr)
            if pct_start is None:
                schedule = one_cycle(optimizer, config)
            elif steps >= 15:
                schedule = torch.optim.lr_scheduler.OneCycleLR(
                    optimizer, max_lr=config.lr, total_steps=steps, pct_start=pct_start)
            else:
                break
            lrs.append([])
            for _ in range(steps):
                lrs[-1].append(optimizer.param_groups[0]["lr"])
                optimizer.step()
                schedule.step()
        mine = lrs[0]
        assert all(0 < lr <= config.lr * (1 + 1e-9) for lr in mine), (steps, mine)
        assert mine[0] < max(mine) or steps == 2, (steps, mine)  # it warms up
        if steps >= 15:
            assert mine == lrs[1], steps
    log_dir = tmp_path / "tb"
    assert main(["demo", "--steps", "10", "--runs", "unstable", "--every", "5",
                 "--pictures-every", "0", "--layers", "1", "--batch-size", "1",
                 "--log-dir", str(log_dir)]) == 0
    assert "unstable: 10 steps in" in capsys.readouterr().out
    assert sorted(read_scalars(log_dir / "unstable")["train/loss"]) == list(range(10))
    assert main(["demo", "--steps", "1", "--log-dir", str(log_dir)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert err.startswith("attn-probe demo: error: --steps must be an int >= 2"), err
