"""The ``--heatmaps LAYER:HEADS,...`` syntax of ``attn-probe analyze``: parsing, and resolving it
against the model's layers with the package's one layer lookup."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NamedTuple

from ..snapshot import DEFAULT_HEATMAP_HEADS, find_layer, layer_tag
from .console import UsageError

__all__ = ["HeadChoice", "parse_heads", "resolve_heads"]


class _Layer(NamedTuple):
    name: str
    index: int


@dataclass(frozen=True)
class HeadChoice:
    """One ``LAYER:HEADS`` item of ``--heatmaps``: ``heads`` None means all heads."""

    layer: int | str
    heads: tuple[int, ...] | None
    text: str


def parse_heads(spec: str) -> list[HeadChoice]:
    """Parse ``--heatmaps``: ``"0:0-3,L04:1,-1:*"``. Raises :class:`UsageError` on bad syntax."""
    choices = []
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        layer_text, sep, head_text = item.partition(":")
        layer_text, head_text = layer_text.strip(), head_text.strip()
        if not sep or not layer_text or not head_text:
            raise UsageError(
                f"--heatmaps item {item!r} is not LAYER:HEADS (e.g. 0:1, L04:0-3, -1:*)"
            )
        layer: int | str
        if re.fullmatch(r"-?\d+", layer_text):
            layer = int(layer_text)
        elif re.fullmatch(r"[Ll]\d+", layer_text):
            layer = f"L{int(layer_text[1:]):02d}"
        else:
            raise UsageError(
                f"--heatmaps item {item!r}: layer {layer_text!r} is neither a number nor a tag "
                "like L07"
            )
        heads: tuple[int, ...] | None
        if head_text == "*":
            heads = None
        elif re.fullmatch(r"\d+", head_text):
            heads = (int(head_text),)
        elif re.fullmatch(r"\d+-\d+", head_text):
            low, high = (int(x) for x in head_text.split("-"))
            if low > high:
                raise UsageError(f"--heatmaps item {item!r}: empty head range {head_text}")
            heads = tuple(range(low, high + 1))
        else:
            raise UsageError(
                f"--heatmaps item {item!r}: heads {head_text!r} must be a number, a range like "
                "0-3 or *"
            )
        choices.append(HeadChoice(layer, heads, item))
    if not choices:
        raise UsageError(f"--heatmaps {spec!r} names no head")
    return choices


def resolve_heads(
    choices: list[HeadChoice] | None, layer_names: list[str], num_heads: dict[str, int]
) -> dict[str, list[int]]:
    """Module name -> head numbers to draw, in layer order; bad layers or heads: UsageError.

    ``layer_names`` are all monitored modules in order (layer ``i`` is tag ``Lii``);
    ``num_heads`` gives the head count of those that ran.
    """
    layers = [_Layer(name, i) for i, name in enumerate(layer_names)]
    ran = [layer for layer in layers if layer.name in num_heads]
    if choices is None:
        return {layer.name: [h for h in DEFAULT_HEATMAP_HEADS if h < num_heads[layer.name]]
                for layer in (ran[0], ran[-1])}
    picked: dict[str, list[int]] = {}
    for choice in choices:
        try:
            name = find_layer(layers, choice.layer).name
        except KeyError:
            raise UsageError(
                f"--heatmaps item {choice.text!r}: "
                + (f"no layer {choice.layer}" if isinstance(choice.layer, str)
                   else f"layer {choice.layer} out of range")
                + "; the model has "
                f"{len(layers)} attention layers, {layer_tag(0)} to {layer_tag(len(layers) - 1)} "
                f"(0 to {len(layers) - 1}, or -1 for the last)"
            ) from None
        if name not in num_heads:
            raise UsageError(
                f"--heatmaps item {choice.text!r}: layer {name} does not run on tokens"
            )
        available = num_heads[name]
        heads = list(range(available)) if choice.heads is None else list(choice.heads)
        bad = [h for h in heads if h >= available]
        if bad:
            raise UsageError(
                f"--heatmaps item {choice.text!r}: head {bad[0]} out of range; that layer has "
                f"{available} heads (0 to {available - 1})"
            )
        merged = picked.setdefault(name, [])
        merged.extend(h for h in heads if h not in merged)
    return {name: picked[name] for name in layer_names if name in picked}
