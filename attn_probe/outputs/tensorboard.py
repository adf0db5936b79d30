"""TensorBoard output of :class:`~attn_probe.snapshot.Snapshot` objects.

A few cards a person reads: per-layer figures, one unit per card, the headline figures on a
log10 scale so that TensorBoard's default outlier clipping cannot cut them off. The scalar tags
are ``{tag}/{how}/Lxx``, one for each reduction over heads of each figure of
:data:`attn_probe.figures.FIGURES` that says it is logged (:data:`~attn_probe.figures.SERIES`),
with ``Lxx`` the layer and ``{P}`` in a tag the percentage of tau; with them ``lazy_share/Lxx``,
``health/Lxx``, ``nonfinite/Lxx``, ``qk_clip/share_above/Lxx`` (with ``logit_cap``) and
``alert/{kind}`` (:data:`~attn_probe.figures.LAYER_TAGS`). The reference page
``docs/figures.md`` lists them all, generated from the registry. A row is written only when the
snapshot has its figure: a 32-layer model gets a few hundred tags, not thousands. Per-head
scalars ``{tag}/head/Lxx/Hyy`` (and ``qk_clip/gamma/Lxx/Hyy``): by default (``per_head=True``)
only for the heads an alert names — at most :data:`ALERT_HEADS` per layer and figure, the
most extreme first, from the alert's step on, the alert's figure and those shown beside it
(:func:`attn_probe.alerts.shown_with`); ``per_head="all"``: every head; ``False``: none.

Alerts are also written as text under the tag ``alerts``, one markdown table per step that has
any, with every field of the alert (:func:`~attn_probe.outputs.tables.alerts_markdown`, read back
by ``attn-probe report``), and the figures' definitions at the run's tau and lazy rule under the
tag ``figures`` with the first snapshot (:func:`~attn_probe.figures.definitions_markdown`). A
custom-scalars layout (category ``attn_probe``) draws every layer of each headline figure on one
chart, and the count of each kind of alert on its own. Images,
on picture steps: ``health/heads`` (layers x heads coloured by state), ``health/timeline``
(each layer's worst state at every sampled step so far, with the alerts),
``collapse_map/rank{P}``, ``profile/max_rank{P}`` and one grid of attention heatmaps (queries x
keys) per chosen layer, ``attention/Lxx``.
Everything is logged at ``snapshot.step``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Iterable, Mapping, NamedTuple, Sequence

import numpy as np

from ..alerts import KINDS, WATCHED, shown_with
from .. import notices
from ..figures import FIGURES, SERIES, definitions_markdown
from ..options import check_count
from ..snapshot import DEFAULT_HEATMAP_HEADS, default_heatmaps, find_layer, finite, percent
from . import health, plots
from .base import Output
from .tables import alerts_markdown

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

    from ..snapshot import Alert, LayerSummary, Snapshot

__all__ = ["TensorBoardOutput", "LAYOUT_CATEGORY"]

#: Category of the custom-scalars layout.
LAYOUT_CATEGORY = "attn_probe"


#: Per-head figures with ``per_head="all"``: every one an alert rule watches or shows.
PER_HEAD = WATCHED
#: With ``per_head=True``, the most heads per layer and alerted figure that get scalars.
ALERT_HEADS = 4


def _head_tag(figure: str, p: int, layer: str, head: int) -> str:
    return f"{FIGURES[figure].tag.format(P=p)}/head/{layer}/H{head:02d}"


class TensorBoardOutput(Output):
    """Logs snapshots to TensorBoard: the probe's default output (``log_dir=`` is short for
    ``outputs=[TensorBoardOutput(log_dir)]``).

    Args:
        log_dir: where to make a ``SummaryWriter`` (``None``: the framework's log directory
            when given to a Lightning or Hugging Face callback, else the ``SummaryWriter``
            default ``runs/...``). It is made at the first write, on the process that logs.
        writer: or a ``torch.utils.tensorboard.SummaryWriter`` of yours to log into; it stays
            yours: :meth:`close` only flushes it.
        per_head: per-head scalars ``{figure}/head/Lxx/Hyy``: ``True`` for the heads an alert
            names (at most :data:`ALERT_HEADS` per layer and figure, from the alert's step on),
            ``"all"`` for every head, ``False`` for none.
        pictures_every: draw pictures (head health, collapse map, MaxRank profile, heatmaps)
            at the first sampled step and then at the first sampled step at or after each
            multiple of this many steps; 0: never.
        heatmaps: which attention heatmaps to draw: layer (a module name, a tag ``"L07"``, an
            index, ``-1`` for the last) -> head numbers (None: heads 0 to 3). Default: the
            first and last layer, heads 0 to 3. An empty mapping draws none. Layers are checked
            against the monitored modules when the probe is made.
        heatmap_crop: heatmaps show at most this many first queries and keys.
        logit_cap: log a QK-Clip dry run at this threshold (nothing in the model changes):
            each alerted head's factor ``min(1, cap / max_logit)`` and the share of heads above
            the cap.
        custom_scalars: write the custom-scalars layout with the first snapshot. TensorBoard
            keeps one layout per run, so turn this off if you write your own into ``writer``.
    """

    def __init__(
        self,
        log_dir: str | None = None,
        *,
        writer: "SummaryWriter | None" = None,
        per_head: bool | str = True,
        pictures_every: int = 1000,
        heatmaps: Mapping[str | int, Sequence[int] | None] | None = None,
        heatmap_crop: int = 64,
        logit_cap: float | None = None,
        custom_scalars: bool = True,
    ) -> None:
        if writer is not None and log_dir is not None:
            raise ValueError("pass log_dir (a SummaryWriter is made there) or writer, not both")
        if per_head not in (True, False, "all"):
            raise ValueError(f"per_head must be True (the heads an alert names), 'all' or "
                             f"False, got {per_head!r}")
        check_count("pictures_every", pictures_every, minimum=0)
        check_count("heatmap_crop", heatmap_crop)
        if logit_cap is not None and not (isinstance(logit_cap, (int, float)) and logit_cap > 0):
            raise ValueError(f"logit_cap must be a positive number or None, got {logit_cap!r}")
        self.log_dir = log_dir
        self._writer = writer
        self._owns_writer = writer is None
        self.per_head = per_head
        self.pictures_every = pictures_every
        self.heatmaps = None if heatmaps is None else _check_heatmaps(heatmaps)
        self.heatmap_crop = heatmap_crop
        self.logit_cap = logit_cap
        self._layout_written = not custom_scalars
        self._definitions_written = False
        self._closed = False
        self._picture_due = 0  # the next step at or after which pictures are drawn
        self._asked: tuple[int, int] | None = None  # the last step asked, and the answer
        self._heads_checked: set[str] = set()
        #: (layer name, kind of alert) -> the heads with per-head scalars (per_head=True)
        self._watched: dict[tuple[str, str], list[int]] = {}
        #: kind of alert -> alerts of that kind so far
        self._alert_counts: dict[str, int] = dict.fromkeys(KINDS, 0)
        #: the health timeline so far: sampled steps, {layer tag: worst state} at each, alerts
        self._health: dict[str, tuple[list[int], list[int]]] = {}  # tag -> steps, worst states
        self._health_alerts: list[tuple[int, str]] = []

    @property
    def writer(self) -> "SummaryWriter":
        """The ``SummaryWriter`` written to (made in ``log_dir`` at the first use)."""
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=self.log_dir)
        return self._writer

    def default_to(self, log_dir: str) -> None:
        """Log in ``log_dir`` if neither a directory nor a writer was given (what a framework
        callback does with its run's directory)."""
        if self.log_dir is None and self._writer is None:
            self.log_dir = log_dir

    # ------------------------------------------------------------------------- the protocol

    def start(self, layers: Sequence[str]) -> None:
        """Resolve ``heatmaps`` to the monitored modules' names (``ValueError`` for a layer
        that is not monitored)."""
        if self.heatmaps is None:
            return
        sites = [_Layer(name, index) for index, name in enumerate(layers)]
        resolved: dict[str, list[int] | None] = {}
        for key, heads in self.heatmaps.items():
            try:
                name = find_layer(sites, key).name
            except KeyError as error:
                raise ValueError(f"heatmaps: {error.args[0]}") from None
            if heads is None:
                resolved.setdefault(name, None)
                continue
            merged = resolved.get(name) or []
            resolved[name] = merged + [h for h in heads if h not in merged]
        self.heatmaps = resolved

    def pictures(self, step: int) -> int:
        if self._asked is not None and self._asked[0] == step:
            return self._asked[1]
        crop = 0
        if self.pictures_every and step >= self._picture_due:
            crop = self.heatmap_crop
            self._picture_due = (step // self.pictures_every + 1) * self.pictures_every
        self._asked = (step, crop)
        return crop

    # ------------------------------------------------------------------------------ writing

    def write(self, snapshot: "Snapshot") -> None:
        """Log a snapshot's scalars and, at the steps :meth:`pictures` chooses, its plots
        (heatmaps of the attention samples it holds), at ``snapshot.step``."""
        if self._closed:
            raise RuntimeError("TensorBoardOutput.write() after close()")
        if not self._layout_written:
            self.writer.add_custom_scalars(self.layout(snapshot))
            self._layout_written = True
        if not self._definitions_written and snapshot.layers:
            self.writer.add_text("figures", definitions_markdown(
                tau=snapshot.tau, lazy=snapshot.lazy_rule), global_step=snapshot.step)
            self._definitions_written = True
        self._watch(snapshot)
        worst = health.worst_states(snapshot)
        for layer, state in zip(snapshot.layers, worst):
            self._write_layer(snapshot, layer, state)
        self._write_alerts(snapshot)
        self._remember_health(snapshot, worst)
        if self.pictures(snapshot.step):
            self._check_heatmap_heads(snapshot)
            self._write_images(snapshot)
        self.writer.flush()

    def _scalar(self, tag: str, value: float, step: int) -> None:
        if finite(value):
            self.writer.add_scalar(tag, value, global_step=step)

    def _write_layer(self, snapshot: "Snapshot", layer: "LayerSummary", state: int) -> None:
        """The layer's scalars; ``state``: its worst head state (``health/Lxx``)."""
        step, p, tag = snapshot.step, percent(snapshot.tau), layer.tag
        for series in SERIES:
            value = layer.reduce(series.figure.name, series.reduction)
            if series.figure.sparse and value == 0:
                continue
            if series.how == "log10":
                value = math.log10(value) if value > 0 else math.nan
            self._scalar(series.tag(p, tag), value, step)
        self._scalar(f"lazy_share/{tag}", layer.lazy_share, step)
        if layer.name in snapshot.states:
            self._scalar(f"health/{tag}", float(state), step)
        heads = self._head_figures(layer)
        for figure, chosen in heads.items():
            if figure not in layer.heads:
                continue
            counts = layer.counts_of(figure)
            for head in chosen:
                if head < layer.num_heads and counts[head] > 0:
                    self._scalar(_head_tag(figure, p, tag, head),
                                 float(layer.heads[figure][head]), step)
        if self.logit_cap is not None:
            gamma = layer.qk_clip(self.logit_cap)
            known = np.isfinite(gamma)
            if known.any():
                self._scalar(f"qk_clip/share_above/{tag}", float((gamma[known] < 1).mean()), step)
            for head in heads.get("max_logit", ()):
                if head < layer.num_heads and known[head]:
                    self._scalar(f"qk_clip/gamma/{tag}/H{head:02d}", float(gamma[head]), step)
        # Sequences with NaN/Inf attention: per head counts, the worst head is reported (a
        # non-finite input usually poisons every head of the layer alike).
        nonfinite = int(max(layer.nonfinite.max(initial=0), 0))
        if nonfinite:
            self.writer.add_scalar(f"nonfinite/{tag}", nonfinite, global_step=step)

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

    def _write_alerts(self, snapshot: "Snapshot") -> None:
        if not snapshot.layers:
            return
        for alert in snapshot.alerts:
            self._alert_counts[alert.kind] = self._alert_counts.get(alert.kind, 0) + 1
        for kind, count in self._alert_counts.items():
            self.writer.add_scalar(f"alert/{kind}", count, global_step=snapshot.step)
        if snapshot.alerts:
            self.writer.add_text("alerts", alerts_markdown(snapshot.alerts),
                                 global_step=snapshot.step)

    def _remember_health(self, snapshot: "Snapshot", worst: np.ndarray) -> None:
        """Keep each layer's worst state of this step for the timeline (a few bytes a step)."""
        if not snapshot.states:
            return
        for layer, code in zip(snapshot.layers, worst):
            steps, codes = self._health.setdefault(layer.tag, ([], []))
            steps.append(snapshot.step)
            codes.append(int(code))
        self._health_alerts.extend((snapshot.step, alert.tag) for alert in snapshot.alerts)

    def health_timeline(self) -> Any:
        """The plot of :func:`~attn_probe.outputs.health.health_timeline` for every step
        written so far (``None`` before any snapshot with head states)."""
        if not self._health:
            return None
        steps = [step for series_steps, _ in self._health.values() for step in series_steps]
        return health.layer_timeline(
            self._health, self._health_alerts,
            title=f"worst head state of each layer, steps {min(steps)}-{max(steps)}")

    def _write_images(self, snapshot: "Snapshot") -> None:
        step, p = snapshot.step, percent(snapshot.tau)
        if snapshot.states:
            self._image("health/heads", health.head_state_map_for(snapshot), step)
            self._image("health/timeline", self.health_timeline(), step)
        if snapshot.has_data:
            self._image(f"collapse_map/rank{p}", plots.collapse_map_for(snapshot, "rank"), step)
            self._image(f"profile/max_rank{p}", plots.max_rank_profile_for(snapshot), step)
        for layer, heads in self._heatmap_choice(snapshot):
            attention = snapshot.samples[layer.name]
            available = [h for h in heads if 0 <= h < attention.shape[0]]
            if not available or attention.shape[-1] == 0 or attention.shape[-2] == 0:
                continue
            queries, keys = (int(n) for n in attention.shape[-2:])
            crop = self.heatmap_crop
            shape = f"{min(queries, crop)} of {queries} queries" if queries > crop else \
                f"{queries} queries"
            shape += f" x {min(keys, crop)} of {keys} keys" if keys > crop else f" x {keys} keys"
            plot = plots.attention_heatmaps(
                attention, heads=available, crop=crop,
                title=f"{layer.tag} {layer.name}, step {step}, {shape}",
            )
            self._image(f"attention/{layer.tag}", plot, step)

    def _check_heatmap_heads(self, snapshot: "Snapshot") -> None:
        """Warn once per layer about chosen heads it does not have (known once it ran)."""
        for layer in snapshot.layers:
            heads = (self.heatmaps or {}).get(layer.name)
            if heads is None or layer.name in self._heads_checked:
                continue
            self._heads_checked.add(layer.name)
            missing = [h for h in heads if h >= layer.num_heads]
            if missing:
                notices.warn(
                    f"attn_probe: heatmaps: layer {layer.tag} ({layer.name}) has "
                    f"{layer.num_heads} heads (0 to {layer.num_heads - 1}); head"
                    f"{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))} "
                    "cannot be drawn"
                )

    def _image(self, tag: str, plot: Any, step: int) -> None:
        self.writer.add_image(tag, plots.plot_to_array(plot), global_step=step,
                              dataformats="HWC")

    def _heatmap_choice(self, snapshot: "Snapshot") -> list[tuple["LayerSummary", list[int]]]:
        """(layer, heads) pairs to draw, in layer order, for layers that have a sample."""
        layers = [layer for layer in snapshot.layers if layer.name in snapshot.samples]
        if self.heatmaps is None:
            chosen = default_heatmaps(layers)
        else:
            chosen = {}
            for key, heads in self.heatmaps.items():
                try:
                    layer = snapshot.layer(key)
                except KeyError:
                    continue  # not measured at this step
                if layer.name not in snapshot.samples:
                    continue
                heads = DEFAULT_HEATMAP_HEADS if heads is None else [int(h) for h in heads]
                merged = chosen.setdefault(layer.name, [])
                merged.extend(h for h in heads if h not in merged)
        return [(layer, chosen[layer.name]) for layer in layers if layer.name in chosen]

    # ------------------------------------------------------------------------------- layout

    def layout(self, snapshot: "Snapshot") -> dict[str, dict[str, list[Any]]]:
        """The custom-scalars layout written with the first snapshot: one chart per headline
        figure the snapshot has, every layer on it; the worst head state of every layer (when
        the snapshot has head states); one chart per kind of alert (how many so far)."""
        p = percent(snapshot.tau)
        charts: dict[str, list[Any]] = {}
        for series in SERIES:
            if series.headline and any(finite(layer.reduce(series.figure.name, series.reduction))
                                       for layer in snapshot.layers):
                name = series.prefix(p)
                charts[f"{name} ({series.reduction} over heads)"] = [
                    "Multiline", [rf"{name}/L\d+"]]
        if snapshot.states:
            charts["health (worst head state: 1 healthy ... 6 logits exploding)"] = [
                "Multiline", [r"health/L\d+"]]
        if self.logit_cap is not None:
            charts["qk_clip share above cap"] = ["Multiline", [r"qk_clip/share_above/L\d+"]]
        alerts = {f"{kind} alerts so far": ["Multiline", [rf"alert/{kind}"]] for kind in KINDS}
        return {LAYOUT_CATEGORY: charts, f"{LAYOUT_CATEGORY} alerts": alerts}

    # ---------------------------------------------------------------------------- lifecycle

    def close(self) -> None:
        """Close the writer this object made; only flush a writer it was given."""
        if self._closed:
            return
        self._closed = True
        if self._writer is None:
            return
        if self._owns_writer:
            self._writer.close()
        else:
            self._writer.flush()

    def __enter__(self) -> "TensorBoardOutput":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        log_dir = self.log_dir if self._writer is None else getattr(self._writer, "log_dir", None)
        return (f"{type(self).__name__}(log_dir={log_dir!r}, per_head={self.per_head!r}, "
                f"owns_writer={self._owns_writer})")


class _Layer(NamedTuple):
    name: str
    index: int


def _check_heatmaps(heatmaps: Any) -> dict[str | int, list[int] | None]:
    """``heatmaps`` as layer -> head numbers (None: the default heads), or ``ValueError`` /
    ``TypeError`` for anything that cannot be one; the layers are resolved in ``start``."""
    if not isinstance(heatmaps, Mapping):
        raise TypeError(f"heatmaps must map layers to head numbers, got {heatmaps!r}")
    checked: dict[str | int, list[int] | None] = {}
    for key, heads in heatmaps.items():
        if heads is None:
            checked[key] = None
            continue
        if isinstance(heads, (str, bytes)) or not isinstance(heads, Iterable):
            raise ValueError(f"heatmaps[{key!r}]: expected head numbers, got {heads!r}")
        heads = list(heads)
        for head in heads:
            if isinstance(head, bool) or not isinstance(head, (int, np.integer)) or head < 0:
                raise ValueError(f"heatmaps[{key!r}]: heads are numbers from 0, got {head!r}")
        checked[key] = [int(h) for h in heads]
    return checked
