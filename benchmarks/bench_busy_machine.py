"""Benchmark: a sampled step of GPT-2 small on a quiet and on a busy machine, and the probe
beside the route users take today (eager attention with ``output_attentions=True``).

Run ``python benchmarks/bench_busy_machine.py [--busy-lengths 256,1024]
[--peer-lengths 256,1024,4096] [--repeats 3] [--peer-repeats 2] [--busy-nice 0] [--parts 0,1,2]``
(``--smoke``: a two-layer model of width 32 at T=32, one repeat, every configuration in this
process, to check in seconds that the script runs).

The model is GPT-2 small from its config (``transformers.GPT2Config``: 12 layers of 12 heads,
width 768, random weights, seed 0), one sequence, forward passes under ``torch.no_grad``,
torch's default intra-op threads. Every configuration runs in a fresh process, so that its first
sampled step is the first measurement of that process.

0. **One layer's figures** by thread count (1 and torch's own), quiet and busy: the batched
   ``eigvalsh`` of the heads' Gram matrices (one call, so one parallel region: what a
   restructuring into fewer, larger regions would leave), ``head_metrics`` of the cropped
   matrix, and ``full_context_stats`` over ``--layer-length`` tokens; in this process.
1. **A busy machine** (T in ``--busy-lengths``): the plain SDPA forward, and the sampled probed
   forward (``AttentionProbe(model, every=1)``: the forward plus ``probe.step()``), its first
   sampled step and the median of the later ones, with the probe's thread budget (the default,
   one thread) and without it (``CaptureOptions(threads=None)``: torch's own count), quiet and
   while one other process spins a CPU loop (started and stopped by this script, at
   ``--busy-nice``; 0 by default, the priority of a data-loader worker or of another job).
   Ratios: to the plain forward of the same load, and the busy time to the quiet time.
2. **Beside the peer route** (T in ``--peer-lengths``): the plain SDPA forward; the sampled
   probed forward; the eager forward with ``output_attentions=True`` followed by
   :func:`attn_probe.metrics.head_metrics` of every layer's returned matrix at the probe's crop
   (its first 256 queries and keys: the same matrix figures; the probe also computes the
   whole-sequence figures, which this route leaves out, so its cost is a lower bound). Time and
   extra peak memory, each as a ratio to the plain forward. Extra peak memory: the growth of the
   process's resident-set high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``;
   where that is unavailable, the growth of ``ru_maxrss``) over the resident set before the
   measured call, in a fresh process per configuration that has already run the same
   configuration once at T=64 (allocator, thread pool and libraries warm). The peer route is
   skipped at a length whose attention matrices alone would not fit in the available memory.

Times are medians; the machine's load average is printed before and after, since other
processes make a shared machine noisy.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

from bench_full_context import reset_high_water_mark, status_kib

#: GPT-2 small.
SHAPE = dict(layers=12, heads=12, width=768)
CROP = 256  # the probe's default crop: the matrix figures' crop
WARM_LENGTH = 64
SIDES = ("plain", "probe", "peer")
#: What --smoke runs: every part at a tiny size, one repeat (no timing judged).
SMOKE = dict(layers=2, heads=2, width=32, busy_lengths="32", peer_lengths="32", repeats=1,
             peer_repeats=1, layer_length=64, layer_repeats=1)
#: The competing process: one CPU loop that ends when its parent does.
SPIN = ("import os\nparent = os.getppid()\nwhile os.getppid() == parent:\n"
        "    for _ in range(100000):\n        pass\n")


def build(impl: str, length: int, args: argparse.Namespace) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=args.layers, n_head=args.heads, n_embd=args.width,
                        n_positions=max(length, 1024))
    torch.manual_seed(0)
    return GPT2LMHeadModel._from_config(config, attn_implementation=impl).eval()


def tokens(length: int) -> torch.Tensor:
    return torch.randint(0, 50257, (1, length), generator=torch.Generator().manual_seed(length))


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class Busy:
    """One competing process spinning a CPU loop at ``nice`` while the block runs."""

    def __init__(self, nice: int) -> None:
        self.nice = nice

    def __enter__(self) -> "Busy":
        self.process = subprocess.Popen(["nice", "-n", str(self.nice), sys.executable, "-c", SPIN])
        time.sleep(0.2)
        return self

    def __exit__(self, *exc) -> None:
        self.process.kill()
        self.process.wait()


# --------------------------------------------------------------------------------------------
# 0. One layer's figures: which thread count
# --------------------------------------------------------------------------------------------


def layer_parts(args: argparse.Namespace) -> dict:
    """One layer's work, at the model's head count: the batched ``eigvalsh`` of the heads'
    float64 Gram matrices (one call: a single parallel region), all the figures of the cropped
    matrix, and the whole-sequence pass at the longest busy length."""
    from attn_probe.metrics import full_context_stats, head_metrics

    gen = torch.Generator().manual_seed(0)
    crop, length, dim = min(CROP, args.layer_length), args.layer_length, args.width // args.heads
    q, k = (torch.randn(1, args.heads, length, dim, generator=gen) for _ in range(2))
    causal = torch.ones(crop, crop, dtype=torch.bool).tril()
    scores = (q[:, :, :crop] @ k[:, :, :crop].mT / dim**0.5).masked_fill(~causal, -torch.inf)
    attention = scores.softmax(-1)
    gram = attention.double() @ attention.double().mT
    return {
        f"eigvalsh ({args.heads}, {crop}, {crop}) float64": lambda: torch.linalg.eigvalsh(gram),
        f"head_metrics, crop {crop}": lambda: head_metrics(attention),
        f"full_context_stats, T={length}": lambda: full_context_stats(q, k, is_causal=True),
    }


def run_layer(args: argparse.Namespace) -> None:
    print(f"\n0. one layer's figures ({args.heads} heads of {args.width // args.heads}), by "
          f"intra-op threads, quiet and busy (nice {args.busy_nice}); median of "
          f"{args.layer_repeats}, ms")
    parts, own = layer_parts(args), torch.get_num_threads()
    counts = (1, max(own, 2))  # one thread, and torch's own count (two at least)
    columns = [f"{load} {n}t" for load in ("quiet", "busy") for n in counts]
    table(f"{'part':<36}" + "".join(f"{c:>10}" for c in columns))
    results = {name: [] for name in parts}
    for load in ("quiet", "busy"):
        with Busy(args.busy_nice) if load == "busy" else contextlib.nullcontext():
            for threads in counts:
                torch.set_num_threads(threads)
                try:
                    for name, fn in parts.items():
                        fn()  # warm
                        times = [seconds(fn) for _ in range(args.layer_repeats)]
                        results[name].append(statistics.median(times) * 1e3)
                finally:
                    torch.set_num_threads(own)
    for name, row in results.items():
        print(f"{name:<36}" + "".join(f"{ms:>10.1f}" for ms in row))


# --------------------------------------------------------------------------------------------
# 1. A busy machine
# --------------------------------------------------------------------------------------------


def busy_child(length: int, args: argparse.Namespace) -> dict:
    """Plain and sampled probed forwards at ``length``, each budget, in this fresh process."""
    import attn_probe

    model, x = build("sdpa", length, args), tokens(length)

    def plain() -> None:
        with torch.no_grad():
            model(x)

    plain()  # the model's own first call, as a training run would have made
    result = {}
    for threads in (1, None):
        probe = attn_probe.AttentionProbe(model, every=1,
                                          capture=attn_probe.CaptureOptions(threads=threads))
        plains, sampled = [], []
        for _ in range(args.repeats + 1):
            plains.append(seconds(plain))
            probe.attach()
            sampled.append(seconds(lambda: (plain(), probe.step())))
            probe.detach()
        result[str(threads)] = dict(plain=statistics.median(plains), first=sampled[0],
                                    later=statistics.median(sampled[1:]))
    return result


def run_busy(args: argparse.Namespace) -> None:
    print(f"\n1. a busy machine: {describe(args)}; sampled = the forward plus probe.step(); "
          f"busy = one other process spinning a CPU loop at nice {args.busy_nice}; median of "
          f"{args.repeats} (first: the first sampled step of a fresh process)")
    table(f"{'T':>5} {'load':<5} {'threads':<16} {'plain s':>8} {'first s':>8} "
          f"{'later s':>8} {'first/plain':>11} {'later/plain':>11} {'later/quiet':>11}")
    for length in lengths(args.busy_lengths):
        quiet = child(args, "busy", length)
        with Busy(args.busy_nice):
            busy = child(args, "busy", length)
        for load, result in (("quiet", quiet), ("busy", busy)):
            for threads, label in (("1", "1 (default)"), ("None", "torch's (None)")):
                r = result[threads]
                print(f"{length:>5} {load:<5} {label:<16} {r['plain']:>8.2f} {r['first']:>8.2f} "
                      f"{r['later']:>8.2f} {r['first'] / r['plain']:>10.2f}x "
                      f"{r['later'] / r['plain']:>10.2f}x "
                      f"{r['later'] / quiet[threads]['later']:>10.2f}x")


# --------------------------------------------------------------------------------------------
# 2. Beside the peer route
# --------------------------------------------------------------------------------------------


def peer_child(side: str, length: int, args: argparse.Namespace) -> dict:
    """Time and extra peak memory of one side at ``length``, in this fresh process."""
    import attn_probe
    from attn_probe.metrics import head_metrics

    model = build("eager" if side == "peer" else "sdpa", length, args)
    probe = attn_probe.AttentionProbe(model, every=1)

    def run(x: torch.Tensor) -> None:
        with torch.no_grad():
            if side == "plain":
                model(x)
            elif side == "probe":
                model(x)
                probe.step()
            else:
                out = model(x, output_attentions=True)
                for attention in out.attentions:
                    head_metrics(attention[:, :, :CROP, :CROP])
                del out

    if side == "probe":
        probe.attach()
    run(tokens(WARM_LENGTH))
    x = tokens(length)
    if reset_high_water_mark():
        before = status_kib("VmRSS")
        times = [seconds(lambda: run(x))]
        extra, method = status_kib("VmHWM") - before, "VmHWM - VmRSS"
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        times = [seconds(lambda: run(x))]
        extra, method = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before, "ru_maxrss"
    times += [seconds(lambda: run(x)) for _ in range(args.peer_repeats - 1)]
    probe.detach()
    return dict(seconds=statistics.median(times), extra_mib=extra / 1024, method=method)


def peer_fits(length: int, args: argparse.Namespace) -> bool:
    """Whether the peer route's returned matrices (float32, every layer) fit in the memory
    available now, with room for the rest."""
    need = 4 * args.layers * args.heads * length * length
    try:
        with open("/proc/meminfo") as meminfo:
            available = next(int(line.split()[1]) * 1024 for line in meminfo
                             if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return True
    return 1.5 * need < available


def run_peer(args: argparse.Namespace) -> None:
    print(f"\n2. beside the peer route: {describe(args)}; peer = eager attention, "
          f"output_attentions=True, head_metrics of every layer's matrix cropped to {CROP}; "
          f"median of {args.peer_repeats}")
    table(f"{'T':>5} {'side':<6} {'time s':>8} {'/ plain':>8} {'extra peak MiB':>15} "
          f"{'/ plain':>8}")
    method, skipped = "", []
    for length in lengths(args.peer_lengths):
        sides = [s for s in SIDES if s != "peer" or peer_fits(length, args)]
        if len(sides) < len(SIDES):
            skipped.append(length)
        results = {side: child(args, "peer", length, side) for side in sides}
        base = results["plain"]
        for side, r in results.items():
            method = r["method"]
            print(f"{length:>5} {side:<6} {r['seconds']:>8.2f} "
                  f"{r['seconds'] / base['seconds']:>7.2f}x {r['extra_mib']:>15.1f} "
                  f"{r['extra_mib'] / max(base['extra_mib'], 1.0):>7.2f}x")
    where = "this process (--smoke)" if args.smoke else "fresh process per configuration"
    print(f"extra peak memory: {method}, {where}, warmed up at T={WARM_LENGTH}")
    for length in skipped:
        print(f"peer route skipped at T={length}: its matrices would not fit in the memory "
              "available")


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def table(header: str) -> None:
    print(header)
    print("-" * len(header))


def lengths(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t]


def describe(args: argparse.Namespace) -> str:
    return (f"GPT-2 ({args.layers} layers, {args.heads} heads, width {args.width}, SDPA), "
            f"one sequence, {torch.get_num_threads()} intra-op threads")


def child(args: argparse.Namespace, part: str, length: int, side: str = "") -> dict:
    """What ``busy_child`` or ``peer_child`` returns, run in a fresh process (with --smoke, in
    this one: seconds instead of a process per configuration)."""
    if args.smoke:
        return busy_child(length, args) if part == "busy" else peer_child(side, length, args)
    extra = [f"--{part}-child", *([side] if side else []), str(length)]
    command = [sys.executable, __file__, *extra, "--layers", str(args.layers),
               "--heads", str(args.heads), "--width", str(args.width),
               "--repeats", str(args.repeats), "--peer-repeats", str(args.peer_repeats)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(extra)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--busy-lengths", default="256,1024")
    parser.add_argument("--peer-lengths", default="256,1024,4096")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peer-repeats", type=int, default=2)
    parser.add_argument("--busy-nice", type=int, default=0)
    parser.add_argument("--parts", default="0,1,2", help="which parts to run (0, 1, 2)")
    parser.add_argument("--layer-length", type=int, default=1024)
    parser.add_argument("--layer-repeats", type=int, default=5)
    parser.add_argument("--layers", type=int, default=SHAPE["layers"])
    parser.add_argument("--heads", type=int, default=SHAPE["heads"])
    parser.add_argument("--width", type=int, default=SHAPE["width"])
    parser.add_argument("--smoke", action="store_true",
                        help="2 layers of width 32 at T=32, one repeat (checks the script runs)")
    parser.add_argument("--busy-child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--peer-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke:
        vars(args).update(SMOKE)
    if args.busy_child:
        print(json.dumps(busy_child(args.busy_child, args)))
        return
    if args.peer_child:
        print(json.dumps(peer_child(args.peer_child[0], int(args.peer_child[1]), args)))
        return
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, load average before "
          f"{os.getloadavg()[0]:.1f}")
    parts = {"0": run_layer, "1": run_busy, "2": run_peer}
    for part in args.parts.split(","):
        parts[part](args)
    print(f"\nload average after {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
