"""``attn-probe analyze`` end to end, with the written tables checked against a reference.

The main cases run ``python -m attn_probe.cli analyze ...`` as subprocesses: a tiny Hugging Face
Llama on a text file with its tokenizer, a factory model on a token shard, and two bad inputs.
They are independent, so a module fixture starts them all at once and each test waits for the
runs it reads. Cheaper variations (sampling, random ids, usage errors, the llama2.c fixture) go
through the same ``attn_probe.cli.main`` in this process, to keep the suite fast.

The per-head rank@tau in the tables is compared with a float64 reference computed here from the
attention probabilities of the same model on the same tokens: for Hugging Face models from
``output_attentions=True`` with eager attention, for the factory model from its own q and k.
"""

from __future__ import annotations

import csv
import importlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from reference import (
    FIXTURE,
    REPO,
    causal_attention,
    read_images,
    reference_counts,
    scalar_events,
)

TAU = 0.9
TOL = 1e-9
SHARD_MAGIC = 20240520
HELPERS = "tests_helpers_module"

# The factory models: a tiny causal LM with explicit q/k (kept for the reference), the same
# network without an output layer (nothing to sample from) and a model with no attention.
HELPERS_SOURCE = textwrap.dedent(
    """
    from types import SimpleNamespace

    import torch
    import torch.nn.functional as F
    from torch import nn

    VOCAB, DIM, HEADS, LAYERS, CONTEXT = 48, 32, 4, 3, 64


    class SelfAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(DIM, 3 * DIM)
            self.proj = nn.Linear(DIM, DIM)
            self.keep = False
            self.kept = None

        def forward(self, x):
            b, t, c = x.shape
            q, k, v = self.qkv(x).view(b, t, 3, HEADS, c // HEADS).permute(2, 0, 3, 1, 4)
            if self.keep:
                self.kept = (q.detach().clone(), k.detach().clone())
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.proj(y.transpose(1, 2).reshape(b, t, c))


    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm1, self.norm2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
            self.attn = SelfAttention()
            self.mlp = nn.Sequential(nn.Linear(DIM, 2 * DIM), nn.GELU(), nn.Linear(2 * DIM, DIM))

        def forward(self, x):
            x = x + self.attn(self.norm1(x))
            return x + self.mlp(self.norm2(x))


    class TinyLM(nn.Module):
        def __init__(self, logits=True):
            super().__init__()
            self.config = SimpleNamespace(vocab_size=VOCAB, block_size=CONTEXT)
            self.embed = nn.Embedding(VOCAB, DIM)
            self.pos = nn.Embedding(CONTEXT, DIM)
            self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))
            self.head = nn.Linear(DIM, VOCAB) if logits else None
            with torch.no_grad():
                for block in self.blocks:  # sharper attention than the default init
                    block.attn.qkv.weight.mul_(4.0)

        def forward(self, idx):
            pos = torch.arange(idx.shape[1], device=idx.device)
            x = self.embed(idx) + self.pos(pos)
            for block in self.blocks:
                x = block(x)
            return self.head(x) if self.head is not None else x


    def make_model():
        torch.manual_seed(0)
        return TinyLM()


    def make_encoder():
        torch.manual_seed(0)
        return TinyLM(logits=False)


    def make_mlp():
        return nn.Sequential(nn.Embedding(VOCAB, DIM), nn.Linear(DIM, DIM))


    def make_sized(width, depth=2):
        return TinyLM()


    def make_raising():
        raise RuntimeError("no weights here")


    def make_number():
        return 42


    def make_interrupted():
        raise KeyboardInterrupt
    """
)

WORDS = (
    "the a cat dog bird sat ran flew on under over mat tree house and then it was happy sad "
    "big small red blue one day little girl boy saw"
).split()
LLAMA_N, LLAMA_T = 6, 24
SHARD_N, SHARD_T = 5, 20
SAMPLED_N, SAMPLED_T = 4, 16


# ------------------------------------------------------------------------------------ helpers


def write_shard(path: Path, tokens: np.ndarray, magic: int = SHARD_MAGIC, version: int = 1) -> None:
    header = np.zeros(256, dtype="<i4")
    header[:3] = (magic, version, tokens.size)
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype("<u2").tobytes())


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


class Run:
    """A started ``attn-probe analyze`` subprocess; ``result()`` waits for it."""

    def __init__(self, args: list[str], cwd: Path, env: dict):
        self.args = args
        self.process = subprocess.Popen(
            [sys.executable, "-m", "attn_probe.cli", "analyze", *args],
            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        self._result: tuple[int, str, str] | None = None

    def result(self) -> tuple[int, str, str]:
        if self._result is None:
            try:
                out, err = self.process.communicate(timeout=240)
            except subprocess.TimeoutExpired:
                self.process.kill()
                out, err = self.process.communicate()
                pytest.fail(f"analyze {self.args} timed out\n{out}\n{err}")
            self._result = (self.process.returncode, out, err)
        return self._result

    def ok(self) -> tuple[str, str]:
        code, out, err = self.result()
        assert code == 0, f"analyze {self.args} exited {code}\nstdout:\n{out}\nstderr:\n{err}"
        assert "Traceback" not in err, err
        return out, err


def check_tables(out_dir: Path, reference: dict[str, torch.Tensor],
                 columns: dict[str, torch.Tensor] | None = None) -> None:
    """The written tables against per-(sequence, head) reference ranks, by module name."""
    heads = read_csv(out_dir / "heads.csv")
    layers = read_csv(out_dir / "layers.csv")
    profile = json.loads((out_dir / "profile.json").read_text())
    names = list(reference)
    assert [row["module"] for row in layers] == names
    assert [row["layer"] for row in layers] == [f"L{i:02d}" for i in range(len(names))]
    assert profile["tau"] == pytest.approx(TAU)
    for i, name in enumerate(names):
        expected = reference[name].mean(0)  # per-head mean over sequences
        rows = [row for row in heads if row["module"] == name]
        assert [int(row["head"]) for row in rows] == list(range(expected.shape[0]))
        for row, value in zip(rows, expected.tolist()):
            assert int(row["sequences"]) == reference[name].shape[0]
            assert abs(float(row["rank"]) - value) <= TOL, (name, row["head"], row["rank"], value)
        if columns is not None:
            for row, value in zip(rows, columns[name].mean(0).tolist()):
                assert abs(float(row["columns"]) - value) <= TOL, (name, row["head"])
        max_rank = float(expected.max())
        assert abs(float(layers[i]["rank/max"]) - max_rank) <= TOL
        assert abs(profile["max_rank_profile"][i] - max_rank) <= TOL
        assert abs(float(layers[i]["rank/mean"]) - float(expected.mean())) <= TOL


def check_pictures(out_dir: Path, heatmap_tags: list[str]) -> None:
    from PIL import Image

    pngs = sorted(p.name for p in out_dir.glob("*.png"))
    expected = {"max_rank_profile.png", "collapse_map.png",
                *(f"heatmaps_{tag}.png" for tag in heatmap_tags)}
    assert expected <= set(pngs), pngs
    profiles = [p for p in pngs if p.startswith("head_profiles_L")]
    assert len(profiles) == 1, pngs
    assert len(pngs) == len(expected) + 1, pngs
    for name in pngs:
        with Image.open(out_dir / name) as image:
            image.load()
            width, height = image.size
        assert 200 <= width <= 2000 and 100 <= height <= 2000, (name, image.size)


def check_tensorboard(out_dir: Path, layers: int) -> None:
    tb = out_dir / "tb"
    scalars = scalar_events(tb)
    rows = read_csv(out_dir / "layers.csv")
    for i in range(layers):
        assert f"rank90/max/L{i:02d}" in scalars, sorted(scalars)[:10]
        ((_, value),) = scalars[f"rank90/max/L{i:02d}"]
        assert value == pytest.approx(float(rows[i]["rank/max"]), rel=1e-6)
    images = set(read_images(tb))
    assert {"collapse_map/rank90", "profile/max_rank90", "attention/L00"} <= images, images


def check_error(run: Run, *needles: str) -> None:
    code, out, err = run.result()
    assert code != 0, (run.args, out, err)
    assert "Traceback" not in err, err
    lines = err.strip("\n").splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    for needle in needles:
        assert needle in lines[0], lines[0]


# ---------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Build every input and start every subprocess at once; the tests read the runs they need.

    Runs that need no Hugging Face model start first, so they proceed while this process
    imports transformers and builds the tiny Llama.
    """
    root = tmp_path_factory.mktemp("analyze")
    (root / f"{HELPERS}.py").write_text(HELPERS_SOURCE)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(root), str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONWARNINGS="ignore")
    runs: dict[str, Run] = {}

    def start(name: str, *args: str) -> None:
        runs[name] = Run([*args, "--out", str(root / f"out_{name}")], root, env)

    # (b) a token shard for the factory model (vocabulary 48), and broken inputs.
    rng = np.random.default_rng(0)
    shard_tokens = rng.integers(0, 48, SHARD_N * SHARD_T + 7)
    shard = root / "train_000001.bin"
    write_shard(shard, shard_tokens)
    bad_shard = root / "bad_magic.bin"
    write_shard(bad_shard, shard_tokens, magic=12345)
    (root / "model.txt").write_text("not a model\n")

    factory = f"{HELPERS}:make_model"
    start("factory_shard", factory, "--data", str(shard), "--sequences", str(SHARD_N),
          "--tokens", str(SHARD_T), "--batch-size", "2")
    start("missing", str(root / "no_such_model"))
    start("no_attention", f"{HELPERS}:make_mlp")

    # (a) a tiny Llama with a word-level tokenizer, and text made of the tokenizer's words.
    llama_dir, llama_ids = None, None
    try:
        import transformers
        from tokenizers import Tokenizer, models, pre_tokenizers
    except ImportError:
        transformers = None
    if transformers is not None:
        vocab = {"[UNK]": 0, "<s>": 1}
        for word in WORDS:
            vocab.setdefault(word, len(vocab))
        tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
        tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
        llama_dir = root / "tiny-llama"
        transformers.PreTrainedTokenizerFast(
            tokenizer_object=tokenizer, unk_token="[UNK]", bos_token="<s>"
        ).save_pretrained(llama_dir)
        config = transformers.LlamaConfig(
            vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            bos_token_id=1, eos_token_id=0, initializer_range=0.3, tie_word_embeddings=False,
        )
        torch.manual_seed(0)
        transformers.LlamaForCausalLM(config).save_pretrained(llama_dir)
        words = [WORDS[i] for i in rng.integers(0, len(WORDS), LLAMA_N * LLAMA_T + 30)]
        lines = [" ".join(words[i : i + 11]) for i in range(0, len(words), 11)]
        text = root / "stories.txt"
        text.write_text("\n".join(lines) + "\n")
        llama_ids = torch.tensor([vocab[w] for w in words[: LLAMA_N * LLAMA_T]])
        start("llama_text", str(llama_dir), "--data", str(text), "--sequences", str(LLAMA_N),
              "--tokens", str(LLAMA_T), "--batch-size", "4", "--heatmaps", "0:0-1,-1:*")

    yield {
        "root": root, "runs": runs, "llama_dir": llama_dir, "llama_ids": llama_ids,
        "shard_tokens": shard_tokens, "transformers": transformers,
    }
    for run in runs.values():
        if run.process.poll() is None:
            run.process.kill()
        run.process.communicate()


@pytest.fixture
def in_process(work, monkeypatch, capsys):
    """``attn-probe analyze ARGS`` in this process (for the cheaper cases): (status, out, err)."""
    from attn_probe.cli import main

    monkeypatch.chdir(work["root"])
    monkeypatch.syspath_prepend(str(work["root"]))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)

    def call(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        try:
            status = main(["analyze", *args])
        except SystemExit as exit:  # argparse's errors
            status = exit.code
        out, err = capsys.readouterr()
        return status, out, err

    yield call
    torch.set_num_threads(threads)


def _helpers(root: Path):
    sys.path.insert(0, str(root))
    try:
        return importlib.import_module(HELPERS)
    finally:
        sys.path.remove(str(root))


def factory_reference(root: Path, tokens: torch.Tensor, make: str = "make_model"):
    """Per-layer (B, H) rank@tau and columns@tau of the factory model, from its own q and k."""
    helpers = _helpers(root)
    model = getattr(helpers, make)().eval()
    blocks = list(model.blocks)
    for block in blocks:
        block.attn.keep = True
    with torch.no_grad():
        model(tokens)
    ranks, columns = {}, {}
    for i, block in enumerate(blocks):
        rank, column, _ = reference_counts(causal_attention(*block.attn.kept), TAU)
        ranks[f"blocks.{i}.attn"], columns[f"blocks.{i}.attn"] = rank, column
    return ranks, columns


def hf_reference(model, tokens: torch.Tensor, names: list[str]):
    with torch.no_grad():
        attentions = model(input_ids=tokens, output_attentions=True, use_cache=False).attentions
    assert len(attentions) == len(names)
    counts = {name: reference_counts(a, TAU) for name, a in zip(names, attentions)}
    return ({name: c[0] for name, c in counts.items()},
            {name: c[1] for name, c in counts.items()})


# ------------------------------------------------------------------------------------- tests


def test_hf_llama_on_text(work):
    if work["transformers"] is None:
        pytest.skip("transformers (and tokenizers) not installed")
    out, err = work["runs"]["llama_text"].ok()
    out_dir = work["root"] / "out_llama_text"
    tokens = torch.from_numpy(np.load(out_dir / "tokens.npy"))
    # The tokens are the text's words, in order, cut into --n windows of --tokens.
    assert torch.equal(tokens, work["llama_ids"].reshape(LLAMA_N, LLAMA_T))
    model = work["transformers"].AutoModelForCausalLM.from_pretrained(
        work["llama_dir"], attn_implementation="eager", local_files_only=True
    ).eval()
    names = [f"model.layers.{i}.self_attn" for i in range(2)]
    ranks, columns = hf_reference(model, tokens, names)
    check_tables(out_dir, ranks, columns)
    check_pictures(out_dir, ["L00", "L01"])
    check_tensorboard(out_dir, layers=2)
    assert "max rank90" in out and "model.layers.1.self_attn" in out
    assert "lazy layer" in out
    assert f"{LLAMA_N} sequences of {LLAMA_T} tokens" in out


def test_factory_on_shard(work):
    out, _ = work["runs"]["factory_shard"].ok()
    out_dir = work["root"] / "out_factory_shard"
    expected = torch.from_numpy(work["shard_tokens"][: SHARD_N * SHARD_T].astype(np.int64))
    tokens = torch.from_numpy(np.load(out_dir / "tokens.npy"))
    assert torch.equal(tokens, expected.reshape(SHARD_N, SHARD_T))
    ranks, columns = factory_reference(work["root"], tokens)
    check_tables(out_dir, ranks, columns)
    check_pictures(out_dir, ["L00", "L02"])
    check_tensorboard(out_dir, layers=3)
    assert "token shard" in out


def test_errors_are_one_line(work, in_process):
    """Bad input: exit status 2, exactly one line on stderr, no traceback, nothing written.

    Two cases run as real subprocesses (the error path of ``python -m attn_probe.cli``); the
    others run in this process, through the same ``main``, to keep the suite fast.
    """
    runs, root = work["runs"], work["root"]
    check_error(runs["missing"], "no such file or directory")
    # the command line's own advice: --modules, not the Python API's modules=[...]
    check_error(runs["no_attention"], "no attention module found", "--modules NAME_OR_GLOB")
    assert "modules=" not in runs["no_attention"].result()[2]
    for name in ("missing", "no_attention"):
        assert not (root / f"out_{name}").exists(), f"{name} wrote output"
    factory = f"{HELPERS}:make_model"
    for args, needles in [
        ([str(root / "model.txt")], ["unknown model format", ".txt"]),
        ([factory, "--data", str(root / "bad_magic.bin")], ["magic number 12345", "20240520"]),
    ]:
        status, _, err = in_process(*args, "--sequences", "2", "--tokens", "8",
                                    "--out", str(root / "nope"))
        assert status == 2, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in err, err
        for needle in needles:
            assert needle in lines[0], lines[0]
    assert not (root / "nope").exists()


def test_factory_sampled(work, in_process):
    out_dir = work["root"] / "out_sampled"
    status, out, err = in_process(f"{HELPERS}:make_model", "--sequences", str(SAMPLED_N),
                                  "--tokens", str(SAMPLED_T), "--seed", "3",
                                  "--out", str(out_dir))
    assert status == 0, err
    tokens = torch.from_numpy(np.load(out_dir / "tokens.npy"))
    assert tokens.shape == (SAMPLED_N, SAMPLED_T)
    assert (tokens[:, 0] == 1).all(), "sampling starts at token 1 when there is no BOS"
    assert int(tokens.min()) >= 0 and int(tokens.max()) < 48
    assert len({tuple(row) for row in tokens.tolist()}) > 1, "sequences should differ"
    ranks, columns = factory_reference(work["root"], tokens)
    check_tables(out_dir, ranks, columns)
    assert "sampled from the model" in out


def test_factory_without_logits_uses_random_ids(work, in_process):
    out_dir = work["root"] / "out_random"
    status, out, err = in_process(f"{HELPERS}:make_encoder", "--sequences", "3", "--tokens", "12",
                                  "--out", str(out_dir))
    assert status == 0, err
    assert "warning" in err and "random token ids" in err, err
    tokens = np.load(out_dir / "tokens.npy")
    assert tokens.shape == (3, 12) and tokens.min() >= 0 and tokens.max() < 48
    assert len(read_csv(out_dir / "layers.csv")) == 3


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--heatmaps", "0:x"], ["--heatmaps", "0:x"]),
        (["--heatmaps", "0"], ["LAYER:HEADS"]),
        (["--heatmaps", "0:9"], ["head 9 out of range", "4 heads"]),
        (["--heatmaps", "L07:0"], ["no layer L07"]),
        (["--heatmaps", "5:0"], ["layer 5 out of range"]),
        (["--tokens", "65"], ["context of 64 tokens"]),
        (["--data", "stories_missing.txt"], ["--data", "no such file"]),
        (["--data", "model.txt"], ["needs a tokenizer"]),
        (["--data", "big_ids.bin"], ["token id 50", "vocabulary of 48"]),
        (["--data", "short.bin"], ["token shard size mismatch"]),
    ],
)
def test_usage_errors_in_process(work, in_process, args, needles):
    root = work["root"]
    write_shard(root / "big_ids.bin", np.full(100, 50))
    write_shard(root / "short.bin", np.arange(10))
    with open(root / "short.bin", "ab") as f:
        f.write(b"\0\0")  # one token more than the header says
    status, out, err = in_process(f"{HELPERS}:make_model", "--sequences", "2", "--tokens", "8",
                                  *args, "--out", str(root / "nope"))
    assert status == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("attn-probe analyze: error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not (root / "nope").exists()


@pytest.mark.parametrize(
    "factory, args, needles",
    [
        ("make_model", ["--tau", "0"], ["argument --tau", "must be in (0, 1], got 0.0"]),
        ("make_model", ["--tau", "1.5"], ["argument --tau", "got 1.5"]),
        ("make_model", ["--tau", "x"], ["argument --tau", "got 'x'"]),
        ("make_model", ["--tokens", "1"], ["argument --tokens", "at least 2", "rank 1"]),
        ("make_model", ["--tokens", "0"], ["argument --tokens", "at least 1"]),
        ("make_model", ["--device", "warp9"], ["argument --device", "unknown device 'warp9'"]),
        ("make_model", ["--out", "model.txt"], ["--out model.txt exists and is not a directory"]),
        ("make_sized", [], ["callable without arguments", "requires width"]),
        ("make_raising", [], ["the factory raised RuntimeError: no weights here"]),
        ("make_number", [], ["the factory returned int, not a torch.nn.Module"]),
        # a glob that matches nothing, alone or beside one that matches: the modules that
        # look like attention are named
        ("make_model", ["--modules", "blocks.*.atn"],
         ["--modules 'blocks.*.atn' matched no module of TinyLM",
          "look like attention: blocks.0.attn (SelfAttention), blocks.1.attn",
          "--modules takes names of model.named_modules() or globs"]),
        ("make_model", ["--modules", "blocks.0.attn", "--modules", "nope"],
         ["--modules 'nope' matched no module of TinyLM"]),
        # a glob that takes in a module that is no attention
        ("make_model", ["--modules", "blocks.1.*"],
         ["module 'blocks.1.norm1' (LayerNorm) made no call", "Leave it out of --modules"]),
        ("make_mlp", [], ["no attention module found in Sequential", "--modules NAME_OR_GLOB",
                          "no module's name or class says attention"]),
    ],
)
def test_documented_errors_in_process(work, in_process, factory, args, needles):
    """Each documented error path: exit status 2, one line on stderr, nothing written. The
    command line's errors name its options (--modules), never the Python API's
    (``modules=[...]``, ``modules=lambda ...``)."""
    root = work["root"]
    if "--out" not in args:
        args = [*args, "--out", str(root / "nope")]
    status, _, err = in_process(f"{HELPERS}:{factory}", "--sequences", "2", "--tokens", "8",
                                *args)  # a later --tokens wins
    assert status == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("attn-probe analyze: error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert "modules=" not in lines[0], lines[0]
    assert not (root / "nope").exists()


def test_modules_option_picks_the_modules_measured(work, in_process):
    """--modules NAME_OR_GLOB (repeatable) measures exactly the modules named, as
    ``AttentionProbe(modules=...)`` takes them; the tables match the reference for those."""
    root = work["root"]
    tokens = None
    for args in (["--modules", "blocks.[02].attn"],
                 ["--modules", "blocks.2.attn", "--modules", "blocks.0.attn"]):
        out_dir = root / "out_modules"
        status, out, err = in_process(f"{HELPERS}:make_model", "--sequences", "2", "--tokens",
                                      "8", "--seed", "1", *args, "--out", str(out_dir))
        assert status == 0, err
        assert "2 attention layers" in out
        tokens = torch.from_numpy(np.load(out_dir / "tokens.npy"))
        ranks, columns = factory_reference(root, tokens)
        keep = ["blocks.0.attn", "blocks.2.attn"]  # in model order
        check_tables(out_dir, {n: ranks[n] for n in keep}, {n: columns[n] for n in keep})


def test_interrupt_is_one_line(work, in_process):
    status, _, err = in_process(f"{HELPERS}:make_interrupted", "--out", str(work["root"] / "nope"))
    assert status == 130
    assert err.strip().splitlines() == ["attn-probe analyze: interrupted"]


@pytest.mark.parametrize("weights", ["model.safetensors", "pytorch_model.bin"])
def test_corrupt_hugging_face_weights_are_one_line(work, in_process, weights):
    if work["llama_dir"] is None:
        pytest.skip("transformers (and tokenizers) not installed")
    corrupt = work["root"] / f"corrupt-{weights}"
    corrupt.mkdir(exist_ok=True)
    (corrupt / "config.json").write_bytes((work["llama_dir"] / "config.json").read_bytes())
    (corrupt / weights).write_bytes(b"\x80\x02 this is not a weights file" * 8)
    status, _, err = in_process(str(corrupt), "--sequences", "2", "--tokens", "8",
                                "--out", str(work["root"] / "nope"))
    assert status == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"attn-probe analyze: error: {corrupt}: cannot load the model: ")
    assert not (work["root"] / "nope").exists()


def test_model_errors_in_process(work, in_process):
    root = work["root"]
    cases = [
        ([str(root / "train_000001.bin")], "pass it with --data"),
        ([f"{HELPERS}:no_such_factory"], "has no attribute"),
        (["no_such_package.models:make"], "no module named 'no_such_package'"),
        ([str(root)], "without config.json"),
    ]
    if work["llama_dir"] is not None:  # a model directory without a tokenizer, and text
        bare = root / "no-tokenizer"
        bare.mkdir(exist_ok=True)
        for name in ("config.json", "model.safetensors"):
            (bare / name).write_bytes((work["llama_dir"] / name).read_bytes())
        cases.append(([str(bare), "--data", str(root / "stories.txt")], "has no tokenizer"))
    for args, needle in cases:
        status, _, err = in_process(*args, "--sequences", "2", "--tokens", "8",
                                    "--out", str(root / "nope"))
        assert status == 2 and len(err.strip().splitlines()) == 1, err
        assert needle in err, err
    assert not (root / "nope").exists()


def test_stories260k(work, in_process):
    if work["transformers"] is None:
        pytest.skip("transformers not installed")
    from attn_probe.models.llama2c import load_llama2c
    from reference import mean_next_token_loss

    out_dir = work["root"] / "out_stories"
    status, out, err = in_process(str(FIXTURE), "--sequences", "8", "--tokens", "64",
                                  "--out", str(out_dir))
    assert status == 0, err
    # a trained, healthy model: no alert of any kind (docs/alerts.md)
    assert "alerts: none" in out, out
    layers = read_csv(out_dir / "layers.csv")
    heads = read_csv(out_dir / "heads.csv")
    assert len(layers) == 5 and len(heads) == 5 * 8
    assert [int(row["heads"]) for row in layers] == [8] * 5
    assert all(int(row["sequences"]) == 8 for row in heads)
    tokens = torch.from_numpy(np.load(out_dir / "tokens.npy"))
    assert tokens.shape == (8, 64) and (tokens[:, 0] == 1).all()
    model = load_llama2c(FIXTURE, attn_implementation="eager")
    # The model's own samples are easy for it (about 2.6 nats; random ids: about 10.9).
    assert mean_next_token_loss(model, tokens) < 4.0
    names = [f"model.layers.{i}.self_attn" for i in range(5)]
    ranks, _ = hf_reference(model, tokens, names)
    check_tables(out_dir, ranks)
    check_pictures(out_dir, ["L00", "L04"])
    assert "model.layers.4.self_attn" in out and "lazy" in out


def test_heads_spec_and_summary_line():
    from attn_probe.cli.analyze import _lazy_line, _most_collapsed
    from attn_probe.cli.heads import parse_heads, resolve_heads
    from attn_probe.cli.console import UsageError
    from attn_probe.metrics import head_metrics
    from attn_probe.aggregate import HeadAccumulator
    from attn_probe.alerts import LazyRule
    from attn_probe.snapshot import Snapshot

    names = ["m.0.attn", "m.1.attn", "m.2.attn"]
    heads = {name: 4 for name in names}
    assert resolve_heads(None, names, heads) == {"m.0.attn": [0, 1, 2, 3],
                                                 "m.2.attn": [0, 1, 2, 3]}
    choice = parse_heads("L01:3, -1:0-1, 1:*")
    assert resolve_heads(choice, names, heads) == {"m.1.attn": [3, 0, 1, 2],
                                                   "m.2.attn": [0, 1]}
    for bad in ("1", "x:1", "1:a", "1:3-2", ","):
        with pytest.raises(UsageError):
            parse_heads(bad)

    # Layer 1 attends to the first key only (collapsed); the others attend uniformly.
    t = 6
    sink = torch.zeros(2, 4, t, t)
    sink[..., 0] = 1.0
    uniform = torch.tril(torch.ones(t, t))
    uniform = (uniform / uniform.sum(-1, keepdim=True)).expand(2, 4, t, t)
    accumulator = HeadAccumulator()
    for name, attention in zip(names, (uniform, sink, uniform)):
        accumulator.update(name, head_metrics(attention, TAU))
    rule = LazyRule()
    snapshot = Snapshot(step=0, tau=TAU, layers=tuple(
        rule.judge(layer) for layer in accumulator.compute(names)))
    assert _lazy_line(snapshot, rule) == "lazy layers: L01 (m.1.attn)"
    assert _most_collapsed(snapshot).name == "m.1.attn"
    calm = Snapshot(step=0, tau=TAU, layers=tuple(
        layer for layer in snapshot.layers if layer.name != "m.1.attn"))
    assert _lazy_line(calm, rule).startswith("no lazy layer at tau=0.9 under rule: all heads")
