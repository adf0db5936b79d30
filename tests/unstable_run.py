"""The unstable training run of the alert tests (``tests/test_alerts.py`` and the ``stop_on``
tests of the callbacks).

The demo's GPT at the demo's width (128), 2 layers, 64 tokens of Python source, batches of 8,
AdamW at a constant 3e-2 without warm-up, weight decay 0.1, gradients clipped to 1.0: layer 0's
largest attention logit grows steadily past the ``logit`` rule's 300 within 15 steps, in the
Hugging Face and Lightning Trainers as in a plain loop. The tests sample every 4 or 5 steps and
check that the sampled steps land far from the threshold on both sides (see
:func:`assert_clear_of_threshold`), so the step of the alert does not hang on rounding.
"""

from __future__ import annotations

import re

import torch

from attn_probe.models.corpus import builtin_corpus
from attn_probe.models.gpt import GPT, GPTConfig

LR, WEIGHT_DECAY, CLIP, BATCH, LENGTH = 3e-2, 0.1, 1.0, 8, 64
MAX_LOGIT = 300.0  # the default LogitRule
#: A sampled step's figure must be at least this far (relative) from MAX_LOGIT.
MARGIN = 0.15
#: TensorBoard tags of the probe: every one names a layer (``.../L00``, ``.../L00/H01``).
PROBE_TAG = re.compile(r"/L\d\d(/|$)")


def unstable_gpt(qk_norm: bool = False) -> GPT:
    """The same initial weights every time (with ``qk_norm``, the run's cure)."""
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=256, block_size=LENGTH, n_layer=2, n_head=4, n_embd=128,
                         qk_norm=qk_norm))


def windows(n: int, seed: int = 0) -> torch.Tensor:
    """``n`` windows of ``LENGTH + 1`` bytes of the built-in corpus (inputs and targets)."""
    data = builtin_corpus(200_000).long()
    starts = torch.randint(len(data) - LENGTH - 1, (n,),
                           generator=torch.Generator().manual_seed(seed)).tolist()
    return torch.stack([data[s: s + LENGTH + 1] for s in starts])


def optimizer(parameters) -> torch.optim.Optimizer:
    return torch.optim.AdamW(parameters, lr=LR, weight_decay=WEIGHT_DECAY)


def assert_clear_of_threshold(max_logits: dict[int, float]) -> None:
    """Every sampled step's largest logit (any layer) is at least ``MARGIN`` away from the
    threshold: the run, not rounding, decides where the alert fires."""
    for step, value in max_logits.items():
        assert abs(value - MAX_LOGIT) > MARGIN * MAX_LOGIT, (
            f"step {step}: max logit {value:.1f} is too close to {MAX_LOGIT:g} for a reliable "
            f"test; all: {max_logits}"
        )


def probe_steps(scalars: dict[str, dict[int, float]]) -> set[int]:
    """Every step at which the probe wrote a scalar."""
    return {step for tag, series in scalars.items() if PROBE_TAG.search(tag) for step in series}
