"""The runs of the collapse suite and the training of one run into a record.

A run is one family (:mod:`.families`) trained with one *recipe* (``collapse_suite.SUITE``).
Every run of a family starts from the same initial weights and sees the same batches in the same
order (and, for the encoder, the same masked bytes): runs differ only by their recipe. The
optimiser is AdamW (weight decay 0.1 on every parameter) with gradient clipping at 1.0.

:func:`train` trains one run with an :class:`attn_probe.AttentionProbe` attached, logs the probe's
figures, ``train/loss`` and ``train/lr`` to the TensorBoard run ``<out>/<run>/`` and pickles the
run's record to ``<out>/<run>.pkl``: a dict with ``config`` (:class:`RunConfig` as a dict),
``losses`` and ``lrs`` (every step's), ``history`` (the probe's :class:`~attn_probe.Snapshot` of
every sampled step), ``alerts`` (what the probe raised), ``rules`` (the ``repr`` of the
:class:`~attn_probe.AlertRules` it raised them by: text, so that a record still loads when the
rules' classes change), ``key_bias_change`` (``key_bias`` runs: the
largest change of the logits at initialisation that the added key bias caused), ``seconds``
(wall) and ``cpu_seconds`` (this process's CPU time: what the run costs on an idle core).
"""

from __future__ import annotations

import dataclasses
import math
import os
import pickle
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from attn_probe import AttentionProbe, CaptureOptions, TensorBoardOutput
from attn_probe.alerts import AlertRules
from attn_probe.models.corpus import builtin_corpus

from .families import FAMILIES, Rows, Shape, add_key_bias, mask_bytes

SCHEDULES = ("warmup_cosine", "constant")
#: Share of the steps the warm-up takes, and where the cosine decay ends (share of the peak).
WARMUP, FLOOR = 0.1, 0.1
#: Share of the encoder's bytes that are masked.
MASKED = 0.15


@dataclass(frozen=True)
class RunConfig:
    """One run: a family, a recipe and everything that shapes its training."""

    family: str
    recipe: str
    #: the peak (``warmup_cosine``: linear warm-up over :data:`WARMUP` of the steps, then a cosine
    #: decay to :data:`FLOOR` of the peak) or the constant learning rate (``constant``)
    lr: float
    schedule: str = "warmup_cosine"
    steps: int = 200
    batch_size: int = 16
    shape: Shape = field(default_factory=Shape)
    seed: int = 0
    #: the probe's sampling interval
    every: int = 5
    #: rows of each sampled batch the probe measures (the probe's own default is 1)
    batch_rows: int = 4
    #: learning-rate multiplier on the queries and keys of layer ``boost_layer`` (1: none)
    boost: float = 1.0
    boost_layer: int = 0
    #: length per head of the constant vector added to every layer's key bias (``gpt2``; 0: none)
    key_bias: float = 0.0

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"unknown family {self.family!r}; the families are "
                             f"{', '.join(FAMILIES)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.key_bias and self.family != "gpt2":
            raise ValueError("key_bias needs the gpt2 family (a fused c_attn with a key bias)")

    @property
    def name(self) -> str:
        """``gpt-lr_1e-2``: the record's file name and the TensorBoard run."""
        return f"{self.family}-{self.recipe}"

    def learning_rate(self, step: int) -> float:
        if self.schedule == "constant":
            return self.lr
        warmup = max(1, round(WARMUP * self.steps))
        if step < warmup:
            return self.lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, self.steps - warmup)
        return self.lr * (FLOOR + (1 - FLOOR) * 0.5 * (1 + math.cos(math.pi * progress)))


def short(value: float) -> str:
    """``3e-3``, ``1.5e-3``: a learning rate in few characters (run names, tables)."""
    mantissa, exponent = f"{value:.1e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def train(config: RunConfig, out: str, rules: AlertRules = AlertRules()) -> str:
    """Train ``config`` with the probe watching; write its TensorBoard run and its record under
    ``out``; return the record's path."""
    family = FAMILIES[config.family]
    shape, steps = config.shape, config.steps
    torch.manual_seed(config.seed)
    model = family.build(shape).train()
    key_bias_change = None
    if config.key_bias:
        key_bias_change = _add_key_bias(model, config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.1)
    boosted = family.qk_rows(model, config.boost_layer) if config.boost != 1 else []
    data = builtin_corpus().long()
    order = torch.Generator().manual_seed(config.seed)  # batches (and masks): alike in a family
    losses, lrs = [], []
    run_dir = os.path.join(out, config.name)
    start, cpu = time.perf_counter(), time.process_time()

    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(run_dir) as writer, AttentionProbe(
        model, every=config.every, history=1000, alerts=rules,
        capture=CaptureOptions(batch_rows=config.batch_rows, crop=shape.block_size),
        outputs=[TensorBoardOutput(writer=writer, pictures_every=0)],
    ) as probe:
        for step in range(steps):
            lr = config.learning_rate(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            starts = torch.randint(len(data) - shape.block_size - 1, (config.batch_size,),
                                   generator=order)
            window = torch.stack([data[s : s + shape.block_size + 1] for s in starts.tolist()])
            if family.masked:
                inputs, targets = mask_bytes(window[:, :-1], MASKED, order)
            else:
                inputs, targets = window[:, :-1], window[:, 1:]
            logits = family.logits(model, inputs)
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                                   ignore_index=-100)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            boosted_step(optimizer, boosted, config.boost)
            losses.append(loss.item())
            lrs.append(lr)
            writer.add_scalar("train/loss", losses[-1], step)
            writer.add_scalar("train/lr", lr, step)
            probe.step(step)
    record = dict(
        config=dataclasses.asdict(config), losses=losses, lrs=lrs, history=probe.history,
        alerts=probe.alerts, rules=repr(rules), key_bias_change=key_bias_change,
        seconds=time.perf_counter() - start, cpu_seconds=time.process_time() - cpu,
    )
    path = os.path.join(out, f"{config.name}.pkl")
    with open(path + ".part", "wb") as file:
        pickle.dump(record, file)
    os.replace(path + ".part", path)  # a record is whole or absent
    return path


def boosted_step(optimizer: torch.optim.Optimizer, rows: Rows, factor: float) -> None:
    """``optimizer.step()`` with the change it makes to ``rows`` scaled by ``factor``: a
    learning-rate multiplier for part of a parameter (Adam's step does not depend on the
    gradient's scale, so scaling the gradient would not do it)."""
    before = [param.detach()[index].clone() for param, index in rows]
    optimizer.step()
    with torch.no_grad():
        for (param, index), old in zip(rows, before):
            param[index] = old + factor * (param[index] - old)


def _add_key_bias(model: torch.nn.Module, config: RunConfig) -> float:
    """Add the key bias (:func:`.families.add_key_bias`) and return the largest change it made
    to the logits of a batch (softmax ignores it: float32 rounding only)."""
    tokens = torch.randint(256, (4, config.shape.block_size),
                           generator=torch.Generator().manual_seed(config.seed + 1))
    family = FAMILIES[config.family]
    with torch.no_grad():
        before = family.logits(model, tokens)
        add_key_bias(model, config.key_bias, config.seed)
        after = family.logits(model, tokens)
    return float((after - before).abs().max())
