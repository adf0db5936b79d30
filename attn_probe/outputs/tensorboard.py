"""TensorBoard output of :class:`~attn_probe.snapshot.Snapshot` objects.

Scalar tags, with ``P = round(tau * 100)`` (e.g. ``90``) and ``Lxx``/``Hyy`` the layer and
head numbers (:data:`SERIES` lists them; the reduction is over heads)::

    rank{P}/max/Lxx  rank{P}/mean/Lxx  rank{P}/min/Lxx        the matrix of the first
    columns{P}/max/Lxx  columns{P}/mean/Lxx  columns{P}/min/Lxx      max_tokens tokens
    entropy/mean/Lxx  sink/mean/Lxx  first_key_dominant/mean/Lxx
    max_logit/max/Lxx                                          every token of the sequence
    columns{P}_full/max/Lxx  columns{P}_full/mean/Lxx
    entropy_full/mean/Lxx  entropy_full/min/Lxx  entropy_norm_full/mean/Lxx  ...min/Lxx
    sink_full/mean/Lxx  first_key_dominant_full/mean/Lxx  tokens_full/max/Lxx
    sink_logit_full/mean/Lxx                                   only when not zero
    lazy_share/Lxx                                             share of lazy heads
    rank{P}/head/Lxx/Hyy  columns{P}/head/Lxx/Hyy  max_logit/head/Lxx/Hyy   per_head=True
    nonfinite/Lxx                                              only when not zero
    alert/{kind}/Lxx                the figure that fired an alert, at its step (a marker)
    qk_clip/share_above/Lxx  qk_clip/gamma/Lxx/Hyy             with logit_cap (a dry run)

Alerts are also written as text, one entry per step that has any, under the tag ``alerts``.

Tags sharing a first component share a TensorBoard card, so each card shows every layer. A
custom-scalars layout (category ``attn_probe``) adds one multi-line chart per metric and
reduction. Images: ``collapse_map/rank{P}``, ``profile/max_rank{P}`` and one grid of attention
heatmaps per chosen layer, ``attention/Lxx``. Everything is logged at ``snapshot.step``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from .._compat import renamed
from ..options import check_count
from ..snapshot import DEFAULT_HEATMAP_HEADS, default_heatmaps, finite, percent
from . import figures

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

    from ..snapshot import LayerSummary, Snapshot

__all__ = ["TensorBoardWriter", "LAYOUT_CATEGORY"]

#: Category of the custom-scalars layout.
LAYOUT_CATEGORY = "attn_probe"

#: Per-layer scalars: (tag name, figure, reductions over heads, logged only when not zero).
#: ``{P}`` stands for the percentage of tau.
SERIES: tuple[tuple[str, str, tuple[str, ...], bool], ...] = (
    ("rank{P}", "rank", ("max", "mean", "min"), False),
    ("columns{P}", "columns", ("max", "mean", "min"), False),
    ("entropy", "entropy", ("mean",), False),
    ("sink", "sink", ("mean",), False),
    ("first_key_dominant", "first_key_dominant", ("mean",), False),
    ("max_logit", "max_logit", ("max",), False),
    ("columns{P}_full", "columns_full", ("max", "mean"), False),
    ("entropy_full", "entropy_full", ("mean", "min"), False),
    ("entropy_norm_full", "entropy_norm_full", ("mean", "min"), False),
    ("sink_full", "sink_full", ("mean",), False),
    ("first_key_dominant_full", "first_key_dominant_full", ("mean",), False),
    ("tokens_full", "tokens_full", ("max",), False),
    ("sink_logit_full", "sink_logit_full", ("mean",), True),
)
#: Figures also logged per head with ``per_head=True``.
PER_HEAD = (("rank{P}", "rank"), ("columns{P}", "columns"), ("max_logit", "max_logit"))


class TensorBoardWriter:
    """Logs snapshots to TensorBoard.

    Args:
        writer: a ``torch.utils.tensorboard.SummaryWriter`` to log into. It stays the caller's:
            :meth:`close` only flushes it. When ``None``, one is made in ``log_dir`` and closed
            by :meth:`close`.
        log_dir: directory of the writer made when ``writer`` is ``None`` (``None``: the
            ``SummaryWriter`` default, ``runs/...``).
        per_head: also log ``rank{P}/head/Lxx/Hyy`` and ``columns{P}/head/Lxx/Hyy``.
        heatmaps: which attention heatmaps to draw: layer (anything
            :func:`~attn_probe.snapshot.find_layer` takes: module name, tag ``"L07"``, index,
            ``-1`` for the last) -> head numbers (None: heads 0 to 3). Default: the first and
            last layer, heads 0 to 3. An empty mapping draws none.
        heatmap_tokens: heatmaps show at most this many first queries and keys.
        custom_scalars: write the custom-scalars layout with the first snapshot. TensorBoard
            keeps one layout per run, so turn this off if you write your own into ``writer``.
        logit_cap: log the QK-Clip view at this threshold: each head's factor
            ``min(1, cap / max_logit)`` and the share of heads above the cap.
        heatmap_heads, max_heatmap_tokens: deprecated names of ``heatmaps`` and
            ``heatmap_tokens``.
    """

    def __init__(
        self,
        writer: "SummaryWriter | None" = None,
        *,
        log_dir: str | None = None,
        per_head: bool = True,
        heatmaps: Mapping[str | int, Sequence[int] | None] | None = None,
        heatmap_tokens: int = 64,
        custom_scalars: bool = True,
        logit_cap: float | None = None,
        heatmap_heads: Mapping[str | int, Sequence[int] | None] | None = None,
        max_heatmap_tokens: int | None = None,
    ) -> None:
        if writer is not None and log_dir is not None:
            raise ValueError("pass either a SummaryWriter or a log_dir, not both")
        if heatmap_heads is not None:
            heatmaps = renamed("heatmap_heads", "heatmaps", heatmap_heads)
        if max_heatmap_tokens is not None:
            heatmap_tokens = renamed("max_heatmap_tokens", "heatmap_tokens", max_heatmap_tokens)
        check_count("heatmap_tokens", heatmap_tokens)
        self._owns_writer = writer is None
        if writer is None:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(log_dir=log_dir)
        self.writer = writer
        self.per_head = per_head
        self.heatmaps = None if heatmaps is None else dict(heatmaps)
        self.heatmap_tokens = int(heatmap_tokens)
        self.logit_cap = logit_cap
        self._layout_written = not custom_scalars
        self._closed = False

    # ------------------------------------------------------------------------------ writing

    def write(self, snapshot: "Snapshot", *, images: bool = True) -> None:
        """Log a snapshot's scalars and, when ``images``, its figures, at ``snapshot.step``."""
        if self._closed:
            raise RuntimeError("TensorBoardWriter.write() after close()")
        if not self._layout_written:
            self.writer.add_custom_scalars(self.layout(snapshot))
            self._layout_written = True
        for layer in snapshot.layers:
            self._write_layer(snapshot, layer)
        self._write_alerts(snapshot)
        if images:
            self._write_images(snapshot)

    def _scalar(self, tag: str, value: float, step: int) -> None:
        if finite(value):
            self.writer.add_scalar(tag, value, global_step=step)

    def _write_layer(self, snapshot: "Snapshot", layer: "LayerSummary") -> None:
        step, p, tag = snapshot.step, percent(snapshot.tau), layer.tag
        for name, figure, reductions, sparse in SERIES:
            for how in reductions:
                value = layer.reduce(figure, how)
                if not (sparse and value == 0):
                    self._scalar(f"{name.format(P=p)}/{how}/{tag}", value, step)
        self._scalar(f"lazy_share/{tag}", layer.lazy_share, step)
        if self.per_head:
            for name, figure in PER_HEAD:
                counts = layer.counts_of(figure)
                for head in range(layer.num_heads):
                    if counts[head] > 0:
                        self._scalar(f"{name.format(P=p)}/head/{tag}/H{head:02d}",
                                     float(layer.heads[figure][head]), step)
        if self.logit_cap is not None:
            gamma = layer.qk_clip(self.logit_cap)
            known = np.isfinite(gamma)
            if known.any():
                self._scalar(f"qk_clip/share_above/{tag}", float((gamma[known] < 1).mean()), step)
            if self.per_head:
                for head in np.flatnonzero(known):
                    self._scalar(f"qk_clip/gamma/{tag}/H{head:02d}", float(gamma[head]), step)
        # Sequences with NaN/Inf attention: per head counts, the worst head is reported (a
        # non-finite input usually poisons every head of the layer alike).
        nonfinite = int(max(layer.nonfinite.max(initial=0), 0))
        if nonfinite:
            self.writer.add_scalar(f"nonfinite/{tag}", nonfinite, global_step=step)

    def _write_alerts(self, snapshot: "Snapshot") -> None:
        for alert in snapshot.alerts:
            self._scalar(f"alert/{alert.kind}/{alert.tag}", alert.value, snapshot.step)
        if snapshot.alerts:
            text = "\n".join(f"- **{alert.kind}** {alert.message}" for alert in snapshot.alerts)
            self.writer.add_text("alerts", text, global_step=snapshot.step)

    def _write_images(self, snapshot: "Snapshot") -> None:
        step, p = snapshot.step, percent(snapshot.tau)
        if snapshot.has_data:
            self._image(f"collapse_map/rank{p}", figures.collapse_map_for(snapshot, "rank"), step)
            self._image(f"profile/max_rank{p}", figures.max_rank_profile_for(snapshot), step)
        for layer, heads in self._heatmap_choice(snapshot):
            attention = snapshot.samples[layer.name]
            available = [h for h in heads if 0 <= h < attention.shape[0]]
            if not available or attention.shape[-1] == 0:
                continue
            total = int(attention.shape[-1])
            crop = ""
            if total > self.heatmap_tokens:
                crop = f", first {self.heatmap_tokens} of {total} tokens"
            figure = figures.attention_heatmaps(
                attention,
                heads=available,
                tokens=self.heatmap_tokens,
                title=f"{layer.tag} {layer.name}, step {step}{crop}",
            )
            self._image(f"attention/{layer.tag}", figure, step)

    def _image(self, tag: str, figure: Any, step: int) -> None:
        self.writer.add_image(tag, figures.figure_to_array(figure), global_step=step,
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
        """The custom-scalars layout written with the first snapshot: one multi-line chart per
        series and reduction, every layer in it."""
        p = percent(snapshot.tau)
        charts: dict[str, list[Any]] = {}
        for name, _, reductions, _ in SERIES:
            name = name.format(P=p)
            for how in reductions:
                charts[f"{name} {how} over heads"] = ["Multiline", [rf"{name}/{how}/L\d+"]]
        charts["lazy_share"] = ["Multiline", [r"lazy_share/L\d+"]]
        charts["alerts"] = ["Multiline", [r"alert/\w+/L\d+"]]
        if self.logit_cap is not None:
            charts["qk_clip share above cap"] = ["Multiline", [r"qk_clip/share_above/L\d+"]]
        charts["nonfinite"] = ["Multiline", [r"nonfinite/L\d+"]]
        layout = {LAYOUT_CATEGORY: charts}
        if self.per_head and snapshot.layers:
            layout[f"{LAYOUT_CATEGORY} per head"] = {
                f"{name.format(P=p)} {layer.tag}": [
                    "Multiline", [rf"{name.format(P=p)}/head/{layer.tag}/H\d+"]
                ]
                for layer in snapshot.layers
                for name, _ in PER_HEAD
            }
        return layout

    # ---------------------------------------------------------------------------- lifecycle

    def flush(self) -> None:
        if not self._closed:
            self.writer.flush()

    def close(self) -> None:
        """Close the writer this object made; only flush a writer it was given."""
        if self._closed:
            return
        if self._owns_writer:
            self.writer.close()
        else:
            self.writer.flush()
        self._closed = True

    def __enter__(self) -> "TensorBoardWriter":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(log_dir={getattr(self.writer, 'log_dir', None)!r}, "
            f"per_head={self.per_head}, "
            f"owns_writer={self._owns_writer})"
        )
