"""The whole-sequence figures of an eager attention, from its own pre-softmax scores.

An eager attention materialises its (B, H, L, S) scores and probabilities: nothing has to be
rebuilt, and :func:`scores_stats` reads them in float64, a block of rows at a time, giving the
figures :func:`~.streamed.full_context_stats` gives from q and k.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..attention.rebuild import may_attend
from ..options import check_tau
from .blocks import DEFAULT_MEMORY_BUDGET
from .exact import count_from_descending, margin, quiet

__all__ = ["scores_stats"]


def scores_stats(scores: Tensor, probs: Tensor, *, sink_mass: Tensor | None = None,
                 tau: float = 0.9, memory_budget: int = DEFAULT_MEMORY_BUDGET
                 ) -> dict[str, Tensor]:
    """The figures of :func:`full_context_stats` from an eager attention's own (B, H, L, S)
    pre-softmax ``scores`` and ``probs`` (and the (B, H, L) mass of a learned sink logit the
    model dropped after its softmax): the model has materialised them, so nothing is rebuilt;
    the pass only walks over blocks of rows in float64 to bound its own memory. A key may be
    attended to where its score is above -1e4 (see :func:`~attn_probe.attention.rebuild
    .may_attend`). The scores alone do not say what q and k were: ``query_norm`` and
    ``key_norm`` are NaN, and each head is its own ``kv_head``."""
    tau = check_tau(tau)
    with quiet(scores):
        b, h, length, keys = scores.shape
        flat_scores = scores.reshape(b * h, length, keys)
        flat_probs = probs.reshape(b * h, length, keys)
        flat_sink = None if sink_mass is None else sink_mass.reshape(b * h, length)
        f64 = dict(dtype=torch.float64, device=scores.device)
        colmass = torch.zeros(b * h, keys, **f64)
        sums = {name: torch.zeros(b * h, **f64) for name in ("entropy", "sink", "sink_logit")}
        norm_sum, norm_rows = torch.zeros(b * h, **f64), torch.zeros(b * h, **f64)
        rows = torch.zeros(b * h, dtype=torch.int64, device=scores.device)
        max_logit = torch.full((b * h,), -math.inf, **f64)
        logit_spread = torch.full((b * h,), -math.inf, **f64)
        step = max(1, memory_budget // max(1, 8 * 4 * b * h * keys))
        for start in range(0, length, step):
            s = flat_scores[:, start:start + step].double()
            p = flat_probs[:, start:start + step].double()
            allowed = may_attend(s)
            keys_seen = allowed.sum(-1)
            valid = keys_seen > 0
            p = torch.where(allowed, p, 0.0)
            entropy = -torch.xlogy(p, p).sum(-1)
            outcomes = keys_seen.double()
            if flat_sink is not None:
                sink = flat_sink[:, start:start + step].double()
                entropy -= torch.xlogy(sink, sink)
                sums["sink_logit"] += torch.where(valid, sink, 0.0).sum(-1)
                outcomes = outcomes + 1
            sums["entropy"] += torch.where(valid, entropy, 0.0).sum(-1)
            sums["sink"] += torch.where(valid, p[..., 0], 0.0).sum(-1)
            spread = valid & (outcomes >= 2)
            norm_sum += torch.where(spread, entropy / outcomes.clamp_min(2).log(), 0.0).sum(-1)
            norm_rows += spread.sum(-1)
            rows += valid.sum(-1)
            top = torch.where(allowed, s, -math.inf).amax(-1)  # (b * h, rows)
            mean = torch.where(allowed, s, 0.0).sum(-1) / keys_seen.clamp_min(1)
            max_logit = torch.maximum(max_logit, top.amax(-1))
            logit_spread = torch.maximum(
                logit_spread, torch.where(valid, top - mean, -math.inf).amax(-1))
            colmass += (p * p).sum(1)
        count = rows.clamp_min(1).double()
        masses = colmass.sort(dim=-1, descending=True).values
        columns, _ = count_from_descending(masses, tau, margin(keys)) if keys else (
            torch.zeros(b * h, dtype=torch.int64), None)
        live = colmass.sum(-1) > 0
        finite = torch.isfinite(colmass).all(-1) & torch.isfinite(sums["entropy"])
        out = {
            "entropy": sums["entropy"] / count,
            "entropy_norm": norm_sum / norm_rows.clamp_min(1),
            "sink": sums["sink"] / count,
            "sink_logit_mass": sums["sink_logit"] / count,
            "max_logit": max_logit,
            "logit_spread": logit_spread,
            "query_norm": torch.full_like(max_logit, math.nan),
            "key_norm": torch.full_like(max_logit, math.nan),
            "kv_head": torch.arange(h, device=scores.device).repeat(b),
            "columns": torch.where(live, columns, 0),
            "dominant": torch.where(live, colmass.argmax(-1), -1),
            "tokens": rows,
        }
        for name, value in out.items():
            bad = torch.full_like(value, -1 if not value.is_floating_point() else math.nan)
            out[name] = torch.where(finite, value, bad).reshape(b, h)
        return out
