"""The collapse suite: small training runs of four model families that collapse or stay healthy,
recorded so that alert rules can be judged, and re-tuned, offline.

    python benchmarks/collapse_suite.py                      # train every run (--jobs 2)
    python benchmarks/collapse_suite.py --runs gpt,llama/lr_1e-2    # a subset (twins added)
    python benchmarks/collapse_suite.py --from-records runs/collapse_suite   # replay, no training
    python benchmarks/collapse_suite.py --smoke              # two tiny runs, the whole pipeline

Families (``benchmarks/collapse/families.py``): ``gpt`` (the demo's nanoGPT-style model),
``llama`` (grouped-query attention, rotary), ``gpt2`` and ``encoder`` (BERT, masked-language
modelling), all 4 layers of width 128 with 4 heads, on 64-byte sequences of the built-in corpus,
batch 16, AdamW (weight decay 0.1), gradient clipping at 1, seed 0: every run of a family starts
from the same weights and sees the same batches.

Recipes (:data:`SUITE`; ``healthy`` is the family's *healthy twin*, which the others are
measured against):

* ``healthy`` — 10 % linear warm-up to the peak, cosine decay to a tenth of it;
* ``sharp`` — a constant moderate rate: sharp heads grow, the loss keeps falling;
* ``lr_<rate>`` — a constant rate, no warm-up, at two or three levels;
* ``qk_boost`` — the healthy recipe with layer 0's queries and keys at a raised learning rate
  (each step's change of those rows scaled by a factor: Adam ignores the gradient's scale);
* ``key_bias`` (``gpt2``) — the healthy recipe with one constant vector added to every layer's key
  bias at initialisation: softmax ignores it, so attention, outputs and gradients stay the same
  (the largest change of the logits at initialisation is printed), but the raw largest attention
  logit moves.

What each level showed when measured (200 steps):

MEASURED

Every run has the probe (every 5 steps, 4 sequences, every token, the package's default alert
rules) and logs its figures, ``train/loss`` and ``train/lr`` into the TensorBoard run
``<out>/<run>/``; its record, ``<out>/<run>.pkl``, holds the config, every step's loss and
learning rate, the probe's history and alerts (``benchmarks/collapse/runs.py``). Everything
downstream works from the records (``benchmarks/collapse/judge.py``): :func:`replay` feeds a
record's snapshots to a fresh alert monitor under any rules, and each run is judged against its
twin (damage step, damaged, lead of its first warning, false alarms of the healthy runs). Printed:
a markdown table, a summary line and the elapsed time; drawn: ``<out>/collapse_suite.png``.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Callable, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from attn_probe.alerts import AlertRules  # noqa: E402

from collapse.families import Shape  # noqa: E402
from collapse.judge import (  # noqa: E402
    judge_suite, load_record, load_records, replay, summarise, TWIN,
)
from collapse.report import layer_trajectories, lead_figure, markdown_table  # noqa: E402
from collapse.runs import RunConfig, train  # noqa: E402

__all__ = ["SUITE", "main", "replay", "smoke_configs", "suite_configs"]

STEPS = 200
#: family -> recipe -> what differs from :class:`RunConfig`'s defaults.
SUITE: dict[str, dict[str, dict]] = {
    "gpt": {
        "healthy": dict(lr=3e-3),
        "sharp": dict(lr=3e-3, schedule="constant"),
        "lr_1e-2": dict(lr=1e-2, schedule="constant"),
        "lr_3e-2": dict(lr=3e-2, schedule="constant"),
        "qk_boost": dict(lr=3e-3, boost=30),
    },
    "llama": {
        "healthy": dict(lr=3e-3),
        "sharp": dict(lr=3e-3, schedule="constant"),
        "lr_1e-2": dict(lr=1e-2, schedule="constant"),
        "lr_3e-2": dict(lr=3e-2, schedule="constant"),
        "qk_boost": dict(lr=3e-3, boost=30),
    },
    "gpt2": {
        "healthy": dict(lr=3e-3),
        "sharp": dict(lr=3e-3, schedule="constant"),
        "lr_1e-2": dict(lr=1e-2, schedule="constant"),
        "lr_3e-2": dict(lr=3e-2, schedule="constant"),
        "qk_boost": dict(lr=3e-3, boost=30),
        "key_bias": dict(lr=3e-3, key_bias=1000.0),
    },
    "encoder": {
        "healthy": dict(lr=1e-3),
        "sharp": dict(lr=1e-3, schedule="constant"),
        "lr_1e-2": dict(lr=1e-2, schedule="constant"),
        "lr_3e-2": dict(lr=3e-2, schedule="constant"),
        "qk_boost": dict(lr=1e-3, boost=30),
    },
}

#: ``--smoke``: two tiny runs of the gpt family (2 layers of width 32, 2 heads, 16 tokens,
#: batch 4, 12 steps): the healthy twin, and layer 0's queries and keys boosted ×30 at a
#: constant 3e-2, which at this size is what it takes for layer 0's logits to pass 300 and its
#: entropy to collapse by step 5 (the logit and entropy alerts fire).
SMOKE_SHAPE = Shape(n_layer=2, n_head=2, n_embd=32, block_size=16)
SMOKE = dict(steps=12, batch_size=4, shape=SMOKE_SHAPE)


def smoke_configs() -> list[RunConfig]:
    return [RunConfig("gpt", TWIN, lr=3e-3, **SMOKE),
            RunConfig("gpt", "qk_boost", lr=3e-2, schedule="constant", boost=30, **SMOKE)]

PICTURE = "collapse_suite.png"


def suite_configs(selection: Sequence[str] | None = None, **overrides) -> list[RunConfig]:
    """The configs of the runs ``selection`` names (``family/recipe`` or a whole ``family``;
    None: every run), each family's twin included, in :data:`SUITE`'s order; ``overrides``
    replace :class:`RunConfig` fields of every run (``steps``, ``shape``, ...)."""
    chosen: set[tuple[str, str]] = set()
    for item in selection if selection is not None else list(SUITE):
        family, _, recipe = item.partition("/")
        if family not in SUITE:
            raise ValueError(f"unknown family {family!r} in {item!r}; the families are "
                             f"{', '.join(SUITE)}")
        if recipe and recipe not in SUITE[family]:
            raise ValueError(f"unknown recipe {recipe!r} in {item!r}; {family}'s recipes are "
                             f"{', '.join(SUITE[family])}")
        chosen.update((family, r) for r in ([recipe] if recipe else SUITE[family]))
        chosen.add((family, TWIN))
    settings = dict(steps=STEPS) | overrides
    return [RunConfig(family, recipe, **(settings | values))
            for family, recipes in SUITE.items() for recipe, values in recipes.items()
            if (family, recipe) in chosen]


def suite_order(record: dict) -> tuple[int, int, str]:
    """Where a record's run stands in :data:`SUITE` (runs it lacks last)."""
    family, recipe = record["config"]["family"], record["config"]["recipe"]
    families = list(SUITE)
    recipes = list(SUITE.get(family, {}))
    return (families.index(family) if family in families else len(families),
            recipes.index(recipe) if recipe in recipes else len(recipes), recipe)


def _worker_start() -> None:
    import torch

    torch.set_num_threads(1)  # two runs on two cores: one intra-op thread each
    warnings.filterwarnings("ignore", message="attn_probe: ")  # the alerts are recorded


def train_all(configs: Sequence[RunConfig], out: str, jobs: int,
              done: Callable[[RunConfig, str | BaseException], None]) -> None:
    """Train every run, ``jobs`` at a time in separate processes (in this one for 1), calling
    ``done(config, record path or exception)`` as each ends."""
    os.makedirs(out, exist_ok=True)
    # Hugging Face models cost more per step: start them first, so the two queues end together.
    ordered = sorted(configs, key=lambda c: c.family == "gpt")
    if jobs == 1:
        import torch

        threads = torch.get_num_threads()
        try:
            _worker_start()
            for config in ordered:
                try:
                    done(config, train(config, out))
                except Exception as error:  # noqa: BLE001 - reported, the other runs go on
                    done(config, error)
        finally:
            torch.set_num_threads(threads)
        return
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_worker_start) as pool:
        futures = {pool.submit(train, config, out): config for config in ordered}
        for future in as_completed(futures):
            error = future.exception()
            done(futures[future], error if error is not None else future.result())


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="collapse_suite.py", description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--runs", help="family/recipe or family, comma-separated (default: all); "
                        "each family's healthy twin is added")
    parser.add_argument("--out", help="where records, TensorBoard runs and the picture go "
                        "(default runs/collapse_suite; with --from-records, that directory)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (default 2)")
    parser.add_argument("--from-records", metavar="DIR",
                        help="judge the records in DIR under the current default rules; "
                        "no training")
    parser.add_argument("--steps", type=int, help=f"steps of every run (default {STEPS})")
    parser.add_argument("--describe", action="store_true",
                        help="also print what every layer of every run did")
    parser.add_argument("--smoke", action="store_true",
                        help="two tiny runs of a few steps: the whole pipeline in seconds")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    if args.from_records and (args.runs or args.smoke or args.steps):
        parser.error("--from-records trains nothing: it takes no --runs, --steps or --smoke")
    if args.from_records and not os.path.isdir(args.from_records):
        parser.error(f"--from-records: no directory {args.from_records!r}")
    if args.smoke and (args.runs or args.steps):
        parser.error("--smoke runs its own two tiny runs: it takes no --runs or --steps")
    args.configs = None
    if args.smoke:
        args.configs = smoke_configs()
    elif not args.from_records:
        try:
            args.configs = suite_configs(args.runs.split(",") if args.runs else None,
                                         **({"steps": args.steps} if args.steps else {}))
        except ValueError as error:
            parser.error(f"--runs: {error}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    start = time.perf_counter()
    args = parse_args(argv)
    if args.from_records:
        out = args.out or args.from_records
        records = sorted(load_records(args.from_records), key=suite_order)
        if not records:
            print(f"collapse_suite.py: error: no records (*.pkl) in {args.from_records}",
                  file=sys.stderr)
            return 2
        rules, source = AlertRules(), "the current default rules, replayed over the records"
    else:
        out = args.out or ("runs/collapse_suite_smoke" if args.smoke else "runs/collapse_suite")
        records, failed = train_and_check(args.configs, out, args.jobs)
        if failed:
            return 1
        rules, source = None, "the alerts the probe raised while training (default rules)"
    try:
        verdicts = judge_suite(records, rules)
    except ValueError as error:
        print(f"collapse_suite.py: error: {error}", file=sys.stderr)
        return 2
    summary = summarise(verdicts)
    print(f"\nAlerts: {source}.\n")
    print(markdown_table(verdicts))
    print(f"\n{summary}")
    if args.describe:
        for record in records:
            print(f"\n{record['config']['family']}-{record['config']['recipe']}:")
            print("\n".join("  " + line for line in layer_trajectories(record)))
    os.makedirs(out, exist_ok=True)
    picture = os.path.join(out, PICTURE)
    lead_figure(verdicts, summary, "Collapse suite: lead of the first warning per run").savefig(
        picture, dpi=110)
    print(f"picture: {picture}")
    print(f"elapsed: {time.perf_counter() - start:.0f} s wall "
          f"({len(records)} runs{'' if args.from_records else f', --jobs {args.jobs}'})")
    return 0


def train_and_check(configs: Sequence[RunConfig], out: str,
                    jobs: int) -> tuple[list[dict], list[str]]:
    """Train the runs, print a line as each ends, and check that replaying each record under
    the rules it was trained with gives the alerts the probe raised."""
    records, failed = [], []

    def done(config: RunConfig, result) -> None:
        if isinstance(result, BaseException):
            failed.append(config.name)
            print(f"[{len(records) + len(failed)}/{len(configs)}] {config.name} FAILED: "
                  f"{type(result).__name__}: {result}", file=sys.stderr, flush=True)
            return
        record = load_record(result)
        records.append(record)
        losses = record["losses"]
        extra = ("" if record["key_bias_change"] is None else
                 f"; key bias changed the logits at init by {record['key_bias_change']:.1e}")
        print(f"[{len(records) + len(failed)}/{len(configs)}] {config.name}: {len(losses)} steps "
              f"in {record['seconds']:.0f} s, loss {losses[0]:.2f} -> {losses[-1]:.2f}, "
              f"{len(record['alerts'])} alerts{extra}", flush=True)

    print(f"training {len(configs)} runs into {out}, {jobs} at a time", flush=True)
    train_all(configs, out, jobs, done)
    records.sort(key=suite_order)
    same = sum(replay(r, r["rules"]) == r["alerts"] for r in records)
    print(f"replay: {same} of {len(records)} records give the probe's own alerts again")
    if same != len(records):
        failed.append("replay")
        print("collapse_suite.py: error: replaying a record did not give the probe's alerts",
              file=sys.stderr)
    return records, failed


if __name__ == "__main__":
    sys.exit(main())
