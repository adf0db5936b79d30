"""Tensor and context parallelism in real multi-process runs (gloo, CPU): every per-head figure
equal to the single-process run of the unsplit model, heads numbered globally.

A small Llama-style model (2 layers, width 32, 4 query heads over 2 key/value heads: layer 0
hands SDPA its key/value heads with ``enable_gqa``, layer 1 repeats them first, as Hugging
Face's ``repeat_kv`` does) is run on 2 and on 4 processes:

* tensor parallel with DTensor ``parallelize_module`` (``ColwiseParallel`` on ``wq, wk, wv``,
  ``RowwiseParallel`` on ``wo``, local heads by ``.view(B, T, -1, head_dim)``), found by the
  probe with nothing named; on 4 processes a data × tensor parallel mesh with FSDP2 over the data
  dimension;
* tensor parallel by hand (each process holds its heads' rows of ``wq, wk, wv`` as plain
  tensors): measured per global head when the group is named, left out with one warning when
  it is not;
* context parallel: each process holds a chunk of every sequence's tokens, attends over the
  all-gathered keys with a mask from global positions; contiguous chunks (equal and unequal)
  and the head-tail layout, with the crop below the sequence length.

Each process saves what its probe reported; the test process runs the unsplit model on the
same sequences in one process with the probe and compares every figure of every head.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the workers run this file as a script
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from attn_probe import (  # noqa: E402
    AttentionProbe, CaptureOptions, TensorBoardOutput, capture, rank_profile, register_adapter,
)
from attn_probe.aggregate import HeadAccumulator  # noqa: E402
from attn_probe.alerts import AlertRules, LogitRule, SinkRule  # noqa: E402
from attn_probe.attention import AttentionInputs  # noqa: E402
from attn_probe.metrics import full_context_metrics, head_metrics  # noqa: E402
from attn_probe.parallel import (  # noqa: E402
    HeadShard, Parallelism, declared_heads,
)
from attn_probe.figures import FIGURES  # noqa: E402
from reference import read_scalars  # noqa: E402
from test_distributed import launch, scenario_recorder  # noqa: E402

VOCAB, WIDTH, HEADS, KV_HEADS, LAYERS, LENGTH = 64, 32, 4, 2, 2, 24
HEAD_DIM = WIDTH // HEADS
BATCH, MEASURED = 3, 2  # sequences fed, and measured, per process
#: Thresholds at which this model's heads 2 fire: a sink in layer 0, a critical logit spread in
#: layer 1 (heads of the second slice under tensor parallelism).
ALERTS = AlertRules(sink=SinkRule(min_mass=0.2), logit=LogitRule(critical=19.0))
PROBE = dict(every=1, alerts=ALERTS, history=1)

needs_gloo = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available")


# ------------------------------------------------------------------------------------ model


class Attention(nn.Module):
    """Llama-style attention with the heads it has locally (``.view(B, T, -1, head_dim)``)."""

    def __init__(self, repeat_kv: bool) -> None:
        super().__init__()
        self.n_heads = HEADS  # the model's heads, as torchtitan's modules declare them
        self.wq = nn.Linear(WIDTH, HEADS * HEAD_DIM, bias=False)
        self.wk = nn.Linear(WIDTH, KV_HEADS * HEAD_DIM, bias=False)
        self.wv = nn.Linear(WIDTH, KV_HEADS * HEAD_DIM, bias=False)
        self.wo = nn.Linear(HEADS * HEAD_DIM, WIDTH, bias=False)
        self.repeat_kv = repeat_kv
        self.eager = False  # an explicit softmax instead of SDPA
        self.context_group = None  # context parallelism: gather the keys over this group
        self.tensor_group = None  # tensor parallelism by hand: sum the outputs over this group

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.wq(x).view(b, t, -1, HEAD_DIM).transpose(1, 2)
        k = self.wk(x).view(b, t, -1, HEAD_DIM).transpose(1, 2)
        v = self.wv(x).view(b, t, -1, HEAD_DIM).transpose(1, 2)
        mask = None
        if self.context_group is not None:  # every chunk's keys, in sequence order
            parts = [None] * dist.get_world_size(self.context_group)
            dist.all_gather_object(parts, (positions, k, v), group=self.context_group)
            key_positions = torch.cat([p for p, _, _ in parts])
            order = key_positions.argsort()
            k = torch.cat([k for _, k, _ in parts], dim=2)[:, :, order]
            v = torch.cat([v for _, _, v in parts], dim=2)[:, :, order]
            mask = positions[:, None] >= key_positions[order][None, :]
        if self.repeat_kv or self.eager:
            k = k.repeat_interleave(q.size(1) // k.size(1), dim=1)
            v = v.repeat_interleave(q.size(1) // v.size(1), dim=1)
        if self.eager:
            if mask is None:
                mask = torch.ones(t, t, dtype=torch.bool).tril()
            scores = (q @ k.transpose(-1, -2) / math.sqrt(HEAD_DIM)).masked_fill(~mask, -math.inf)
            out = torch.softmax(scores, dim=-1) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                                 enable_gqa=not self.repeat_kv)
        out = self.wo(out.transpose(1, 2).reshape(b, t, -1))
        if self.tensor_group is not None:
            dist.all_reduce(out, group=self.tensor_group)
        return out


class Block(nn.Module):
    def __init__(self, repeat_kv: bool) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(WIDTH)
        self.attn = Attention(repeat_kv)

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
        return x + self.attn(self.norm(x), positions)


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tokens = nn.Embedding(VOCAB, WIDTH)
        self.positions = nn.Embedding(64, WIDTH)
        self.blocks = nn.ModuleList([Block(repeat_kv=i == 1) for i in range(LAYERS)])
        self.head = nn.Linear(WIDTH, VOCAB, bias=False)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None):
        if positions is None:
            positions = torch.arange(tokens.size(1))
        x = self.tokens(tokens) + self.positions(positions)
        for block in self.blocks:
            x = block(x, positions)
        return self.head(x)


def make_model(eager: bool = False) -> Model:
    """The same weights on every process; queries and keys scaled so that heads differ."""
    torch.manual_seed(0)
    model = Model()
    with torch.no_grad():
        for block in model.blocks:
            block.attn.wq.weight.mul_(4.0)
            block.attn.wk.weight.mul_(4.0)
            block.attn.eager = eager
    return model


def tokens_for(replica: int, length: int = LENGTH) -> torch.Tensor:
    """The sequences of one data-parallel replica: (BATCH, length) tokens."""
    return torch.randint(0, VOCAB, (BATCH, length),
                         generator=torch.Generator().manual_seed(100 + replica))


def chunk_positions(length: int, shards: list[int], layout: str, rank: int) -> torch.Tensor:
    """The global positions of process ``rank``'s tokens: contiguous chunks of the given
    lengths, or the head-tail layout (``2W`` equal chunks, process ``r`` holding ``r`` and
    ``2W-1-r``)."""
    if layout == "contiguous":
        start = sum(shards[:rank])
        return torch.arange(start, start + shards[rank])
    world = len(shards)
    chunks = torch.arange(length).chunk(2 * world)
    return torch.cat([chunks[rank], chunks[2 * world - 1 - rank]])


# ---------------------------------------------------------------------- what is compared


def figures_of(snapshot) -> list[dict]:
    """Every per-head figure and count of every layer, as JSON."""
    return [{
        "name": layer.name,
        "counts": layer.counts.tolist(),
        "full_counts": layer.full_counts.tolist(),
        "nonfinite": layer.nonfinite.tolist(),
        **{figure: layer.heads[figure].tolist() for figure in FIGURES},
    } for layer in snapshot.layers]


def probed(model: nn.Module, forward, *, rows: int = MEASURED, log_dir: str | None = None,
           **capture) -> dict:
    """One sampled step of ``model`` (``forward()`` runs it), probed with the capture options
    ``capture`` on the first ``rows`` sequences: figures, alerts, the probe's warnings and how
    each module was served."""
    alerts = []
    outputs = [] if log_dir is None else [
        TensorBoardOutput(log_dir, per_head="all", pictures_every=0)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        probe = AttentionProbe(model, **PROBE, capture=CaptureOptions(batch_rows=rows, **capture),
                               outputs=outputs,
                               on_alert=lambda alert, snapshot: alerts.append(alert))
        with probe:
            forward()
            probe.step()
    return {
        "figures": figures_of(probe.history[0]) if probe.history else [],
        "alerts": [[a.kind, a.layer, list(a.heads), a.severity] for a in alerts],
        "warnings": [str(w.message) for w in caught if "attn_probe" in str(w.message)],
        "strategies": [site.strategy for site in probe.sites],
    }


def reference(replicas: list[torch.Tensor], crop: int, eager: bool = False) -> dict:
    """The unsplit model in this one process on the sequences the data-parallel ``replicas``
    measured, probed with the same options."""
    tokens = torch.cat([t[:MEASURED] for t in replicas])
    model = make_model(eager)
    return probed(model, lambda: model(tokens), rows=tokens.size(0), crop=crop)


def assert_same(process: dict, reference: dict) -> float:
    """Every figure and count of every head, and every alert, as the reference's; returns the
    worst relative difference (float32 projections split by rows round alike, or within a few
    ulps)."""
    assert process["alerts"] == reference["alerts"]
    got, want = process["figures"], reference["figures"]
    assert [layer["name"] for layer in got] == [layer["name"] for layer in want]
    worst = 0.0
    for mine, theirs in zip(got, want):
        assert len(mine["rank"]) == HEADS, mine["name"]
        for key, values in theirs.items():
            if key == "name":
                continue
            assert mine[key] == pytest.approx(values, rel=1e-5, abs=1e-6, nan_ok=True), (
                mine["name"], key, mine[key], values)
            worst = max([worst] + [abs(a - b) / max(abs(b), 1e-300) for a, b in
                                   zip(mine[key], values) if math.isfinite(b) and a != b])
    print(f"worst relative difference from the unsplit run: {worst:.3g}")
    return worst


# ------------------------------------------------------------------- in one process


def _figures(query: torch.Tensor, key: torch.Tensor) -> dict[str, torch.Tensor]:
    inputs = AttentionInputs.of(query, key, is_causal=True)
    figures = head_metrics(inputs.probabilities(8))
    figures.update(full_context_metrics(inputs))
    return figures


def test_heads_at_global_indices_merge_into_the_unsplit_figures():
    """Two halves of a layer's heads (grouped-query, a key/value head each), placed at their
    global indices, merge into exactly the figures of all heads measured together."""
    generator = torch.Generator().manual_seed(0)
    query = 3 * torch.randn(2, HEADS, 12, HEAD_DIM, generator=generator)
    key = 3 * torch.randn(2, KV_HEADS, 12, HEAD_DIM, generator=generator)
    whole = HeadAccumulator()
    whole.update("attn", _figures(query, key))
    merged = HeadAccumulator()
    for index in range(2):
        part = HeadAccumulator()
        figures, first, heads = HeadShard(index, 2).globalise(
            _figures(query.chunk(2, dim=1)[index], key.chunk(2, dim=1)[index]))
        part.update("attn", figures, first_head=first, num_heads=heads)
        merged.merge(part.state())
    (want,), (got,) = whole.compute(["attn"]), merged.compute(["attn"])
    assert got.heads["kv_head"].tolist() == [0, 0, 1, 1]
    for figure, values in want.heads.items():
        np.testing.assert_array_equal(got.heads[figure], values, err_msg=figure)
    np.testing.assert_array_equal(got.counts, want.counts)
    np.testing.assert_array_equal(got.full_counts, want.full_counts)
    # one half alone: the other heads have no data (NaN), never another head's figures
    (alone,) = part.compute(["attn"])
    assert np.isnan(alone.heads["rank"][:2]).all() and alone.counts.tolist() == [0, 0, 2, 2]


def test_heads_outside_the_layer_are_refused():
    figures = _figures(torch.randn(1, 2, 4, HEAD_DIM), torch.randn(1, 1, 4, HEAD_DIM))
    with pytest.raises(ValueError, match="heads 3 to 4 are not heads of a layer of 4"):
        HeadAccumulator().update("attn", figures, first_head=3, num_heads=4)


def test_declared_heads_outside_a_process_group_are_not_a_split():
    """One process: a module that declares more heads than its kernel sees is measured as it
    is, without a warning (nothing is merged across processes)."""
    model = make_model()
    assert declared_heads(model.blocks[0].attn) == HEADS
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Parallelism(CaptureOptions()).heads(
            "blocks.0.attn", model.blocks[0].attn, 2) == HeadShard()


def test_parallel_options_are_checked():
    with pytest.raises(ValueError, match="context_layout must be one of"):
        CaptureOptions(context_layout="zigzag")
    with pytest.raises(TypeError, match=r"tensor_parallel must be a torch.distributed "
                                        r"ProcessGroup or a one-dimensional DeviceMesh \(one "
                                        r"dimension of a larger mesh, e.g. mesh\['tp'\]\), "
                                        r"or None; got 2"):
        CaptureOptions(tensor_parallel=2)
    with pytest.raises(TypeError, match="context_parallel must be"):
        CaptureOptions(context_parallel="cp")


@needs_gloo
def test_capture_and_rank_profile_refuse_the_probes_parallel_options():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        options = CaptureOptions(tensor_parallel=dist.group.WORLD)
        with pytest.raises(ValueError, match="tensor_parallel and context_parallel are "
                                             "AttentionProbe's"):
            capture(make_model(), options)
        with pytest.raises(ValueError, match="measure one process's heads and tokens"):
            rank_profile(make_model(), [tokens_for(0)],
                         capture=CaptureOptions(context_parallel=dist.group.WORLD))
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------- in 2 and 4 processes


def run_world(tmp_path_factory, world: int) -> dict:
    out = tmp_path_factory.mktemp(f"parallel{world}")
    started = time.monotonic()
    logs = launch(out, world=world, script=__file__)
    status = [json.loads(f.read_text()) if (f := out / f"status_rank{r}.json").exists() else {}
              for r in range(world)]
    print(f"{world}-process launch: {time.monotonic() - started:.1f} s")
    return {"out": out, "status": status, "logs": logs, "world": world}


@pytest.fixture(scope="module")
def two(tmp_path_factory) -> dict:
    return run_world(tmp_path_factory, 2)


@pytest.fixture(scope="module")
def four(tmp_path_factory) -> dict:
    return run_world(tmp_path_factory, 4)


def results(run: dict, scenario: str) -> list[dict]:
    """What each process saved for ``scenario``, once every process ran it."""
    for rank, status in enumerate(run["status"]):
        if status.get(scenario) != "ok":
            pytest.fail(f"scenario {scenario!r} failed on rank {rank}: {status.get(scenario)}\n"
                        + run["logs"][rank][-3000:])
    return [json.loads((run["out"] / scenario / f"rank{r}.json").read_text())
            for r in range(run["world"])]


@pytest.mark.slow
@needs_gloo
def test_tensor_parallel_dtensor_found_without_naming_it(two):
    saved = results(two, "tp")
    want = reference([tokens_for(0)], 16)
    for process in saved:  # every process holds the figures of every head
        assert_same(process, want)
        assert process["warnings"] == []
    # alerts name global heads (head 2: the second process's first)
    assert want["alerts"] == [["sink", "blocks.0.attn", [2], "info"],
                              ["logit", "blocks.1.attn", [2], "critical"]]
    # the key/value head each query head reads, numbered over the model
    assert saved[0]["figures"][0]["kv_head"] == [0, 0, 1, 1]
    assert saved[0]["figures"][1]["kv_head"] == [0, 0, 1, 1]
    scalars = read_scalars(two["out"] / "tp" / "tb")
    for head in range(HEADS):
        assert scalars[f"rank90/head/L00/H{head:02d}"][0] == pytest.approx(
            want["figures"][0]["rank"][head])


@pytest.mark.slow
@needs_gloo
def test_tensor_parallel_by_hand_needs_the_group_named(two):
    saved = results(two, "tp_plain")
    want = reference([tokens_for(0)], 16)
    for process in saved:
        assert_same(process, want)
        # without the group: nothing measured, and one warning per process that says why
        assert process["unnamed_figures"] == []
        (warning,) = process["unnamed_warnings"]
        assert "declares 4 heads and its kernel sees 2" in warning
        assert "tensor_parallel=" in warning


@pytest.mark.slow
@needs_gloo
@pytest.mark.parametrize("scenario, crop, eager", [
    ("cp_contiguous", 8, False),
    ("cp_unequal", 16, False),
    ("cp_head_tail", 8, False),
    ("cp_eager", 8, True),
    ("cp_adapter", 8, False),
])
def test_context_parallel_equals_the_unsplit_sequence(two, scenario, crop, eager):
    """Chunks of 12 and 12 tokens, 10 and 14, the head-tail layout (6 + 6 each); in the
    head-tail layout, an eager softmax (its own scores), and an adapter that rebuilds q and k
    from the chunk's tokens (its keys are the chunk's only, causal over the sequence)."""
    saved = results(two, scenario)
    want = reference([tokens_for(0)], crop, eager)
    for process in saved:
        assert_same(process, want)
        assert process["warnings"] == []
        assert all(s.startswith("adapter:") == (scenario == "cp_adapter")
                   for s in process["strategies"])
    # the sequences are counted once, not once per chunk
    assert saved[0]["figures"][0]["counts"] == [MEASURED] * HEADS


@pytest.mark.slow
@needs_gloo
def test_context_parallel_says_what_it_cannot_put_together(two):
    """An eager softmax over its chunk's keys only: its scores hold nothing of the other
    chunks' keys, so the modules are left out, with one warning each, on every process."""
    for process in results(two, "cp_chunk_softmax"):
        assert process["figures"] == []
        assert process["warnings"] == [
            f"attn_probe: 'blocks.{i}.attn' is not measured under context parallelism: its "
            "softmax saw its chunk's keys only" for i in range(LAYERS)]


@pytest.mark.slow
@needs_gloo
def test_data_by_tensor_parallel_mesh_with_fsdp2(four):
    saved = results(four, "tp_dp")
    want = reference([tokens_for(0), tokens_for(1)], 16)
    for process in saved:
        assert_same(process, want)
    assert saved[0]["figures"][0]["counts"] == [2 * MEASURED] * HEADS


@pytest.mark.slow
@needs_gloo
def test_context_by_tensor_parallel_mesh(four):
    """Context parallel over one mesh dimension (named by the mesh dimension), tensor
    parallel over the other (found from the DTensor weights)."""
    saved = results(four, "tp_cp")
    want = reference([tokens_for(0)], 8)
    for process in saved:
        assert_same(process, want)
    assert saved[0]["figures"][0]["counts"] == [MEASURED] * HEADS


@pytest.mark.slow
@needs_gloo
def test_context_parallel_head_tail_over_four(four):
    saved = results(four, "cp4_head_tail")
    want = reference([tokens_for(0, 32)], 12)
    for process in saved:
        assert_same(process, want)


# ----------------------------------------------------------------------------------- worker


def _tp_plan(model: Model, mesh) -> None:
    from torch.distributed.tensor.parallel import (
        ColwiseParallel, RowwiseParallel, parallelize_module,
    )

    for block in model.blocks:
        parallelize_module(block.attn, mesh, {
            "wq": ColwiseParallel(), "wk": ColwiseParallel(), "wv": ColwiseParallel(),
            "wo": RowwiseParallel(),
        })


def _by_hand(model: Model, group) -> Model:
    """Each process keeps its heads' rows of wq, wk, wv and columns of wo, as plain tensors."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    with torch.no_grad():
        for block in model.blocks:
            attn = block.attn
            for name in ("wq", "wk", "wv"):
                linear = getattr(attn, name)
                rows = linear.weight.chunk(world, dim=0)[rank].clone()
                setattr(attn, name, nn.Linear(WIDTH, rows.size(0), bias=False))
                getattr(attn, name).weight.copy_(rows)
            columns = attn.wo.weight.chunk(world, dim=1)[rank].clone()
            attn.wo = nn.Linear(columns.size(1), WIDTH, bias=False)
            attn.wo.weight.copy_(columns)
            attn.tensor_group = group
    return model


def _chunk_adapter(module: Attention, args, kwargs, *, batch_rows, crop):
    """q and k rebuilt from this process's chunk of tokens: its own keys only."""
    x = args[0][:batch_rows]
    b, t, _ = x.shape
    query = module.wq(x).view(b, t, -1, HEAD_DIM).transpose(1, 2)
    key = module.wk(x).view(b, t, -1, HEAD_DIM).transpose(1, 2)
    return AttentionInputs.of(query, key, is_causal=True)


def worker(out: Path) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    record = scenario_recorder(out, rank)

    def tensor_parallel(folder: Path) -> dict:
        model = make_model()
        _tp_plan(model, init_device_mesh("cpu", (world,), mesh_dim_names=("tp",)))
        tokens = tokens_for(0)

        def train_step():
            model(tokens).square().mean().backward()

        log_dir = str(folder / "tb") if rank == 0 else None
        return probed(model, train_step, crop=16, log_dir=log_dir)

    def by_hand(folder: Path) -> dict:
        model = _by_hand(make_model(), dist.group.WORLD)
        tokens = tokens_for(0)
        with torch.no_grad():
            named = probed(model, lambda: model(tokens), crop=16,
                               tensor_parallel=dist.group.WORLD)
            unnamed = probed(model, lambda: model(tokens), crop=16)
        return dict(named, unnamed_figures=unnamed["figures"],
                    unnamed_warnings=unnamed["warnings"])

    def context_parallel(shards: list[int], layout: str, crop: int, length: int = LENGTH,
                         eager: bool = False, adapter: bool = False, gather: bool = True):
        def scenario(folder: Path) -> dict:
            model = make_model(eager)
            for block in model.blocks:
                block.attn.context_group = dist.group.WORLD if gather else None
            positions = chunk_positions(length, shards, layout, rank)
            tokens = tokens_for(0, length)[:, positions]
            handle = register_adapter(Attention, _chunk_adapter) if adapter else None
            try:
                with torch.no_grad():
                    return probed(
                        model, lambda: model(tokens, positions), crop=crop,
                        context_parallel=dist.group.WORLD, context_layout=layout)
            finally:
                if handle is not None:
                    handle.remove()
        return scenario

    def data_by_tensor(folder: Path) -> dict:
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        model = make_model()
        _tp_plan(model, mesh["tp"])
        for block in model.blocks:
            fully_shard(block, mesh=mesh["dp"])
        fully_shard(model, mesh=mesh["dp"])
        tokens = tokens_for(mesh.get_local_rank("dp"))

        def train_step():
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*returned a view tensor.*")
                model(tokens).square().mean().backward()

        return probed(model, train_step, crop=16)

    def context_by_tensor(folder: Path) -> dict:
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("cp", "tp"))
        model = make_model()
        _tp_plan(model, mesh["tp"])
        for block in model.blocks:
            block.attn.context_group = mesh["cp"].get_group()
        positions = chunk_positions(LENGTH, [12, 12], "contiguous", mesh.get_local_rank("cp"))
        tokens = tokens_for(0)[:, positions]
        with torch.no_grad():
            return probed(model, lambda: model(tokens, positions), crop=8,
                              context_parallel=mesh["cp"])

    if world == 2:
        record("tp", tensor_parallel)
        record("tp_plain", by_hand)
        record("cp_contiguous", context_parallel([12, 12], "contiguous", 8))
        record("cp_unequal", context_parallel([10, 14], "contiguous", 16))
        record("cp_head_tail", context_parallel([12, 12], "head_tail", 8))
        record("cp_eager", context_parallel([12, 12], "head_tail", 8, eager=True))
        record("cp_adapter", context_parallel([12, 12], "head_tail", 8, adapter=True))
        record("cp_chunk_softmax", context_parallel([12, 12], "contiguous", 8, eager=True,
                                                    gather=False))
    else:
        record("tp_dp", data_by_tensor)
        record("tp_cp", context_by_tensor)
        record("cp4_head_tail", context_parallel([8] * 4, "head_tail", 12, length=32))
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "worker":
    worker(Path(sys.argv[2]))
