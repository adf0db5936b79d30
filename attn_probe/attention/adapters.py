"""Adapters: rebuild what a module's attention kernel gets from its input and its own weights.

An adapter is ``fn(module, args, kwargs, *, batch_rows, crop)``, called with the
positional and keyword arguments of the module's forward before it runs. It recomputes q and k
the way the module does and returns them as an
:class:`~attn_probe.attention.rebuild.AttentionInputs` for the first ``batch_rows`` sequences
and every token (the full-context statistics stream over the whole sequence; the matrix is
cropped to ``crop`` later). An adapter may also return the probabilities A (B, H, T, S)
itself, e.g. from :func:`~attn_probe.attention.rebuild.attention_probabilities` with
``crop``: then only the figures of the matrix are measured. Adapters serve modules whose
kernel cannot be intercepted (``flex_attention``, fused or custom kernels) or would be disturbed
by interception (``nn.MultiheadAttention``'s fused fast path).

Register your own with :func:`register_adapter`::

    def my_adapter(module, args, kwargs, *, batch_rows, crop):
        x = (args[0] if args else kwargs["x"])[:batch_rows]       # (B, T, C)
        B, T, _ = x.shape
        q = module.wq(x).view(B, T, module.n_heads, -1).transpose(1, 2)
        k = module.wk(x).view(B, T, module.n_heads, -1).transpose(1, 2)
        return AttentionInputs.of(q, k, is_causal=True)

    attn_probe.register_adapter(MyAttention, my_adapter)
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .flex import FlexScoring
from .rebuild import AttentionInputs


class Adapter(Protocol):
    def __call__(
        self,
        module: nn.Module,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        batch_rows: int | None,
        crop: int | None,
    ) -> AttentionInputs | Tensor: ...


@dataclass(frozen=True)
class AdapterEntry:
    name: str
    matches: Callable[[nn.Module], bool]
    fn: Adapter
    #: True: used instead of interception. False: used only when interception saw no kernel call.
    primary: bool
    #: True for modules that leave their fused fast path when any hook is attached to them: the
    #: adapter then runs from a wrapper around the instance's forward instead of a hook.
    hookless: bool = False


_USER_ADAPTERS: dict[type, Adapter] = {}


class AdapterHandle:
    """Returned by :func:`register_adapter`; :meth:`remove` takes the registration back (like
    PyTorch's ``RemovableHandle``), also as a context manager."""

    def __init__(self, module_class: type, fn: Adapter) -> None:
        self.module_class, self.fn = module_class, fn

    def remove(self) -> None:
        if _USER_ADAPTERS.get(self.module_class) is self.fn:
            del _USER_ADAPTERS[self.module_class]

    def __enter__(self) -> "AdapterHandle":
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def register_adapter(module_class: type, fn: Adapter, *, replace: bool = False) -> AdapterHandle:
    """Rebuild attention for every ``module_class`` instance with ``fn``.

    Registered adapters take precedence over interception and over the built-in adapters, and
    such modules are found by discovery without further configuration. A class has at most one
    adapter: registering a second raises ``ValueError`` unless ``replace=True``. Returns a
    handle whose ``remove()`` unregisters it.
    """
    if not isinstance(module_class, type) or not issubclass(module_class, nn.Module):
        raise TypeError(f"register_adapter expects an nn.Module subclass, got {module_class!r}")
    if not callable(fn):
        raise TypeError(f"adapter for {module_class.__name__} must be callable, got {fn!r}")
    if module_class in _USER_ADAPTERS and not replace:
        raise ValueError(
            f"{module_class.__name__} already has an adapter "
            f"({getattr(_USER_ADAPTERS[module_class], '__name__', 'registered earlier')}); "
            "pass replace=True to replace it, or remove() the handle of the first"
        )
    _USER_ADAPTERS[module_class] = fn
    return AdapterHandle(module_class, fn)


def _argument(module: nn.Module, args: tuple, kwargs: dict, name: str, default: Any = None):
    """The value the forward received for parameter ``name``, positionally or by keyword."""
    if name in kwargs:
        return kwargs[name]
    params = list(inspect.signature(module.forward).parameters)
    if name in params and params.index(name) < len(args):
        return args[params.index(name)]
    return default


def _first_tensor(args: tuple, kwargs: dict) -> Tensor:
    for value in (*args, *kwargs.values()):
        if isinstance(value, Tensor):
            return value
    raise ValueError("the module's forward received no tensor input")


# nanoGPT: one Linear `c_attn` makes q, k, v; causal; `n_head` heads.
def _is_nanogpt(module: nn.Module) -> bool:
    return isinstance(getattr(module, "c_attn", None), nn.Linear) and hasattr(module, "n_head")


def nanogpt_adapter(module, args, kwargs, *, batch_rows, crop) -> AttentionInputs:
    x = _first_tensor(args, kwargs)[:batch_rows]
    b, t, c = x.shape
    heads = module.n_head
    weight, bias = module.c_attn.weight[: 2 * c], module.c_attn.bias
    qk = F.linear(x, weight, None if bias is None else bias[: 2 * c])
    q, k = qk.view(b, t, 2, heads, c // heads).permute(2, 0, 3, 1, 4)
    return AttentionInputs.of(q, k, is_causal=True)


# modded-nanogpt: merged (4 or 3, H*D, dim) parameter, q/k RMS norm, rotary, flex_attention.
def _merged_weight(module: nn.Module) -> Tensor | None:
    for name in ("qkvo_w", "qkv_w"):
        weight = getattr(module, name, None)
        if isinstance(weight, Tensor) and weight.dim() == 3:
            return weight
    return None


def _is_merged_qkv(module: nn.Module) -> bool:
    return _merged_weight(module) is not None


def merged_qkv_adapter(module, args, kwargs, *, batch_rows, crop) -> AttentionInputs:
    """q, k from ``qkvo_w[0:2]``, RMS-normed over the head dim, rotated by ``module.rotary``.

    The mask is a ``BlockMask`` argument of the forward, applied as ``flex_attention`` applies
    it (see :mod:`.flex`) block by block; without one, attention is taken to be causal. The
    scale is ``module.attn_scale`` when the module has one, else 1/sqrt(head_dim).
    """
    from torch.nn.attention.flex_attention import BlockMask

    weight = _merged_weight(module)
    block_mask = next(
        (v for v in (*args, *kwargs.values()) if isinstance(v, BlockMask)), None
    )
    x = _first_tensor(args, kwargs)[:batch_rows]
    b, t, _ = x.shape
    heads = int(getattr(module, "num_heads", getattr(module, "n_head", 0)))
    if heads <= 0:
        raise ValueError(f"{type(module).__name__} has no num_heads attribute to split heads by")
    q, k = F.linear(x, weight[:2].flatten(0, 1).type_as(x)).view(b, t, 2, heads, -1).unbind(2)
    q, k = F.rms_norm(q, (q.size(-1),)), F.rms_norm(k, (k.size(-1),))
    rotary = getattr(module, "rotary", None)
    if rotary is not None:
        q, k = rotary(q), rotary(k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    scale = getattr(module, "attn_scale", None)
    if block_mask is None:
        return AttentionInputs.of(q, k, is_causal=True, scale=scale)
    return AttentionInputs.of(q, k, scale=scale, flex=FlexScoring.of_call(None, block_mask))


# torch.nn.MultiheadAttention, including its fused fast path (which interception cannot see).
def multihead_attention_adapter(
    module: nn.MultiheadAttention, args, kwargs, *, batch_rows, crop
) -> AttentionInputs:
    if module.bias_k is not None or module.add_zero_attn:
        raise NotImplementedError(
            "nn.MultiheadAttention with add_bias_kv or add_zero_attn is not supported; "
            "register an adapter for it with attn_probe.register_adapter"
        )
    query = _argument(module, args, kwargs, "query")
    key = _argument(module, args, kwargs, "key", query)
    attn_mask = _argument(module, args, kwargs, "attn_mask")
    padding = _argument(module, args, kwargs, "key_padding_mask")
    is_causal = bool(_argument(module, args, kwargs, "is_causal", False))
    return _mha_inputs(module, query, key, attn_mask, padding, is_causal, batch_rows)


def _mha_inputs(
    module: nn.MultiheadAttention,
    query: Tensor,
    key: Tensor,
    attn_mask: Tensor | None,
    padding: Tensor | None,
    is_causal: bool,
    batch_rows: int | None,
) -> AttentionInputs:
    if query.dim() == 2:  # unbatched (L, E)
        query, key = query.unsqueeze(0), key.unsqueeze(0)
        padding = None if padding is None else padding.unsqueeze(0)
    elif not module.batch_first:
        query, key = query.transpose(0, 1), key.transpose(0, 1)
    b, length, e = query.shape
    heads = module.num_heads
    if module._qkv_same_embed_dim:
        w_q, w_k = module.in_proj_weight[:e], module.in_proj_weight[e : 2 * e]
    else:
        w_q, w_k = module.q_proj_weight, module.k_proj_weight
    bias = module.in_proj_bias
    b_q, b_k = (None, None) if bias is None else (bias[:e], bias[e : 2 * e])
    n = b if batch_rows is None else min(b, batch_rows)
    q = F.linear(query[:n], w_q, b_q).view(n, length, heads, -1).transpose(1, 2)
    k = F.linear(key[:n], w_k, b_k).view(n, key.size(1), heads, -1).transpose(1, 2)

    # One additive mask in SDPA's layout; MultiheadAttention's boolean masks mean "blocked".
    mask = None
    if attn_mask is not None:
        mask = _additive(attn_mask, q.dtype)
        mask = mask.view(b, heads, length, -1)[:n] if mask.dim() == 3 else mask
    if padding is not None:
        pad = _additive(padding[:n], q.dtype).view(n, 1, 1, -1)
        mask = pad if mask is None else mask + pad
    if is_causal and mask is None:
        return AttentionInputs.of(q, k, is_causal=True)
    return AttentionInputs.of(q, k, attn_mask=mask)


def _additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
            mask, -math.inf
        )
    return mask.to(dtype)


# nn.TransformerEncoderLayer: its eval fast path never calls self_attn, so the layer itself is
# the site and the adapter recomputes what self_attn would see. The fast path is skipped when a
# hook is attached to the layer or any of its submodules, hence ``hookless``.
def encoder_layer_adapter(
    module: nn.TransformerEncoderLayer, args, kwargs, *, batch_rows, crop
) -> AttentionInputs:
    src = _argument(module, args, kwargs, "src")
    mask = _argument(module, args, kwargs, "src_mask")
    padding = _argument(module, args, kwargs, "src_key_padding_mask")
    is_causal = bool(_argument(module, args, kwargs, "is_causal", False))
    if src.is_nested:
        # nn.TransformerEncoder's fast path packs right-padded sequences into a nested tensor
        # and drops the padding mask; rebuild both (rows of padding queries are meaningless).
        lengths = torch.tensor([row.size(0) for row in src.unbind()], device=src.device)
        src = src.to_padded_tensor(0.0)
        padding = torch.arange(src.size(1), device=src.device) >= lengths.unsqueeze(1)
    x = module.norm1(src) if module.norm_first else src
    return _mha_inputs(module.self_attn, x, x, mask, padding, is_causal, batch_rows)


BUILTIN_ADAPTERS: tuple[AdapterEntry, ...] = (
    AdapterEntry(
        "transformer-encoder-layer",
        lambda m: isinstance(m, nn.TransformerEncoderLayer),
        encoder_layer_adapter,
        primary=True,
        hookless=True,
    ),
    AdapterEntry(
        "multihead-attention",
        lambda m: isinstance(m, nn.MultiheadAttention),
        multihead_attention_adapter,
        primary=True,
    ),
    AdapterEntry("merged-qkvo", _is_merged_qkv, merged_qkv_adapter, primary=True),
    AdapterEntry("nanogpt-c_attn", _is_nanogpt, nanogpt_adapter, primary=False),
)


def find_adapter(module: nn.Module) -> AdapterEntry | None:
    """The adapter serving ``module``: a registered one (most specific class first), else a
    built-in one, else None."""
    for cls in type(module).__mro__:
        if cls in _USER_ADAPTERS:
            fn = _USER_ADAPTERS[cls]
            return AdapterEntry(f"registered:{cls.__name__}", lambda m: True, fn, primary=True)
    for entry in BUILTIN_ADAPTERS:
        if entry.matches(module):
            return entry
    return None
