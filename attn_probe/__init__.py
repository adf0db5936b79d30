"""attn_probe: watch attention collapse while you train.

Forward hooks rebuild each head's attention matrix on sampled steps, measure how degenerate it
is (rank@90% energy, columns@90% mass, row entropy, attention-sink mass, as in "When Attention
Collapses", arXiv 2404.08634) and log it to TensorBoard.

    with attn_probe.AttentionProbe(model, log_dir="runs/exp1", every=100) as probe:
        for batch in loader:
            loss = step(model, batch)
            probe.step()

Data flows one way (docs/architecture.md): model → :mod:`.attention` (per-head A) →
:mod:`.metrics` (per-head numbers) → :mod:`.aggregate` (sums and counts) → :mod:`.snapshot`
(layer summaries) → :mod:`.outputs` (TensorBoard, plots, tables). :mod:`.probe` drives it
during training, :mod:`.protocol` on a model at rest; :mod:`.integrations`, :mod:`.cli` and
:mod:`.models` are built on top, and :func:`explore` (:mod:`.notebook`) looks at a model in a
notebook.
"""

from .alerts import AlertRules, EntropyRule, LazyRule, LogitRule, Run, SinkRule, UniformRule
from .attention import CaptureError, register_adapter
from .metrics import columns_at, dominant_column, head_metrics, rank_at, row_entropy, sink_mass
from .notebook import explore
from .options import CaptureOptions
from .outputs import JsonlOutput, MlflowOutput, Output, TensorBoardOutput, WandbOutput
from .probe import AttentionProbe
from .protocol import Capture, capture, rank_profile
from .snapshot import Alert, LayerSummary, Snapshot

__version__ = "0.1.0"

__all__ = [
    "Alert",
    "AlertRules",
    "AttentionProbe",
    "Capture",
    "CaptureError",
    "CaptureOptions",
    "EntropyRule",
    "JsonlOutput",
    "LayerSummary",
    "LazyRule",
    "LogitRule",
    "MlflowOutput",
    "Output",
    "Run",
    "SinkRule",
    "Snapshot",
    "TensorBoardOutput",
    "UniformRule",
    "WandbOutput",
    "capture",
    "columns_at",
    "dominant_column",
    "explore",
    "head_metrics",
    "rank_at",
    "rank_profile",
    "register_adapter",
    "row_entropy",
    "sink_mass",
]
