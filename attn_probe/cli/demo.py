"""The built-in demo: a small GPT learns Python's own source code three times while the probe
watches, into one log directory with one TensorBoard run each.

* ``stable`` — AdamW with a one-cycle schedule, peak learning rate 3e-3: the model learns;
* ``unstable`` — the same, except that the attention's query and key weights take steps 30
  times larger than the rest of the model: the logits grow through the query and key norms,
  the way they do in unstable training (Wortsman et al. 2023), isolated from everything else;
  the entropy of every layer collapses within ten steps and the loss falls behind;
* ``unstable_qk_norm`` — the unstable setting with QK-norm (:attr:`GPTConfig.qk_norm`), a fix
  that touches only attention: the logits stay bounded and the model learns.

A whole model at too high a learning rate collapses its attention too, but there QK-norm alone
does not rescue the loss (measured: ``docs/alerts.md``); the demo isolates the attention-only
failure that an attention-only fix can mend.

:func:`run_demo` trains one run from a :class:`DemoConfig`, :func:`demo_configs` makes the
configs of the runs and :func:`run_demos` trains them one after the other;
:func:`write_summary` draws them into one picture; :func:`replace_runs` clears what earlier runs
of the same names left in their directories. No download: the corpus is the source of
modules of the Python standard library that runs the demo, read as bytes (vocabulary 256). The
model is :class:`attn_probe.models.gpt.GPT`.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch

from ..alerts import AlertRules, Run
from ..models.corpus import builtin_corpus
from ..models.gpt import GPT, GPTConfig
from ..options import CaptureOptions
from ..outputs import TensorBoardOutput
from ..outputs.events import EVENT_FILE
from ..probe import AttentionProbe
from ..snapshot import Alert, Snapshot

#: The alert rules of every run (the package's defaults; ``docs/alerts.md`` says why).
RULES = AlertRules()

#: The demo's runs: name -> what differs from :class:`DemoConfig`'s defaults.
RUNS: dict[str, dict[str, Any]] = {
    "stable": dict(lr=3e-3, schedule="one_cycle"),
    "unstable": dict(lr=3e-3, schedule="one_cycle", qk_step=30.0),
    "unstable_qk_norm": dict(lr=3e-3, schedule="one_cycle", qk_step=30.0, qk_norm=True),
}

SCHEDULES = ("one_cycle", "constant")
#: The one-cycle schedule's share of warm-up steps.
WARMUP = 0.1
#: The fewest steps of a run: the one-cycle schedule warms up, then anneals.
MIN_STEPS = 2

#: What the demo writes into a run's directory: TensorBoard event files, nothing else.
RUN_FILES = EVENT_FILE


@dataclass
class DemoConfig:
    """One training run: the model, the optimiser's schedule and what the probe samples."""

    log_dir: str = "runs/demo"
    steps: int = 150
    batch_size: int = 16
    block_size: int = 128
    n_layer: int = 6
    n_head: int = 4
    n_embd: int = 128
    #: the peak learning rate (``one_cycle``: 10 % warm-up, then annealed to ~0) or the
    #: learning rate held from the first step (``constant``)
    lr: float = 3e-3
    schedule: str = "one_cycle"
    #: how much larger the steps of the query and key weights are than the optimiser's (Adam
    #: ignores the scale of a gradient, so the step itself is scaled after each update)
    qk_step: float = 1.0
    qk_norm: bool = False
    every: int = 5
    pictures_every: int = 50
    batch_rows: int = 4
    seed: int = 0
    #: PyTorch's intra-op threads during the run (restored after it); None or 0: leave them.
    #: One, because a model this small ran 3-4 times faster on one thread than on two on a
    #: 2-core machine shared with other jobs (threads wait for each other on busy cores).
    threads: int | None = 1
    name: str = "stable"

    def describe(self) -> str:
        """``one-cycle schedule, peak lr 3e-3, query/key steps x30, QK-norm, 100 steps``."""
        mantissa, exponent = f"{self.lr:e}".split("e")
        lr = f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
        schedule = (f"one-cycle schedule, peak lr {lr}" if self.schedule == "one_cycle"
                    else f"lr {lr} held constant, no warm-up")
        qk = f", query/key steps x{self.qk_step:g}" if self.qk_step != 1 else ""
        return f"{schedule}{qk}{', QK-norm' if self.qk_norm else ''}, {self.steps} steps"


@dataclass
class DemoResult:
    """What one run did: the loss of every step, the probe's snapshots and alerts."""

    log_dir: str
    losses: list[float]
    snapshots: list[Snapshot]
    seconds: float
    config: DemoConfig = field(default_factory=DemoConfig)
    alerts: list[Alert] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def run(self) -> Run:
        """The run's alerts as the one model of a run (what warned first, where, since when)."""
        return Run(self.name, tuple(self.alerts))


def demo_configs(base: DemoConfig, runs: Iterable[str] = tuple(RUNS)) -> list[DemoConfig]:
    """The configs of the named ``runs``: ``base`` with each run's settings (:data:`RUNS`),
    logging into ``base.log_dir/<name>``; every run trains ``base.steps`` steps on the same
    schedule, so their losses compare step for step."""
    configs = []
    for name in runs:
        if name not in RUNS:
            raise ValueError(f"unknown demo run {name!r}; the runs are {', '.join(RUNS)}")
        configs.append(dataclasses.replace(
            base, name=name, log_dir=os.path.join(base.log_dir, name), **RUNS[name]
        ))
    return configs


def run_demo(
    config: DemoConfig,
    progress: Callable[[int, int, float], None] | None = None,
    on_alert: Callable[[Alert, Snapshot], None] | None = None,
) -> DemoResult:
    """Train ``config.steps`` steps with an :class:`AttentionProbe` attached; log the loss
    (``train/loss``), the learning rate (``train/lr``) and the probe's figures to
    ``config.log_dir``. ``progress(done, total, loss)`` is called after every step,
    ``on_alert`` is the probe's."""
    if config.schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {config.schedule!r}")
    if isinstance(config.steps, bool) or not isinstance(config.steps, int) or (
            config.steps < MIN_STEPS):
        raise ValueError(f"steps must be an int >= {MIN_STEPS}, got {config.steps!r}: a run "
                         "warms its learning rate up, then anneals it")
    threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        return _train(config, progress, on_alert)
    finally:
        torch.set_num_threads(threads)


def _train(config: DemoConfig, progress, on_alert) -> DemoResult:
    from torch.utils.tensorboard import SummaryWriter

    torch.manual_seed(config.seed)
    data = builtin_corpus().long()
    model = GPT(GPTConfig(
        vocab_size=256, block_size=config.block_size, n_layer=config.n_layer,
        n_head=config.n_head, n_embd=config.n_embd, qk_norm=config.qk_norm,
    ))
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.1)
    schedule = one_cycle(optimizer, config) if config.schedule == "one_cycle" else None
    generator = torch.Generator().manual_seed(config.seed)
    losses: list[float] = []
    start = time.perf_counter()
    with SummaryWriter(config.log_dir) as writer, AttentionProbe(
        model, every=config.every, alerts=RULES, on_alert=on_alert,
        capture=CaptureOptions(batch_rows=config.batch_rows, crop=config.block_size),
        outputs=[TensorBoardOutput(writer=writer, pictures_every=config.pictures_every)],
        history=config.steps // config.every + 1,
    ) as probe:
        for step in range(config.steps):
            starts = torch.randint(len(data) - config.block_size - 1, (config.batch_size,),
                                   generator=generator)
            window = torch.stack([data[s : s + config.block_size + 1] for s in starts.tolist()])
            _, loss = model(window[:, :-1], window[:, 1:])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            writer.add_scalar("train/lr", optimizer.param_groups[0]["lr"], step)
            with _scaled_qk_steps(model, config.qk_step):
                optimizer.step()
            if schedule is not None:
                schedule.step()
            losses.append(loss.item())
            writer.add_scalar("train/loss", losses[-1], step)
            probe.step(step)
            if progress is not None:
                progress(step + 1, config.steps, losses[-1])
    return DemoResult(config.log_dir, losses, probe.history, time.perf_counter() - start,
                      config, probe.alerts)


def one_cycle(optimizer: torch.optim.Optimizer, config: DemoConfig
              ) -> torch.optim.lr_scheduler.OneCycleLR:
    """The one-cycle schedule of ``config.steps`` steps: warm-up over :data:`WARMUP` of them, but
    over at least 1.5 steps (a short run's warm-up would otherwise end before its first step,
    or, at 10 steps, at it: a division by zero in PyTorch's schedule), then annealed to ~0."""
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.lr, total_steps=config.steps,
        pct_start=max(WARMUP, 1.5 / config.steps))


@contextmanager
def _scaled_qk_steps(model: GPT, factor: float) -> Iterator[None]:
    """Around an optimiser step: the query and key rows of every block's ``c_attn`` (weights
    and biases) move ``factor`` times as far as the step took them."""
    if factor == 1:
        yield
        return
    rows = [(p, 2 * block.attn.n_embd) for block in model.transformer.h
            for p in (block.attn.c_attn.weight, block.attn.c_attn.bias) if p is not None]
    before = [p[:n].detach().clone() for p, n in rows]
    yield
    with torch.no_grad():
        for (p, n), old in zip(rows, before):
            p[:n] = old + factor * (p[:n] - old)


def replace_runs(configs: Sequence[DemoConfig]) -> list[str]:
    """Delete what earlier runs of the same names left in the directories ``configs`` are about
    to write, so that TensorBoard shows each step of a run once; returns those runs' names.
    Only the demo's own files (:data:`RUN_FILES`) go: a run directory that holds anything else
    raises ``FileExistsError`` before anything is deleted."""
    stale: list[tuple[str, list[str]]] = []
    for config in configs:
        path = config.log_dir
        if not os.path.lexists(path):
            continue
        if not os.path.isdir(path):
            raise FileExistsError(f"{path} exists and is not a directory of the demo's runs")
        names = sorted(os.listdir(path))
        foreign = [n for n in names if not (fnmatch.fnmatch(n, RUN_FILES)
                                            and os.path.isfile(os.path.join(path, n)))]
        if foreign:
            more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
            raise FileExistsError(
                f"{path} holds {foreign[0]!r}{more}, which the demo did not write: not "
                f"replacing the {config.name} run there (move it away, or log elsewhere)")
        if names:
            stale.append((config.name, [os.path.join(path, n) for n in names]))
    for _, files in stale:
        for file in files:
            os.remove(file)
    return [name for name, _ in stale]


Callbacks = tuple[Callable[[int, int, float], None] | None,
                  Callable[[Alert, Snapshot], None] | None]


def run_demos(
    configs: Sequence[DemoConfig], callbacks: Callable[[DemoConfig], Callbacks] | None = None
) -> Iterator[DemoResult]:
    """Train the runs one after the other, yielding each result when its run ends.
    ``callbacks(config)`` gives each run's ``(progress, on_alert)`` (see :func:`run_demo`)."""
    for config in configs:
        yield run_demo(config, *(callbacks(config) if callbacks is not None else ()))


def write_summary(results: Sequence[DemoResult], path: str) -> str:
    """Draw the runs' loss, largest logit spread and lowest layer entropy into one PNG at
    ``path`` (:func:`attn_probe.outputs.plots.plot_runs`); returns ``path``."""
    from ..outputs.plots import plot_runs, run_series_for

    plot = plot_runs(
        {r.name: run_series_for(r.losses, r.snapshots, r.alerts) for r in results})
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    plot.savefig(path, dpi=130)  # crisper than the screen default, for a README
    return path
