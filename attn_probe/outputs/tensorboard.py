"""TensorBoard output of :class:`~attn_probe.snapshot.Snapshot` objects.

Scalar tags, with ``P = round(tau * 100)`` (e.g. ``90``) and ``Lxx``/``Hyy`` the layer and
head numbers::

    rank{P}/max/Lxx  rank{P}/mean/Lxx  rank{P}/min/Lxx        reductions over heads
    columns{P}/max/Lxx  columns{P}/mean/Lxx  columns{P}/min/Lxx
    entropy/mean/Lxx  sink/mean/Lxx  first_key_dominant/mean/Lxx
    lazy_share/Lxx                                             share of lazy heads
    rank{P}/head/Lxx/Hyy  columns{P}/head/Lxx/Hyy             with per_head=True
    nonfinite/Lxx                                              only when not zero

Tags sharing a first component share a TensorBoard card, so each card shows every layer. A
custom-scalars layout (category ``attn_probe``) adds one multi-line chart per metric and
reduction. Images: ``collapse_map/rank{P}``, ``profile/max_rank{P}`` and one grid of attention
heatmaps per chosen layer, ``attention/Lxx``. Everything is logged at ``snapshot.step``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Sequence

from ..options import check_count
from ..snapshot import DEFAULT_HEATMAP_HEADS, default_heatmaps, finite, percent
from . import figures

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

    from ..snapshot import LayerSummary, Snapshot

__all__ = ["TensorBoardWriter", "LAYOUT_CATEGORY"]

#: Category of the custom-scalars layout.
LAYOUT_CATEGORY = "attn_probe"

_REDUCED = ("max", "mean", "min")  # reductions over heads logged for rank and columns
_MEAN_ONLY = ("entropy", "sink", "first_key_dominant")


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
    ) -> None:
        if writer is not None and log_dir is not None:
            raise ValueError("pass either a SummaryWriter or a log_dir, not both")
        check_count("heatmap_tokens", heatmap_tokens)
        self._owns_writer = writer is None
        if writer is None:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(log_dir=log_dir)
        self.writer = writer
        self.per_head = per_head
        self.heatmaps = None if heatmaps is None else dict(heatmaps)
        self.heatmap_tokens = int(heatmap_tokens)
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
        if images:
            self._write_images(snapshot)

    def _scalar(self, tag: str, value: float, step: int) -> None:
        if finite(value):
            self.writer.add_scalar(tag, value, global_step=step)

    def _write_layer(self, snapshot: "Snapshot", layer: "LayerSummary") -> None:
        step, p, tag = snapshot.step, percent(snapshot.tau), layer.tag
        for metric in ("rank", "columns"):
            for how in _REDUCED:
                self._scalar(f"{metric}{p}/{how}/{tag}", layer.reduce(metric, how), step)
        for metric in _MEAN_ONLY:
            self._scalar(f"{metric}/mean/{tag}", layer.reduce(metric, "mean"), step)
        self._scalar(f"lazy_share/{tag}", layer.lazy_share, step)
        if self.per_head:
            for head in range(layer.num_heads):
                if not layer.has_data[head]:
                    continue
                for metric in ("rank", "columns"):
                    self._scalar(
                        f"{metric}{p}/head/{tag}/H{head:02d}",
                        float(layer.heads[metric][head]),
                        step,
                    )
        # Sequences with NaN/Inf attention: per head counts, the worst head is reported (a
        # non-finite input usually poisons every head of the layer alike).
        nonfinite = int(max(layer.nonfinite.max(initial=0), 0))
        if nonfinite:
            self.writer.add_scalar(f"nonfinite/{tag}", nonfinite, global_step=step)

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
        """The custom-scalars layout written with the first snapshot."""
        p = percent(snapshot.tau)
        charts: dict[str, list[Any]] = {}
        for metric in (f"rank{p}", f"columns{p}"):
            for how in _REDUCED:
                charts[f"{metric} {how} over heads"] = ["Multiline", [rf"{metric}/{how}/L\d+"]]
        for metric in _MEAN_ONLY:
            charts[f"{metric} mean over heads"] = ["Multiline", [rf"{metric}/mean/L\d+"]]
        charts["lazy_share"] = ["Multiline", [r"lazy_share/L\d+"]]
        charts["nonfinite"] = ["Multiline", [r"nonfinite/L\d+"]]
        layout = {LAYOUT_CATEGORY: charts}
        if self.per_head and snapshot.layers:
            layout[f"{LAYOUT_CATEGORY} per head"] = {
                f"{metric}{p} {layer.tag}": [
                    "Multiline", [rf"{metric}{p}/head/{layer.tag}/H\d+"]
                ]
                for layer in snapshot.layers
                for metric in ("rank", "columns")
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
