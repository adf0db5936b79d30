"""Benchmark: how fast ``attn_probe.explore`` switches layers once the first capture is made.

Run ``python benchmarks/bench_explore.py [--layers 16] [--tokens 256] [--threads N]``
(``--smoke``: a tiny model, a few seconds, nothing judged). A demo GPT of 16 layers (8 heads,
width 256) gets 256-token inputs; the view is made (one forward pass records every layer, then
the first layer's heatmap, per-head bars and table are drawn), then the layer picker is set to
every other layer in turn, and then to each again. Printed: the time of the first capture, the
median time of a switch to a new layer (its figures computed and drawn), the median of a switch
back (drawn from the cache), each as a ratio of the first capture. Exits non-zero if a switch ran
the model again. One thread by default, as the demo: the matrices of one sequence are small, and
on a busy 2-core machine two threads made every eigenvalue call several times slower.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

import attn_probe
from attn_probe.models.gpt import GPT, GPTConfig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op threads (%(default)s; 0: PyTorch's default)")
    parser.add_argument("--smoke", action="store_true",
                        help="a tiny run that exercises the whole script (nothing judged)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.layers, args.tokens, args.heads, args.width = 3, 24, 2, 16
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    config = GPTConfig(vocab_size=512, block_size=args.tokens, n_layer=args.layers,
                       n_head=args.heads, n_embd=args.width)
    model = GPT(config).eval()
    tokens = torch.randint(0, config.vocab_size, (4, args.tokens),
                           generator=torch.Generator().manual_seed(0))

    start = time.perf_counter()
    view = attn_probe.explore(model, tokens, widget=True)
    first = time.perf_counter() - start
    names = [name for _, name in view.layer.options]

    def switch(order: list[str]) -> list[float]:
        times = []
        for name in order:
            start = time.perf_counter()
            view.layer.value = name
            times.append(time.perf_counter() - start)
        return times

    new = switch(names[1:])
    back = switch(names[:-1][::-1])
    runs = view.explorer.runs
    median_new, median_back = statistics.median(new), statistics.median(back)
    print(f"model: {args.layers} layers, {args.heads} heads, width {args.width}; inputs "
          f"{tuple(tokens.shape)}; {torch.get_num_threads()} threads")
    print(f"first capture (forward pass, first layer's views): {first:.3f} s")
    print(f"switch to a new layer:  median {median_new:.3f} s over {len(new)} switches "
          f"(ratio {median_new / first:.3f} of the first capture)")
    print(f"switch back to a layer: median {median_back:.3f} s over {len(back)} switches "
          f"(ratio {median_back / first:.3f} of the first capture)")
    print(f"forward passes: {runs}")
    if runs != 1:
        print("error: a layer switch ran the model again", file=sys.stderr)
        return 1
    if not args.smoke:
        verdict = "under" if median_new < 1.0 else "NOT under"
        print(f"a layer switch takes {verdict} a second")
    return 0


if __name__ == "__main__":
    sys.exit(main())
