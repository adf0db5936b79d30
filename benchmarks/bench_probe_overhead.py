"""Cost of the probe on a GPT-2-small-shaped model in training: time ratios and extra peak memory.

    python benchmarks/bench_probe_overhead.py  # 12 layers x 12 heads, width 768, T=256, batch 8
    python benchmarks/bench_probe_overhead.py --layers 4 --rounds 3       # quicker
    python benchmarks/bench_probe_overhead.py --smoke    # a tiny model, one round: seconds

Every figure is measured in this one process, plain and probed steps interleaved so both see the
same machine: a plain training step; a step with the probe attached but not sampling (hooks
return at once); a sampled step with the default settings (batch_rows=1, crop=256, no
pictures); a sampled step that also draws pictures (by default every 10th sampled step).

Whole-step differences are at the mercy of a shared machine, so the probe's own work is also
timed where it happens, through public hooks only: hooks of this script bracket the probe's
forward pre-hook and forward hook on every attention module (where it opens its interception and
measures what the kernel got), plus the probe's ``step()`` call (where it reduces, judges and
writes). Not included: the interception's per-call cost inside the attention forward (a few
microseconds a call). The idle cost of the hooks on unsampled steps is timed on an identity
module carrying the real hooks of an unarmed :class:`~attn_probe.attention.Recorder`, against a
bare one. The amortised overhead at every=100 is computed from those costs. Peak memory: the
growth of the process's peak resident set (CPU) or of ``torch.cuda.max_memory_allocated``
(CUDA) caused by a sampled step after plain steps have set the peak.

Prints the model, a table of the median time of each step kind and its ratio to a plain step,
then the probe's own work, the idle hooks, the amortised overhead and the peak memory.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import tempfile
import time
from typing import Callable

import torch
from torch import nn

from attn_probe import AttentionProbe, CaptureOptions, TensorBoardOutput
from attn_probe.attention import Recorder, Site
from attn_probe.models.gpt import GPT, GPTConfig

#: What --smoke runs: the whole script on a tiny model, in a few seconds (no timing judged).
SMOKE = dict(layers=2, heads=2, width=64, tokens=32, batch=2, vocab=256, rounds=1,
             hook_calls=2000, threads=1)


def peak_bytes(device: str) -> int:
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def best_seconds(modules: dict[str, nn.Module], calls: int) -> dict[str, float]:
    """The fastest of three runs of ``calls`` forward calls of each module, interleaved."""
    x = torch.zeros(1)
    best: dict[str, float] = {}
    for _ in range(3):
        for name, module in modules.items():
            start = time.perf_counter()
            for _ in range(calls):
                module(x)
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - start)
    return best


def idle_microseconds(calls: int) -> tuple[float, float]:
    """Cost of an unarmed recorder, in microseconds: its forward pre-hook and hook on one
    module's call, and its wrapper around the model's forward (the root's, once a step).
    Timed on identity modules carrying the real hooks, against a bare one."""
    bare, hooked, root = nn.Identity(), nn.Identity(), nn.Identity()
    site = Site("hooked", hooked, intercept=True, adapter=None)
    recorder = Recorder([site], lambda name, observed: None, root=root)
    recorder.attach()  # unarmed: every hook returns at once
    try:
        best = best_seconds({"bare": bare, "hooked": hooked, "root": root}, calls)
    finally:
        recorder.detach()
    per_call = {k: max(0.0, best[k] - best["bare"]) / calls * 1e6 for k in ("hooked", "root")}
    return per_call["hooked"], per_call["root"]


class HookClock:
    """Seconds spent in the probe's forward hooks on the given modules: a pre-hook of ours runs
    just before the probe's pre-hook and one just after it, and the same around its forward
    hook. :meth:`install` after each ``probe.attach()``, :meth:`remove` before detaching."""

    def __init__(self, modules: list[nn.Module]) -> None:
        self.modules, self.seconds, self._handles = modules, 0.0, []
        self._start = 0.0

    def _begin(self, *args) -> None:
        self._start = time.perf_counter()

    def _end(self, *args) -> None:
        self.seconds += time.perf_counter() - self._start

    def install(self) -> None:
        for m in self.modules:
            self._handles += [
                m.register_forward_pre_hook(self._begin, prepend=True),
                m.register_forward_pre_hook(self._end),
                m.register_forward_hook(self._begin, prepend=True, always_call=True),
                m.register_forward_hook(self._end, always_call=True),
            ]

    def remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()


class KeptOpen(TensorBoardOutput):
    """A TensorBoard output that a probe's detach() leaves open (closed by the caller)."""

    def close(self) -> None:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=50304)
    parser.add_argument("--rounds", type=int, default=5, help="timed steps of each kind")
    parser.add_argument("--batch-rows", type=int, default=1,
                        help="rows of each sampled batch measured (default 1, the probe's)")
    parser.add_argument("--hook-calls", type=int, default=20000,
                        help="calls per timing of the idle hooks")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads before timing (default: leave as is)")
    parser.add_argument("--smoke", action="store_true",
                        help="a tiny model, one round, one thread, in seconds (checks the script "
                        "runs)")
    args = parser.parse_args(argv)
    if args.smoke:
        vars(args).update(SMOKE)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device

    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=args.vocab, block_size=args.tokens, n_layer=args.layers,
                    n_head=args.heads, n_embd=args.width)
    model = GPT(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, cfg.vocab_size, (args.batch, args.tokens + 1), device=device)

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    def train_step() -> None:
        _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()

    def timed(fn: Callable[[], object]) -> float:
        start = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - start

    base_peak = peak_bytes(device)
    train_step()  # warm-up: allocates optimiser state
    train_step()
    plain_peak = peak_bytes(device)

    kinds = ("plain", "attached, not sampled", "sampled (defaults)", "sampled + pictures")
    times: dict[str, list[float]] = {kind: [] for kind in kinds}
    work: dict[str, list[float]] = {kind: [] for kind in kinds[2:]}
    with tempfile.TemporaryDirectory(prefix="attn_probe_bench_") as logdir:
        # every=2: even steps sampled, odd steps not; images only when asked for below. The
        # probe is detached around each plain step, which closes its outputs: this one stays
        # open until the end, so every sampled step writes.
        output = KeptOpen(logdir, pictures_every=0)
        probe = AttentionProbe(
            model, every=2, outputs=[output], history=1000,
            capture=CaptureOptions(batch_rows=args.batch_rows),
        )
        clock = HookClock([site.module for site in probe.sites])
        step = 0

        def attach() -> None:
            probe.attach()
            clock.install()

        def detach() -> None:
            clock.remove()
            probe.detach()

        def probed(sampled: bool, pictures: bool = False) -> float:
            nonlocal step
            if probe.is_sampled(step) != sampled:
                probe.step(step)
                step += 1
            probe.images_every = 2 if pictures else 0
            clock.seconds = 0.0
            elapsed = timed(train_step)
            closing = timed(lambda: probe.step(step))
            if sampled:
                kind = "sampled + pictures" if pictures else "sampled (defaults)"
                work[kind].append(clock.seconds + closing)
            step += 1
            return elapsed + closing

        attach()
        times["sampled (defaults)"].append(probed(True))  # warm-up of the probe's own path
        sampled_peak = peak_bytes(device)
        for _ in range(args.rounds):
            detach()
            times["plain"].append(timed(train_step))
            attach()
            times["attached, not sampled"].append(probed(False))
            times["sampled (defaults)"].append(probed(True))
            times["sampled + pictures"].append(probed(True, pictures=True))
        detach()
        TensorBoardOutput.close(output)
        sites = len(probe.sites)
        measured = len(probe.history)

    hook_us, root_us = idle_microseconds(args.hook_calls)
    med = {k: statistics.median(v[-args.rounds:]) for k, v in times.items()}
    own = {k: statistics.median(v[-args.rounds:]) for k, v in work.items()}
    plain = med["plain"]
    print(f"model: {args.layers} layers, {args.heads} heads, width {args.width}, T={args.tokens}, "
          f"batch {args.batch}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, "
          f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.rounds} rounds, {measured} sampled steps measured, batch_rows {args.batch_rows}")
    print(f"{'step kind':<24} {'median s':>9} {'ratio to plain':>15}")
    for kind, value in med.items():
        print(f"{kind:<24} {value:>9.3f} {value / plain:>15.3f}")
    for kind, value in own.items():
        print(f"time inside the probe's hooks and step(), {kind}: {value:.3f} s = "
              f"{value / plain:.2%} of a plain step (ratio {1 + value / plain:.3f})")
    spread = (max(times["plain"]) - min(times["plain"])) / plain
    print(f"spread of plain steps (max - min) / median: {spread:.1%} (differences below this "
          "are noise)")
    idle = (hook_us * sites + root_us) * 1e-6  # forward hooks only; backward has none
    print(f"idle hooks: {hook_us:.2f} us per module forward, {root_us:.2f} us per model "
          f"forward: {idle * 1e3:.3f} ms per step ({sites} modules) = {idle / plain:.4%} of a "
          "plain step")
    # every=100 with the defaults: 1 sampled step per 100, pictures every 10th sampled step
    pictures = own["sampled + pictures"] - own["sampled (defaults)"]
    amortised = (idle * 99 + own["sampled (defaults)"] + pictures / 10) / 100
    print(f"amortised overhead at every=100 (pictures every 1000 steps), from the timed probe "
          f"work: {amortised / plain:.3%} of a plain step")
    plain_mem, extra_mem = plain_peak - base_peak, max(0, sampled_peak - plain_peak)
    print(f"peak memory of a plain step: {plain_mem / 2**20:.0f} MiB; extra peak of a sampled "
          f"step: {extra_mem / 2**20:.1f} MiB = {extra_mem / max(plain_mem, 1):.2%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
