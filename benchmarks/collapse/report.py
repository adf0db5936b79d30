"""What the collapse suite prints and draws: the markdown table of the judged runs, the picture
of every run's lead, and what each layer of a recorded run did."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from attn_probe.alerts import AlertRules
from attn_probe.outputs.canvas import axes_at, new_plot
from attn_probe.outputs.runs import plot_runs, run_series_for
from attn_probe.snapshot import WARNS, Alert

from .judge import TWIN, Summary, Verdict, first_alerts
from .runs import short

COLUMNS = ("family", "recipe", "lr", "final loss vs twin", "damaged?", "damage step",
           "first warning (kind, layer, step)", "lead", "false alarms", "first info")


def describe_lr(config: dict) -> str:
    how = "warm-up, cosine" if config["schedule"] == "warmup_cosine" else "constant"
    extra = ""
    if config["boost"] != 1:
        extra = f"; L{config['boost_layer']:02d} q, k ×{config['boost']:g}"
    if config["key_bias"]:
        extra = f"; key bias of norm {config['key_bias']:g} per head"
    return f"{short(config['lr'])} {how}{extra}"


def describe_alert(alert: Alert | None) -> str:
    return "—" if alert is None else f"{alert.kind} {alert.tag} @{alert.step}"


def row(verdict: Verdict) -> list[str]:
    config = verdict.config
    if config["recipe"] == "healthy":
        final = f"{verdict.final:.3f} (twin)"
    else:
        final = (f"{verdict.final:.3f} vs {verdict.twin_final:.3f} "
                 f"({verdict.final / verdict.twin_final - 1:+.0%})")
    lead = verdict.lead
    if verdict.damage is None:
        lead_text = "—"
    elif lead is None:
        lead_text = "not warned"
    else:
        lead_text = f"{lead:+d}"
    alarms = verdict.false_alarms
    return [
        config["family"], config["recipe"], describe_lr(config), final,
        "yes" if verdict.damaged else "no",
        "—" if verdict.damage is None else str(verdict.damage),
        describe_alert(verdict.warning), lead_text, "—" if alarms is None else str(alarms),
        describe_alert(verdict.info),
    ]


def describe_firsts(verdict: Verdict) -> str:
    """The first alert of each kind and severity: ``logit/warning L00 @10, ...``."""
    firsts = first_alerts(verdict.alerts)
    return ", ".join(f"{kind}/{severity} {alert.tag} @{alert.step}"
                     for (kind, severity), alert in sorted(firsts.items(),
                                                           key=lambda item: item[1].step)
                     ) or "none"


def markdown_table(verdicts: Sequence[Verdict]) -> str:
    return table(COLUMNS, [row(v) for v in verdicts])


def table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines)


def interval_cell(verdict: Verdict) -> str:
    """What one run got at one sampling interval: a damaged run's lead and first warning (or
    ``not warned``; ``out of reach`` when its damage came before two intervals), a healthy run's
    false alarms, the first warning of a run that was neither."""
    warning = verdict.warning
    first = "" if warning is None else f" ({describe_alert(warning)})"
    if verdict.healthy:
        return f"{verdict.false_alarms} false alarm{'s' * (verdict.false_alarms != 1)}{first}"
    if verdict.damaged and not verdict.in_reach:
        return f"out of reach{first}"
    if verdict.damaged:
        return "**not warned**" if verdict.lead is None else f"{verdict.lead:+d}{first}"
    return f"not damaged{first}"


def interval_table(by_every: dict[int, Sequence[Verdict]]) -> str:
    """One row per run, one column per sampling interval (the verdicts of each interval in the
    same run order)."""
    everies = sorted(by_every)
    first = by_every[everies[0]]
    columns = ("family", "recipe", "lr", "final loss vs twin", "damage step",
               *(f"every {every}" for every in everies))
    rows = []
    for index, verdict in enumerate(first):
        rows.append([*row(verdict)[:4], "—" if verdict.damage is None else str(verdict.damage),
                     *(interval_cell(by_every[every][index]) for every in everies)])
    return table(columns, rows)


def lead_plot(verdicts: Sequence[Verdict], summary: Summary, title: str):
    """One row per run: a damaged run's lead as a bar (green: warned at or before its damage step,
    red: after it), ``not warned`` where it got no warning; a healthy run's false alarms
    as a count; other runs (not damaged) as such."""
    n = len(verdicts)
    fig = new_plot(9.0, 1.4 + 0.28 * n)
    ax = axes_at(fig, 2.0, 0.6, 6.7, 0.28 * n)
    leads = [v.lead for v in verdicts if v.lead is not None]
    reach = max([abs(lead) for lead in leads] + [10])
    for y, verdict in enumerate(verdicts):
        lead = verdict.lead
        if verdict.damaged and lead is not None:
            ax.barh(y, lead, height=0.6, color="#1a9850" if lead >= 0 else "#d73027")
            ax.text(lead + (0.02 if lead >= 0 else -0.02) * reach, y,
                    f"{lead:+d}  ({describe_alert(verdict.warning)})", va="center",
                    ha="left" if lead >= 0 else "right", fontsize=8)
        elif verdict.damaged:
            ax.text(0.02 * reach, y, "damaged, not warned", va="center", fontsize=8,
                    color="#d73027", fontweight="bold")
        elif verdict.healthy:
            alarms = verdict.false_alarms
            ax.plot([0], [y], marker="o", color="#1a9850" if alarms == 0 else "#f46d43")
            ax.text(0.03 * reach, y, f"healthy: {alarms} false alarm{'s' * (alarms != 1)}",
                    va="center", fontsize=8, color="black" if alarms == 0 else "#b2182b")
        else:
            warned = sum(a.severity in WARNS for a in verdict.alerts)
            ax.plot([0], [y], marker="s", color="#999999")
            ax.text(0.03 * reach, y, f"not damaged ({warned} warning{'s' * (warned != 1)})",
                    va="center", fontsize=8, color="#666666")
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlim(-1.15 * reach, 1.6 * reach)  # room for the labels right of the longest bar
    ax.set_ylim(n - 0.5, -0.5)
    ax.set_yticks(range(n), [v.name for v in verdicts], fontsize=8)
    ax.set_xlabel("lead: damage step − first warning's step (≥ 0: warned in time)",
                  fontsize=9)
    ax.grid(axis="x", linewidth=0.4, alpha=0.5)
    fig.text(0.5, 1 - 0.25 / fig.get_size_inches()[1], title, ha="center", va="center",
             fontsize=10, fontweight="bold")
    fig.text(0.5, 1 - 0.55 / fig.get_size_inches()[1], str(summary), ha="center",
             va="center", fontsize=8)
    return fig


def run_plots(verdicts: Sequence[Verdict], records: Sequence[dict],
              rules: AlertRules) -> dict:
    """Run name -> the project's run-summary picture of the run beside its healthy twin (loss,
    largest attention logit, entropy of the most collapsed layer, each run's alerts marked), for
    every run but the twins; ``records`` in the order of ``verdicts``."""
    series = {v.name: run_series_for(r["losses"], r["history"], v.alerts)
              for v, r in zip(verdicts, records)}
    twin_of = {v.config["family"]: v.name for v in verdicts if v.config["recipe"] == TWIN}
    # The logit rule watches the logit spread, not the largest logit drawn: no line for it.
    level = getattr(rules.entropy, "warning", None)  # rules of another shape: no line either
    thresholds = {} if level is None else {"entropy": level}
    return {
        v.name: plot_runs(
            {f"{TWIN} (twin)": series[twin_of[v.config["family"]]],
             v.config["recipe"]: series[v.name]},
            thresholds=thresholds, title=f"collapse suite: {v.name} beside its healthy twin")
        for v in verdicts if v.config["recipe"] != TWIN and v.config["family"] in twin_of
    }


def sampled_points(steps: Sequence[int], shares=(0.0, 0.05, 0.25, 0.5, 1.0)) -> list[int]:
    """Indices of the sampled steps nearest to these shares of the run."""
    last = steps[-1]
    picks = [int(np.argmin([abs(s - share * last) for s in steps])) for share in shares]
    return sorted(set(picks))


def layer_trajectories(record: dict) -> list[str]:
    """What every layer of a recorded run did: its largest attention logit and its mean
    normalised entropy over the whole sequence (``entropy_norm_full``) at a few sampled steps."""
    history = sorted(record["history"], key=lambda s: s.step)
    if not history:
        return ["(nothing measured)"]
    picks = [history[i] for i in sampled_points([s.step for s in history])]
    lines = ["steps " + ", ".join(str(s.step) for s in picks)]
    for index, layer in enumerate(history[0].layers):
        logits = " → ".join(f"{s.layers[index].reduce('max_logit', 'max'):.3g}" for s in picks)
        entropy = " → ".join(f"{s.layers[index].reduce('entropy_norm_full', 'mean'):.2f}"
                             for s in picks)
        peak = max(s.layers[index].reduce("max_logit", "max") for s in history)
        low = min(s.layers[index].reduce("entropy_norm_full", "mean") for s in history)
        lines.append(f"{layer.tag}: max logit {logits} (peak {peak:.3g}); mean entropy "
                     f"{entropy} (lowest {low:.2f})")
    return lines
