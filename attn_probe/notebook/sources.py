"""What :func:`~attn_probe.notebook.explore` is given, as a model and token ids: the same model
forms and token sources as ``attn-probe analyze``, loaded by the command line's own loaders
(:mod:`attn_probe.cli.loading`, :mod:`attn_probe.cli.tokens`), their errors worded for Python
callers."""

from __future__ import annotations

import os
import re
import warnings
from argparse import Namespace
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..cli.console import UsageError
from ..cli.loading import LoadedModel, load_model, loaded_model
from ..cli.tokens import check_tokens, encode, load_tokenizer, load_tokens

__all__ = ["Source", "load_source"]

#: The command line's option names in its messages, and the keyword arguments that say the same.
_KEYWORDS = {"--trust-remote-code": "trust_remote_code=True", "--data": "inputs",
             "--sequences": "sequences", "--tokens": "tokens"}
_OPTION = re.compile(r"(?<![\w-])(%s)(?![\w-])" % "|".join(map(re.escape, _KEYWORDS)))

Labeller = Callable[[torch.Tensor], list[str]]


@dataclass
class Source:
    """A model ready to run and the token ids to run it on."""

    loaded: LoadedModel
    tokens: torch.Tensor  #: (N, T) token ids on the CPU
    description: str  #: where the tokens came from
    labels: Labeller | None = None  #: token ids -> the strings written on the heatmap's axes


def in_keywords(message: str) -> str:
    """A command-line message with the option names replaced by :func:`explore`'s keywords."""
    return _OPTION.sub(lambda match: _KEYWORDS[match.group(1)], message)


def _warn(message: str) -> None:
    warnings.warn(in_keywords(message), UserWarning, stacklevel=4)


def _token_ids(inputs: Any) -> torch.Tensor:
    if isinstance(inputs, torch.Tensor):
        ids = inputs.detach().cpu()
    else:
        try:
            ids = torch.as_tensor(np.asarray(inputs))
        except (TypeError, ValueError) as error:
            raise ValueError(
                f"inputs must be token ids (a tensor, an array or lists of ints), text, a file "
                f"path or None (to sample from the model); got {type(inputs).__name__}: {error}"
            ) from None
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError(
            f"token ids must be integers of shape (T,) or (N, T), got {tuple(ids.shape)} "
            f"{ids.dtype}"
        )
    if ids.shape[1] < 2:
        raise ValueError(f"inputs hold {ids.shape[1]} token per sequence; give at least 2")
    return ids.long()


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


def _model(model: Any, trust_remote_code: bool, device: str) -> LoadedModel:
    if isinstance(model, nn.Module):
        name = type(model).__name__
        return loaded_model(model, name=name, kind="module", description=name)
    if isinstance(model, (str, os.PathLike)):
        return load_model(os.fspath(model), trust_remote_code=trust_remote_code, device=device,
                          warn=_warn)
    raise TypeError(
        "model must be a torch.nn.Module, a Hugging Face model directory, a llama2.c .bin file "
        f"or 'package.module:factory'; got {type(model).__name__}"
    )


def _is_file_name(inputs: Any) -> bool:
    if isinstance(inputs, os.PathLike):
        return True
    return isinstance(inputs, str) and "\n" not in inputs and len(inputs) < 4096 and \
        Path(inputs).expanduser().is_file()


def load_source(model: Any, inputs: Any = None, *, tokenizer: Any = None,
                token_strings: Sequence[Any] | None = None, sequences: int = 100,
                tokens: int = 100, seed: int = 0, batch_size: int = 8,
                trust_remote_code: bool = False, device: str = "cpu") -> Source:
    """The model and the token ids :func:`explore` works on (see there); every mistake in the
    arguments is one ``ValueError`` (or ``TypeError``) line."""
    try:
        return _load(model, inputs, tokenizer, token_strings, sequences, tokens, seed,
                     batch_size, trust_remote_code, device)
    except UsageError as error:
        raise ValueError(in_keywords(str(error))) from None


def _load(model: Any, inputs: Any, tokenizer: Any, token_strings: Sequence[Any] | None,
          sequences: int, tokens: int, seed: int, batch_size: int, trust_remote_code: bool,
          device: str) -> Source:
    loaded = _model(model, trust_remote_code, device)
    args = Namespace(data=None, sequences=sequences, tokens=tokens, seed=seed,
                     batch_size=batch_size, trust_remote_code=trust_remote_code)
    if inputs is None or _is_file_name(inputs):
        args.data = None if inputs is None else os.fspath(inputs)
        ids, description = load_tokens(args, loaded, _warn)
    elif isinstance(inputs, str):
        if tokenizer is None:
            tokenizer = load_tokenizer(
                loaded, trust_remote_code, "inputs",
                "pass tokenizer=, token ids, a token shard, or inputs=None to sample")
        ids = torch.tensor([encode(tokenizer, inputs)], dtype=torch.long)
        if ids.shape[1] < 2:
            raise ValueError(f"the text {inputs!r} is {ids.shape[1]} token long; give at least 2")
        description = f"{ids.shape[1]} tokens of text"
    else:
        ids = _token_ids(inputs)
        description = f"{ids.shape[0]} sequences of {ids.shape[1]} token ids"
    check_tokens(ids, loaded, "inputs")
    if loaded.context is not None and ids.shape[1] > loaded.context:
        raise ValueError(f"inputs of {ids.shape[1]} tokens are longer than the model's context "
                         f"of {loaded.context} tokens")
    if tokenizer is None and token_strings is None and loaded.tokenizer_dir is not None:
        try:  # a model directory's own tokenizer names the tokens, where it has one
            tokenizer = load_tokenizer(loaded, trust_remote_code, "inputs", "")
        except UsageError:
            tokenizer = None
    if token_strings is not None:
        labels = _fixed_labels(token_strings, ids)
    elif tokenizer is not None:
        labels = _labeller(tokenizer)
    else:
        labels = None
    return Source(loaded, ids, description, labels)
