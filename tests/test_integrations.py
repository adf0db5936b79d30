"""The Hugging Face and Lightning callbacks in real (tiny) training runs.

Each run trains a few steps with gradient accumulation and with evaluation between steps. A
recording callback keeps, for every optimizer step, the first micro-batch and the weights it ran
with; the test rebuilds those attention matrices from the model's own eager attention (float64
for the nanoGPT model), computes rank@0.9 and columns@0.9 with the float64 reference and checks
them against the event files, step for step. Evaluation batches must never be measured.
"""

from __future__ import annotations

import math
import socket
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from attn_probe.models.gpt import GPT, GPTConfig
from reference import assert_logged, no_hooks_left, read_scalars, reference_counts

ROOT = Path(__file__).resolve().parents[1]
TAU = 0.9
TOL = 1e-9
MAX_SEQUENCES, MAX_TOKENS = 2, 16


# ------------------------------------------------------------------------------- reference


def head_means(attentions) -> tuple[dict[int, dict[str, torch.Tensor]], float]:
    """Per layer: per-head mean over the measured sequences of rank@tau and columns@tau."""
    out, closest = {}, math.inf
    for layer, attention in enumerate(attentions):
        a = attention[:MAX_SEQUENCES, :, :MAX_TOKENS, :MAX_TOKENS]
        ranks, columns, gap = reference_counts(a, TAU)
        closest = min(closest, gap)
        out[layer] = {"rank": ranks.mean(0), "columns": columns.mean(0)}
    return out, closest


def check_against_reference(scalars, want, step: int, layers: int) -> float:
    return assert_logged(scalars, want, step, layers, TOL)


def random_tokens(n: int, length: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- Hugging Face


def test_huggingface_trainer_logs_first_micro_batch_of_sampled_steps(tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
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
    callback = AttentionProbeCallback(max_sequences=MAX_SEQUENCES, max_tokens=MAX_TOKENS)
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=train, eval_dataset=evaluation,
        data_collator=collate, callbacks=[Weights(), callback],
    )
    trainer.train()

    probe = callback.probe
    assert probe.every == 2  # from logging_steps
    assert no_hooks_left(model)
    # The probe writes beside the Trainer's own TensorBoard run: one run, shared steps.
    (tensorboard,) = [c for c in trainer.callback_handler.callbacks
                      if type(c).__name__ == "TensorBoardCallback"]
    run = Path(tensorboard.logging_dir)
    assert run.parent == tmp_path / "runs"
    scalars = read_scalars(run)
    assert sorted(scalars["train/loss"]) == [2, 4, 6]
    for tag in ("rank90/max/L00", "rank90/max/L01", "columns90/max/L01", "entropy/mean/L00"):
        assert sorted(scalars[tag]) == [2, 4, 6], (tag, scalars[tag])
    assert [s.step for s in probe.history] == [2, 4, 6]

    eager = transformers.GPT2LMHeadModel._from_config(config, attn_implementation="eager").eval()
    worst, closest = 0.0, math.inf
    for step in (2, 4, 6):
        eager.load_state_dict(weights[step])
        first = fed[(step - 1) * accumulation]  # the step's first micro-batch
        with torch.no_grad():
            attentions = eager(first, output_attentions=True).attentions
        want, gap = head_means(attentions)
        closest = min(closest, gap)
        worst = max(worst, check_against_reference(scalars, want, step, config.n_layer))
    print(f"hf: worst |logged - reference| {worst:.3g}, closest decision {closest:.3g}")


# -------------------------------------------------------------------------------- Lightning


GPT_CONFIG = dict(vocab_size=64, block_size=32, n_layer=2, n_head=4, n_embd=32)


def gpt_attention_float64(state: dict, tokens: torch.Tensor) -> list[torch.Tensor]:
    """The nanoGPT model's attention in float64, with an explicit causal softmax."""
    model = GPT(GPTConfig(**GPT_CONFIG)).double().eval()
    model.load_state_dict({k: v.double() for k, v in state.items()})
    b, t = tokens.shape
    heads = GPT_CONFIG["n_head"]
    out = []
    with torch.no_grad():
        x = model.transformer.wte(tokens) + model.transformer.wpe(torch.arange(t))
        for block in model.transformer.h:
            q, k, v = block.attn.c_attn(block.ln_1(x)).split(GPT_CONFIG["n_embd"], dim=2)
            q, k, v = (z.view(b, t, heads, -1).transpose(1, 2) for z in (q, k, v))
            scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
            causal = torch.ones(t, t, dtype=torch.bool).tril()
            a = torch.softmax(scores.masked_fill(~causal, -math.inf), dim=-1)
            out.append(a)
            x = x + block.attn.c_proj((a @ v).transpose(1, 2).reshape(b, t, -1))
            x = x + block.mlp(block.ln_2(x))
    return out


def lit_gpt_class(L, fail_at_step: int | None = None):
    """A LightningModule around the nanoGPT model (raising on ``fail_at_step`` if given)."""

    class LitGPT(L.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.gpt = GPT(GPTConfig(**GPT_CONFIG))
            with torch.no_grad():
                for block in self.gpt.transformer.h:
                    block.attn.c_attn.weight.mul_(20.0)

        def training_step(self, batch, batch_idx):
            _, loss = self.gpt(batch[:, :-1], batch[:, 1:])
            if self.trainer.global_step == fail_at_step:  # after the forward pass
                raise RuntimeError("failing on purpose")
            self.log("train_loss", loss)
            return loss

        def validation_step(self, batch, batch_idx):
            _, loss = self.gpt(batch[:, :-1], batch[:, 1:])
            self.log("val_loss", loss)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-2)

    return LitGPT


def test_lightning_trainer_logs_first_micro_batch_of_sampled_steps(tmp_path):
    L = pytest.importorskip("lightning")
    from lightning.pytorch.loggers import TensorBoardLogger

    from attn_probe.integrations.lightning import AttentionProbeCallback

    LitGPT = lit_gpt_class(L)

    seen: dict[int, tuple[torch.Tensor, dict]] = {}

    class Recorder(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step not in seen:  # the step's first micro-batch
                state = {k: v.detach().clone() for k, v in pl_module.gpt.state_dict().items()}
                seen[trainer.global_step] = (batch[:, :-1].clone(), state)

    train = torch.utils.data.DataLoader(
        random_tokens(48, 21, GPT_CONFIG["vocab_size"], seed=3), batch_size=3
    )
    val = torch.utils.data.DataLoader(random_tokens(6, 21, GPT_CONFIG["vocab_size"], seed=4),
                                      batch_size=3)
    logger = TensorBoardLogger(save_dir=str(tmp_path), name="lightning_logs")
    callback = AttentionProbeCallback(max_sequences=MAX_SEQUENCES, max_tokens=MAX_TOKENS)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=6, accumulate_grad_batches=2,
        log_every_n_steps=2, logger=logger, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
        val_check_interval=2, limit_val_batches=1, num_sanity_val_steps=1,
        callbacks=[Recorder(), callback],
    )
    module = LitGPT()
    trainer.fit(module, train, val)

    probe = callback.probe
    assert probe.every == 2  # from log_every_n_steps
    assert no_hooks_left(module)
    log_dir = Path(logger.log_dir)  # the probe writes next to Lightning's own scalars
    scalars = read_scalars(log_dir)
    # Lightning logs every 2 steps counting from 1 (steps 1, 3, 5); the probe samples the same
    # steps, so each of its figures shares a step with the train_loss of that step.
    assert sorted(scalars["train_loss"]) == [1, 3, 5]
    for tag in ("rank90/max/L00", "rank90/max/L01", "columns90/max/L00", "sink/mean/L01"):
        assert sorted(scalars[tag]) == [1, 3, 5], (tag, scalars[tag])

    worst, closest = 0.0, math.inf
    for step in (1, 3, 5):
        tokens, state = seen[step]
        want, gap = head_means(gpt_attention_float64(state, tokens))
        closest = min(closest, gap)
        worst = max(worst, check_against_reference(scalars, want, step, GPT_CONFIG["n_layer"]))
    print(f"lightning: worst |logged - reference| {worst:.3g}, closest decision {closest:.3g}")


def test_lightning_exception_removes_hooks_and_keeps_what_was_measured(tmp_path):
    L = pytest.importorskip("lightning")
    from attn_probe.integrations.lightning import AttentionProbeCallback

    module = lit_gpt_class(L, fail_at_step=3)()
    callback = AttentionProbeCallback(every=2, max_sequences=MAX_SEQUENCES, max_tokens=MAX_TOKENS)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=6, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
        limit_val_batches=1, callbacks=[callback],
    )
    train = torch.utils.data.DataLoader(
        random_tokens(24, 21, GPT_CONFIG["vocab_size"], seed=5), batch_size=3
    )
    with pytest.raises(RuntimeError, match="failing on purpose"):
        trainer.fit(module, train, train)  # the sanity-check validation runs, unmeasured
    assert no_hooks_left(module)
    # step 3 was measured before the error: logged on the way out (locally, no collective)
    assert [s.step for s in callback.probe.history] == [1, 3]
    # without a logger: <default_root_dir>/attn_probe
    assert sorted(read_scalars(tmp_path / "attn_probe")["rank90/max/L00"]) == [1, 3]


def test_lightning_default_log_dir_without_logger(tmp_path):
    pytest.importorskip("lightning")
    from attn_probe.integrations.lightning import default_log_dir

    trainer = SimpleNamespace(loggers=[], default_root_dir=str(tmp_path))
    assert default_log_dir(trainer) == str(tmp_path / "attn_probe")


def test_huggingface_default_log_dir(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    from attn_probe.integrations.huggingface import default_log_dir

    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    host = socket.gethostname()
    now = datetime(2025, 3, 7, 14, 5, 9)
    # No TensorBoard callback: where one would write.
    args = SimpleNamespace(output_dir=str(tmp_path), report_to=[])
    assert default_log_dir(args, now) == str(tmp_path / "runs" / f"Mar07_14-05-09_{host}")
    # The TensorBoardCallback named its run a few seconds earlier (an older run beside it).
    for name in (f"Mar07_14-05-02_{host}", f"Mar07_14-04-58_{host}", f"Mar07_13-00-00_{host}"):
        (tmp_path / "runs" / name).mkdir(parents=True)
    args = SimpleNamespace(output_dir=str(tmp_path), report_to=["tensorboard"])
    assert default_log_dir(args, now) == str(tmp_path / "runs" / f"Mar07_14-05-02_{host}")
    assert default_log_dir(SimpleNamespace(output_dir="x", logging_dir="logs")) == "logs"
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    assert default_log_dir(SimpleNamespace(output_dir="x")) == str(tmp_path / "tb")


# ------------------------------------------------------------------------- without frameworks

_WITHOUT_FRAMEWORKS = r"""
import sys
import attn_probe.integrations as integrations
assert "transformers" not in sys.modules and "lightning" not in sys.modules, "imported early"
for name in ("transformers", "lightning", "lightning.pytorch"):
    sys.modules[name] = None  # as if not installed
for name, extra in (("HuggingFaceCallback", "hf"), ("LightningCallback", "lightning")):
    try:
        getattr(integrations, name)
    except ImportError as error:
        assert f'pip install "attn_probe[{extra}]"' in str(error), str(error)
    else:
        raise AssertionError(f"{name} available without its framework")
from attn_probe.integrations import huggingface, lightning  # the modules still import
for module, extra in ((huggingface, "hf"), (lightning, "lightning")):
    try:
        from_module = module.AttentionProbeCallback
    except ImportError as error:
        assert f'pip install "attn_probe[{extra}]"' in str(error), str(error)
    else:
        raise AssertionError(module.__name__)
print("ok")
"""


def test_integrations_import_without_frameworks():
    result = subprocess.run(
        [sys.executable, "-c", _WITHOUT_FRAMEWORKS], capture_output=True, text=True,
        cwd=str(ROOT), timeout=120,
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
