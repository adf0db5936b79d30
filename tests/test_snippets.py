"""The README's code, and the guide's, runs as written: a renamed argument, option or import
breaks this test.

Every ``python`` block of README.md and docs/guide.md is executed, in a fresh namespace and
working directory, with small stand-ins for the objects a snippet takes from the reader's
program:

- the training loop, the settings, ``on_alert`` and an output of one's own (no framework):
  ``model`` is the package's demo GPT (``attn_probe.models.gpt``, 2 layers, width 32),
  ``loader`` three batches of token ids and ``step(model, batch)`` one AdamW step on its loss. A
  snippet that only makes a ``probe`` is then run through that loop. A probe's ``on_alert`` is
  then given the real alerts of a short unstable run (``tests/unstable_run.py``) under the
  snippet's own rules: what it prints, and its ``SystemExit`` on a critical alert.
- a model at rest (``rank_profile``, ``capture``): the same GPT, ``batches`` and ``tokens``.
- the Hugging Face callback: a real ``transformers.Trainer`` run (4 steps) of a 2-layer GPT-2
  with SDPA attention; ``model``, ``args`` (``logging_steps=2``) and ``data`` are given.
- the Lightning callback: a real ``lightning.Trainer`` fit of the demo GPT in a
  ``LightningModule``; ``lit_module`` and ``train_loader`` (20 batches: the snippet's
  ``max_epochs=3`` is 60 steps, so Lightning's default ``log_every_n_steps=50`` samples step 49).
- compiled only: the guide's ``torch.compiler.set_stance`` line, which needs a compiled model.

Each run is then checked in what it wrote: the event files hold the probe's figures at the
steps the snippet promises. Every ``attn-probe`` command line of the README is parsed by the
command's own parser (an unknown option fails), and the README's test command is the one
``.ci/run`` runs.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest
import torch
from extras_rule import extra

import attn_probe
from attn_probe import AttentionProbe, TensorBoardOutput
from attn_probe.cli.main import build_parser
from attn_probe.models.gpt import GPT, GPTConfig
from reference import read_scalars
from toy_models import gpt2_config
from unstable_run import BATCH, CLIP, unstable_gpt, windows
from unstable_run import optimizer as unstable_optimizer

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
#: the pages whose Python code is executed
PAGES = ("README.md", "docs/guide.md")
GPT_CONFIG = dict(vocab_size=64, block_size=32, n_layer=2, n_head=4, n_embd=32)


def blocks(language: str, text: str = README) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, re.M | re.S)


def tokens(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, GPT_CONFIG["vocab_size"], (n, 17),
                         generator=torch.Generator().manual_seed(seed))


# -- the stand-ins, one per kind of snippet ----------------------------------------------------

def training_loop(tmp_path: Path) -> dict:
    torch.manual_seed(0)
    model = GPT(GPTConfig(**GPT_CONFIG))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step(model, batch):
        _, loss = model(batch[:, :-1], batch[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss

    return dict(attn_probe=attn_probe, model=model, loader=[tokens(2, seed) for seed in range(3)],
                step=step)


def check_training_loop(namespace: dict, tmp_path: Path) -> None:
    probe = namespace.get("probe")
    assert isinstance(probe, AttentionProbe), "a training-loop snippet makes a probe"
    if probe.last is None:  # the snippet made the probe; run it through the reader's loop
        with probe:
            for batch in namespace["loader"]:
                namespace["step"](namespace["model"], batch)
                probe.step()
    assert probe.last is not None and probe.last.step == 0
    assert [layer.tag for layer in probe.last.layers] == ["L00", "L01"]
    if any(isinstance(output, TensorBoardOutput) for output in probe.outputs):
        scalars = read_scalars(tmp_path / "runs" / "exp1")
        for layer in ("L00", "L01"):
            assert sorted(scalars[f"rank90/max/{layer}"]) == [0], scalars.keys()
    if probe.on_alert is not None:
        check_on_alert(probe.on_alert, probe.rules)


def check_on_alert(on_alert, rules) -> None:
    """``on_alert`` called with the alerts of a run whose attention collapses, under ``rules``:
    it prints each alert (its message or what it measured), and a ``SystemExit`` it raises
    comes at a critical one."""
    model, seen = unstable_gpt(), []
    optimizer = unstable_optimizer(model.parameters())

    def called(alert, snapshot):
        seen.append(alert)
        on_alert(alert, snapshot)

    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed), AttentionProbe(
                model, every=4, alerts=rules, on_alert=called) as probe:
            # steps 0 to 12, measured at 0, 4, 8 and 12: an entropy warning, sinks, then a
            # logit warning and a critical entropy alert
            for step, window in enumerate(windows(BATCH * 13).view(13, BATCH, -1)):
                _, loss = model(window[:, :-1], window[:, 1:])
                optimizer.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
                optimizer.step()
                probe.step(step)
    except SystemExit:
        assert seen[-1].severity == "critical"
    assert seen, "the unstable run raised no alert"
    for alert in seen:  # each alert printed, by its message or what it measured
        assert alert.message in printed.getvalue() or alert.condition_text in printed.getvalue()


def at_rest(tmp_path: Path) -> dict:
    torch.manual_seed(0)
    model = GPT(GPTConfig(**GPT_CONFIG)).eval()
    return dict(attn_probe=attn_probe, torch=torch, model=model,
                batches=[tokens(4, seed) for seed in range(30)], tokens=tokens(2, seed=9))


def check_at_rest(namespace: dict, tmp_path: Path) -> None:
    if "snapshot" in namespace:  # rank_profile over the batches: every sequence measured
        snapshot = namespace["snapshot"]
        assert [layer.sequences for layer in snapshot.layers] == [100, 100]
        assert snapshot.max_rank_profile().shape == (2,)
    else:  # capture: one matrix and the figures of each layer
        matrices, figures = namespace["matrices"], namespace["figures"]
        layers = ["transformer.h.0.attn", "transformer.h.1.attn"]
        assert list(matrices) == list(figures) == layers
        assert matrices["transformer.h.0.attn"].shape == (2, 4, 17, 17)
        assert figures["transformer.h.0.attn"]["rank"].shape == (2, 4)


def huggingface(tmp_path: Path) -> dict:
    transformers = extra("transformers")
    extra("accelerate", reason="transformers.Trainer needs accelerate")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel._from_config(gpt2_config(), attn_implementation="sdpa")
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=4, logging_steps=2,
        per_device_train_batch_size=2, report_to="tensorboard", use_cpu=True,
        save_strategy="no", disable_tqdm=True, dataloader_num_workers=0, seed=0,
    )
    data = [{"input_ids": row, "labels": row} for row in tokens(8, seed=1)]
    return dict(transformers=transformers, model=model, args=args, data=data)


def check_huggingface(namespace: dict, tmp_path: Path) -> None:
    assert namespace["trainer"].state.global_step == 4
    scalars = read_scalars(tmp_path / "out")
    # The probe samples the steps the Trainer logs, into the Trainer's own run.
    assert sorted(scalars["train/loss"]) == [2, 4]
    assert sorted(scalars["rank90/max/L00"]) == [2, 4]


def lightning(tmp_path: Path) -> dict:
    L = extra("lightning")

    class LitGPT(L.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.gpt = GPT(GPTConfig(**GPT_CONFIG))

        def training_step(self, batch, batch_idx):
            _, loss = self.gpt(batch[:, :-1], batch[:, 1:])
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    loader = torch.utils.data.DataLoader(tokens(40, seed=2), batch_size=2)
    return dict(lightning=L, lit_module=LitGPT(), train_loader=loader)


def check_lightning(namespace: dict, tmp_path: Path) -> None:
    trainer = namespace["trainer"]
    assert trainer.global_step == 60
    scalars = read_scalars(Path(trainer.log_dir))
    # Lightning logs every 50 steps counting from 1: step 49, and the probe measured it.
    assert sorted(scalars["train_loss"]) == [49]
    assert sorted(scalars["rank90/max/L00"]) == [49]


#: (a text that marks the snippet, its stand-ins, what its run must have written); the first
#: that matches is used. No stand-ins: the snippet is only compiled.
SETUPS = [
    ("attn_probe.integrations.huggingface", huggingface, check_huggingface),
    ("attn_probe.integrations.lightning", lightning, check_lightning),
    ("torch.compiler.set_stance", None, None),
    ("AttentionProbe(", training_loop, check_training_loop),
    ("rank_profile(", at_rest, check_at_rest),
    ("attn_probe.capture(", at_rest, check_at_rest),
]


def setup_of(code: str):
    matches = [setup for setup in SETUPS if setup[0] in code]
    assert matches, f"no stand-ins for this snippet; add them to SETUPS:\n{code}"
    return matches[0]


SNIPPETS = [(page, i, code) for page in PAGES
            for i, code in enumerate(blocks("python", (ROOT / page).read_text()))]


def test_the_pages_have_their_snippets():
    kinds = {page: [setup_of(code)[1] for p, _, code in SNIPPETS if p == page] for page in PAGES}
    readme = [kind.__name__ for kind in kinds["README.md"] if kind]
    assert readme.count("training_loop") >= 2 and "huggingface" in readme and "lightning" in readme
    guide = [kind.__name__ for kind in kinds["docs/guide.md"] if kind]
    assert guide.count("training_loop") >= 4 and guide.count("at_rest") == 2


@pytest.mark.slow
@pytest.mark.parametrize("page, index, code", SNIPPETS,
                         ids=[f"{page}:{i}" for page, i, _ in SNIPPETS])
def test_snippet_runs(page, index, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths (runs/exp1, lightning_logs) land here
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    _, stand_ins, check = setup_of(code)
    compiled = compile(code, page, "exec")
    if stand_ins is None:
        return
    namespace = stand_ins(tmp_path)
    exec(compiled, namespace)
    check(namespace, tmp_path)


def command_lines() -> list[str]:
    lines = []
    for block in blocks("bash"):
        for line in block.splitlines():
            line = line.split("#", 1)[0].strip()
            for part in line.split("&&"):
                if part.strip().startswith("attn-probe "):
                    lines.append(part.strip())
    return lines


def test_readme_command_lines_parse():
    lines = command_lines()
    assert {line.split()[1] for line in lines} >= {"demo", "analyze", "report"}
    parser = build_parser()
    for line in lines:
        try:
            parser.parse_args(shlex.split(line)[1:])
        except SystemExit:
            raise AssertionError(f"the README's `{line}` does not parse") from None


def test_readme_test_command_is_what_ci_runs():
    command = [line for block in blocks("bash") for line in block.splitlines()
               if "pytest" in line]
    assert command == ['pip install -e ".[dev]" && python -m pytest -q']
    assert command[0] in (ROOT / ".ci" / "run").read_text().splitlines()
