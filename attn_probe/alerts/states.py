"""Each head's state at one step (:class:`~attn_probe.snapshot.HeadState`), decided by the same
per-head conditions as the alert rules, so a picture of states and the alerts never disagree."""

from __future__ import annotations

import numpy as np

from ..snapshot import HeadState
from .rules import AlertRules
from .track import LayerTrack

#: Normalised entropy below which a head counts as sharp (focused on a few keys) rather than
#: spread out. Previous-token heads sit here in healthy models.
SHARP_ENTROPY = 0.5


def head_states(track: LayerTrack, rules: AlertRules) -> np.ndarray:
    """(H,) state codes of the latest measurement of ``track``: the most alarming that applies,
    from healthy through sharp, sink, uniform and one-hot to logits exploding."""
    layer = track.now.layer
    entropy = track.now.heads("entropy_norm_full")
    states = np.full(layer.num_heads, HeadState.HEALTHY, dtype=np.int8)
    with np.errstate(invalid="ignore"):
        states[entropy < SHARP_ENTROPY] = HeadState.SHARP
    if rules.sink is not None:
        states[rules.sink.sinks(layer)] = HeadState.SINK
    if rules.uniform is not None:
        states[rules.uniform.uniform(layer)] = HeadState.UNIFORM
    if rules.entropy is not None:
        states[rules.entropy.collapsed(layer)] = HeadState.ONE_HOT
    if rules.logit is not None:
        growing = rules.logit.growing(track)
        with np.errstate(invalid="ignore"):
            exploding = growing | (track.now.heads("logit_spread") >= rules.logit.critical)
        states[exploding] = HeadState.EXPLODING
    counts = layer.full_counts if layer.full_counts is not None else layer.counts
    states[(counts == 0) & (layer.counts == 0)] = HeadState.NO_DATA
    return states
