"""Finding a model's attention modules, by default or by the user's names, globs or predicate."""

from __future__ import annotations

import fnmatch
import functools
import inspect
import re
from typing import Callable, Sequence, Union

from torch import nn

from .adapters import find_adapter

#: ``modules=`` accepts a name, a glob (``"transformer.h.*.attn"``), a list of those, or a
#: predicate ``fn(name, module) -> bool``.
ModuleSelector = Union[str, Sequence[str], Callable[[str, nn.Module], bool], None]

_ATTENTION_CLASS = re.compile(r"Attention\d*$")
_KERNEL_CALL = re.compile(r"\bscaled_dot_product_attention\b")

SEARCHED_FOR = (
    "classes named *Attention (Hugging Face, nanoGPT), modules with a merged qkvo_w parameter "
    "(modded-nanogpt), nn.MultiheadAttention, nn.TransformerEncoderLayer, classes with a "
    "registered adapter, and modules whose forward calls scaled_dot_product_attention"
)


@functools.lru_cache(maxsize=None)
def _forward_calls_kernel(cls: type) -> bool:
    try:
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False
    return bool(_KERNEL_CALL.search(source))


def is_attention_module(module: nn.Module) -> bool:
    """Whether discovery takes ``module`` for an attention module."""
    cls = type(module)
    return (
        find_adapter(module) is not None
        or bool(_ATTENTION_CLASS.search(cls.__name__))
        or _forward_calls_kernel(cls)
    )


def find_attention_modules(
    model: nn.Module, modules: ModuleSelector = None
) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` pairs to monitor, in ``model.named_modules()`` order.

    With ``modules=None`` every attention module is found; where attention modules nest
    (``BertAttention`` around ``BertSelfAttention``) only the innermost is kept, except that a
    ``TransformerEncoderLayer`` stands for its own ``self_attn`` (its fused path skips it).
    Raises ``LookupError`` saying what was searched for when nothing matches.
    """
    named = [(name, m) for name, m in model.named_modules()]
    if modules is None:
        found = [(n, m) for n, m in named if is_attention_module(m)]
        found = _innermost(found)
        if not found:
            raise LookupError(
                f"no attention module found in {type(model).__name__}: "
                f"searched for {SEARCHED_FOR}. "
                "Point at modules with modules=['name', 'glob.*.pattern'] or "
                "modules=lambda name, module: ..., and register an adapter for custom "
                "kernels with attn_probe.register_adapter(ModuleClass, fn)."
            )
        return found
    select = _selector(modules)
    found = [(n, m) for n, m in named if select(n, m)]
    if not found:
        sample = ", ".join(n for n, _ in named[1:6]) or "(no submodules)"
        raise LookupError(
            f"modules={modules!r} matched no module of {type(model).__name__} "
            f"(names look like: {sample}, ...). Names are those of model.named_modules()."
        )
    return found


def _selector(modules: ModuleSelector) -> Callable[[str, nn.Module], bool]:
    if callable(modules):
        return lambda n, m: bool(modules(n, m))
    patterns = [modules] if isinstance(modules, str) else list(modules)
    if not all(isinstance(p, str) for p in patterns):
        raise TypeError(
            f"modules= takes names, glob patterns or a predicate(name, module), got {modules!r}"
        )
    return lambda n, m: any(n == p or fnmatch.fnmatchcase(n, p) for p in patterns)


def _inside(name: str, parent: str) -> bool:
    return name != parent and (parent == "" or name.startswith(parent + "."))


def _innermost(found: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    owners = [n for n, m in found if isinstance(m, nn.TransformerEncoderLayer)]
    names = [n for n, _ in found]

    def keep(name: str) -> bool:
        if any(_inside(name, owner) for owner in owners):
            return False
        return name in owners or not any(_inside(other, name) for other in names)

    return [(n, m) for n, m in found if keep(n)]
