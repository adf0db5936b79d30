"""The probe in a real two-process run (gloo, CPU): DDP, a process that measures nothing, FSDP2,
and Lightning's DDP stopping every process on the same alert (``stop_on``).

Two worker processes are started with torchrun's environment (``MASTER_ADDR``, ``MASTER_PORT``,
``RANK``, ``WORLD_SIZE``); this file is their program (see ``worker`` at the bottom). They train
a small GPT and save, on every sampled step, the token sequences the step's first forward pass
was fed and the weights it ran with. The test process then rebuilds those attention matrices
with the tests' float64 reference (``reference.GPTAttention``: explicit softmax from each block's
own weights), computes rank@0.9 and columns@0.9 with the float64 reference count (``svdvals`` /
sorted column masses, ``cumsum``, ``searchsorted + 1``), averages over the sequences of both
processes and compares with what process 0 wrote to TensorBoard.

All scenarios run in one launch (starting Python with torch twice costs most of the time); each
scenario records its outcome, so one failing scenario shows up in its own test.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import socket
import subprocess
import sys
import time
import traceback
import warnings
from contextlib import nullcontext
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the workers run this file as a script
    sys.path.insert(0, str(ROOT))

import unstable_run  # noqa: E402
from attn_probe import AttentionProbe, CaptureOptions, TensorBoardOutput  # noqa: E402
from reference import (  # noqa: E402
    assert_logged,
    gpt_attention,
    logged_alerts,
    read_scalars,
    reference_layer_means,
)
from attn_probe.models.gpt import GPT, GPTConfig  # noqa: E402

WORLD = 2
CONFIG = dict(vocab_size=64, block_size=32, n_layer=2, n_head=4, n_embd=32)
EVERY, STEPS, ACCUM = 2, 6, 2  # sampled steps 0, 2, 4; two micro-batches per step
BATCH, LENGTH = 3, 24  # fed per micro-batch; the probe measures 2 sequences x 16 tokens
PROBE = dict(every=EVERY, history=1000)
CAPTURE = CaptureOptions(batch_rows=2, crop=16)


def tensorboard(folder: Path, rank: int) -> TensorBoardOutput:
    """Where a process writes (only process 0 does)."""
    return TensorBoardOutput(str(folder / f"rank{rank}" / "tb"), pictures_every=0, per_head="all")
TAU = 0.9
TOL = 1e-9
LAUNCH_TIMEOUT = 180  # seconds for the whole launch: a deadlock fails instead of hanging
STOP_MAX_STEPS = 20  # the Lightning run with stop_on: at most this many steps


# ------------------------------------------------------------------------------------ model


def make_model() -> GPT:
    """The same weights on every process. q and k are scaled up so that heads differ."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**CONFIG))
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_attn.weight.mul_(20.0)
    return model


def batch_for(scenario: str, rank: int, step: int, micro: int) -> torch.Tensor:
    """Different data on every process, step and micro-batch: (BATCH, LENGTH + 1) tokens."""
    seed = 1000 * (1 + ["ddp", "skip", "fsdp", "fsdp_adapter", "detach"].index(scenario))
    seed += 100 * rank + 10 * step + micro
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, CONFIG["vocab_size"], (BATCH, LENGTH + 1), generator=generator)


# --------------------------------------------------------------------------------- reference


def reference_attention(state: dict, tokens: torch.Tensor) -> list[torch.Tensor]:
    """Each layer's float64 (B, H, T, T) attention of the sequences and tokens the probe
    measures of ``tokens``, from the weights ``state`` the step ran with."""
    model = GPT(GPTConfig(**CONFIG)).eval()
    model.load_state_dict(state)
    return gpt_attention(model, tokens, CAPTURE.batch_rows, CAPTURE.crop)


def expected(folder: Path, step: int, ranks) -> dict:
    """Mean over the measured sequences of ``ranks`` at ``step``, per layer and head."""
    per_layer: dict[int, list[torch.Tensor]] = {}
    for rank in ranks:
        saved = torch.load(folder / f"rank{rank}_step{step}.pt")
        for layer, a in enumerate(reference_attention(saved["state"], saved["tokens"])):
            per_layer.setdefault(layer, []).append(a)
    attentions = [torch.cat(per_layer[layer]) for layer in sorted(per_layer)]
    means, closest = reference_layer_means(attentions, TAU)
    result: dict = {
        layer: {**means[layer], "sequences": len(a)} for layer, a in enumerate(attentions)
    }
    result["closest"] = closest
    return result


def compare(scalars: dict, want: dict, step: int) -> float:
    """Assert logged == reference for every layer and head at ``step``; return the worst error."""
    return assert_logged(scalars, want, step, CONFIG["n_layer"], TOL)


# ----------------------------------------------------------------------------------- launch


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(out: Path, world: int = WORLD, script: str = __file__) -> list[str]:
    """Run ``world`` processes of ``script``'s ``worker`` (torchrun's environment, gloo) to the
    end, or kill them at the timeout; return their output."""
    port = free_port()
    procs, logs = [], []
    for rank in range(world):
        env = dict(
            os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
            WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
            OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
                p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p
            ),
        )
        log = open(out / f"worker{rank}.log", "w")
        logs.append(log)
        procs.append(subprocess.Popen(
            [sys.executable, str(Path(script).resolve()), "worker", str(out)],
            env=env, stdout=log, stderr=subprocess.STDOUT,
        ))
    deadline = time.monotonic() + LAUNCH_TIMEOUT
    timed_out = False
    try:
        for proc in procs:
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 1.0))
            except subprocess.TimeoutExpired:
                timed_out = True
                break
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for log in logs:
            log.close()
    text = [(out / f"worker{rank}.log").read_text() for rank in range(world)]
    tails = "\n".join(t[-3000:] for t in text)
    assert not timed_out, f"workers still running after {LAUNCH_TIMEOUT} s (deadlock?)\n{tails}"
    return text


# --------------------------------------------------------------------------------- the tests

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available",
)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("distributed")
    started = time.monotonic()
    logs = launch(out)
    files = [out / f"status_rank{r}.json" for r in range(WORLD)]
    status = [json.loads(f.read_text()) if f.exists() else {} for f in files]
    print(f"two-process launch: {time.monotonic() - started:.1f} s")
    return {"out": out, "status": status, "logs": logs}


def require(run: dict, scenario: str) -> Path:
    for rank, status in enumerate(run["status"]):
        if status.get(scenario) != "ok":
            pytest.fail(
                f"scenario {scenario!r} failed on rank {rank}: {status.get(scenario)}\n"
                + run["logs"][rank][-3000:]
            )
    return run["out"] / scenario


def history(folder: Path, rank: int) -> dict:
    data = json.loads((folder / f"history_rank{rank}.json").read_text())
    return {int(k): v for k, v in data.items()}


def test_ddp_logs_mean_over_both_processes(run):
    folder = require(run, "ddp")
    scalars = read_scalars(folder / "rank0" / "tb")
    sampled = list(range(0, STEPS, EVERY))
    assert sorted(scalars["rank90/max/L00"]) == sampled
    worst, closest, distinct = 0.0, math.inf, set()
    for step in sampled:
        want = expected(folder, step, ranks=range(WORLD))
        closest = min(closest, want["closest"])
        worst = max(worst, compare(scalars, want, step))
        for layer in range(CONFIG["n_layer"]):
            distinct.update(want[layer]["rank"].tolist())
            assert want[layer]["sequences"] == WORLD * CAPTURE.batch_rows
    # the figures are not trivially equal across heads, layers and steps
    assert len(distinct) > 3, distinct
    print(f"ddp: worst |logged - reference| {worst:.3g}; closest reference decision "
          f"{closest:.3g} of the energy from the threshold; {len(distinct)} distinct means")
    # every process ends with the same reduced figures
    h0, h1 = history(folder, 0), history(folder, 1)
    assert h0 == h1 and sorted(h0) == sampled
    counts = {s for layers in h0.values() for layer in layers for s in layer["sequences"]}
    assert counts == {WORLD * CAPTURE.batch_rows}


def test_only_process_zero_writes(run):
    folder = require(run, "ddp")
    files = list((folder / "rank0" / "tb").glob("events.out.tfevents.*"))
    assert len(files) == 1
    assert not (folder / "rank1").exists() or not any((folder / "rank1").rglob("*"))


def test_process_without_forward_on_a_sampled_step(run):
    """Rank 1 skips every forward of step 2: no deadlock, step 2 is rank 0's mean only."""
    folder = require(run, "skip")
    scalars = read_scalars(folder / "rank0" / "tb")
    assert sorted(scalars["rank90/max/L00"]) == [0, 2, 4]
    for step in (0, 2, 4):
        ranks = [0] if step == 2 else range(WORLD)
        want = expected(folder, step, ranks=ranks)
        compare(scalars, want, step)
    h0, h1 = history(folder, 0), history(folder, 1)
    assert h0 == h1
    for step, layers in h0.items():
        n = CAPTURE.batch_rows * (1 if step == 2 else WORLD)
        assert all(s == n for layer in layers for s in layer["sequences"]), (step, layers)


def _fsdp_or_skip(run, scenario: str) -> Path:
    for rank, status in enumerate(run["status"]):
        message = status.get(scenario, "not run").splitlines()[0]
        if "unsupported:" in message:
            pytest.skip(f"FSDP2 on CPU/gloo: {message}")
    return require(run, scenario)


def test_fsdp2_interception_matches_unsharded_reference(run):
    folder = _fsdp_or_skip(run, "fsdp")
    scalars = read_scalars(folder / "rank0" / "tb")
    assert sorted(scalars["rank90/max/L00"]) == [0, 2]
    for step in (0, 2):
        compare(scalars, expected(folder, step, ranks=range(WORLD)), step)
    assert history(folder, 0) == history(folder, 1)


def test_fsdp2_adapter_in_forward_pre_hook(run):
    """Adapters run in the module's forward pre-hook, after FSDP2 has all-gathered."""
    folder = _fsdp_or_skip(run, "fsdp_adapter")
    scalars = read_scalars(folder / "rank0" / "tb")
    assert sorted(scalars["rank90/max/L00"]) == [0]
    compare(scalars, expected(folder, 0, ranks=range(WORLD)), 0)


def test_detach_closes_last_step_when_a_process_measured_nothing(run):
    folder = require(run, "detach")
    scalars = read_scalars(folder / "rank0" / "tb")
    assert sorted(scalars["rank90/max/L00"]) == [0, 2, 4]
    compare(scalars, expected(folder, 4, ranks=[0]), 4)


def test_lightning_ddp_stop_on_stops_every_process_after_the_same_step(run):
    """Two processes, each on its own data, under Lightning's DDP with stop_on=("logit",):
    both stop after the step of the alert, decided from the figures of both (the alert
    comes from on_alert, which each process runs on the reduced figures), and nothing hangs
    (the launch has a deadline). Process 0's event files hold the alert."""
    for rank, status in enumerate(run["status"]):
        message = status.get("lightning_stop", "not run").splitlines()[0]
        if "unsupported:" in message:
            pytest.skip(f"Lightning in the workers: {message}")
    folder = require(run, "lightning_stop")
    ranks = [json.loads((folder / f"stop_rank{r}.json").read_text()) for r in range(WORLD)]
    assert ranks[0]["first_tokens"] != ranks[1]["first_tokens"]  # each its own data
    zero, one = ranks
    kind, tag, step, value = zero["stopped_by"]
    assert kind == "logit"
    # the same alert, the same step, the same figures on both; every process stopped there
    assert one["stopped_by"] == zero["stopped_by"] and one["history"] == zero["history"]
    assert zero["global_step"] == one["global_step"] == step + 1 < STOP_MAX_STEPS
    history = {int(s): figures for s, figures in zero["history"].items()}
    sampled = list(range(3, step + 1, 4))  # Lightning's logging steps: (s + 1) % 4 == 0
    assert sorted(history) == sampled and step in sampled
    assert tag == "L00"
    unstable_run.assert_clear_of_thresholds(
        {s: list(zip(f[0], f[2])) for s, f in history.items()}, until=step, kind="logit")
    # every figure is the mean over both processes' sequences
    assert {c for _, counts, _ in history.values() for c in counts} == {WORLD * CAPTURE.batch_rows}
    # both users' on_alert saw the stopping alert; only process 0 says so
    assert zero["stopped_by"] in zero["seen"] and zero["seen"] == one["seen"]
    assert len(zero["stop_lines"]) == 1 and one["stop_lines"] == []
    assert f"after step {step}" in zero["stop_lines"][0]
    scalars = read_scalars(folder / "lightning_logs" / "version_0")
    (row,) = [row for row in logged_alerts(folder / "lightning_logs" / "version_0")
              if row["kind"] == "logit" and row["layer"] == tag]
    assert int(row["step"]) == step and float(row["value"]) == pytest.approx(value, rel=1e-6)
    assert scalars["alert/logit"][step] >= 1
    assert unstable_run.probe_steps(scalars) == set(sampled)
    assert max(scalars["train_loss"]) == step


# ----------------------------------------------------------------------------------- worker


def _save_step(folder: Path, rank: int, step: int, tokens: torch.Tensor, state: dict) -> None:
    state = {k: v.detach().clone() for k, v in state.items()}
    torch.save({"tokens": tokens.clone(), "state": state}, folder / f"rank{rank}_step{step}.pt")


def _save_history(folder: Path, rank: int, probe: AttentionProbe) -> None:
    data = {
        s.step: [
            {"name": layer.name, "rank": layer.heads["rank"].tolist(),
             "columns": layer.heads["columns"].tolist(), "sequences": layer.counts.tolist()}
            for layer in s.layers
        ]
        for s in probe.history
    }
    (folder / f"history_rank{rank}.json").write_text(json.dumps(data))


def _train(scenario: str, folder: Path, rank: int, model, probed, optimizer, steps: int,
           skip: set[int] = frozenset(), close_last: bool = True, state=None) -> AttentionProbe:
    """``steps`` optimizer steps of ACCUM micro-batches; the probe watches ``probed``."""
    state = state or (lambda: model.state_dict())
    accum_ctx = getattr(probed, "no_sync", None)
    with AttentionProbe(probed, capture=CAPTURE, outputs=[tensorboard(folder, rank)],
                        **PROBE) as probe:
        for step in range(steps):
            batches = [batch_for(scenario, rank, step, m) for m in range(ACCUM)]
            if step % EVERY == 0:
                snapshot = state()  # a collective under FSDP: every process takes it
                _save_step(folder, rank, step, batches[0][:, :-1], snapshot)
            if step not in skip:
                for m, batch in enumerate(batches):
                    last = m == ACCUM - 1
                    with (nullcontext() if last or accum_ctx is None else accum_ctx()):
                        _, loss = probed(batch[:, :-1], batch[:, 1:])
                        (loss / ACCUM).backward()
                if optimizer is not None:
                    optimizer.step()
                    optimizer.zero_grad()
            if close_last or step < steps - 1:
                probe.step()
    return probe


def _lightning_stop(folder: Path, rank: int) -> None:
    """A Lightning ``Trainer`` under DDP (its own strategy, in the process group this launch
    made: the torchelastic environment) on the unstable run, every process on its own data,
    with ``stop_on=("logit",)``. Saves what each process saw."""
    try:
        import lightning as L
        from lightning.fabric.plugins.environments import TorchElasticEnvironment
        from lightning.pytorch.loggers import TensorBoardLogger
    except ImportError as error:
        raise RuntimeError(f"unsupported: lightning cannot be imported: {error}") from error
    from attn_probe.integrations.lightning import AttentionProbeCallback

    class LitUnstable(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.gpt = unstable_run.unstable_gpt()  # the same weights on every process

        def training_step(self, batch, batch_idx):
            _, loss = self.gpt(batch[:, :-1], batch[:, 1:])
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            return unstable_run.optimizer(self.parameters())

    seen = []
    callback = AttentionProbeCallback(
        history=1000, stop_on=("logit",), on_alert=lambda alert, snapshot: seen.append(alert),
        capture=CaptureOptions(batch_rows=CAPTURE.batch_rows),
    )
    trainer = L.Trainer(
        accelerator="cpu", devices=WORLD, num_nodes=1, strategy="ddp",
        plugins=[TorchElasticEnvironment()], max_steps=STOP_MAX_STEPS, log_every_n_steps=4,
        gradient_clip_val=unstable_run.CLIP, use_distributed_sampler=False,
        logger=TensorBoardLogger(save_dir=str(folder), name="lightning_logs", version=0),
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=str(folder), callbacks=[callback],
    )
    # Different data on every process (no distributed sampler: each has its own windows).
    data = unstable_run.windows(unstable_run.BATCH * STOP_MAX_STEPS, seed=10 + rank)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(LitUnstable(), torch.utils.data.DataLoader(data, batch_size=unstable_run.BATCH))

    def summary(alert):
        return None if alert is None else [alert.kind, alert.tag, alert.step, alert.value]

    (folder / f"stop_rank{rank}.json").write_text(json.dumps({
        "global_step": trainer.global_step,
        "stopped_by": summary(callback.stopped_by),
        "seen": [summary(a) for a in seen],
        "history": {s.step: [[layer.reduce("logit_spread", "max") for layer in s.layers],
                             [c for layer in s.layers for c in layer.counts.tolist()],
                             [layer.reduce("entropy_norm_full", "mean") for layer in s.layers]]
                    for s in callback.probe.history},
        "stop_lines": [str(w.message) for w in caught if "stopping training" in str(w.message)],
        "first_tokens": data[0, :8].tolist(),
    }))


def scenario_recorder(out: Path, rank: int):
    """``record(name, fn)``: run scenario ``fn(folder)`` in a folder of its own, keep its
    outcome in ``status_rank{rank}.json`` (``"ok"`` or the error) for the test process, and
    what it returns, if anything, in ``{name}/rank{rank}.json``."""
    status: dict[str, str] = {}

    def record(name: str, fn) -> None:
        folder = out / name
        folder.mkdir(exist_ok=True)
        started = time.monotonic()
        try:
            result = fn(folder)
            if result is not None:
                (folder / f"rank{rank}.json").write_text(json.dumps(result))
            status[name] = "ok"
        except Exception as error:  # recorded for the test to report
            status[name] = f"{type(error).__name__}: {error}\n{traceback.format_exc()}"
        (out / f"status_rank{rank}.json").write_text(json.dumps(status))
        print(f"rank {rank}: {name} ({time.monotonic() - started:.1f} s): "
              f"{status[name].splitlines()[0]}", flush=True)

    return record


def worker(out: Path) -> None:
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank = dist.get_rank()

    record = scenario_recorder(out, rank)

    def ddp(folder: Path) -> None:
        model = make_model()
        wrapped = DistributedDataParallel(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        probe = _train("ddp", folder, rank, model, wrapped, optimizer, STEPS)
        _save_history(folder, rank, probe)

    def skip(folder: Path) -> None:
        # No gradient synchronisation: a DDP backward would wait for the idle process.
        model = make_model()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        probe = _train("skip", folder, rank, model, model, optimizer, STEPS,
                       skip={2} if rank == 1 else set())
        _save_history(folder, rank, probe)

    def sharded(unit: str):
        """The GPT under FSDP2: one unit per block (or per attention module), and the root."""
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import DTensor

        model = make_model()
        try:  # FSDP2 itself on this platform, without the probe
            for block in model.transformer.h:
                fully_shard(block.attn if unit == "attn" else block)
            fully_shard(model)
            tokens = batch_for("fsdp", rank, 99, 0)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*returned a view tensor.*")
                model(tokens[:, :-1], tokens[:, 1:])[1].backward()
            model.zero_grad(set_to_none=True)
        except Exception as error:
            raise RuntimeError(f"unsupported: {type(error).__name__}: {error}") from error
        assert isinstance(model.transformer.h[0].attn.c_attn.weight, DTensor)

        def full_state() -> dict:
            return {k: v.full_tensor() if isinstance(v, DTensor) else v
                    for k, v in model.state_dict().items()}

        return model, full_state

    def fsdp(folder: Path) -> None:
        model, full_state = sharded("block")
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        probe = _train("fsdp", folder, rank, model, model, optimizer, 4, state=full_state)
        _save_history(folder, rank, probe)

    def fsdp_adapter(folder: Path) -> None:
        # The attention modules are FSDP units themselves: FSDP2's pre-forward all-gather runs
        # before the probe's pre-hook, where the adapter reads the weights.
        model, full_state = sharded("attn")
        batch = batch_for("fsdp_adapter", rank, 0, 0)
        snapshot = full_state()
        _save_step(folder, rank, 0, batch[:, :-1], snapshot)
        probe = AttentionProbe(model, outputs=[tensorboard(folder, rank)],
                               capture=dataclasses.replace(CAPTURE, strategy="adapter"), **PROBE)
        with probe, warnings.catch_warnings():
            # FSDP2 on an attention module notes that the module returns a view: harmless here
            warnings.filterwarnings("ignore", message=".*returned a view tensor.*")
            _, loss = model(batch[:, :-1], batch[:, 1:])
            loss.backward()
            probe.step()
        assert all(s.strategy.startswith("adapter:") for s in probe.sites)

    def lightning_stop(folder: Path) -> None:
        _lightning_stop(folder, rank)

    def detach(folder: Path) -> None:
        # Steps 0..4; rank 1 feeds nothing on step 4, which is closed by leaving the block.
        model = make_model()
        _train("detach", folder, rank, model, model, None, 5,
               skip={4} if rank == 1 else set(), close_last=False)

    record("ddp", ddp)
    record("skip", skip)
    record("fsdp", fsdp)
    record("fsdp_adapter", fsdp_adapter)
    record("lightning_stop", lightning_stop)
    record("detach", detach)  # last: a failure here may leave the process group unusable
    sys.stdout.flush()
    # A broken group (see the detach scenario) can make the orderly shutdown wait: leave now.
    os._exit(0)


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "worker":
    worker(Path(sys.argv[2]))
