"""Full-sequence attention statistics in one streaming pass, without the ``T x T`` matrix.

``full_context_stats`` takes what a ``scaled_dot_product_attention`` call receives (query, key,
mask, causality, scale) and returns per ``(sequence, head)`` figures over *every* query and key
of the sequence, holding only a block of query rows at a time.

Math
----
For a block of query rows the pass forms the scores ``S = (scale * q) k^T + mask`` over the
keys the block may see, then, per row ``i`` (``j`` runs over the keys the row may attend to):

* ``m_i = max_j S_ij`` and ``S'_ij = S_ij - m_i`` (so ``exp`` never overflows),
* ``P_ij = exp(S'_ij)``, ``z_i = sum_j P_ij``, ``lse_i = m_i + log z_i``,
  ``A_ij = P_ij / z_i = exp(S_ij - lse_i)``,
* entropy ``H_i = -sum_j A_ij log A_ij = log z_i - (sum_j P_ij S'_ij) / z_i`` (nats),
* sink ``A_i0``, the attention on key 0,
* column squared masses ``c_j += sum_i A_ij^2 = sum_i P_ij^2 / z_i^2`` (a matrix-vector
  product of the squared block with the weights ``1 / z_i^2``).

After the last block: ``columns`` is the fewest columns whose sorted masses reach ``tau`` of
``sum_j c_j``, ``dominant`` is ``argmax_j c_j`` (ties: lowest index; ``dominant == 0`` is
first-key dominance), ``max_logit`` the largest allowed score, and the per-row figures are
averaged over the measured rows.

The logit figures.  ``max_logit = max_ij S_ij`` is what QK-Clip clips, but softmax ignores a
constant added to all of a query's scores (a key bias contributes exactly that: ``q_i . b``), so
it can be large while the attention is uniform.  ``logit_spread = max_i (m_i - mean_j S_ij)``,
the largest amount by which a query's top score stands above the mean of its allowed scores,
does not move with such a constant: it is the logit figure tied to what softmax does.  What
makes it large: with the keys centred on their
mean ``k̄`` (per key head, over the real keys), ``S_ij - mean_j S_ij ~ (scale q_i) . (k_j - k̄)``,
so ``logit_spread = query_norm * key_norm * alignment`` exactly, where ``query_norm`` is the
root-mean-square norm of the scaled queries ``scale * q_i`` over the measured rows,
``key_norm`` that of the centred keys ``k_j - k̄``, and ``alignment`` (computed by the
aggregation from the other three) the remaining factor: how well the largest scores' queries
line up with the keys that stand out.  ``kv_head`` is the key head each query head reads
(key heads the model repeated or tiled for the kernel count as the one they copy).
``entropy_norm`` is the mean of ``H_i / log n_i`` over rows
with ``n_i >= 2`` allowed keys (``H_i / log 1`` is undefined; a row with one key has entropy
0 anyway), so heads can be compared across lengths and masks: 1 is uniform attention.

Learned sink logits (``sink_logits``, one per head) add a column with score ``s_h`` that takes
probability mass but is no key: ``z_i`` includes ``exp(s_h - m'_i)`` with the shift
``m'_i = max(m_i, s_h)``, the attention over real keys sums to ``1 - sink_logit_mass``, the
entropy is that of the full distribution over the ``n_i + 1`` outcomes (keys and the sink
column), and ``entropy_norm`` divides by ``log(n_i + 1)``.  The sink column takes no part in
``max_logit``, ``sink``, the column masses, ``columns`` or ``dominant``.

Memory: see :mod:`.blocks` (the pass fits ``memory_budget``, 64 MiB by default, and usually
stays well below it).

Exactness
---------
All arithmetic is float64 (``q`` and ``k`` are cast; accumulators are float64), under
``torch.no_grad()`` with autocast disabled.  The float figures agree with a float64 reference
on the materialised matrix (``softmax(q.double() @ k.double().T * scale + mask)``) to about
``1e-15`` relative; only the order of summation differs.  The integer figures are the
reference's decisions (sorted masses, cumulative sum, ``searchsorted(c, tau * c[-1]) + 1``;
argmax) applied to column masses that differ from the reference's by rounding only.  A
decision whose prefix sum lies within rounding distance of the threshold (closer than
``attn_probe.metrics.exact.margin(S)`` times the total, ``1e-9`` for ``S`` up to several
thousand) can go either way between two float64 summation orders; without the matrix there
is nothing to recompute it from, so such a head may differ by one from the reference (exact
ties in ``dominant`` likewise).  Random and trained heads almost never come that close.

Masks, padding and edge cases (training must never crash)
----------------------------------------------------------
* ``attn_mask``: bool (True = may attend) or additive float; the softmax sees
  ``score + mask``, ``max_logit`` includes the mask's value, and only entries where the mask
  is finite are allowed (``-inf`` is masked).  With ``is_causal`` too, both apply (SDPA itself
  refuses that combination).  Causality is top-left aligned: query ``i`` sees keys ``j <= i``.
* ``key_padding`` (``(B, S)``, True = real token): padded keys are masked, and for
  self-attention (``L == S``) padded queries are left out of every figure.  Key indices count
  real keys only: ``sink`` is the attention on the first real key and ``dominant`` is the
  column's position among the real keys, so a left- or right-padded sequence gives the figures
  of the same sequence run unpadded.
* A query row with no allowed key (fully masked, padded, or before the first real key under
  causality) is not measured: it is left out of every figure and of ``tokens``.  A
  ``(sequence, head)`` without any measured row has ``entropy``, ``entropy_norm``, ``sink``,
  ``sink_logit_mass``, ``query_norm``, ``key_norm`` 0, ``max_logit`` and ``logit_spread``
  ``-inf``, ``columns`` 0, ``dominant`` -1, ``tokens`` 0.
* Non-finite scores in a measured row (NaN/Inf in ``q``, ``k`` or ``sink_logits``) make that
  ``(sequence, head)``'s float figures NaN and its integer figures (``tokens`` included) -1;
  the other heads are unaffected.  Scores that the masks exclude are overwritten, so garbage in
  padded positions is harmless.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..attention.flex import FlexScoring
from ..attention.rebuild import AttentionInputs, AttentionScores
from ..options import check_count, check_tau
from .blocks import DEFAULT_MEMORY_BUDGET, plan_blocks
from .exact import count_from_descending, margin, quiet
from .scores import scores_stats

__all__ = ["full_context_metrics", "full_context_stats"]

_F64 = torch.float64
# Masked scores are overwritten with this finite value: exp(_NEG - m) == 0 and, unlike -inf,
# 0 * _NEG == 0, so masked entries drop out of every sum without producing NaN.
_NEG = torch.finfo(_F64).min
# Per-row figures kept for the whole sequence, per head: maximum, sum of the allowed scores,
# entropy, attention on the first key, sink-logit mass, query norm (float64) and allowed-key
# count (int64).
_ROW_FIGURES = 7
def _centred_rms(keys: Tensor, real: Tensor | None) -> Tensor:
    """Root-mean-square norm of each key head's keys ``(kv, S, E)`` centred on their mean, over
    the ``real`` ones (a ``(S,)`` bool, or all): ``sqrt(mean |k|^2 - |mean k|^2)``, per head."""
    squares = torch.linalg.vector_norm(keys, dim=-1).square_()  # (kv, S), no copy of keys
    if real is None:
        mean_key, mean_square = keys.mean(dim=1), squares.mean(dim=1)
    else:
        weights = real.to(keys.dtype) / real.sum().clamp_min(1)
        mean_key = torch.matmul(weights, keys)  # (kv, E)
        mean_square = squares @ weights
    return (mean_square - mean_key.square().sum(dim=-1)).clamp_min_(0.0).sqrt_()


def _as_4d(query: Tensor, key: Tensor,
           attn_mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(B, H, L, E)`` query, ``(B, H_kv, S, E)`` key and a 4-d mask (or None).

    Single-head inputs (``(B, L, E)`` query and ``(B, S, E)`` key) get a head axis; their mask
    broadcasts to ``(B, L, S)``.
    """
    if query.dim() == 3 and key.dim() == 3:
        query, key = query.unsqueeze(1), key.unsqueeze(1)
        if attn_mask is not None and attn_mask.dim() == 3:
            attn_mask = attn_mask.unsqueeze(1)
    if query.dim() != 4 or key.dim() != 4:
        raise ValueError(
            "expected query (B, H, L, E) and key (B, H_kv, S, E), or (B, L, E) and (B, S, E); "
            f"got {tuple(query.shape)} and {tuple(key.shape)}"
        )
    (b, h, length, e), (bk, hk, s, ek) = query.shape, key.shape
    if bk != b or ek != e or e == 0 or hk == 0 or h % hk != 0:
        raise ValueError(
            f"key shape {tuple(key.shape)} does not fit query shape {tuple(query.shape)} "
            "(same batch and a positive feature size; query heads a multiple of key heads)"
        )
    if attn_mask is not None:
        if attn_mask.dim() > 4:
            raise ValueError(f"attn_mask has {attn_mask.dim()} dimensions; at most 4 expected")
        attn_mask = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
        for size, full in zip(attn_mask.shape, (b, h, length, s)):
            if size not in (1, full):
                raise ValueError(
                    f"attn_mask shape {tuple(attn_mask.shape)} does not broadcast to "
                    f"{(b, h, length, s)}"
                )
    return query, key, attn_mask


@dataclass(frozen=True)
class _Span:
    """What the blocks of sequence ``b`` cover: query rows ``[q_lo, q_hi)`` and keys
    ``[k_lo, k_hi)`` (first to last real key); its key padding when real keys have gaps in
    between (None otherwise); and whether the blocks need the general boolean mask (a user
    mask, or such gaps)."""

    b: int
    q_lo: int
    q_hi: int
    k_lo: int
    k_hi: int
    padding: Tensor | None
    general: bool


class _Pass:
    """One streaming pass: inputs, buffers, per-row figures and per ``(sequence, head)``
    results.

    Each block writes its rows' figures (maximum score, entropy, attention on the first key,
    sink-logit mass, allowed-key count) into ``(H, L)`` arrays, and its squared column masses
    into ``colmass``; the per-head means and decisions are taken once per sequence.
    """

    def __init__(self, query: Tensor, key: Tensor, attn_mask: Tensor | None, is_causal: bool,
                 scale: float | None, sink_logits: Tensor | None, key_padding: Tensor | None,
                 tau: float, batch_rows: int | None, memory_budget: int,
                 flex: FlexScoring | None = None) -> None:
        self.query, self.key, self.mask = _as_4d(query, key, attn_mask)
        self.flex = flex
        batch, self.heads, self.length, self.dim = self.query.shape
        self.kv_heads, self.keys = self.key.shape[1], self.key.shape[2]
        self.group = self.heads // self.kv_heads
        self.causal = bool(is_causal)
        self.scale = 1.0 / math.sqrt(self.dim) if scale is None else float(scale)
        self.tau = tau
        self.device = device = self.query.device
        self.float_mask = self.mask is not None and self.mask.dtype != torch.bool
        if key_padding is not None and tuple(key_padding.shape) != (batch, self.keys):
            raise ValueError(
                f"key_padding must have shape {(batch, self.keys)}, got {tuple(key_padding.shape)}"
            )
        self.key_padding = None if key_padding is None else key_padding.to(device, torch.bool)
        self.sink_logits = None
        if sink_logits is not None:
            if tuple(sink_logits.shape) != (self.heads,):
                raise ValueError(
                    f"sink_logits must have shape {(self.heads,)}, got {tuple(sink_logits.shape)}"
                )
            self.sink_logits = sink_logits.detach().to(device, _F64)
        self.sequences = batch if batch_rows is None else min(batch, batch_rows)

        shape = (self.sequences, self.heads)
        self.out = {
            "entropy": torch.zeros(shape, dtype=_F64, device=device),
            "entropy_norm": torch.zeros(shape, dtype=_F64, device=device),
            "sink": torch.zeros(shape, dtype=_F64, device=device),
            "sink_logit_mass": torch.zeros(shape, dtype=_F64, device=device),
            "max_logit": torch.full(shape, -math.inf, dtype=_F64, device=device),
            "logit_spread": torch.full(shape, -math.inf, dtype=_F64, device=device),
            "query_norm": torch.zeros(shape, dtype=_F64, device=device),
            "key_norm": torch.zeros(shape, dtype=_F64, device=device),
            "kv_head": self._kv_heads().expand(shape).clone(),
            "columns": torch.zeros(shape, dtype=torch.int64, device=device),
            "dominant": torch.full(shape, -1, dtype=torch.int64, device=device),
            "tokens": torch.zeros(shape, dtype=torch.int64, device=device),
        }
        self.bad = torch.zeros(shape, dtype=torch.bool, device=device)

        general = self.mask is not None or self.key_padding is not None or flex is not None
        self.mask_heads = 1 if self.mask is None else self.mask.shape[1]
        if flex is not None:  # score_mod and mask_mod may depend on the head
            self.mask_heads = self.heads
        plan = plan_blocks(self.heads, self.kv_heads, self.length, self.keys, self.dim,
                           self.mask_heads if general else 0, memory_budget,
                           row_figures=_ROW_FIGURES, flex=flex is not None)
        self.kv_chunk, self.rows = plan.kv_chunk, plan.rows
        chunk_heads = self.kv_chunk * self.group
        f64 = {"dtype": _F64, "device": device}
        self.kbuf = torch.empty(self.kv_chunk * self.keys * self.dim, **f64)
        self.qbuf = torch.empty(chunk_heads * self.rows * self.dim, **f64)
        self.sbuf = torch.empty(chunk_heads * self.rows * self.keys, **f64)
        self.pbuf = torch.empty_like(self.sbuf)
        self.mbuf = torch.empty(chunk_heads * self.keys, **f64)  # one block's column masses
        # Per-row figures of the current sequence; rows no block visits keep count 0.
        self.row_max = torch.empty(self.heads, self.length, **f64)
        self.row_sum = torch.empty_like(self.row_max)
        self.row_qnorm = torch.empty_like(self.row_max)
        self.row_entropy = torch.empty_like(self.row_max)
        self.row_first = torch.empty_like(self.row_max)
        self.row_sink = None if self.sink_logits is None else torch.empty_like(self.row_max)
        self.row_count = torch.empty(self.mask_heads, self.length, dtype=torch.int64,
                                     device=device)

    def _kv_heads(self) -> Tensor:
        """(H,) the key/value head each query head reads: ``h // group``, where a key head that
        is an exact copy of an earlier one (a model that repeats its key/value heads for the
        kernel, as Hugging Face's ``repeat_kv`` does, or tiles them) is that head: the groups
        are numbered in order of first appearance."""
        keys = self.key[: self.sequences]
        first = keys[:, :, :1]  # a cheap fingerprint: only heads that agree on it are compared
        ids: list[int] = []
        for h in range(self.kv_heads):
            same = next((ids[g] for g in range(h) if ids[g] == g
                         and torch.equal(first[:, h], first[:, g])
                         and torch.equal(keys[:, h], keys[:, g])), None)
            ids.append(h if same is None else same)
        order = {head: number for number, head in enumerate(dict.fromkeys(ids))}
        groups = torch.tensor([order[i] for i in ids], dtype=torch.int64, device=self.device)
        return groups.repeat_interleave(self.group)

    # ----------------------------------------------------------------------------------------
    # Sequence and block loops
    # ----------------------------------------------------------------------------------------

    def sequence(self, b: int) -> None:
        """Every block of sequence ``b``, then its per-head figures."""
        k_lo, k_hi, holes, padding = 0, self.keys, False, None
        if self.key_padding is not None:
            padding = self.key_padding[b]
            real = padding.nonzero().squeeze(-1)
            if real.numel() == 0:
                return
            k_lo, k_hi = int(real[0]), int(real[-1]) + 1
            holes = real.numel() != k_hi - k_lo
        q_lo, q_hi = 0, self.length
        if padding is not None and self.length == self.keys:  # self-attention: padded queries
            q_lo, q_hi = k_lo, k_hi
        if self.causal:  # earlier queries see no real key
            q_lo = max(q_lo, k_lo)
        if q_lo >= q_hi or k_lo >= k_hi:
            return
        span = _Span(b, q_lo, q_hi, k_lo, k_hi, padding if holes else None,
                     self.mask is not None or self.flex is not None or holes)
        self.row_count.zero_()
        colmass = torch.zeros(self.heads, k_hi - k_lo, dtype=_F64, device=self.device)
        key_norm = torch.empty(self.kv_heads, dtype=_F64, device=self.device)
        for c0 in range(0, self.kv_heads, self.kv_chunk):
            c1 = min(c0 + self.kv_chunk, self.kv_heads)
            keys = self.kbuf[: (c1 - c0) * (k_hi - k_lo) * self.dim]
            keys = keys.view(c1 - c0, k_hi - k_lo, self.dim)
            keys.copy_(self.key[b, c0:c1, k_lo:k_hi])
            real = None if span.padding is None else span.padding[k_lo:k_hi]
            if real is not None:  # padded keys are masked anyway: zeros keep garbage out
                keys.masked_fill_(~real[None, :, None], 0.0)
            key_norm[c0:c1] = _centred_rms(keys, real)
            for r0 in range(span.q_lo, span.q_hi, self.rows):
                r1 = min(r0 + self.rows, span.q_hi)
                self._block(span, keys, c0 * self.group, c1 * self.group, r0, r1, colmass)
        self.out["key_norm"][b] = key_norm.repeat_interleave(self.group)
        self._finish(span, colmass)

    def _block(self, span: _Span, keys: Tensor, h0: int, h1: int, r0: int, r1: int,
               colmass: Tensor) -> None:
        """Query rows ``[r0, r1)`` of heads ``[h0, h1)``: their scores over the keys they may
        see, their per-row figures, and their squared masses added to ``colmass``."""
        n, hq, kv = r1 - r0, h1 - h0, keys.shape[0]
        width = (min(r1, span.k_hi) if self.causal else span.k_hi) - span.k_lo
        if self.flex is not None:  # keys of blocks the block mask leaves out take no part
            width = max(1, min(width, self.flex.key_end(span.b, r0, r1, span.k_hi) - span.k_lo))
        q = self.qbuf[: hq * n * self.dim].view(hq, n, self.dim)
        q.copy_(self.query[span.b, h0:h1, r0:r1]).mul_(self.scale)  # in float64
        self.row_qnorm[h0:h1, r0:r1] = torch.linalg.vector_norm(q, dim=-1)
        scores = self.sbuf[: hq * n * width].view(hq, n, width)
        torch.matmul(q.view(kv, self.group * n, self.dim), keys[:, :width].mT,
                     out=scores.view(kv, self.group * n, width))
        p = self.pbuf[: hq * n * width].view(hq, n, width)
        count = None  # allowed-key counts; without a general mask, see _plain_counts
        if span.general:
            count, sums = self._mask_general(scores, span, h0, h1, r0, r1, p)
        elif self.causal:
            sums = self._mask_triangle(scores, span, r0, r1)
        else:
            sums = scores.sum(dim=-1)
        self.row_sum[h0:h1, r0:r1] = sums

        m = scores.amax(dim=-1)  # (hq, n)
        sink = None if self.sink_logits is None else self.sink_logits[h0:h1, None]
        shift = m if sink is None else torch.maximum(m, sink)
        scores.sub_(shift.unsqueeze(-1))
        torch.exp(scores, out=p)
        z = p.sum(dim=-1)
        dot = scores.mul_(p).sum(dim=-1)  # sum_j P_ij S'_ij
        if sink is not None:  # the extra column: score s_h, shifted s_h - m'_i
            sink_shifted = sink - shift
            e = sink_shifted.exp()
            z += e
            dot += e * sink_shifted
        inv = z.reciprocal()
        self.row_max[h0:h1, r0:r1] = m
        self.row_entropy[h0:h1, r0:r1] = z.log_().sub_(dot.mul_(inv))
        self.row_first[h0:h1, r0:r1] = p[..., 0] * inv
        if sink is not None:
            self.row_sink[h0:h1, r0:r1] = e * inv
        if count is not None:
            heads = slice(h0, h1) if self.mask_heads > 1 else slice(None)
            self.row_count[heads, r0:r1] = count

        weights = inv.mul_(inv)  # 1 / z^2
        if span.general:  # rows without an allowed key are left out
            weights.masked_fill_(count == 0, 0.0)
        masses = self.mbuf[: hq * width].view(hq, 1, width)
        torch.bmm(weights.unsqueeze(1), p.mul_(p), out=masses)
        colmass[h0:h1, :width] += masses.squeeze(1)

    def _mask_triangle(self, scores: Tensor, span: _Span, r0: int, r1: int) -> Tensor:
        """The causal triangle on the block's diagonal part: query ``i`` sees keys
        ``k_lo .. i``, and only keys past ``r0`` can be hidden from a row of the block.
        Returns the sums of each row's allowed scores ``(hq, n)``."""
        width = scores.shape[-1]
        c0 = r0 - span.k_lo + 1
        hidden = None
        if c0 < width:
            rows = torch.arange(r0 - span.k_lo, r1 - span.k_lo, device=self.device)
            cols = torch.arange(c0, width, device=self.device)
            hidden = cols > rows[:, None]
            scores[..., c0:].masked_fill_(hidden, 0.0)
        sums = scores.sum(dim=-1)
        if hidden is not None:
            scores[..., c0:].masked_fill_(hidden, _NEG)
        return sums

    def _mask_general(self, scores: Tensor, span: _Span, h0: int, h1: int, r0: int,
                      r1: int, spare: Tensor) -> tuple[Tensor, Tensor]:
        """User mask rows, key padding and causality combined into one boolean block; masked
        scores are overwritten.  Returns the allowed-key counts ``(1 or hq, n)`` and the sums
        of each row's allowed scores ``(hq, n)`` (``spare``, a free buffer of the scores'
        shape, holds them on the way)."""
        n, width, k_lo = r1 - r0, scores.shape[-1], span.k_lo
        mask = self.mask
        mask_heads = 1 if self.mask_heads == 1 else h1 - h0
        allowed = torch.ones(mask_heads, n, width, dtype=torch.bool, device=self.device)
        if self.flex is not None:  # score_mod, then the block mask, as flex_attention does
            allowed &= self.flex.apply(scores, span.b, h0, r0, k_lo)
        if mask is not None:
            m = mask[span.b if mask.shape[0] > 1 else 0]
            m = m[h0:h1] if m.shape[0] > 1 else m
            m = m[:, r0:r1] if m.shape[1] > 1 else m
            m = m[..., k_lo:k_lo + width] if m.shape[2] > 1 else m
            if self.float_mask:
                scores.add_(m)
                allowed &= torch.isfinite(m)
            else:
                allowed &= m
        if span.padding is not None:
            allowed &= span.padding[k_lo:k_lo + width]
            if self.length == self.keys:
                allowed &= span.padding[r0:r1, None]
        if self.causal:
            c0 = r0 - k_lo + 1
            if c0 < width:
                rows = torch.arange(r0 - k_lo, r1 - k_lo, device=self.device)
                cols = torch.arange(c0, width, device=self.device)
                allowed[..., c0:] &= cols <= rows[:, None]
        count = allowed.sum(dim=-1)
        sums = torch.where(allowed, scores, scores.new_zeros(()), out=spare).sum(dim=-1)
        scores.masked_fill_(allowed.logical_not_(), _NEG)
        return count, sums

    # ----------------------------------------------------------------------------------------
    # Per-sequence figures and results
    # ----------------------------------------------------------------------------------------

    def _plain_counts(self, span: _Span) -> None:
        """Allowed-key counts without a general mask: every key of the span, or under
        causality ``i - k_lo + 1`` (at most all of them), for the rows the blocks visited."""
        keys, rows = span.k_hi - span.k_lo, slice(span.q_lo, span.q_hi)
        if self.causal:
            visible = torch.arange(span.q_lo - span.k_lo + 1, span.q_hi - span.k_lo + 1,
                                   device=self.device)
            self.row_count[:, rows] = visible.clamp_(max=keys)
        else:
            self.row_count[:, rows] = keys

    def _finish(self, span: _Span, colmass: Tensor) -> None:
        """Per-head means over the measured rows, max logit, columns@tau and dominant column of
        sequence ``span.b``."""
        if not span.general:
            self._plain_counts(span)
        count = self.row_count
        measured = count > 0  # (1 or H, L)
        tokens = measured.sum(dim=-1).expand(self.heads)
        out, b = self.out, span.b

        def mean(values: Tensor, rows: Tensor = measured) -> Tensor:
            """Mean over ``rows`` (0 without any), per head; other rows may hold garbage."""
            total = torch.where(rows, values, 0.0).sum(dim=-1)
            return total / rows.sum(dim=-1).clamp_min(1)

        entropy = self.row_entropy
        out["tokens"][b] = tokens
        out["entropy"][b] = mean(entropy)
        outcomes = (count if self.sink_logits is None else count + 1).to(_F64)
        out["entropy_norm"][b] = mean(entropy / outcomes.log(), outcomes >= 2)
        out["sink"][b] = mean(self.row_first)
        if self.row_sink is not None:
            out["sink_logit_mass"][b] = mean(self.row_sink)
        out["max_logit"][b] = torch.where(measured, self.row_max, -math.inf).amax(dim=-1)
        spread = self.row_max - self.row_sum / count.clamp_min(1)
        out["logit_spread"][b] = torch.where(measured, spread, -math.inf).amax(dim=-1)
        out["query_norm"][b] = mean(self.row_qnorm.square()).sqrt_()
        # A measured row whose maximum is not above the fill value, or whose entropy is not
        # finite, saw NaN or infinite scores.
        fine = (self.row_max > _NEG) & torch.isfinite(entropy)
        self.bad[b] = (measured & ~fine).any(dim=-1)

        total = colmass.sum(dim=-1)
        masses = colmass.sort(dim=-1, descending=True).values
        columns, _ = count_from_descending(masses, self.tau, margin(colmass.shape[-1]))
        live = total > 0
        out["columns"][b] = torch.where(live, columns, 0)
        dominant = colmass.argmax(dim=-1)  # first maximal index on ties
        if span.padding is not None:  # position among the real keys
            dominant = (span.padding[span.k_lo:span.k_hi].cumsum(0) - 1)[dominant]
        out["dominant"][b] = torch.where(live, dominant, -1)

    def result(self) -> dict[str, Tensor]:
        """The figures, with NaN (floats) and -1 (integers) for non-finite heads."""
        return {
            name: value.masked_fill(self.bad, math.nan if value.is_floating_point() else -1)
            for name, value in self.out.items()
        }


def full_context_stats(
    query: Tensor,
    key: Tensor,
    *,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    sink_logits: Tensor | None = None,
    key_padding: Tensor | None = None,
    tau: float = 0.9,
    batch_rows: int | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    flex: FlexScoring | None = None,
) -> dict[str, Tensor]:
    """Full-sequence per ``(sequence, head)`` attention statistics, streamed over query blocks.

    ``query`` ``(B, H, L, E)`` (or ``(B, L, E)``, one head), ``key`` ``(B, H_kv, S, E)`` with
    ``H % H_kv == 0`` (grouped-query attention: query head ``h`` uses key head
    ``h // (H // H_kv)``, as SDPA's ``enable_gqa``); ``attn_mask`` broadcastable to
    ``(B, H, L, S)``, bool (True = may attend) or additive float; ``is_causal`` top-left
    aligned; ``scale`` defaults to ``1 / sqrt(E)``; ``sink_logits`` ``(H,)`` learned per-head
    sink logits; ``key_padding`` ``(B, S)`` bool, True = real token; ``batch_rows`` keeps
    the first ``n`` sequences; ``memory_budget`` bounds the pass's working memory in bytes;
    ``flex``: a ``flex_attention`` call's ``score_mod`` and block mask, evaluated per block on
    the scaled scores (before ``attn_mask``): every figure is of the scores the kernel's softmax
    saw, ``max_logit`` and ``logit_spread`` included (after a soft-cap, at most the cap).

    Returns tensors of shape ``(B', H)`` on the query's device: ``entropy``, ``entropy_norm``,
    ``sink``, ``sink_logit_mass``, ``max_logit``, ``logit_spread``, ``query_norm``,
    ``key_norm`` (float64), ``columns``, ``dominant``, ``tokens``, ``kv_head`` (int64). See the
    module docstring for definitions and edge cases.
    """
    tau = check_tau(tau)
    check_count("batch_rows", batch_rows, optional=True)
    with quiet(query):
        run = _Pass(query, key, attn_mask, is_causal, scale, sink_logits, key_padding, tau,
                    batch_rows, memory_budget, flex)
        for b in range(run.sequences):
            run.sequence(b)
        return run.result()


#: ``full_context_stats`` figures under the names the probe's aggregation uses.
_PROBE_NAMES = {
    "entropy": "entropy_full",
    "entropy_norm": "entropy_norm_full",
    "sink": "sink_full",
    "sink_logit_mass": "sink_logit_full",
    "max_logit": "max_logit",
    "logit_spread": "logit_spread",
    "query_norm": "query_norm",
    "key_norm": "key_norm",
    "kv_head": "kv_head",
    "columns": "columns_full",
    "dominant": "dominant_full",
    "tokens": "tokens_full",
}


def full_context_metrics(observed: object, tau: float = 0.9,
                         memory_budget: int = DEFAULT_MEMORY_BUDGET) -> dict[str, Tensor]:
    """``full_context_stats`` of a recorded kernel call, under the probe's figure names.

    ``observed`` is what the recorder hands on: an ``AttentionInputs`` (q and k, streamed by
    :func:`full_context_stats`), an ``AttentionScores`` (an eager softmax's own scores,
    :func:`scores_stats`), or a bare matrix from a user adapter, which gives ``{}``.
    """
    if isinstance(observed, AttentionInputs):
        padding = observed.key_padding
        if padding is not None:  # each sequence's real tokens come first in the inputs
            keys = torch.arange(observed.key.size(2), device=padding.device)
            padding = keys < padding.sum(dim=1, keepdim=True)
        stats = full_context_stats(
            observed.query, observed.key, attn_mask=observed.attn_mask,
            is_causal=observed.is_causal, scale=observed.scale,
            sink_logits=observed.sink_logits, key_padding=padding, tau=tau,
            memory_budget=memory_budget, flex=observed.flex,
        )
    elif isinstance(observed, AttentionScores):
        stats = scores_stats(observed.scores, observed.probs, sink_mass=observed.sink_mass,
                             tau=tau, memory_budget=memory_budget)
    else:
        return {}
    return {_PROBE_NAMES[name]: value for name, value in stats.items()}
