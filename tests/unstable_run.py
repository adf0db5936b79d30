"""The unstable training run of the alert tests (``tests/test_alerts.py`` and the ``stop_on``
tests of the callbacks).

The demo's GPT at the demo's width (128), 2 layers, 64 tokens of Python source, batches of 8,
AdamW at a constant 3e-2 without warm-up, weight decay 0.1, gradients clipped to 1.0: layer 0's
logit spread grows from ~0.2 past a hundred within the first sampling interval and its entropy
collapses soon after, in the Hugging Face and Lightning Trainers as in a plain loop. The tests
sample every 4 or 5 steps and check that the sampled figures land far from the thresholds of the
default ``logit`` and ``entropy`` rules (see :func:`assert_clear_of_thresholds`), so the step of
an alert does not hang on rounding.
"""

from __future__ import annotations

import re

import torch

from attn_probe.models.corpus import builtin_corpus
from attn_probe.models.gpt import GPT, GPTConfig

LR, WEIGHT_DECAY, CLIP, BATCH, LENGTH = 3e-2, 0.1, 1.0, 8, 64
#: A sampled step's figure must be at least this far (relative) from each threshold it meets.
MARGIN = 0.1
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


def layer_figures(history) -> dict[int, list[tuple[float, float]]]:
    """step -> (largest logit spread, mean normalised entropy) of each layer, from a probe's
    history."""
    return {s.step: [(layer.reduce("logit_spread", "max"),
                      layer.reduce("entropy_norm_full", "mean")) for layer in s.layers]
            for s in history}


def assert_clear_of_thresholds(figures: dict[int, list[tuple[float, float]]], until: int,
                               kind: str, rules=None) -> None:
    """Layer 0's figures (:func:`layer_figures`) at every sampled step up to ``until`` (the
    step of the alert a test stops on) are at least ``MARGIN`` away from the thresholds the
    rule of ``kind`` (of ``rules``, default :class:`~attn_probe.AlertRules`) compares them
    with — for ``logit`` the floor and the growth over its window of steps, for ``entropy`` the
    level and (when it is on) the fall — so that the run, not rounding, decides where that
    alert fires."""
    from attn_probe.alerts import AlertRules

    rules = AlertRules() if rules is None else rules
    rule = getattr(rules, kind)
    steps = [step for step in sorted(figures) if step <= until]
    series = [figures[step][0][0 if kind == "logit" else 1] for step in steps]
    for i, (step, value) in enumerate(zip(steps, series)):
        before = [v for s, v in zip(steps[:i], series[:i]) if step - s <= rule.window]
        if kind == "logit":
            before = before or series[max(0, i - 1):i]  # the rule reaches one measurement back
            pairs = [(value, rule.min_spread)]
            if before:
                pairs.append((value, rule.growth * max(min(before), rule.base)))
        else:
            pairs = [(value, rule.warning)]
            if before and rule.fall is not None:
                pairs.append((max(before) - value, rule.fall))
        for figure, limit in pairs:
            assert abs(figure - limit) > MARGIN * limit, (
                f"step {step}: {figure:.4g} is too close to {limit:.4g} for a reliable test; "
                f"all: {figures}")


def probe_steps(scalars: dict[str, dict[int, float]]) -> set[int]:
    """Every step at which the probe wrote a scalar."""
    return {step for tag, series in scalars.items() if PROBE_TAG.search(tag) for step in series}
