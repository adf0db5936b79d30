"""The registry of figures: every number the probe measures, declared once.

A *figure* is a measured quantity of one head (rank@tau, entropy, the largest logit...): its name,
its unit, the tokens it covers (``"crop"``: the attention matrix of the first ``crop`` tokens, as
rank@tau needs the whole matrix; ``"full"``: every token of the measured sequence, streamed
without the matrix, names ending in ``_full`` and the logit figures), how the sequences of a step
combine (``"mean"``, ``"max"``, or ``"derived"`` from the others once combined), the reductions
over the heads of a layer that are logged (each a TensorBoard tag ``{tag}/{how}/Lxx``), and one
line of meaning. A matplotlib drawing is a *plot* (:mod:`attn_probe.outputs.plots`), not a figure.

Everything that lists figures is derived from :data:`FIGURES`: the aggregation of sequences
(:mod:`attn_probe.aggregate`), the TensorBoard tags and custom-scalars layout
(:data:`SERIES`), the columns of the tables (:func:`table_columns`), the definitions of the HTML
report and of TensorBoard's Text tab (:func:`definitions`), and the reference page
``docs/figures.md`` (:func:`markdown`; :data:`REGENERATE` writes it). Adding a figure is its metric
code plus one row here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Protocol

__all__ = ["FIGURES", "Figure", "LAYER_TAGS", "REGENERATE", "SERIES", "Series", "definitions",
           "definitions_markdown", "markdown", "table_columns"]

REDUCTIONS = ("max", "mean", "min")
#: The command that writes ``docs/figures.md`` from the registry (run at the repository root).
REGENERATE = ('python -c "from attn_probe.figures import markdown; print(markdown(), end=\'\')" '
              "> docs/figures.md")
#: Words of a reduction over heads.
_OVER_HEADS = {"max": "largest over heads", "mean": "mean over heads",
               "min": "smallest over heads", "log10": "log10 of the largest over heads"}


@dataclass(frozen=True)
class Figure:
    """One per-head figure (see the module docstring). ``meaning`` may hold ``{tau}`` (tau as a
    percentage, or "tau" when unknown)."""

    name: str  #: the key of :attr:`~attn_probe.snapshot.LayerSummary.heads`
    unit: str
    scope: str  #: ``"crop"`` or ``"full"``
    over_sequences: str  #: ``"mean"``, ``"max"`` or ``"derived"``
    meaning: str  #: one line
    #: reductions over heads logged to TensorBoard, each as ``{tag}/{how}/Lxx``
    over_heads: tuple[str, ...] = ()
    #: the largest over heads is also logged as its log10, ``{tag}/log10/Lxx`` (readable on one
    #: chart from 0.1 to 10,000 whatever TensorBoard's outlier clipping cuts)
    log_scale: bool = False
    #: the first logged series (the log10 one with ``log_scale``) is drawn in the
    #: custom-scalars layout, every layer on one chart
    headline: bool = False
    #: logged only when not zero
    sparse: bool = False
    #: reductions over heads in the tables beside those logged
    in_tables: tuple[str, ...] = ()
    #: the tag's name where it is not ``name``; ``{P}`` stands for the percentage of tau
    tag: str = ""

    def __post_init__(self) -> None:
        if self.scope not in ("crop", "full"):
            raise ValueError(f"{self.name}: scope must be 'crop' or 'full', got {self.scope!r}")
        if self.over_sequences not in ("mean", "max", "derived"):
            raise ValueError(f"{self.name}: over_sequences must be 'mean', 'max' or 'derived', "
                             f"got {self.over_sequences!r}")
        bad = [how for how in self.over_heads + self.in_tables if how not in REDUCTIONS]
        if bad:
            raise ValueError(f"{self.name}: reductions over heads are {REDUCTIONS}, got {bad}")
        if self.headline and not self.logged:
            raise ValueError(f"{self.name}: a headline figure must be logged")
        if not self.tag:
            object.__setattr__(self, "tag", self.name)

    @property
    def logged(self) -> tuple[str, ...]:
        """What is logged to TensorBoard: ``"log10"`` first with :attr:`log_scale`, then
        :attr:`over_heads`."""
        return ("log10",) * self.log_scale + self.over_heads

    @property
    def columns(self) -> tuple[str, ...]:
        """Reductions over heads in the tables (raw values: a log10 series is its max)."""
        raw = ["max" if how == "log10" else how for how in self.logged] + list(self.in_tables)
        return tuple(dict.fromkeys(raw))


#: Every per-head figure, in the order of tables and of the reference page. The logit spread
#: is exactly ``query_norm * key_norm * alignment``, so its growth splits into theirs.
FIGURES: dict[str, Figure] = {figure.name: figure for figure in (
    Figure("logit_spread", "logit", "full", "max",
           "the largest amount by which a query's top scaled score q·k·scale stands above the "
           "mean of its allowed scores (softmax ignores a constant added to all of a query's "
           "scores; this figure does too)", log_scale=True, headline=True),
    Figure("max_logit", "logit", "full", "max",
           "the largest scaled pre-softmax score q·k·scale: what QK-Clip compares with its "
           "threshold", over_heads=("max",), log_scale=True, headline=True),
    Figure("entropy_norm_full", "1 = uniform, 0 = one-hot", "full", "mean",
           "each query's attention entropy divided by the log of the number of keys it may "
           "see", over_heads=("mean", "min"), headline=True),
    Figure("rank", "singular values", "crop", "mean",
           "rank@{tau}: the fewest singular values of the attention matrix that hold {tau} of "
           "its energy (MaxRank: the largest over heads)", over_heads=("max",), headline=True,
           in_tables=("mean", "min"), tag="rank{P}"),
    Figure("columns", "keys", "crop", "mean",
           "columns@{tau}: the fewest key columns that hold {tau} of the attention's squared "
           "mass", over_heads=("max",), in_tables=("mean",), tag="columns{P}"),
    Figure("sink_full", "share of attention", "full", "mean",
           "the share of a head's attention on the first key (an attention sink from 0.5)",
           over_heads=("max",), in_tables=("mean",)),
    Figure("query_norm", "norm", "full", "mean",
           "the root-mean-square norm of the scaled queries", over_heads=("max",)),
    Figure("key_norm", "norm", "full", "mean",
           "the root-mean-square norm of the keys centred on their mean", over_heads=("max",)),
    Figure("alignment", "ratio", "full", "derived",
           "logit_spread / (query_norm · key_norm): the direction part of q·k (the norms are "
           "the size part)", over_heads=("max",)),
    Figure("sink_logit_full", "share of attention", "full", "mean",
           "the mass a learned sink logit takes (models with learned sinks only)",
           over_heads=("mean",), sparse=True),
    Figure("entropy", "nats", "crop", "mean",
           "each query's attention entropy over the keys of the crop", in_tables=("mean",)),
    Figure("entropy_full", "nats", "full", "mean",
           "each query's attention entropy over every key it may see", in_tables=("mean",)),
    Figure("sink", "share of attention", "crop", "mean",
           "the share of a head's attention on the first key, within the crop",
           in_tables=("mean",)),
    Figure("columns_full", "keys", "full", "mean",
           "columns@{tau} over every token of the sequence, from the column masses",
           in_tables=("max",)),
    Figure("first_key_dominant", "share of sequences", "crop", "mean",
           "the share of sequences in which key 0 is the column with the most squared mass"),
    Figure("first_key_dominant_full", "share of sequences", "full", "mean",
           "first_key_dominant over every token of the sequence"),
    Figure("tokens_full", "tokens", "full", "mean",
           "the number of query tokens measured", in_tables=("max",)),
    Figure("kv_head", "index", "full", "max",
           "the key/value head a query head reads (grouped-query attention)"),
)}


class Series(NamedTuple):
    """One per-layer TensorBoard scalar: ``{tag}/{how}/Lxx`` of a figure."""

    figure: Figure
    how: str  #: a reduction over heads, or ``"log10"``: log10 of the largest
    headline: bool

    @property
    def reduction(self) -> str:
        """The reduction over heads (``"max"`` for a log10 series)."""
        return "max" if self.how == "log10" else self.how

    def prefix(self, p: int | str) -> str:
        """The tag without its layer: ``max_logit/log10``; ``p``: the percentage of tau."""
        return f"{self.figure.tag.format(P=p)}/{self.how}"

    def tag(self, p: int | str, layer: str) -> str:
        return f"{self.prefix(p)}/{layer}"

    def meaning(self, tau: float | None = None) -> str:
        return f"{_OVER_HEADS[self.how]}: {_meaning(self.figure, tau)}"


#: The per-layer scalars, in the order of :data:`FIGURES`.
SERIES: tuple[Series, ...] = tuple(
    Series(figure, how, figure.headline and i == 0)
    for figure in FIGURES.values() for i, how in enumerate(figure.logged))


class _LazyRule(Protocol):
    max_rank: float
    max_columns: float


#: The per-layer scalars that are not a reduction of one figure, and the per-head ones:
#: (tag, meaning); ``{tau}``, ``{max_rank}`` and ``{max_columns}`` are the run's.
LAYER_TAGS: tuple[tuple[str, str], ...] = (
    ("lazy_share/Lxx", "the share of the layer's heads that are lazy: mean rank@{tau} at most "
                       "{max_rank} and mean columns@{tau} at most {max_columns} (every query "
                       "on about one key)"),
    ("health/Lxx", "the worst head state of the layer (a HeadState code: 0 no data, 1 healthy, "
                   "2 sharp, 3 sink, 4 uniform, 5 one-hot, 6 logits exploding; when judged)"),
    ("nonfinite/Lxx", "sequences whose attention had NaN or Inf entries (only when not zero)"),
    ("qk_clip/share_above/Lxx", "with logit_cap: the share of heads whose max_logit is above "
                                "the cap"),
    ("alert/{kind}", "the alerts of each kind so far (logit, entropy, uniform, lazy, sink)"),
    ("{tag}/head/Lxx/Hyy", "one head's figure: from the step an alert names the head, the "
                           "alert's figure and those shown beside it (max_logit beside "
                           "logit_spread, columns beside rank); per_head='all': every head"),
    ("qk_clip/gamma/Lxx/Hyy", "with logit_cap: the head's QK-Clip factor min(1, cap / "
                              "max_logit)"),
)


def _tau(tau: float | None) -> str:
    return "tau" if tau is None else f"{round(tau * 100)}%"


def _meaning(figure: Figure, tau: float | None) -> str:
    return figure.meaning.format(tau=_tau(tau))


def definitions(*, tau: float | None = None, lazy: _LazyRule | None = None
                ) -> list[tuple[str, str]]:
    """(tag, meaning) of every scalar tag, at the run's ``tau`` and ``lazy`` rule (an object
    with ``max_rank`` and ``max_columns``; their names when ``None``)."""
    p = "{P}" if tau is None else round(tau * 100)
    rows = [(series.tag(p, "Lxx"), series.meaning(tau)) for series in SERIES]
    words = {"tau": _tau(tau),
             "max_rank": "the lazy rule's max_rank" if lazy is None else f"{lazy.max_rank:g}",
             "max_columns": ("the lazy rule's max_columns" if lazy is None
                             else f"{lazy.max_columns:g}")}
    return rows + [(tag, meaning.format(**words)) for tag, meaning in LAYER_TAGS]


def definitions_markdown(*, tau: float | None = None, lazy: _LazyRule | None = None) -> str:
    """:func:`definitions` as a two-column markdown table (TensorBoard's Text tab)."""
    lines = ["| tag | meaning |", "| --- | --- |"]
    lines += [f"| {_cell(tag)} | {_cell(meaning)} |"
              for tag, meaning in definitions(tau=tau, lazy=lazy)]
    return "\n".join(lines)


def table_columns() -> list[tuple[str, str]]:
    """(column, figure) of the per-layer tables: ``{name}/{how}`` for each reduction over
    heads of each figure (:attr:`Figure.columns`)."""
    return [(f"{figure.name}/{how}", figure.name)
            for figure in FIGURES.values() for how in figure.columns]


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def markdown() -> str:
    """The reference page ``docs/figures.md``, generated from :data:`FIGURES`."""
    out = [
        "# Figures",
        "",
        f"<!-- Generated from attn_probe/figures.py by: {REGENERATE}",
        "     A test holds this page to the registry: edit the registry, not this page. -->",
        "",
        "A *figure* is a number the probe measures for each head of each monitored layer at a "
        "sampled step. Each covers either the **crop** (the attention matrix of the first "
        "`crop` tokens: rank and columns need the whole matrix) or the **full** sequence "
        "(every token, streamed without the matrix; names ending in `_full`, and the logit "
        "figures). The sequences of a step combine by their mean or their max, or the figure "
        "is derived from the others once they are combined. `{P}` is tau as a whole "
        "percentage (`rank90`), `Lxx` the layer and `Hyy` the head.",
        "",
        "## Per-head figures",
        "",
        "| figure | unit | tokens | over sequences | TensorBoard tags | table columns | "
        "meaning |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for figure in FIGURES.values():
        tags = ", ".join(f"`{series.prefix('{P}')}/Lxx`" + " (headline)" * series.headline
                         for series in SERIES if series.figure is figure) or "—"
        if figure.sparse:
            tags += " (only when not zero)"
        columns = ", ".join(f"`{figure.name}/{how}`" for how in figure.columns) or "—"
        out.append(f"| `{figure.name}` | {figure.unit} | {figure.scope} | "
                   f"{figure.over_sequences} | {tags} | {columns} | "
                   f"{_cell(_meaning(figure, None))} |")
    out += [
        "",
        "Headline series are drawn in TensorBoard's custom-scalars layout (category "
        "`attn_probe`), every layer on one chart; a log10 series holds the log10 of the "
        "largest value over heads, so one chart reads from 0.1 to 10,000. The per-layer "
        "tables (`layers.csv`, `profile.json`, the terminal table) have the table columns "
        "above, each a reduction over the heads of the layer; the per-head table "
        "(`heads.csv`) has one column per figure.",
        "",
        "## Other tags",
        "",
        "| tag | meaning |",
        "| --- | --- |",
    ]
    words = {"tau": "tau", "max_rank": "`max_rank`", "max_columns": "`max_columns`"}
    out += [f"| `{tag}` | {_cell(meaning.format(**words))} |" for tag, meaning in LAYER_TAGS]
    out += [
        "",
        "Alerts are also written as text under the tag `alerts` (one markdown table per step "
        "that has any), and these definitions, at the run's tau and lazy rule, under "
        "`figures`. Images: `health/heads`, `health/timeline`, `collapse_map/rank{P}`, "
        "`profile/max_rank{P}` and `attention/Lxx` (heatmaps of queries × keys).",
        "",
    ]
    return "\n".join(out)

