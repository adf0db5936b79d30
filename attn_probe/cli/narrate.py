"""What the demo prints: a summary of each run (its loss, its extreme attention figures, its
alerts) and one paragraph of what the runs show, built from the measured figures alone."""

from __future__ import annotations

import textwrap
from typing import Sequence

from ..snapshot import Alert, figure_text
from .demo import DemoResult


def _extreme(result: DemoResult, metric: str, how: str, pick) -> tuple[float, str, int]:
    """(value, layer tag, step) of the largest or smallest layer figure over the run."""
    found = [(layer.reduce(metric, how), layer.tag, snapshot.step)
             for snapshot in result.snapshots for layer in snapshot.layers]
    found = [item for item in found if item[0] == item[0]]  # not NaN
    return pick(found, key=lambda item: item[0]) if found else (float("nan"), "-", -1)


def largest_spread(result: DemoResult) -> tuple[float, str, int]:
    return _extreme(result, "logit_spread", "max", max)


def lowest_entropy(result: DemoResult) -> tuple[float, str, int]:
    return _extreme(result, "entropy_norm_full", "mean", min)


def what(alert: Alert) -> str:
    """The alert's message without the layer and step it starts with."""
    return alert.message.split(": ", 1)[-1]


def run_summary(result: DemoResult) -> str:
    """What one run did: its loss, its extreme attention figures, and its alerts (the first
    warning with its cause)."""
    losses = result.losses
    lowest = min(range(len(losses)), key=losses.__getitem__)
    spread, spread_tag, spread_step = largest_spread(result)
    entropy, entropy_tag, entropy_step = lowest_entropy(result)
    lines = [
        f"{result.name}: {len(losses)} steps in {result.seconds:.0f}s",
        f"  loss {losses[0]:.2f} -> {losses[-1]:.2f} (lowest {losses[lowest]:.2f} at step "
        f"{lowest})",
        f"  largest logit spread {figure_text(spread)} ({spread_tag}, step {spread_step}); "
        f"lowest layer entropy {entropy:.3f} ({entropy_tag}, step {entropy_step}; 1 = uniform)",
    ]
    run = result.run
    warned = run.warnings
    information = len(run.information)
    noted = (f" (and {information} alert{'s' * (information != 1)} for information: "
             f"{', '.join(dict.fromkeys(a.kind for a in run.information))})"
             ) if information else ""
    first = run.first_warning()
    lines.append(f"  {run.headline()}")
    if first is None:
        return "\n".join(lines)
    lines.append(f"  warnings, the first of each layer, at the first sampled step its condition "
                 f"held{noted}:")
    for tag in dict.fromkeys(alert.tag for alert in warned):
        mine = [alert for alert in warned if alert.tag == tag]
        earliest, later = mine[0], mine[1:]
        then = "; then " + ", ".join(f"{a.kind} {a.severity} ({a.step})" for a in later) \
            if later else ""
        lines.append(f"    {earliest.severity:<8} {earliest.kind:<8} {tag}  step "
                     f"{earliest.step:<4} {what(earliest)}{then}")
    if first.alerts[0].cause:
        lines += textwrap.wrap(f"why: {first.alerts[0].cause}", width=100, initial_indent="  ",
                               subsequent_indent="    ")
    return "\n".join(lines)


def _loss_near(losses: Sequence[float], step: int, window: int) -> float:
    """The mean loss of ``window`` steps from ``step`` (the steps that exist)."""
    part = losses[step: step + window] or losses[-window:]
    return sum(part) / len(part)


def what_the_runs_show(results: Sequence[DemoResult]) -> str:
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
        run = result.run
        spread, entropy = largest_spread(result)[0], lowest_entropy(result)[0]
        first_warning = run.first_warning()
        if first_warning is None:
            best = end[result.name] == min(end.values()) and end[result.name] < 0.75 * losses[0]
            sentences.append(
                f"{about}{' learned' if best else ''}: its loss went {losses[0]:.2f} -> "
                f"{losses[-1]:.2f} (lowest {min(losses):.2f}), its largest logit spread stayed "
                f"at or below {figure_text(spread)} and no layer's mean entropy fell below "
                f"{figure_text(entropy)}: {run.headline()}.")
            continue
        first = first_warning.alerts[0]
        warned = run.warnings
        kinds = sorted({a.kind for a in warned})
        sentences.append(
            f"{about}: at step {first.step} the probe warned that {first.tag}'s {what(first)}; "
            f"over the run its largest logit spread reached {figure_text(spread)} and the "
            f"lowest layer entropy {figure_text(entropy)} ({' and '.join(kinds)} warnings in "
            f"{len(set(a.tag for a in warned))} layers).")
        after = _loss_near(losses, first.step, window)
        if stable is None or stable is result or len(stable.losses) < len(losses):
            sentences.append(f"From the warning to the end its loss went {after:.2f} -> "
                             f"{end[result.name]:.2f} (means over {window} steps).")
            continue
        stable_after = _loss_near(stable.losses, first.step, window)
        stable_end = _loss_near(stable.losses, len(losses) - window, window)
        sentences.append(
            f"From the warning to the end its loss went {after:.2f} -> {end[result.name]:.2f}, "
            f"the stable run's {stable_after:.2f} -> {stable_end:.2f} over the same steps "
            f"(means over {window} steps).")
    if "unstable" in by_name and "unstable_qk_norm" in by_name:
        sentences.append(_qk_norm_sentence(by_name["unstable"], by_name["unstable_qk_norm"],
                                           stable, end, window))
    return " ".join(sentences)


def _qk_norm_sentence(without: DemoResult, with_norm: DemoResult, stable: DemoResult | None,
                      end: dict, window: int) -> str:
    spreads = figure_text(largest_spread(with_norm)[0]), figure_text(largest_spread(without)[0])
    if not (without.run.warnings and not with_norm.run.warnings):
        return (f"In the same setting the largest logit spread was {spreads[0]} with QK-norm "
                f"and {spreads[1]} without it.")
    losses = end[with_norm.name], end[without.name]
    reference = ""
    gap = losses[1] - losses[0]
    if stable is not None and len(stable.losses) >= len(with_norm.losses):
        level = _loss_near(stable.losses, len(with_norm.losses) - window, window)
        reference = f", the stable run's {level:.2f} at the same step"
        learned = losses[0] < losses[1] - 0.5 * max(losses[1] - level, 0.0)
    else:
        learned = gap > 0.05 * losses[1]
    verdict = ("QK-norm, which touches only attention, let the collapsing run learn" if learned
               else "QK-norm kept attention from collapsing, but the loss did not gain from it: "
               "what held it back was not attention alone")
    return (f"With QK-norm the same setting raised no warning (largest logit spread "
            f"{spreads[0]}, against {spreads[1]} without it) and its loss ended at "
            f"{losses[0]:.2f}, against {losses[1]:.2f} without it{reference}: {verdict}.")
