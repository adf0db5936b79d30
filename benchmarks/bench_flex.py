"""Benchmark: the streamed figures of a ``flex_attention`` call against those of the same
attention given to SDPA, and against the (eager) ``flex_attention`` call itself.

Run ``python benchmarks/bench_flex.py [--sizes 1024,2048] [--repeats 5] [--threads 2]``
(``--smoke``: a tiny size, one repeat, to check in seconds that the script runs).

For each length ``T`` (B=1, H=8, H_kv=2, D=64, float32) the attention is causal within packed
documents of T/4 tokens, with tanh soft-capping of the logits at 30. Four sides see the same
q, k, v:

* ``flex stream``: ``full_context_stats`` of the intercepted flex call (``FlexScoring``:
  ``mask_mod`` and ``score_mod`` evaluated per block of queries),
* ``dense stream``: ``full_context_stats`` of the soft-capped scores' equivalent for SDPA, a
  dense boolean mask (what the probe would get from an SDPA call with that mask; soft-capping
  has no SDPA form, so this side leaves it out and only the masking is compared),
* ``flex call``: ``flex_attention`` itself, eager (what a sampled forward pass runs),
* the figures of the two streams agree (``max |Δ entropy|`` with the cap off on both).

Times are medians over ``--repeats`` runs that alternate between the sides, in this process;
ratios are to the flex call.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
import warnings

import torch

from attn_probe.attention.flex import FlexScoring
from attn_probe.metrics import full_context_stats

HEADS, KV_HEADS, DIM, CAP = 8, 2, 64, 30.0
SMOKE = dict(sizes="256", repeats=1, threads=1)


def case(length: int):
    from torch.nn.attention.flex_attention import create_block_mask

    gen = torch.Generator().manual_seed(length)
    q = torch.randn(1, HEADS, length, DIM, generator=gen)
    k, v = (torch.randn(1, KV_HEADS, length, DIM, generator=gen) for _ in range(2))
    documents = torch.arange(length) // max(1, length // 4)

    def mask_mod(b, h, qi, ki):
        return (qi >= ki) & (documents[qi] == documents[ki])

    def softcap(score, b, h, qi, ki):
        return CAP * torch.tanh(score / CAP)

    block_mask = create_block_mask(mask_mod, None, None, length, length, device="cpu")
    pos = torch.arange(length)
    dense = (pos[:, None] >= pos[None, :]) & (documents[:, None] == documents[None, :])
    return q, k, v, block_mask, mask_mod, softcap, dense


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1024,2048")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    if args.smoke:
        for name, value in SMOKE.items():
            setattr(args, name, value)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", "flex_attention called without torch.compile")
    from torch.nn.attention.flex_attention import flex_attention

    print(f"B=1, H={HEADS}, H_kv={KV_HEADS}, D={DIM}, documents of T/4, soft-cap {CAP}; "
          f"{args.threads} threads, median of {args.repeats}")
    print(f"{'T':>6} {'side':<13} {'time ms':>9} {'/ flex call':>12}")
    for length in (int(s) for s in args.sizes.split(",")):
        q, k, v, block_mask, mask_mod, softcap, dense = case(length)
        scoring = FlexScoring.of_call(softcap, block_mask)
        sides = {
            "flex stream": lambda: full_context_stats(q, k, flex=scoring),
            "dense stream": lambda: full_context_stats(q, k, attn_mask=dense),
            "flex call": lambda: flex_attention(q, k, v, score_mod=softcap,
                                                block_mask=block_mask, enable_gqa=True),
        }
        with torch.no_grad(), torch.compiler.set_stance("force_eager"):
            for fn in sides.values():  # warm
                fn()
            times = {name: [] for name in sides}
            for _ in range(args.repeats):
                for name, fn in sides.items():
                    times[name].append(timed(fn))
            uncapped = full_context_stats(q, k, flex=FlexScoring.of_call(None, block_mask))
            plain = full_context_stats(q, k, attn_mask=dense)
        base = statistics.median(times["flex call"])
        for name, values in times.items():
            median = statistics.median(values)
            print(f"{length:>6} {name:<13} {1e3 * median:>9.1f} {median / base:>11.2f}x")
        gap = float((uncapped["entropy"] - plain["entropy"]).abs().max())
        print(f"{length:>6} without the cap the two streams agree: max |d entropy| "
              f"{gap:.1e}{' (ok)' if gap < 1e-12 and not math.isnan(gap) else ''}")


if __name__ == "__main__":
    main()
