"""Each example runs as-is (with tiny settings) and leaves what it promises."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from extras_rule import extra
from PIL import Image

from reference import REPO, repo_env, scalar_events

EXAMPLES = REPO / "examples"


def run(script: str, *args: str, cwd: Path) -> str:
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args], cwd=cwd, env=repo_env(),
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def scalar_steps(log_dir: Path, tag: str) -> list[int]:
    return [step for step, _ in scalar_events(log_dir)[tag]]


def test_train_nanogpt(tmp_path):
    out = run("train_nanogpt.py", "--steps", "6", "--every", "3", "--layers", "2",
              "--block-size", "16", "--batch-size", "4", "--log-dir", "tb", cwd=tmp_path)
    assert "max rank90 per layer" in out
    assert scalar_steps(tmp_path / "tb", "rank90/max/L01") == [0, 3]


def test_train_huggingface(tmp_path):
    extra("transformers")
    run("train_huggingface.py", "--steps", "4", "--every", "2", "--tokens", "16",
        "--log-dir", "tb", cwd=tmp_path)
    assert scalar_steps(tmp_path / "tb", "rank90/max/L03") == [0, 2]


def test_notebook_views(tmp_path):
    out = run("notebook_views.py", "--steps", "3", "--sequences", "12", "--tokens", "16",
              "--layer", "1", "--out", "views", cwd=tmp_path)
    assert "L03" in out
    for name in ("max_rank_profile.png", "collapse_map.png", "head_profiles_L01.png",
                 "heatmaps_L01.png"):
        with Image.open(tmp_path / "views" / name) as image:
            assert image.format == "PNG" and min(image.size) > 100
