"""benchmarks/bench_explore.py --smoke runs the whole script (nothing timed is judged): the view
is made, every layer is visited twice, and the model ran once."""

from __future__ import annotations

import subprocess
import sys

from extras_rule import extra
from reference import REPO, repo_env


def test_bench_explore_smoke():
    extra("ipywidgets")
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_explore.py"),
                           "--smoke"], capture_output=True, text=True, timeout=240,
                          env=repo_env())
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert lines[0] == "model: 3 layers, 2 heads, width 16; inputs (4, 24); 1 threads"
    assert "over 2 switches" in lines[2] and "over 2 switches" in lines[3]
    assert lines[4] == "forward passes: 1"
