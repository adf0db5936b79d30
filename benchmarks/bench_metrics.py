"""Benchmark: batched ``rank_at`` + ``columns_at`` against the per-head float64 reference loop.

Run ``python benchmarks/bench_metrics.py [--device cuda] [--repeats 7] [--threads N]``
(``--smoke``: small matrices and one repeat, to check in seconds that the script runs).  Both
sides see the same matrices in the same run; times are medians over the repeats, which alternate
between the two sides.  Prints one table row per case: its shape, both times, the speedup
(``ref / fast``) and how many heads differ.  The script exits with a non-zero status if any
head's integers differ from the reference.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from attn_probe.metrics import columns_at, rank_at

TAU = 0.9


def reference(A: torch.Tensor, tau: float = TAU) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head loop: float64 ``svdvals`` for the rank, sorted column masses for the columns."""
    flat = A.reshape(-1, *A.shape[-2:])
    ranks, cols = [], []
    for a in flat:
        s2 = torch.linalg.svdvals(a.double()) ** 2
        c = s2.cumsum(0)
        ranks.append(int(torch.searchsorted(c, tau * c[-1])) + 1)
        m = (a.double() ** 2).sum(-2).sort(descending=True).values
        c = m.cumsum(0)
        cols.append(int(torch.searchsorted(c, tau * c[-1])) + 1)
    return torch.tensor(ranks), torch.tensor(cols)


def fast(A: torch.Tensor, tau: float = TAU) -> tuple[torch.Tensor, torch.Tensor]:
    return rank_at(A, tau).reshape(-1).cpu(), columns_at(A, tau).reshape(-1).cpu()


def causal_softmax(heads: int, T: int, temperature: float, device: str) -> torch.Tensor:
    logits = torch.randn(heads, T, T) / temperature
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    return torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1).to(device)


def collapsed_heads(heads: int, T: int, device: str) -> torch.Tensor:
    """Lazy heads: most mass on key 0 (some heads share it with key 1), small causal noise."""
    noise = causal_softmax(heads, T, 1.0, "cpu")
    leak = 0.02 + 0.10 * torch.rand(heads, T, 1)  # mass spread as noise, per query
    second = torch.rand(heads, 1, 1) * torch.rand(heads, T, 1)  # share of key 1, per query
    second[: heads // 2] = 0.0  # half the heads use key 0 only, the others also key 1
    second[:, :1] = 0.0  # query 0 can only see key 0
    A = noise * leak
    A[..., 0] += ((1 - leak) * (1 - second))[..., 0]
    A[..., 1] += ((1 - leak) * second)[..., 0]
    return A.to(device)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, A: torch.Tensor, device: str):
    sync(device)
    t0 = time.perf_counter()
    result = fn(A)
    sync(device)
    return (time.perf_counter() - t0) * 1e3, result


def compare(A: torch.Tensor, device: str, repeats: int):
    """Median times of reference and fast path; repeats alternate so both see the same load."""
    fast(A)  # warm-up (allocator, CUDA context, lazy library loading)
    ref_times, fast_times = [], []
    for _ in range(repeats):
        t, ref_result = timed(reference, A, device)
        ref_times.append(t)
        t, fast_result = timed(fast, A, device)
        fast_times.append(t)
    return statistics.median(ref_times), statistics.median(fast_times), ref_result, fast_result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats per case")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads before timing (default: leave as is)")
    parser.add_argument("--smoke", action="store_true",
                        help="16 heads of T=16 and 32, one repeat, one thread (checks the script "
                        "runs)")
    args = parser.parse_args(argv)
    args.repeats = 1 if args.smoke else max(1, args.repeats)
    if args.smoke:
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("CUDA is not available", file=sys.stderr)
        return 2

    torch.manual_seed(args.seed)
    lengths, collapsed = ((16, 32), 32) if args.smoke else ((100, 256, 512), 256)
    cases = [(f"softmax causal T={t}", causal_softmax(16, t, 1.0, args.device)) for t in lengths]
    cases.append((f"collapsed causal T={collapsed}", collapsed_heads(16, collapsed, args.device)))
    print(f"torch {torch.__version__}, device {args.device}, "
          f"threads {torch.get_num_threads()}, repeats {args.repeats}, tau {TAU}")
    header = f"{'case':<24} {'shape':<16} {'ref ms':>9} {'fast ms':>9} {'speedup':>8} " \
             f"{'mismatch':>8}  ranks"
    print(header)
    print("-" * len(header))
    total_bad = 0
    for name, A in cases:
        ref_ms, fast_ms, (ref_rank, ref_cols), (rank, cols) = compare(A, args.device,
                                                                     args.repeats)
        bad = int(((rank != ref_rank) | (cols != ref_cols)).sum())
        total_bad += bad
        span = f"{int(ref_rank.min())}..{int(ref_rank.max())}"
        print(f"{name:<24} {str(tuple(A.shape)):<16} {ref_ms:9.1f} {fast_ms:9.1f} "
              f"{ref_ms / fast_ms:7.1f}x {bad:8d}  {span}")
    if total_bad:
        print(f"FAIL: {total_bad} head(s) differ from the reference", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
