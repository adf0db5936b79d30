"""AttentionProbe end to end: schedule, values read back from event files, invariance, failures."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attn_probe
from attn_probe.models.gpt import GPT, GPTConfig
from attn_probe.alerts import AlertRules, LazyRule
from reference import (
    GPTAttention,
    assert_logged,
    no_hooks_left,
    read_images,
    read_scalars,
    reference_counts,
    reference_entropy_sink,
    reference_layer_means,
    scalar_events,
)
from toy_models import small_gpt



def rank_means(attention: torch.Tensor) -> np.ndarray:
    """(B, H, T, T) -> per-head mean over sequences of the reference rank@0.9."""
    return reference_counts(attention)[0].mean(0).numpy()


def batches(n, b=4, t=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 64, (b, t + 1), generator=g) for _ in range(n)]


def train(model, data, probe=None, *, accumulate=1, lr=0.05, autocast=False):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    losses = []
    for x in data:
        for micro in x.chunk(accumulate):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                _, loss = model(micro[:, :-1], micro[:, 1:])
            (loss / accumulate).backward()
            losses.append(loss.detach().clone())
        opt.step()
        opt.zero_grad()
        if probe is not None:
            probe.step()
    return losses


# ------------------------------------------------------------------------------- values
def test_logged_values_equal_independent_reference(tmp_path):
    model = small_gpt()
    data = batches(7)
    with GPTAttention(model, batch_rows=3, crop=16) as ref:
        with attn_probe.AttentionProbe(
            model, every=3, capture=attn_probe.CaptureOptions(batch_rows=3, crop=16),
            outputs=[attn_probe.TensorBoardOutput(tmp_path, pictures_every=3, per_head="all")],
            history=1000,
        ) as probe:
            train(model, data, probe)
    sampled = [0, 3, 6]
    assert [step for step, _ in scalar_events(tmp_path)["rank90/max/L00"]] == sampled
    scalars = read_scalars(tmp_path)
    history = {snapshot.step: snapshot for snapshot in probe.history}
    for step in sampled:
        attentions = [ref.calls[step][layer] for layer in range(2)]
        # rank90 and columns90: the max over heads and every head
        want, _ = reference_layer_means(attentions)
        assert_logged(scalars, want, step, layers=2, tol=1e-6)
        for layer, a in enumerate(attentions):
            per_matrix = torch.tensor([[reference_entropy_sink(m) for m in seq] for seq in a])
            entropy, sink = per_matrix.mean(0).mean(0).tolist()  # over sequences, then heads
            summary = history[step].layers[layer]  # the matrix's entropy and sink: not logged
            assert summary.reduce("entropy", "mean") == pytest.approx(entropy, abs=1e-5)
            assert summary.reduce("sink", "mean") == pytest.approx(sink, abs=1e-5)
    images = read_images(tmp_path)
    assert {"collapse_map/rank90", "profile/max_rank90"} <= set(images)
    assert [image.step for image in images["collapse_map/rank90"]] == sampled


def test_gradient_accumulation_measures_first_forward_only(tmp_path):
    model = small_gpt()
    data = batches(2, b=8)
    with GPTAttention(model, batch_rows=2, crop=24) as ref:
        with attn_probe.AttentionProbe(
            model, every=1, capture=attn_probe.CaptureOptions(batch_rows=2, crop=24), history=1000,
        ) as probe:
            train(model, data, probe, accumulate=2)
    assert len(ref.calls) == 4  # two micro-batches per step
    for step, snapshot in enumerate(probe.history):
        first = rank_means(ref.calls[2 * step][1])
        np.testing.assert_allclose(snapshot.layers[1].heads["rank"], first)
        assert snapshot.layers[1].counts.tolist() == [2] * 4


def test_global_step_and_schedule(tmp_path):
    model = small_gpt()
    with attn_probe.AttentionProbe(model, log_dir=tmp_path, every=5, history=1000) as probe:
        for step in range(100, 112):
            model(torch.randint(0, 64, (2, 8)))
            probe.step(step)
    # sampled steps are the multiples of `every`; the first step is measured too
    assert [s.step for s in probe.history] == [100, 105, 110]
    steps = [step for step, _ in scalar_events(tmp_path)["rank90/max/L01"]]
    assert steps == [100, 105, 110]
    # offset=-1: the steps a logger counting from 1 logs at (Lightning)
    with attn_probe.AttentionProbe(model, every=5, offset=-1, history=1000) as probe:
        for _ in range(12):
            model(torch.randint(0, 64, (2, 8)))
            probe.step()
    assert [s.step for s in probe.history] == [4, 9]


def test_close_step_measures_nothing_until_open_step(tmp_path):
    """close_step() logs the step and opens none: passes in between (evaluation) are not
    measured; open_step() measures the next (or a given) step. step() is the two at once."""
    model = small_gpt()
    x = [torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(i))
         for i in range(4)]
    with GPTAttention(model, batch_rows=1, crop=8) as ref:
        with attn_probe.AttentionProbe(
            model, log_dir=tmp_path, every=1, capture=attn_probe.CaptureOptions(crop=8),
            history=1000,
        ) as probe:
            model(x[0])
            assert probe.close_step().step == 0
            assert not probe.sampling
            model(x[1])  # between steps: not measured
            assert probe.close_step() is None  # nothing open, nothing logged; counter moves
            probe.open_step()
            assert probe.sampling
            model(x[2])
            assert probe.close_step(5).step == 5
            probe.open_step(9)
            model(x[3])
        # leaving the block closes the step that is open
    assert [s.step for s in probe.history] == [0, 5, 9]
    for snapshot, call in zip(probe.history, (0, 2, 3)):
        np.testing.assert_allclose(snapshot.layers[1].heads["rank"],
                                   rank_means(ref.calls[call][1]))
    assert sorted(read_scalars(tmp_path)["rank90/max/L01"]) == [0, 5, 9]


def test_unsampled_steps_do_not_measure():
    model = small_gpt()
    calls = []
    with attn_probe.AttentionProbe(model, every=4) as probe:
        probe._recorder.on_attention = lambda name, a: calls.append(name)
        for _ in range(8):
            model(torch.randint(0, 64, (2, 8)))
            probe.step()
    assert calls == ["transformer.h.0.attn", "transformer.h.1.attn"] * 2


# ---------------------------------------------------------------------------- invariance
@pytest.mark.parametrize("mode", ["train", "eval", "no_grad", "bf16"])
def test_losses_and_gradients_bitwise_identical(mode, tmp_path):
    def run(with_probe):
        model = small_gpt(seed=3, dropout=0.1)
        model.train(mode == "train")
        data = batches(3, seed=5)
        torch.manual_seed(11)
        grads, losses = [], []
        probe = attn_probe.AttentionProbe(
            model, every=1,
            outputs=[attn_probe.TensorBoardOutput(tmp_path / str(with_probe), pictures_every=2)],
        ) if with_probe else None
        if probe:
            probe.attach()
        try:
            for x in data:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bf16"):
                    if mode == "no_grad":
                        with torch.no_grad():
                            losses.append(model(x[:, :-1], x[:, 1:])[1])
                    else:
                        loss = model(x[:, :-1], x[:, 1:])[1]
                        loss.backward()
                        losses.append(loss.detach())
                        grads.append([p.grad.clone() for p in model.parameters()])
                        model.zero_grad()
                if probe:
                    probe.step()
        finally:
            if probe:
                probe.detach()
        return losses, grads

    (l0, g0), (l1, g1) = run(False), run(True)
    assert all(torch.equal(a, b) for a, b in zip(l0, l1))
    assert all(torch.equal(a, b) for ga, gb in zip(g0, g1) for a, b in zip(ga, gb))


def test_no_hook_left_after_exit_also_when_training_raises(tmp_path):
    model = small_gpt()
    with pytest.raises(RuntimeError, match="boom"):
        with attn_probe.AttentionProbe(model, log_dir=tmp_path, every=1) as probe:
            assert not no_hooks_left(model)
            for step in range(3):
                model(torch.randint(0, 64, (2, 8)))
                probe.step()
            model(torch.randint(0, 64, (2, 8)))  # step 3 measured, never closed
            raise RuntimeError("boom")
    assert no_hooks_left(model)
    assert torch._C._len_torch_function_stack() == 0
    # everything measured was flushed, including the step the exception interrupted
    assert [step for step, _ in scalar_events(tmp_path)["rank90/max/L00"]] == [0, 1, 2, 3]


def test_forward_raising_inside_module_leaves_no_mode(tmp_path):
    model = small_gpt()
    with attn_probe.AttentionProbe(model, every=1):
        with pytest.raises(ValueError, match="longer than block_size"):
            model(torch.randint(0, 64, (1, 40)))
        with pytest.raises(RuntimeError):
            model.transformer.h[0].attn(torch.randn(2, 5, 7))  # wrong width inside the forward
        assert torch._C._len_torch_function_stack() == 0
    assert no_hooks_left(model)


# ---------------------------------------------------------------------- failures, collapse
def test_nan_attention_is_flagged_not_a_crash(tmp_path):
    model = small_gpt()
    with torch.no_grad():
        model.transformer.h[1].attn.c_attn.weight[0, 0] = float("nan")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with attn_probe.AttentionProbe(
            model, log_dir=tmp_path, every=1, capture=attn_probe.CaptureOptions(batch_rows=2),
        ) as probe:
            model(torch.randint(0, 64, (2, 8)))
            probe.step()
    assert any("NaN or Inf" in str(w.message) for w in caught)
    scalars = scalar_events(tmp_path)
    assert [value for _, value in scalars["nonfinite/L01"]] == [2.0]
    assert "nonfinite/L00" not in scalars
    assert math.isfinite(scalars["rank90/max/L00"][0][1])


class Custom(nn.Module):
    """No kernel to intercept: served by the (failing) adapter registered for it."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        return x + self.proj(x).relu()


def test_failing_adapter_skips_its_module_and_training_goes_on(tmp_path):
    def broken(module, args, kwargs, *, batch_rows, crop):
        raise RuntimeError("adapter bug")

    def run(probe_dir):
        torch.manual_seed(0)
        model = nn.Sequential(SinkAttention(collapsed=False), Custom())
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        probe = None
        if probe_dir is not None:
            probe = attn_probe.AttentionProbe(
                model, every=2, outputs=[attn_probe.TensorBoardOutput(probe_dir, pictures_every=0)],
            )
            assert [s.name for s in probe.sites] == ["0", "1"]
            probe.attach()
        losses = []
        for step in range(6):
            x = torch.randn(2, 6, 8, generator=torch.Generator().manual_seed(step))
            loss = model(x).pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.detach())
            if probe is not None:
                probe.step()
        if probe is not None:
            probe.detach()
        return losses

    handle = attn_probe.register_adapter(Custom, broken)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            losses = run(tmp_path)
    finally:
        handle.remove()
    assert torch.equal(torch.stack(losses), torch.stack(run(None)))  # training unchanged
    about = [str(w.message) for w in caught if "'1'" in str(w.message)]
    assert len(about) == 1 and "adapter bug" in about[0], about
    scalars = scalar_events(tmp_path)
    assert [step for step, _ in scalars["rank90/max/L00"]] == [0, 2, 4]
    assert not [tag for tag in scalars if tag.endswith("L01")]


class Recording(attn_probe.Output):
    """A user's own output: keeps what it is given."""

    def __init__(self, crop: int = 0):
        self.crop, self.layers, self.written, self.closed = crop, None, [], 0

    def start(self, layers):
        self.layers = list(layers)

    def pictures(self, step):
        return self.crop if step % 2 == 0 else 0

    def write(self, snapshot):
        self.written.append(snapshot)

    def close(self):
        self.closed += 1


def test_own_output_receives_every_snapshot_and_alert_and_is_closed_once():
    model = nn.Sequential(SinkAttention(collapsed=False), SinkAttention(collapsed=True))
    mine = Recording(crop=4)
    with attn_probe.AttentionProbe(model, every=2, outputs=[mine], history=3) as probe:
        for _ in range(7):
            model(torch.randn(2, 6, 8))
            probe.step()
    assert mine.layers == ["0", "1"]
    assert [s.step for s in mine.written] == [0, 2, 4, 6]
    assert [a for s in mine.written for a in s.alerts] == probe.alerts and probe.alerts
    # pictures where the output asked for them (steps 0, 2, 4, 6 are even), cropped as asked
    assert all(s.samples["0"].shape == (2, 4, 4) for s in mine.written)
    assert mine.closed == 1
    # the figures are the probe's own: the same objects as probe.last / probe.history
    assert mine.written[-1] is probe.last
    assert [s.step for s in probe.history] == [2, 4, 6]  # bounded: the last 3


def test_failing_output_warns_once_and_the_others_go_on():
    class FullDisk:
        def add_scalar(self, *args, **kwargs):
            raise OSError("No space left on device")

        add_custom_scalars = add_image = add_text = add_scalar

        def flush(self):
            pass

    model = small_gpt()
    mine = Recording()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with attn_probe.AttentionProbe(
            model, every=1, outputs=[attn_probe.TensorBoardOutput(writer=FullDisk()), mine],
        ) as probe:
            for _ in range(3):
                model(torch.randint(0, 64, (2, 8)))
                probe.step()
    about = [str(w.message) for w in caught if "TensorBoardOutput.write() failed" in str(w.message)]
    assert len(about) == 1 and "No space left on device" in about[0], about
    assert [s.step for s in mine.written] == [0, 1, 2] and probe.last.step == 2


@pytest.mark.parametrize("main_process", [True, False])
def test_bad_settings_refused_when_the_probe_is_made_on_every_process(monkeypatch, main_process):
    """Process 0 and the others refuse the same mistakes at once, before any training."""
    monkeypatch.setattr(attn_probe.aggregate, "is_main_process", lambda: main_process)
    model = small_gpt()
    TB = attn_probe.TensorBoardOutput
    mistakes = {
        "per_head": lambda: attn_probe.AttentionProbe(model, outputs=[TB(per_head="al")]),
        "not an attn_probe.Output": lambda: attn_probe.AttentionProbe(model, outputs=["runs/x"]),
        "heatmaps: .*L09": lambda: attn_probe.AttentionProbe(
            model, outputs=[TB(heatmaps={"L09": [0]})]),
        "capture takes attn_probe.CaptureOptions": lambda: attn_probe.AttentionProbe(
            model, capture={"crop": 16}),
        "crop must be an int >= 2": lambda: attn_probe.CaptureOptions(crop=1),
        "history": lambda: attn_probe.AttentionProbe(model, history=-1),
        "on_alert": lambda: attn_probe.AttentionProbe(model, on_alert="print"),
        "logit_cap": lambda: TB(logit_cap=0),
    }
    for message, make in mistakes.items():
        with pytest.raises((ValueError, TypeError), match=message):
            make()


class SinkAttention(nn.Module):
    """Every query attends to key 0 only: a lazy layer by construction."""

    def __init__(self, collapsed: bool):
        super().__init__()
        self.collapsed = collapsed
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        b, t, c = x.shape
        q = k = v = self.proj(x).view(b, t, 2, 4).transpose(1, 2)
        mask = torch.zeros(t, t, dtype=torch.bool)
        mask[:, 0] = True
        if not self.collapsed:
            mask = torch.ones(t, t, dtype=torch.bool).tril()
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return out.transpose(1, 2).reshape(b, t, c)


def test_lazy_layer_is_an_info_alert_given_to_on_alert():
    model = nn.Sequential(SinkAttention(collapsed=False), SinkAttention(collapsed=True))
    seen = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with attn_probe.AttentionProbe(
            model, every=1, alerts=AlertRules(lazy=LazyRule(max_rank=1.0, max_columns=1.0)),
            on_alert=lambda alert, snap: seen.append((alert.kind, alert.layer, snap.step)),
        ) as probe:
            for _ in range(3):
                model(torch.randn(2, 6, 8))
                probe.step()
    assert ("lazy", "1", 0) in seen and [s for s in seen if s[0] == "lazy"] == [("lazy", "1", 0)]
    assert not [w for w in caught if "lazy" in str(w.message)]
    assert probe.lazy_layers == ["1"]
    assert probe.last.layers[1].heads["rank"].tolist() == [1.0, 1.0]
    assert probe.last.layers[0].lazy_share == 0.0


def test_bad_arguments_say_what_to_do():
    model = small_gpt()
    TB = attn_probe.TensorBoardOutput
    with pytest.raises(ValueError, match="every must be a positive int"):
        attn_probe.AttentionProbe(model, every=0)
    with pytest.raises(ValueError, match="tau must be in"):
        attn_probe.CaptureOptions(tau=1.5)
    with pytest.raises(ValueError, match="not both"):
        TB("x", writer=object())
    with pytest.raises(LookupError, match="searched for"):
        attn_probe.AttentionProbe(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ValueError, match=r"crop must be an int >= 2 or None, got 1: a 1x1"):
        attn_probe.CaptureOptions(crop=1)
    with pytest.raises(ValueError, match="pictures_every must be a non-negative int"):
        TB(pictures_every=-1)
    # heatmap layers are checked against the monitored modules, with the package's lookup
    with pytest.raises(ValueError, match=r"no layer 'L09'; the layers are: L00 .*, L01"):
        attn_probe.AttentionProbe(model, outputs=[TB(heatmaps={"L09": [0], 0: [7]})])
    with pytest.raises(ValueError, match="no layer 2"):
        attn_probe.AttentionProbe(model, outputs=[TB(heatmaps={2: [0]})])
    with pytest.raises(ValueError, match=r"heatmaps\[-1\]: heads are numbers from 0, got -2"):
        TB(heatmaps={-1: [0, -2]})
    with pytest.raises(ValueError, match="expected head numbers"):
        TB(heatmaps={0: 3})
    output = TB(heatmaps={"L01": [1], -1: [0], 0: None})
    attn_probe.AttentionProbe(model, outputs=[output])
    assert output.heatmaps == {"transformer.h.1.attn": [1, 0], "transformer.h.0.attn": None}
    with pytest.raises(ValueError, match="attended over 1 token"):
        attn_probe.rank_profile(model, [torch.randint(0, 64, (1, 1))])


def test_heatmap_head_a_layer_lacks_warns_once(tmp_path):
    model = small_gpt()  # 4 heads per layer
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with attn_probe.AttentionProbe(
            model, every=1,
            outputs=[attn_probe.TensorBoardOutput(tmp_path, pictures_every=1,
                                                  heatmaps={0: [7, 1], "L01": [2]})],
        ) as probe:
            for _ in range(2):
                model(torch.randint(0, 64, (2, 8)))
                probe.step()
    messages = [str(w.message) for w in caught if "heatmaps" in str(w.message)]
    assert messages == ["attn_probe: heatmaps: layer L00 (transformer.h.0.attn) has 4 heads "
                        "(0 to 3); head 7 cannot be drawn"]
    images = read_images(tmp_path)
    assert {"attention/L00", "attention/L01"} <= set(images)  # the heads that exist are drawn


# ------------------------------------------------------------------------- torch.compile
def test_compiled_model_trains_correctly_with_probe(tmp_path):
    torch._dynamo.reset()
    model = small_gpt(seed=4)
    eager_twin = small_gpt(seed=4)
    compiled = torch.compile(model)
    data = batches(4, seed=9)
    with GPTAttention(model, batch_rows=1, crop=24) as ref:
        with attn_probe.AttentionProbe(model, log_dir=tmp_path, every=2, history=1000) as probe:
            losses = train(compiled, data, probe)
    twin_losses = train(eager_twin, data)
    torch.testing.assert_close(torch.stack(losses), torch.stack(twin_losses), rtol=1e-4, atol=1e-5)
    assert [s.step for s in probe.history] == [0, 2]
    # hooks traced into the compiled graph fire on every step; the probe's stay quiet there
    for snapshot in probe.history:
        expected = rank_means(ref.calls[snapshot.step][0][:1])
        np.testing.assert_allclose(snapshot.layers[0].heads["rank"], expected)


def test_long_sequences_are_measured_whole_under_the_defaults(tmp_path):
    """Sequences of 2,048 tokens under the default options: rank@90% on the first 256 tokens,
    every *_full figure and the max logit over all 2,048, on every sampled step."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, block_size=2048, n_layer=1, n_head=2, n_embd=16))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with attn_probe.AttentionProbe(
        model, every=2, outputs=[attn_probe.TensorBoardOutput(tmp_path, pictures_every=0)],
        history=1000,
    ) as probe:
        for _ in range(4):
            x = torch.randint(0, 64, (2, 2049))
            _, loss = model(x[:, :-1], x[:, 1:])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            probe.step()
    scalars = read_scalars(tmp_path)
    for tag in ("max_logit/max/L00", "max_logit/log10/L00", "entropy_norm_full/mean/L00",
                "sink_full/max/L00", "rank90/max/L00"):
        assert sorted(scalars[tag]) == [0, 2], tag
    for snapshot in probe.history:
        (layer,) = snapshot.layers
        assert layer.reduce("tokens_full", "max") == 2048
        assert layer.full_counts.tolist() == [1, 1] and layer.counts.tolist() == [1, 1]
        # columns over 2,048 keys can exceed what 256 keys allow
        assert layer.reduce("columns_full", "max") >= layer.reduce("columns", "max")
