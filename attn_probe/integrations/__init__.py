"""Callbacks that run :class:`~attn_probe.AttentionProbe` inside training frameworks.

* :class:`attn_probe.integrations.huggingface.AttentionProbeCallback` for the Hugging Face
  ``transformers.Trainer`` (``pip install "attn_probe[hf]"``);
* :class:`attn_probe.integrations.lightning.AttentionProbeCallback` for the Lightning
  ``Trainer`` (``pip install "attn_probe[lightning]"``).

Importing this package imports neither framework; each submodule imports its own framework when
it is imported itself. ``HuggingFaceCallback`` and ``LightningCallback`` are shortcuts to the
two classes; asking for one whose framework is missing raises ``ImportError`` saying what to
install.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["HuggingFaceCallback", "LightningCallback", "huggingface", "lightning"]

_SHORTCUTS = {
    "HuggingFaceCallback": "huggingface",
    "LightningCallback": "lightning",
}


def __getattr__(name: str) -> Any:
    if name in ("huggingface", "lightning"):
        return importlib.import_module(f"{__name__}.{name}")
    if name in _SHORTCUTS:
        module = importlib.import_module(f"{__name__}.{_SHORTCUTS[name]}")
        return module.AttentionProbeCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
