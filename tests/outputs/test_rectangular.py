"""Rectangular attention (queries != keys: cross-attention, an attention pooler, a crop below the
key count) measured by the probe and drawn as heatmaps of queries x keys in TensorBoard, read
back from the event file."""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch
from PIL import Image
from torch import nn

from attn_probe import AttentionProbe, CaptureOptions
from reference import read_images

QUERIES, KEYS, HEADS, WIDTH = 8, 17, 4, 16


class CrossAttention(nn.Module):
    """8 learned-free queries attending over 17 keys (a pooler or a decoder's cross-attention)."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(WIDTH, HEADS, batch_first=True)

    def forward(self, queries: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        return self.attn(queries, memory, memory)[0]


def test_cross_attention_heatmaps_are_drawn_as_queries_by_keys(tmp_path):
    torch.manual_seed(0)
    model = CrossAttention().eval()
    queries, memory = torch.randn(2, QUERIES, WIDTH), torch.randn(2, KEYS, WIDTH)
    with torch.no_grad():
        _, want = model.attn(queries, memory, memory, average_attn_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a heatmap that cannot be drawn warns: fail here
        with AttentionProbe(model, every=1, log_dir=str(tmp_path)) as probe:
            with torch.no_grad():
                model(queries, memory)
            snapshot = probe.step()
    # the sample drawn is the model's own attention of the first sequence, 8 x 17 per head
    (sample,) = snapshot.samples.values()
    torch.testing.assert_close(sample, want[0].float(), rtol=1e-5, atol=1e-6)

    (image,) = read_images(tmp_path)["attention/L00"]
    assert image.step == 0
    pixels = np.asarray(Image.open(io.BytesIO(image.png)).convert("RGB"))
    assert pixels.shape == (image.height, image.width, 3)
    # four panels of 17 keys by 8 queries side by side: a wide strip, not four squares
    assert image.width > 4 * image.height
    # not blank: the heatmaps hold many colours (magma), not a background and some text
    colours = np.unique(pixels.reshape(-1, 3), axis=0)
    assert len(colours) > 100
    dark = (pixels.max(axis=2) < 100).mean()  # magma's low end is near black
    assert dark > 0.05


class SelfAttention(nn.Module):
    """Non-causal self-attention over 17 tokens (a ViT's 16 patches and a class token)."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(WIDTH, HEADS, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x, x)[0]


def test_a_crop_below_the_key_count_of_non_causal_attention_draws_8_queries_by_17_keys(tmp_path):
    """Non-causal attention cropped to 8 tokens: the first 8 queries see all 17 keys (keys are
    not cropped: every query's row sums to 1 over all of them)."""
    torch.manual_seed(1)
    model = SelfAttention().eval()
    x = torch.randn(1, KEYS, WIDTH)
    with torch.no_grad():
        _, want = model.attn(x, x, x, average_attn_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with AttentionProbe(model, every=1, log_dir=str(tmp_path),
                            capture=CaptureOptions(crop=QUERIES)) as probe:
            with torch.no_grad():
                model(x)
            snapshot = probe.step()
    (sample,) = snapshot.samples.values()
    assert sample.shape == (HEADS, QUERIES, KEYS)
    torch.testing.assert_close(sample, want[0, :, :QUERIES].float(), rtol=1e-5, atol=1e-6)
    (image,) = read_images(tmp_path)["attention/L00"]
    pixels = np.asarray(Image.open(io.BytesIO(image.png)).convert("RGB"))
    assert pixels.shape == (image.height, image.width, 3)
    assert image.width > 4 * image.height
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 100
