"""Windowed attention: ``batch_rows`` counts the model's input rows, and a kernel whose batch
holds several windows per input row (Swin) is measured over every window of those rows."""

from __future__ import annotations

import warnings

import torch

import attn_probe
from extras_rule import extra
from reference import reference_counts


def swin(implementation: str):
    transformers = extra("transformers")
    config = transformers.SwinConfig(
        image_size=32, patch_size=4, num_channels=3, embed_dim=16, depths=[1, 1],
        num_heads=[2, 4], window_size=4, attn_implementation=implementation,
    )
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.SwinModel(config).eval()


def test_one_batch_row_is_every_window_of_the_first_image():
    model = swin("eager")
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        own = model(images, output_attentions=True).attentions  # (images x windows, H, N, N)
    windows = [a.shape[0] // images.shape[0] for a in own]
    assert windows == [4, 1]  # 4 windows per image in the first stage, 1 in the second
    options = attn_probe.CaptureOptions(batch_rows=1, crop=None)
    with attn_probe.capture(model, options) as cap, torch.no_grad():
        model(images)
    for (name, attention), theirs, k in zip(cap.attention.items(), own, windows):
        assert attention.shape == (k,) + tuple(theirs.shape[1:]), name
        torch.testing.assert_close(attention, theirs[:k], atol=1e-6, rtol=0)
    # two rows: the windows of the first two images, in order
    options = attn_probe.CaptureOptions(batch_rows=2, crop=None)
    with attn_probe.capture(model, options) as cap, torch.no_grad():
        model(images)
    first = next(iter(cap.attention.values()))
    torch.testing.assert_close(first, own[0][:8], atol=1e-6, rtol=0)


def test_probe_figures_are_the_mean_over_the_first_images_windows():
    model = swin("eager")
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        own = model(images, output_attentions=True).attentions
    with attn_probe.AttentionProbe(model, every=1,
                                   capture=attn_probe.CaptureOptions(batch_rows=1)) as probe:
        with torch.no_grad():
            model(images)
        snapshot = probe.step()
    for layer, theirs in zip(snapshot.layers, own):
        k = theirs.shape[0] // images.shape[0]
        rank, columns, _ = reference_counts(theirs[:k].double())  # (windows, H), float64
        assert layer.counts.tolist() == [k] * theirs.shape[1]
        torch.testing.assert_close(torch.as_tensor(layer.heads["rank"]), rank.mean(0))
        torch.testing.assert_close(torch.as_tensor(layer.heads["columns"]), columns.mean(0))
