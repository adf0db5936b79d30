"""What :func:`~attn_probe.notebook.explore` is given, as a model and token ids: the model
forms and token sources of :mod:`attn_probe.models.loading` and :mod:`attn_probe.models.inputs`
(those of ``attn-probe analyze`` too), and the strings that name the tokens on the heatmap's
axes. Bad input is the loaders' own ``ValueError`` (or ``TypeError``), worded in ``explore``'s
keywords; a missing optional dependency, their ``ImportError``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from ..models.inputs import load_inputs, load_tokenizer
from ..models.loading import LoadedModel, load_model

__all__ = ["Source", "load_source"]

Labeller = Callable[[torch.Tensor], list[str]]


@dataclass
class Source:
    """A model ready to run and the token ids to run it on."""

    loaded: LoadedModel
    tokens: torch.Tensor  #: (N, T) token ids on the CPU
    description: str  #: where the tokens came from
    labels: Labeller | None = None  #: token ids -> the strings written on the heatmap's axes


def _labeller(tokenizer: Any) -> Labeller:
    convert = getattr(tokenizer, "convert_ids_to_tokens", None)

    def labels(ids: torch.Tensor) -> list[str]:
        values = [int(i) for i in ids]
        if callable(convert):
            return [str(token) for token in convert(values)]
        return [tokenizer.decode([i]) for i in values]

    return labels


def _fixed_labels(token_strings: Sequence[Any], tokens: torch.Tensor) -> Labeller:
    rows = [token_strings] if token_strings and isinstance(token_strings[0], str) else \
        list(token_strings)
    if len(rows) != tokens.shape[0] or any(len(row) != tokens.shape[1] for row in rows):
        raise ValueError(
            f"token_strings must give one string per token of each of the {tokens.shape[0]} "
            f"sequences of {tokens.shape[1]} tokens"
        )
    by_ids = {tuple(int(i) for i in seq): [str(s) for s in row] for seq, row in zip(tokens, rows)}
    return lambda ids: by_ids[tuple(int(i) for i in ids)]


def load_source(model: Any, inputs: Any = None, *, tokenizer: Any = None,
                token_strings: Sequence[Any] | None = None, sequences: int = 100,
                tokens: int = 100, seed: int = 0, batch_size: int = 8,
                trust_remote_code: bool = False, device: str = "cpu") -> Source:
    """The model and the token ids :func:`explore` works on (see there)."""
    loaded = load_model(model, trust_remote_code=trust_remote_code, device=device)
    found = load_inputs(loaded, inputs, tokenizer=tokenizer, sequences=sequences, tokens=tokens,
                        seed=seed, batch_size=batch_size, trust_remote_code=trust_remote_code)
    if token_strings is not None:
        return Source(loaded, found.ids, found.description,
                      _fixed_labels(token_strings, found.ids))
    if tokenizer is None:
        tokenizer = found.tokenizer
    if tokenizer is None and loaded.tokenizer_dir is not None:
        try:  # a model directory's own tokenizer names the tokens, where it has one
            tokenizer = load_tokenizer(loaded, trust_remote_code=trust_remote_code)
        except ValueError:
            tokenizer = None
    return Source(loaded, found.ids, found.description,
                  None if tokenizer is None else _labeller(tokenizer))
