"""`attn-probe demo` end to end in a subprocess: it trains, prints its tables and the
TensorBoard command, and leaves event files with every expected tag and step."""

from __future__ import annotations

import subprocess
import sys

import pytest
from PIL import Image

from reference import read_images, repo_env, scalar_events


def test_demo_subprocess_writes_readable_logs(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "attn_probe.cli", "demo", "--steps", "6", "--every", "2",
         "--images-every", "4", "--layers", "2", "--batch-size", "4", "--log-dir", "tb"],
        cwd=tmp_path, env=repo_env(), capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "tensorboard --logdir tb" in done.stdout
    assert "attention at step 0:" in done.stdout and "attention at step 4:" in done.stdout
    assert "6/6" in done.stderr  # the progress bar reached the end

    scalars, images = scalar_events(tmp_path / "tb"), read_images(tmp_path / "tb")
    steps = lambda tag: [step for step, _ in scalars[tag]]  # noqa: E731
    assert steps("train/loss") == list(range(6))
    for layer in ("L00", "L01"):
        assert steps(f"rank90/max/{layer}") == [0, 2, 4]
        heads = [scalars[f"rank90/head/{layer}/H{h:02d}"] for h in range(4)]
        for i, (_, value) in enumerate(scalars[f"rank90/max/{layer}"]):
            assert value == pytest.approx(max(h[i][1] for h in heads))
    assert [image.step for image in images["collapse_map/rank90"]] == [0, 4]
    image = images["profile/max_rank90"][0]
    path = tmp_path / "profile.png"
    path.write_bytes(image.png)
    with Image.open(path) as png:
        assert png.format == "PNG" and png.size == (image.width, image.height)
