"""Every script under ``benchmarks/`` runs at a tiny size (``--smoke``) and prints what it promises.

A benchmark that nothing runs breaks unnoticed when the package changes under it. Every
``benchmarks/*.py`` is found here and run with ``--smoke`` in a subprocess that imports this
checkout: it must exit 0 and print its results. A script that lacks ``--smoke`` fails (so a new
benchmark cannot be left out), and each script listed in :data:`PROMISES` must print the lines
of its table and ratios and, where a run checks itself, the result that says it did (no head
differs from the reference, every sampled step measured every token). No timing is judged.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from extras_rule import extra
from reference import REPO, repo_env

BENCHMARKS = REPO / "benchmarks"
SCRIPTS = sorted(path.name for path in BENCHMARKS.glob("*.py"))

NUMBER = r"\d+(?:\.\d+)?"

#: Per script: the optional dependency it needs (its run skips where that is missing).
NEEDS = {"bench_explore.py": "ipywidgets", "bench_busy_machine.py": "transformers"}

#: Per script: patterns that must each match a line of its --smoke output.
PROMISES: dict[str, list[str]] = {
    "bench_outputs.py": [
        r"^model: 2 layers, 2 heads, width 32; \d+ scalars a step; 2 timed writes of each output$",
        r"^output +scalars ms +ratio +pictures ms +ratio$",
        rf"^tensorboard +{NUMBER} +1\.00 +{NUMBER} +1\.00$",
        *(rf"^{name} +{NUMBER} +{NUMBER} +{NUMBER} +{NUMBER}$"
          for name in ("jsonl", "mlflow", "wandb", "all")),
    ],
    "bench_metrics.py": [
        r"^case +shape +ref ms +fast ms +speedup +mismatch +ranks$",
        # every case's heads agree with the float64 reference (mismatch 0)
        *(rf"^softmax causal T={t} +\(16, {t}, {t}\) +{NUMBER} +{NUMBER} +{NUMBER}x +0 +\d+\.\.\d+$"
          for t in (16, 32)),
        rf"^collapsed causal T=32 +\(16, 32, 32\) +{NUMBER} +{NUMBER} +{NUMBER}x +0 +\d+\.\.\d+$",
    ],
    "bench_full_context.py": [
        r"^ +T side +time ms +/ SDPA +extra peak MiB$",
        *(rf"^ +128 {side} +{NUMBER} +{NUMBER}x +-?{NUMBER}$"
          for side in ("stream", "sdpa", "materialise")),
        rf"^  unsampled step {NUMBER} ms, sampled step {NUMBER} ms: {NUMBER}x \(median of 1\)",
        # the training run's sampled steps measured the whole 64-token sequences
        r"^  full-context figures on (\d+) of \1 sampled steps, over 64 tokens$",
    ],
    "bench_flex.py": [
        r"^ +T side +time ms +/ flex call$",
        *(rf"^ +256 {side} +{NUMBER} +{NUMBER}x$"
          for side in ("flex stream", "dense stream", "flex call")),
        # the flex block loop gives the dense mask's figures where both describe the same mask
        r"^ +256 without the cap the two streams agree: max \|d entropy\| .* \(ok\)$",
    ],
    "bench_explore.py": [
        r"^model: 3 layers, 2 heads, width 16; inputs \(4, 24\); 1 threads$",
        *(rf"^switch {what}: +median {NUMBER} s over 2 switches \(ratio {NUMBER} of the first "
          r"capture\)$" for what in ("to a new layer", "back to a layer")),
        # every layer was visited twice and the model ran once
        r"^forward passes: 1$",
    ],
    "bench_busy_machine.py": [
        r"^part +quiet 1t +quiet \d+t +busy 1t +busy \d+t$",
        *(rf"^{re.escape(part)} +{NUMBER} +{NUMBER} +{NUMBER} +{NUMBER}$"
          for part in ("eigvalsh (2, 64, 64) float64", "head_metrics, crop 64",
                       "full_context_stats, T=64")),
        r"^ +T load +threads +plain s +first s +later s +first/plain +later/plain +later/quiet$",
        # each load, with the probe's thread budget and with torch's own threads
        *(rf"^ +32 {load} +{re.escape(label)} +{NUMBER} +{NUMBER} +{NUMBER}"
          rf" +{NUMBER}x +{NUMBER}x +{NUMBER}x$"
          for load in ("quiet", "busy") for label in ("1 (default)", "torch's (None)")),
        r"^ +T side +time s +/ plain +extra peak MiB +/ plain$",
        *(rf"^ +32 {side} +{NUMBER} +{NUMBER}x +-?{NUMBER} +-?{NUMBER}x$"
          for side in ("plain", "probe", "peer")),
        r"^extra peak memory: (VmHWM - VmRSS|ru_maxrss), ",
    ],
    "bench_probe_overhead.py": [
        # one warm-up sampled step, then two a round, each of them measured
        r"^model: 2 layers, 2 heads, .* 1 rounds, 3 sampled steps measured, batch_rows 1$",
        r"^step kind +median s +ratio to plain$",
        *(rf"^{re.escape(kind)} +{NUMBER} +{NUMBER}$"
          for kind in ("plain", "attached, not sampled", "sampled (defaults)",
                       "sampled + pictures")),
        *(rf"^time inside the probe's hooks and step\(\), {re.escape(kind)}: {NUMBER} s = "
          rf"{NUMBER}% of a plain step \(ratio {NUMBER}\)$"
          for kind in ("sampled (defaults)", "sampled + pictures")),
        (rf"^idle hooks: {NUMBER} us per module forward, {NUMBER} us per model forward: "
         rf"{NUMBER} ms per step \(2 modules\)"),
        rf"^amortised overhead at every=100 .*: {NUMBER}% of a plain step$",
        (rf"^peak memory of a plain step: {NUMBER} MiB; extra peak of a sampled step: "
         rf"{NUMBER} MiB"),
    ],
}


def smoke(script: Path, cwd: Path) -> str:
    """``script --smoke``'s standard output; fails unless the script offers --smoke and exits 0
    having printed something."""
    assert "--smoke" in script.read_text(), (
        f"{script.name} has no --smoke option: every benchmark needs one (a run of a few "
        "seconds exercising the whole script), which this test runs"
    )
    done = subprocess.run(
        [sys.executable, str(script), "--smoke"], cwd=cwd, env=repo_env(),
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, (
        f"{script.name} --smoke exited with {done.returncode}:\n{done.stderr[-3000:]}"
    )
    assert done.stdout.strip(), f"{script.name} --smoke printed nothing"
    assert "nan" not in done.stdout.lower(), done.stdout
    return done.stdout


@pytest.mark.parametrize("name", SCRIPTS)
def test_benchmark_runs_with_smoke(name, tmp_path):
    if name in NEEDS:
        extra(NEEDS[name])
    out = smoke(BENCHMARKS / name, tmp_path)
    lines = out.splitlines()
    for pattern in PROMISES.get(name, []):
        assert any(re.search(pattern, line) for line in lines), (
            f"{name} --smoke printed no line matching {pattern!r}:\n{out}"
        )


def test_every_known_benchmark_is_found():
    assert set(PROMISES) <= set(SCRIPTS), set(PROMISES) - set(SCRIPTS)


@pytest.mark.parametrize("source, error", [
    # no argument parsing at all: it would run at full size, ignoring --smoke
    ("print('speedup 2.0x')\n", "has no --smoke option"),
    # mentions --smoke but its parser rejects it
    ("# python bench_new.py --smoke\nimport argparse\nargparse.ArgumentParser().parse_args()",
     "--smoke exited with 2"),
])
def test_a_benchmark_without_smoke_fails(source, error, tmp_path):
    script = tmp_path / "bench_new.py"
    script.write_text(source)
    with pytest.raises(AssertionError, match=re.escape(error)):
        smoke(script, tmp_path)


def test_a_benchmark_that_prints_nothing_fails(tmp_path):
    script = tmp_path / "bench_new.py"
    script.write_text("import sys\nassert sys.argv[1:] == ['--smoke']\n")
    with pytest.raises(AssertionError, match="printed nothing"):
        smoke(script, tmp_path)
