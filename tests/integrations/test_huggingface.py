"""The Hugging Face Trainer callback in a real (tiny) training run.

The run trains a few steps with gradient accumulation and with evaluation between steps. A
recording callback keeps, for every optimizer step, the first micro-batch and the weights it ran
with; the test rebuilds those attention matrices from the model's own eager attention, computes
rank@0.9 and columns@0.9 with the float64 reference count and checks them against the event
files, step for step. Evaluation batches must never be measured.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
from extras_rule import extra
import torch

import unstable_run
from attn_probe.cli.report import write_report
from attn_probe import AlertRules, CaptureOptions, EntropyRule, TensorBoardOutput
from reference import (
    assert_alert_logged,
    assert_logged,
    check_report,
    no_hooks_left,
    read_scalars,
    reference_layer_means,
)

TAU = 0.9
TOL = 1e-9
MAX_SEQUENCES, MAX_TOKENS = 2, 16


def check_against_reference(scalars, want, step: int, layers: int) -> float:
    return assert_logged(scalars, want, step, layers, TOL)


def random_tokens(n: int, length: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


def trainer_run(trainer) -> Path:
    """The directory the Trainer's own TensorBoardCallback wrote to: the callback's
    ``logging_dir`` (transformers 5), else ``args.logging_dir`` (transformers 4)."""
    (tensorboard,) = [c for c in trainer.callback_handler.callbacks
                      if type(c).__name__ == "TensorBoardCallback"]
    return Path(getattr(tensorboard, "logging_dir", None) or trainer.args.logging_dir)


def test_huggingface_trainer_logs_first_micro_batch_of_sampled_steps(tmp_path, monkeypatch):
    transformers = extra("transformers")
    extra("accelerate", reason="transformers.Trainer needs accelerate")
    from attn_probe.integrations.huggingface import AttentionProbeCallback

    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    config = transformers.GPT2Config(
        n_layer=2, n_head=4, n_embd=32, vocab_size=97, n_positions=64, bos_token_id=0,
        eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel._from_config(config, attn_implementation="sdpa")
    with torch.no_grad():  # larger q, k: heads of different ranks
        for block in model.transformer.h:
            block.attn.c_attn.weight[:, : 2 * config.n_embd].mul_(20.0)

    train_length, eval_length = 20, 18
    train = list(random_tokens(48, train_length, config.vocab_size, seed=1))
    evaluation = list(random_tokens(3, eval_length, config.vocab_size, seed=2))
    fed: list[torch.Tensor] = []  # training batches, in the order the Trainer consumed them

    def collate(features):
        batch = torch.stack(features)
        if batch.shape[1] == train_length:
            fed.append(batch.clone())
        return {"input_ids": batch, "labels": batch}

    weights: dict[int, dict] = {}

    class Weights(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            weights[state.global_step + 1] = {
                k: v.detach().clone() for k, v in model.state_dict().items()
            }

    accumulation = 2
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=6, logging_steps=2, per_device_train_batch_size=3,
        per_device_eval_batch_size=3, gradient_accumulation_steps=accumulation,
        learning_rate=1e-2, report_to="tensorboard", use_cpu=True, save_strategy="no",
        eval_strategy="steps", eval_steps=1, eval_on_start=True, disable_tqdm=True,
        dataloader_num_workers=0, seed=0,
    )
    callback = AttentionProbeCallback(
        history=1000, capture=CaptureOptions(batch_rows=MAX_SEQUENCES, crop=MAX_TOKENS),
        outputs=[TensorBoardOutput(per_head="all")],
    )
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=train, eval_dataset=evaluation,
        data_collator=collate, callbacks=[Weights(), callback],
    )
    trainer.train()

    probe = callback.probe
    assert probe.every == 2  # from logging_steps
    assert no_hooks_left(model)
    # The probe writes beside the Trainer's own TensorBoard run: one run, shared steps.
    run = trainer_run(trainer)
    assert run.parent == tmp_path / "runs"
    scalars = read_scalars(run)
    assert sorted(scalars["train/loss"]) == [2, 4, 6]
    for tag in ("rank90/max/L00", "rank90/max/L01", "columns90/max/L01",
                "entropy_norm_full/mean/L00"):
        assert sorted(scalars[tag]) == [2, 4, 6], (tag, scalars[tag])
    assert [s.step for s in probe.history] == [2, 4, 6]

    eager = transformers.GPT2LMHeadModel._from_config(config, attn_implementation="eager").eval()
    worst, closest = 0.0, math.inf
    for step in (2, 4, 6):
        eager.load_state_dict(weights[step])
        first = fed[(step - 1) * accumulation]  # the step's first micro-batch
        with torch.no_grad():
            attentions = eager(first, output_attentions=True).attentions
        measured = [a[:MAX_SEQUENCES, :, :MAX_TOKENS, :MAX_TOKENS] for a in attentions]
        want, gap = reference_layer_means(measured, TAU)
        closest = min(closest, gap)
        worst = max(worst, check_against_reference(scalars, want, step, config.n_layer))
    print(f"hf: worst |logged - reference| {worst:.3g}, closest decision {closest:.3g}")


def test_huggingface_default_log_dir(tmp_path):
    """Where a TensorBoardOutput() with no directory logs: the TensorBoardCallback's own
    writer's directory, whatever its name; no name is guessed."""
    extra("transformers")
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback

    from attn_probe.integrations.huggingface import default_log_dir

    args = SimpleNamespace(output_dir=str(tmp_path))
    tensorboard = TensorBoardCallback()
    assert default_log_dir(args, [tensorboard]) == str(tmp_path / "attn_probe")  # not started
    with SummaryWriter(str(tmp_path / "any name")) as writer:
        tensorboard.tb_writer = writer
        assert default_log_dir(args, [tensorboard]) == str(tmp_path / "any name")
    assert default_log_dir(SimpleNamespace(output_dir="x", logging_dir="logs")) == "logs"


# --------------------------------------------------------------------------- stop_on


def unstable_hf_run(tmp_path, name: str, **callback_options):
    """The unstable run (``tests/unstable_run.py``) in a ``Trainer``, 25 steps, logging and
    sampling every 5, evaluating every 5: returns the trainer, the callback, the alerts its
    user ``on_alert`` saw, the warnings and the TensorBoard run's scalars."""
    import transformers

    from attn_probe.integrations.huggingface import AttentionProbeCallback

    class HFGPT(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gpt = unstable_run.unstable_gpt()

        def forward(self, input_ids):
            _, loss = self.gpt(input_ids[:, :-1], input_ids[:, 1:])
            return {"loss": loss}

    model = HFGPT()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / name), max_steps=25, logging_steps=5, eval_strategy="steps",
        eval_steps=5, per_device_train_batch_size=unstable_run.BATCH,
        per_device_eval_batch_size=unstable_run.BATCH, learning_rate=unstable_run.LR,
        lr_scheduler_type="constant", weight_decay=unstable_run.WEIGHT_DECAY,
        max_grad_norm=unstable_run.CLIP, report_to="tensorboard", use_cpu=True,
        save_strategy="no", disable_tqdm=True, dataloader_num_workers=0, seed=0,
    )
    seen = []
    callback = AttentionProbeCallback(
        history=1000, on_alert=lambda alert, snapshot: seen.append(alert),
        capture=CaptureOptions(batch_rows=2),
        **callback_options,
    )
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=list(unstable_run.windows(8 * 25)),
        eval_dataset=list(unstable_run.windows(8, seed=1)),
        data_collator=lambda features: {"input_ids": torch.stack(features)}, callbacks=[callback],
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert no_hooks_left(model)
    messages = [str(w.message) for w in caught]
    return trainer, callback, seen, messages, trainer_run(trainer)


def test_huggingface_stop_on_entropy_stops_at_the_step_of_the_alert(tmp_path, monkeypatch,
                                                                   single_thread):
    extra("transformers")
    extra("accelerate", reason="transformers.Trainer needs accelerate")
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)

    # An entropy level this short run's collapse of layer 0 passes well clear of (its mean
    # normalised entropy 0.057 at step 10, 0.009 at step 15).
    rules = AlertRules(entropy=EntropyRule(warning=0.02))
    # Without stop_on: the alerts fire and training runs to max_steps.
    trainer, callback, seen, messages, run = unstable_hf_run(tmp_path, "full", alerts=rules)
    scalars = read_scalars(run)
    sampled = [5, 10, 15, 20, 25]
    full = unstable_run.layer_figures(callback.probe.history)
    assert sorted(full) == sampled
    entropy = next(a for a in callback.probe.alerts if a.kind == "entropy")
    assert entropy.tag == "L00"
    unstable_run.assert_clear_of_thresholds(full, until=entropy.step, kind="entropy",
                                            rules=rules)
    assert 5 <= entropy.step < 25, full  # the collapse comes well before the end
    assert trainer.state.global_step == 25 and callback.stopped_by is None
    assert not [m for m in messages if "stopping training" in m]
    assert unstable_run.probe_steps(scalars) == set(sampled)
    logit = [a for a in callback.probe.alerts if a.kind == "logit"]
    assert logit and logit[0].step <= entropy.step  # the growth was warned about too

    # The same run with stop_on: it stops right after the step of the entropy alert.
    trainer, callback, seen, messages, run = unstable_hf_run(
        tmp_path, "stop", stop_on=("entropy",), alerts=rules)
    scalars = read_scalars(run)
    alert = callback.stopped_by
    # the logit warning is not a stop_on kind: the entropy alert is what stopped training
    assert alert is not None and (alert.kind, alert.tag, alert.step) == (
        "entropy", entropy.tag, entropy.step)
    assert alert.value == pytest.approx(entropy.value, rel=1e-6)  # the same run up to here
    assert trainer.state.global_step == alert.step
    before = [step for step in sampled if step <= alert.step]
    assert [s.step for s in callback.probe.history] == before
    # the user's own on_alert still sees every alert, the stopping one too
    assert seen == callback.probe.alerts and alert in seen
    (stop_line,) = [m for m in messages if "stopping training" in m]
    assert f"after step {alert.step}" in stop_line and "'entropy'" in stop_line
    # The event files: the alert at its step, no probe scalar after it; the Trainer's own loss
    # stops there too. The evaluation that runs after the last step is not measured (the probe
    # measured 2 sequences per step, the training batch's).
    assert_alert_logged(run, alert)
    # the report reads the framework's run: its loss, and every alert of the probe
    page = check_report(write_report(run, tmp_path / "report.html"), callback.probe.alerts)
    assert any(attrs.get("alt", "").endswith("training loss (train/loss)")
               for tag, attrs in page.elements if tag == "img")
    assert unstable_run.probe_steps(scalars) == set(before)
    assert max(scalars["train/loss"]) == alert.step == max(scalars["eval/runtime"])
    assert {c for s in callback.probe.history for layer in s.layers
            for c in layer.counts.tolist()} == {2}
