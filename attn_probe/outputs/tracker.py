"""The outputs that log to a tracker (TensorBoard, Weights & Biases, MLflow, a JSON Lines file, a
framework's loggers): :class:`TrackerOutput` decides what is logged, once for all of them, and
each tracker only says how it stores it.

At each sampled step a tracker gets the same things: the scalars by tag
(:class:`~attn_probe.outputs.scalars.Scalars`), the alerts new at that step (every field), and on
picture steps the pictures by tag as RGB arrays (``health/heads``, ``health/timeline``,
``collapse_map/rank{P}``, ``profile/max_rank{P}``, ``attention/Lxx``); the probe's settings
once, with the first write. A tracker of your own subclasses :class:`TrackerOutput` and
implements :meth:`~TrackerOutput.log_scalars` (and, where it can hold them,
:meth:`~TrackerOutput.log_alerts`, :meth:`~TrackerOutput.log_pictures`,
:meth:`~TrackerOutput.log_settings`).
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import TYPE_CHECKING, Any, Iterable, Mapping, NamedTuple, Sequence

import numpy as np

from .. import notices
from ..options import check_count
from ..snapshot import DEFAULT_HEATMAP_HEADS, default_heatmaps, find_layer, percent
from . import health, plots
from .base import Output
from .scalars import Scalars

if TYPE_CHECKING:
    from ..snapshot import Alert, LayerSummary, Snapshot

__all__ = ["TrackerOutput", "flat_settings", "import_tracker"]


class TrackerOutput(Output):
    """An output that logs scalars, alerts, pictures and settings to one tracker.

    Args:
        per_head: per-head scalars ``{figure}/head/Lxx/Hyy``: ``True`` for the heads an alert
            names (at most :data:`~attn_probe.outputs.scalars.ALERT_HEADS` per layer and kind,
            from the alert's step on), ``"all"`` for every head, ``False`` for none.
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

    Nothing is opened before the first write, which happens on the process that logs only.
    """

    def __init__(
        self,
        *,
        per_head: bool | str = True,
        pictures_every: int = 1000,
        heatmaps: Mapping[str | int, Sequence[int] | None] | None = None,
        heatmap_crop: int = 64,
        logit_cap: float | None = None,
    ) -> None:
        self.scalars = Scalars(per_head, logit_cap)
        check_count("pictures_every", pictures_every, minimum=0)
        check_count("heatmap_crop", heatmap_crop)
        self.pictures_every = pictures_every
        self.heatmaps = None if heatmaps is None else _check_heatmaps(heatmaps)
        self.heatmap_crop = heatmap_crop
        self.settings: dict[str, Any] = {}  #: the probe's settings, flat (:meth:`run_settings`)
        self._settings_logged = False
        self._closed = False
        self._picture_due = 0  # the next step at or after which pictures are drawn
        self._asked: tuple[int, int] | None = None  # the last step asked, and the answer
        self._heads_checked: set[str] = set()
        #: the health timeline so far: sampled steps, {layer tag: worst state} at each, alerts
        self._health: dict[str, tuple[list[int], list[int]]] = {}  # tag -> steps, worst states
        self._health_alerts: list[tuple[int, str]] = []

    @property
    def per_head(self) -> bool | str:
        return self.scalars.per_head

    @property
    def logit_cap(self) -> float | None:
        return self.scalars.logit_cap

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

    def run_settings(self, settings: Mapping[str, Any]) -> None:
        """Keep the probe's settings (flattened, :func:`flat_settings`), logged with the first
        write."""
        self.settings = flat_settings(settings)

    def write(self, snapshot: "Snapshot") -> None:
        """Log a snapshot at ``snapshot.step``: the settings with the first, the scalars, the
        alerts new at this step and, at the steps :meth:`pictures` chooses, the pictures."""
        if self._closed:
            raise RuntimeError(f"{type(self).__name__}.write() after close()")
        step = snapshot.step
        if not self._settings_logged:
            self._settings_logged = True
            if self.settings:
                self.log_settings(self.settings)
        self.first_write(snapshot)
        worst = health.worst_states(snapshot)
        self.log_scalars(step, self.scalars(snapshot, worst))
        if snapshot.alerts and snapshot.layers:
            self.log_alerts(step, list(snapshot.alerts))
        self._remember_health(snapshot, worst)
        if self.pictures(step):
            self._check_heatmap_heads(snapshot)
            drawn = self.draw(snapshot)
            if drawn:
                self.log_pictures(step, drawn)
        self.flush()

    # ---------------------------------------------------------------- what a tracker stores

    def first_write(self, snapshot: "Snapshot") -> None:
        """Called before each write's scalars (a tracker that sets something up once, such as
        TensorBoard's layout, does it here)."""

    def log_scalars(self, step: int, values: dict[str, float]) -> None:
        """Store ``values`` (tag -> finite value) at ``step``."""
        raise NotImplementedError(f"{type(self).__name__} must implement log_scalars")

    def log_alerts(self, step: int, alerts: list["Alert"]) -> None:
        """Store the alerts new at ``step`` (every field: ``dataclasses.asdict(alert)``)."""

    def log_pictures(self, step: int, pictures: dict[str, np.ndarray]) -> None:
        """Store the pictures of ``step``: tag -> RGB image, ``(height, width, 3)`` uint8."""

    def log_settings(self, settings: dict[str, Any]) -> None:
        """Store the probe's settings once (key -> number, text, bool or None)."""

    def flush(self) -> None:
        """Make what was stored at this step durable (called at the end of every write)."""

    def close(self) -> None:
        self._closed = True

    def __enter__(self) -> "TrackerOutput":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------ pictures

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

    def draw(self, snapshot: "Snapshot") -> dict[str, np.ndarray]:
        """The pictures of ``snapshot``, tag -> RGB array: head health and its timeline (with
        head states), collapse map and MaxRank profile (with data), the chosen heatmaps (of
        the attention samples it holds)."""
        step, p = snapshot.step, percent(snapshot.tau)
        drawn: dict[str, Any] = {}  # tag -> plot
        if snapshot.states:
            drawn["health/heads"] = health.head_state_map_for(snapshot)
            drawn["health/timeline"] = self.health_timeline()
        if snapshot.has_data:
            drawn[f"collapse_map/rank{p}"] = plots.collapse_map_for(snapshot, "rank")
            drawn[f"profile/max_rank{p}"] = plots.max_rank_profile_for(snapshot)
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
            drawn[f"attention/{layer.tag}"] = plots.attention_heatmaps(
                attention, heads=available, crop=crop,
                title=f"{layer.tag} {layer.name}, step {step}, {shape}",
            )
        return {tag: plots.plot_to_array(plot) for tag, plot in drawn.items()}

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


def flat_settings(settings: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings (dataclasses such as :class:`~attn_probe.CaptureOptions`, mappings) as
    one level of ``a.b.c`` keys whose values are numbers, text, bools or None (anything else,
    such as a sequence or a function, as its text), the form every tracker can store."""
    flat: dict[str, Any] = {}
    for key, value in settings.items():
        name = f"{prefix}{key}"
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        if isinstance(value, Mapping):
            flat.update(flat_settings(value, f"{name}."))
        elif value is None or isinstance(value, (bool, int, float, str)):
            flat[name] = value
        elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            flat[name] = ", ".join(value)
        else:
            flat[name] = getattr(value, "__name__", None) or repr(value)
    return flat


def import_tracker(module: str, output: str) -> Any:
    """The tracker's library ``module``, imported for ``output`` at its first write, or
    ``ImportError`` saying which extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(f'{output} needs {module}: pip install "attn_probe[{module}]" '
                          f"({error})") from None
