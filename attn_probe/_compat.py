"""Names of the previous release that keep working, with a ``DeprecationWarning``, for one
release: renamed keyword arguments and the old module paths (``attn_probe.plots`` and friends).
"""

from __future__ import annotations

import importlib
import sys
import types
import warnings
from typing import Any

#: old module path -> the modules that now hold its contents, searched in this order
MOVED_MODULES: dict[str, tuple[str, ...]] = {
    "attn_probe.capture": ("attn_probe.attention", "attn_probe.protocol"),
    "attn_probe.stats": ("attn_probe.snapshot", "attn_probe.aggregate"),
    "attn_probe.profile": ("attn_probe.protocol",),
    "attn_probe.plots": ("attn_probe.outputs.figures",),
    "attn_probe.report": ("attn_probe.outputs.tables",),
    "attn_probe.writers": ("attn_probe.outputs",),
    "attn_probe.writers.tensorboard": ("attn_probe.outputs.tensorboard",),
    "attn_probe.distributed": ("attn_probe.aggregate",),
    "attn_probe.gpt": ("attn_probe.models.gpt",),
    "attn_probe.llama2c": ("attn_probe.models.llama2c", "attn_probe.models.sampling"),
    "attn_probe.demo": ("attn_probe.cli.demo", "attn_probe.models.corpus"),
    "attn_probe.full_context": ("attn_probe.metrics",),
    "attn_probe.analyze": ("attn_probe.cli.analyze", "attn_probe.cli.loading",
                           "attn_probe.cli.tokens", "attn_probe.cli.shards",
                           "attn_probe.cli.heads"),
}


def renamed(old: str, new: str, value: Any) -> Any:
    """Warn that keyword ``old`` is now ``new``; returns ``value``."""
    warnings.warn(f"{old}= is deprecated, use {new}=", DeprecationWarning, stacklevel=3)
    return value


class _MovedModule(types.ModuleType):
    """Stands under an old module path; every attribute comes from the new module, with a
    ``DeprecationWarning`` naming it."""

    def __init__(self, old: str, new: tuple[str, ...]) -> None:
        super().__init__(old, f"Moved to {' and '.join(new)}.")
        self.__new = new

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        modules = [importlib.import_module(new) for new in self.__new]
        holder = next((module for module in modules if hasattr(module, name)), None)
        new = holder.__name__ if holder is not None else " and ".join(self.__new)
        warnings.warn(f"{self.__name__} is deprecated, use {new}", DeprecationWarning,
                      stacklevel=2)
        if holder is None:
            raise AttributeError(f"{self.__name__} (moved to {new}) has no attribute {name!r}")
        return getattr(holder, name)


def install_moved_modules() -> None:
    """Register the old paths so that ``from attn_probe.plots import x`` keeps working.

    They are placed in ``sys.modules`` only, never as attributes of the package: the name
    ``attn_probe.capture`` stays the function :func:`attn_probe.capture`.
    """
    for old, new in MOVED_MODULES.items():
        sys.modules.setdefault(old, _MovedModule(old, new))
