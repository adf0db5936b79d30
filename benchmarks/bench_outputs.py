"""Cost of the outputs on a sampled step: each tracker's write against TensorBoard alone.

    python benchmarks/bench_outputs.py            # 12 layers x 12 heads (GPT-2 small's shape)
    python benchmarks/bench_outputs.py --rounds 10
    python benchmarks/bench_outputs.py --smoke    # 2 layers, 2 rounds: seconds

The snapshots come from a real probe run of the demo GPT (attention samples kept for pictures).
Each output gets the same snapshots through the output protocol, as the probe hands them on
the process that logs, and only its ``write`` is timed: the measurement itself is the same
whatever the outputs (``bench_probe_overhead.py`` times it). Every output is set up by a first
write that is not timed (a W&B run started offline, an MLflow run made in a SQLite store), then
the rounds are interleaved so that every output sees the same machine. Two kinds of step,
alternating: a step of scalars and alerts only (most sampled steps), and a picture step (head
health, collapse map, MaxRank profile, heatmaps: by default the first sampled step and one every
1000 steps).
"all" is the four outputs of one probe, each drawing its own pictures.

Prints the model and the scalars a step, then a table: the median write of each output in
milliseconds on both kinds of step, and its ratio to TensorBoard alone in the same run.
Outputs whose library is missing are listed as such.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from attn_probe import AttentionProbe, Output, TensorBoardOutput
from attn_probe.models.gpt import GPT, GPTConfig
from attn_probe.outputs import health
from attn_probe.outputs.jsonl import JsonlOutput
from attn_probe.outputs.scalars import Scalars

SMOKE = dict(layers=2, heads=2, width=32, tokens=16, rounds=2)


class Pictures(Output):
    """Asks for attention samples of ``crop`` tokens at every step (so that ``probe.last``
    holds them); writes nothing."""

    def __init__(self, crop: int) -> None:
        self.crop = crop

    def pictures(self, step):
        return self.crop

    def write(self, snapshot):
        pass


def snapshots(args) -> tuple[list, dict]:
    """The snapshots of a probe run (with attention samples) and the probe's settings."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=256, block_size=args.tokens, n_layer=args.layers,
                          n_head=args.heads, n_embd=args.width))
    x = torch.randint(0, 256, (2, args.tokens + 1))
    taken = []
    with AttentionProbe(model, every=1, outputs=[Pictures(64)]) as probe:
        for _ in range(2 * args.rounds + 1):  # a set-up step, then scalars and pictures
            with torch.no_grad():
                model(x[:, :-1], x[:, 1:])
            taken.append(probe.step())
    settings = dict(every=probe.every, offset=probe.offset, capture=probe.capture,
                    alerts=probe.rules, layers=[layer.name for layer in taken[0].layers])
    return taken, settings


def make_outputs(folder: Path) -> dict[str, list[Output] | None]:
    """name -> the outputs of one probe (None: the library is missing); pictures every second
    step (the odd steps are scalars only). One MLflow store holds both MLflow runs."""
    every = dict(pictures_every=2)

    def mlflow(name: str):
        try:
            from attn_probe.outputs.mlflow import MlflowOutput, import_mlflow

            import_mlflow()
        except ImportError:
            return None
        return MlflowOutput(f"sqlite:///{folder / 'mlflow.db'}", run_name=name, **every)

    def wandb(sub: str):
        try:
            from attn_probe.outputs.wandb import WandbOutput, import_wandb

            import_wandb()
        except ImportError:
            return None
        return WandbOutput(mode="offline", dir=folder / sub, project="bench", **every)

    made = {
        "tensorboard": [TensorBoardOutput(str(folder / "tb"), **every)],
        "jsonl": [JsonlOutput(folder / "run.jsonl")],
        "mlflow": [mlflow("mlflow")],
        "wandb": [wandb("wandb")],
    }
    made["all"] = [TensorBoardOutput(str(folder / "all-tb"), **every),
                   JsonlOutput(folder / "all.jsonl"), mlflow("all"), wandb("all-wandb")]
    return {name: None if None in outs else outs for name, outs in made.items()}


def timed(runs: dict[str, list[Output] | None], snaps: list, settings: dict
          ) -> tuple[dict[str, float], dict[str, float]]:
    """name -> median seconds of one write of every output of ``runs[name]``, on steps of
    scalars only and on picture steps."""
    layers = [layer.name for layer in snaps[0].layers]
    live = {name: outs for name, outs in runs.items() if outs is not None}
    for outs in live.values():
        for output in outs:
            output.start(layers)
            output.run_settings(settings)
            output.pictures(snaps[0].step)
            output.write(snaps[0])  # set-up: not timed
    seconds: dict[tuple[str, bool], list[float]] = {}
    for snapshot in snaps[1:]:
        for name, outs in live.items():
            start = time.perf_counter()
            for output in outs:
                output.pictures(snapshot.step)
                output.write(snapshot)
            seconds.setdefault((name, snapshot.step % 2 == 0), []).append(
                time.perf_counter() - start)
    for outs in live.values():
        for output in outs:
            output.close()
    return tuple({name: statistics.median(seconds[name, drawn]) for name in live}
                 for drawn in (False, True))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5,
                        help="timed writes of each output on each kind of step")
    parser.add_argument("--smoke", action="store_true",
                        help="2 layers, 2 rounds, in seconds (checks the script runs)")
    args = parser.parse_args(argv)
    if args.smoke:
        vars(args).update(SMOKE)
    os.environ.setdefault("WANDB_SILENT", "true")
    torch.set_num_threads(1)
    snaps, settings = snapshots(args)
    count = len(Scalars()(snaps[0], health.worst_states(snaps[0])))
    print(f"model: {args.layers} layers, {args.heads} heads, width {args.width}; "
          f"{count} scalars a step; {args.rounds} timed writes of each output")
    with tempfile.TemporaryDirectory() as folder:
        plain, drawn = timed(make_outputs(Path(folder)), snaps, settings)
    print(f"{'output':<12} {'scalars ms':>11} {'ratio':>6} {'pictures ms':>12} {'ratio':>6}")
    for name in ("tensorboard", "jsonl", "mlflow", "wandb", "all"):
        if name not in plain:
            print(f"{name:<12} not installed")
            continue
        print(f"{name:<12} {plain[name] * 1e3:>11.2f} {plain[name] / plain['tensorboard']:>6.2f} "
              f"{drawn[name] * 1e3:>12.1f} {drawn[name] / drawn['tensorboard']:>6.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
