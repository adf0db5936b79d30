"""The rule of each kind of collapse: its thresholds, the heads it names, and its check.

Each rule looks at one layer's :class:`~.track.LayerTrack` (its latest measurement and the ones
before) and the rest of the model (:class:`~.track.ModelView`), and returns the conditions that
hold now as :class:`~attn_probe.snapshot.Alert` records with a severity:

* ``logit`` (:class:`LogitRule`) — the layer's logit spread (the softmax-invariant logit figure:
  a query's top score above the mean of its scores) keeps growing: ``warning`` once a head's has
  grown ``growth`` times within ``window`` training steps to at least ``min_spread``;
  ``critical`` past ``critical``;
* ``entropy`` (:class:`EntropyRule`) — the layer's mean normalised entropy (1 = uniform,
  0 = one key per query) collapses: ``warning`` below ``warning`` (and, with ``fall`` set,
  once it has fallen by ``fall`` within ``window`` training steps to ``fall_to`` or less);
  ``critical`` below ``critical``;
* ``uniform`` (:class:`UniformRule`) — the layer has stayed at uniform attention over
  ``steps`` training steps while another layer of the model has learned where to look:
  ``warning``;
* ``lazy`` (:class:`LazyRule`) and ``sink`` (:class:`SinkRule`) — ``info``: the paper's lazy
  layers and attention sinks are what trained models do; they are logged, not warned about.

Every alert says what was measured: the figure its rule watched (each rule's
:attr:`~LogitRule.figures`, the first), the condition (above, below, grew, fell), its value and
threshold in the figure's unit, and the window the condition spans (see
:class:`~attn_probe.snapshot.Alert`).

Windows are counted in training steps, not measurements, so a rule means the same at any
sampling interval (``every``); what each does where the interval is coarser than its window is
in its docstring. The defaults and the runs behind them are in ``docs/alerts.md``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from ..options import check_count
from ..snapshot import Alert, LayerSummary, percent
from . import explain
from .track import LayerTrack, ModelView, Point

#: The kinds of alert, in the order they are checked.
KINDS = ("logit", "entropy", "uniform", "lazy", "sink")


def _heads(mask: np.ndarray) -> tuple[int, ...]:
    return tuple(int(h) for h in np.flatnonzero(mask))


def _alert(kind: str, severity: str, point: Point, heads: tuple[int, ...], figure: str,
           reduction: str, condition: str, value: float, threshold: float, what: str,
           cause: str = "", *, since: Point | None = None, name_heads: bool = True) -> Alert:
    """An alert at ``point``: ``value`` is ``figure`` reduced by ``reduction`` there; ``since``
    is the earlier point the condition's window starts at (None: ``point`` alone)."""
    layer = point.layer
    named = f"head{'s' if len(heads) > 1 else ''} {', '.join(map(str, heads))}" if (
        heads and name_heads) else ""
    message = f"{layer.tag} ({layer.name}) step {point.step}: {what}" + (
        f" in {named}" if named else "")
    start = point if since is None else since
    since_value = value if since is None else _reduce(start, figure, reduction, heads,
                                                      over_named=kind in NAMED_KINDS)
    return Alert(kind, layer.name, layer.tag, heads, point.step, figure, reduction, condition,
                 float(value), float(threshold), start.step, float(since_value), message,
                 severity=severity, cause=cause)


#: Kinds whose value is reduced over the heads the alert names (the others: over every head).
NAMED_KINDS = ("logit", "sink", "lazy")


def _reduce(point: Point, figure: str, how: str, heads: tuple[int, ...],
            over_named: bool) -> float:
    if not over_named:
        return point.figure(figure, how)
    values = point.heads(figure)[list(heads)]
    values = values[np.isfinite(values)]
    if values.size == 0:
        return float("nan")
    return float({"max": np.max, "mean": np.mean, "min": np.min}[how](values))


@dataclass(frozen=True, kw_only=True)
class LogitRule:
    """``logit``: logits that keep growing, measured by the logit spread (which softmax, unlike
    the raw max logit, cannot ignore).

    ``warning`` when a head's spread is at least ``min_spread`` and at least ``growth`` times
    its lowest over the ``window`` training steps before (counted from no less than ``base``:
    every head grows from ~0 at initialisation, which says nothing); where the sampling interval
    is coarser than ``window``, the growth is counted from the measurement before. ``critical``
    when a head's spread passes ``critical``. The alert names those heads, its value is their
    largest spread, and its cause explains that head's growth from its own lowest point of the
    window.
    """

    #: the figure the rule watches, and the per-head figures shown beside it
    figures: ClassVar[tuple[str, ...]] = ("logit_spread", "max_logit")

    growth: float = 4.0
    window: int = 200
    min_spread: float = 100.0
    base: float = 5.0
    critical: float = 1000.0

    def __post_init__(self) -> None:
        for name in ("min_spread", "base", "critical"):
            if not getattr(self, name) > 0:
                raise ValueError(f"LogitRule.{name} must be positive, got {getattr(self, name)}")
        if not self.growth > 1:
            raise ValueError(f"LogitRule.growth must be above 1, got {self.growth}")
        check_count("LogitRule.window", self.window)

    def lows(self, track: LayerTrack) -> list[Point | None]:
        """Each head's lowest point within the window before now (None: no earlier point, or
        no data for the head)."""
        before = track.window(self.window, reach=True)
        heads = track.now.layer.num_heads
        if not before:
            return [None] * heads
        past = np.stack([point.heads("logit_spread") for point in before])
        lows: list[Point | None] = []
        for head in range(heads):
            column = past[:, head]
            lows.append(before[int(np.nanargmin(column))] if np.isfinite(column).any()
                        else None)
        return lows

    def growing(self, track: LayerTrack, lows: list[Point | None] | None = None) -> np.ndarray:
        """(H,) heads whose spread has grown ``growth`` times within the window to at least
        ``min_spread`` (``lows``: :meth:`lows` of ``track``, when already at hand)."""
        spread = track.now.heads("logit_spread")
        lows = self.lows(track) if lows is None else lows
        low = np.array([np.nan if point is None else point.heads("logit_spread")[head]
                        for head, point in enumerate(lows)], dtype=float)
        with np.errstate(invalid="ignore"):
            return ((spread >= self.min_spread)
                    & (spread >= self.growth * np.maximum(low, self.base)))

    def check(self, track: LayerTrack, model: ModelView) -> list[Alert]:
        now = track.now
        spread = now.heads("logit_spread")
        with np.errstate(invalid="ignore"):
            over = spread >= self.critical
        lows = self.lows(track)
        severity, named = (("critical", over) if over.any()
                           else ("warning", self.growing(track, lows)))
        if not named.any():
            return []
        worst = int(np.nanargmax(np.where(named, spread, -np.inf)))
        value = float(spread[worst])
        start = lows[worst]
        cause = "" if start is None else explain.logit_cause(start, now, worst)
        if severity == "critical":
            return [_alert("logit", "critical", now, _heads(over), "logit_spread", "max",
                           "above", value, self.critical,
                           f"attention logits exploded: logit spread {value:,.0f} "
                           f">= {self.critical:g}", cause)]
        then = _reduce(start, "logit_spread", "max", _heads(named), over_named=True)
        return [_alert("logit", "warning", now, _heads(named), "logit_spread", "max", "grew",
                       value, self.min_spread,
                       f"attention logits keep growing: logit spread {then:,.1f} at step "
                       f"{start.step} -> {value:,.1f}", cause, since=start)]


@dataclass(frozen=True, kw_only=True)
class EntropyRule:
    """``entropy``: entropy collapse (Zhai et al. 2023), on the layer's mean over heads of the
    normalised entropy (1 = uniform, 0 = one key per query): ``warning`` below ``warning``,
    ``critical`` below ``critical`` (condition ``below``). A single low-entropy head (a
    previous-token head) is normal, so the rule looks at the mean.

    With ``fall`` set (off by default) it also warns when the mean has fallen by at least
    ``fall`` within ``window`` training steps to ``fall_to`` or less: the softmax sharpening to
    a handful of keys faster than a model learns where to look (condition ``fell``, the alert's
    value the entropy now, its ``since_value`` the entropy it fell from, its threshold the lower
    of ``fall_to`` and ``since_value - fall``). A layer that sharpens fast but stays above
    ``fall_to`` is a pattern forming, not a collapse. The fall is judged only where a
    measurement lies within the window (a sampling interval of at most ``window`` steps), and it
    needs more than one measured sequence to be more than noise (``docs/alerts.md``)."""

    figures: ClassVar[tuple[str, ...]] = ("entropy_norm_full",)

    fall: float | None = None
    window: int = 15
    fall_to: float = 0.3
    warning: float = 0.01
    critical: float = 0.005

    def __post_init__(self) -> None:
        if not 0 < self.critical <= self.warning < 1:
            raise ValueError(f"EntropyRule needs 0 < critical <= warning < 1, got critical="
                             f"{self.critical}, warning={self.warning}")
        if self.fall is not None and not 0 < self.fall < 1:
            raise ValueError(f"EntropyRule.fall must be in (0, 1), got {self.fall}")
        if not 0 < self.fall_to < 1:
            raise ValueError(f"EntropyRule.fall_to must be in (0, 1), got {self.fall_to}")
        check_count("EntropyRule.window", self.window)

    def collapsed(self, layer: LayerSummary) -> np.ndarray:
        """(H,) heads whose own normalised entropy is below ``warning``."""
        with np.errstate(invalid="ignore"):
            return layer.heads["entropy_norm_full"] < self.warning

    def falling(self, track: LayerTrack) -> tuple[float, Point | None]:
        """How far the layer's mean entropy fell within the window (0 without history), and
        the earlier point it fell from (no fall without ``fall`` set)."""
        before = track.window(self.window) if self.fall is not None else []
        means = [p.figure("entropy_norm_full", "mean") for p in before]
        if not before or not np.isfinite(means).any():
            return 0.0, None
        top = int(np.nanargmax(means))
        return float(means[top] - track.now.figure("entropy_norm_full", "mean")), before[top]

    def check(self, track: LayerTrack, model: ModelView) -> list[Alert]:
        now = track.now
        value = now.figure("entropy_norm_full", "mean")
        if not np.isfinite(value):
            return []
        heads = now.heads("entropy_norm_full")
        nats = now.figure("entropy_full", "mean")
        found = []
        if value < self.warning:
            severity, threshold = (("critical", self.critical) if value < self.critical
                                   else ("warning", self.warning))
            before = (track.window(self.window, reach=True) or [now])[0]
            collapsed = self.collapsed(now.layer) & np.isfinite(heads)
            found.append(_alert(
                "entropy", severity, now, _heads(collapsed), "entropy_norm_full", "mean",
                "below", value, threshold,
                f"attention entropy collapsed: mean normalised entropy {value:.3f} < "
                f"{threshold:g} ({nats:.3f} nats; 1 = uniform)",
                explain.entropy_cause(before, now, int(np.nanargmin(heads)))))
        drop, start = self.falling(track)
        if not found and start is not None and self.fall is not None and (
                drop >= self.fall and value <= self.fall_to):
            then = start.heads("entropy_norm_full")
            with np.errstate(invalid="ignore"):
                fell = then - heads
            named = fell >= self.fall
            if not named.any():
                named = np.isfinite(fell) & (fell > 0)
            worst = int(np.nanargmax(np.where(np.isfinite(fell), fell, -np.inf)))
            found.append(_alert(
                "entropy", "warning", now, _heads(named), "entropy_norm_full", "mean", "fell",
                value, min(self.fall_to, value + drop - self.fall),
                f"attention entropy fell fast: mean normalised entropy "
                f"{value + drop:.2f} -> {value:.2f} in {now.step - start.step} steps",
                explain.fall_cause(start, now, worst), since=start))
        return found


@dataclass(frozen=True, kw_only=True)
class UniformRule:
    """``uniform``: a layer whose every head has stayed at uniform attention (normalised
    entropy at least ``entropy``) at every measurement covering the last ``steps`` training
    steps (:meth:`~.track.LayerTrack.span`), while another layer of the model has learned where
    to look (its mean normalised entropy below ``elsewhere`` at each of its measurements over
    the same steps): the layer passes no information and is not learning to. Where the sampling
    interval is coarser than ``steps``, two measurements in a row decide."""

    figures: ClassVar[tuple[str, ...]] = ("entropy_norm_full",)

    entropy: float = 0.99
    steps: int = 30
    elsewhere: float = 0.5

    def __post_init__(self) -> None:
        if not 0 < self.elsewhere < self.entropy < 1:
            raise ValueError(f"UniformRule needs 0 < elsewhere < entropy < 1, got elsewhere="
                             f"{self.elsewhere}, entropy={self.entropy}")
        check_count("UniformRule.steps", self.steps)

    def uniform(self, layer: LayerSummary) -> np.ndarray:
        """(H,) heads at uniform attention."""
        with np.errstate(invalid="ignore"):
            return layer.heads["entropy_norm_full"] >= self.entropy

    def check(self, track: LayerTrack, model: ModelView) -> list[Alert]:
        span = track.span(self.steps)
        if span is None or not all(p.figure("entropy_norm_full", "min") >= self.entropy
                                   for p in span):
            return []
        first = span[0]
        learned = [other for other in model.others(track)
                   if all(p.figure("entropy_norm_full", "mean") < self.elsewhere
                          for p in other.points if p.step >= first.step)]
        if not learned:
            return []
        now = track.now
        value = now.figure("entropy_norm_full", "min")
        others = ", ".join(other.now.layer.tag for other in learned)
        return [_alert("uniform", "warning", now, _heads(self.uniform(now.layer)),
                       "entropy_norm_full", "min", "above", value, self.entropy,
                       f"attention uniform since step {first.step} (normalised entropy >= "
                       f"{value:.3f}) while {others} learned where to look",
                       explain.uniform_cause(now), since=first)]


@dataclass(frozen=True, kw_only=True)
class SinkRule:
    """``sink`` (info): a head whose mean attention on the first key (``sink_full``) reaches
    ``min_mass`` — an attention sink (Xiao et al. 2023), what trained models do."""

    figures: ClassVar[tuple[str, ...]] = ("sink_full",)

    min_mass: float = 0.5

    def __post_init__(self) -> None:
        if not 0 < self.min_mass <= 1:
            raise ValueError(f"SinkRule.min_mass must be in (0, 1], got {self.min_mass}")

    def sinks(self, layer: LayerSummary) -> np.ndarray:
        with np.errstate(invalid="ignore"):
            return layer.heads["sink_full"] >= self.min_mass

    def check(self, track: LayerTrack, model: ModelView) -> list[Alert]:
        now = track.now
        sink = now.heads("sink_full")
        return [_alert("sink", "info", now, (h,), "sink_full", "max", "above", float(sink[h]),
                       self.min_mass,
                       f"head {h} became an attention sink: {sink[h]:.0%} of its attention on "
                       "the first key", name_heads=False)
                for h in _heads(self.sinks(now.layer))]


@dataclass(frozen=True, kw_only=True)
class LazyRule:
    """``lazy`` (info): the paper's lazy layer ("When Attention Collapses"), every query on
    (nearly) the same single key. A head is lazy when its mean rank@tau is at most ``max_rank``
    and its mean columns@tau at most ``max_columns``; a layer is lazy when at least
    ``min_lazy_share`` of its heads are (default: all of them). One key for every query is what
    rank 1 and one column mean: one-hot attention to *different* keys has high rank and is not
    lazy. The alert's value is the largest rank@tau of the lazy heads (condition ``below``: at
    most ``max_rank``); :meth:`judge` marks the heads and the layer
    (:attr:`~attn_probe.snapshot.LayerSummary.lazy`)."""

    figures: ClassVar[tuple[str, ...]] = ("rank", "columns")

    max_rank: float = 1.5
    max_columns: float = 1.5
    min_lazy_share: float = 1.0

    def __post_init__(self) -> None:
        if self.max_rank < 1 or self.max_columns < 1:
            raise ValueError(
                f"LazyRule thresholds must be >= 1 (got max_rank={self.max_rank}, "
                f"max_columns={self.max_columns}): rank and columns are at least 1"
            )
        if not 0 < self.min_lazy_share <= 1:
            raise ValueError(
                f"LazyRule.min_lazy_share must be in (0, 1], got {self.min_lazy_share}"
            )

    def lazy_heads(self, layer: LayerSummary) -> np.ndarray:
        """(H,) heads whose mean rank@tau and columns@tau are both within the thresholds."""
        with np.errstate(invalid="ignore"):
            return ((layer.heads["rank"] <= self.max_rank)
                    & (layer.heads["columns"] <= self.max_columns))

    def judge(self, layer: LayerSummary) -> LayerSummary:
        """``layer`` with its lazy heads and whether it is a lazy layer."""
        lazy = self.lazy_heads(layer)
        has_data = layer.has_data
        share = float(lazy[has_data].mean()) if has_data.any() else float("nan")
        return dataclasses.replace(layer, lazy=lazy,
                                   is_lazy=bool(share == share and share >= self.min_lazy_share))

    def check(self, track: LayerTrack, model: ModelView) -> list[Alert]:
        now = track.now
        layer = self.judge(now.layer)
        if not layer.is_lazy:
            return []
        p = percent(model.tau)
        heads = _heads(layer.lazy & layer.has_data)
        value = _reduce(now, "rank", "max", heads, over_named=True)
        return [_alert("lazy", "info", now, heads, "rank", "max", "below", value,
                       self.max_rank,
                       f"lazy layer: max rank@{p} {layer.reduce('rank', 'max'):.2f}, max "
                       f"columns@{p} {layer.reduce('columns', 'max'):.2f}, "
                       f"{layer.lazy_share:.0%} of heads lazy")]


@dataclass(frozen=True, kw_only=True)
class AlertRules:
    """The rule of each kind; ``None`` turns a kind off."""

    logit: LogitRule | None = field(default_factory=LogitRule)
    entropy: EntropyRule | None = field(default_factory=EntropyRule)
    uniform: UniformRule | None = field(default_factory=UniformRule)
    lazy: LazyRule | None = field(default_factory=LazyRule)
    sink: SinkRule | None = field(default_factory=SinkRule)

    def check(self, track: LayerTrack, model: ModelView) -> list[Alert]:
        """Every condition that holds in ``track``'s latest measurement, most severe first
        within a kind (stateless: :class:`~.monitor.AlertMonitor` remembers what fired)."""
        found: list[Alert] = []
        for kind in KINDS:
            rule = getattr(self, kind)
            if rule is None:
                continue
            found += rule.check(track, model)
        return found

    @property
    def lookback(self) -> int:
        """The longest window of the rules, in training steps: what a layer's track keeps."""
        return max([rule.window for rule in (self.logit, self.entropy) if rule is not None]
                   + [self.uniform.steps if self.uniform is not None else 0, 1])

    def judge_lazy(self, layer: LayerSummary) -> LayerSummary:
        """``layer`` with its lazy heads marked by :attr:`lazy` (as it is, without that rule)."""
        return layer if self.lazy is None else self.lazy.judge(layer)


#: The rule of each kind.
RULE_TYPES: dict[str, type] = {"logit": LogitRule, "entropy": EntropyRule,
                               "uniform": UniformRule, "lazy": LazyRule, "sink": SinkRule}
#: Every per-head figure a rule watches or shows beside it.
WATCHED = tuple(dict.fromkeys(f for rule in RULE_TYPES.values() for f in rule.figures))


def shown_with(figure: str) -> tuple[str, ...]:
    """The per-head figures that show an alert on ``figure``: it, then those its rules show
    beside it (``max_logit`` beside ``logit_spread``, ``columns`` beside ``rank``)."""
    beside = (f for rule in RULE_TYPES.values() if rule.figures[0] == figure
              for f in rule.figures)
    return tuple(dict.fromkeys((figure, *beside)))

