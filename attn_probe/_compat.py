"""Names of the previous release that keep working, with a ``DeprecationWarning``, for one
release: renamed keyword arguments and the old module paths (``attn_probe.plots`` and friends).
"""

from __future__ import annotations

import importlib
import sys
import types
import warnings
from typing import Any

#: old module path -> the module that now holds its contents
MOVED_MODULES = {
    "attn_probe.capture": "attn_probe.attention",
    "attn_probe.stats": "attn_probe.snapshot",
    "attn_probe.profile": "attn_probe.protocol",
    "attn_probe.plots": "attn_probe.outputs.figures",
    "attn_probe.report": "attn_probe.outputs.tables",
    "attn_probe.writers": "attn_probe.outputs",
    "attn_probe.distributed": "attn_probe.aggregate",
    "attn_probe.gpt": "attn_probe.models.gpt",
    "attn_probe.llama2c": "attn_probe.models.llama2c",
    "attn_probe.demo": "attn_probe.cli.demo",
    "attn_probe.analyze": "attn_probe.cli.analyze",
}


def renamed(old: str, new: str, value: Any) -> Any:
    """Warn that keyword ``old`` is now ``new``; returns ``value``."""
    warnings.warn(f"{old}= is deprecated, use {new}=", DeprecationWarning, stacklevel=3)
    return value


class _MovedModule(types.ModuleType):
    """Stands under an old module path; every attribute comes from the new module, with a
    ``DeprecationWarning`` naming it."""

    def __init__(self, old: str, new: str) -> None:
        super().__init__(old, f"Moved to {new}.")
        self.__new_name = new

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        new = self.__new_name
        warnings.warn(f"{self.__name__} is deprecated, use {new}", DeprecationWarning,
                      stacklevel=2)
        return getattr(importlib.import_module(new), name)


def install_moved_modules() -> None:
    """Register the old paths so that ``from attn_probe.plots import x`` keeps working.

    They are placed in ``sys.modules`` only, never as attributes of the package: the name
    ``attn_probe.capture`` stays the function :func:`attn_probe.capture`.
    """
    for old, new in MOVED_MODULES.items():
        sys.modules.setdefault(old, _MovedModule(old, new))
