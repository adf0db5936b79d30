"""attn_probe: watch attention collapse while you train.

Forward hooks rebuild each head's attention matrix on sampled steps, measure how degenerate it
is (rank@90% energy, columns@90% mass, row entropy, attention-sink mass, as in "When Attention
Collapses", arXiv 2404.08634) and log it to TensorBoard.

    with attn_probe.AttentionProbe(model, log_dir="runs/exp1", every=100) as probe:
        for batch in loader:
            loss = step(model, batch)
            probe.step()
"""

from .capture import Capture, CaptureError, capture, register_adapter
from .metrics import columns_at, dominant_column, head_metrics, rank_at, row_entropy, sink_mass
from .probe import AttentionProbe
from .profile import rank_profile
from .stats import CollapseRule, LayerSummary, Snapshot

__version__ = "0.1.0"

__all__ = [
    "AttentionProbe",
    "Capture",
    "CaptureError",
    "CollapseRule",
    "LayerSummary",
    "Snapshot",
    "capture",
    "columns_at",
    "dominant_column",
    "head_metrics",
    "rank_at",
    "rank_profile",
    "register_adapter",
    "row_entropy",
    "sink_mass",
]
