"""Cost of the probe on a GPT-2-small-shaped model in training: time ratios and extra peak memory.

    python benchmarks/bench_probe_overhead.py            # 12 layers, 12 heads, width 768, T=256, batch 8
    python benchmarks/bench_probe_overhead.py --layers 4 --rounds 3   # quicker

Every figure is measured in this one process, plain and probed steps interleaved so both see the
same machine: a plain training step; a step with the probe attached but not sampling (hooks
return at once); a sampled step with the default settings (max_sequences=1, max_tokens=256, no
pictures); a sampled step that also draws pictures (by default every 10th sampled step). The
amortised overhead at every=100 is computed from those per-step costs. Peak memory: the growth of
the process's peak resident set (CPU) or of ``torch.cuda.max_memory_allocated`` (CUDA) caused by
a sampled step after plain steps have set the peak.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import tempfile
import time

import torch

from attn_probe import AttentionProbe
from attn_probe.models.gpt import GPT, GPTConfig


def peak_bytes(device: str) -> int:
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def idle_hook_microseconds(model: torch.nn.Module, calls: int = 20000) -> float:
    """Cost of one unarmed probe hook call: a hooked identity module against a bare one."""
    bare, hooked = torch.nn.Identity(), torch.nn.Identity()
    probe = AttentionProbe(model, every=10**9)  # plans sites on the real model
    site = probe.sites[0]
    recorder = probe._recorder
    hooked.register_forward_pre_hook(lambda m, a, k: recorder._pre(site, a, k), with_kwargs=True)
    hooked.register_forward_hook(lambda m, a, k, o: recorder._post(site, o), with_kwargs=True,
                                 always_call=True)
    x = torch.zeros(1)
    best = {}
    for name, module in (("bare", bare), ("hooked", hooked)) * 3:
        start = time.perf_counter()
        for _ in range(calls):
            module(x)
        best[name] = min(best.get(name, float("inf")), time.perf_counter() - start)
    return max(0.0, best["hooked"] - best["bare"]) / calls / 2 * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5, help="timed steps of each kind")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = args.device

    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=50304, block_size=args.tokens, n_layer=args.layers,
                    n_head=args.heads, n_embd=args.width)
    model = GPT(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, cfg.vocab_size, (args.batch, args.tokens + 1), device=device)

    def train_step() -> None:
        _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()

    def timed(fn) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    base_peak = peak_bytes(device)
    train_step()  # warm-up: allocates optimiser state
    train_step()
    plain_peak = peak_bytes(device)

    logdir = tempfile.mkdtemp(prefix="attn_probe_bench_")
    # every=2: even steps sampled, odd steps not; images only when asked for below
    probe = AttentionProbe(model, log_dir=logdir, every=2, images_every=0).attach()
    probe_seconds = [0.0]  # time spent in the probe's own code: low-noise extra cost

    def clocked(fn):
        def wrapper(*a, **k):
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                probe_seconds[0] += time.perf_counter() - start
        return wrapper

    recorder = probe._recorder
    recorder._from_call, recorder._adapt = clocked(recorder._from_call), clocked(recorder._adapt)
    recorder.sink, probe._publish = clocked(recorder.sink), clocked(probe._publish)
    work: dict[str, list[float]] = {"sampled (defaults)": [], "sampled + pictures": []}
    times: dict[str, list[float]] = {"plain": [], "attached, not sampled": [],
                                     "sampled (defaults)": [], "sampled + pictures": []}
    step = 0

    def probed(sampled: bool, pictures: bool = False) -> float:
        nonlocal step
        if (step % 2 == 0) != sampled:
            probe.step(step)
            step += 1
        probe.images_every = 2 if pictures else 0
        probe_seconds[0] = 0.0
        elapsed = timed(lambda: (train_step(), probe.step(step)))
        if sampled:
            work["sampled + pictures" if pictures else "sampled (defaults)"].append(probe_seconds[0])
        step += 1
        return elapsed

    times["sampled (defaults)"].append(probed(True))  # warm-up of the probe's own path
    sampled_peak = peak_bytes(device)
    for _ in range(args.rounds):
        probe.detach()
        times["plain"].append(timed(train_step))
        probe.attach()
        times["attached, not sampled"].append(probed(False))
        times["sampled (defaults)"].append(probed(True))
        times["sampled + pictures"].append(probed(True, pictures=True))
    probe.detach()

    hook_us = idle_hook_microseconds(model)
    med = {k: statistics.median(v[-args.rounds:]) for k, v in times.items()}
    plain = med["plain"]
    print(f"model: {args.layers} layers, {args.heads} heads, width {args.width}, T={args.tokens}, "
          f"batch {args.batch}, {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M params, "
          f"device {device}, torch threads {torch.get_num_threads()}, {args.rounds} rounds")
    print(f"{'step kind':<24} {'median s':>9} {'ratio to plain':>15}")
    for kind, value in med.items():
        print(f"{kind:<24} {value:>9.3f} {value / plain:>15.3f}")
    for kind, seconds in work.items():
        value = statistics.median(seconds[-args.rounds:])
        print(f"time inside the probe's code, {kind}: {value:.3f} s = {value / plain:.2%} of a "
              f"plain step (ratio {1 + value / plain:.3f})")
    spread = (max(times["plain"]) - min(times["plain"])) / plain
    print(f"spread of plain steps (max - min) / median: {spread:.1%} (differences below this "
          "are noise)")
    # Unsampled steps: the idle hooks' cost, timed directly (whole-step differences are noise).
    idle = hook_us * 1e-6 * 2 * len(probe.sites)  # forward hooks; backward has none
    extra_sampled = statistics.median(work["sampled (defaults)"][-args.rounds:])
    extra_pictures = statistics.median(work["sampled + pictures"][-args.rounds:]) - extra_sampled
    print(f"idle hooks: {hook_us:.2f} us per hook call, {idle * 1e3:.3f} ms per step "
          f"({len(probe.sites)} modules) = {idle / plain:.4%} of a plain step")
    # every=100 with the defaults: 1 sampled step per 100, pictures every 10th sampled step
    amortised = (idle * 99 + extra_sampled + extra_pictures / 10) / 100
    print(f"amortised overhead at every=100 (pictures every 1000 steps), from the timed probe "
          f"work: {amortised / plain:.3%} of a plain step")
    plain_mem, extra_mem = plain_peak - base_peak, max(0, sampled_peak - plain_peak)
    print(f"peak memory of a plain step: {plain_mem / 2**20:.0f} MiB; extra peak of a sampled "
          f"step: {extra_mem / 2**20:.1f} MiB = {extra_mem / max(plain_mem, 1):.2%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
