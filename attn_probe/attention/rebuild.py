"""What an attention kernel was given, and the attention probabilities rebuilt from it.

Every capture strategy ends here: interception hands over the arguments of
``scaled_dot_product_attention``, adapters recompute q and k from a module's weights. Both become
an :class:`AttentionInputs` (q, k, mask, causality, scale of the measured sequences, over the
whole sequence), and :func:`attention_probabilities` turns them into A = softmax(q·kᵀ·scale +
mask) exactly as the kernel defines it, for the sampled sequences and tokens only. An eager
softmax that interception sees has materialised its scores already: they travel as
:class:`AttentionScores`.

Padding is left out where it is made: a key that no query of a sequence may attend to (per the
mask the kernel received) is padding, and so, in self-attention, is the query at its position.
Each measured sequence's real tokens are moved to the front, in order, and the rest masked: a
left- or right-padded sequence then gives exactly the matrices and figures of the same sequence
run unpadded (masked rows are zero rows, left out of every metric). What the kernel got with
its padding in place is kept beside (``as_given``), for the matrix at input positions
(``probabilities(..., at_input_positions=True)``): row i and column j are positions i and j of
the input, and padding rows and columns are zero.

Cropping to ``crop`` keeps the first T queries. When the mask stops those queries from
seeing any later key (causal attention, sliding windows, left-aligned padding) it keeps the first
T keys too, and the cropped matrix is exactly the attention matrix of the T-token prefix.
Otherwise (bidirectional and cross attention) it keeps *every* key: the matrix is T × S and each
row is the query's whole distribution, summing to 1; the metrics take rectangular matrices.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..options import DEFAULT_MATRIX_BUDGET
from .flex import FlexScoring


@dataclass(frozen=True)
class AttentionInputs:
    """The arguments of one attention kernel call, for the measured sequences only.

    ``query`` (B, H, L, E), ``key`` (B, H_kv, S, E), ``attn_mask`` broadcastable to
    (B, H, L, S) (boolean, True = may attend, or additive), ``is_causal`` (top-left aligned) and
    ``scale`` (None: 1/sqrt(E)), as :func:`torch.nn.functional.scaled_dot_product_attention`
    takes them. Tensors are detached views of the model's own, never copies.
    """

    query: Tensor
    key: Tensor
    attn_mask: Tensor | None = None
    is_causal: bool = False
    scale: float | None = None
    #: (H,) learned per-head sink logits: an extra score column that takes mass but is no key
    sink_logits: Tensor | None = None
    #: (B, S) bool, True at the real tokens, where padding was left out (None: there was none)
    key_padding: Tensor | None = None
    #: where padding was left out: query, key and mask as the kernel got them
    as_given: "AttentionInputs | None" = None
    #: a ``flex_attention`` call's ``score_mod`` and block mask, applied to the scores before
    #: ``attn_mask``; its sequences are measured at their input positions (the modifications
    #: depend on them), keys that no query may see simply take no mass
    flex: FlexScoring | None = None

    @classmethod
    def of(cls, query: Tensor, key: Tensor, *, attn_mask: Tensor | None = None,
           is_causal: bool = False, scale: float | None = None,
           batch_rows: int | None = None,
           flex: FlexScoring | None = None) -> "AttentionInputs":
        """The first ``batch_rows`` sequences of a kernel call's arguments (3-d (B, L, E)
        inputs are one head), their padding left out (see the module docstring)."""
        query, key, attn_mask = _as_heads(query, key, attn_mask)
        n = query.size(0) if batch_rows is None else min(query.size(0), batch_rows)
        query, key = _take_sequences(query.detach(), n), _take_sequences(key.detach(), n)
        if flex is not None:
            if attn_mask is not None or is_causal:
                raise ValueError("a flex_attention call takes its mask from flex, not "
                                 "attn_mask or is_causal")
            return cls(query, key, scale=scale, flex=flex)
        if attn_mask is None:
            return cls(query, key, None, bool(is_causal), scale)
        attn_mask = _blocking_as_inf(_take_sequences(_as_4d(attn_mask.detach()), n))
        given = cls(query, key, attn_mask, bool(is_causal), scale)
        real = real_tokens(may_attend(attn_mask))
        if real is None:
            return given
        real = real.expand(query.size(0), -1)  # a mask shared by every sequence
        attn_mask = _compact(_compact(attn_mask, real, 3, _blocked(attn_mask)),
                             real, 2, _blocked(attn_mask), query.size(2) == key.size(2))
        key = _compact(key, real, 2, 0.0)
        if query.size(2) == real.size(1):  # self-attention: queries are the same tokens
            query = _compact(query, real, 2, 0.0)
        return cls(query, key, attn_mask, bool(is_causal), scale, key_padding=real,
                   as_given=given)

    def _positional(self) -> "AttentionInputs":
        """This call with its padding in place (itself where there was none)."""
        if self.as_given is None:
            return self
        given = self.as_given
        return dataclasses.replace(self, query=given.query, key=given.key,
                                   attn_mask=given.attn_mask, key_padding=None, as_given=None)

    def matrix_shape(self, crop: int | None = None, *,
                     at_input_positions: bool = False) -> tuple[int, int, int, int]:
        """The largest shape :meth:`probabilities` can return (keys are cropped only where
        the crop is exact)."""
        if at_input_positions:
            return self._positional().matrix_shape(crop)
        t = self.query.size(2) if crop is None else min(self.query.size(2), crop)
        return (self.query.size(0), self.query.size(1), t, self.key.size(2))

    def probabilities(self, crop: int | None = None, *,
                      at_input_positions: bool = False) -> Tensor:
        """A (B, H, T, S) in float32, cropped to the first ``crop`` tokens: each
        sequence's real tokens first (padding left out), or ``at_input_positions`` as the
        kernel got them, padding rows and columns zero."""
        if at_input_positions and self.as_given is not None:
            return _zero_padding(self._positional().probabilities(crop), self.key_padding,
                                self.as_given.query.size(2) == self.key_padding.size(1))
        return attention_probabilities(
            self.query, self.key, attn_mask=self.attn_mask, is_causal=self.is_causal,
            scale=self.scale, crop=crop, sink_logits=self.sink_logits,
            flex=self.flex,
        )


@dataclass(frozen=True)
class AttentionScores:
    """An eager attention's own pre-softmax scores and probabilities (B, H, L, S), for the
    measured sequences: where the model materialised them, nothing needs rebuilding."""

    scores: Tensor
    probs: Tensor
    #: (B, H, L) mass of a learned sink logit column the model dropped after its softmax
    sink_mass: Tensor | None = None
    #: (B, S) bool, True at the real tokens, where padding was left out (None: there was none)
    key_padding: Tensor | None = None
    #: where padding was left out: the scores and probabilities as the softmax saw them
    as_given: "AttentionScores | None" = None

    @classmethod
    def of(cls, scores: Tensor, probs: Tensor, *,
           batch_rows: int | None = None) -> "AttentionScores":
        """The first ``batch_rows`` sequences of a softmax over (B, H, L, S) scores, their
        padding left out. A last score column that is one finite value per head, the same for
        every query and sequence, is a learned sink logit, not a key: it is split off into
        :attr:`sink_mass`."""
        scores, probs = scores.detach()[:batch_rows], probs.detach()[:batch_rows]
        sink_mass = None
        if _is_sink_column(scores):
            sink_mass, scores, probs = probs[..., -1], scores[..., :-1], probs[..., :-1]
        given = cls(scores, probs, sink_mass)
        real = real_tokens(may_attend(scores))
        if real is None:
            return given
        self_attention = scores.size(2) == real.size(1)
        scores = _compact(_compact(scores, real, 3, -math.inf), real, 2, -math.inf,
                          self_attention)
        probs = _compact(_compact(probs, real, 3, 0.0), real, 2, 0.0, self_attention)
        if sink_mass is not None:
            sink_mass = _compact(sink_mass, real, 2, 0.0, self_attention)
        return cls(scores, probs, sink_mass, key_padding=real, as_given=given)

    def matrix_shape(self, crop: int | None = None, *,
                     at_input_positions: bool = False) -> tuple[int, int, int, int]:
        """The largest shape :meth:`probabilities` can return."""
        if at_input_positions and self.as_given is not None:
            return self.as_given.matrix_shape(crop)
        b, h, length, keys = self.scores.shape
        return (b, h, length if crop is None else min(length, crop), keys)

    def probabilities(self, crop: int | None = None, *,
                      at_input_positions: bool = False) -> Tensor:
        """A (B, H, T, S) in float32 over the first ``crop`` queries (and keys, where the
        crop is exact): each sequence's real tokens first (padding left out), or
        ``at_input_positions`` as the softmax saw them, padding rows and columns zero. A query
        whose every key is masked (NaN out of softmax) becomes a row of zeros."""
        if at_input_positions and self.as_given is not None:
            return _zero_padding(self.as_given.probabilities(crop), self.key_padding,
                                self.as_given.scores.size(2) == self.key_padding.size(1))
        t = self.scores.size(2) if crop is None else min(crop, self.scores.size(2))
        allowed = may_attend(self.scores[:, :, :t])
        s = self.scores.size(-1) if bool(allowed[..., t:].any()) else t
        attention = self.probs[:, :, :t, :s].to(torch.float32, copy=True)
        return attention.masked_fill_(~allowed[..., :s].any(dim=-1, keepdim=True), 0.0)



def probabilities(observed: "AttentionInputs | AttentionScores | Tensor",
                  crop: int | None = None,
                  matrix_budget: int | None = DEFAULT_MATRIX_BUDGET, *,
                  at_input_positions: bool = False) -> Tensor:
    """A (B, H, T, S) float32 from whatever the recorder observed (a user adapter may hand
    over A itself, already cropped): each sequence's real tokens first, padding left out (what
    the figures measure), or ``at_input_positions``: row i and column j are positions i and j
    of the input, padding rows and columns zero. Raises ``MemoryError`` saying what to do,
    before anything is allocated, when the matrix would take more than ``matrix_budget`` bytes
    (None: no bound)."""
    if isinstance(observed, Tensor):
        return observed
    if matrix_budget is not None:
        shape = observed.matrix_shape(crop, at_input_positions=at_input_positions)
        size = 4 * math.prod(shape)
        if size > matrix_budget:
            raise MemoryError(
                f"the attention matrix would be {tuple(shape)} float32, {size / 2**20:,.0f} MiB, "
                f"over matrix_budget={matrix_budget / 2**20:,.0f} MiB: crop it with "
                "CaptureOptions(crop=...) or batch_rows=, or raise matrix_budget (the *_full "
                "figures and max_logit need no matrix and cover every token anyway)"
            )
    return observed.probabilities(crop, at_input_positions=at_input_positions)


def _zero_padding(attention: Tensor, key_padding: Tensor, self_attention: bool) -> Tensor:
    """(B, H, T, S) ``attention`` at input positions with the columns of the padded keys
    (``key_padding`` (B, S) False) and, in self-attention, the rows of the padded queries set
    to zero (in place)."""
    t, s = attention.shape[-2:]
    attention.masked_fill_(~key_padding[:, None, None, :s], 0.0)
    if self_attention:
        attention.masked_fill_(~key_padding[:, None, :t, None], 0.0)
    return attention


#: An additive mask entry at or below this blocks its key: -inf, ``finfo.min`` and the -10000
#: of older models all take no mass in float32 softmax next to an allowed key.
_BLOCKING = -1e4


def may_attend(mask: Tensor) -> Tensor:
    """Boolean "may attend" of a boolean mask, an additive mask or a score tensor."""
    return mask if mask.dtype == torch.bool else mask > _BLOCKING


def _blocking_as_inf(mask: Tensor) -> Tensor:
    """An additive mask whose blocking entries (``finfo.min``, -10000) are ``-inf``, so that
    every figure counts the keys a query may attend to as the softmax does (transformers 4
    hands SDPA such masks); a boolean mask, or one without such entries, as it is."""
    if mask.dtype == torch.bool:
        return mask
    finite_block = torch.isfinite(mask) & ~may_attend(mask)
    return mask.masked_fill(finite_block, -math.inf) if bool(finite_block.any()) else mask


def _blocked(mask: Tensor) -> bool | float:
    """The value that blocks a key in ``mask``'s kind of mask."""
    return False if mask.dtype == torch.bool else -math.inf


def real_tokens(allowed: Tensor) -> Tensor | None:
    """(B, S) bool: the keys that some query of some head may attend to, per sequence (False:
    padding); None when every key is such a key."""
    real = allowed.any(dim=2).any(dim=1)
    return None if bool(real.all()) else real


def _compact(t: Tensor, real: Tensor, dim: int, fill, apply: bool = True) -> Tensor:
    """``t`` with, per sequence, the positions ``real`` marks along ``dim`` moved to the front in
    order and the others set to ``fill`` (trailing positions no sequence needs are dropped)."""
    if not apply:
        return t
    batch, length = real.size(0), int(real.sum(dim=1).max())
    order = torch.argsort((~real).to(torch.int8), dim=1, stable=True)[:, :length]
    valid = real.gather(1, order)
    shape = [batch] + [1] * (t.dim() - 1)
    shape[dim] = length
    sizes = list(t.shape)
    sizes[0], sizes[dim] = batch, real.size(1)  # a mask broadcast over sequences or queries
    t = t.expand(sizes)
    index = order.view(shape).expand(*t.shape[:dim], length, *t.shape[dim + 1:])
    return t.gather(dim, index).masked_fill(~valid.view(shape), fill)


def _is_sink_column(scores: Tensor) -> bool:
    """Whether the last column of (B, H, L, S) scores is a learned sink logit: one finite value
    per head, the same for every query and sequence (no key's scores look like that)."""
    if scores.size(-1) < 2 or scores.size(2) < 2:
        return False
    last = scores[..., -1]
    first = last[:1, :, :1]
    return bool(torch.isfinite(first).all() and (first > _BLOCKING).all()
                and (last == first).all())


def _as_heads(query: Tensor, key: Tensor, attn_mask: Tensor | None
              ) -> tuple[Tensor, Tensor, Tensor | None]:
    """SDPA's arguments with a heads dimension: 3-d (B, L, E) inputs are one head (and a
    (B, L, S) mask is per sequence); anything else but 4-d is a ``ValueError``."""
    if query.dim() == 3:
        query, key = query.unsqueeze(1), key.unsqueeze(1)
        if attn_mask is not None and attn_mask.dim() == 3:
            attn_mask = attn_mask.unsqueeze(1)
    if query.dim() != 4 or key.dim() != 4:
        raise ValueError(
            f"expected query (B, H, L, E) and key (B, H_kv, S, E), got {tuple(query.shape)} "
            f"and {tuple(key.shape)}"
        )
    return query, key, attn_mask


def _as_4d(mask: Tensor) -> Tensor:
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    return mask


def _take_sequences(t: Tensor, n: int) -> Tensor:
    return t[:n] if t.size(0) > n else t


def _sees_beyond(mask: Tensor | None, t: int, s: int) -> bool:
    """Whether any of the first ``t`` queries may attend to a key at position >= ``t``."""
    if t >= s:
        return False
    if mask is None:
        return True
    tail = mask[..., :t, t:]
    if mask.dtype == torch.bool:
        return bool(tail.any())
    return bool((tail > -math.inf).any())


def attention_probabilities(
    query: Tensor,
    key: Tensor,
    *,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    batch_rows: int | None = None,
    crop: int | None = None,
    sink_logits: Tensor | None = None,
    flex: FlexScoring | None = None,
) -> Tensor:
    """Rebuild A (B, H, T, S) in float32 from the inputs of an SDPA call.

    Follows ``torch.nn.functional.scaled_dot_product_attention``: ``query`` (B, H, L, E),
    ``key`` (B, H_kv, S, E) with H a multiple of H_kv (grouped-query heads are expanded to the
    query heads), ``attn_mask`` broadcastable to (B, H, L, S), boolean (True = may attend) or
    additive, ``is_causal`` aligned to the top-left corner, ``scale`` defaulting to 1/sqrt(E).
    Only the first ``batch_rows`` sequences and ``crop`` queries are materialised, and
    keys beyond the first ``crop`` only where those queries can see them (see the module
    docstring). Queries that may attend to no key at all get a row of zeros, not NaN.
    ``sink_logits`` (H,): learned per-head sink logits, an extra score column that takes mass
    in the softmax and is dropped after it (rows then sum to less than 1). ``flex``: the
    ``score_mod`` and block mask of a ``flex_attention`` call, applied to the scaled scores
    first.
    """
    query, key, attn_mask = _as_heads(query, key, attn_mask)
    n = query.size(0) if batch_rows is None else min(query.size(0), batch_rows)
    heads, kv_heads = query.size(1), key.size(1)
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads cannot share {kv_heads} key heads evenly")
    length, keys = query.size(2), key.size(2)
    t = length if crop is None else min(length, crop)

    with torch.no_grad(), torch.autocast(query.device.type, enabled=False):
        q = _take_sequences(query.detach(), n)[:, :, :t].float()
        k = _take_sequences(key.detach(), n)
        mask = None
        if attn_mask is not None:
            mask = _take_sequences(_as_4d(attn_mask.detach()), n)[..., :t, :]
        if is_causal:
            causal = torch.ones(t, keys, dtype=torch.bool, device=q.device).tril()
            mask = causal if mask is None else _combine(mask, causal)
        s = keys if flex is not None or _sees_beyond(mask, t, keys) else min(keys, t)
        k = k[:, :, :s].float()
        if kv_heads != heads:
            k = k.repeat_interleave(heads // kv_heads, dim=1)
        scores = torch.matmul(q, k.transpose(-2, -1))
        scores.mul_(1.0 / math.sqrt(q.size(-1)) if scale is None else scale)
        if flex is not None:
            allowed = torch.stack([flex.apply(scores[i], i, 0, 0, 0)
                                   for i in range(scores.size(0))])
            scores.masked_fill_(~allowed, -math.inf)
            if t < keys and not bool(allowed[..., t:].any()):  # the crop of the prefix is exact
                s = t
                scores = scores[..., :s]
        if mask is not None:
            mask = mask[..., :s]
            if mask.dtype == torch.bool:
                scores.masked_fill_(~mask, -math.inf)
            else:
                scores.add_(mask.float())
        blocked = torch.isneginf(scores).all(dim=-1, keepdim=True)
        if sink_logits is not None:
            sink = sink_logits.detach().float().view(1, -1, 1, 1).expand(*scores.shape[:3], 1)
            scores = torch.cat([scores, sink], dim=-1)
        probs = torch.softmax(scores, dim=-1)[..., :s].masked_fill_(blocked, 0.0)
        return probs


def _combine(mask: Tensor, causal: Tensor) -> Tensor:
    if mask.dtype == torch.bool:
        return mask & causal
    return torch.where(causal, mask.float(), -math.inf)
