"""full_context_stats against an independent float64 reference on the materialised matrix.

The reference builds the whole score matrix of one sequence in float64
(``q.double() @ k.double().T * scale + mask``), takes the softmax, and reads every figure off
it: entropy ``-sum p log p``, ``A[:, 0]``, the largest allowed score, the column masses
``(A**2).sum(-2)`` with the notebook's ``searchsorted(cumsum, tau * total) + 1`` and argmax.
Nothing here imports the module's internals.  Floats must agree to 1e-9 relative; the
integers must agree wherever the reference's own decision is farther than 1e-9 of the total
from its threshold (two float64 summation orders can only disagree closer than that), and
random data must never come that close.
"""

from __future__ import annotations

import math

import pytest
import torch

from attn_probe.attention import AttentionInputs, AttentionScores
from attn_probe.metrics import block_rows, full_context_metrics, full_context_stats
from attn_probe.metrics.scores import scores_stats
from reference import tau_count

TAU = 0.9
RTOL = 1e-9
ATOL = 1e-14  # for figures that are exactly 0 in one summation order and ~1e-17 in another
NEAR = 1e-9
FLOATS = ("entropy", "entropy_norm", "sink", "sink_logit_mass", "max_logit", "logit_spread",
          "query_norm", "key_norm")
INTEGERS = ("columns", "dominant", "tokens", "kv_head")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small matrices: a second intra-op thread only adds synchronisation."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# --------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------


def reference(q, k, *, mask=None, causal=False, scale=None, sink=None, tau=TAU):
    """Figures of one sequence: ``q`` (H, L, E), ``k`` (H_kv, S, E), ``mask`` broadcastable
    to (H, L, S), bool (True = may attend) or additive float.  Returns (H,) tensors, plus the
    relative distances of the integer decisions from their thresholds."""
    heads, length, dim = q.shape
    group = heads // k.shape[0]
    centred = k.double() - k.double().mean(dim=1, keepdim=True)
    key_norm = centred.square().sum(dim=-1).mean(dim=-1).sqrt().repeat_interleave(group)
    k = k.repeat_interleave(group, dim=0)
    keys = k.shape[1]
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    scores = q.double() @ k.double().mT * scale
    allowed = torch.ones(heads, length, keys, dtype=torch.bool)
    if causal:
        allowed &= torch.ones(length, keys, dtype=torch.bool).tril()
    if mask is not None:
        if mask.dtype == torch.bool:
            allowed &= mask
        else:
            scores = scores + mask.double()
            allowed &= torch.isfinite(mask)
    logits = scores.masked_fill(~allowed, -math.inf)
    if sink is not None:
        column = sink.double()[:, None, None].expand(heads, length, 1)
        logits = torch.cat([logits, column], dim=-1)
    measured = allowed.any(dim=-1)

    out = {name: [] for name in FLOATS + INTEGERS + ("columns_gap", "dominant_gap")}
    for h in range(heads):
        rows = measured[h]
        n = int(rows.sum())
        out["tokens"].append(n)
        out["kv_head"].append(h // group)
        out["key_norm"].append(float(key_norm[h]))
        if n == 0:
            for name, empty in (("entropy", 0.0), ("entropy_norm", 0.0), ("sink", 0.0),
                                ("sink_logit_mass", 0.0), ("max_logit", -math.inf),
                                ("logit_spread", -math.inf), ("query_norm", 0.0),
                                ("columns", 0), ("dominant", -1), ("columns_gap", 1.0),
                                ("dominant_gap", 1.0)):
                out[name].append(empty)
            continue
        allowed_scores = scores[h, rows].masked_fill(~allowed[h, rows], math.nan)
        top = allowed_scores.nan_to_num(-math.inf).amax(dim=-1)
        out["logit_spread"].append(float((top - allowed_scores.nanmean(dim=-1)).max()))
        scaled = q[h, rows].double() * scale
        out["query_norm"].append(float(scaled.square().sum(dim=-1).mean().sqrt()))
        p = torch.softmax(logits[h, rows], dim=-1)
        a = p[:, :keys]
        entropy = -torch.xlogy(p, p).sum(dim=-1)
        outcomes = allowed[h, rows].sum(dim=-1) + (sink is not None)
        several = outcomes >= 2
        norm = entropy[several] / outcomes[several].double().log()
        out["entropy"].append(float(entropy.mean()))
        out["entropy_norm"].append(float(norm.mean()) if norm.numel() else 0.0)
        out["sink"].append(float(a[:, 0].mean()))
        out["sink_logit_mass"].append(float(p[:, keys].mean()) if sink is not None else 0.0)
        out["max_logit"].append(float(scores[h][allowed[h]].max()))
        masses = (a**2).sum(dim=-2)
        ordered = masses.sort(descending=True).values
        columns, gap = tau_count(ordered)
        out["columns"].append(columns)
        out["columns_gap"].append(gap)
        out["dominant"].append(int(masses.argmax()))
        top_two = float(ordered[0] - ordered[1]) if keys > 1 else float(ordered[0])
        out["dominant_gap"].append(top_two / float(ordered.sum()))
    return {
        name: torch.tensor(values, dtype=torch.int64 if name in INTEGERS else torch.float64)
        for name, values in out.items()
    }


def assert_matches(got: dict, b: int, ref: dict) -> None:
    """Sequence ``b`` of ``got`` against the reference of that sequence."""
    for name in FLOATS:
        torch.testing.assert_close(got[name][b], ref[name], rtol=RTOL, atol=ATOL,
                                   msg=lambda m, name=name: f"{name}: {m}")
    assert torch.equal(got["tokens"][b], ref["tokens"])
    for name in ("columns", "dominant"):
        decided = ref[f"{name}_gap"] > NEAR
        assert bool(decided.all()), f"random data came within {NEAR} of a {name} threshold"
        assert torch.equal(got[name][b][decided], ref[name][decided]), name


def check_batch(q, k, *, mask=None, causal=False, **kwargs) -> dict:
    """full_context_stats on the batch against the reference of each sequence."""
    got = full_context_stats(q, k, attn_mask=mask, is_causal=causal, **kwargs)
    assert set(got) == set(FLOATS + INTEGERS)
    for name in FLOATS:
        assert got[name].dtype == torch.float64 and got[name].shape == (q.shape[0], q.shape[1])
    for name in INTEGERS:
        assert got[name].dtype == torch.int64 and got[name].shape == (q.shape[0], q.shape[1])
    for b in range(q.shape[0]):
        seq_mask = None
        if mask is not None:
            m = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
            seq_mask = m[b if m.shape[0] > 1 else 0]
        ref = reference(q[b], k[b], mask=seq_mask, causal=causal, scale=kwargs.get("scale"),
                        sink=kwargs.get("sink_logits"))
        assert_matches(got, b, ref)
    return got


def qk(batch=2, heads=4, length=64, dim=16, kv_heads=None, keys=None, seed=0, spread=1.0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, length, dim, generator=gen) * spread
    k = torch.randn(batch, kv_heads or heads, keys or length, dim, generator=gen) * spread
    return q, k


# --------------------------------------------------------------------------------------------
# Masks and shapes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [True, False])
def test_matches_reference(causal):
    q, k = qk(length=96, spread=1.5)
    check_batch(q, k, causal=causal)


def test_uniform_attention_has_normalised_entropy_one():
    q, k = qk(batch=1, heads=2, length=30)
    got = full_context_stats(torch.zeros_like(q), k, is_causal=True)
    rows = torch.arange(1, 31, dtype=torch.float64)
    torch.testing.assert_close(got["entropy"][0], rows.log().mean().expand(2), rtol=RTOL, atol=0)
    torch.testing.assert_close(got["entropy_norm"][0], torch.ones(2, dtype=torch.float64),
                               rtol=RTOL, atol=0)
    torch.testing.assert_close(got["sink"][0], (1 / rows).mean().expand(2), rtol=RTOL, atol=0)


def test_long_causal_sequence():
    q, k = qk(batch=1, heads=2, length=2048, dim=16, seed=1, spread=1.5)
    got = check_batch(q, k, causal=True)
    assert got["tokens"].eq(2048).all()


def test_tiny_budget_splits_rows_and_changes_nothing():
    q, k = qk(batch=2, heads=4, length=80, seed=2, spread=2.0)
    assert block_rows(4, 80, 1) == 1  # one query row per block: 80 blocks per head chunk
    assert block_rows(4, 80, 16 * 4 * 80 * 10) == 10
    wide = check_batch(q, k, causal=True)
    for budget in (1, 200_000):  # one row per block; blocks of 16 rows
        narrow = check_batch(q, k, causal=True, memory_budget=budget)
        for name in FLOATS:
            torch.testing.assert_close(narrow[name], wide[name], rtol=1e-12, atol=0)
        for name in INTEGERS:
            assert torch.equal(narrow[name], wide[name])


@pytest.mark.parametrize("heads, kv_heads", [(4, 2), (2, 2)])
def test_per_head_mask_in_small_head_chunks(heads, kv_heads):
    q, k = qk(batch=2, heads=heads, kv_heads=kv_heads, length=45, seed=16)
    gen = torch.Generator().manual_seed(17)
    mask = torch.rand(2, heads, 45, 45, generator=gen) < 0.6
    wide = check_batch(q, k, mask=mask, causal=True)
    for budget in (1, 20_000):  # one key head per chunk; one or two rows per block
        narrow = check_batch(q, k, mask=mask, causal=True, memory_budget=budget)
        for name in INTEGERS:
            assert torch.equal(narrow[name], wide[name])


def test_sliding_window_bool_mask():
    q, k = qk(length=100, seed=3, spread=1.5)
    i = torch.arange(100)
    window = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < 16)
    check_batch(q, k, mask=window)
    check_batch(q, k, mask=window, causal=True)  # both apply


def test_additive_float_mask_with_neg_inf_and_a_fully_masked_row():
    q, k = qk(batch=2, heads=3, length=70, seed=4)
    gen = torch.Generator().manual_seed(5)
    mask = torch.randn(2, 3, 70, 70, generator=gen)
    mask[torch.rand(2, 3, 70, 70, generator=gen) < 0.3] = -math.inf
    mask[..., 0] = 0.0
    mask[0, 1, 7] = -math.inf  # query 7 of head 1 may attend to no key
    got = check_batch(q, k, mask=mask)
    assert got["tokens"][0, 1] == 69 and got["tokens"][0, 0] == 70
    assert torch.isfinite(got["entropy"]).all()


def test_bool_mask_with_fully_masked_rows_and_heads():
    q, k = qk(batch=1, heads=3, length=40, seed=6)
    mask = torch.ones(1, 3, 40, 40, dtype=torch.bool).tril()
    mask[0, 0, 5:9] = False  # four queries without any key
    mask[0, 2] = False  # a head without any measured row
    got = check_batch(q, k, mask=mask)
    assert got["tokens"].tolist() == [[36, 40, 0]]
    assert got["entropy"][0, 2] == 0 and got["sink"][0, 2] == 0
    assert got["max_logit"][0, 2] == -math.inf
    assert got["columns"][0, 2] == 0 and got["dominant"][0, 2] == -1
    assert not any(torch.isnan(v).any() for v in got.values() if v.is_floating_point())


def test_grouped_query_attention():
    q, k = qk(batch=1, heads=8, kv_heads=2, length=72, seed=7, spread=1.5)
    check_batch(q, k, causal=True)
    expanded = full_context_stats(q, k.repeat_interleave(4, dim=1), is_causal=True)
    grouped = full_context_stats(q, k, is_causal=True)
    for name in FLOATS:
        torch.testing.assert_close(grouped[name], expanded[name], rtol=1e-12, atol=0)


@pytest.mark.parametrize("length, keys, causal", [(48, 80, False), (80, 48, True)])
def test_cross_attention(length, keys, causal):
    q, k = qk(batch=2, heads=2, length=length, keys=keys, seed=8, spread=1.5)
    check_batch(q, k, causal=causal)


@pytest.mark.parametrize("causal", [True, False])
def test_learned_sink_logits(causal):
    q, k = qk(batch=2, heads=4, length=60, seed=9, spread=1.5)
    sink = torch.tensor([-3.0, 0.0, 2.5, 40.0])  # the last head gives the sink nearly all
    got = check_batch(q, k, causal=causal, sink_logits=sink)
    assert (got["sink_logit_mass"][:, 3] > 0.999).all()
    none = full_context_stats(q, k, is_causal=causal)
    assert none["sink_logit_mass"].eq(0).all()


def test_scale_single_head_bfloat16_and_max_sequences():
    q, k = qk(batch=3, heads=1, length=50, seed=10)
    got = full_context_stats(q[:, 0].bfloat16(), k[:, 0].bfloat16(), is_causal=True,
                             scale=0.3, batch_rows=2)
    assert got["entropy"].shape == (2, 1)
    for b in range(2):
        ref = reference(q[b].bfloat16(), k[b].bfloat16(), causal=True, scale=0.3)
        assert_matches(got, b, ref)


def test_first_key_dominance():
    q, k = qk(batch=1, heads=2, length=64, seed=11)
    u = torch.nn.functional.normalize(torch.ones(16), dim=0)
    q[0, 0] += 3.0 * u  # every query of head 0 points along u, and so does key 0
    k[0, 0, 0] = 8.0 * u
    got = check_batch(q, k, causal=True)
    assert got["dominant"][0, 0] == 0 and got["sink"][0, 0] > 0.5


# --------------------------------------------------------------------------------------------
# Padding
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("side", ["left", "right", "holes"])
@pytest.mark.parametrize("causal", [True, False])
def test_padded_sequence_gives_the_unpadded_figures(side, causal):
    length, real = 90, 61
    q, k = qk(batch=2, heads=3, length=length, seed=12, spread=1.5)
    gen = torch.Generator().manual_seed(13)
    padding = torch.zeros(2, length, dtype=torch.bool)
    if side == "left":
        padding[0, length - real:] = True
    elif side == "right":
        padding[0, :real] = True
    else:
        padding[0, torch.randperm(length, generator=gen)[:real]] = True
        padding[0, 0] = False  # the first real key is not key 0
    padding[1] = True  # an unpadded sequence beside it
    q[0][:, ~padding[0]] = math.nan  # garbage in padded positions must not matter
    k[0][:, ~padding[0]] = math.nan
    got = full_context_stats(q, k, is_causal=causal, key_padding=padding)
    kept = padding[0]
    assert_matches(got, 0, reference(q[0][:, kept], k[0][:, kept], causal=causal))
    assert_matches(got, 1, reference(q[1], k[1], causal=causal))


def eager_softmax(q, k, *, causal: bool, padding, sink):
    """What an eager attention's softmax sees and gives, in float64: scores
    ``q·kᵀ·scale + mask`` (-inf where a key is blocked: later keys under causality, padded
    keys), a last column holding each head's learned sink logit when ``sink`` is given, and
    the softmax over every column."""
    b, h, length, dim = q.shape
    scores = (q.double() @ k.double().transpose(-2, -1)) / math.sqrt(dim)
    allowed = torch.ones(length, k.shape[2], dtype=torch.bool)
    if causal:
        allowed = allowed.tril()
    scores = scores.masked_fill(~(allowed & padding[:, None, None, :]), -math.inf)
    if sink is not None:
        column = sink.double().view(1, h, 1, 1).expand(b, h, length, 1)
        scores = torch.cat([scores, column], dim=-1)
    return scores, torch.softmax(scores, dim=-1)


@pytest.mark.parametrize("sink", [False, True])
@pytest.mark.parametrize("causal", [True, False])
def test_eager_scores_give_the_streamed_figures(causal, sink):
    """The eager path (an eager softmax's own scores and probabilities: padding and the learned
    sink column split off by ``AttentionScores``, figures by ``scores_stats``) and the streamed
    path (``full_context_stats`` on q and k) give the same figures for the same attention:
    left-, right-, hole-padded and unpadded sequences side by side."""
    length, real = 40, 27
    q, k = qk(batch=4, heads=4, length=length, seed=21, spread=1.5)
    gen = torch.Generator().manual_seed(22)
    padding = torch.zeros(4, length, dtype=torch.bool)  # True: a real token
    padding[0, length - real:] = True                   # left
    padding[1, :real] = True                            # right
    padding[2, 1 + torch.randperm(length - 1, generator=gen)[:real]] = True  # holes, key 0 too
    padding[3] = True                                   # none
    sinks = torch.tensor([-2.0, 0.5, 3.0, 6.0]) if sink else None
    scores, probs = eager_softmax(q, k, causal=causal, padding=padding, sink=sinks)
    observed = AttentionScores.of(scores, probs)
    assert (observed.sink_mass is not None) == sink
    got = scores_stats(observed.scores, observed.probs, sink_mass=observed.sink_mass, tau=TAU)
    want = full_context_stats(q, k, is_causal=causal, sink_logits=sinks, key_padding=padding,
                              tau=TAU)
    assert set(got) == set(want) == set(FLOATS + INTEGERS)
    unknown = ("query_norm", "key_norm")  # the scores alone do not say what q and k were
    assert all(got[name].isnan().all() for name in unknown)
    for name in (name for name in FLOATS if name not in unknown):
        torch.testing.assert_close(got[name], want[name], rtol=RTOL, atol=ATOL,
                                   msg=lambda m, name=name: f"{name}: {m}")
    for name in INTEGERS:
        assert torch.equal(got[name], want[name]), (name, got[name], want[name])
    assert got["tokens"][:, 0].tolist() == [real, real, real, length]
    if sink:
        assert (got["sink_logit_mass"] > 0).all() and (got["entropy_norm"] <= 1).all()


def test_padding_with_a_user_mask_and_an_empty_sequence():
    q, k = qk(batch=2, heads=2, length=50, seed=14)
    padding = torch.ones(2, 50, dtype=torch.bool)
    padding[0, :12] = False
    padding[1] = False  # nothing real at all
    i = torch.arange(50)
    window = (i[:, None] - i[None, :]).abs() < 10
    got = full_context_stats(q, k, attn_mask=window, key_padding=padding)
    assert_matches(got, 0, reference(q[0, :, 12:], k[0, :, 12:], mask=window[12:, 12:]))
    assert got["tokens"][1].eq(0).all() and got["dominant"][1].eq(-1).all()
    assert got["max_logit"][1].eq(-math.inf).all()


# --------------------------------------------------------------------------------------------
# Non-finite input, validation, the probe's adapter
# --------------------------------------------------------------------------------------------


def test_nan_input_spoils_only_its_head():
    q, k = qk(batch=2, heads=4, kv_heads=2, length=40, seed=15)
    q[0, 1, 5, 3] = math.nan  # query head 1 of sequence 0
    k[1, 1, 20, 0] = math.inf  # key head 1 of sequence 1: query heads 2 and 3
    got = full_context_stats(q, k, is_causal=True)
    bad = torch.zeros(2, 4, dtype=torch.bool)
    bad[0, 1] = bad[1, 2] = bad[1, 3] = True
    for name in FLOATS:
        assert got[name][bad].isnan().all() and not got[name][~bad].isnan().any()
    for name in INTEGERS:
        assert got[name][bad].eq(-1).all()
    q[0, 1, 5, 3] = 0.0
    k[1, 1, 20, 0] = 0.0
    clean = full_context_stats(q, k, is_causal=True)
    for name in FLOATS + INTEGERS:
        assert torch.equal(got[name][~bad], clean[name][~bad])


def test_rejects_bad_arguments():
    q, k = qk(batch=1, heads=4, length=8)
    with pytest.raises(ValueError):
        full_context_stats(q, k[:, :3])  # 4 query heads over 3 key heads
    with pytest.raises(ValueError):
        full_context_stats(q, k, tau=1.5)
    with pytest.raises(ValueError):
        full_context_stats(q, k, attn_mask=torch.ones(3, 8, 8, dtype=torch.bool))
    with pytest.raises(ValueError):
        full_context_stats(q, k, key_padding=torch.ones(1, 7, dtype=torch.bool))
    with pytest.raises(ValueError):
        full_context_stats(q, k, sink_logits=torch.zeros(3))


def test_probe_adapter_names():
    q, k = qk(batch=1, heads=2, length=16)
    observed = AttentionInputs(q, k, is_causal=True)
    figures = full_context_metrics(observed, TAU)
    stats = full_context_stats(q, k, is_causal=True)
    assert torch.equal(figures["columns_full"], stats["columns"])
    assert torch.equal(figures["entropy_norm_full"], stats["entropy_norm"])
    assert torch.equal(figures["max_logit"], stats["max_logit"])
    assert full_context_metrics(torch.zeros(1, 2, 4, 4), TAU) == {}


# --------------------------------------------------------------------------------------------
# The logit figures
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [True, False])
def test_logit_spread_ignores_what_softmax_ignores(causal):
    """A vector added to every key (a key bias) adds ``q_i . b`` to all of query i's scores:
    softmax, and so every attention figure and the spread, do not move; the raw max logit
    does."""
    q, k = (x.double() for x in qk(batch=2, heads=4, kv_heads=2, length=50, seed=20, spread=1.5))
    bias = 25.0 * torch.nn.functional.normalize(torch.randn(16, generator=torch.Generator()
                                                            .manual_seed(21)), dim=0)
    bias = bias.double()
    plain = full_context_stats(q, k, is_causal=causal)
    shifted = check_batch(q, k + bias, causal=causal)
    for name in ("entropy", "entropy_norm", "sink", "logit_spread", "key_norm", "query_norm"):
        torch.testing.assert_close(shifted[name], plain[name], rtol=1e-9, atol=1e-9,
                                   msg=lambda m, name=name: f"{name}: {m}")
    assert not torch.allclose(shifted["max_logit"], plain["max_logit"], rtol=0.1)


def test_logit_spread_grows_with_the_norms_not_the_alignment():
    """Scaling every query by c and every key by d multiplies the spread by c * d, and so the
    query and the key norms; their ratio, the alignment, stays."""
    q, k = (x.double() for x in qk(batch=1, heads=2, length=40, seed=22, spread=1.0))
    base = full_context_stats(q, k, is_causal=True)
    grown = full_context_stats(3.0 * q, 2.0 * k, is_causal=True)
    torch.testing.assert_close(grown["logit_spread"], 6.0 * base["logit_spread"], rtol=1e-12,
                               atol=0)
    torch.testing.assert_close(grown["query_norm"], 3.0 * base["query_norm"], rtol=1e-12, atol=0)
    torch.testing.assert_close(grown["key_norm"], 2.0 * base["key_norm"], rtol=1e-12, atol=0)
