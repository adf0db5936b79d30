"""Tests for attn_probe.metrics: exact agreement with a float64 per-head reference, constructed
cases with known answers, near-threshold constructions, invariances and edge cases."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attn_probe.metrics import matrix
from reference import reference_columns, reference_entropy_sink, reference_rank
from attn_probe.metrics import (
    columns_at,
    dominant_column,
    head_metrics,
    rank_at,
    row_entropy,
    sink_mass,
)


pytestmark = pytest.mark.usefixtures("single_thread")


# --------------------------------------------------------------------------------------------
# float64 reference (tests/reference.py): one head at a time
# --------------------------------------------------------------------------------------------


def per_matrix(reference, A: torch.Tensor, tau: float) -> torch.Tensor:
    """``reference`` (one matrix -> int) over every matrix of A, in A's batch shape."""
    flat = A.reshape(-1, *A.shape[-2:])
    return torch.tensor([reference(a, tau) for a in flat], dtype=torch.int64).reshape(A.shape[:-2])


def ref_rank(A: torch.Tensor, tau: float = 0.9) -> torch.Tensor:
    return per_matrix(reference_rank, A, tau)


def ref_columns(A: torch.Tensor, tau: float = 0.9) -> torch.Tensor:
    return per_matrix(reference_columns, A, tau)


def softmax_heads(heads: int, T: int, beta: float, causal: bool, seed: int,
                  Tk: int | None = None) -> torch.Tensor:
    """Random attention: softmax of Gaussian logits times ``beta`` (inverse temperature)."""
    g = torch.Generator().manual_seed(seed)
    Tk = T if Tk is None else Tk
    logits = torch.randn(heads, T, Tk, generator=g, dtype=torch.float64) * beta
    if causal:
        mask = torch.ones(T, Tk, dtype=torch.bool).tril()
        logits = logits.masked_fill(~mask, float("-inf"))
    return torch.softmax(logits, dim=-1)


def collapsed_heads(heads: int, T: int, seed: int, two_keys: bool = False) -> torch.Tensor:
    """Lazy heads: almost all mass on key 0 (optionally shared with key 1) plus causal noise."""
    g = torch.Generator().manual_seed(seed)
    noise = softmax_heads(heads, T, 1.0, True, seed + 1)
    leak = 0.02 + 0.1 * torch.rand(heads, T, 1, generator=g, dtype=torch.float64)
    A = noise * leak
    if two_keys:
        share = torch.rand(heads, T, 1, generator=g, dtype=torch.float64) * 0.6
        share[:, 0] = 0.0
    else:
        share = torch.zeros(heads, T, 1, dtype=torch.float64)
    A[..., 0] += ((1 - leak) * (1 - share))[..., 0]
    A[..., 1] += ((1 - leak) * share)[..., 0]
    return A


def assert_matches_reference(A: torch.Tensor, tau: float = 0.9) -> None:
    assert torch.equal(rank_at(A, tau), ref_rank(A, tau))
    assert torch.equal(columns_at(A, tau), ref_columns(A, tau))


def orthogonal(n: int, g: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


# --------------------------------------------------------------------------------------------
# Agreement with the reference on random attention
# --------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    T=st.sampled_from([1, 2, 3, 4, 5, 7, 8, 9, 10, 13, 16, 24, 33, 48, 64, 100]),
    heads=st.integers(1, 4),
    log_beta=st.floats(-4.0, 4.0),
    causal=st.booleans(),
    tau=st.sampled_from([0.5, 0.75, 0.9, 0.95, 0.99, 1.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_softmax_matches_reference(T, heads, log_beta, causal, tau, seed):
    A = softmax_heads(heads, T, math.exp(log_beta), causal, seed)
    assert_matches_reference(A, tau)


@settings(max_examples=30, deadline=None)
@given(
    T=st.integers(9, 80),
    r=st.integers(1, 6),
    log_beta=st.floats(-3.0, 2.0),
    causal=st.booleans(),
    tau=st.sampled_from([0.5, 0.9, 0.99]),
    seed=st.integers(0, 2**31 - 1),
)
def test_low_rank_mixtures_match_reference(T, r, log_beta, causal, tau, seed):
    """Rows mixing r base distributions (rank <= r): exercises the certified cheap path."""
    g = torch.Generator().manual_seed(seed)
    base = torch.softmax(torch.randn(r, T, generator=g, dtype=torch.float64)
                         * math.exp(log_beta) * 3, dim=-1)
    weights = torch.softmax(torch.randn(3, T, r, generator=g, dtype=torch.float64), dim=-1)
    A = weights @ base
    if causal:  # zero the future and renormalise: no longer exactly low rank
        A = A.tril()
        A = A / A.sum(-1, keepdim=True)
    assert_matches_reference(A, tau)


@pytest.mark.parametrize("T,heads,causal", [(256, 3, True), (256, 2, False), (512, 1, True),
                                           (512, 1, False)])
def test_large_matrices_match_reference(T, heads, causal):
    A = softmax_heads(heads, T, 1.5, causal, seed=T + heads)
    assert_matches_reference(A.float())


@pytest.mark.parametrize("beta", [1e-3, 0.3, 1.0, 3.0, 30.0])
def test_temperatures_from_uniform_to_one_hot(beta):
    A = softmax_heads(4, 96, beta, True, seed=7)
    assert_matches_reference(A)
    assert_matches_reference(softmax_heads(4, 96, beta, False, seed=8))


def test_float32_input_matches_reference():
    A = softmax_heads(6, 64, 2.0, True, seed=3).float()
    assert_matches_reference(A)


# --------------------------------------------------------------------------------------------
# Constructed cases with answers worked out by hand
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("T", [1, 2, 7, 10, 33])
def test_identity(T):
    eye = torch.eye(T)
    # All T singular values and all T column masses are equal to 1.
    assert int(rank_at(eye, 1.0)) == T
    assert int(columns_at(eye, 1.0)) == T
    expected = math.ceil(Fraction(9, 10) * T)
    assert int(rank_at(eye, 0.9)) == expected == int(ref_rank(eye, 0.9))
    assert int(columns_at(eye, 0.9)) == expected == int(ref_columns(eye, 0.9))
    assert int(dominant_column(eye)) == 0
    assert float(row_entropy(eye)) == 0.0


@pytest.mark.parametrize("T", [1, 5, 64, 300])
def test_single_column(T):
    A = torch.zeros(T, T)
    A[:, 0] = 1.0  # every query attends only to key 0
    m = head_metrics(A)
    assert int(m["rank"]) == 1 and int(m["columns"]) == 1
    assert int(m["dominant"]) == 0
    assert float(m["sink"]) == 1.0 and float(m["entropy"]) == 0.0


@pytest.mark.parametrize("T", [1, 2, 6, 40, 129])
def test_uniform_causal(T):
    A = torch.ones(T, T, dtype=torch.float64).tril()
    A = A / A.sum(-1, keepdim=True)
    assert_matches_reference(A)
    assert_matches_reference(A, 0.5)
    # Column j holds sum_{i >= j} 1/(i+1)^2, decreasing in j: exact rational answer.
    masses = [sum(Fraction(1, (i + 1) ** 2) for i in range(j, T)) for j in range(T)]
    total, acc = sum(masses), Fraction(0)
    for k, mk in enumerate(masses, start=1):
        acc += mk
        if acc >= Fraction(0.9) * total:
            break
    assert int(columns_at(A)) == k
    assert int(dominant_column(A)) == 0
    assert float(sink_mass(A)) == pytest.approx(sum(1 / (i + 1) for i in range(T)) / T)
    assert float(row_entropy(A)) == pytest.approx(sum(math.log(i + 1) for i in range(T)) / T)


def block_uniform(sizes: list[int]) -> torch.Tensor:
    """Block-diagonal attention: a query in a block of size b attends uniformly within it."""
    return torch.block_diag(*[torch.full((b, b), 1.0 / b, dtype=torch.float64) for b in sizes])


def test_block_diagonal_known_answers():
    A = block_uniform([1, 2, 4, 8])
    # Each block (1/b) * ones(b, b) has a single singular value 1: four energies equal to 1.
    # Column masses: 1 (x1), 1/2 (x2), 1/4 (x4), 1/8 (x8), total 4, all exact in binary.
    assert int(rank_at(A, 0.9)) == 4  # need 3.6 of 4
    assert int(rank_at(A, 0.7)) == 3  # need 2.8
    assert int(columns_at(A, 0.9)) == 12  # 1 + 1 + 1 + 5/8 >= 3.6
    assert int(columns_at(A, 0.5)) == 3  # 1 + 1/2 + 1/2 == 2.0 exactly: threshold hit
    assert int(columns_at(A, 0.25)) == 1  # 1 == 1.0 exactly
    assert int(dominant_column(A)) == 0
    assert float(sink_mass(A)) == pytest.approx(1 / 15)
    expected_entropy = sum(b * math.log(b) for b in [1, 2, 4, 8]) / 15
    assert float(row_entropy(A)) == pytest.approx(expected_entropy)
    # At tau = 0.5 the rank threshold (2 of 4) is hit exactly; the reference decides.
    for tau in (0.25, 0.5, 0.75, 0.9, 1.0):
        assert_matches_reference(A, tau)


def test_equal_blocks_rank_is_block_count():
    A = block_uniform([16] * 8)  # 8 equal singular values, 120 zero ones
    assert int(rank_at(A, 0.9)) == 8  # ceil(7.2)
    assert int(columns_at(A, 0.9)) == 116  # ceil(0.9 * 128) = 116 equal columns
    assert_matches_reference(A, 0.9)
    assert_matches_reference(A, 0.5)  # 4 of 8: exactly at the threshold


# --------------------------------------------------------------------------------------------
# Near-threshold constructions: cumulative energy at tau exactly or within 1e-15
# --------------------------------------------------------------------------------------------


def with_spectrum(s2: list[float], n: int, seed: int, count: int) -> torch.Tensor:
    """``count`` matrices U diag(s) V^T with prescribed squared singular values."""
    g = torch.Generator().manual_seed(seed)
    s = torch.zeros(n, dtype=torch.float64)
    s[: len(s2)] = torch.tensor(s2, dtype=torch.float64).sqrt()
    mats = [orthogonal(n, g) @ torch.diag(s) @ orthogonal(n, g).T for _ in range(count)]
    return torch.stack(mats)


@pytest.mark.parametrize("delta", [0.0, 1e-15, -1e-15, 3e-16, -3e-16, 1e-12, -1e-12, 1e-9, -1e-9,
                                   1e-6, -1e-6])
@pytest.mark.parametrize("n", [4, 12, 40])
def test_singular_energy_at_threshold(delta, n):
    A = with_spectrum([0.9 + delta, 0.1 - delta], n, seed=n, count=8)
    assert_matches_reference(A, 0.9)
    B = with_spectrum([0.5 + delta, 0.3, 0.1, 0.1 - delta], n, seed=n + 1, count=8)
    for tau in (0.5, 0.8, 0.9, 1.0):
        assert_matches_reference(B, tau)


def test_singular_energy_at_threshold_scaled():
    # Powers of two keep the proportions exact at any scale.
    for scale in (2.0**-40, 1.0, 2.0**40):
        A = with_spectrum([0.75 * scale, 0.25 * scale], 24, seed=5, count=6)
        assert_matches_reference(A, 0.75)


@settings(max_examples=25, deadline=None)
@given(
    weights=st.lists(st.integers(1, 8), min_size=2, max_size=6),
    cut=st.integers(1, 5),
    n=st.integers(6, 30),
    seed=st.integers(0, 10_000),
)
def test_random_rational_spectra_at_threshold(weights, cut, n, seed):
    """tau is chosen as an exact cumulative share of the energies."""
    cut = min(cut, len(weights) - 1)
    total = sum(weights)
    tau = sum(sorted(weights, reverse=True)[:cut]) / total
    A = with_spectrum([w / total for w in weights], n, seed, count=3)
    assert_matches_reference(A, tau)


def test_rational_column_masses_at_threshold():
    # Entries 0.5 and 0.25 have exact squares; column masses 1/2, 1/4, 1/4 of the total.
    A = torch.tensor([[0.5, 0.5, 0.0, 0.0],
                      [0.5, 0.0, 0.5, 0.0],
                      [0.5, 0.0, 0.0, 0.5],
                      [0.5, 0.5, 0.0, 0.0]], dtype=torch.float64)
    # masses: col0 = 1.0, col1 = 0.5, col2 = 0.25, col3 = 0.25 -> total 2
    assert int(columns_at(A, 0.5)) == 1
    assert int(columns_at(A, 0.75)) == 2
    assert int(columns_at(A, 0.875)) == 3
    assert int(columns_at(A, 1.0)) == 4
    for tau in (0.5, 0.75, 0.875, 1.0, 0.9):
        assert_matches_reference(A, tau)


@pytest.mark.parametrize("T", [4, 10, 64])
def test_identity_half_is_exact_tie(T):
    eye = torch.eye(T, dtype=torch.float64)
    assert int(rank_at(eye, 0.5)) == T // 2 == int(ref_rank(eye, 0.5))
    assert int(columns_at(eye, 0.5)) == T // 2 == int(ref_columns(eye, 0.5))


# --------------------------------------------------------------------------------------------
# Rectangular input, batch shapes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 5, 9), (3, 9, 5), (2, 40, 100), (2, 100, 40), (1, 1, 7),
                                   (1, 7, 1)])
def test_rectangular(shape):
    heads, tq, tk = shape
    A = softmax_heads(heads, tq, 1.0, False, seed=tq * tk, Tk=tk)
    assert_matches_reference(A)
    r = rank_at(A)
    assert bool(((r >= 1) & (r <= min(tq, tk))).all())


def test_rectangular_collapsed():
    A = collapsed_heads(3, 120, seed=1)[:, :, :60]  # wide and tall variants of lazy heads
    assert_matches_reference(A)
    assert_matches_reference(A.mT.contiguous())


@pytest.mark.parametrize("batch", [(), (3,), (2, 3, 4), (1, 1)])
def test_batch_shape_preserved(batch):
    T = 6
    A = softmax_heads(int(np.prod(batch, dtype=int)), T, 1.0, True, seed=1).reshape(*batch, T, T)
    m = head_metrics(A)
    for key, value in m.items():
        assert value.shape == torch.Size(batch), key
    assert m["rank"].dtype == torch.int64 and m["columns"].dtype == torch.int64
    assert m["dominant"].dtype == torch.int64
    assert m["entropy"].is_floating_point() and m["sink"].is_floating_point()
    assert torch.equal(m["rank"], ref_rank(A))
    assert torch.equal(rank_at(A), m["rank"])
    assert torch.equal(columns_at(A), m["columns"])
    assert torch.equal(dominant_column(A), m["dominant"])
    assert torch.equal(row_entropy(A), m["entropy"])
    assert torch.equal(sink_mass(A), m["sink"])


# --------------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(
    T=st.integers(1, 40),
    log_beta=st.floats(-2.0, 3.0),
    causal=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
    scale=st.sampled_from([1e-30, 1e-3, 0.37, 3.0, 1e4, 1e40]),
)
def test_properties(T, log_beta, causal, seed, scale):
    A = softmax_heads(2, T, math.exp(log_beta), causal, seed)
    r, c = rank_at(A), columns_at(A)
    assert bool(((r >= 1) & (r <= T)).all()) and bool(((c >= 1) & (c <= T)).all())
    # monotone in tau; all of the energy never needs more than the nonzero columns
    assert bool((rank_at(A, 0.5) <= r).all()) and bool((r <= rank_at(A, 1.0)).all())
    assert bool((columns_at(A, 0.5) <= c).all())
    assert bool((columns_at(A, 1.0) <= (A != 0).any(-2).sum(-1)).all())
    # simultaneous row/column permutation
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(T, generator=g)
    P = A[:, perm][:, :, perm]
    assert torch.equal(rank_at(P), r) and torch.equal(columns_at(P), c)
    # positive scaling of the whole matrix
    assert torch.equal(rank_at(A * scale), r) and torch.equal(columns_at(A * scale), c)
    assert torch.equal(dominant_column(A * scale), dominant_column(A))
    # the dominant column is the one with the largest squared mass
    d = dominant_column(A)
    mass = (A**2).sum(-2)
    assert torch.equal(mass.gather(-1, d[:, None]).squeeze(-1), mass.max(-1).values)


@pytest.mark.parametrize("exponent", [-600, -300, 300, 600, 1000])
def test_extreme_magnitudes(exponent):
    """Exact power-of-two scalings whose squares would under/overflow: same integers."""
    A = torch.cat([softmax_heads(3, 40, 1.0, True, seed=6), collapsed_heads(2, 40, seed=7)])
    expected = head_metrics(A)
    m = head_metrics(A * 2.0**exponent)
    for key in ("rank", "columns", "dominant"):
        assert torch.equal(m[key], expected[key]), key
    assert torch.equal(rank_at(A * 2.0**exponent, 0.5), rank_at(A, 0.5))


def test_dominant_ties_lowest_index():
    A = torch.zeros(4, 4)
    A[:, 2] = 0.5
    A[:, 3] = 0.5
    assert int(dominant_column(A)) == 2
    assert int(dominant_column(torch.full((3, 5), 0.2))) == 0


# --------------------------------------------------------------------------------------------
# Certified cheap path vs dense path
# --------------------------------------------------------------------------------------------


def test_certified_and_dense_paths_agree(monkeypatch):
    lazy = collapsed_heads(6, 128, seed=11)
    lazy2 = collapsed_heads(6, 128, seed=12, two_keys=True)
    busy = softmax_heads(6, 128, 1.0, True, seed=13)
    order = torch.randperm(18, generator=torch.Generator().manual_seed(0))
    mixed = torch.cat([lazy, busy, lazy2])[order]
    expected = ref_rank(mixed)
    assert set(expected.tolist()) & {1, 2}  # collapsed heads present
    assert expected.max() > 10  # full-rank-ish heads present

    certified_counts = []
    original = matrix._certify_rank

    def spy(*args, **kwargs):
        k, ok = original(*args, **kwargs)
        certified_counts.append(int(ok.sum()))
        return k, ok

    monkeypatch.setattr(matrix, "_certify_rank", spy)
    fast = rank_at(mixed)
    assert torch.equal(fast, expected)
    assert sum(certified_counts) >= 10  # the lazy heads took the cheap path ...
    assert sum(certified_counts) <= 12  # ... and the busy ones did not

    # Same answers with the cheap path switched off (everything through the dense path) ...
    monkeypatch.setattr(matrix, "_certify_rank",
                        lambda theta, *a: (torch.ones_like(theta[:, 0], dtype=torch.int64),
                                           torch.zeros_like(theta[:, 0], dtype=torch.bool)))
    assert torch.equal(rank_at(mixed), expected)
    # ... and head by head.
    monkeypatch.setattr(matrix, "_certify_rank", original)
    single = torch.stack([rank_at(a) for a in mixed])
    assert torch.equal(single, expected)


@pytest.mark.parametrize("steps", [0, 1, 3])
def test_certificate_bounds_are_sound(steps):
    """Ky Fan lower bounds and interlacing upper bounds hold for the Ritz values."""
    A = torch.cat([collapsed_heads(4, 64, seed=2), softmax_heads(4, 64, 1.0, True, seed=3),
                   softmax_heads(2, 64, 0.05, False, seed=4)])
    colmass = (A**2).sum(-2)
    w = matrix._start_block(A, colmass, 4)
    for _ in range(steps):
        w = matrix._subspace_step(A, w)
    theta = matrix._ritz(w)
    s2 = torch.linalg.svdvals(A) ** 2
    E = s2.cumsum(-1)[:, :4]
    L = theta.cumsum(-1)
    total = s2.sum(-1, keepdim=True)
    U = total - (theta.sum(-1, keepdim=True) - L)  # U_k = total - sum_{j>k} theta_j
    tol = 1e-12 * total
    assert bool((L <= E + tol).all()) and bool((E <= U + tol).all())
    assert bool((theta <= s2[:, :4] + tol).all())
    # the start block spans the all-ones vector and the heaviest columns exactly
    v_energy = theta.sum(-1)
    assert bool((v_energy <= total.squeeze(-1) + tol.squeeze(-1)).all())


def test_fallback_used_only_near_threshold(monkeypatch):
    calls = []
    original = matrix._reference_count

    def spy(*args):
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(matrix, "_reference_count", spy)
    rank_at(softmax_heads(8, 64, 1.0, True, seed=4))
    columns_at(softmax_heads(8, 64, 1.0, True, seed=4))
    assert not calls
    assert int(rank_at(torch.eye(10), 0.5)) == 5
    assert calls


# --------------------------------------------------------------------------------------------
# Entropy and sink against direct float64 formulas
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [True, False])
def test_entropy_and_sink_direct(causal):
    A = softmax_heads(5, 37, 2.0, causal, seed=9)
    A[1, 3:7] = 0.0  # some fully masked queries
    A[2] = 0.0
    ent, sink = row_entropy(A), sink_mass(A)
    assert ent.dtype == torch.float64
    for h in range(5):
        e, s = reference_entropy_sink(A[h])
        assert float(ent[h]) == pytest.approx(e, rel=1e-12, abs=1e-15)
        assert float(sink[h]) == pytest.approx(s, rel=1e-12, abs=1e-15)
    # the uniform distribution over T keys has entropy log T
    assert float(row_entropy(torch.full((4, 8), 1 / 8))) == pytest.approx(math.log(8))


# --------------------------------------------------------------------------------------------
# Edge cases
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_matrix_is_isolated(bad):
    A = softmax_heads(3, 20, 1.0, True, seed=1)
    clean = head_metrics(A)
    A[1, 4, 2] = bad
    m = head_metrics(A)
    assert int(m["rank"][1]) == -1 and int(m["columns"][1]) == -1
    assert int(m["dominant"][1]) == -1
    assert math.isnan(float(m["entropy"][1])) and math.isnan(float(m["sink"][1]))
    for key in m:
        assert torch.equal(m[key][[0, 2]], clean[key][[0, 2]]), key
    assert int(rank_at(A)[1]) == -1 and int(columns_at(A)[1]) == -1
    assert math.isnan(float(row_entropy(A)[1])) and math.isnan(float(sink_mass(A)[1]))
    assert int(dominant_column(A)[1]) == -1


@pytest.mark.parametrize("T", [1, 3, 50])
def test_all_zero_matrix(T):
    A = torch.zeros(2, T, T)
    A[1] = torch.eye(T)
    m = head_metrics(A)
    assert int(m["rank"][0]) == 0 and int(m["columns"][0]) == 0
    assert int(m["dominant"][0]) == -1
    assert float(m["entropy"][0]) == 0.0 and float(m["sink"][0]) == 0.0
    assert int(m["rank"][1]) == math.ceil(0.9 * T)


@pytest.mark.parametrize("shape", [(0, 0), (3, 0, 0), (2, 3, 0), (2, 0, 3)])
def test_empty_matrices(shape):
    A = torch.zeros(shape)
    m = head_metrics(A)
    batch = torch.Size(shape[:-2])
    for key, value in m.items():
        assert value.shape == batch, key
    assert bool((m["rank"] == 0).all()) and bool((m["columns"] == 0).all())
    assert bool((m["entropy"] == 0).all()) and bool((m["sink"] == 0).all())
    assert bool((m["dominant"] == -1).all())


def test_empty_batch():
    m = head_metrics(torch.zeros(0, 5, 5))
    for value in m.values():
        assert value.shape == (0,)


@pytest.mark.parametrize("bad", [torch.tensor(1.0), torch.ones(5)])
def test_too_few_dims(bad):
    for fn in (rank_at, columns_at, row_entropy, sink_mass, dominant_column, head_metrics):
        with pytest.raises(ValueError, match=r"\(\.\.\., T, T\)"):
            fn(bad)


@pytest.mark.parametrize("tau", [0.0, -0.1, 1.0000001, 2.0, float("nan"), "a"])
def test_bad_tau(tau):
    A = torch.eye(3)
    for fn in (rank_at, columns_at, head_metrics):
        with pytest.raises(ValueError, match="tau"):
            fn(A, tau)


def test_complex_input_rejected():
    with pytest.raises(TypeError, match="complex"):
        rank_at(torch.eye(3, dtype=torch.complex64))


def test_integer_and_bool_inputs():
    eye_i = torch.eye(6, dtype=torch.int64)
    eye_b = torch.eye(6, dtype=torch.bool)
    for A in (eye_i, eye_b):
        m = head_metrics(A, 1.0)
        assert int(m["rank"]) == 6 and int(m["columns"]) == 6
        assert float(m["sink"]) == pytest.approx(1 / 6)
    assert int(rank_at(np.eye(4), 1.0)) == 4  # array-likes are accepted too


def test_low_precision_and_views():
    A = softmax_heads(3, 30, 1.0, True, seed=2)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        assert_matches_reference(A.to(dtype))
    At = A.mT  # non-contiguous view
    assert_matches_reference(At)


def test_zero_rows_do_not_produce_nan():
    A = softmax_heads(2, 16, 1.0, True, seed=5)
    A[:, ::2] = 0.0  # every other query fully masked
    m = head_metrics(A)
    for value in m.values():
        assert not bool(torch.isnan(value.double()).any())
    assert_matches_reference(A)


def test_no_grad_and_autocast():
    A = softmax_heads(2, 24, 1.0, True, seed=6).float().requires_grad_(True)
    expected = head_metrics(A.detach())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        m = head_metrics(A)
    with torch.no_grad():
        m2 = head_metrics(A)
    for key in expected:
        assert torch.equal(m[key], expected[key]) and torch.equal(m2[key], expected[key])
        assert not m[key].requires_grad


# --------------------------------------------------------------------------------------------
# CPU / CUDA agreement
# --------------------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
def test_cpu_cuda_agree():
    A = torch.cat([softmax_heads(4, 128, 1.0, True, seed=1), collapsed_heads(4, 128, seed=2),
                   softmax_heads(2, 128, 0.05, False, seed=3),
                   torch.eye(128, dtype=torch.float64)[None], torch.zeros(1, 128, 128,
                                                                        dtype=torch.float64)])
    A[0, 3, 3] = float("nan")
    for tau in (0.5, 0.9):
        cpu = head_metrics(A, tau)
        gpu = head_metrics(A.cuda(), tau)
        for key in cpu:
            assert gpu[key].device.type == "cuda"
            if key in ("rank", "columns", "dominant"):
                assert torch.equal(gpu[key].cpu(), cpu[key]), key
            else:
                torch.testing.assert_close(gpu[key].cpu(), cpu[key], equal_nan=True)
        clean = A[1:-1]
        assert torch.equal(rank_at(clean.cuda(), tau).cpu(), ref_rank(clean, tau))
        assert torch.equal(columns_at(clean.cuda(), tau).cpu(), ref_columns(clean, tau))
