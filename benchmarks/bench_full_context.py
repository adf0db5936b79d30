"""Benchmark: streaming ``full_context_stats`` against the SDPA call it observes.

Run ``python benchmarks/bench_full_context.py [--sizes 1024,4096,8192] [--repeats 5]
[--threads 2] [--device cpu|cuda] [--budget-mib 64] [--retries 20]`` (``--smoke``: every part
at a tiny size, one repeat, to check in seconds that the script runs).

For each length ``T`` (B=1, H=8, D=64, causal, float32 q/k/v) three sides see the same
tensors:

* ``stream``: ``full_context_stats(q, k, is_causal=True)`` with the given memory budget,
* ``sdpa``: ``scaled_dot_product_attention(q, k, v, is_causal=True)``, the call being measured,
* ``materialise``: ``softmax(q @ k^T * scale + causal_mask)`` in float32, the full matrix
  (skipped where its estimated peak, three ``H x T x T`` float32 tensors, exceeds 6 GiB).

Then a training run with sequences of 2,048 tokens (``--train-tokens``; the demo's GPT widened
to 8 heads of 32, 4 layers, batch 4, AdamW) under the probe's defaults (``crop=256``,
``batch_rows=1``): the time of a sampled step against an unsampled one, as a ratio, and the
check that every sampled step reported the full-context figures over all 2,048 tokens.

Times are medians over ``--repeats`` runs that alternate between the sides, in this process;
on Linux a run during which other processes used more than 5% of the CPUs is discarded and
rerun (up to ``--retries`` times; the count is printed), since the machine may be shared.
Extra peak memory is measured for each side in a fresh subprocess that has already allocated
q, k, v and run the same side once at a different, small length (so the allocator, the thread
pool and the BLAS library are warm): on the CPU, the growth of the resident set's high-water
mark (``VmHWM``, reset through ``/proc/self/clear_refs``; where that is unavailable, the growth
of ``ru_maxrss``) over the resident set before the call; on CUDA, the growth of
``torch.cuda.max_memory_allocated`` over the memory allocated before the call.

Prints a table (one row per length and side: time, ratio to SDPA, extra peak memory), then the
training run's sampled and unsampled step times and their ratio.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from attn_probe.metrics import full_context_stats

HEADS, DIM = 8, 64
WARM_LENGTH = 256
MATERIALISE_LIMIT = 6 * 2**30
SIDES = ("stream", "sdpa", "materialise")
#: What --smoke runs: every part of the script at a tiny size (no timing judged).
SMOKE = dict(sizes="128", repeats=1, retries=0, train_tokens=64, threads=1)


def inputs(length: int, device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(length)
    q, k, v = (torch.randn(1, HEADS, length, DIM, generator=gen) for _ in range(3))
    return q.to(device), k.to(device), v.to(device)


def materialise_bytes(length: int) -> int:
    """Estimated peak of the materialising side: scores, masked scores and probabilities."""
    return 3 * HEADS * length * length * 4


def run_side(side: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             budget: int) -> None:
    with torch.no_grad():
        if side == "stream":
            full_context_stats(q, k, is_causal=True, memory_budget=budget)
        elif side == "sdpa":
            F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            length = q.shape[-2]
            mask = torch.full((length, length), -math.inf, device=q.device).triu(1)
            torch.softmax(q @ k.mT * (1.0 / math.sqrt(DIM)) + mask, dim=-1)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _cpu_ticks() -> tuple[int, int, int] | None:
    """Clock ticks of all CPUs: (elapsed, busy in any process, used by this one); None off
    Linux."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(x) for x in stat.readline().split()[1:9]]
        with open("/proc/self/stat") as own:
            mine = own.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    total = sum(fields)
    return total, total - fields[3] - fields[4], int(mine[11]) + int(mine[12])


def timed(side: str, tensors, budget: int, device: str, retries: int) -> tuple[float, int]:
    """Milliseconds of one run, and how many runs were discarded first because other
    processes used more than 5% of the CPUs meanwhile (the machine may be shared)."""
    for discarded in range(retries + 1):
        before = _cpu_ticks()
        sync(device)
        start = time.perf_counter()
        run_side(side, *tensors, budget)
        sync(device)
        elapsed = (time.perf_counter() - start) * 1e3
        after = _cpu_ticks()
        if before is None or after is None:
            return elapsed, 0
        elapsed_ticks, busy, mine = (a - b for a, b in zip(after, before))
        if busy - mine <= max(2, 0.05 * elapsed_ticks):
            return elapsed, discarded
        time.sleep(1.0)
    return elapsed, retries


# --------------------------------------------------------------------------------------------
# Memory: one side in a fresh process
# --------------------------------------------------------------------------------------------


def status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def reset_high_water_mark() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


def child(side: str, length: int, device: str, threads: int, budget: int) -> None:
    """Prints the side's extra peak memory in MiB as JSON (run in a fresh process)."""
    torch.set_num_threads(threads)
    run_side(side, *inputs(WARM_LENGTH, device), budget)  # warm-up at another length
    tensors = inputs(length, device)
    sync(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        run_side(side, *tensors, budget)
        sync(device)
        extra = torch.cuda.max_memory_allocated() - before
        method = "cuda max_memory_allocated"
    elif reset_high_water_mark():
        before = status_kib("VmRSS")
        run_side(side, *tensors, budget)
        extra = (status_kib("VmHWM") - before) * 1024
        method = "VmHWM - VmRSS"
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        run_side(side, *tensors, budget)
        extra = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
        method = "ru_maxrss growth"
    print(json.dumps({"extra_mib": extra / 2**20, "method": method}))


def extra_memory(side: str, length: int, args: argparse.Namespace) -> tuple[float, str]:
    command = [sys.executable, __file__, "--child", side, "--sizes", str(length),
               "--device", args.device, "--threads", str(args.threads),
               "--budget-mib", str(args.budget_mib)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return result["extra_mib"], result["method"]


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1024,4096,8192")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--budget-mib", type=float, default=64.0)
    parser.add_argument("--retries", type=int, default=20,
                        help="reruns of a timed run disturbed by other processes (Linux)")
    parser.add_argument("--train-tokens", type=int, default=2048,
                        help="sequence length of the training run (0: skip it)")
    parser.add_argument("--smoke", action="store_true",
                        help="T=128, one repeat, one thread, a 64-token training run (checks the "
                        "script runs)")
    parser.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke:
        vars(args).update(SMOKE)
    budget = int(args.budget_mib * 2**20)
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.child:
        child(args.child, sizes[0], args.device, args.threads, budget)
        return

    torch.set_num_threads(args.threads)
    print(f"device {args.device}, threads {args.threads}, B=1 H={HEADS} D={DIM} causal float32, "
          f"budget {args.budget_mib:g} MiB, median of {args.repeats} alternating repeats")
    header = (f"{'T':>6} {'side':<12} {'time ms':>10} {'/ SDPA':>8} {'extra peak MiB':>15}")
    print(header)
    print("-" * len(header))
    skipped = []
    method = ""
    disturbed = 0
    for length in sizes:
        sides = [s for s in SIDES
                 if s != "materialise" or materialise_bytes(length) <= MATERIALISE_LIMIT]
        if len(sides) < len(SIDES):
            skipped.append(length)
        tensors = inputs(length, args.device)
        times = {side: [] for side in sides}
        for side in sides:  # warm-up
            run_side(side, *tensors, budget)
        for r in range(args.repeats):
            order = sides[r % len(sides):] + sides[: r % len(sides)]
            for side in order:
                elapsed, discarded = timed(side, tensors, budget, args.device, args.retries)
                times[side].append(elapsed)
                disturbed += discarded
        del tensors
        medians = {side: statistics.median(ts) for side, ts in times.items()}
        for side in sides:
            extra, method = extra_memory(side, length, args)
            ratio = medians[side] / medians["sdpa"]
            print(f"{length:>6} {side:<12} {medians[side]:>10.1f} {ratio:>7.2f}x {extra:>15.1f}")
    print(f"extra peak memory: {method}, fresh process per side, warmed up at T={WARM_LENGTH}")
    print(f"timed runs discarded because other processes used the CPUs: {disturbed}")
    for length in skipped:
        print(f"materialise skipped at T={length}: estimated peak "
              f"{materialise_bytes(length) / 2**30:.2f} GiB > {MATERIALISE_LIMIT / 2**30:g} GiB")
    if args.train_tokens:
        training_run(args.train_tokens, args.repeats, args.device)


def training_run(length: int, repeats: int, device: str) -> None:
    """Steps of a GPT on ``length``-token sequences under the probe's defaults: sampled steps
    against unsampled ones, in alternation, and what the sampled ones reported."""
    import attn_probe
    from attn_probe.models.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=256, block_size=length, n_layer=4, n_head=8,
                          n_embd=256)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = torch.randint(0, 256, (4, length + 1), device=device)
    times = {True: [], False: []}
    with attn_probe.AttentionProbe(model, every=2, history=1000) as probe:
        for step in range(2 * (repeats + 1)):  # steps 0, 2, 4, ... are sampled
            sync(device)
            start = time.perf_counter()
            _, loss = model(data[:, :-1], data[:, 1:])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            probe.step()
            sync(device)
            if step >= 2:  # the first two are warm-up
                times[probe.is_sampled(step)].append(time.perf_counter() - start)
    plain, sampled = (statistics.median(times[k]) * 1e3 for k in (False, True))
    tokens = {layer.reduce("tokens_full", "max") for s in probe.history for layer in s.layers}
    print(f"\ntraining run: GPT 4 layers x 8 heads, width 256, batch 4, T={length}, probe "
          "defaults (crop=256, batch_rows=1)")
    print(f"  unsampled step {plain:.0f} ms, sampled step {sampled:.0f} ms: "
          f"{sampled / plain:.2f}x (median of {len(times[True])}); sampled every 100 steps "
          f"(the default) that is {(sampled - plain) / plain / 100:.2%} on average")
    print(f"  full-context figures on {len(probe.history)} of {len(probe.history)} sampled "
          f"steps, over {', '.join(f'{t:.0f}' for t in sorted(tokens))} tokens")


if __name__ == "__main__":
    main()
