"""Padding is left out: a padded sequence gives exactly the figures of the same sequence run
alone, for every figure (the matrix's and the full sequence's), left or right padded, in a
Hugging Face decoder (Llama, rotary, grouped-query) and encoder (BERT)."""

from __future__ import annotations

import pytest
import torch

from attn_probe import capture
from toy_models import tokens

LENGTHS = (12, 7, 3)


def figures_alone(model, x: torch.Tensor, **call) -> list[dict[str, dict[str, torch.Tensor]]]:
    """Per sequence, every figure of every layer, the sequence run by itself (no padding)."""
    out = []
    for b, length in enumerate(LENGTHS):
        with torch.no_grad(), capture(model) as cap:
            model(x[b: b + 1, :length], **call)
        out.append(cap.metrics())
    return out


def padded(x: torch.Tensor, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The sequences of ``LENGTHS`` in one batch of 12 tokens, padded on ``side`` with id 0."""
    batch = torch.zeros(len(LENGTHS), 12, dtype=torch.long)
    mask = torch.zeros_like(batch)
    for b, length in enumerate(LENGTHS):
        where = slice(12 - length, 12) if side == "left" else slice(0, length)
        batch[b, where], mask[b, where] = x[b, :length], 1
    return batch, mask


@pytest.mark.parametrize("family", ["llama", "bert"])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("kernel", ["sdpa", "eager"])
def test_padded_batch_gives_the_figures_of_each_sequence_alone(family, side, kernel, request):
    """SDPA: padding read from the boolean mask the kernel gets; eager: from the scores the
    model's own softmax sees (an additive mask of the dtype's minimum)."""
    sdpa, eager = request.getfixturevalue(family)
    model = sdpa if kernel == "sdpa" else eager
    x = tokens()
    batch, mask = padded(x, side)
    # positions as in the sequence alone (BERT's are absolute; Llama's rotary ones relative)
    positions = (mask.cumsum(1) - 1).clamp_min(0)
    with torch.no_grad(), capture(model) as cap:
        model(batch, attention_mask=mask, position_ids=positions)
    together = cap.metrics()
    alone = figures_alone(model, x)
    assert set(together) == set(alone[0]) and len(together) == 2
    for layer, figures in together.items():
        assert {"rank", "columns", "entropy", "sink", "dominant", "entropy_full",
                "entropy_norm_full", "sink_full", "max_logit", "columns_full",
                "dominant_full", "tokens_full"} <= set(figures)
        for name, value in figures.items():
            for b in range(len(LENGTHS)):
                want = alone[b][layer][name][0]
                if value.dtype.is_floating_point:
                    torch.testing.assert_close(value[b], want, rtol=1e-5, atol=1e-5,
                                               msg=f"{layer} {name} sequence {b}")
                else:
                    assert torch.equal(value[b], want), (layer, name, b, value[b], want)
    assert together[layer]["tokens_full"][:, 0].tolist() == list(LENGTHS)
