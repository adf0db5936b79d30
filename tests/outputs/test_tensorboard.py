"""TensorBoardOutput: snapshots written to event files, read back and checked."""

from __future__ import annotations

import io
import math
import re

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.tensorboard import SummaryWriter

from attn_probe.outputs import plots
from attn_probe.aggregate import HeadAccumulator
from attn_probe.alerts import LazyRule
from attn_probe.snapshot import Alert, Snapshot
from attn_probe.outputs import TensorBoardOutput
from reference import (
    markdown_rows,
    read_events,
    read_images,
    read_layouts,
    read_scalars,
    read_texts,
    reference_counts,
    reference_entropy_sink,
    scalar_events,
)

NAMES = ("encoder.0.attn", "encoder.1.attn", "encoder.2.attn", "encoder.3.attn")
HEADS = 4
TOKENS = 8
STEPS = (0, 50, 100)
TOL = 1e-6


# ----------------------------------------------------------------------- building snapshots


def reference_metrics(attention: np.ndarray, tau: float = 0.9) -> dict[str, np.ndarray]:
    """Per-head metrics of one sequence's (H, T, T) attention, from the tests' float64 reference."""
    heads = torch.from_numpy(np.asarray(attention, dtype=np.float64))
    rank, columns, _ = reference_counts(heads, tau)
    entropy_sink = np.array([reference_entropy_sink(head) for head in heads])
    return {
        "rank": rank.numpy(),
        "columns": columns.numpy(),
        "entropy": entropy_sink[:, 0],
        "sink": entropy_sink[:, 1],
        "dominant": (heads**2).sum(-2).argmax(-1).numpy(),  # ties: the lowest index
    }


def constructed_attention(tokens: int = TOKENS) -> np.ndarray:
    """Four heads with known structure: all-to-first-key, identity, causal uniform, local."""
    sink = np.zeros((tokens, tokens))
    sink[:, 0] = 1.0
    identity = np.eye(tokens)
    causal = np.tril(np.ones((tokens, tokens)))
    causal /= causal.sum(-1, keepdims=True)
    local = np.eye(tokens) * 0.5 + np.eye(tokens, k=-1) * 0.5
    local[0, 0] = 1.0
    return np.stack([sink, identity, causal, local]).astype(np.float32)


def random_batch(rng: np.random.Generator, sequences: int, nonfinite: float = 0.0) -> dict:
    """(B, H) per-sequence metrics; a ``nonfinite`` share of entries get rank -1."""
    rank = rng.integers(1, TOKENS + 1, (sequences, HEADS)).astype(np.float64)
    rank[rng.random((sequences, HEADS)) < nonfinite] = -1
    return {
        "rank": rank,
        "columns": np.where(rank > 0, rng.integers(1, TOKENS + 1, rank.shape), 0.0),
        "entropy": rng.uniform(0, math.log(TOKENS), rank.shape),
        "sink": rng.uniform(0, 1, rank.shape),
        "dominant": rng.integers(0, 3, rank.shape),
    }


def expected_layer(batches: list[dict]) -> dict[str, np.ndarray]:
    """Per-head means over finite sequences, and counts, straight from the inputs."""
    merged = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    finite = merged["rank"] >= 0
    count = finite.sum(0)
    out = {"count": count, "nonfinite": (~finite).sum(0)}
    for key, values in (
        ("rank", merged["rank"]),
        ("columns", merged["columns"]),
        ("entropy", merged["entropy"]),
        ("sink", merged["sink"]),
        ("first_key_dominant", (merged["dominant"] == 0).astype(np.float64)),
    ):
        total = np.where(finite, values, 0.0).sum(0)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[key] = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    return out


def to_tensors(batch: dict) -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(np.asarray(v)) for k, v in batch.items()}


def build_run(seed: int = 0, tau: float = 0.9):
    """Three snapshots (with their expected per-head means) from a real HeadAccumulator.

    Layer 0 is fed metrics of constructed attention matrices (its sample is that attention);
    layers 1-3 random metrics, layer 2 with some non-finite sequences; at the last step layer 1
    has no finite sequence at all.
    """
    rng = np.random.default_rng(seed)
    attention = constructed_attention()
    known = reference_metrics(attention, tau)
    accumulator = HeadAccumulator()
    snapshots, expected = [], []
    for position, step in enumerate(STEPS):
        per_layer = {}
        for index, name in enumerate(NAMES):
            if index == 0:
                batch = {k: np.repeat(v[None], 2 + position, 0) for k, v in known.items()}
                batches = [batch]
            elif index == 1 and position == 2:
                batch = random_batch(rng, 3)
                batch["rank"][:] = -1
                batches = [batch]
            else:
                # two forward passes of the measured step, summed by the accumulator
                share = 0.3 if index == 2 else 0.0
                batches = [random_batch(rng, 3, share), random_batch(rng, 2, share)]
            for batch in batches:
                accumulator.update(name, to_tensors(batch))
            per_layer[name] = expected_layer(batches)
        samples = {
            NAMES[0]: torch.from_numpy(attention),
            NAMES[-1]: torch.softmax(torch.from_numpy(rng.normal(size=(HEADS, TOKENS, TOKENS))),
                                     -1).float(),
        }
        snapshots.append(
            Snapshot(step=step, tau=tau, samples=samples,
                     layers=tuple(LazyRule().judge(layer) for layer in accumulator.compute(NAMES)))
        )
        expected.append(per_layer)
        accumulator.reset()
    return snapshots, expected


def expected_scalars(expected: list[dict], tau: float = 0.9, per_head: bool = True) -> dict:
    """tag -> {step: value} of everything the writer should log (these snapshots have only the
    figures of the matrix, no alert and no head states; ``per_head``: every head's rank and
    columns, as ``per_head="all"`` logs them)."""
    p = round(tau * 100)
    out: dict[str, dict[int, float]] = {}

    def put(tag, step, value):
        if not math.isnan(value):
            out.setdefault(tag, {})[step] = value

    for step, per_layer in zip(STEPS, expected):
        for index, name in enumerate(NAMES):
            e, tag = per_layer[name], f"L{index:02d}"
            has = e["count"] > 0
            for metric in ("rank", "columns"):
                put(f"{metric}{p}/max/{tag}", step,
                    float(e[metric][has].max()) if has.any() else math.nan)
                if per_head:
                    for head in np.flatnonzero(has):
                        put(f"{metric}{p}/head/{tag}/H{head:02d}", step, float(e[metric][head]))
            lazy = (e["rank"][has] <= 1.5) & (e["columns"][has] <= 1.5)
            put(f"lazy_share/{tag}", step, float(lazy.mean()) if has.any() else math.nan)
            if e["nonfinite"].max() > 0:
                put(f"nonfinite/{tag}", step, float(e["nonfinite"].max()))
        for kind in ("logit", "entropy", "uniform", "lazy", "sink"):
            put(f"alert/{kind}", step, 0.0)  # how many alerts so far
    return out


def steps(events: list[tuple[int, float]]) -> list[int]:
    return [step for step, _ in events]


# ------------------------------------------------------------------------- shared run


@pytest.fixture(scope="module")
def run():
    return build_run()


@pytest.fixture(scope="module")
def scalar_log(run, tmp_path_factory):
    """The three snapshots written without images, every head's scalars (owned writer):
    (log dir, tag -> [(step, value), ...])."""
    snapshots, _ = run
    path = tmp_path_factory.mktemp("scalars")
    with TensorBoardOutput(str(path), pictures_every=0, per_head="all") as writer:
        for snapshot in snapshots:
            writer.write(snapshot)
    return path, scalar_events(path)


@pytest.fixture(scope="module")
def image_log(run, tmp_path_factory):
    """The first two snapshots written with images, into a user's SummaryWriter:
    (log dir, tag -> images, tag -> [(step, value), ...])."""
    snapshots, _ = run
    path = tmp_path_factory.mktemp("images")
    user = SummaryWriter(log_dir=str(path))
    writer = TensorBoardOutput(per_head=False, writer=user, pictures_every=STEPS[1])
    for snapshot in snapshots[:2]:
        writer.write(snapshot)
    writer.close()
    user.close()
    return path, read_images(path), scalar_events(path)


# --------------------------------------------------------------------------------- tests


def test_reference_metrics_of_constructed_attention():
    known = reference_metrics(constructed_attention())
    # every count is decided far from the threshold, so no tie rule could change it
    assert reference_counts(torch.from_numpy(constructed_attention()))[2] > 1e-3
    # all-to-first-key is rank 1 on one column; identity needs 90% of its T equal directions
    assert known["rank"][0] == 1 and known["columns"][0] == 1
    assert known["rank"][1] == math.ceil(0.9 * TOKENS) == known["columns"][1]
    assert known["dominant"][0] == 0 and known["sink"][0] == 1.0


def test_scalar_tags_steps_and_values(run, scalar_log):
    _, expected = run
    _, log = scalar_log
    want = expected_scalars(expected)
    assert set(log) == set(want)
    for tag, by_step in want.items():
        assert steps(log[tag]) == sorted(by_step), tag
        for step, value in log[tag]:
            assert value == pytest.approx(by_step[step], abs=TOL), (tag, step)


def test_expected_tag_names(scalar_log):
    tags = set(scalar_log[1])
    assert {
        "rank90/max/L00", "columns90/max/L03", "lazy_share/L00", "rank90/head/L00/H03",
        "columns90/head/L03/H00", "nonfinite/L02", "alert/logit",
    } <= tags
    # layer 0 (constructed attention) and layer 3 never saw a non-finite sequence; figures of
    # the whole sequence were not measured, so none of theirs is written (no empty chart)
    assert "nonfinite/L00" not in tags and "nonfinite/L03" not in tags
    assert not [t for t in tags if t.startswith(("max_logit", "entropy_norm_full", "sink_full",
                                                 "sink_logit_full", "health"))]


def test_constructed_attention_layer_values(scalar_log):
    log = scalar_log[1]
    known = reference_metrics(constructed_attention())
    assert [value for _, value in log["rank90/head/L00/H00"]] == [1.0] * len(STEPS)
    assert log["rank90/max/L00"][0][1] == known["rank"].max()
    assert log["rank90/head/L00/H01"][0][1] == math.ceil(0.9 * TOKENS)
    # only the all-to-first-key head is lazy: one head in four
    assert log["lazy_share/L00"][0][1] == pytest.approx(0.25, abs=TOL)


def test_layer_without_data_writes_only_nonfinite(scalar_log):
    log = scalar_log[1]
    # at the last step layer 1 had three sequences, all non-finite
    assert steps(log["rank90/max/L01"]) == list(STEPS[:2])
    assert steps(log["lazy_share/L01"]) == list(STEPS[:2])
    assert log["nonfinite/L01"] == [(STEPS[2], 3.0)]
    for tag, events in log.items():
        assert all(math.isfinite(value) for _, value in events), tag


def test_per_head_off(run, tmp_path):
    snapshots, expected = run
    with TensorBoardOutput(str(tmp_path), pictures_every=0, per_head=False) as writer:
        for snapshot in snapshots:
            writer.write(snapshot)
    tags = set(scalar_events(tmp_path))
    assert tags == set(expected_scalars(expected, per_head=False))
    assert not [tag for tag in tags if "/head/" in tag]


def test_tau_sets_tag_percent(tmp_path):
    snapshots, _ = build_run(seed=1, tau=0.8)
    with TensorBoardOutput(str(tmp_path), per_head=False, heatmaps={}) as writer:
        writer.write(snapshots[0])
    scalars, images = set(scalar_events(tmp_path)), set(read_images(tmp_path))
    assert "rank80/max/L00" in scalars and "columns80/max/L03" in scalars
    assert not [tag for tag in scalars if tag.startswith("rank90")]
    assert {"collapse_map/rank80", "profile/max_rank80"} <= images


def test_custom_scalars_layout_written_once(run, scalar_log):
    """One layout for three writes: a chart per headline figure the snapshots have (every
    layer on it, one unit), the worst head state, and one chart per kind of alert."""
    path, log = scalar_log
    layouts = read_layouts(path)
    assert len(layouts) == 1  # three writes, one layout
    ((tag, layout),) = layouts
    assert tag == "custom_scalars__config__"
    categories = {category.title: category for category in layout.category}
    assert set(categories) == {"attn_probe", "attn_probe alerts"}
    charts = {chart.title: list(chart.multiline.tag) for chart in categories["attn_probe"].chart}
    # these snapshots measured the matrix only and have no head states: no chart of a logit,
    # an entropy or a state they lack
    assert charts == {"rank90/max (max over heads)": [r"rank90/max/L\d+"]}
    scalar_tags = list(log)
    (regex,) = charts["rank90/max (max over heads)"]
    assert {tag for tag in scalar_tags if re.fullmatch(regex, tag)} == {
        f"rank90/max/L{i:02d}" for i in range(len(NAMES))}
    alerts = {c.title: list(c.multiline.tag) for c in categories["attn_probe alerts"].chart}
    for kind in ("logit", "entropy", "uniform", "lazy", "sink"):
        (regex,) = alerts[f"{kind} alerts so far"]
        assert [tag for tag in scalar_tags if re.fullmatch(regex, tag)] == [f"alert/{kind}"]


def test_empty_snapshot_and_layout_off(tmp_path):
    with TensorBoardOutput(str(tmp_path), custom_scalars=False) as writer:
        writer.write(Snapshot(step=1, tau=0.9, layers=()))
        assert "TensorBoardOutput" in repr(writer)
    # nothing at all was written: no scalar, image, tensor or layout
    assert not [value for event in read_events(tmp_path) for value in event.summary.value]


def test_images_tags_steps_and_png_shapes(run, image_log):
    snapshots, _ = run
    _, logged, scalars = image_log
    images = set(logged)
    assert images == {"collapse_map/rank90", "profile/max_rank90", "attention/L00",
                      "attention/L03"}
    first = snapshots[0]
    shapes = {
        "collapse_map/rank90": plots.plot_to_array(plots.collapse_map_for(first)).shape,
        "profile/max_rank90": plots.plot_to_array(plots.max_rank_profile_for(first)).shape,
        "attention/L00": plots.plot_to_array(
            plots.attention_heatmaps(first.samples[NAMES[0]], heads=range(4), title="t")
        ).shape,
    }
    shapes["attention/L03"] = shapes["attention/L00"]
    for tag in images:
        assert [image.step for image in logged[tag]] == list(STEPS[:2])
        for image in logged[tag]:
            picture = Image.open(io.BytesIO(image.png))
            assert picture.format == "PNG"
            pixels = np.asarray(picture.convert("RGB"))
            assert pixels.shape == shapes[tag] == (image.height, image.width, 3), tag
            assert pixels.std() > 0  # not a blank canvas
    # the user's writer got no per-head scalars (per_head=False) but all the rest
    assert "rank90/max/L00" in scalars
    assert not [tag for tag in scalars if "/head/" in tag]


def test_heatmap_choice_and_crop(run, tmp_path, monkeypatch):
    snapshots, _ = run
    long = torch.softmax(torch.randn(HEADS, 40, 40), -1)
    snapshot = Snapshot(
        step=7, tau=0.9, layers=snapshots[0].layers,
        samples={NAMES[0]: long, NAMES[2]: long, NAMES[3]: long},
    )
    drawn = []
    original = plots.attention_heatmaps

    def spy(attention, **kwargs):
        figure = original(attention, **kwargs)
        drawn.append([ax.images[0].get_array().shape for ax in figure.axes if ax.images])
        return figure

    monkeypatch.setattr(plots, "attention_heatmaps", spy)
    choice = {"encoder.2.attn": [1, 99], "L00": [3], -1: [0, 2], "not.a.layer": [0], 1: [0]}
    with TensorBoardOutput(str(tmp_path), heatmaps=choice, heatmap_crop=16) as writer:
        writer.write(snapshot)
    # layer 1 has no sample; head 99 does not exist; unknown names are skipped
    assert set(read_images(tmp_path)) == {
        "collapse_map/rank90", "profile/max_rank90", "attention/L00", "attention/L02",
        "attention/L03",
    }
    assert drawn == [[(16, 16)], [(16, 16)], [(16, 16)] * 2]


def test_images_off_and_no_heatmaps(run, tmp_path):
    snapshots, _ = run
    with TensorBoardOutput(str(tmp_path / "off"), pictures_every=0) as writer:
        writer.write(snapshots[0])
    assert read_images(tmp_path / "off") == {}
    with TensorBoardOutput(str(tmp_path / "none"), heatmaps={}) as writer:
        writer.write(snapshots[0])
    assert set(read_images(tmp_path / "none")) == {
        "collapse_map/rank90", "profile/max_rank90"}


def test_user_writer_is_flushed_not_closed(run, tmp_path):
    snapshots, _ = run
    user = SummaryWriter(log_dir=str(tmp_path))
    with TensorBoardOutput(writer=user, pictures_every=0) as writer:
        writer.write(snapshots[0])
    assert user.file_writer is not None and user.all_writers is not None
    # flushed on close: readable while the user's writer is still open
    assert "rank90/max/L00" in scalar_events(tmp_path)
    user.add_scalar("user/after", 1.5, 3)
    user.close()
    assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 1  # never reopened
    assert scalar_events(tmp_path)["user/after"] == [(3, 1.5)]


def test_owned_writer_closed_and_complete(run, tmp_path):
    snapshots, expected = run
    writer = TensorBoardOutput(str(tmp_path), pictures_every=0, per_head=False, heatmaps={})
    for snapshot in snapshots:
        writer.write(snapshot)
    writer.close()
    assert writer.writer.all_writers is None  # the SummaryWriter it made is closed
    writer.close()  # idempotent
    with pytest.raises(RuntimeError):
        writer.write(snapshots[0])
    log = scalar_events(tmp_path)
    want = expected_scalars(expected, per_head=False)
    assert set(log) == set(want)
    assert all(len(log[tag]) == len(by_step) for tag, by_step in want.items())


def test_writer_and_log_dir_exclusive(tmp_path):
    user = SummaryWriter(log_dir=str(tmp_path))
    try:
        with pytest.raises(ValueError):
            TensorBoardOutput(str(tmp_path), writer=user)
    finally:
        user.close()


def logit_snapshot(step: int = 7) -> Snapshot:
    """One layer whose heads' max logits are 50, 400, 100 and 250 and logit spreads three times
    that, judged by the default rules: a critical ``logit`` alert naming head 1 (the only spread
    past 1,000)."""
    from attn_probe.alerts import AlertMonitor, AlertRules

    max_logit = torch.tensor([[50.0, 400.0, 100.0, 250.0]], dtype=torch.float64)
    accumulator = HeadAccumulator()
    accumulator.update("m.0.attn", {
        "rank": torch.full((1, 4), 5), "columns": torch.full((1, 4), 8),
        "entropy": torch.ones(1, 4, dtype=torch.float64), "sink": torch.zeros(1, 4),
        "dominant": torch.full((1, 4), 2), "columns_full": torch.full((1, 4), 9),
        "entropy_full": torch.ones(1, 4), "entropy_norm_full": torch.full((1, 4), 0.5),
        "sink_full": torch.zeros(1, 4), "sink_logit_full": torch.zeros(1, 4),
        "dominant_full": torch.full((1, 4), 2), "tokens_full": torch.full((1, 4), 64),
        "max_logit": max_logit, "logit_spread": 3 * max_logit,
        "query_norm": torch.ones(1, 4, dtype=torch.float64),
        "key_norm": torch.ones(1, 4, dtype=torch.float64), "kv_head": torch.arange(4)[None],
    })
    snapshot = Snapshot(step=step, tau=0.9, layers=accumulator.compute(["m.0.attn"]))
    return AlertMonitor(AlertRules()).judge(snapshot)


@pytest.mark.parametrize("per_head", [True, "all"])
def test_qk_clip_dry_run_and_alerts(tmp_path, per_head):
    """With logit_cap, the QK-Clip factor min(1, cap / max_logit) of the heads with per-head
    scalars (every head with per_head="all", the alert's head by default) and the share of heads
    above the cap; alerts are counted per kind and written as a table, once per step."""
    snapshot = logit_snapshot()
    (alert,) = snapshot.alerts
    assert alert.kind == "logit" and alert.heads == (1,)
    with TensorBoardOutput(str(tmp_path), pictures_every=0, logit_cap=100.0,
                           per_head=per_head) as writer:
        writer.write(snapshot)
    scalars = read_scalars(tmp_path)
    max_logit = np.array([50.0, 400.0, 100.0, 250.0])
    want = np.minimum(1.0, 100.0 / max_logit)  # 1, 0.25, 1, 0.4
    heads = range(4) if per_head == "all" else [1]
    assert {t for t in scalars if t.startswith("qk_clip/gamma/")} == {
        f"qk_clip/gamma/L00/H{h:02d}" for h in heads}
    for head in heads:
        assert scalars[f"qk_clip/gamma/L00/H{head:02d}"] == {7: pytest.approx(want[head])}
        assert scalars[f"max_logit/head/L00/H{head:02d}"] == {7: pytest.approx(max_logit[head])}
        assert scalars[f"logit_spread/head/L00/H{head:02d}"] == {
            7: pytest.approx(3 * max_logit[head])}
    assert scalars["qk_clip/share_above/L00"] == {7: pytest.approx(0.5)}
    assert scalars["max_logit/max/L00"] == {7: pytest.approx(400.0)}
    assert scalars["max_logit/log10/L00"] == {7: pytest.approx(math.log10(400.0))}
    assert scalars["logit_spread/log10/L00"] == {7: pytest.approx(math.log10(1200.0))}
    assert scalars["alert/logit"] == {7: 1.0} and scalars["alert/entropy"] == {7: 0.0}
    ((step, text),) = read_texts(tmp_path)["alerts/text_summary"]
    (row,) = markdown_rows(text)
    assert step == 7 and row == {
        "step": "7", "layer": "L00", "module": "m.0.attn", "kind": "logit",
        "severity": "critical", "heads": "1", "figure": "logit_spread", "reduction": "max",
        "condition": "above", "value": "1200", "threshold": "1000", "since": "7",
        "since_value": "1200", "cause": alert.cause, "message": alert.message,
    }


# ------------------------------------------------------------- head states and alerted heads


def full_snapshot(step: int, heads: int = 8, alerts=(), states=None, **per_head) -> Snapshot:
    """One layer (``m.0.attn``) of ``heads`` heads with every figure measured, the per-head
    values given in ``per_head`` (the rest constant), alerts and states as given."""
    figures = {
        "rank": torch.full((1, heads), 5.0), "columns": torch.full((1, heads), 8.0),
        "entropy": torch.ones(1, heads, dtype=torch.float64), "sink": torch.zeros(1, heads),
        "dominant": torch.full((1, heads), 2), "columns_full": torch.full((1, heads), 9),
        "entropy_full": torch.ones(1, heads), "entropy_norm_full": torch.full((1, heads), 0.5),
        "sink_full": torch.zeros(1, heads), "sink_logit_full": torch.zeros(1, heads),
        "dominant_full": torch.full((1, heads), 2), "tokens_full": torch.full((1, heads), 64),
        "max_logit": torch.full((1, heads), 10.0, dtype=torch.float64),
    }
    for name, values in per_head.items():
        figures[name] = torch.tensor([values], dtype=torch.float64)
    accumulator = HeadAccumulator()
    accumulator.update("m.0.attn", figures)
    layers = accumulator.compute(["m.0.attn"])
    return Snapshot(step=step, tau=0.9, layers=layers, alerts=tuple(alerts),
                    states={} if states is None else {"m.0.attn": np.asarray(states)})


def make_alert(kind: str, step: int, heads, value: float, figure: str, condition: str) -> Alert:
    return Alert(kind, "m.0.attn", "L00", tuple(heads), step, figure, "max", condition, value,
                 1.0, step, value, f"{kind} at {step}")


def test_per_head_scalars_follow_the_heads_an_alert_names(tmp_path):
    """By default a head gets scalars once an alert names it, from that step on: the figures of
    the alert's kind, for at most four heads per layer and kind, the most extreme first."""
    entropy = [0.05, 0.5, 0.01, 0.3, 0.02, 0.04, 0.6, 0.7]
    logits = [10.0, 10.0, 10.0, 10.0, 10.0, 10.0, 10.0, 900.0]
    snapshots = [
        full_snapshot(0, entropy_norm_full=entropy, max_logit=logits),
        full_snapshot(5, entropy_norm_full=entropy, max_logit=logits,
                      alerts=[make_alert("entropy", 5, range(6), 0.1, "entropy_norm_full", "below")]),
        full_snapshot(10, entropy_norm_full=entropy, max_logit=logits,
                      alerts=[make_alert("logit", 10, [7], 900.0, "logit_spread", "above")]),
        # a later alert of the same layer and figure naming other heads adds none: four in all
        full_snapshot(15, entropy_norm_full=entropy, max_logit=logits,
                      alerts=[make_alert("entropy", 15, [1, 3, 6], 0.01, "entropy_norm_full",
                                         "below")]),
    ]
    with TensorBoardOutput(str(tmp_path), pictures_every=0) as writer:
        for snapshot in snapshots:
            writer.write(snapshot)
    scalars = read_scalars(tmp_path)
    per_head = {tag: series for tag, series in scalars.items() if "/head/" in tag}
    # heads 0-5 named; the four with the lowest entropy are 2, 4, 5 and 0
    want = {f"entropy_norm_full/head/L00/H{h:02d}": {5: entropy[h], 10: entropy[h],
                                                     15: entropy[h]}
            for h in (0, 2, 4, 5)}
    want["max_logit/head/L00/H07"] = {10: 900.0, 15: 900.0}  # logit_spread: not measured
    assert per_head.keys() == want.keys()
    for tag, series in want.items():
        assert per_head[tag] == pytest.approx(series), tag
    assert scalars["alert/entropy"] == {0: 0.0, 5: 1.0, 10: 1.0, 15: 2.0}
    assert scalars["alert/logit"] == {0: 0.0, 5: 0.0, 10: 1.0, 15: 1.0}
    with pytest.raises(ValueError, match="per_head must be"):
        TensorBoardOutput(str(tmp_path / "x"), per_head="some")


def test_a_uniform_alert_follows_its_most_uniform_heads(tmp_path):
    """A uniform alert (entropy above its threshold) naming six heads: the four closest to
    uniform get scalars."""
    entropy = [0.991, 0.999, 0.995, 0.9999, 0.992, 0.998]
    snapshot = full_snapshot(5, heads=6, entropy_norm_full=entropy, alerts=[
        make_alert("uniform", 5, range(6), 0.991, "entropy_norm_full", "above")])
    with TensorBoardOutput(str(tmp_path), pictures_every=0) as writer:
        writer.write(snapshot)
    per_head = {tag for tag in read_scalars(tmp_path) if "/head/" in tag}
    assert per_head == {f"entropy_norm_full/head/L00/H{h:02d}" for h in (1, 2, 3, 5)}


def test_health_scalars_images_and_timeline(tmp_path):
    """``health/Lxx`` is the worst state of the layer's heads at each step; on picture steps the
    layer x head map and the timeline of every step so far, which is the figure of the states
    the event files hold."""
    from attn_probe.outputs import health

    states = [[1, 1, 2, 1], [1, 5, 2, 3], [6, 5, 1, 1]]
    snapshots = [full_snapshot(step, heads=4, states=codes)
                 for step, codes in zip((0, 5, 10), states)]
    with TensorBoardOutput(str(tmp_path), heatmaps={}, pictures_every=10) as writer:
        for snapshot in snapshots:  # pictures at steps 0 and 10
            writer.write(snapshot)
    scalars = read_scalars(tmp_path)
    assert scalars["health/L00"] == {0: 2.0, 5: 5.0, 10: 6.0}  # the worst (largest) code
    images = read_images(tmp_path)
    assert [image.step for image in images["health/heads"]] == [0, 10]
    assert [image.step for image in images["health/timeline"]] == [0, 10]
    last = images["health/timeline"][-1]
    drawn = plots.plot_to_array(health.health_timeline(
        [0, 5, 10], np.array([[2, 5, 6]]), layer_labels=["L00"],
        title="worst head state of each layer, steps 0-10"))
    logged = np.asarray(Image.open(io.BytesIO(last.png)).convert("RGB"))
    assert np.array_equal(logged, drawn)
    heads = np.asarray(Image.open(io.BytesIO(images["health/heads"][-1].png)).convert("RGB"))
    assert np.array_equal(heads, plots.plot_to_array(health.head_state_map(
        np.array([states[2]]), layer_labels=["L00"], title="head states, step 10")))
    layout = {c.title for cat in read_layouts(tmp_path)[0][1].category for c in cat.chart}
    assert {"max_logit/log10 (max over heads)", "entropy_norm_full/mean (mean over heads)",
            "health (worst head state: 1 healthy ... 6 logits exploding)"} <= layout


@pytest.mark.slow
def test_a_32_layer_32_head_model_stays_within_the_tag_bound(tmp_path):
    """A 32-layer, 32-head GPT probed under the defaults: at most 15 scalar tags per layer,
    a few more for the alerts, where per_head used to give 96 per layer."""
    from attn_probe import AttentionProbe
    from attn_probe.models.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=32, n_head=32, n_embd=64))
    with AttentionProbe(
        model, every=1, outputs=[TensorBoardOutput(str(tmp_path), pictures_every=0)],
    ) as probe:
        for _ in range(2):
            model(torch.randint(64, (2, 16)))
            probe.step()
    tags = set(read_scalars(tmp_path))
    per_layer: dict[str, int] = {}
    for tag in tags:
        match = re.search(r"/(L\d\d)$", tag)
        if match:
            per_layer[match.group(1)] = per_layer.get(match.group(1), 0) + 1
    assert sorted(per_layer) == [f"L{i:02d}" for i in range(32)]
    assert max(per_layer.values()) <= 15, per_layer
    others = tags - {tag for tag in tags if re.search(r"/L\d\d$", tag)}
    kinds = ("logit", "entropy", "uniform", "lazy", "sink")
    assert others == {f"alert/{kind}" for kind in kinds}
    assert len(tags) <= 15 * 32 + len(kinds)
