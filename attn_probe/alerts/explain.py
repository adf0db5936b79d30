"""Why a layer's logits moved, and what to do about it: the words of an alert's ``cause``.

The logit spread of a head is exactly ``query_norm * key_norm * alignment`` (see
:data:`attn_probe.figures.FIGURES`), so its growth between two measurements splits exactly into
the growth of the three. Wortsman et al. (2023) found that logits grow through the query and key
norms; the split says whether that is what happens here, or whether queries and keys line up.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from .track import Point

#: What bounds logits that grow (Dehghani et al. 2023; Wortsman et al. 2023; Kimi K2).
REMEDIES = "QK-norm, a lower learning rate or warm-up, or QK-Clip at τ≈{tau} would bound them"


class Growth(NamedTuple):
    """How one head's logit figures changed from ``before`` to ``after``: factors (after /
    before) of the spread and of its three parts; NaN where a part is unknown."""

    steps: int
    spread: float
    query: float
    key: float
    alignment: float

    @property
    def norms_known(self) -> bool:
        return all(math.isfinite(f) and f > 0 for f in (self.query, self.key, self.alignment))


def head_growth(before: Point, after: Point, head: int) -> Growth:
    """The factors by which ``head``'s spread, query norm, key norm and alignment grew."""

    def factor(name: str) -> float:
        then, now = before.heads(name)[head], after.heads(name)[head]
        with np.errstate(divide="ignore", invalid="ignore"):
            return float(now / then) if then > 0 else float("nan")

    return Growth(after.step - before.step, factor("logit_spread"), factor("query_norm"),
                  factor("key_norm"), factor("alignment"))


def times(factor: float) -> str:
    """×6.1, ×40, ×1,200."""
    if factor >= 100:
        return f"×{factor:,.0f}"
    return f"×{factor:.2g}" if factor < 10 else f"×{factor:.0f}"


def split(growth: Growth) -> str:
    """Which part made the spread grow: the norms, the alignment, or both."""
    if not growth.norms_known:
        return ("the query and key norms are unknown (the model's eager attention shows only "
                "its scores)")
    norms = math.log(growth.query) + math.log(growth.key)
    aligned = math.log(growth.alignment)
    parts = (f"query norm {times(growth.query)}, key norm {times(growth.key)}",
             f"alignment {times(growth.alignment)}")
    total = abs(norms) + abs(aligned)
    if total == 0 or abs(norms) >= 2 * abs(aligned):
        return f"from the query and key norms ({parts[0]}), not their alignment ({parts[1]})"
    if abs(aligned) >= 2 * abs(norms):
        return f"from the alignment of queries with keys ({parts[1]}), not the norms ({parts[0]})"
    return f"from both the norms ({parts[0]}) and their alignment ({parts[1]})"


def clip_level(before: Point) -> str:
    """A QK-Clip threshold that would hold the layer where it was before the growth: its
    largest raw max logit then, doubled, to two significant digits (at least 10)."""
    level = max(10.0, 2.0 * float(np.nanmax(np.append(before.heads("max_logit"), 0.0))))
    digits = 10 ** (math.floor(math.log10(level)) - 1)
    return f"{math.ceil(level / digits) * digits:g}"


def logit_cause(before: Point, after: Point, head: int) -> str:
    """``logits grew 40× in 50 steps (head 2), from the query and key norms (...), not their
    alignment (...): QK-norm, ... would bound them``."""
    growth = head_growth(before, after, head)
    return (f"the logit spread grew {times(growth.spread)} in {growth.steps} steps (head "
            f"{head}), {split(growth)}; " + REMEDIES.format(tau=clip_level(before)))


def entropy_cause(before: Point, after: Point, head: int) -> str:
    """Entropy collapse explained by what the logits of its most collapsed head did."""
    growth = head_growth(before, after, head)
    if not math.isfinite(growth.spread):
        return "softmax is saturated: each query attends to a single key"
    if growth.spread < 1.5:
        return (f"softmax is saturated (each query on a single key) though the logit spread "
                f"of head {head} changed only {times(growth.spread)} in {growth.steps} steps")
    return (f"softmax is saturated (each query on a single key): the logit spread of head "
            f"{head} grew {times(growth.spread)} in {growth.steps} steps, {split(growth)}; "
            + REMEDIES.format(tau=clip_level(before)))


def fall_cause(before: Point, after: Point, head: int) -> str:
    """A fast fall of entropy explained by the logits of the head that fell most."""
    growth = head_growth(before, after, head)
    if not (math.isfinite(growth.spread) and growth.spread > 1):
        return ("the softmax sharpened faster than a model learns where to look; warm-up or a "
                "lower learning rate slows it down")
    return (f"the softmax sharpened faster than a model learns where to look: the logit "
            f"spread of head {head} grew {times(growth.spread)} in {growth.steps} steps, "
            f"{split(growth)}; warm-up or a lower learning rate slows it down, QK-norm bounds "
            "it")


def uniform_cause(now: Point) -> str:
    """What a layer stuck at uniform attention looks like from inside."""
    spread = now.figure("logit_spread", "max")
    query, key = now.figure("query_norm", "mean"), now.figure("key_norm", "mean")
    inside = f"its largest logit spread is {spread:.2g}"
    if math.isfinite(query) and math.isfinite(key):
        inside += f" (query norm {query:.2g}, key norm {key:.2g})"
    return (f"its attention passes no information: {inside}, so softmax weighs every key "
            "alike; the layer has stopped learning where to look (often a learning rate too "
            "high for this layer early on: warm-up or a lower rate)")
