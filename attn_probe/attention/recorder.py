"""Hooks that turn the forward passes of monitored modules into attention matrices while armed.

Each monitored module (a *site*) is served by one strategy, chosen once when hooks are attached:

* interception: while the module's forward runs, a ``TorchFunctionMode`` watches its calls to
  ``scaled_dot_product_attention``, ``flex_attention`` (its ``score_mod`` and block mask with
  them, see :mod:`.flex`) and eager ``softmax`` over a (B, H, T, S) score tensor, lets the kernel
  run untouched, and rebuilds A from exactly the q, k and mask it was given. The forward runs
  under ``torch.compiler.set_stance("force_eager")`` meanwhile: compiled code inside it (a
  compiled ``flex_attention``, which also compiles itself when called eagerly) runs eagerly, so
  Dynamo never traces the mode;
* an adapter (see :mod:`.adapters`) recomputes q and k from the module's input and weights,
  before the forward, without touching how it runs. Modules that leave their fused fast path
  when they carry a hook (``nn.TransformerEncoderLayer``) get a removable wrapper around the
  instance's forward instead of hooks.

Unarmed, every hook returns at once. Armed, each site is measured on its first forward call and
left alone afterwards, so gradient accumulation, evaluation passes or activation recomputation
in the same step are not counted twice; and when the recorder is given the model's ``root``,
the root's forward calls run eagerly while armed (compiled code would hide the kernels).

Every hook, wrapper and mode is owned by the recorder and scoped (see :mod:`.hooks`): the hooks
reach the recorder through weak references, :meth:`detach` removes them (also when a forward
raised), and so does the recorder's garbage collection when nobody detached it; an eager call
and the interception modes opened inside it end with that call; copies of the model are not
monitored.
"""

from __future__ import annotations

import sys
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

from . import hooks
from .adapters import find_adapter
from .flex import FlexScoring, is_flex_call
from .rebuild import AttentionInputs, AttentionScores
from .sites import CaptureError, NoKernelCall, Site

_SDPA = F.scaled_dot_product_attention
_SOFTMAX = (F.softmax, torch.softmax, Tensor.softmax)
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")

@dataclass
class _Frame:
    """One armed forward call of an intercepting site."""

    site: Site
    args: tuple
    kwargs: dict
    mode: TorchFunctionMode | None = None
    #: the ``force_eager`` stance held while the forward runs (None: none was set)
    stance: Any = None
    attention: Tensor | None = None
    error: BaseException | None = field(default=None)


class _Interceptor(TorchFunctionMode):
    def __init__(self, recorder: "Recorder", frame: _Frame):
        super().__init__()
        self.recorder, self.frame = recorder, frame

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if (
            self.frame.attention is None
            and self.frame.error is None
            and (func is _SDPA or func in _SOFTMAX or is_flex_call(func))
            and self.recorder._stack[-1] is self.frame  # the innermost monitored module's call
        ):
            try:
                self.frame.attention = self.recorder._from_call(func, args, kwargs, out)
            except Exception as error:  # never let measuring break the model's forward
                self.frame.error = error
        return out


#: What the recorder hands on for one site and pass: the kernel's inputs, an eager softmax's own
#: scores and probabilities, or the probabilities a user adapter returned.
Observed = AttentionInputs | AttentionScores | Tensor


class Recorder:
    """Owns the hooks on the sites; calls ``on_attention(name, observed)`` once per site per
    armed pass, with the :data:`Observed` attention of the first ``batch_rows`` sequences."""

    def __init__(
        self,
        sites: list[Site],
        on_attention: Callable[[str, Observed], None],
        *,
        batch_rows: int | None = None,
        crop: int | None = None,
        strict: bool = True,
        root: nn.Module | None = None,
    ) -> None:
        self.sites, self.on_attention = sites, on_attention
        self.batch_rows, self.crop, self.strict = batch_rows, crop, strict
        self.root = root  #: its forward calls run eagerly while armed (None: no eager forcing)
        #: rows of the model's input batch in the armed pass (None: not known)
        self.input_rows: int | None = None
        self.armed = False
        self.calls: dict[str, int] = {}
        self._done: set[str] = set()
        self._stack: list[_Frame] = []
        self._handles: list[RemovableHandle | hooks.ForwardWrapper] = []
        self._release: weakref.finalize | None = None
        self._warned: set[str] = set()

    # lifecycle ---------------------------------------------------------------------------
    def attach(self) -> None:
        if self._handles:
            return
        # Removes everything below when detach() runs, or when this recorder is collected
        # without detach (hooks hold it weakly, so the model never keeps it alive).
        self._release = weakref.finalize(self, hooks.release, self._handles)
        self._release.atexit = False
        try:
            for site in self.sites:
                if site.wraps_forward:
                    self._handles.append(
                        hooks.ForwardWrapper(site.module, hooks.BeforeForward(self, site))
                    )
                    continue
                module = site.module
                self._handles.append(
                    module.register_forward_pre_hook(hooks.PreHook(self, site), with_kwargs=True)
                )
                self._handles.append(
                    module.register_forward_hook(
                        hooks.PostHook(self, site), with_kwargs=True, always_call=True,
                        prepend=True,
                    )
                )
            if self.root is not None and hooks.CAN_FORCE_EAGER:
                self._handles.append(
                    hooks.ForwardWrapper(self.root, hooks.EagerWhileArmed(self))
                )
        except BaseException:
            self.detach()
            raise

    def detach(self) -> None:
        self.unwind(0)  # a forward interrupted mid-way: leave no mode behind
        if self._release is not None:
            self._release()  # hooks.release(self._handles), once
            self._release = None
        self.armed = False

    def depth(self) -> int:
        """How many site forwards are running, one inside the other."""
        return len(self._stack)

    def unwind(self, depth: int) -> None:
        """Close the interception modes opened above ``depth`` (innermost first)."""
        while len(self._stack) > depth:
            self._close(self._stack.pop())

    @staticmethod
    def _close(frame: _Frame) -> None:
        # The mode refers to its frame: drop it, so that no cycle keeps this recorder alive
        # after its owner let go of it.
        mode, frame.mode = frame.mode, None
        mode.__exit__(None, None, None)
        stance, frame.stance = frame.stance, None
        if stance is not None:
            stance.__exit__(None, None, None)

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def arm(self) -> None:
        """Measure each site's next forward call."""
        self._done.clear()
        self.input_rows = None
        self.armed = True

    def disarm(self) -> None:
        self.armed = False

    @property
    def pending(self) -> bool:
        """Armed and some site not measured yet."""
        return self.armed and len(self._done) < len(self.sites)

    # hooks -------------------------------------------------------------------------------
    def enter(self, site: Site, args: tuple, kwargs: dict) -> None:
        """A site's forward starts: count it, and measure it if armed and not done yet."""
        if not self.armed:
            return
        self.calls[site.name] = self.calls.get(site.name, 0) + 1
        if site.name in self._done:
            return
        if not site.intercept:
            self._deliver(site, lambda: self._adapt(site, args, kwargs))
            return
        frame = _Frame(site, args, kwargs)
        frame.stance = hooks.enter_eager_stance()
        frame.mode = _Interceptor(self, frame)
        frame.mode.__enter__()
        self._stack.append(frame)

    def leave(self, site: Site, output: Any) -> None:
        """A site's forward returned (or raised): deliver what it was seen to compute."""
        if not self._stack or self._stack[-1].site is not site:
            return
        frame = self._stack.pop()
        self._close(frame)
        if output is None and sys.exc_info()[1] is not None:
            # The forward raised (hooks with always_call run from its exception handler): leave
            # the site pending and let the model's own error through.
            return
        if frame.error is not None:
            self._deliver(site, lambda: _raise(frame.error))
        elif frame.attention is not None:
            self._deliver(site, lambda: frame.attention)
        elif site.adapter is not None:
            self._deliver(site, lambda: self._adapt(site, frame.args, frame.kwargs))
        else:
            self._deliver(site, lambda: _raise(_no_kernel_call(site)))

    # rebuilding --------------------------------------------------------------------------
    def model_input(self, args: tuple, kwargs: dict) -> None:
        """Note the batch size of the model's input: token ids ``(B, T)`` or images
        ``(B, C, H, W)``, the first tensor argument (other layouts, such as sequence-first
        ``(T, B, E)``, say nothing about the batch)."""
        first = next((a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)), None)
        self.input_rows = int(first.size(0)) if first is not None and first.dim() in (2, 4) \
            else None

    def rows(self, batch: int) -> int | None:
        """How many rows of a kernel call's ``batch`` hold the first ``batch_rows`` rows of
        the model's input: the same number, or, when the kernel's batch is ``k`` times the
        input's (windowed attention such as Swin splits each image into ``k`` windows, in
        order), ``k`` times as many: every window of the first images."""
        if self.batch_rows is None:
            return None
        inputs = self.input_rows
        if inputs and batch > inputs and batch % inputs == 0:
            return self.batch_rows * (batch // inputs)
        return self.batch_rows

    def _adapt(self, site: Site, args: tuple, kwargs: dict) -> Observed:
        # Under the caller's autocast, as the module's own projections run: q and k come out in
        # the precision the model used (rebuild then works in float32). Which dimension of a
        # module's input is its batch is the adapter's to know: rows are the model's.
        with torch.no_grad():
            return site.adapter.fn(
                site.module, args, kwargs,
                batch_rows=self.batch_rows, crop=self.crop,
            )

    def _from_call(self, func, args: tuple, kwargs: dict, out: Any) -> Observed | None:
        if func is _SDPA:
            bound = dict(zip(_SDPA_ARGS, args), **kwargs)
            n = self.rows(int(bound["query"].size(0)))
            return AttentionInputs.of(
                bound["query"], bound["key"], attn_mask=bound.get("attn_mask"),
                is_causal=bool(bound.get("is_causal", False)), scale=bound.get("scale"),
                batch_rows=n,
            )
        if is_flex_call(func):  # (query, key, value, score_mod, block mask tuple, scale, ...)
            query, key, _, score_mod, block_mask, scale = args[:6]
            return AttentionInputs.of(query, key, scale=float(scale),
                                      batch_rows=self.rows(int(query.size(0))),
                                      flex=FlexScoring.of_call(score_mod, block_mask))
        scores = args[0] if args else kwargs.get("input")
        dim = args[1] if len(args) > 1 else kwargs.get("dim")
        if not isinstance(out, Tensor) or scores.dim() != 4 or dim not in (-1, 3):
            return None  # a softmax that is not over attention scores
        return AttentionScores.of(scores, out, batch_rows=self.rows(int(scores.size(0))))

    def _deliver(self, site: Site, make: Callable[[], Observed]) -> None:
        self._done.add(site.name)
        try:
            observed = make()
            if isinstance(observed, Tensor) and observed.dim() != 4:
                raise CaptureError(
                    f"rebuilt attention of {site.name!r} has shape {tuple(observed.shape)}, "
                    "expected (B, H, T, S)"
                )
            if not isinstance(observed, (AttentionInputs, AttentionScores, Tensor)):
                raise CaptureError(
                    f"the adapter of {site.name!r} returned {type(observed).__name__}; an "
                    "adapter returns AttentionInputs or the probabilities (B, H, T, S)"
                )
        except Exception as error:
            if self.strict:
                raise
            if site.name not in self._warned:
                self._warned.add(site.name)
                warnings.warn(f"attn_probe: not measuring {site.name!r}: {error}", stacklevel=3)
            return
        self.on_attention(site.name, observed)


def _no_kernel_call(site: Site) -> CaptureError:
    cls = type(site.module).__name__
    if find_adapter(site.module) is not None:
        return CaptureError(
            f"module {site.name!r} ({cls}) made no call to scaled_dot_product_attention or "
            "softmax that could be intercepted, and strategy='intercept' leaves out the adapter "
            "that serves it: use strategy='auto' or 'adapter'"
        )
    return NoKernelCall(site.name, site.module)


def _raise(error: BaseException):
    raise error

