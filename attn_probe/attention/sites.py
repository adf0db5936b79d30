"""Sites: the monitored modules of a model, each with the strategy that rebuilds its attention.

:func:`plan_sites` runs discovery (:mod:`.discovery`) and chooses, once per module, between
interception of its kernel calls and an adapter (:mod:`.adapters`).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .adapters import AdapterEntry, find_adapter
from ..options import STRATEGIES
from .discovery import PYTHON_HINTS, Hints, ModuleSelector, find_attention_modules


class CaptureError(RuntimeError):
    """A monitored module's attention could not be rebuilt."""


class NoKernelCall(CaptureError):
    """A monitored module made no kernel call that interception could see, and no adapter
    serves it. ``str()`` says what to do from Python; :meth:`describe` words it for another
    interface."""

    def __init__(self, name: str, module: nn.Module) -> None:
        self.name, self.module_class = name, type(module).__name__
        super().__init__(self.describe(PYTHON_HINTS))

    def describe(self, hints: Hints) -> str:
        return (f"module {self.name!r} ({self.module_class}) made no call to "
                "scaled_dot_product_attention or softmax that could be intercepted, and no "
                f"adapter serves it. {hints.no_kernel.format(cls=self.module_class)}")


@dataclass
class Site:
    name: str
    module: nn.Module
    intercept: bool  #: watch the forward's kernel calls (else: run the adapter before it)
    adapter: AdapterEntry | None  #: the adapter, or the fallback when interception sees nothing

    @property
    def wraps_forward(self) -> bool:
        """Served from a wrapper around the instance's forward rather than from hooks."""
        return not self.intercept and self.adapter.hookless

    @property
    def strategy(self) -> str:
        if not self.intercept:
            return f"adapter:{self.adapter.name}"
        return "intercept" + (f" (fallback adapter:{self.adapter.name})" if self.adapter else "")


def plan_site(name: str, module: nn.Module, strategy: str = "auto") -> Site:
    """Choose how ``module``'s attention is rebuilt."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    entry = find_adapter(module)
    if strategy == "adapter":
        if entry is None:
            raise CaptureError(
                f"no adapter for module {name!r} ({type(module).__name__}); register one with "
                "attn_probe.register_adapter or use strategy='intercept'"
            )
        return Site(name, module, intercept=False, adapter=entry)
    if strategy == "intercept":
        return Site(name, module, intercept=True, adapter=None)
    return Site(name, module, intercept=not (entry and entry.primary), adapter=entry)



def plan_sites(
    model: nn.Module, modules: ModuleSelector = None, strategy: str = "auto"
) -> list[Site]:
    """The monitored modules of ``model`` and how each one's attention is rebuilt."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    return [plan_site(n, m, strategy) for n, m in find_attention_modules(model, modules)]
