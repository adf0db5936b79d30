"""The ``attn-probe`` command: ``demo`` trains and probes a small GPT; ``analyze`` profiles a
model."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from .console import ArgumentParser, Progress, UsageError, deprecated_aliases


def _demo(args: argparse.Namespace) -> int:
    from ..outputs.tables import format_table
    from .demo import DemoConfig, run_demo

    config = DemoConfig(
        log_dir=args.log_dir, steps=args.steps, every=args.every, batch_size=args.batch_size,
        n_layer=args.layers, images_every=args.images_every, seed=args.seed,
    )
    print(f"attn-probe demo: a {config.n_layer}-layer GPT learns Python's own source code; "
          f"attention measured every {config.every} steps", flush=True)
    bar = Progress("training")
    result = run_demo(config, progress=lambda d, t, loss: bar(d, t, f"loss {loss:.3f}"))
    first, last = result.snapshots[0], result.snapshots[-1]
    print(f"\ntrained {config.steps} steps in {result.seconds:.0f}s; loss "
          f"{result.losses[0]:.2f} -> {result.losses[-1]:.2f}")
    print(f"\nattention at step {first.step}:\n{format_table(first)}")
    print(f"\nattention at step {last.step}:\n{format_table(last)}")
    print(f"\nTensorBoard logs in {result.log_dir}. See them with:\n"
          f"  tensorboard --logdir {result.log_dir}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="attn-probe",
        description="Watch attention collapse: rank@tau and columns@tau of every attention head.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="train a small GPT on built-in text with the probe on")
    demo.add_argument("--log-dir", "--logdir", dest="log_dir", default="runs/demo",
                      action=deprecated_aliases("--logdir"),
                      help="TensorBoard directory (%(default)s)")
    demo.add_argument("--steps", type=int, default=DEMO_DEFAULTS["steps"],
                      help="training steps (%(default)s)")
    demo.add_argument("--every", type=int, default=DEMO_DEFAULTS["every"],
                      help="measure attention every N steps (%(default)s)")
    demo.add_argument("--images-every", type=int, default=DEMO_DEFAULTS["images_every"],
                      help="draw pictures every N steps (%(default)s)")
    demo.add_argument("--batch-size", type=int, default=DEMO_DEFAULTS["batch_size"])
    demo.add_argument("--layers", type=int, default=DEMO_DEFAULTS["n_layer"])
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=_demo)

    from .analyze import add_arguments, run_analyze

    analyze = commands.add_parser(
        "analyze", help="the paper's protocol on an existing model: rank per layer and head"
    )
    add_arguments(analyze)
    analyze.set_defaults(run=run_analyze)
    return parser


def _demo_defaults() -> dict:
    from dataclasses import asdict

    from .demo import DemoConfig

    return asdict(DemoConfig())


DEMO_DEFAULTS = _demo_defaults()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except UsageError as error:
        print(f"attn-probe {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"attn-probe {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
