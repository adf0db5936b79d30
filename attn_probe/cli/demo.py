"""The built-in demo: a small GPT learns Python's own source code while the probe watches.

No download: the corpus is the source of modules of the Python standard library that runs the
demo, read as bytes (vocabulary 256). The model is :class:`attn_probe.models.gpt.GPT`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from ..models.corpus import builtin_corpus
from ..models.gpt import GPT, GPTConfig
from ..probe import AttentionProbe
from ..snapshot import Snapshot

@dataclass
class DemoConfig:
    log_dir: str = "runs/demo"
    steps: int = 400
    batch_size: int = 16
    block_size: int = 128
    n_layer: int = 6
    n_head: int = 4
    n_embd: int = 128
    lr: float = 3e-3
    every: int = 20
    images_every: int = 100
    max_sequences: int = 4
    seed: int = 0
    threads: int | None = None


@dataclass
class DemoResult:
    log_dir: str
    losses: list[float]
    snapshots: list[Snapshot]
    seconds: float


def run_demo(
    config: DemoConfig, progress: Callable[[int, int, float], None] | None = None
) -> DemoResult:
    """Train ``config.steps`` steps with an :class:`AttentionProbe` attached; log to ``log_dir``."""
    from torch.utils.tensorboard import SummaryWriter

    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    data = builtin_corpus().long()
    model = GPT(GPTConfig(
        vocab_size=256, block_size=config.block_size, n_layer=config.n_layer,
        n_head=config.n_head, n_embd=config.n_embd,
    ))
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.1)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.lr, total_steps=config.steps, pct_start=0.1
    )
    generator = torch.Generator().manual_seed(config.seed)
    losses: list[float] = []
    start = time.perf_counter()
    with SummaryWriter(config.log_dir) as writer, AttentionProbe(
        model, writer=writer, every=config.every, images_every=config.images_every,
        max_sequences=config.max_sequences, max_tokens=config.block_size,
    ) as probe:
        for step in range(config.steps):
            starts = torch.randint(len(data) - config.block_size - 1, (config.batch_size,),
                                   generator=generator)
            window = torch.stack([data[s : s + config.block_size + 1] for s in starts.tolist()])
            _, loss = model(window[:, :-1], window[:, 1:])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            writer.add_scalar("train/loss", losses[-1], step)
            probe.step(step)
            if progress is not None:
                progress(step + 1, config.steps, losses[-1])
    return DemoResult(config.log_dir, losses, probe.history, time.perf_counter() - start)
