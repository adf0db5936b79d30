"""Alerts: each kind's rule on hand-made figures, and real training runs that collapse or don't.

The training runs use the demo's GPT at the demo's width on Python source: a learning rate of
3e-2 without warm-up makes layer 0's logits grow past 300 and its entropy collapse within ten
steps; the same run with QK-norm, and a one-cycle run at 3e-3, do neither. The logged figures are
read back from the event files, and each alert must sit at the first sampled step at which its
figure crossed the threshold.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import attn_probe
from attn_probe.aggregate import HeadAccumulator
from attn_probe.alerts import AlertMonitor, AlertRules, EntropyRule, LogitRule, SinkRule
from attn_probe.snapshot import Snapshot
from reference import read_scalars
from unstable_run import BATCH, CLIP, WEIGHT_DECAY, unstable_gpt, windows


def layer_figures(heads: int, **per_head) -> dict[str, torch.Tensor]:
    """One sequence's figures for ``heads`` heads: healthy defaults, overridden per head."""
    base = dict(rank=5.0, columns=8.0, entropy=2.0, sink=0.1, dominant=3, columns_full=20.0,
                entropy_full=3.0, entropy_norm_full=0.6, sink_full=0.1, sink_logit_full=0.0,
                dominant_full=3, tokens_full=64, max_logit=10.0)
    base.update(per_head)
    figures = {}
    for name, value in base.items():
        value = torch.as_tensor(value, dtype=torch.float64).expand(heads).reshape(1, heads)
        integer = name in ("rank", "columns", "dominant", "columns_full", "dominant_full")
        figures[name] = value.long() if integer else value.clone()
    return figures


def snapshot_of(step: int, *layers: dict) -> Snapshot:
    accumulator = HeadAccumulator()
    names = [f"m.{i}.attn" for i in range(len(layers))]
    for name, figures in zip(names, layers):
        accumulator.update(name, figures)
    return Snapshot(step=step, tau=0.9, layers=accumulator.compute(names))


def test_each_rule_fires_past_its_threshold_only():
    rules = AlertRules(entropy=EntropyRule(0.1), logit=LogitRule(300.0), sink=SinkRule(0.5))
    healthy = layer_figures(4)
    lazy = layer_figures(4, rank=1.0, columns=1.0)
    collapsed = layer_figures(4, entropy_norm_full=[0.02, 0.05, 0.2, 0.1])
    borderline = layer_figures(4, entropy_norm_full=0.1, max_logit=300.0, sink_full=0.49)
    growing = layer_figures(4, max_logit=[12.0, 301.0, 40.0, 900.0])
    sinking = layer_figures(4, sink_full=[0.1, 0.5, 0.9, 0.2])
    snapshot = snapshot_of(7, healthy, lazy, collapsed, borderline, growing, sinking)
    found = {(a.kind, a.tag): a for layer in snapshot.layers
             for a in rules.check(layer, snapshot.step, snapshot.tau)}
    assert set(found) == {("lazy", "L01"), ("entropy", "L02"), ("logit", "L04"),
                          ("sink", "L05")}
    entropy = found[("entropy", "L02")]
    assert entropy.value == pytest.approx(np.mean([0.02, 0.05, 0.2, 0.1]))
    assert entropy.threshold == 0.1 and entropy.step == 7 and "L02" in entropy.message
    logit = found[("logit", "L04")]
    assert logit.value == 900.0 and logit.heads == (1, 3)
    assert found[("lazy", "L01")].heads == (0, 1, 2, 3)
    sinks = [a for layer in snapshot.layers for a in rules.check(layer, 7, 0.9)
             if a.kind == "sink"]
    assert [(a.heads, a.value) for a in sinks] == [((1,), 0.5), ((2,), 0.9)]


def test_rules_can_be_turned_off_and_validate_their_thresholds():
    snapshot = snapshot_of(0, layer_figures(2, rank=1.0, columns=1.0, max_logit=1e4,
                                            entropy_norm_full=0.0, sink_full=1.0))
    off = AlertRules(lazy=None, entropy=None, logit=None, sink=None)
    assert off.check(snapshot.layers[0], 0, 0.9) == []
    for bad in (lambda: EntropyRule(0.0), lambda: EntropyRule(1.5), lambda: LogitRule(-1.0),
                lambda: SinkRule(0.0)):
        with pytest.raises(ValueError):
            bad()


def test_monitor_fires_once_per_kind_and_layer_and_sink_once_per_head():
    monitor = AlertMonitor(AlertRules())
    first = monitor.update(snapshot_of(0, layer_figures(3, max_logit=500.0,
                                                        sink_full=[0.9, 0, 0])))
    again = monitor.update(snapshot_of(5, layer_figures(3, max_logit=800.0,
                                                        sink_full=[0.9, 0.8, 0])))
    assert [(a.kind, a.step, a.heads) for a in first] == [("logit", 0, (0, 1, 2)),
                                                          ("sink", 0, (0,))]
    assert [(a.kind, a.step, a.heads) for a in again] == [("sink", 5, (1,))]
    assert monitor.fired == first + again


def test_figures_without_full_context_raise_no_entropy_or_logit_alert():
    """A user adapter that returns only the matrix gives no q and k: no full-context figures,
    hence no opinion on entropy, logits or sinks (NaN never crosses a threshold)."""
    crop_only = {k: v for k, v in layer_figures(2).items()
                 if not k.endswith("_full") and k != "max_logit"}
    snapshot = snapshot_of(0, crop_only)
    assert np.isnan(snapshot.layers[0].reduce("max_logit", "max"))
    assert AlertRules().check(snapshot.layers[0], 0, 0.9) == []


# ------------------------------------------------------------------------ real training runs

EVERY, STEPS, THRESHOLDS = 5, 20, {"logit": 300.0, "entropy": 0.1}


def train(log_dir, *, lr: float, qk_norm: bool = False, one_cycle: bool = False):
    """The unstable run (tests/unstable_run.py) at learning rate ``lr``; returns the alerts."""
    model = unstable_gpt(qk_norm)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=WEIGHT_DECAY)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, total_steps=STEPS, pct_start=0.1) if one_cycle else None
    batches = windows(BATCH * STEPS).view(STEPS, BATCH, -1)
    seen = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with attn_probe.AttentionProbe(model, log_dir=str(log_dir), every=EVERY,
                                       max_sequences=2, images_every=0,
                                       on_alert=lambda alert, snapshot: seen.append(alert)
                                       ) as probe:
            for step, window in enumerate(batches):
                _, loss = model(window[:, :-1], window[:, 1:])
                optimizer.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
                optimizer.step()
                if schedule is not None:
                    schedule.step()
                probe.step(step)
    assert seen == probe.alerts
    return probe.alerts


def first_crossing(series: dict[int, float], kind: str) -> int | None:
    crossed = [step for step, value in sorted(series.items())
               if (value > THRESHOLDS[kind] if kind == "logit" else value < THRESHOLDS[kind])]
    return crossed[0] if crossed else None


@pytest.mark.slow
def test_unstable_run_raises_logit_and_entropy_alerts_at_the_first_step_after(tmp_path,
                                                                             single_thread):
    alerts = train(tmp_path, lr=3e-2)
    scalars = read_scalars(tmp_path)
    fired = {(a.kind, a.tag): a for a in alerts if a.kind in THRESHOLDS}
    assert ("logit", "L00") in fired and ("entropy", "L00") in fired
    for (kind, tag), alert in fired.items():
        series = scalars[f"max_logit/max/{tag}" if kind == "logit"
                         else f"entropy_norm_full/mean/{tag}"]
        assert alert.step == first_crossing(series, kind), (kind, tag, series)
        assert alert.value == pytest.approx(series[alert.step], rel=1e-6)
        # the marker scalar sits at the step of the alert, nowhere else
        assert scalars[f"alert/{kind}/{tag}"] == {alert.step: pytest.approx(alert.value,
                                                                             rel=1e-6)}
    for tag in ("L00", "L01"):
        for kind in THRESHOLDS:
            series = scalars[f"max_logit/max/{tag}" if kind == "logit"
                             else f"entropy_norm_full/mean/{tag}"]
            assert ((kind, tag) in fired) == (first_crossing(series, kind) is not None)


@pytest.mark.slow
@pytest.mark.parametrize("setting", ["qk_norm", "one_cycle"])
def test_stable_and_qk_norm_runs_raise_no_alert(tmp_path, single_thread, setting):
    options = dict(lr=3e-2, qk_norm=True) if setting == "qk_norm" else dict(lr=3e-3,
                                                                           one_cycle=True)
    alerts = train(tmp_path, **options)
    assert [a for a in alerts if a.kind in THRESHOLDS] == []
    scalars = read_scalars(tmp_path)
    assert not [tag for tag in scalars if tag.startswith(("alert/logit", "alert/entropy"))]
    assert max(max(scalars[f"max_logit/max/L0{i}"].values()) for i in range(2)) < 100


def test_head_states_follow_the_rules():
    from attn_probe.alerts import head_states
    from attn_probe.snapshot import HeadState

    rules = AlertRules(entropy=EntropyRule(0.1), logit=LogitRule(300.0), sink=SinkRule(0.5))
    layer = snapshot_of(0, layer_figures(
        6, entropy_norm_full=[0.6, 0.3, 0.995, 0.05, 0.6, 0.6],
        sink_full=[0.1, 0.1, 0.1, 0.1, 0.7, 0.1],
        max_logit=[10.0, 10.0, 10.0, 10.0, 10.0, 500.0])).layers[0]
    assert head_states(layer, rules).tolist() == [
        HeadState.HEALTHY, HeadState.SHARP, HeadState.UNIFORM, HeadState.ONE_HOT,
        HeadState.SINK, HeadState.EXPLODING]
