"""Alerts of real training runs that collapse or don't (the rules on hand-made figures:
tests/test_alert_rules.py).

The runs use the demo's GPT at the demo's width on Python source: a learning rate of 3e-2 without
warm-up makes layer 0's logits grow within ten steps and its entropy collapse; the same run with
QK-norm, and a one-cycle run at 3e-3, do neither. Each alert must sit at the first sampled step at
which its rule's condition holds, recomputed here from the recorded figures.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import attn_probe
from attn_probe.alerts import AlertRules
from reference import assert_alert_logged
from unstable_run import BATCH, CLIP, WEIGHT_DECAY, unstable_gpt, windows


# ------------------------------------------------------------------------ real training runs

EVERY, STEPS = 5, 20
RULES = AlertRules()


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
        with attn_probe.AttentionProbe(
            model, every=EVERY, on_alert=lambda alert, snapshot: seen.append(alert),
            capture=attn_probe.CaptureOptions(batch_rows=2),
            outputs=[attn_probe.TensorBoardOutput(str(log_dir), pictures_every=0)], history=1000,
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
    return probe.alerts, list(probe.history)


def window(history, i: int, steps: int) -> list:
    """The measurements before ``history[i]`` within ``steps`` training steps of it (the one
    before it when the interval is coarser): what a rule's window looks back on."""
    before = [s for s in history[:i] if history[i].step - s.step <= steps]
    return before or history[max(0, i - 1):i]


def logit_condition(history, tag: str) -> list[tuple[int, tuple[int, ...]]]:
    """(step, heads) wherever the logit rule's condition holds for layer ``tag``: the heads past
    ``critical``, or else those whose spread is at least ``min_spread`` and ``growth`` times their
    own lowest over the ``window`` steps before (counted from ``base``)."""
    rule = RULES.logit
    found = []
    for i, snapshot in enumerate(history):
        spread = snapshot.layer(tag).heads["logit_spread"]
        over = tuple(h for h, v in enumerate(spread) if v >= rule.critical)
        before = window(history, i, rule.window)
        grown = tuple(h for h, v in enumerate(spread) if before and v >= rule.min_spread
                      and v >= rule.growth * max(min(s.layer(tag).heads["logit_spread"][h]
                                                     for s in before), rule.base))
        if over or grown:
            found.append((snapshot.step, over or grown))
    return found


def entropy_condition(history, tag: str) -> list[tuple[int, tuple[int, ...]]]:
    """(step, ()) wherever the entropy rule's condition holds for layer ``tag``: a mean below
    ``warning``, or (with ``fall`` set) a fall of at least ``fall`` within ``window`` steps to
    at most ``fall_to``."""
    rule = RULES.entropy
    found = []
    for i, snapshot in enumerate(history):
        value = snapshot.layer(tag).reduce("entropy_norm_full", "mean")
        before = [s.layer(tag).reduce("entropy_norm_full", "mean")
                  for s in window(history, i, rule.window)]
        fell = (rule.fall is not None and before and max(before) - value >= rule.fall
                and value <= rule.fall_to)
        if value < rule.warning or fell:
            found.append((snapshot.step, ()))
    return found


#: What each rule watches: its figure and the reduction over a layer's heads (docs/alerts.md).
WATCHES = {"logit": ("logit_spread", "max"), "entropy": ("entropy_norm_full", "mean")}


def assert_says_what_it_measured(alert, history) -> None:
    """The alert's figure, value, window and condition are what its rule computed, recomputed
    from the recorded figures of its layer (the logit rule's over the heads it names)."""
    figure, how = WATCHES[alert.kind]
    assert (alert.figure, alert.reduction) == (figure, how), alert
    by_step = {s.step: s.layer(alert.tag) for s in history}
    if alert.kind == "logit":
        values = {step: max(layer.heads[figure][h] for h in alert.heads)
                  for step, layer in by_step.items()}
    else:
        values = {step: layer.reduce(figure, how) for step, layer in by_step.items()}
    assert alert.value == pytest.approx(values[alert.step])
    assert alert.since_value == pytest.approx(values[alert.since])
    rule = getattr(RULES, alert.kind)
    assert alert.step - max(rule.window, EVERY) <= alert.since <= alert.step
    if alert.kind == "logit" and alert.severity == "critical":
        assert (alert.condition, alert.threshold) == ("above", rule.critical)
        assert alert.value >= alert.threshold and alert.since == alert.step
    elif alert.kind == "logit":  # grown `growth` times within the window, to `min_spread`
        assert (alert.condition, alert.threshold) == ("grew", rule.min_spread)
        assert alert.value >= alert.threshold and alert.since < alert.step
        worst = max(alert.heads, key=lambda h: by_step[alert.step].heads[figure][h])
        lowest = min(by_step[s].heads[figure][worst] for s in by_step
                     if alert.step - rule.window <= s < alert.step)
        assert by_step[alert.since].heads[figure][worst] == lowest
    elif alert.condition == "below":
        assert alert.threshold in (rule.warning, rule.critical) and alert.value < alert.threshold
        assert alert.since == alert.step
    else:  # a fall: the entropy now, where it fell from, and the size of the fall apart
        assert alert.condition == "fell" and alert.since < alert.step
        assert alert.since_value - alert.value >= rule.fall
        assert -alert.change == pytest.approx(alert.since_value - alert.value)
        assert alert.threshold == pytest.approx(min(rule.fall_to,
                                                    alert.since_value - rule.fall))
        assert alert.value <= alert.threshold


@pytest.mark.slow
def test_unstable_run_warns_at_the_first_step_its_figures_say_so(tmp_path, single_thread):
    alerts, history = train(tmp_path, lr=3e-2)
    first = {}
    for alert in alerts:
        first.setdefault((alert.kind, alert.tag), alert)
    assert ("logit", "L00") in first
    assert first[("logit", "L00")].step <= 10  # within ten steps of the start
    for tag in ("L00", "L01"):
        for kind, condition in (("logit", logit_condition), ("entropy", entropy_condition)):
            holds = condition(history, tag)
            alert = first.get((kind, tag))
            assert (alert.step if alert else None) == (holds[0][0] if holds else None), (
                kind, tag, holds)
            if alert is not None and kind == "logit":
                assert alert.heads == holds[0][1]
            if alert is not None:
                assert_says_what_it_measured(alert, history)
                assert alert.severity in ("warning", "critical") and alert.cause
    for alert in alerts:  # each in the alert table of its step, and counted from its step on
        assert_alert_logged(tmp_path, alert)


@pytest.mark.slow
@pytest.mark.parametrize("setting", ["qk_norm", "one_cycle"])
def test_stable_and_qk_norm_runs_raise_no_warning(tmp_path, single_thread, setting):
    options = dict(lr=3e-2, qk_norm=True) if setting == "qk_norm" else dict(lr=3e-3,
                                                                           one_cycle=True)
    alerts, history = train(tmp_path, **options)
    assert [a for a in alerts if a.severity != "info"] == []
    assert max(s.layers[0].reduce("logit_spread", "max") for s in history) < 100
