"""The ``attn-probe`` command: ``demo`` trains and probes a small GPT (stable, and collapsing);
``analyze`` profiles a model; ``report`` writes an HTML page of logged runs. Argument parsing,
and the demo's report on the console."""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
import warnings
from dataclasses import asdict
from typing import Sequence

from ..options import check_count
from . import report
from .console import ArgumentParser, Progress, UsageError, deprecated_aliases
from .demo import RUNS as DEMO_RUNS
from .demo import (
    UNSTABLE_SHARE, DemoConfig, DemoResult, demo_configs, replace_runs, run_demos, write_summary,
)


def _demo(args: argparse.Namespace) -> int:
    counts = {"--steps": args.steps, "--every": args.every, "--batch-size": args.batch_size,
              "--layers": args.layers}
    try:
        for option, value in counts.items():
            check_count(option, value)
        check_count("--images-every", args.images_every, minimum=0)
        check_count("--threads", args.threads, minimum=0)
    except ValueError as error:
        raise UsageError(str(error)) from None
    base = DemoConfig(
        log_dir=args.log_dir, steps=args.steps, every=args.every, batch_size=args.batch_size,
        n_layer=args.layers, images_every=args.images_every, seed=args.seed,
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
    with warnings.catch_warnings():
        # the probe warns about each alert; the progress bar counts them, the summary lists them
        warnings.filterwarnings("ignore", message=r"attn_probe: L\d+ \(", category=UserWarning)
        for result in run_demos(configs, _callbacks):
            print(f"{_run_summary(result)}\n", flush=True)
            results.append(result)
    picture = write_summary(results, os.path.join(log_dir, "summary.png"))
    page = report.write_report(log_dir, os.path.join(log_dir, "report.html"),
                               [config.log_dir for config in configs])
    print(textwrap.fill("What the runs show: " + _what_the_runs_show(results), width=100))
    print(f"\nSummary picture (loss, largest logit, entropy of each run): {picture}")
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


#: How each kind of alert compares its figure with its threshold, and how to print them.
_ALERT_FORMS = {"logit": (">", "{:.1f}"), "entropy": ("<", "{:.3f}"), "lazy": (">=", "{:.0%}"),
                "sink": (">=", "{:.0%}")}
#: The kinds the demo is about: the ones with a threshold in the summary picture.
_COLLAPSE = ("logit", "entropy")


def _extreme(result: DemoResult, metric: str, how: str, pick) -> tuple[float, str, int]:
    """(value, layer tag, step) of the largest or smallest layer figure over the run."""
    found = [(layer.reduce(metric, how), layer.tag, snapshot.step)
             for snapshot in result.snapshots for layer in snapshot.layers]
    found = [item for item in found if item[0] == item[0]]  # not NaN
    return pick(found, key=lambda item: item[0]) if found else (float("nan"), "-", -1)


def _largest_logit(result: DemoResult) -> tuple[float, str, int]:
    return _extreme(result, "max_logit", "max", max)


def _lowest_entropy(result: DemoResult) -> tuple[float, str, int]:
    return _extreme(result, "entropy_norm_full", "mean", min)


def _run_summary(result: DemoResult) -> str:
    """What one run did: its loss, its extreme attention figures, and its alerts."""
    losses = result.losses
    lowest = min(range(len(losses)), key=losses.__getitem__)
    logit, logit_tag, logit_step = _largest_logit(result)
    entropy, entropy_tag, entropy_step = _lowest_entropy(result)
    lines = [
        f"{result.name}: {len(losses)} steps in {result.seconds:.0f}s",
        f"  loss {losses[0]:.2f} -> {losses[-1]:.2f} (lowest {losses[lowest]:.2f} at step "
        f"{lowest})",
        f"  largest attention logit {logit:.1f} ({logit_tag}, step {logit_step}); lowest layer "
        f"entropy {entropy:.3f} ({entropy_tag}, step {entropy_step}; 1 = uniform)",
    ]
    if not result.alerts:
        lines.append("  alerts: none")
    else:
        lines.append("  alerts (each at the first sampled step its condition held):")
    for alert in result.alerts:
        sign, form = _ALERT_FORMS.get(alert.kind, ("vs", "{:g}"))
        heads = ", ".join(map(str, alert.heads))
        lines.append(f"    {alert.kind:<8} {alert.tag}  step {alert.step:<4} "
                     f"{form.format(alert.value)} {sign} {form.format(alert.threshold)}  "
                     f"head{'s' if len(alert.heads) > 1 else ''} {heads}")
    return "\n".join(lines)


def _num(value: float) -> str:
    """A measured figure in a sentence: 1,497 or 31.8 or 4.71 or 0.88 or 0.0018."""
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}" if abs(value) >= 0.1 or value == 0 else f"{value:.2g}"


def _loss_near(losses: Sequence[float], step: int, window: int) -> float:
    """The mean loss of ``window`` steps from ``step`` (the steps that exist)."""
    part = losses[step: step + window] or losses[-window:]
    return sum(part) / len(part)


def _what_the_runs_show(results: Sequence[DemoResult]) -> str:
    """One paragraph from the measured figures: what each run's attention and loss did, and
    how the runs compare. Nothing is claimed that the figures do not show."""
    by_name = {r.name: r for r in results}
    stable = by_name.get("stable")
    window = max(1, min(5, min(len(r.losses) for r in results) // 4))
    end = {r.name: _loss_near(r.losses, len(r.losses) - window, window) for r in results}
    sentences = []
    for result in results:
        losses = result.losses
        about = f"The {result.name} run ({result.config.describe()})"
        fired = [a for a in result.alerts if a.kind in _COLLAPSE]
        if not fired:
            best = end[result.name] == min(end.values()) and end[result.name] < 0.75 * losses[0]
            learned = " learned" if best else ""
            sentences.append(
                f"{about}{learned}: its loss went {losses[0]:.2f} -> {losses[-1]:.2f} (lowest "
                f"{min(losses):.2f}), its largest attention logit stayed at or below "
                f"{_num(_largest_logit(result)[0])} and no layer's mean entropy fell below "
                f"{_num(_lowest_entropy(result)[0])}: no {' or '.join(_COLLAPSE)} alert.")
            continue
        first = fired[0]
        logits = _layer_series(result, first.tag, "max_logit", "max")
        entropy = _layer_series(result, first.tag, "entropy_norm_full", "mean")
        steps = [snapshot.step for snapshot in result.snapshots]
        peak = max(range(len(logits)), key=logits.__getitem__)
        low = min(range(len(entropy)), key=entropy.__getitem__)
        crossed = {a.kind: a.threshold for a in fired if a.step == first.step}
        thresholds = ", ".join(f"{kind} {_ALERT_FORMS[kind][0]} {threshold:g}"
                               for kind, threshold in crossed.items())
        sentences.append(
            f"{about}: layer {first.tag}'s largest attention logit grew from {_num(logits[0])} "
            f"to {_num(logits[peak])} (step {steps[peak]}) and its mean normalised entropy fell "
            f"from {_num(entropy[0])} to {_num(entropy[low])} (step {steps[low]}); the probe "
            f"raised {' and '.join(crossed)} alerts at step {first.step}, the first sampled step "
            f"past the thresholds ({thresholds}).")
        after = _loss_near(losses, first.step, window)
        if stable is None or stable is result or len(stable.losses) < len(losses):
            sentences.append(f"From the alert to the end its loss went {after:.2f} -> "
                             f"{end[result.name]:.2f} (means over {window} steps).")
            continue
        stable_after = _loss_near(stable.losses, first.step, window)
        stable_end = _loss_near(stable.losses, len(losses) - window, window)
        only = " only" if after - end[result.name] < 0.5 * (stable_after - stable_end) else ""
        sentences.append(
            f"From the alert to the end its loss{only} went {after:.2f} -> "
            f"{end[result.name]:.2f}, the stable run's {stable_after:.2f} -> {stable_end:.2f} "
            f"over the same steps (means over {window} steps).")
    if "unstable" in by_name and "unstable_qk_norm" in by_name:
        sentences.append(_qk_norm_sentence(by_name["unstable"], by_name["unstable_qk_norm"],
                                           end))
    return " ".join(sentences)


def _qk_norm_sentence(without: DemoResult, with_norm: DemoResult, end: dict) -> str:
    logits = _num(_largest_logit(with_norm)[0]), _num(_largest_logit(without)[0])
    collapsed = [bool({a.kind for a in r.alerts} & set(_COLLAPSE)) for r in (with_norm, without)]
    if not (collapsed[1] and not collapsed[0]):
        return (f"At the same learning rate the largest logit was {logits[0]} with QK-norm and "
                f"{logits[1]} without it.")
    losses = end[with_norm.name], end[without.name]
    if losses[0] < 0.95 * losses[1]:
        loss = f"and its loss ended lower ({losses[0]:.2f} against {losses[1]:.2f})"
    else:
        loss = (f"but its loss ended where the unstable run's did ({losses[0]:.2f} against "
                f"{losses[1]:.2f}): QK-norm kept the attention from collapsing, and the loss "
                f"did not gain from it at this learning rate")
    return (f"At the same learning rate QK-norm kept the largest logit at {logits[0]}, against "
            f"{logits[1]} without it, and no alert fired, {loss}.")


def _layer_series(result: DemoResult, tag: str, metric: str, how: str) -> list[float]:
    return [layer.reduce(metric, how) for snapshot in result.snapshots
            for layer in snapshot.layers if layer.tag == tag]


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
        "rate 3e-3), 'unstable' (3e-2 held constant, no warm-up: attention collapses) and "
        "'unstable_qk_norm' (the same with QK-norm). Prints what the probe saw and writes "
        "LOG_DIR/summary.png and LOG_DIR/report.html.",
    )
    demo.add_argument("--log-dir", "--logdir", dest="log_dir", default="runs/demo",
                      action=deprecated_aliases("--logdir"),
                      help="TensorBoard directory: one subdirectory per run, and summary.png; "
                      "the runs of an earlier demo there are replaced (%(default)s)")
    demo.add_argument("--steps", type=int, default=DEMO_DEFAULTS["steps"],
                      help="training steps of the stable run; the unstable runs train "
                      f"{UNSTABLE_SHARE * 100:.0f}%% of it (%(default)s)")
    demo.add_argument("--every", type=int, default=DEMO_DEFAULTS["every"],
                      help="measure attention every N steps, in every run (%(default)s)")
    demo.add_argument("--images-every", type=int, default=DEMO_DEFAULTS["images_every"],
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
