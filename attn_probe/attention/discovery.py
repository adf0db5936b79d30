"""Finding a model's attention modules, by default or by the user's names, globs or predicate."""

from __future__ import annotations

import fnmatch
import functools
import inspect
import re
from typing import Callable, NamedTuple

from torch import nn

from ..options import ModuleSelector
from .adapters import find_adapter

_ATTENTION_CLASS = re.compile(r"Attention\d*$")
_KERNEL_CALL = re.compile(r"\bscaled_dot_product_attention\b")
_ATTENTION_NAME = re.compile(r"attn|attention", re.IGNORECASE)
_SHOWN = 6  # modules that look like attention named in a message

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


class Hints(NamedTuple):
    """How to point at modules, in the words of one interface (Python, the command line);
    ``{example}`` becomes a glob for the modules that look like attention."""

    none_found: str  #: nothing looked like attention
    no_match: str  #: the names or globs given matched nothing
    no_kernel: str  #: a monitored module of class ``{cls}`` showed no kernel and has no adapter


PYTHON_HINTS = Hints(
    none_found="Point at modules with modules=['name', 'glob.*.pattern'] or "
    "modules=lambda name, module: ..., and register an adapter for custom kernels with "
    "attn_probe.register_adapter(ModuleClass, fn).",
    no_match="Names are those of model.named_modules().",
    no_kernel="Register one: attn_probe.register_adapter({cls}, fn) (see "
    "attn_probe.attention.adapters), or leave it out with modules=...",
)


class NoAttentionFound(LookupError):
    """Discovery found no module to monitor: what was looked for, what the model has, and the
    modules that look like attention (:func:`attention_like`). ``str()`` says how to point at
    modules from Python; :meth:`describe` words it for another interface."""

    def __init__(self, model: nn.Module, modules: ModuleSelector,
                 named: list[tuple[str, nn.Module]]) -> None:
        self.model_class = type(model).__name__
        self.modules = modules  #: the selector that matched nothing (None: the default search)
        self.names = [n for n, _ in named[1:6]]  #: the model's first module names
        self.candidates = attention_like(named)  #: (name, class name)
        super().__init__(self.describe("modules=", PYTHON_HINTS))

    def describe(self, option: str, hints: Hints) -> str:
        """The message, with the selector shown as ``option`` + its repr (``modules='x'``)."""
        if self.modules is None:
            text = f"no attention module found in {self.model_class}: searched for {SEARCHED_FOR}"
        else:
            sample = ", ".join(self.names) or "(no submodules)"
            text = (f"{option}{self.modules!r} matched no module of {self.model_class} "
                    f"(names look like: {sample}, ...)")
        if self.candidates:
            text += "; modules that look like attention: " + ", ".join(
                f"{name} ({cls})" for name, cls in self.candidates[:_SHOWN])
            text += ", ..." if len(self.candidates) > _SHOWN else ""
        elif self.modules is None:
            text += "; no module's name or class says attention either"
        hint = hints.none_found if self.modules is None else hints.no_match
        return f"{text}. {hint.format(example=self.example)}"

    @property
    def example(self) -> str:
        """A glob for the modules that look like attention (``blocks.*.attn``)."""
        name = self.candidates[0][0] if self.candidates else "layers.0.attn"
        return re.sub(r"(^|\.)\d+(?=\.|$)", r"\1*", name)


def attention_like(named: list[tuple[str, nn.Module]]) -> list[tuple[str, str]]:
    """(name, class name) of the modules that look like attention: those the default search
    finds, else those whose name or class name says ``attn`` or ``attention``."""
    found = _by_default(named)
    if not found:
        found = [(n, m) for n, m in named[1:]
                 if _ATTENTION_NAME.search(n.rpartition(".")[2] + " " + type(m).__name__)]
    return [(n, type(m).__name__) for n, m in found]


def find_attention_modules(
    model: nn.Module, modules: ModuleSelector = None
) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` pairs to monitor, in ``model.named_modules()`` order.

    With ``modules=None`` every attention module is found; where attention modules nest
    (``BertAttention`` around ``BertSelfAttention``) only the innermost is kept, except that a
    ``TransformerEncoderLayer`` stands for its own ``self_attn`` (its fused path skips it).
    Raises :class:`NoAttentionFound` (a ``LookupError``) saying what was searched for when
    nothing matches.
    """
    named = [(name, m) for name, m in model.named_modules()]
    if modules is None:
        found = _by_default(named)
    else:
        select = _selector(modules)
        found = [(n, m) for n, m in named if select(n, m)]
    if not found:
        raise NoAttentionFound(model, modules, named)
    return found


def _by_default(named: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    return _innermost([(n, m) for n, m in named if is_attention_module(m)])


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
