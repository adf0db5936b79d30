"""Model → per-head attention A: discovery, interception, adapters, rebuild.

The first stage of the data flow. :func:`plan_sites` finds a model's attention modules
(:mod:`.discovery`) and picks how each is served (:mod:`.sites`); :class:`Recorder` hooks them
(:mod:`.recorder`) and rebuilds each head's attention matrix from exactly what the kernel was
given (:mod:`.rebuild`), or from the module's own weights where the kernel cannot be seen
(:mod:`.adapters`). Nothing here knows about metrics or outputs: the recorder hands each matrix
to a callback.
"""

from .adapters import register_adapter
from .discovery import Hints, ModuleSelector, NoAttentionFound, find_attention_modules
from .rebuild import (
    DEFAULT_MATRIX_BUDGET, AttentionInputs, AttentionScores, attention_probabilities,
    probabilities,
)
from .recorder import Observed, Recorder
from .sites import CaptureError, NoKernelCall, Site, plan_sites

__all__ = [
    "DEFAULT_MATRIX_BUDGET",
    "AttentionInputs",
    "AttentionScores",
    "CaptureError",
    "Hints",
    "ModuleSelector",
    "NoAttentionFound",
    "NoKernelCall",
    "Observed",
    "Recorder",
    "Site",
    "attention_probabilities",
    "find_attention_modules",
    "plan_sites",
    "probabilities",
    "register_adapter",
]
