"""Stress: many cycles of attach / train steps / detach with exceptions injected at random points.

Each cycle makes a probe on the same tiny model, trains one to three steps and ends it one of
three ways (``with``, ``attach()`` + ``finally: detach()``, or dropping the probe unfinished).
Faults are injected at random: an exception or a KeyboardInterrupt inside an attention forward,
an exception inside the metrics, inside the TensorBoard writer or in the user's loop; a few
cycles run a real Hugging Face ``Trainer.train()`` or Lightning ``fit`` that raises mid-run.

After every cycle: no hook or wrapper on any module, and the process as it was
(:func:`reference.process_state`: compiler stance, Dynamo's callback, grad mode, autocast,
default dtype, torch function modes, global hooks). At the end, the event files hold exactly the
steps whose measurement completed, read back with TensorBoard's own reader.
"""

from __future__ import annotations

import gc
import random

import pytest
from extras_rule import extra
import torch
from torch.utils.tensorboard import SummaryWriter

import attn_probe
import attn_probe.probe
from attn_probe.models.gpt import GPT, GPTConfig
from attn_probe.options import CaptureOptions
from attn_probe.outputs import TensorBoardOutput
from reference import hooks_on, process_state, read_scalars

pytestmark = [
    pytest.mark.usefixtures("single_thread"),
    pytest.mark.filterwarnings("ignore:attn_probe:UserWarning"),  # the injected faults'
]

CYCLES = 1000
VOCAB, T = 32, 8
TAG = "rank90/max/L01"  # the last layer: measured only when the whole forward ran


class Fault(Exception):
    """The injected failure."""


def tiny_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=VOCAB, block_size=T, n_layer=2, n_head=2, n_embd=16))


class Injector:
    """Arms one fault for one step; the patched places raise when it is theirs."""

    def __init__(self, model: GPT, monkeypatch):
        self.where: str | None = None
        metrics, write = attn_probe.probe.head_metrics, TensorBoardOutput.write

        def raise_in_attention(module, args, output):
            if self.where == "attention":
                raise Fault("inside attention")
            if self.where == "interrupt":
                raise KeyboardInterrupt

        def failing_metrics(*args, **kwargs):
            if self.where == "metrics":
                raise Fault("inside the metrics")
            return metrics(*args, **kwargs)

        def failing_write(writer, *args, **kwargs):
            if self.where == "writer":
                raise Fault("inside the writer")
            return write(writer, *args, **kwargs)

        model.transformer.h[1].attn.c_proj.register_forward_hook(raise_in_attention)
        monkeypatch.setattr(attn_probe.probe, "head_metrics", failing_metrics)
        monkeypatch.setattr(TensorBoardOutput, "write", failing_write)


def cycle(model, opt, writer, injector, rng, start: int) -> tuple[int, set[int]]:
    """One attach / train / end cycle from global step ``start``: (steps used, steps whose
    measurement must be in the event files)."""
    steps = rng.randint(1, 3)
    fault_at = rng.randrange(steps)
    fault = rng.choice(["attention", "interrupt", "metrics", "writer", "loop", None, None, None])
    ending = rng.choice(["with", "finally", "drop"])
    context = rng.choice(["train", "no_grad", "autocast"])
    probe = attn_probe.AttentionProbe(
        model, every=1, capture=attn_probe.CaptureOptions(crop=T),
        outputs=[TensorBoardOutput(writer=writer, per_head=False, pictures_every=0)],
    )
    completed: set[int] = set()
    forward_done = None  # the step whose forward ran but that no step() closed

    def train() -> None:
        nonlocal forward_done
        for i in range(steps):
            step = start + i
            injector.where = fault if i == fault_at else None
            x = torch.randint(0, VOCAB, (2, T + 1), generator=torch.Generator().manual_seed(step))
            if context == "no_grad":
                with torch.no_grad():
                    model(x[:, :-1], x[:, 1:])
            else:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=context == "autocast"):
                    _, loss = model(x[:, :-1], x[:, 1:])
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            forward_done = step
            if injector.where == "loop":
                raise Fault("in the loop")
            probe.step()
            forward_done = None
            if injector.where not in ("metrics", "writer"):
                completed.add(step)

    try:
        if ending == "with":
            with probe.attach(step=start):
                train()
        elif ending == "finally":
            try:
                probe.attach(step=start)
                train()
            finally:
                probe.detach(collective=False)
        else:
            probe.attach(step=start)
            train()
    except (Fault, KeyboardInterrupt):
        pass
    finally:
        injector.where = None
        opt.zero_grad(set_to_none=True)
    if ending == "drop":  # never detached: nothing keeps it, it goes at once
        del probe
    elif forward_done is not None:
        completed.add(forward_done)  # detach logged the step left open
    return steps, completed


def test_attach_train_detach_cycles_with_faults_leave_nothing(tmp_path, monkeypatch):
    before = process_state()
    rng = random.Random(1234)
    model = tiny_gpt()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    injector = Injector(model, monkeypatch)
    own_hook = ["transformer.h.1.attn.c_proj"]
    expected: set[int] = set()
    step = 0
    with SummaryWriter(log_dir=str(tmp_path)) as writer:
        for _ in range(CYCLES):
            used, completed = cycle(model, opt, writer, injector, rng, step)
            step += used
            expected |= completed
            assert hooks_on(model) == own_hook
            assert process_state() == before
    logged = set(read_scalars(tmp_path)[TAG])
    assert logged == expected
    print(f"stress: {CYCLES} cycles, {step} steps, {len(expected)} logged")


# ---------------------------------------------------------------------------- frameworks


def test_framework_runs_raising_mid_run_leave_nothing(tmp_path):
    """A few real Trainer.train() and Lightning fit runs that raise inside the model's forward
    at a random step (or not at all)."""
    transformers = extra("transformers")
    extra("accelerate", reason="transformers.Trainer needs accelerate")
    L = extra("lightning")
    from attn_probe.integrations.huggingface import AttentionProbeCallback as HFCallback
    from attn_probe.integrations.lightning import AttentionProbeCallback as LCallback

    before = process_state()
    rng = random.Random(7)
    data = list(torch.randint(0, VOCAB, (16, T + 1), generator=torch.Generator().manual_seed(0)))
    fail = {"step": None, "trainer": None}

    def raise_at_step(module, args, output):  # after both attention layers of the forward
        trainer = fail["trainer"]
        if isinstance(trainer, transformers.Trainer):
            step = trainer.state.global_step
        else:
            step = trainer.global_step
        if step == fail["step"]:
            raise Fault("inside the forward")

    class HFModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gpt = tiny_gpt()

        def forward(self, input_ids):
            _, loss = self.gpt(input_ids[:, :-1], input_ids[:, 1:])
            return {"loss": loss}

    class LitModel(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.gpt = tiny_gpt()

        def training_step(self, batch, batch_idx):
            return self.gpt(batch[:, :-1], batch[:, 1:])[1]

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    for run in range(6):
        framework = "hf" if run % 2 == 0 else "lightning"
        steps = 4
        fail["step"] = rng.choice([None, *range(steps)])  # 0-based optimizer step
        log_dir = tmp_path / f"run{run}"
        if framework == "hf":
            module = HFModel()
            args = transformers.TrainingArguments(
                output_dir=str(tmp_path / "out"), max_steps=steps, logging_steps=1,
                per_device_train_batch_size=2, report_to="none", use_cpu=True,
                save_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
            )
            callback = HFCallback(outputs=[TensorBoardOutput(str(log_dir), pictures_every=0)],
                                  capture=CaptureOptions(crop=T))
            trainer = transformers.Trainer(
                model=module, args=args, train_dataset=data, callbacks=[callback],
                data_collator=lambda f: {"input_ids": torch.stack(f)},
            )
            sampled = range(1, steps + 1)  # the Trainer's 1-based steps
        else:
            module = LitModel()
            callback = LCallback(outputs=[TensorBoardOutput(str(log_dir), pictures_every=0)],
                                 every=1, capture=CaptureOptions(crop=T))
            trainer = L.Trainer(
                accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False,
                default_root_dir=str(tmp_path), callbacks=[callback],
            )
            sampled = range(steps)
        fail["trainer"] = trainer
        hook = module.gpt.lm_head.register_forward_hook(raise_at_step)
        try:
            if framework == "hf":
                trainer.train()
            else:
                trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=2))
        except Fault:
            assert fail["step"] is not None
            # The Trainer calls no callback on an exception: the documented clean-up.
            if framework == "hf" and run % 4 == 0:
                callback.probe.detach(collective=False)
        else:
            assert fail["step"] is None
        # The step that raised was measured before the fault: logged on the way out.
        last = steps if fail["step"] is None else fail["step"] + (framework == "hf")
        if framework == "hf" and fail["step"] is not None and run % 4 != 0:
            last -= 1  # left open, attached, until the callback is collected (below)
        fail["step"] = fail["trainer"] = None
        assert process_state() == before
        del trainer, callback
        gc.collect()
        hook.remove()
        assert hooks_on(module) == []
        assert set(read_scalars(log_dir)[TAG]) == {s for s in sampled if s <= last}, framework
        assert process_state() == before
