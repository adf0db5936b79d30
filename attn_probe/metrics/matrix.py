"""Per-head degeneracy metrics for batches of attention matrices.

Every function takes a tensor ``A`` of shape ``(..., Tq, Tk)`` -- any number of leading batch
dimensions, including none -- whose rows are (usually) probability distributions over keys.
Causal heads simply have zeros above the diagonal.  Results have exactly the batch shape
``A.shape[:-2]`` and live on ``A``'s device.  All arithmetic is done in float64 with autocast
disabled and without autograd, on CPU or CUDA, batched over all heads at once.

Metrics
-------
``rank_at(A, tau)``
    ``k*``: the smallest ``k`` such that the ``k`` largest singular values carry a fraction
    ``tau`` of the energy, ``s_1^2 + ... + s_k^2 >= tau * sum_i s_i^2``.
``columns_at(A, tau)``
    The fewest columns (keys) whose squared entries hold a fraction ``tau`` of ``||A||_F^2``.
``row_entropy(A)``
    Mean over rows of ``-sum_j p_j log p_j`` in nats (``0 log 0 = 0``).
``sink_mass(A)``
    Mean over rows of ``A[..., 0]``: the attention paid to key 0.
``dominant_column(A)``
    Index of the column with the largest squared mass (ties: lowest index).
``head_metrics(A, tau)``
    All five at once, sharing the float64 copy and the column masses.

Exactness
---------
``rank_at`` and ``columns_at`` return, head for head, the same integers as this float64
reference::

    s2 = torch.linalg.svdvals(a.double()) ** 2           # rank
    m = (a.double() ** 2).sum(-2).sort(descending=True).values   # columns
    c = x.cumsum(0); k = int(torch.searchsorted(c, tau * c[-1])) + 1

The fast paths only ever decide a head when their answer is separated from the threshold by a
safety margin far larger than any rounding difference (see ``exact.margin``); every head that is
closer than that to the threshold is recomputed with the reference procedure itself (on the
CPU, so results do not depend on the device).

Edge cases (a monitored training loop must never crash)
-------------------------------------------------------
* A matrix containing any NaN/Inf: ``rank``, ``columns``, ``dominant`` are ``-1`` and
  ``entropy``, ``sink`` are NaN for that matrix; the other matrices are unaffected.
* An all-zero matrix: ``rank`` 0, ``columns`` 0, ``dominant`` -1, ``entropy`` 0, ``sink`` 0.
* Rows whose sum is not positive (e.g. fully masked queries) hold no distribution: entropy and
  sink average only over rows with a positive sum, and are 0 when there is no such row.
* Empty matrices (``Tq == 0`` or ``Tk == 0``) behave like all-zero ones: ``rank``/``columns``/
  ``entropy``/``sink`` are 0 and ``dominant`` is -1 (there is no column to point at).
  Empty batches give empty results.
* ``A`` with fewer than 2 dimensions raises ``ValueError`` (expected shape ``(..., T, T)``);
  ``tau`` outside ``(0, 1]`` raises ``ValueError``; complex input raises ``TypeError``.
* Integer and bool inputs are converted to float64; non-tensor array-likes go through
  ``torch.as_tensor``.
* Matrices with extreme magnitudes are rescaled by an exact power of two before the spectral
  work, so ``rank``/``columns``/``dominant`` are invariant to positive scaling and do not
  overflow or underflow.
* Entropy uses the entries as given (no renormalisation); a negative entry in a row with a
  positive sum makes the entropy NaN, since ``p log p`` is undefined there.
"""

from __future__ import annotations

import math
from functools import cached_property
from typing import Any

import torch
from torch import Tensor

from ..options import check_tau
from .exact import count_from_descending, margin, quiet

__all__ = [
    "rank_at",
    "columns_at",
    "row_entropy",
    "sink_mass",
    "dominant_column",
    "head_metrics",
]

_F64 = torch.float64

# Cheap path: block size, at most this many subspace-iteration steps, and the share of the
# threshold the Ritz values must already reach for further steps to be worth their cost.
_BLOCK = 4
_ITERS = 3
_PROMISING = 0.75

# Matrices whose energy ||A||_F^2 lies outside [_TINY, _HUGE] (or overflows) are rescaled by a
# power of two before the spectral work, so that squares neither overflow nor underflow.
_TINY = 2.0**-400
_HUGE = 2.0**400


# --------------------------------------------------------------------------------------------
# Input handling
# --------------------------------------------------------------------------------------------


class _Batch:
    """Validated float64 copy of the input, flattened to ``(N, Tq, Tk)``.

    ``finite`` flags the matrices without NaN/Inf; the others are zeroed so that batched
    LAPACK calls never see them.  With ``spectral=True`` the squared column masses are
    computed as well (they double as the finiteness probe) and shared between metrics.
    """

    def __init__(self, A: Any, spectral: bool) -> None:
        if not isinstance(A, Tensor):
            A = torch.as_tensor(A)
        if A.dim() < 2:
            raise ValueError(
                f"expected attention matrices of shape (..., T, T), got shape {tuple(A.shape)}"
            )
        if A.is_complex():
            raise TypeError("complex attention matrices are not supported")
        self.device = A.device
        self.batch_shape = A.shape[:-2]
        self.n_q, self.n_k = int(A.shape[-2]), int(A.shape[-1])
        self.count = math.prod(self.batch_shape)
        self.empty = self.count == 0 or self.n_q == 0 or self.n_k == 0
        x = A.detach().to(_F64).reshape(self.count, self.n_q, self.n_k)
        self.finite = torch.ones(self.count, dtype=torch.bool, device=self.device)
        colmass = total = None
        if not self.empty:
            if spectral:
                colmass = (x * x).sum(dim=-2)
                total = colmass.sum(dim=-1)
                probe = total
            else:
                probe = x.sum(dim=(-2, -1))
            # The probe is finite for every finite matrix unless it overflows; only the (rare)
            # suspicious matrices get the exact elementwise check.
            suspicious = ~torch.isfinite(probe)
            if bool(suspicious.any()):
                rows = suspicious.nonzero().squeeze(-1)
                self.finite[rows] = torch.isfinite(x[rows]).flatten(1).all(dim=1)
                zero = torch.zeros((), dtype=_F64, device=self.device)
                x = torch.where(self.finite[:, None, None], x, zero)
                if spectral:
                    colmass = torch.where(self.finite[:, None], colmass, zero)
                    total = torch.where(self.finite, total, zero)
        self.x = x
        if spectral and not self.empty:
            self.xs, self.colmass, self.total = self._rescale_extremes(x, colmass, total)
            self.live = self.finite & (self.total > 0)

    @staticmethod
    def _rescale_extremes(x: Tensor, colmass: Tensor,
                          total: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Returns ``(xs, colmass, total)``: ``xs`` is ``x`` except for matrices of extreme
        magnitude (energy outside ``[_TINY, _HUGE]`` or overflowing), which are multiplied by
        an exact power of two so that their largest entry lies in [0.5, 1).  This multiplies
        every energy by the same power of four and leaves every ``tau``-fraction decision
        unchanged.  Afterwards ``total > 0`` exactly for the nonzero matrices.
        """
        odd = ~((total >= _TINY) & (total <= _HUGE))  # zero, underflowing or overflowing
        if not bool(odd.any()):
            return x, colmass, total
        rows = odd.nonzero().squeeze(-1)
        peak = x[rows].abs().amax(dim=(-2, -1))
        rows, peak = rows[peak > 0], peak[peak > 0]  # all-zero matrices stay as they are
        if rows.numel() == 0:
            return x, colmass, total
        _, exponent = torch.frexp(peak)
        shift = (-exponent).clamp(-1000, 1000).to(_F64)  # keeps the factor itself finite
        xs, colmass = x.clone(), colmass.clone()
        xs[rows] = torch.ldexp(x[rows], shift[:, None, None])
        colmass[rows] = (xs[rows] * xs[rows]).sum(dim=-2)
        return xs, colmass, colmass.sum(dim=-1)

    def shaped(self, flat: Tensor) -> Tensor:
        return flat.reshape(self.batch_shape)

    @cached_property
    def row_weights(self) -> tuple[Tensor, Tensor]:
        """Mask of rows with a positive sum, and the number of such rows (at least 1)."""
        valid = self.x.sum(dim=-1) > 0
        return valid, valid.sum(dim=-1).clamp_min(1)


# --------------------------------------------------------------------------------------------
# The tau-count and its reference
# --------------------------------------------------------------------------------------------


def _reference_count(energies: Tensor, tau: float) -> int:
    """The reference decision on one head's energies (already in descending order)."""
    c = energies.cumsum(0)
    return int(torch.searchsorted(c, tau * c[-1])) + 1


def _singular_energies(a: Tensor) -> Tensor:
    return torch.linalg.svdvals(a) ** 2


def _column_energies(a: Tensor) -> Tensor:
    return (a**2).sum(-2).sort(descending=True).values


def _fill_fallbacks(out: Tensor, rows: Tensor, batch: _Batch, tau: float, energies) -> None:
    """Recompute ``out[rows]`` (flat head indices) with the reference procedure, on the CPU.

    The matrices are exactly the float64 input (only those of extreme magnitude carry their
    exact power-of-two rescaling), so this reproduces the reference decision bit for bit.
    """
    if rows.numel() == 0:
        return
    xs = batch.xs
    values = [_reference_count(energies(xs[i].cpu()), tau) for i in rows.tolist()]
    out[rows] = torch.tensor(values, dtype=out.dtype, device=out.device)


# --------------------------------------------------------------------------------------------
# rank: certified cheap path, dense path, reference fallback
# --------------------------------------------------------------------------------------------


def _start_block(xs: Tensor, colmass: Tensor, m: int) -> Tensor:
    """``W = A V`` for an orthonormal ``V`` spanning the all-ones vector and the unit vectors
    of the ``m - 1`` heaviest columns: the directions in which near-uniform heads and heads
    collapsed onto a few keys concentrate their energy.

    With ``B = [1, e_c1, ..., e_c(m-1)] = V R`` (thin QR), ``A V = (A B) R^{-1}``, and ``A B``
    is a row sum plus a gather: no product with ``A`` is needed.
    """
    n, n_q, n_k = xs.shape
    cols = colmass.topk(m - 1, dim=-1).indices  # (n, m-1)
    basis = torch.zeros(n, n_k, m, dtype=_F64, device=xs.device)
    basis[..., 0] = 1.0
    basis[..., 1:].scatter_(-2, cols.unsqueeze(-2), 1.0)
    images = torch.cat(
        [xs.sum(dim=-1, keepdim=True), xs.gather(-1, cols.unsqueeze(-2).expand(n, n_q, m - 1))],
        dim=-1,
    )
    r = torch.linalg.qr(basis).R
    return torch.linalg.solve_triangular(r, images, upper=True, left=False)


def _subspace_step(xs: Tensor, w: Tensor) -> Tensor:
    """One block subspace-iteration step: ``V <- orth(A^T W)``, returns the new ``W = A V``.

    Householder QR keeps ``V`` orthonormal even when ``A`` has rank below the block size.
    """
    return xs @ torch.linalg.qr(xs.mT @ w).Q


def _ritz(w: Tensor) -> Tensor:
    """Ritz values ``theta_1 >= ... >= theta_m`` of ``A^T A`` on ``span(V)``, from ``W = A V``:
    the eigenvalues of ``V^T A^T A V = W^T W``."""
    return torch.linalg.eigvalsh(w.mT @ w).flip(-1).clamp_min(0)


def _certify_rank(theta: Tensor, total: Tensor, tau: float, rel: float) -> tuple[Tensor, Tensor]:
    """Decide ``k*`` from Ritz values when the bounds allow it.

    Write ``E_k = s_1^2 + ... + s_k^2`` and ``L_k = theta_1 + ... + theta_k``.

    * Ky Fan: ``E_k`` is the maximum of ``trace(V^T A^T A V)`` over k-dimensional subspaces,
      so ``L_k <= E_k``.
    * Cauchy interlacing: ``theta_j <= s_j^2`` for each ``j <= m``; hence the energy outside
      the top ``k`` is at least ``theta_{k+1} + ... + theta_m`` and
      ``E_k <= U_k = total - (theta_{k+1} + ... + theta_m)``.

    ``k`` is the answer when ``E_k >= thr > E_{k-1}``; it is certified when
    ``L_k >= thr + slack`` and (``k == 1`` or ``U_{k-1} < thr - slack``), with
    ``thr = tau * total`` and ``slack = rel * total`` absorbing all rounding (of the Ritz
    values, of ``total`` and of the reference's own SVD).  Returns ``(k, certified)``.
    """
    thr = tau * total
    slack = rel * total
    lower = theta.cumsum(dim=-1)  # lower[:, j] = L_{j+1}
    reached = lower >= (thr + slack)[:, None]
    k = reached.to(torch.int64).argmax(dim=-1) + 1  # first k with L_k above the threshold
    prefix = torch.where(
        k >= 2, lower.gather(-1, (k - 2).clamp_min(0)[:, None]).squeeze(-1), torch.zeros_like(thr)
    )
    upper_prev = total - (lower[:, -1] - prefix)  # U_{k-1} = total - (theta_k + ... + theta_m)
    certified = reached.any(dim=-1) & ((k == 1) | (upper_prev < thr - slack))
    return k, certified


def _cheap_rank(xs: Tensor, colmass: Tensor, total: Tensor, tau: float,
                rel: float) -> tuple[Tensor, Tensor]:
    """Certified cheap path: ``(k, certified)`` for every head of ``xs``.

    Rayleigh-Ritz on the start block, then up to ``_ITERS`` subspace-iteration steps for the
    heads not yet certified whose Ritz values already hold ``_PROMISING`` of the threshold (a
    head whose true rank exceeds the block size can never be certified; this only saves
    time).  Uncertified heads are left to the dense path.
    """
    n = xs.shape[0]
    k = torch.zeros(n, dtype=torch.int64, device=xs.device)
    certified = torch.zeros(n, dtype=torch.bool, device=xs.device)
    heads = torch.arange(n, device=xs.device)
    sub, sub_total = xs, total
    w = _start_block(xs, colmass, _BLOCK)
    for step in range(_ITERS + 1):
        theta = _ritz(w)
        k_step, ok = _certify_rank(theta, sub_total, tau, rel)
        k[heads[ok]] = k_step[ok]
        certified[heads[ok]] = True
        if step == _ITERS:
            break
        keep = ~ok & (theta.sum(dim=-1) >= _PROMISING * tau * sub_total)
        if not bool(keep.any()):
            break
        if not bool(keep.all()):
            heads, sub, sub_total, w = heads[keep], sub[keep], sub_total[keep], w[keep]
        w = _subspace_step(sub, w)
    return k, certified


def _dense_rank(xs: Tensor, tau: float, rel: float) -> tuple[Tensor, Tensor]:
    """``k*`` from all ``s_i^2``: eigenvalues of the Gram matrix of the smaller side.

    Returns ``(k, near)`` where ``near`` marks heads too close to the threshold to trust.
    """
    gram = xs @ xs.mT if xs.shape[-2] <= xs.shape[-1] else xs.mT @ xs
    energies = torch.linalg.eigvalsh(gram).flip(-1).clamp_min(0)
    return count_from_descending(energies, tau, rel)


def _live_subset(batch: _Batch) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Flat indices of the live heads and their ``(xs, colmass, total)`` (no copy if all)."""
    xs, colmass, total = batch.xs, batch.colmass, batch.total
    rows = batch.live.nonzero().squeeze(-1)
    if rows.numel() < batch.count:
        xs, colmass, total = xs[rows], colmass[rows], total[rows]
    return rows, xs, colmass, total


def _rank_flat(batch: _Batch, tau: float) -> Tensor:
    out = torch.full((batch.count,), -1, dtype=torch.int64, device=batch.device)
    if batch.empty:
        return out.zero_()
    out[batch.finite & ~batch.live] = 0
    rows, xs, colmass, total = _live_subset(batch)
    if rows.numel() == 0:
        return out
    rel = margin(max(batch.n_q, batch.n_k))

    k = torch.zeros(rows.numel(), dtype=torch.int64, device=batch.device)
    pending = torch.ones(rows.numel(), dtype=torch.bool, device=batch.device)
    if min(batch.n_q, batch.n_k) > 2 * _BLOCK:
        k, certified = _cheap_rank(xs, colmass, total, tau, rel)
        pending = ~certified

    near_rows = rows[:0]
    if bool(pending.any()):
        todo = pending.nonzero().squeeze(-1)
        k_dense, near = _dense_rank(xs if bool(pending.all()) else xs[todo], tau, rel)
        k[todo] = k_dense
        near_rows = rows[todo[near]]
    out[rows] = k
    _fill_fallbacks(out, near_rows, batch, tau, _singular_energies)
    return out


# --------------------------------------------------------------------------------------------
# columns and dominant column
# --------------------------------------------------------------------------------------------


def _columns_flat(batch: _Batch, tau: float) -> Tensor:
    out = torch.full((batch.count,), -1, dtype=torch.int64, device=batch.device)
    if batch.empty:
        return out.zero_()
    out[batch.finite & ~batch.live] = 0
    rows, _, colmass, _ = _live_subset(batch)
    if rows.numel() == 0:
        return out
    masses = colmass.sort(dim=-1, descending=True).values
    k, near = count_from_descending(masses, tau, margin(max(batch.n_q, batch.n_k)))
    out[rows] = k
    _fill_fallbacks(out, rows[near], batch, tau, _column_energies)
    return out


def _dominant_flat(batch: _Batch) -> Tensor:
    out = torch.full((batch.count,), -1, dtype=torch.int64, device=batch.device)
    if batch.empty:
        return out
    best = batch.colmass.argmax(dim=-1)  # first maximal index on ties
    return torch.where(batch.live, best, out)


# --------------------------------------------------------------------------------------------
# entropy and sink
# --------------------------------------------------------------------------------------------


def _nan_where_bad(batch: _Batch, values: Tensor) -> Tensor:
    return torch.where(batch.finite, values, torch.full_like(values, math.nan))


def _entropy_flat(batch: _Batch) -> Tensor:
    if batch.empty:
        return torch.zeros(batch.count, dtype=_F64, device=batch.device)
    valid, count = batch.row_weights
    per_row = -torch.xlogy(batch.x, batch.x).sum(dim=-1)
    per_row = torch.where(valid, per_row, torch.zeros_like(per_row))
    return _nan_where_bad(batch, per_row.sum(dim=-1) / count)


def _sink_flat(batch: _Batch) -> Tensor:
    if batch.empty:
        return torch.zeros(batch.count, dtype=_F64, device=batch.device)
    valid, count = batch.row_weights
    first = batch.x[..., 0]
    first = torch.where(valid, first, torch.zeros_like(first))
    return _nan_where_bad(batch, first.sum(dim=-1) / count)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def rank_at(A: Tensor, tau: float = 0.9) -> Tensor:
    """Smallest ``k`` with ``s_1^2 + ... + s_k^2 >= tau * sum_i s_i^2`` (int64, batch shape).

    The "k*" of "When Attention Collapses" (arXiv 2404.08634).  Identical, head for head, to
    the float64 ``svdvals`` reference.  Heads whose energy is concentrated in a few directions
    are certified from a small block-Krylov subspace (Ky Fan and Cauchy interlacing bounds);
    the rest use batched ``eigvalsh`` of the float64 Gram matrix; heads whose cumulative energy
    sits within rounding distance of the threshold are recomputed with the reference.
    Non-finite matrix: -1; all-zero or empty matrix: 0.
    """
    tau = check_tau(tau)
    with quiet(A):
        batch = _Batch(A, spectral=True)
        return batch.shaped(_rank_flat(batch, tau))


def columns_at(A: Tensor, tau: float = 0.9) -> Tensor:
    """Fewest columns whose squared entries hold ``tau`` of ``||A||_F^2`` (int64, batch shape).

    Column masses ``sum_i A_ij^2`` sorted in descending order; the answer is the shortest
    prefix whose sum reaches ``tau`` of the total, identical to the float64 reference.
    Non-finite matrix: -1; all-zero or empty matrix: 0.
    """
    tau = check_tau(tau)
    with quiet(A):
        batch = _Batch(A, spectral=True)
        return batch.shaped(_columns_flat(batch, tau))


def row_entropy(A: Tensor) -> Tensor:
    """Mean over rows of ``-sum_j p_j log p_j`` in nats (float64, batch shape).

    Only rows with a positive sum are averaged; 0 when there is none.  NaN for a matrix with
    a non-finite entry.
    """
    with quiet(A):
        batch = _Batch(A, spectral=False)
        return batch.shaped(_entropy_flat(batch))


def sink_mass(A: Tensor) -> Tensor:
    """Mean over rows of ``A[..., 0]``, the attention on key 0 (float64, batch shape).

    Only rows with a positive sum are averaged; 0 when there is none.  NaN for a matrix with
    a non-finite entry.
    """
    with quiet(A):
        batch = _Batch(A, spectral=False)
        return batch.shaped(_sink_flat(batch))


def dominant_column(A: Tensor) -> Tensor:
    """Argmax over columns of ``sum_i A_ij^2`` (int64, batch shape; ties: lowest index).

    -1 for a non-finite, all-zero or empty matrix.
    """
    with quiet(A):
        batch = _Batch(A, spectral=True)
        return batch.shaped(_dominant_flat(batch))


def head_metrics(A: Tensor, tau: float = 0.9) -> dict[str, Tensor]:
    """All metrics in one pass: ``{"rank", "columns", "entropy", "sink", "dominant"}``.

    Same values as the individual functions; the float64 copy, the column masses and the row
    mask are computed once and shared.
    """
    tau = check_tau(tau)
    with quiet(A):
        batch = _Batch(A, spectral=True)
        return {
            "rank": batch.shaped(_rank_flat(batch, tau)),
            "columns": batch.shaped(_columns_flat(batch, tau)),
            "entropy": batch.shaped(_entropy_flat(batch)),
            "sink": batch.shaped(_sink_flat(batch)),
            "dominant": batch.shaped(_dominant_flat(batch)),
        }
