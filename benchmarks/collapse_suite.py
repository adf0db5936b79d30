"""The collapse suite: small training runs of four model families that collapse or stay healthy,
recorded so that alert rules can be judged, and re-tuned, offline.

    python benchmarks/collapse_suite.py                      # train every run (--jobs 2)
    python benchmarks/collapse_suite.py --runs gpt,llama/lr_1e-2    # a subset (twins added)
    python benchmarks/collapse_suite.py --from-records runs/collapse_suite   # replay, no training
    python benchmarks/collapse_suite.py --smoke              # two tiny runs, the whole pipeline
    python benchmarks/collapse_suite.py --seed 1 --out runs/collapse_suite_1   # held-out runs
    python benchmarks/collapse_suite.py --steps 1000 --batch-rows 1 --out runs/long0   # long runs
    python benchmarks/collapse_suite.py --from-records runs/long0 --every 5,25,100 --evidence

Families (``benchmarks/collapse/families.py``): ``gpt`` (the demo's nanoGPT-style model),
``llama`` (grouped-query attention: 4 query heads, 2 key/value heads; rotary), ``gpt2`` and
``encoder`` (ModernBERT, bidirectional, masked-language modelling of 15 % of the bytes; the
module says why not BERT), Hugging Face ones with SDPA, all 4 layers of width 128 with 4 heads,
on 64-byte sequences of the built-in corpus, batch 16, AdamW (weight decay 0.1), gradient
clipping at 1, seed 0: every run of a family starts from the same weights and sees the same
batches (and masks).

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

What each level did, measured (200 steps; loss: mean of the last 20 steps against the twin's;
entropy: a layer's mean normalised entropy, 1 = uniform; logit: the largest ``q·k·scale``):

* ``gpt`` — ``healthy`` (peak 3e-3): loss 2.29, layers' entropy 0.53-0.82, logits <= 33.
  ``sharp`` 1.5e-3: +2 %, entropy 0.71-0.86 (a constant 2e-3 or 3e-3 ended +12 % and +13 %:
  damaged by this suite's measure). ``lr_5e-3``: +17 %, damaged from step 56 while the logits
  grow slowly (391 at the end) and layer 0's entropy drops below 0.1 only at step 170.
  ``lr_1e-2``: +18 %, layer 0 below 0.1 at step 15 (logits ~1,000), layer 1 lazy at step 45.
  ``lr_3e-2``: +34 %, layer 0 one-hot at step 5 (logit 527 at step 10, 12,900 at most), every
  layer below 0.03 from step 70. ``qk_boost`` x30: +13 %, layer 0 alone one-hot from step 20
  (logits ~9,800).
* ``llama`` — ``healthy``: 2.13, entropy 0.26-0.43, logits <= 50. ``sharp`` 2e-3: +8 %, the
  sharpest healthy run (layers 0.14-0.26, heads down to 0.10). ``lr_5e-3``: +15 % (damaged
  from step 96), every layer's entropy sinks to 0.05-0.13 with logits of only 88-340: collapse
  without explosion. ``lr_1e-2``: +24 %, every layer below 0.1 at steps 40-60, logits 500-870.
  ``lr_3e-2``: +26 %, every layer below 0.1 by step 20. ``qk_boost``: +17 %, layer 0 one-hot
  from step 15 (logit 7,900).
* ``gpt2`` — ``healthy``: 2.27, entropy 0.59-0.80, logits <= 26. ``sharp`` 1e-3: +1 %, entropy
  0.74-0.91 (1.5e-3 and 2e-3 ended +9 % and +12 %). ``lr_5e-3``: +18 %, damaged from step 56,
  layer 2's logit reaches 330 and its entropy 0.1 only at step 115. ``lr_1e-2``: +24 %, layer 0
  below 0.1 at step 35 (logit 1,760); layer 3 uniform until step 30. ``lr_3e-2``: +32 %, layer 0
  one-hot at step 10, logits up to 6,900. ``qk_boost``: +19 %, layer 0 one-hot from step 15
  (logit 11,100). ``key_bias`` (|b| 1000 per head): +0.2 %, the logits change by 1.3e-6 at
  initialisation; the raw largest logit is 107 at step 0 and up to 561, while the logit spread
  (<= 39) and the entropies follow the twin's.
* ``encoder`` — ``healthy``: 2.58, entropy 0.46-0.51, logits <= 43. ``sharp`` 2e-3: +2 %.
  ``lr_5e-3``: +18 % (damaged from step 36), entropies sink to 0.08-0.18 only late, logits
  <= 151. ``lr_1e-2``: +22 %, every layer at 0.10-0.20, logits <= 261. ``lr_3e-2``: +23 %,
  damaged from step 8, every layer below 0.1 by step 20, logits 700-1,600. ``qk_boost``: *not*
  damaged (+0.1 %) although layer 0 is one-hot from step 20 with logits of 21,800: a collapse
  the loss does not show.

Every run has the probe (every 5 steps, 4 sequences by default or ``--batch-rows``, every
token, the package's default alert rules) and logs its figures, ``train/loss`` and
``train/lr`` into the TensorBoard run
``<out>/<run>/``; its record, ``<out>/<run>.pkl``, holds the config, every step's loss and
learning rate, the probe's history and alerts (``benchmarks/collapse/runs.py``). Everything
downstream works from the records (``benchmarks/collapse/judge.py``): :func:`replay` feeds a
record's snapshots to a fresh alert monitor under any rules, and each run is judged against its
twin (damage step, damaged, lead of its first warning, false alarms of the healthy runs). Printed:
a markdown table, a summary line and the elapsed time (``--describe``: each run's first alert of
every kind and severity, and each layer's largest logit and entropy at a few steps); drawn:
``<out>/collapse_suite.png`` (every run's lead) and ``<out>/<run>.png`` (each run beside its
twin: losses, largest logits and lowest entropies, alerts marked).

The records are then replayed at every sampling interval of ``--every`` (default 5, 25 and 100,
those at most a tenth of the shortest run) by dropping measurements (``judge.subsample``: what a
probe sampling that often would have seen), and printed as one table with a column per interval
and a summary line per interval (damaged runs in reach warned in time, median lead, false
alarms). ``--fall`` replays with the entropy rule's opt-in fast fall; ``--evidence`` also
measures self-calibrated thresholds (``collapse/calibrated.py``) and the loss alone
(``collapse/loss.py``) against the same runs. ``docs/alerts.md`` holds what they printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import os
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Callable, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from attn_probe.alerts import AlertRules, EntropyRule  # noqa: E402

from collapse.families import Shape  # noqa: E402
from collapse.calibrated import Calibration, replay_calibrated  # noqa: E402
from collapse.judge import (  # noqa: E402
    TWIN, RecordError, judge, judge_suite, load_record, load_records, replay, summarise,
    twins,
)
from collapse.loss import spikes, stall  # noqa: E402
from collapse.report import (  # noqa: E402
    describe_firsts, interval_table, layer_trajectories, lead_plot, markdown_table, run_plots,
)
from collapse.runs import RunConfig, short, train  # noqa: E402

__all__ = ["LEVELS", "SUITE", "main", "replay", "smoke_configs", "suite_configs"]


@dataclass(frozen=True)
class Levels:
    """A family's learning rates, from which its recipes are made (:func:`recipes`)."""

    healthy: float  #: the healthy twin's peak (also that of ``qk_boost`` and ``key_bias``)
    sharp: float  #: the ``sharp`` run's constant rate
    rates: tuple[float, ...]  #: the ``lr_*`` runs' constant rates (no warm-up)
    boost: float = 30.0  #: ``qk_boost``'s multiplier on layer 0's query and key rows
    key_bias: float = 0.0  #: ``key_bias``'s vector length per head (0: no such run)
    steps: int = 200


#: The measured levels of each family (the module's docstring says what each showed).
LEVELS: dict[str, Levels] = {
    "gpt": Levels(healthy=3e-3, sharp=1.5e-3, rates=(5e-3, 1e-2, 3e-2)),
    "llama": Levels(healthy=3e-3, sharp=2e-3, rates=(5e-3, 1e-2, 3e-2)),
    "gpt2": Levels(healthy=3e-3, sharp=1e-3, rates=(5e-3, 1e-2, 3e-2), key_bias=1000.0),
    "encoder": Levels(healthy=3e-3, sharp=2e-3, rates=(5e-3, 1e-2, 3e-2)),
}


def recipes(levels: Levels) -> dict[str, dict]:
    """Recipe -> what differs from :class:`RunConfig`'s defaults."""
    constant = "constant"
    made = {TWIN: {"lr": levels.healthy},
            "sharp": {"lr": levels.sharp, "schedule": constant}}
    made.update({f"lr_{short(rate)}": {"lr": rate, "schedule": constant}
                 for rate in levels.rates})
    made["qk_boost"] = {"lr": levels.healthy, "boost": levels.boost}
    if levels.key_bias:
        made["key_bias"] = {"lr": levels.healthy, "key_bias": levels.key_bias}
    return {recipe: values | {"steps": levels.steps} for recipe, values in made.items()}


#: family -> recipe -> what differs from :class:`RunConfig`'s defaults.
SUITE: dict[str, dict[str, dict]] = {family: recipes(levels) for family, levels in LEVELS.items()}

#: ``--smoke``: two tiny runs of the gpt family (2 layers of width 32, 2 heads, 16 tokens,
#: batch 4, 12 steps): the healthy twin, and layer 0's queries and keys boosted ×30 at a
#: constant 3e-2, which at this size is what it takes for layer 0's logits to reach thousands
#: and its entropy to collapse by step 5 (the logit and entropy alerts fire).
SMOKE_SHAPE = Shape(n_layer=2, n_head=2, n_embd=32, block_size=16)
SMOKE = dict(steps=12, batch_size=4, shape=SMOKE_SHAPE)


def smoke_configs() -> list[RunConfig]:
    return [RunConfig("gpt", TWIN, lr=3e-3, **SMOKE),
            RunConfig("gpt", "qk_boost", lr=3e-2, schedule="constant", boost=30, **SMOKE)]


PICTURE = "collapse_suite.png"
#: The rules every run is trained under, and records are judged by: the package's defaults.
RULES = AlertRules()


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
    return [RunConfig(family, recipe, **(values | overrides))
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
    # The alerts are recorded: not warned about (other warnings of the probe still are).
    warnings.filterwarnings("ignore", message="attn_probe: (info|warning|critical): ")


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
        with warnings.catch_warnings():  # this process's threads and filters are restored
            try:
                _worker_start()
                for config in ordered:
                    try:
                        done(config, train(config, out, RULES))
                    except Exception as error:  # noqa: BLE001 - reported, the others go on
                        done(config, error)
            finally:
                torch.set_num_threads(threads)
        return
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_worker_start) as pool:
        futures = {pool.submit(train, config, out, RULES): config for config in ordered}
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
    parser.add_argument("--out", help="where records, TensorBoard runs and the pictures go "
                        "(default runs/collapse_suite; with --from-records, that directory)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (default 2)")
    parser.add_argument("--from-records", metavar="DIR",
                        help="judge the records in DIR under the current default rules; "
                        "no training")
    parser.add_argument("--steps", type=int, help="steps of every run (default: the family's, "
                        "Levels.steps)")
    parser.add_argument("--seed", type=int, help="seed of every run (default 0): another seed "
                        "gives other initial weights and batches, a held-out suite for rules "
                        "tuned on the first")
    parser.add_argument("--batch-rows", type=int, help="rows of each sampled batch the probe "
                        "measures (default 4; the probe's own default is 1)")
    parser.add_argument("--every", help="comma-separated sampling intervals to replay the "
                        "records at, multiples of the interval they were trained at (default: "
                        "5, 25 and 100, those at most a tenth of the shortest run)")
    parser.add_argument("--fall", type=float, help="with --from-records: replay with the "
                        "entropy rule's fast-fall condition on, EntropyRule(fall=FALL) (it is "
                        "off by default)")
    parser.add_argument("--evidence", action="store_true",
                        help="also measure self-calibrated thresholds against the fixed ones, "
                        "and what the loss alone shows (spikes, stalls)")
    parser.add_argument("--describe", action="store_true",
                        help="also print what every layer of every run did")
    parser.add_argument("--smoke", action="store_true",
                        help="two tiny runs of a few steps: the whole pipeline in seconds")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    for name in ("steps", "batch_rows"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got "
                         f"{getattr(args, name)}")
    if args.from_records and (args.runs or args.smoke or args.steps or args.batch_rows
                              or args.seed is not None):
        parser.error("--from-records trains nothing: it takes no --runs, --steps, --seed, "
                     "--batch-rows or --smoke")
    if args.fall is not None and not args.from_records:
        parser.error("--fall replays records: it needs --from-records")
    if args.fall is not None and not 0 < args.fall < 1:
        parser.error(f"--fall must be in (0, 1), got {args.fall}")
    if args.from_records and not os.path.isdir(args.from_records):
        parser.error(f"--from-records: no directory {args.from_records!r}")
    args.intervals = None
    if args.every is not None:
        try:
            args.intervals = sorted({int(part) for part in args.every.split(",")})
        except ValueError:
            parser.error(f"--every takes comma-separated whole numbers, got {args.every!r}")
        if args.intervals[0] < 1:
            parser.error(f"--every: intervals must be at least 1, got {args.every!r}")
    if args.smoke and (args.runs or args.steps or args.seed is not None):
        parser.error("--smoke runs its own two tiny runs: it takes no --runs, --steps or --seed")
    args.configs = None
    if args.smoke:
        args.configs = smoke_configs()
    elif not args.from_records:
        try:
            overrides = {name: value for name, value in (("steps", args.steps),
                                                         ("seed", args.seed),
                                                         ("batch_rows", args.batch_rows))
                         if value is not None}
            args.configs = suite_configs(args.runs.split(",") if args.runs else None,
                                         **overrides)
        except ValueError as error:
            parser.error(f"--runs: {error}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    start = time.perf_counter()
    args = parse_args(argv)
    if args.from_records:
        out = args.out or args.from_records
        try:
            records = sorted(load_records(args.from_records), key=suite_order)
        except RecordError as error:
            print(f"collapse_suite.py: error: {error}", file=sys.stderr)
            return 2
        if not records:
            print(f"collapse_suite.py: error: no records (*.pkl) in {args.from_records}",
                  file=sys.stderr)
            return 2
        rules, source = RULES, "the current default rules, replayed over the records"
        if args.fall is not None:
            rules = dataclasses.replace(RULES, entropy=EntropyRule(fall=args.fall))
            source = f"the default rules with EntropyRule(fall={args.fall:g}), replayed"
    else:
        out = args.out or ("runs/collapse_suite_smoke" if args.smoke else "runs/collapse_suite")
        records, failed = train_and_check(args.configs, out, args.jobs)
        if failed:
            print(f"collapse_suite.py: error: {', '.join(failed)} failed; the records that were "
                  f"written are in {out} (--from-records {out} judges them)", file=sys.stderr)
            return 1
        rules, source = None, "the alerts the probe raised while training (default rules)"
    intervals = args.intervals or default_intervals(records)
    try:
        verdicts = judge_suite(records, rules)
        by_every = {every: judge_suite(records, rules or RULES, every) for every in intervals}
        described = "the rules above" if args.fall is not None else RULES_NAME
    except ValueError as error:
        print(f"collapse_suite.py: error: {error}", file=sys.stderr)
        return 2
    summary = summarise(verdicts)
    print(f"\nAlerts: {source}.\n")
    print(markdown_table(verdicts))
    print(f"\n{summary}")
    print(f"\nReplayed at every sampling interval under {described}: the lead (damage step − "
          "first warning) and first warning of each damaged run, the false alarms of each "
          "healthy run.\n")
    print(interval_table(by_every))
    print()
    for every in intervals:
        print(summarise(by_every[every]))
    if args.evidence:
        print_evidence(records, intervals)
    if args.describe:
        for verdict, record in zip(verdicts, records):
            print(f"\n{verdict.name}: first alerts: {describe_firsts(verdict)}")
            print("\n".join("  " + line for line in layer_trajectories(record)))
    os.makedirs(out, exist_ok=True)
    picture = os.path.join(out, PICTURE)
    lead_plot(verdicts, summary, "Collapse suite: lead of the first warning per run").savefig(
        picture, dpi=110)
    runs = run_plots(verdicts, records, rules or RULES)
    for name, figure in runs.items():
        figure.savefig(os.path.join(out, f"{name}.png"), dpi=100)
    print(f"pictures: {picture}; each run beside its twin (loss, largest logit, entropy): "
          f"{os.path.join(out, '<run>.png')}, {len(runs)} of them")
    print(f"elapsed: {time.perf_counter() - start:.0f} s wall "
          f"({len(records)} runs{'' if args.from_records else f', --jobs {args.jobs}'})")
    return 0


RULES_NAME = "the current default rules"
#: The sampling intervals the suite is judged at by default (those the runs are long enough for).
INTERVALS = (5, 25, 100)


def default_intervals(records: Sequence[dict]) -> list[int]:
    """:data:`INTERVALS` that are multiples of every record's own interval and at most a tenth
    of the shortest run (at least the records' own interval)."""
    shortest = min(len(r["losses"]) for r in records)
    fitting = [every for every in INTERVALS
               if all(every % r["config"]["every"] == 0 for r in records)
               and every <= shortest / 10]
    return fitting or [max(r["config"]["every"] for r in records)]


def print_evidence(records: Sequence[dict], intervals: Sequence[int]) -> None:
    """Self-calibrated thresholds against the fixed defaults at every interval, and the loss's
    own spikes and stalls against each run's damage step and first warning."""
    print(f"\nSelf-calibrated thresholds ({Calibration()}) instead of the fixed defaults:")
    for every in intervals:
        print(f"  {summarise(judge_suite(records, RULES, every, replay_calibrated))}")
    print("\nThe loss alone: spikes (> 6σ above the mean of the 128 steps before) and the "
          "first stall (the 20-step mean fell by < 1 % over 20 steps), beside the damage step "
          "and the first warning (every 5):")
    twin_of = twins(records)
    for record in records:
        verdict = judge(record, twin_of[record["config"]["family"]], replay(record, RULES))
        found = spikes(record["losses"])
        state = ("healthy" if verdict.healthy else "damaged" if verdict.damaged
                 else "not damaged")
        print(f"  {verdict.name}: {state}, damage {verdict.damage}, first warning "
              f"{verdict.warning.step if verdict.warning else None}; spikes {found[:5]}"
              f"{' ...' if len(found) > 5 else ''}; stall {stall(record['losses'])}")


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
    same = sum(replay(r, RULES) == r["alerts"] for r in records)
    print(f"replay: {same} of {len(records)} records give the probe's own alerts again")
    if same != len(records):
        failed.append("replay")
        print("collapse_suite.py: replaying a record did not give the probe's alerts",
              file=sys.stderr)
    return records, failed


if __name__ == "__main__":
    sys.exit(main())
