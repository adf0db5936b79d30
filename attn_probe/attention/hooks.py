"""The hooks and forward wrappers a :class:`~.recorder.Recorder` puts on a model, made so that
they leave no trace in the process and no copy of the model carries them. They call into it
through :class:`Target` only.

* Every hook and wrapper reaches its recorder through a weak reference: the model never keeps a
  recorder (or the probe that owns it) alive, and :func:`release`, run when the recorder is
  detached or garbage-collected, removes them all.
* A copy of a monitored module (``copy.deepcopy``, ``pickle``, ``torch.save``) gets an inert
  hook (:func:`inert_hook`) and the module's own forward instead of the recorder's: the copy runs
  unmonitored, and nothing of the probe has to be picklable. A module that merely shares the hook
  dictionaries (``copy.copy``) is not the monitored module, and its calls are ignored.
* Sampled forward passes run eagerly, without the compiler, only for the duration of the model's
  own forward call (:func:`run_eagerly`): ``torch.compiler.set_stance("force_eager")`` is entered
  around that call and left when it returns or raises, so a compiled function anywhere else in the
  process is never affected.
"""

from __future__ import annotations

import contextlib
import weakref
from types import MethodType
from typing import TYPE_CHECKING, Any, Callable, Protocol

import torch
from torch import nn

if TYPE_CHECKING:
    from .sites import Site


class Target(Protocol):
    """What the hooks call into (a :class:`~.recorder.Recorder`)."""

    armed: bool

    def enter(self, site: "Site", args: tuple, kwargs: dict) -> None:
        """A site's forward is about to run with ``args`` and ``kwargs``."""

    def leave(self, site: "Site", output: Any) -> None:
        """A site's forward returned ``output`` (None when it raised)."""

    def depth(self) -> int:
        """How many site forwards are running, one inside the other."""

    def unwind(self, depth: int) -> None:
        """Close what the site forwards above ``depth`` opened (they will not return)."""

    def model_input(self, args: tuple, kwargs: dict) -> None:
        """The watched model's forward is about to run with ``args`` and ``kwargs``."""

_set_stance = getattr(torch.compiler, "set_stance", None)  # torch >= 2.6

#: Whether this torch can run a compiled model's forward eagerly on demand.
CAN_FORCE_EAGER = _set_stance is not None


def enter_eager_stance() -> Any:
    """Enter ``torch.compiler.set_stance("force_eager")`` and return it, to be exited when the
    caller is done; None where this torch has no stances or the caller runs inside a compiled
    region (where the stance cannot be changed)."""
    if not CAN_FORCE_EAGER or torch.compiler.is_compiling():
        return None
    try:
        stance = _set_stance("force_eager")
    except RuntimeError:  # "attempted to set_stance in a torch.compile region"
        return None
    stance.__enter__()
    return stance


def inert_hook(*args: Any, **kwargs: Any) -> None:
    """What a probe's hook becomes in a copy of the module: does nothing."""
    return None


def _inert() -> Callable[..., None]:
    return inert_hook


class _SiteHook:
    """A forward (pre-)hook of one site; calls into the recorder while it is alive.

    No ``__slots__``: Dynamo in torch 2.6 and 2.7 breaks the graph where a hook reads a slot
    its base class declares, so a compiled model ran in pieces even on unsampled steps."""

    def __init__(self, recorder: "Target", site: "Site") -> None:
        self._recorder = weakref.ref(recorder)
        self.site = site

    def __reduce__(self):
        return (_inert, ())


class PreHook(_SiteHook):
    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        recorder = self._recorder()
        if recorder is not None and module is self.site.module:
            recorder.enter(self.site, args, kwargs)


class PostHook(_SiteHook):
    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        recorder = self._recorder()
        if recorder is not None and module is self.site.module:
            recorder.leave(self.site, output)


class BeforeForward(_SiteHook):
    """The pre-hook of a site served by a :class:`ForwardWrapper` instead of hooks."""

    def __call__(self, forward: Callable, args: tuple, kwargs: dict) -> Any:
        recorder = self._recorder()
        if recorder is not None:
            recorder.enter(self.site, args, kwargs)
        return forward(*args, **kwargs)


class EagerWhileArmed:
    """Around the root module's forward: while the recorder is armed, the call runs eagerly
    (and the recorder sees the model's input)."""

    __slots__ = ("_recorder",)

    def __init__(self, recorder: "Target") -> None:
        self._recorder = weakref.ref(recorder)

    def __call__(self, forward: Callable, args: tuple, kwargs: dict) -> Any:
        recorder = self._recorder()
        if recorder is not None and recorder.armed:
            return run_eagerly(recorder, forward, args, kwargs)
        return forward(*args, **kwargs)


def _call_through(forward: Callable, args: tuple, kwargs: dict) -> Any:
    return forward(*args, **kwargs)


def _run_eagerly(recorder: "Target", forward: Callable, args: tuple, kwargs: dict) -> Any:
    """``forward(*args, **kwargs)`` without the compiler: Dynamo is disabled for the call (a
    graph break where a compiled caller reaches it) and ``force_eager`` holds for its duration,
    so hooks inside see every kernel. Whatever the call does, the stance is restored and the
    recorder's interception modes opened inside are closed. The recorder sees the model's
    input first (here, where no compiled frame records the side effect)."""
    recorder.model_input(args, kwargs)
    depth = recorder.depth()
    # Dynamo is off inside this function (see below), so the stance may be set here; it
    # makes compiled code called from the forward (compiled blocks) run eagerly too.
    with _set_stance("force_eager") if CAN_FORCE_EAGER else contextlib.nullcontext():
        try:
            return forward(*args, **kwargs)
        finally:
            # Interception modes (and their stances) of forwards that did not return (an
            # interrupt skips the hooks that would have closed them) end with the call that
            # opened them, before its own stance is restored.
            recorder.unwind(depth)


_REASON = (
    "attn_probe runs the forward passes of a sampled step eagerly so that its hooks see the "
    "attention kernels; that needs a graph break at the call of the probed model, which "
    "fullgraph=True forbids. Compile without fullgraph=True, compile the blocks instead of the "
    "whole model, or call the model under torch.compiler.set_stance('force_eager') while "
    "probe.sampling is True."
)

try:
    run_eagerly = torch.compiler.disable(_run_eagerly, reason=_REASON)
except TypeError:  # torch without disable(reason=)
    run_eagerly = torch.compiler.disable(_run_eagerly)


class ForwardWrapper:
    """Stands in ``module.__dict__["forward"]``: ``around(forward, args, kwargs)`` runs each call
    of the module's forward (the class's, or an instance forward that was there before).

    :meth:`remove` puts back what was there; if someone has wrapped this wrapper in turn, it
    stays in their chain but only calls through. Copies of the module (``copy.deepcopy``,
    ``pickle``, ``torch.save``) get the module's own forward back, unmonitored.
    ``inspect.signature(module.forward)`` still gives the forward's signature.
    """

    def __init__(self, module: nn.Module, around: Callable[[Callable, tuple, dict], Any]) -> None:
        self.module = module
        self._previous = module.__dict__.get("forward")
        self.__wrapped__ = module.forward
        self._around = around
        self.removed = False
        module.__dict__["forward"] = self

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._around(self.__wrapped__, args, kwargs)

    def remove(self) -> None:
        if self.removed:
            return
        self.removed = True
        self._around = _call_through
        if self.module.__dict__.get("forward") is self:
            previous = self._previous
            while isinstance(previous, ForwardWrapper) and previous.removed:
                previous = previous._previous
            if previous is None:
                del self.module.__dict__["forward"]
            else:
                self.module.__dict__["forward"] = previous

    def __reduce__(self):
        return (_own_forward, (self.module, self._previous))


def _own_forward(module: nn.Module, previous: Any) -> Any:
    """The forward a copy of a wrapped module gets: (the copy of) what was there before the
    wrapper, else the class's forward bound to the copy."""
    return previous if previous is not None else MethodType(type(module).forward, module)


def release(handles: list) -> None:
    """Remove every hook and wrapper in ``handles`` (newest first) and empty the list."""
    while handles:
        handles.pop().remove()
