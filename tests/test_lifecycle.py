"""The probe leaves no trace: nothing of it outlives it in the process, whatever raises where, and
copies of a probed model are plain copies.

What "the process as it found it" means is :func:`reference.process_state` (compiler stance,
Dynamo's frame callback, grad mode, autocast, default dtype, torch function modes, global
hooks); "no trace on the model" is :func:`reference.hooks_on` returning nothing. Whether compiled
code is compiled is seen by a counting backend: it records each graph Dynamo hands it and each
run of the compiled code.
"""

from __future__ import annotations

import copy
import gc
import io
import pickle

import pytest
from extras_rule import extra
import torch
from torch import nn

import attn_probe
from attn_probe.attention.hooks import inert_hook
from attn_probe.models.gpt import GPT, GPTConfig
from reference import hooks_on, process_state, read_scalars

pytestmark = pytest.mark.usefixtures("single_thread")


class CountingBackend:
    """A torch.compile backend that runs the graph as is, counting graphs and their runs."""

    def __init__(self):
        self.graphs = 0
        self.runs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1

        def run(*args):
            self.runs += 1
            return gm.forward(*args)

        return run


def small_gpt(seed=0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=16))


def tokens(b=2, t=8, seed=1) -> torch.Tensor:
    return torch.randint(0, 64, (b, t), generator=torch.Generator().manual_seed(seed))


def assert_compiles(backend: CountingBackend) -> None:
    """A function compiled now is compiled and its compiled code runs."""
    graphs, runs = backend.graphs, backend.runs
    f = torch.compile(lambda a: (a * 2).sin() + 1, backend=backend)
    torch.testing.assert_close(f(torch.ones(8)), (torch.ones(8) * 2).sin() + 1)
    assert (backend.graphs, backend.runs) == (graphs + 1, runs + 1), "nothing was compiled"


# ---------------------------------------------------------------------- compiler stance


def test_attached_probe_leaves_other_compiled_code_alone(tmp_path):
    before = process_state()
    model = small_gpt()
    backend = CountingBackend()
    probe = attn_probe.AttentionProbe(
        model, every=10, outputs=[attn_probe.TensorBoardOutput(tmp_path, pictures_every=0)],
    ).attach()
    # step 0 is sampled: the probe is armed
    assert probe.sampling
    assert_compiles(backend)  # the example: it compiled nothing before
    assert process_state() == before
    model(tokens())
    probe.step()
    assert process_state() == before
    probe.detach()
    assert read_scalars(tmp_path)["rank90/max/L01"].keys() == {0}


def test_compiled_model_runs_eagerly_on_sampled_steps_only():
    """The stance is in force for the model's own forward call of a sampled step, and only then:
    sampled steps are measured and run no compiled code, the others run the compiled graph."""
    before = process_state()
    model = small_gpt().eval()
    backend = CountingBackend()
    compiled = torch.compile(model, backend=backend)
    stances = []
    model.transformer.h[0].attn.register_forward_pre_hook(
        lambda m, a: stances.append(torch._dynamo.eval_frame._stance.stance)
        if not torch.compiler.is_compiling() else None
    )
    runs = []
    with attn_probe.AttentionProbe(model, every=3, history=1000) as probe:
        for step in range(6):
            start = backend.runs
            compiled(tokens(seed=step))
            runs.append(backend.runs - start)
            assert process_state() == before
            probe.step()
    assert runs == [0, 1, 1, 0, 1, 1]
    assert [s.step for s in probe.history] == [0, 3]
    assert all(layer.sequences == 1 for s in probe.history for layer in s.layers)
    assert stances == ["force_eager", "force_eager"]  # seen inside the sampled forwards
    assert hooks_on(model) == ["transformer.h.0.attn"]  # the test's own hook only
    assert process_state() == before


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_exception_inside_a_sampled_forward_restores_the_process(error):
    """A forward that raises inside an attention module: Exception runs the always-call hooks,
    KeyboardInterrupt does not; either way nothing outlives the call."""
    before = process_state()
    model = small_gpt()
    backend = CountingBackend()
    compiled = torch.compile(model, backend=backend)
    fail = [False]

    def maybe_raise(module, args, output):
        if fail[0]:
            raise error("inside attention")

    model.transformer.h[1].attn.c_proj.register_forward_hook(maybe_raise)
    probe = attn_probe.AttentionProbe(model, every=1).attach()
    compiled(tokens())
    probe.step()
    fail[0] = True
    with pytest.raises(error, match="inside attention"):
        compiled(tokens())
    # Not detached, the step not closed: still, no stance and no interception mode is left.
    assert process_state() == before
    assert_compiles(backend)
    fail[0] = False
    compiled(tokens())  # the probe goes on measuring
    assert probe.step().layers[1].sequences == 1
    probe.detach()
    assert hooks_on(model) == ["transformer.h.1.attn.c_proj"]
    assert process_state() == before


def test_dropped_probe_leaves_nothing(tmp_path):
    """A probe attached and dropped without detach: no hook, no wrapper, no writer is left, at
    once (nothing, the model least of all, keeps it alive; no cycle waits for the collector)."""
    import weakref

    model = small_gpt()
    output = attn_probe.TensorBoardOutput(tmp_path, pictures_every=0)
    probe = attn_probe.AttentionProbe(model, every=1, outputs=[output]).attach()
    model(tokens())
    probe.step()
    model(tokens())  # step 1 measured, never closed
    assert hooks_on(model)
    gone = weakref.ref(probe)
    writer = output.writer
    del probe
    assert gone() is None
    assert hooks_on(model) == []
    assert writer.all_writers is None  # the SummaryWriter was closed
    assert read_scalars(tmp_path)["rank90/max/L00"].keys() == {0}


# ----------------------------------------------------------------------------- copies


def hf_gpt2():
    transformers = extra("transformers")
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=64,
                                     n_positions=16, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel._from_config(config, attn_implementation="sdpa")
    return model, lambda m: m(input_ids=tokens()).logits


def nano_gpt():
    return small_gpt(), lambda m: m(tokens())[0]


def encoder():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    x = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(2))
    return model, lambda m: m(x)


def torch_save(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


COPIES = {
    "deepcopy": copy.deepcopy,
    "pickle": lambda m: pickle.loads(pickle.dumps(m)),
    "torch.save": torch_save,
}


@pytest.mark.parametrize("how", list(COPIES))
@pytest.mark.parametrize("make", [nano_gpt, hf_gpt2, encoder], ids=["nanogpt", "gpt2", "encoder"])
def test_copies_of_a_probed_model_are_not_monitored(make, how, tmp_path):
    model, call = make()
    model.eval()
    with torch.no_grad():
        want = call(model)
    with attn_probe.AttentionProbe(
        model, every=1, outputs=[attn_probe.TensorBoardOutput(tmp_path, pictures_every=0)],
        history=1000,
    ) as probe:
        call(model)
        probe.step()  # step 0: the original
        twin = COPIES[how](model)
        calls = dict(probe._recorder.calls)
        with torch.no_grad():
            got = call(twin)
        assert probe._recorder.calls == calls, "the copy's forward reached the probe"
        assert probe.step() is None  # step 1: only the copy ran, nothing measured
        call(model)
        probe.step()  # step 2: the original is still measured
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert [s.step for s in probe.history] == [0, 2]
    assert read_scalars(tmp_path)["rank90/max/L01"].keys() == {0, 2}
    assert hooks_on(model) == []
    # What the copy carries in place of the probe's hooks and wrappers does nothing.
    for module in twin.modules():
        assert all(hook is inert_hook for hook in module._forward_pre_hooks.values())
        assert all(hook is inert_hook for hook in module._forward_hooks.values())
        forward = module.__dict__.get("forward")
        assert forward is None or forward.__func__ is type(module).forward
    # A copy can be probed on its own.
    with attn_probe.AttentionProbe(twin, every=1, history=1000) as own:
        call(twin)
    assert own.last.layers[0].sequences == 1


# ------------------------------------------------------------------- Hugging Face Trainer


def test_huggingface_trainer_raising_mid_run_leaves_the_process_alone(tmp_path):
    transformers = extra("transformers")
    extra("accelerate", reason="transformers.Trainer needs accelerate")
    from attn_probe.integrations.huggingface import AttentionProbeCallback

    before = process_state()
    model, _ = hf_gpt2()
    state = {}

    def fail_in_step_3(module, args, output):
        if state["trainer"].state.global_step == 2:  # optimizer step 3, sampled (every=1)
            raise RuntimeError("failing inside the forward on purpose")

    model.transformer.h[1].attn.register_forward_hook(fail_in_step_3)
    data = list(torch.randint(0, 64, (12, 8), generator=torch.Generator().manual_seed(0)))
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=5, per_device_train_batch_size=2, logging_steps=1,
        report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0,
    )
    callback = AttentionProbeCallback(
        capture=attn_probe.CaptureOptions(crop=8),
        outputs=[attn_probe.TensorBoardOutput(str(tmp_path / "tb"), pictures_every=0)],
    )
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=data, callbacks=[callback],
        data_collator=lambda f: {"input_ids": torch.stack(f), "labels": torch.stack(f)},
    )
    state["trainer"] = trainer
    with pytest.raises(RuntimeError, match="on purpose"):
        trainer.train()
    # on_train_end never ran: the probe is still attached to the model, but the process is
    # as it was and compiled code anywhere compiles.
    assert process_state() == before
    assert_compiles(CountingBackend())
    assert "transformer.h.0.attn" in hooks_on(model)
    assert read_scalars(tmp_path / "tb")["rank90/max/L00"].keys() == {1, 2}
    del trainer, callback, state["trainer"]
    gc.collect()
    assert hooks_on(model) == ["transformer.h.1.attn"]  # the test's own hook only
    assert process_state() == before
