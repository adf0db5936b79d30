"""TensorBoard output of :class:`~attn_probe.snapshot.Snapshot` objects.

A few cards a person reads: per-layer figures, one unit per card, the headline figures on a
log10 scale so that TensorBoard's default outlier clipping cannot cut them off. The scalar tags
are those of every tracker (:mod:`attn_probe.outputs.scalars`: ``{tag}/{how}/Lxx`` of the
figures of :data:`attn_probe.figures.FIGURES`, ``health/Lxx``, ``alert/{kind}``, per-head
``{tag}/head/Lxx/Hyy`` for the heads an alert names, ...; ``docs/figures.md`` lists them all).

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
The probe's settings are text under the tag ``settings``, once.
Everything is logged at ``snapshot.step``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from ..alerts import KINDS
from ..figures import SERIES, definitions_markdown
from ..snapshot import finite, percent
from .tables import alerts_markdown
from .tracker import TrackerOutput

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

    from ..snapshot import Alert, Snapshot

__all__ = ["TensorBoardOutput", "LAYOUT_CATEGORY"]

#: Category of the custom-scalars layout.
LAYOUT_CATEGORY = "attn_probe"


class TensorBoardOutput(TrackerOutput):
    """Logs snapshots to TensorBoard: the probe's default output (``log_dir=`` is short for
    ``outputs=[TensorBoardOutput(log_dir)]``).

    Args:
        log_dir: where to make a ``SummaryWriter`` (``None``: the framework's log directory
            when given to a Lightning or Hugging Face callback, else the ``SummaryWriter``
            default ``runs/...``). It is made at the first write, on the process that logs.
        writer: or a ``torch.utils.tensorboard.SummaryWriter`` of yours to log into; it stays
            yours: :meth:`close` only flushes it.
        per_head, pictures_every, heatmaps, heatmap_crop, logit_cap: what is logged, as in
            :class:`~attn_probe.outputs.tracker.TrackerOutput`.
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
        super().__init__(per_head=per_head, pictures_every=pictures_every, heatmaps=heatmaps,
                         heatmap_crop=heatmap_crop, logit_cap=logit_cap)
        self.log_dir = log_dir
        self._writer = writer
        self._owns_writer = writer is None
        self._layout_written = not custom_scalars
        self._definitions_written = False

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

    # ------------------------------------------------------------------------------ writing

    def first_write(self, snapshot: "Snapshot") -> None:
        if not self._layout_written:
            self.writer.add_custom_scalars(self.layout(snapshot))
            self._layout_written = True
        if not self._definitions_written and snapshot.layers:
            self.writer.add_text("figures", definitions_markdown(
                tau=snapshot.tau, lazy=snapshot.lazy_rule), global_step=snapshot.step)
            self._definitions_written = True

    def log_scalars(self, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, global_step=step)

    def log_alerts(self, step: int, alerts: list["Alert"]) -> None:
        """One markdown table with every field (read back by ``attn-probe report``)."""
        self.writer.add_text("alerts", alerts_markdown(alerts), global_step=step)

    def log_pictures(self, step: int, pictures: dict[str, np.ndarray]) -> None:
        for tag, image in pictures.items():
            self.writer.add_image(tag, image, global_step=step, dataformats="HWC")

    def log_settings(self, settings: dict[str, Any]) -> None:
        rows = "\n".join(f"| {key} | {value} |" for key, value in settings.items())
        self.writer.add_text("settings", "| setting | value |\n|---|---|\n" + rows)

    def flush(self) -> None:
        self.writer.flush()

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
        super().close()
        if self._writer is None:
            return
        if self._owns_writer:
            self._writer.close()
        else:
            self._writer.flush()

    def __repr__(self) -> str:
        log_dir = self.log_dir if self._writer is None else getattr(self._writer, "log_dir", None)
        return (f"{type(self).__name__}(log_dir={log_dir!r}, per_head={self.per_head!r}, "
                f"owns_writer={self._owns_writer})")
