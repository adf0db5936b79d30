"""Snapshot → alerts: one rule for each way attention collapses, each alert with a severity and
a cause, and the state of every head.

Kinds (:data:`KINDS`), each decided per layer, the first three with a look back over the layer's
recent measurements:

* ``logit`` — logits that keep growing (Dehghani et al. 2023; Wortsman et al. 2023), measured by
  the softmax-invariant logit spread (:class:`LogitRule`);
* ``entropy`` — entropy collapse (Zhai et al. 2023) (:class:`EntropyRule`);
* ``uniform`` — a layer stuck at uniform attention while the rest of the model learns
  (:class:`UniformRule`);
* ``lazy`` and ``sink`` — ``info`` only: the paper's lazy layers (every query on one key) and
  attention sinks are what trained models do (:class:`LazyRule`, :class:`SinkRule`).

An :class:`~attn_probe.snapshot.Alert` is an event with a ``severity`` (``info``, ``warning``,
``critical``), what was measured (the figure, the condition, the value and threshold in the
figure's unit, the window since when) and a ``cause`` (why the figure moved: the query and key norms or their
alignment, and what would bound it). It fires once per kind and layer (per head for ``sink``),
and again only at a higher severity; :class:`AlertMonitor` remembers what fired and keeps the
layers' recent tracks. :func:`head_states` gives every head's
:class:`~attn_probe.snapshot.HeadState` from the same conditions. Why the defaults are what they
are: ``docs/alerts.md``.

* :mod:`.track` — what the rules look back on; :mod:`.rules` — the rules; :mod:`.explain` — the
  words of a cause; :mod:`.states` — head states; :mod:`.monitor` — snapshot after snapshot;
  :mod:`.run` — a run's alerts and what warned first, shared by every output.
"""

from .monitor import AlertMonitor
from .rules import (
    KINDS, WATCHED, AlertRules, EntropyRule, LazyRule, LogitRule, SinkRule, UniformRule,
    shown_with,
)
from .run import FirstWarning, Run
from .states import head_states

__all__ = [
    "KINDS",
    "WATCHED",
    "AlertMonitor",
    "AlertRules",
    "EntropyRule",
    "FirstWarning",
    "LazyRule",
    "LogitRule",
    "Run",
    "SinkRule",
    "UniformRule",
    "head_states",
    "shown_with",
]
