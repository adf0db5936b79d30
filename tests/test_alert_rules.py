"""Alert rules on hand-made measurements: each kind's condition, its severities, the heads it
names, what it looks back on, and the monitor's fire-once memory.

The figures are built per head and fed through the real aggregation (``HeadAccumulator``), so
each snapshot is what the probe would hand the rules; the expected alerts are decided here from
the thresholds, independently of the rules' code.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from attn_probe.aggregate import HeadAccumulator
from attn_probe.alerts import (
    AlertMonitor, AlertRules, EntropyRule, LogitRule, SinkRule, UniformRule,
)
from attn_probe.snapshot import HeadState, Snapshot

INTEGER = ("rank", "columns", "dominant", "columns_full", "dominant_full", "kv_head")


def layer_figures(heads: int, **per_head) -> dict[str, torch.Tensor]:
    """One sequence's figures for ``heads`` heads: healthy defaults, overridden per head."""
    base = dict(rank=5.0, columns=8.0, entropy=2.0, sink=0.1, dominant=3, columns_full=20.0,
                entropy_full=3.0, entropy_norm_full=0.6, sink_full=0.1, sink_logit_full=0.0,
                dominant_full=3, tokens_full=64, max_logit=10.0, logit_spread=8.0,
                query_norm=2.0, key_norm=2.0, kv_head=list(range(heads)))
    base.update(per_head)
    figures = {}
    for name, value in base.items():
        value = torch.as_tensor(value, dtype=torch.float64).expand(heads).reshape(1, heads)
        figures[name] = value.long() if name in INTEGER else value.clone()
    return figures


def snapshot_of(step: int, *layers: dict) -> Snapshot:
    accumulator = HeadAccumulator()
    names = [f"m.{i}.attn" for i in range(len(layers))]
    for name, figures in zip(names, layers):
        accumulator.update(name, figures)
    return Snapshot(step=step, tau=0.9, layers=accumulator.compute(names))


def run(rules: AlertRules, *steps: tuple) -> list:
    """Feed ``(step, layer figures, ...)`` tuples to one monitor; the alerts of each step."""
    monitor = AlertMonitor(rules)
    return [monitor.update(snapshot_of(step, *layers)) for step, *layers in steps]


ONLY = dict(entropy=None, uniform=None, lazy=None, sink=None, logit=None)


def only(**rule) -> AlertRules:
    return AlertRules(**{**ONLY, **rule})


# ------------------------------------------------------------------------------------ logit


def test_logit_warning_needs_growth_from_a_real_base_past_the_floor():
    rule = LogitRule(growth=4.0, window=15, min_spread=40.0, base=5.0, critical=1000.0)
    spreads = [0.2, 2.0, 12.0, 30.0, 52.0, 60.0]  # step 20: 52 >= 40 and >= 4 * max(12, 5)
    steps = [(5 * i, layer_figures(2, logit_spread=[s, 1.0])) for i, s in enumerate(spreads)]
    fired = run(only(logit=rule), *steps)
    assert [[(a.severity, a.step, a.heads) for a in step] for step in fired] == [
        [], [], [], [], [("warning", 20, (0,))], []]
    warning = fired[4][0]
    assert warning.value == 52.0 and warning.threshold == 40.0 and "L00" in warning.message
    # what it measured: the layer's largest spread grew from its lowest of the window (step 5)
    assert (warning.figure, warning.reduction, warning.condition) == ("logit_spread", "max",
                                                                      "grew")
    assert (warning.since, warning.since_value) == (5, 2.0)


def test_logit_growth_from_initialisation_or_a_plateau_is_not_a_warning():
    rule = LogitRule(growth=4.0, window=15, min_spread=40.0, base=5.0)
    # 0.2 -> 39: a healthy head sharpening from uniform, below the floor
    rising = [(5 * i, layer_figures(1, logit_spread=s)) for i, s in enumerate([0.2, 8, 20, 39])]
    # a plateau far above the floor: large but not growing
    plateau = [(5 * i, layer_figures(1, logit_spread=s)) for i, s in enumerate([300, 310, 305])]
    assert all(not step for step in run(only(logit=rule), *rising))
    assert all(not step for step in run(only(logit=rule), *plateau))


def test_logit_critical_at_the_threshold_itself_and_escalation():
    rule = LogitRule(growth=4.0, window=15, min_spread=40.0, base=5.0, critical=1000.0)
    steps = [(0, layer_figures(3, logit_spread=[10.0, 10.0, 10.0])),
             (5, layer_figures(3, logit_spread=[45.0, 12.0, 10.0])),
             (10, layer_figures(3, logit_spread=[1000.0, 999.0, 1200.0])),
             (15, layer_figures(3, logit_spread=[2000.0, 2000.0, 2000.0]))]
    fired = run(only(logit=rule), *steps)
    assert [(a.severity, a.heads) for a in fired[1]] == [("warning", (0,))]
    # critical names the heads at or above the threshold; the warning already fired
    assert [(a.severity, a.heads, a.value) for a in fired[2]] == [("critical", (0, 2), 1200.0)]
    (critical,) = fired[2]
    assert (critical.figure, critical.condition, critical.threshold) == (
        "logit_spread", "above", 1000.0)
    assert (critical.since, critical.since_value, critical.change) == (10, 1200.0, 0.0)
    assert fired[3] == []  # each severity once per layer


def test_logit_cause_splits_the_growth_exactly():
    """spread = query_norm * key_norm * alignment: a head whose norms grew 3x and 2x while
    its spread grew 6x grew from the norms, not the alignment (x1)."""
    rule = LogitRule(growth=4.0, window=50, min_spread=40.0, base=5.0)
    steps = [(0, layer_figures(1, logit_spread=10.0, query_norm=1.0, key_norm=2.0,
                               max_logit=12.0)),
             (50, layer_figures(1, logit_spread=60.0, query_norm=3.0, key_norm=4.0,
                                max_logit=70.0))]
    (alert,) = run(only(logit=rule), *steps)[1]
    assert "grew ×6 in 50 steps" in alert.cause
    assert "query norm ×3, key norm ×2" in alert.cause and "alignment ×1" in alert.cause
    assert "not their alignment" in alert.cause
    assert "QK-Clip at τ≈24" in alert.cause  # twice the raw max logit before the growth
    aligned = [(0, layer_figures(1, logit_spread=10.0, query_norm=1.0, key_norm=1.0)),
               (50, layer_figures(1, logit_spread=60.0, query_norm=1.1, key_norm=1.0))]
    (alert,) = run(only(logit=rule), *aligned)[1]
    assert "from the alignment of queries with keys (alignment ×5.5)" in alert.cause


def test_logit_cause_without_query_and_key_norms():
    """An eager attention shows only its scores: the norms are unknown, and the cause says so
    instead of inventing a split."""
    rule = LogitRule(growth=4.0, window=5, min_spread=40.0, base=5.0)
    nan = float("nan")
    steps = [(0, layer_figures(1, logit_spread=10.0, query_norm=nan, key_norm=nan)),
             (5, layer_figures(1, logit_spread=60.0, query_norm=nan, key_norm=nan))]
    (alert,) = run(only(logit=rule), *steps)[1]
    assert "norms are unknown" in alert.cause


def test_logit_alert_names_shows_and_explains_the_same_heads():
    """Head 0 grows 46 -> 115.8 (x2.5, less than ``growth``), head 1 grows 10 -> 105 (x10.5):
    the warning names head 1, shows head 1's spread and explains head 1's growth."""
    rule = LogitRule(growth=4.0, window=15, min_spread=100.0, base=5.0)
    steps = [(0, layer_figures(2, logit_spread=[46.0, 10.0], query_norm=[2.0, 1.0])),
             (5, layer_figures(2, logit_spread=[115.8, 105.0], query_norm=[2.0, 3.0]))]
    (alert,) = run(only(logit=rule), *steps)[1]
    assert alert.heads == (1,)
    assert (alert.value, alert.since, alert.since_value) == (105.0, 0, 10.0)
    assert "10.0 at step 0 -> 105.0 in head 1" in alert.message
    assert "grew ×10 in 5 steps (head 1)" in alert.cause and "query norm ×3" in alert.cause


def test_logit_window_is_counted_in_training_steps():
    """A window of 10 steps at a 5-step interval looks back on the two measurements before: the
    spread of 10 fifteen steps back is outside it, the one exactly 10 steps back inside it (the
    other rules' longer windows keep the older measurements at hand)."""
    rules = AlertRules(logit=LogitRule(growth=4.0, window=10, min_spread=40.0, base=5.0))
    assert rules.lookback > 15
    outside = [(0, layer_figures(1, logit_spread=10.0)), (5, layer_figures(1, logit_spread=30.0)),
               (10, layer_figures(1, logit_spread=30.0)),
               (15, layer_figures(1, logit_spread=110.0))]
    assert all(not step for step in run(rules, *outside))
    inside = [(5, layer_figures(1, logit_spread=10.0)), (10, layer_figures(1, logit_spread=30.0)),
              (15, layer_figures(1, logit_spread=110.0))]
    (alert,) = run(rules, *inside)[2]
    assert (alert.since, alert.since_value) == (5, 10.0)


def test_logit_growth_is_counted_from_the_floor_and_the_lowest_point():
    """Growth from ~0 at initialisation says nothing (``base``); the cause counts the growth
    from the head's lowest point of the window, not its oldest."""
    floor = LogitRule(growth=4.0, window=50, min_spread=40.0, base=20.0)
    assert all(not step for step in run(only(logit=floor),
                                        (0, layer_figures(1, logit_spread=0.5)),
                                        (5, layer_figures(1, logit_spread=45.0))))
    rule = LogitRule(growth=4.0, window=50, min_spread=40.0, base=5.0)
    steps = [(0, layer_figures(1, logit_spread=30.0)), (5, layer_figures(1, logit_spread=8.0)),
             (10, layer_figures(1, logit_spread=20.0)),
             (15, layer_figures(1, logit_spread=100.0))]
    (alert,) = run(only(logit=rule), *steps)[3]
    assert (alert.since, alert.since_value) == (5, 8.0)
    assert "grew ×12 in 10 steps (head 0)" in alert.cause  # 100 / 8, not 100 / 30


def test_logit_cause_explains_the_worst_of_the_heads_it_names():
    rule = LogitRule(growth=4.0, window=15, min_spread=40.0, base=5.0)
    steps = [(0, layer_figures(3, logit_spread=[10.0, 10.0, 10.0])),
             (5, layer_figures(3, logit_spread=[50.0, 300.0, 10.0]))]
    (alert,) = run(only(logit=rule), *steps)[1]
    assert alert.heads == (0, 1) and alert.value == 300.0
    assert "(head 1)" in alert.cause and "×30" in alert.cause


def test_logit_cause_says_when_both_the_norms_and_the_alignment_grew():
    """query ×2 and key ×2 (the norms ×4), the alignment ×4: the spread grew ×16 from both."""
    rule = LogitRule(growth=4.0, window=15, min_spread=40.0, base=5.0)
    steps = [(0, layer_figures(1, logit_spread=10.0, query_norm=1.0, key_norm=1.0)),
             (5, layer_figures(1, logit_spread=160.0, query_norm=2.0, key_norm=2.0))]
    (alert,) = run(only(logit=rule), *steps)[1]
    assert ("from both the norms (query norm ×2, key norm ×2) and their alignment "
            "(alignment ×4)") in alert.cause


def test_an_alert_fires_again_only_at_a_higher_severity():
    """critical, then the warning's condition: nothing new (a drop is not news); a later
    critical on the same layer is not new either."""
    rule = LogitRule(growth=4.0, window=15, min_spread=40.0, base=5.0, critical=1000.0)
    fired = run(only(logit=rule), (0, layer_figures(1, logit_spread=10.0)),
                (5, layer_figures(1, logit_spread=1500.0)),
                (10, layer_figures(1, logit_spread=120.0)),
                (15, layer_figures(1, logit_spread=2000.0)))
    assert [[a.severity for a in step] for step in fired] == [[], ["critical"], [], []]


def test_raw_max_logit_alone_raises_nothing():
    """A key bias adds a constant to all of a query's scores: the raw max logit can be huge
    while the spread, which softmax sees, is not."""
    steps = [(5 * i, layer_figures(2, max_logit=5000.0 * (i + 1), logit_spread=0.3))
             for i in range(8)]
    assert all(not step for step in run(AlertRules(), *steps))


# ---------------------------------------------------------------------------------- entropy


def test_entropy_severity_and_heads_with_data_only():
    rule = EntropyRule(warning=0.1, critical=0.03)
    nan = float("nan")
    warning = layer_figures(4, entropy_norm_full=[0.02, 0.05, 0.2, 0.1])  # mean 0.0925
    # head 3 has no full-context data (its sequence was non-finite): left out, not named
    critical = layer_figures(4, entropy_norm_full=[0.02, 0.01, 0.05, nan],
                             columns_full=[20, 20, 20, -1])
    (w,), (c,) = run(only(entropy=rule), (0, warning), (5, critical))
    assert (w.severity, w.threshold, w.heads) == ("warning", 0.1, (0, 1))
    assert (w.figure, w.reduction, w.condition, w.since) == ("entropy_norm_full", "mean",
                                                             "below", 0)
    assert w.value == pytest.approx(np.mean([0.02, 0.05, 0.2, 0.1]))
    assert (c.severity, c.threshold) == ("critical", 0.03)
    assert c.value == pytest.approx(np.mean([0.02, 0.01, 0.05]))
    assert c.heads == (0, 1, 2)  # the head without data is not named


def test_a_fast_fall_to_a_handful_of_keys_warns_a_pattern_forming_does_not():
    rule = EntropyRule(fall=0.45, window=15, fall_to=0.3, warning=0.05, critical=0.02)

    def steps(means):
        return [(5 * i, layer_figures(2, entropy_norm_full=[m, m])) for i, m in enumerate(means)]

    collapse = run(only(entropy=rule), *steps([1.0, 0.95, 0.6, 0.25, 0.2]))
    assert [[(a.severity, a.step) for a in step] for step in collapse] == [
        [], [], [], [("warning", 15)], []]
    (fall,) = collapse[3]
    # the value is the entropy now, the fall is the change from where it fell (never the value)
    assert (fall.figure, fall.reduction, fall.condition) == ("entropy_norm_full", "mean", "fell")
    assert fall.value == pytest.approx(0.25) and (fall.since, fall.since_value) == (0, 1.0)
    assert fall.change == pytest.approx(-0.75)
    assert fall.threshold == pytest.approx(0.3)  # at most fall_to, and fall below where it was
    assert fall.level_text == "fell to ≤ 0.3"
    assert "1.00 -> 0.25 in 15 steps" in fall.message
    # from a lower start the fall itself is the stricter bound: 0.7 - 0.45
    (late,) = run(only(entropy=rule), *steps([0.7, 0.6, 0.2]))[2]
    assert late.threshold == pytest.approx(0.25) and late.value <= late.threshold
    # sampled more coarsely than its window, the fall is not judged (no measurement in it)
    assert all(not step for step in run(only(entropy=rule), *steps([1.0, 0.95, 0.6, 0.25,
                                                                    0.2])[::4]))
    # a head forming fast but staying above fall_to; a slow steady fall: neither warns
    assert all(not step for step in run(only(entropy=rule), *steps([1.0, 0.95, 0.5, 0.45])))
    assert all(not step for step in run(only(entropy=rule),
                                        *steps([1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2])))


def test_entropy_at_the_threshold_does_not_fire():
    assert run(only(entropy=EntropyRule(warning=0.1, critical=0.03)),
               (0, layer_figures(2, entropy_norm_full=0.1))) == [[]]


# ---------------------------------------------------------------------------------- uniform


def test_uniform_layer_while_another_learns():
    rule = UniformRule(entropy=0.99, steps=10, elsewhere=0.8)
    stuck = layer_figures(2, entropy_norm_full=0.997)
    learning = layer_figures(2, entropy_norm_full=0.5)
    start = layer_figures(2, entropy_norm_full=0.999)
    fired = run(only(uniform=rule), (0, start, start), (5, learning, stuck),
                (10, learning, stuck), (15, learning, stuck), (20, learning, stuck))
    assert [[(a.kind, a.tag, a.step) for a in step] for step in fired] == [
        [], [], [], [("uniform", "L01", 15)], []]
    assert "since step 5" in fired[3][0].message and "L00" in fired[3][0].message
    uniform = fired[3][0]
    assert (uniform.figure, uniform.reduction, uniform.condition, uniform.threshold) == (
        "entropy_norm_full", "min", "above", 0.99)
    assert (uniform.since, uniform.value) == (5, pytest.approx(0.997))


def test_uniform_everywhere_at_initialisation_is_not_an_alert():
    rule = UniformRule(entropy=0.99, steps=10, elsewhere=0.8)
    start = layer_figures(2, entropy_norm_full=0.999)
    assert all(not step for step in run(only(uniform=rule),
                                        *[(5 * i, start, start) for i in range(8)]))


def test_uniform_streak_broken_starts_again():
    rule = UniformRule(entropy=0.99, steps=10, elsewhere=0.8)
    learning = layer_figures(1, entropy_norm_full=0.5)
    stuck = layer_figures(1, entropy_norm_full=0.995)
    loose = layer_figures(1, entropy_norm_full=0.95)
    fired = run(only(uniform=rule), (0, learning, stuck), (5, learning, stuck),
                (10, learning, loose), (15, learning, stuck), (20, learning, stuck))
    assert all(not step for step in fired)


def test_uniform_needs_every_head_uniform_and_another_layer_learned_on_its_mean():
    """The streak is judged on every head, not the layer's mean (0.996 here, with one head at
    0.985); another layer with one sharp head (0.1) but a mean of 0.7 has not learned where to
    look."""
    rule = UniformRule(entropy=0.99, steps=10, elsewhere=0.5)
    almost = layer_figures(4, entropy_norm_full=[1.0, 1.0, 1.0, 0.985])
    stuck = layer_figures(4, entropy_norm_full=0.999)
    learned = layer_figures(4, entropy_norm_full=0.3)
    one_sharp = layer_figures(4, entropy_norm_full=[0.1, 0.9, 0.9, 0.9])
    assert all(not s for s in run(only(uniform=rule), *[(5 * i, learned, almost)
                                                       for i in range(5)]))
    assert all(not s for s in run(only(uniform=rule), *[(5 * i, one_sharp, stuck)
                                                       for i in range(5)]))
    fired = run(only(uniform=rule), *[(5 * i, learned, stuck) for i in range(5)])
    assert [[(a.tag, a.step, a.since) for a in s] for s in fired] == [
        [], [], [("L01", 10, 0)], [], []]


def test_uniform_streak_at_an_interval_coarser_than_its_steps():
    """``steps`` 30 sampled every 100 steps: two uniform measurements in a row decide."""
    rule = UniformRule(entropy=0.99, steps=30, elsewhere=0.5)
    learned = layer_figures(1, entropy_norm_full=0.3)
    stuck = layer_figures(1, entropy_norm_full=0.999)
    fired = run(only(uniform=rule), (0, learned, stuck), (100, learned, stuck))
    assert [[(a.step, a.since) for a in s] for s in fired] == [[], [(100, 0)]]


# ------------------------------------------------------------------- the sampling interval


def trajectory(kind: str, steps: int = 1000) -> list[tuple]:
    """``(step, layer figures, ...)`` at every step of a made-up run of two layers: ``explode``
    (layer 0's head 0 spread grows ×e every 55 steps from 2, its entropy falling with it),
    ``healthy`` (spreads rising slowly to 60, entropies to 0.4), ``plateau`` (a trained model:
    spreads steady at 300, entropies at 0.3) or ``uniform`` (layer 1 stays uniform while layer 0
    learns)."""
    found = []
    for step in range(steps):
        t = step / steps
        if kind == "explode":
            spread = 2.0 * np.exp(step / 55.0)
            first = layer_figures(2, logit_spread=[spread, 8.0],
                                  entropy_norm_full=[max(0.001, 1.0 - spread / 400), 0.6])
            second = layer_figures(2)
        elif kind == "healthy":
            first = layer_figures(2, logit_spread=60.0 * t, entropy_norm_full=1.0 - 0.6 * t)
            second = layer_figures(2, logit_spread=40.0 * t, entropy_norm_full=1.0 - 0.5 * t)
        elif kind == "plateau":
            first = second = layer_figures(2, logit_spread=300.0, entropy_norm_full=0.3)
        else:
            first = layer_figures(2, entropy_norm_full=0.3)
            second = layer_figures(2, entropy_norm_full=0.999)
        found.append((step, first, second))
    return found


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["explode", "healthy", "plateau", "uniform"])
def test_a_run_gets_the_same_verdict_at_every_sampling_interval(kind):
    """The default rules' windows are in training steps: sampled every 1, 5, 25 or 100 steps
    the same run raises the same alerts, each at most one interval later than when sampled at
    every step."""
    snapshots = [snapshot_of(step, *layers) for step, *layers in trajectory(kind)]

    def fired(sampled) -> dict:
        monitor = AlertMonitor(AlertRules())
        return {(a.kind, a.tag, a.severity): a.step for snapshot in sampled
                for a in monitor.update(snapshot)}

    fine = fired(snapshots)
    assert bool(fine) == (kind in ("explode", "uniform")), fine
    for every in (5, 25, 100):
        coarse = fired(snapshots[::every])
        assert coarse.keys() == fine.keys(), every
        for key, step in coarse.items():
            assert fine[key] <= step < fine[key] + every, (key, every)


# ----------------------------------------------------------------------- info, monitor, states


def test_sinks_and_lazy_layers_are_information():
    lazy = layer_figures(2, rank=1.0, columns=1.0)
    sinking = layer_figures(3, sink_full=[0.1, 0.5, 0.9])
    (found,) = run(AlertRules(), (0, lazy, sinking))
    assert {(a.kind, a.severity, a.tag, a.heads) for a in found} == {
        ("lazy", "info", "L00", (0, 1)), ("sink", "info", "L01", (1,)),
        ("sink", "info", "L01", (2,))}
    assert {(a.figure, a.condition, a.value, a.threshold) for a in found} == {
        ("rank", "below", 1.0, 1.5), ("sink_full", "above", 0.5, 0.5),
        ("sink_full", "above", 0.9, 0.5)}
    assert not any(a.warns for a in found)


def test_rules_validate_their_thresholds_and_can_be_turned_off():
    for bad in (lambda: EntropyRule(warning=0.0), lambda: EntropyRule(warning=0.05,
                                                                      critical=0.1),
                lambda: LogitRule(growth=1.0), lambda: LogitRule(window=0),
                lambda: UniformRule(steps=0), lambda: UniformRule(elsewhere=0.995),
                lambda: SinkRule(min_mass=0.0)):
        with pytest.raises(ValueError):
            bad()
    everything = layer_figures(2, rank=1.0, columns=1.0, logit_spread=5000.0,
                               entropy_norm_full=0.0, sink_full=1.0)
    assert run(only(), (0, everything)) == [[]]


def test_figures_without_full_context_raise_no_alert():
    """A user adapter that returns only the matrix gives no q and k: no opinion on entropy,
    logits or sinks (NaN never crosses a threshold), and no numpy warning about the NaNs."""
    crop_only = {k: v for k, v in layer_figures(2).items() if k in
                 ("rank", "columns", "entropy", "sink", "dominant")}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert run(AlertRules(), *[(5 * i, crop_only) for i in range(4)]) == [[]] * 4


def test_head_states_follow_the_rules():
    rules = AlertRules(logit=LogitRule(growth=4.0, window=5, min_spread=40.0, base=5.0),
                       entropy=EntropyRule(warning=0.1), uniform=UniformRule(entropy=0.99),
                       sink=SinkRule(min_mass=0.5))
    monitor = AlertMonitor(rules)
    monitor.judge(snapshot_of(0, layer_figures(8, logit_spread=[8.0] * 7 + [1500.0])))
    snapshot = monitor.judge(snapshot_of(5, layer_figures(
        8, entropy_norm_full=[0.6, 0.3, 0.995, 0.05, 0.6, 0.6, 0.3, 0.6],
        sink_full=[0.1, 0.1, 0.1, 0.1, 0.7, 0.1, 0.7, 0.1],
        logit_spread=[9.0, 9.0, 9.0, 9.0, 9.0, 50.0, 9.0, 1500.0])))
    # head 6 is sharp and a sink: a sink; head 7 is past the critical spread without growing
    assert snapshot.states["m.0.attn"].tolist() == [
        HeadState.HEALTHY, HeadState.SHARP, HeadState.UNIFORM, HeadState.ONE_HOT,
        HeadState.SINK, HeadState.EXPLODING, HeadState.SINK, HeadState.EXPLODING]
