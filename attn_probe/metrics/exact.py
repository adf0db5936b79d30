"""The exact tau count every figure shares, its rounding margin, and the float64 context the
figures are computed in.

Both the figures of the matrix (:mod:`.matrix`) and those of the whole sequence
(:mod:`.streamed`) decide their integers (rank@tau, columns@tau) the same way: sort the energies
in descending order, take the cumulative sum, and count ``searchsorted(cumsum, tau * total) + 1``
(the notebook's float64 reference). :func:`count_from_descending` does that for a batch and flags
the decisions that lie within rounding distance (:func:`margin`) of the threshold.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import Tensor

__all__ = ["count_from_descending", "margin", "quiet"]

_EPS = torch.finfo(torch.float64).eps


def margin(n: int) -> float:
    """Relative safety margin (times the total energy) for decisions near the threshold.

    Forming and diagonalising a float64 Gram matrix, or summing squared entries, perturbs any
    partial sum of energies by at most about ``n**2 * eps * total`` (Weyl/Lidskii plus the
    error of the products), the reference's SVD likewise; in practice it is orders of magnitude
    smaller.  ``1e-9`` covers this comfortably up to ``n`` of a few thousand; beyond that the
    bound ``n**2 * eps`` takes over.
    """
    return max(1e-9, float(n) * float(n) * _EPS)


@contextmanager
def quiet(A: Any) -> Iterator[None]:
    """No autograd, and autocast disabled for the input's device type, while metrics run."""
    device_type = A.device.type if isinstance(A, Tensor) else "cpu"
    with ExitStack() as stack:
        stack.enter_context(torch.no_grad())
        try:
            stack.enter_context(torch.autocast(device_type=device_type, enabled=False))
        except (RuntimeError, ValueError):  # a device type without autocast support
            pass
        yield


def count_from_descending(values: Tensor, tau: float, rel: float) -> tuple[Tensor, Tensor]:
    """Batched ``searchsorted(cumsum, tau * total) + 1`` plus a near-threshold flag.

    ``values``: ``(N, n)`` non-negative, sorted in descending order.  Returns ``k`` (the
    smallest k whose prefix sum reaches ``tau`` of the total) and ``near``, true where one
    of the two decisive comparisons ``c[k-1] >= thr`` and ``c[k-2] < thr`` is within
    ``rel * total`` of the threshold and therefore could go the other way under rounding.
    """
    c = values.cumsum(dim=-1)
    total = c[:, -1:]
    thr = tau * total
    k = (c < thr).sum(dim=-1, keepdim=True) + 1  # <= n since c[-1] >= tau * c[-1]
    margin = rel * total
    at_k = c.gather(-1, k - 1)
    before_k = c.gather(-1, (k - 2).clamp_min(0))
    near = ((at_k - thr).abs() <= margin) | ((k >= 2) & ((thr - before_k).abs() <= margin))
    return k.squeeze(-1), near.squeeze(-1)
