"""The ``attn-probe`` command: ``demo`` trains and probes a small GPT (stable, and collapsing);
``analyze`` profiles a model; ``report`` writes an HTML page of logged runs. Argument parsing,
and the demo's report on the console."""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from dataclasses import asdict
from typing import Sequence

from ..options import check_count
from . import narrate, report
from .console import ArgumentParser, Progress, UsageError
from .demo import RUNS as DEMO_RUNS
from .demo import (
    MIN_STEPS, DemoConfig, DemoResult, demo_configs, replace_runs, run_demos, write_summary,
)


def _demo(args: argparse.Namespace) -> int:
    counts = {"--every": args.every, "--batch-size": args.batch_size, "--layers": args.layers}
    try:
        check_count("--steps", args.steps, minimum=MIN_STEPS,
                    why="each run warms its learning rate up, then anneals it")
        for option, value in counts.items():
            check_count(option, value)
        check_count("--pictures-every", args.pictures_every, minimum=0)
        check_count("--threads", args.threads, minimum=0)
    except ValueError as error:
        raise UsageError(str(error)) from None
    base = DemoConfig(
        log_dir=args.log_dir, steps=args.steps, every=args.every, batch_size=args.batch_size,
        n_layer=args.layers, pictures_every=args.pictures_every, seed=args.seed,
        threads=args.threads,
    )
    configs = demo_configs(base, args.runs)
    if os.path.exists(base.log_dir) and not os.path.isdir(base.log_dir):
        raise UsageError(f"--log-dir {base.log_dir} exists and is not a directory")
    try:
        os.makedirs(base.log_dir, exist_ok=True)
    except OSError as error:  # a file on the way to it, no permission, ...
        raise UsageError(f"--log-dir {base.log_dir}: cannot make the directory: "
                         f"{error.strerror or error}") from None
    try:
        replaced = replace_runs(configs)
    except FileExistsError as error:
        raise UsageError(str(error)) from None
    if replaced:
        print(f"attn-probe demo: replacing the earlier {', '.join(replaced)} "
              f"run{'s' if len(replaced) > 1 else ''} in {base.log_dir}")
    report_demo(configs, base.log_dir)
    return 0


def report_demo(configs: Sequence[DemoConfig], log_dir: str) -> list[DemoResult]:
    """Train the demo's runs (:func:`.demo.run_demos`) and tell what happened: a progress bar
    (stderr) and a summary per run, then what the runs show, the summary picture
    (``log_dir/summary.png``), the HTML report (``log_dir/report.html``) and the TensorBoard
    command. Returns the runs' results."""
    config = configs[0]
    print(f"attn-probe demo: a {config.n_layer}-layer GPT learns Python's own source code in "
          f"{len(configs)} run{'s' if len(configs) > 1 else ''}; attention measured every "
          f"{config.every} steps")
    for config in configs:
        print(f"  {config.name:<18} {config.describe()}")
    print(flush=True)
    results = []
    # each run's on_alert counts the alerts in its progress bar (so the probe warns about
    # none); the run's summary lists them
    for result in run_demos(configs, _callbacks):
        print(f"{narrate.run_summary(result)}\n", flush=True)
        results.append(result)
    picture = write_summary(results, os.path.join(log_dir, "summary.png"))
    page = report.write_report(log_dir, os.path.join(log_dir, "report.html"),
                               [config.log_dir for config in configs])
    print(textwrap.fill("What the runs show: " + narrate.what_the_runs_show(results),
                        width=100))
    print(f"\nSummary picture (loss, largest logit spread, entropy of each run): {picture}")
    print(f"Report (the runs side by side: alerts, head health, every layer): {page}")
    print(f"TensorBoard logs in {log_dir}, one run each. See them with:\n"
          f"  tensorboard --logdir {log_dir}")
    return results


def _callbacks(config: DemoConfig):
    """A run's progress bar, which counts the alerts fired so far."""
    bar, alerts = Progress(config.name), []

    def progress(done: int, total: int, loss: float) -> None:
        bar(done, total, f"loss {loss:.3f}" + (f", alerts {len(alerts)}" if alerts else ""))

    return progress, lambda alert, snapshot: alerts.append(alert)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="attn-probe",
        description="Watch attention collapse: rank@tau and columns@tau of every attention head.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser(
        "demo", help="train a small GPT on built-in text three ways, stable and collapsing",
        description="Train a small GPT on Python's own source code in three runs, one "
        "TensorBoard run each under --log-dir: 'stable' (one-cycle schedule, peak learning "
        "rate 3e-3), 'unstable' (the same, with the attention's query and key weights taking "
        "steps 30 times larger: attention collapses) and 'unstable_qk_norm' (the same with "
        "QK-norm). Prints what the probe saw and writes "
        "LOG_DIR/summary.png and LOG_DIR/report.html.",
    )
    demo.add_argument("--log-dir", dest="log_dir", default="runs/demo",
                      help="TensorBoard directory: one subdirectory per run, and summary.png; "
                      "the runs of an earlier demo there are replaced (%(default)s)")
    demo.add_argument("--steps", type=int, default=DEMO_DEFAULTS["steps"],
                      help="training steps of each run (%(default)s)")
    demo.add_argument("--every", type=int, default=DEMO_DEFAULTS["every"],
                      help="measure attention every N steps, in every run (%(default)s)")
    demo.add_argument("--pictures-every", type=int, default=DEMO_DEFAULTS["pictures_every"],
                      help="draw TensorBoard pictures every N steps, in every run; 0: none "
                      "(%(default)s)")
    demo.add_argument("--batch-size", type=int, default=DEMO_DEFAULTS["batch_size"],
                      help="sequences of %s tokens per step (%%(default)s)"
                      % DEMO_DEFAULTS["block_size"])
    demo.add_argument("--layers", type=int, default=DEMO_DEFAULTS["n_layer"],
                      help="layers of the GPT (%(default)s)")
    demo.add_argument("--seed", type=int, default=0,
                      help="seed of the weights and the batches, the same in every run "
                      "(%(default)s)")
    demo.add_argument("--threads", type=int, default=DEMO_DEFAULTS["threads"],
                      help="PyTorch threads; 0: PyTorch's default (%(default)s: faster than "
                      "two for a model this small on busy cores)")
    demo.add_argument("--runs", type=_run_names, default=list(DEMO_RUNS),
                      help=f"comma-separated runs to train, of {','.join(DEMO_RUNS)} "
                      "(default: all)")
    demo.set_defaults(run=_demo)

    from .analyze import add_arguments, run_analyze

    analyze = commands.add_parser(
        "analyze", help="the paper's protocol on an existing model: rank per layer and head"
    )
    add_arguments(analyze)
    analyze.set_defaults(run=run_analyze)

    report_parser = commands.add_parser(
        "report", help="one HTML page of the runs under a TensorBoard log directory",
        description="Write one self-contained HTML page (pictures inline, no network) of the "
        "runs under LOGDIR, side by side: the loss, every layer's attention logit and entropy, "
        "the timeline of head health and the table of alerts. Reads only the event files.",
    )
    report.add_arguments(report_parser)
    report_parser.set_defaults(run=report.run_report)
    return parser


def _run_names(text: str) -> list[str]:
    names = list(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    unknown = [name for name in names if name not in DEMO_RUNS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"{', '.join(map(repr, unknown)) or 'no run'}: the runs are {','.join(DEMO_RUNS)}")
    return names


DEMO_DEFAULTS = asdict(DemoConfig())


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
