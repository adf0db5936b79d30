"""Rebuilding every head's attention matrix from a model, without changing the model.

>>> with attn_probe.capture(model, max_sequences=4, max_tokens=128) as cap:
...     model(tokens)
>>> cap.attention["model.layers.0.self_attn"].shape     # (B, H, T, T), float32
>>> cap.metrics(tau=0.9)["model.layers.0.self_attn"]["rank"]   # (B, H) rank@90%

Inside one ``capture`` block each module's attention is taken from its *first* forward call;
later calls are counted in ``cap.calls`` but not recorded. ``cap.reset()`` makes the next call
count again (one capture per batch, as :func:`attn_probe.rank_profile` does).
"""

from __future__ import annotations

from typing import Iterator

from torch import Tensor, nn


from .adapters import register_adapter
from .discovery import ModuleSelector, find_attention_modules
from .rebuild import attention_probabilities
from .recorder import CaptureError, Recorder, Site, plan_site

__all__ = [
    "Capture",
    "CaptureError",
    "attention_probabilities",
    "capture",
    "find_attention_modules",
    "plan_sites",
    "register_adapter",
]


def plan_sites(
    model: nn.Module, modules: ModuleSelector = None, strategy: str = "auto"
) -> list[Site]:
    """The monitored modules of ``model`` and how each one's attention is rebuilt."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    return [plan_site(n, m, strategy) for n, m in find_attention_modules(model, modules)]


def _check_limit(name: str, value: int | None) -> None:
    if value is not None and (not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be a positive int or None, got {value!r}")


class Capture:
    """Attention matrices of one forward pass, by module name. Use :func:`capture` to make one."""

    def __init__(
        self,
        model: nn.Module,
        *,
        modules: ModuleSelector = None,
        max_sequences: int | None = None,
        max_tokens: int | None = None,
        strategy: str = "auto",
    ) -> None:
        _check_limit("max_sequences", max_sequences)
        _check_limit("max_tokens", max_tokens)
        self.sites = plan_sites(model, modules, strategy)
        self._attention: dict[str, Tensor] = {}
        self._recorder = Recorder(
            self.sites, self._attention.__setitem__,
            max_sequences=max_sequences, max_tokens=max_tokens, strict=True,
        )

    @property
    def modules(self) -> list[str]:
        return [site.name for site in self.sites]

    @property
    def attention(self) -> dict[str, Tensor]:
        """Module name -> (B, H, T, T) float32 attention probabilities, in model order."""
        return {n: self._attention[n] for n in self.modules if n in self._attention}

    @property
    def calls(self) -> dict[str, int]:
        """Forward calls seen per module since the capture started."""
        return dict(self._recorder.calls)

    def metrics(self, tau: float = 0.9) -> dict[str, dict[str, Tensor]]:
        """Module name -> {"rank", "columns", "entropy", "sink", "dominant"}: (B, H) tensors."""
        from ..metrics import head_metrics

        return {name: head_metrics(a, tau) for name, a in self.attention.items()}

    def reset(self) -> None:
        """Forget what was recorded; the next forward call of each module is recorded."""
        self._attention.clear()
        self._recorder.arm()

    def __enter__(self) -> "Capture":
        self._recorder.attach()
        self._recorder.arm()
        return self

    def __exit__(self, *exc) -> None:
        self._recorder.detach()

    def __iter__(self) -> Iterator[tuple[str, Tensor]]:
        return iter(self.attention.items())


def capture(
    model: nn.Module,
    *,
    modules: ModuleSelector = None,
    max_sequences: int | None = None,
    max_tokens: int | None = None,
    strategy: str = "auto",
) -> Capture:
    """Record the attention probabilities of ``model``'s attention modules.

    ``modules``: None finds every attention module; or names, glob patterns, or a predicate
    ``fn(name, module)``. ``max_sequences`` / ``max_tokens`` bound what is materialised (for
    causal attention the first T tokens give exactly the attention of that prefix).
    ``strategy``: "auto" (interception, adapters where interception cannot see the kernel),
    "intercept" or "adapter" to force one.
    """
    return Capture(
        model, modules=modules, max_sequences=max_sequences, max_tokens=max_tokens,
        strategy=strategy,
    )
