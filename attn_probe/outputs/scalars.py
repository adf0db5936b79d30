"""The scalars of a snapshot, by tag: one table for every output, so that TensorBoard, W&B,
MLflow, a JSON Lines file and a framework's loggers hold the same series under the same names.

The per-layer tags are ``{tag}/{how}/Lxx``, one for each reduction over heads of each figure of
:data:`attn_probe.figures.FIGURES` that says it is logged (:data:`~attn_probe.figures.SERIES`),
with ``Lxx`` the layer and ``{P}`` in a tag the percentage of tau; with them ``lazy_share/Lxx``,
``health/Lxx``, ``nonfinite/Lxx``, ``qk_clip/share_above/Lxx`` (with ``logit_cap``) and
``alert/{kind}`` (:data:`~attn_probe.figures.LAYER_TAGS`; ``docs/figures.md`` lists them all).
A row is written only when the snapshot has its figure.

At most 13 per layer when every figure is measured, 16 with the ones written only when not zero
and with ``logit_cap``: a 32-layer model gets a few hundred tags, not thousands. Per-head scalars
``{figure}/head/Lxx/Hyy`` (and ``qk_clip/gamma/Lxx/Hyy``): by default (``per_head=True``) only
for the heads an alert names — at most :data:`ALERT_HEADS` per layer and figure, the most
extreme first, from the alert's step on, the alert's figure and those shown beside it
(:func:`attn_probe.alerts.shown_with`); ``per_head="all"``: every head; ``False``: none. Values that are not finite are left out.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from ..alerts import KINDS, WATCHED, shown_with
from ..figures import FIGURES, SERIES
from ..snapshot import finite, percent

if TYPE_CHECKING:
    from ..snapshot import Alert, LayerSummary, Snapshot

__all__ = ["ALERT_HEADS", "PER_HEAD", "Scalars", "head_tag"]


#: Per-head figures with ``per_head="all"``: every one an alert rule watches or shows.
PER_HEAD = WATCHED
#: With ``per_head=True``, the most heads per layer and alerted figure that get scalars.
ALERT_HEADS = 4


def head_tag(figure: str, p: int, layer: str, head: int) -> str:
    return f"{FIGURES[figure].tag.format(P=p)}/head/{layer}/H{head:02d}"


class Scalars:
    """Snapshot after snapshot -> ``{tag: value}`` of everything logged as a scalar at its step.

    It keeps what the tags depend on over the run: the heads alerts have named (per-head
    scalars from the alert's step on) and the count of each kind of alert so far.

    Args:
        per_head: per-head scalars: ``True`` for the heads an alert names, ``"all"`` for every
            head, ``False`` for none.
        logit_cap: a QK-Clip dry run at this threshold (``qk_clip/...`` tags), or ``None``.
    """

    def __init__(self, per_head: bool | str = True, logit_cap: float | None = None) -> None:
        if per_head not in (True, False, "all"):
            raise ValueError(f"per_head must be True (the heads an alert names), 'all' or "
                             f"False, got {per_head!r}")
        if logit_cap is not None and not (isinstance(logit_cap, (int, float)) and logit_cap > 0):
            raise ValueError(f"logit_cap must be a positive number or None, got {logit_cap!r}")
        self.per_head = per_head
        self.logit_cap = logit_cap
        #: (layer name, alerted figure) -> the heads with per-head scalars (per_head=True)
        self._watched: dict[tuple[str, str], list[int]] = {}
        #: kind of alert -> alerts of that kind so far
        self._alert_counts: dict[str, int] = dict.fromkeys(KINDS, 0)

    def __call__(self, snapshot: "Snapshot", worst: np.ndarray) -> dict[str, float]:
        """The scalars of ``snapshot`` (``worst``: each layer's worst head state), finite
        values only, in a stable order: layer by layer, then the alert counts."""
        self._watch(snapshot)
        values: dict[str, float] = {}
        for layer, state in zip(snapshot.layers, worst):
            self._layer(values, snapshot, layer, int(state))
        if snapshot.layers:
            for alert in snapshot.alerts:
                self._alert_counts[alert.kind] = self._alert_counts.get(alert.kind, 0) + 1
            for kind, count in self._alert_counts.items():
                values[f"alert/{kind}"] = float(count)
        return {tag: value for tag, value in values.items() if finite(value)}

    def _layer(self, values: dict[str, float], snapshot: "Snapshot", layer: "LayerSummary",
               state: int) -> None:
        """The layer's scalars into ``values``; ``state``: its worst head state."""
        p, tag = percent(snapshot.tau), layer.tag
        for series in SERIES:
            value = layer.reduce(series.figure.name, series.reduction)
            if series.figure.sparse and value == 0:
                continue
            if series.how == "log10":
                value = math.log10(value) if value > 0 else math.nan
            values[series.tag(p, tag)] = float(value)
        values[f"lazy_share/{tag}"] = float(layer.lazy_share)
        if layer.name in snapshot.states:
            values[f"health/{tag}"] = float(state)
        heads = self._head_figures(layer)
        for figure, chosen in heads.items():
            if figure not in layer.heads:
                continue
            counts = layer.counts_of(figure)
            for head in chosen:
                if head < layer.num_heads and counts[head] > 0:
                    values[head_tag(figure, p, tag, head)] = float(layer.heads[figure][head])
        if self.logit_cap is not None:
            gamma = layer.qk_clip(self.logit_cap)
            known = np.isfinite(gamma)
            if known.any():
                values[f"qk_clip/share_above/{tag}"] = float((gamma[known] < 1).mean())
            for head in heads.get("max_logit", ()):
                if head < layer.num_heads and known[head]:
                    values[f"qk_clip/gamma/{tag}/H{head:02d}"] = float(gamma[head])
        # Sequences with NaN/Inf attention: per head counts, the worst head is reported (a
        # non-finite input usually poisons every head of the layer alike).
        nonfinite = int(max(layer.nonfinite.max(initial=0), 0))
        if nonfinite:
            values[f"nonfinite/{tag}"] = float(nonfinite)

    def _watch(self, snapshot: "Snapshot") -> None:
        """Start per-head scalars for the heads the snapshot's alerts name (per_head=True)."""
        if self.per_head is not True:
            return
        for alert in snapshot.alerts:
            watched = self._watched.setdefault((alert.layer, alert.figure), [])
            new = [head for head in self._most_extreme(snapshot, alert) if head not in watched]
            watched.extend(new[: max(ALERT_HEADS - len(watched), 0)])

    @staticmethod
    def _most_extreme(snapshot: "Snapshot", alert: "Alert") -> list[int]:
        """The heads ``alert`` names, the most extreme in its figure first (the largest for a
        figure that rose, the smallest for one that fell)."""
        heads = list(alert.heads)
        largest = alert.condition in ("above", "grew")
        layer = next((layer for layer in snapshot.layers if layer.name == alert.layer), None)
        if layer is not None and alert.figure in layer.heads:
            values = np.asarray(layer.heads[alert.figure], dtype=np.float64)
            key = [values[h] if h < values.shape[0] and np.isfinite(values[h]) else np.nan
                   for h in heads]
            order = sorted(range(len(heads)), key=lambda i: (
                np.isnan(key[i]), -key[i] if largest else key[i]))
            heads = [heads[i] for i in order]
        return heads

    def _head_figures(self, layer: "LayerSummary") -> dict[str, list[int]]:
        """Per-head figure -> the heads of ``layer`` that get its scalar."""
        if self.per_head == "all":
            return {figure: list(range(layer.num_heads)) for figure in PER_HEAD}
        chosen: dict[str, list[int]] = {}
        if self.per_head:
            for (name, watched), heads in self._watched.items():
                if name != layer.name:
                    continue
                for head in heads:
                    for figure in shown_with(watched):
                        if head not in chosen.setdefault(figure, []):
                            chosen[figure].append(head)
        return chosen
