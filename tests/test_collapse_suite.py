"""The collapse suite (benchmarks/collapse_suite.py): its damage and lead arithmetic on hand-made
records, checked against a plain re-computation; the replay of a recorded run against the alerts
the probe raised while training it; the per-row learning-rate multiplier and the key bias that
softmax ignores, checked against the models themselves."""

from __future__ import annotations

import pickle
import statistics
import sys

import numpy as np
import pytest
import torch

from attn_probe.alerts import AlertRules, EntropyRule, LogitRule
from attn_probe.snapshot import Alert
from extras_rule import extra
from reference import REPO

sys.path.insert(0, str(REPO / "benchmarks"))

from collapse.families import FAMILIES, Shape, add_key_bias  # noqa: E402
from collapse.judge import (  # noqa: E402
    RecordError, damage_step, final_losses, judge_suite, load_record, replay, subsample,
    summarise,
)
from collapse.calibrated import Calibration, layer_rules  # noqa: E402
from collapse.loss import spikes, stall  # noqa: E402
from collapse.runs import boosted_step, train  # noqa: E402
from collapse_suite import smoke_configs  # noqa: E402

TINY = Shape(n_layer=2, n_head=2, n_embd=32, block_size=16)


def alert(kind: str, step: int, severity: str = "warning", tag: str = "L00") -> Alert:
    return Alert(kind, f"layer.{tag}", tag, (0,), step, "logit_spread", "max", "above", 1.0, 0.5,
                 step, 1.0, f"{kind} at {step}",
                 severity=severity)


def record(recipe: str, losses, alerts=(), family: str = "gpt", every: int = 5) -> dict:
    config = dict(family=family, recipe=recipe, lr=1e-3, schedule="constant", steps=len(losses),
                  every=every, boost=1.0, boost_layer=0, key_bias=0.0)
    return dict(config=config, losses=list(losses), alerts=list(alerts), history=[])


def plain_damage_step(losses, twin, skip):
    """The definition, step by step: trailing means over 5 steps, 10 % above the twin's."""
    for step in range(skip, min(len(losses), len(twin))):
        run = losses[max(0, step - 4): step + 1]
        reference = twin[max(0, step - 4): step + 1]
        if sum(run) / len(run) >= 1.1 * sum(reference) / len(reference):
            return step
    return None


def test_damage_step_is_the_definition():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(8, 60))
        twin = list(3 + rng.random(n))
        run = [t * rng.choice([0.95, 1.0, 1.3]) for t in twin]
        skip = int(rng.integers(0, 6))
        assert damage_step(run, twin, skip) == plain_damage_step(run, twin, skip)


def test_final_loss_is_the_mean_of_the_last_tenth_of_the_steps_both_runs_have():
    assert final_losses([float(s) for s in range(40)], [1.0] * 40) == (37.5, 1.0)  # 36-39
    assert final_losses([float(s) for s in range(40)], [1.0] * 20) == (18.5, 1.0)  # 18, 19


def test_lead_damage_and_false_alarms_of_hand_made_runs():
    twin = [2.0] * 40
    collapsed = [2.0] * 20 + [4.0] * 20           # trailing mean 2.4 >= 2.2 first at step 20
    recovered = [2.0] * 20 + [4.0] * 5 + [2.0] * 15   # damaged at 20, ends equal to the twin
    early = [9.0] + [2.0] * 39                     # above only inside the first interval
    late = [2.0] * 30 + [4.0] * 10
    on_time = [2.0] * 30 + [4.0] * 10              # warned at its damage step: in time
    records = [
        record("healthy", twin, [alert("logit", 10), alert("sink", 5, "info"),
                                 alert("entropy", 30, "critical")]),
        record("lr_1", collapsed, [alert("sink", 3, "info"), alert("logit", 12),
                                   alert("entropy", 8, "critical", "L01")]),
        record("lr_2", recovered, [alert("lazy", 25)]),
        record("lr_3", early),
        record("lr_4", late, [alert("logit", 35)]),
        record("lr_5", on_time, [alert("logit", 30)]),
    ]
    healthy, collapsed_v, recovered_v, early_v, late_v, on_time_v = judge_suite(records)

    assert (collapsed_v.damage, collapsed_v.damaged) == (20, True)
    assert (collapsed_v.final, collapsed_v.twin_final) == (4.0, 2.0)
    assert (collapsed_v.warning.kind, collapsed_v.warning.step) == ("entropy", 8)
    assert collapsed_v.lead == 20 - 8
    assert (collapsed_v.info.kind, collapsed_v.info.step) == ("sink", 3)
    assert collapsed_v.false_alarms is None

    assert (recovered_v.damage, recovered_v.damaged, recovered_v.lead) == (20, False, 20 - 25)
    assert (early_v.damage, early_v.damaged, early_v.lead, early_v.warning) == (
        None, False, None, None)
    assert damage_step(early, twin, skip=0) == 0
    assert (late_v.damage, late_v.damaged, late_v.lead) == (30, True, 30 - 35)

    assert healthy.damage is None and not healthy.damaged
    assert healthy.false_alarms == 2                # the info alert is no alarm

    assert (on_time_v.damage, on_time_v.damaged, on_time_v.lead) == (30, True, 0)

    summary = summarise([healthy, collapsed_v, recovered_v, early_v, late_v, on_time_v])
    assert (summary.damaged, summary.warned_in_time) == (3, 2)
    assert summary.median_lead == statistics.median([12, -5, 0])
    assert (summary.false_alarms, summary.healthy_runs, summary.families) == (2, 1, 1)


def test_a_coarser_interval_drops_measurements_and_puts_early_damage_out_of_reach():
    """Replaying every 25 steps keeps the measurements a probe with ``every=25`` takes; a run
    damaged before two intervals is out of reach there (reported, not counted), and the damage
    step does not depend on the interval."""
    from attn_probe.snapshot import Snapshot

    twin = record("healthy", [2.0] * 200)
    early = record("lr_1", [2.0] * 30 + [4.0] * 170)   # damaged at 30
    late = record("lr_2", [2.0] * 80 + [4.0] * 120)    # damaged at 80
    for r in (twin, early, late):
        r["history"] = [Snapshot(step=step, tau=0.9, layers=()) for step in range(0, 200, 5)]
    coarse = subsample(late, 25)
    assert [s.step for s in coarse["history"]] == list(range(0, 200, 25))
    assert coarse["config"]["every"] == 25 and late["config"]["every"] == 5
    with pytest.raises(ValueError, match="multiples of 5"):
        subsample(late, 12)
    quiet = AlertRules(logit=None, entropy=None, uniform=None, lazy=None, sink=None)
    fine, coarse_v = (judge_suite([twin, early, late], quiet, every) for every in (5, 25))
    assert [v.damage for v in fine] == [v.damage for v in coarse_v] == [None, 30, 80]
    assert [v.in_reach for v in fine] == [False, True, True]
    assert [v.in_reach for v in coarse_v] == [False, False, True]
    summary = summarise(coarse_v)
    assert (summary.every, summary.damaged, summary.out_of_reach) == (25, 1, 1)
    assert "every 25: damaged runs warned in time: 0 of 1 (1 more damaged before step 50" in (
        str(summary))
    with pytest.raises(ValueError, match="several sampling intervals"):
        summarise(fine + coarse_v)


def test_loss_spikes_and_stalls_are_their_definitions():
    """A spike: more than 6 standard deviations above the mean of the 128 steps before (a
    plain recomputation); a stall: the 20-step mean falling by less than 1 % over 20 steps."""
    rng = np.random.default_rng(0)
    losses = list(3.0 + 0.01 * rng.standard_normal(300))
    losses[200] = 3.5
    plain = [t for t in range(20, 300) if losses[t] > np.mean(losses[max(0, t - 128):t])
             + 6 * np.std(losses[max(0, t - 128):t])]
    assert spikes(losses) == plain == [200]
    falling = [5.0 - 0.02 * t for t in range(100)] + [3.0] * 100
    found = stall(falling)
    means = [np.mean(falling[max(0, t - 19):t + 1]) for t in range(200)]
    assert found == next(t for t in range(20, 200) if means[t - 20] - means[t] < 0.01 * means[t])
    assert 100 < found < 140 and stall([5.0 - 0.02 * t for t in range(200)]) is None


def test_a_calibrated_layer_gets_thresholds_from_its_own_first_steps():
    """min_spread: ``factor`` times the layer's largest spread over the first ``learn`` steps,
    at least ``floor``; the entropy levels scaled down from its lowest mean entropy, never
    above the defaults'."""
    from test_alert_rules import layer_figures, snapshot_of

    def snapshot(step, spread, entropy):
        return snapshot_of(step, layer_figures(2, logit_spread=[spread, 1.0],
                                               entropy_norm_full=entropy))

    history = [snapshot(0, 2.0, 1.0), snapshot(10, 9.0, 0.6), snapshot(30, 500.0, 0.001)]
    rules = layer_rules(history, "m.0.attn", AlertRules(), Calibration(learn=20, factor=8,
                                                                       floor=50))
    assert rules.logit.min_spread == 72.0  # 8 x 9, the largest before step 20
    assert rules.entropy.warning == pytest.approx(min(0.01, 0.6 / 8))
    quiet = layer_rules(history[:1], "m.0.attn", AlertRules(), Calibration(learn=20, factor=8,
                                                                           floor=50))
    assert quiet.logit.min_spread == 50.0  # 8 x 2 is below the floor


def test_a_run_without_its_twin_is_an_error():
    with pytest.raises(ValueError, match="healthy"):
        judge_suite([record("lr_1", [2.0] * 10)])


def test_a_file_that_is_no_record_is_one_error_naming_it(tmp_path):
    garbage, other = tmp_path / "garbage.pkl", tmp_path / "other.pkl"
    garbage.write_bytes(b"not a pickle")
    other.write_bytes(pickle.dumps([1, 2]))
    for path in (garbage, other):
        with pytest.raises(RecordError, match=path.name):
            load_record(str(path))


@pytest.mark.filterwarnings("ignore:attn_probe")  # the alerts, expected
def test_replay_gives_the_alerts_the_probe_raised(tmp_path):
    """A smoke run of the suite trains with the probe; replaying its record under the same
    rules gives exactly the alerts the probe raised, under other rules other alerts."""
    torch.manual_seed(0)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        config = smoke_configs()[1]
        trained = load_record(train(config, str(tmp_path)))
    finally:
        torch.set_num_threads(previous)
    raised = trained["alerts"]
    assert {a.kind for a in raised} >= {"logit", "entropy"}, raised
    assert [s.step for s in trained["history"]] == list(range(0, config.steps, config.every))
    assert replay(trained, AlertRules()) == raised
    strict = AlertRules(logit=LogitRule(min_spread=0.5, base=0.01, growth=1.01),
                        entropy=EntropyRule(warning=0.99, critical=0.98))
    none = AlertRules(logit=None, entropy=None, uniform=None, lazy=None, sink=None)
    assert len(replay(trained, strict)) > len(raised)
    assert replay(trained, none) == []


@pytest.mark.parametrize("family", ["gpt", "gpt2", "llama", "encoder"])
def test_boosted_step_multiplies_the_change_of_the_query_and_key_rows(family):
    if family != "gpt":
        transformers = extra("transformers")
        if family == "encoder" and not hasattr(transformers, "ModernBertForMaskedLM"):
            with pytest.raises(ImportError, match=r"transformers >= 4\.48"):
                FAMILIES[family].build(TINY)   # what a user of an older transformers gets
            return

    def one_step(factor):
        torch.manual_seed(0)
        model = FAMILIES[family].build(TINY)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
        start = {n: p.detach().clone() for n, p in model.named_parameters()}
        tokens = torch.randint(256, (2, TINY.block_size), generator=torch.Generator())
        FAMILIES[family].logits(model, tokens).logsumexp(-1).mean().backward()
        boosted_step(optimizer, FAMILIES[family].qk_rows(model, 0), factor)
        return {n: p.detach() - start[n] for n, p in model.named_parameters()}, model

    plain, _ = one_step(1.0)
    boosted, model = one_step(30.0)
    rows = {id(p): index for p, index in FAMILIES[family].qk_rows(model, 0)}
    touched = 0
    for name, param in model.named_parameters():
        if id(param) in rows:
            index = rows[id(param)]
            assert plain[name][index].abs().max() > 0, name
            torch.testing.assert_close(boosted[name][index], 30 * plain[name][index],
                                       rtol=1e-4, atol=1e-9)
            mask = torch.ones_like(param, dtype=torch.bool)
            mask[index] = False
            assert torch.equal(boosted[name][mask], plain[name][mask]), name
            touched += plain[name][index].numel()
        else:
            assert torch.equal(boosted[name], plain[name]), name
    # the query weights and (grouped-query: half as many) key weights at least
    assert touched >= 1.5 * TINY.n_embd ** 2, touched


def test_key_bias_changes_neither_outputs_nor_attention_but_the_raw_logit():
    extra("transformers")
    from attn_probe import capture

    torch.manual_seed(0)
    model = FAMILIES["gpt2"].build(TINY).eval()
    tokens = torch.randint(256, (2, TINY.block_size), generator=torch.Generator())
    with torch.no_grad(), capture(model) as before:
        logits = model(input_ids=tokens).logits
    add_key_bias(model, 100.0)
    with torch.no_grad(), capture(model) as after:
        shifted = model(input_ids=tokens).logits
    torch.testing.assert_close(shifted, logits, rtol=0, atol=1e-4)
    for name in before.attention:
        torch.testing.assert_close(after.attention[name], before.attention[name],
                                   rtol=0, atol=1e-4)
    raw = [max(float(figures["max_logit"].max()) for figures in c.metrics().values())
           for c in (before, after)]
    assert raw[1] > 20 * raw[0], raw           # the shift q·b·scale of each query's scores


def test_a_record_written_when_layers_carried_their_lazy_rule_still_loads(tmp_path,
                                                                          monkeypatch):
    """Records pickled before the lazy rule became ``alerts.LazyRule`` hold, in each layer
    summary, a ``snapshot.CollapseRule``: they load, and replay under today's rules."""
    import attn_probe.snapshot as snapshot_module
    from attn_probe.alerts import LazyRule
    from attn_probe.snapshot import FIGURES, LayerSummary, Snapshot

    class CollapseRule:  # the class as such records name it
        def __init__(self) -> None:
            self.max_rank, self.max_columns, self.min_lazy_share = 1.5, 1.5, 1.0

    CollapseRule.__module__, CollapseRule.__qualname__ = "attn_probe.snapshot", "CollapseRule"
    counts = np.ones(2, dtype=np.int64)
    layer = LayerSummary(name="blocks.0", index=0, heads={f: np.ones(2) for f in FIGURES},
                         counts=counts, nonfinite=0 * counts, full_counts=counts)
    object.__setattr__(layer, "rule", CollapseRule())
    old = record("healthy", [2.0] * 5)
    old["history"] = [Snapshot(step=0, tau=0.9, layers=(layer,))]
    path = tmp_path / "old.pkl"
    with monkeypatch.context() as patch:
        patch.setattr(snapshot_module, "CollapseRule", CollapseRule, raising=False)
        path.write_bytes(pickle.dumps(old))
    assert not hasattr(snapshot_module, "CollapseRule")
    loaded = load_record(str(path))
    assert isinstance(loaded["history"][0].layers[0].rule, LazyRule)
    # rank and columns 1 in both heads: a lazy layer; every key-0 mass 1: two sinks
    assert sorted((a.kind, a.heads) for a in replay(loaded, AlertRules())) == [
        ("lazy", (0, 1)), ("sink", (0,)), ("sink", (1,))]
