"""The token ids a model is measured on: given ids, text (with a tokenizer, or the model
directory's own), a text file, a modded-nanogpt token shard, or sequences sampled from the
model itself (what ``attn-probe analyze`` and :func:`attn_probe.explore` take).

Bad input is one :class:`~.messages.InputError` line (a ``ValueError``) naming the argument at
fault; text without ``transformers`` installed is an ``ImportError`` saying how to install it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..notices import warn as warn_user
from .loading import LoadedModel
from .messages import InputError, Message, one_line
from .optional import import_transformers
from .sampling import model_device, next_token_logits, sample_tokens
from .shards import is_shard, read_shard

__all__ = ["Inputs", "encode", "load_inputs", "load_tokenizer"]

_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "tokenizer.model",
    "spiece.model", "sentencepiece.bpe.model", "merges.txt",
)

Warn = Callable[[Message], None]


@dataclass
class Inputs:
    """(N, T) token ids on the CPU, where they came from, and the tokenizer that made them
    from text (None otherwise)."""

    ids: torch.Tensor
    description: str
    tokenizer: Any = None


def load_tokenizer(loaded: LoadedModel, *, trust_remote_code: bool = False,
                   what: str = "{inputs}", **values: Any) -> Any:
    """The tokenizer of ``loaded``'s model directory, or :class:`~.messages.InputError` saying
    that ``what`` (a message template: the argument at fault) is text and needs one."""
    if loaded.tokenizer_dir is None:
        raise InputError(what + " is text, which needs a tokenizer, and only a Hugging Face "
                         "model directory brings one; {no_tokenizer}", **values)
    if not any((loaded.tokenizer_dir / name).is_file() for name in _TOKENIZER_FILES):
        raise InputError(what + " is text, but {folder} has no tokenizer (none of {files}, "
                         "...); {no_tokenizer}", folder=loaded.tokenizer_dir,
                         files=", ".join(_TOKENIZER_FILES[:3]), **values)
    transformers = import_transformers("text")
    try:
        return transformers.AutoTokenizer.from_pretrained(
            str(loaded.tokenizer_dir), local_files_only=True,
            trust_remote_code=bool(trust_remote_code),
        )
    except (OSError, ValueError, TypeError, ImportError) as error:
        raise InputError(what + " is text, but no tokenizer could be loaded from {folder}: "
                         "{error}", folder=loaded.tokenizer_dir, error=one_line(error),
                         **values) from None


def encode(tokenizer: Any, text: str) -> list[int]:
    """The token ids of ``text``, without special tokens (no BOS is added)."""
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def _read_text(path: Path, tokenizer: Any, needed: int, warn: Warn) -> np.ndarray:
    def tokenize(raw: bytes, complete: bool) -> list[int]:
        if not complete:  # a prefix of a large file: end it at a line break
            cut = raw.rfind(b"\n")
            raw = raw[: cut + 1] if cut > 0 else raw
        try:
            text = raw.decode("utf-8", errors="strict" if complete else "ignore")
        except UnicodeDecodeError:
            raise InputError("{inputs} {path} is neither a token shard nor UTF-8 text",
                             path=path) from None
        return encode(tokenizer, text)

    limit = max(1 << 20, needed * 64)
    with open(path, "rb") as f:
        raw = f.read(limit)
        complete = not f.read(1)
    ids = tokenize(raw, complete)
    if len(ids) < needed and not complete:
        ids = tokenize(path.read_bytes(), True)
    ids = np.asarray(ids, dtype=np.int64)
    unknown = getattr(tokenizer, "unk_token_id", None)
    if isinstance(unknown, int) and ids.size:
        share = float(np.mean(ids[:needed] == unknown))
        if share > 0.2:
            warn(Message("{share:.0%} of the tokens of {path} are the unknown token: is this "
                         "the model's tokenizer and language?", share=share, path=path))
    return ids


def _windows(ids: np.ndarray, n: int, length: int, source: str, warn: Warn) -> torch.Tensor:
    available = ids.shape[0] // length
    if available == 0:
        raise InputError("{source} has only {count} tokens, fewer than one sequence of "
                         "{tokens} {length}", source=source, count=ids.shape[0], length=length)
    if available < n:
        warn(Message("{source} holds only {available} sequences of {length} tokens; measuring "
                     "{available} instead of {sequences} {n}", source=source,
                     available=available, length=length, n=n))
        n = available
    return torch.from_numpy(ids[: n * length].astype(np.int64)).reshape(n, length)


def _fits(loaded: LoadedModel, length: int) -> None:
    """Sequences of ``length`` tokens are within the model's context (before any is made)."""
    if loaded.context is not None and length > loaded.context:
        raise InputError("{tokens} {length} is longer than the model's context of {context} "
                         "tokens", length=length, context=loaded.context)


def _sample(loaded: LoadedModel, n: int, length: int, seed: int, batch_size: int, warn: Warn,
            on_progress: Callable[[int, int], None] | None) -> Inputs:
    _fits(loaded, length)
    device = model_device(loaded.model)
    generator = torch.Generator().manual_seed(seed)
    if loaded.vocab_size is None:
        raise InputError("cannot tell the vocabulary size of {model_name}, so no tokens can be "
                         "made up for it; pass {inputs}", model_name=loaded.description)
    probe = torch.full((1, min(2, length)), loaded.bos, dtype=torch.long, device=device)
    try:
        with torch.no_grad():
            output = loaded(probe)
    except Exception as error:  # noqa: BLE001 - the model rejects token ids: say so on one line
        raise InputError("calling the model on a (1, {width}) tensor of token ids failed: "
                         "{cls}: {error}", width=probe.shape[1], cls=type(error).__name__,
                         error=one_line(error)) from None
    logits = next_token_logits(output, loaded.vocab_size)
    if logits is None:
        warn(Message("{model_name} gives no next-token logits to sample from; measuring "
                     "uniformly random token ids (seed {seed}); pass {inputs} for real text",
                     model_name=loaded.description, seed=seed))
        ids = torch.randint(0, loaded.vocab_size, (n, length), generator=generator)
        return Inputs(ids, f"uniformly random token ids below {loaded.vocab_size} (seed {seed})")

    # Hugging Face models sample with their key/value cache; others re-run the prefix.
    call = None if loaded.hf and getattr(output, "logits", None) is not None else loaded
    parts = []
    for start in range(0, n, batch_size):
        chunk = min(batch_size, n - start)
        parts.append(sample_tokens(loaded.model, chunk, length, bos=loaded.bos,
                                   generator=generator, call=call).cpu())
        if on_progress is not None:
            on_progress(start + chunk, n)
    return Inputs(torch.cat(parts), f"sampled from the model (temperature 1, from token "
                                    f"{loaded.bos}, seed {seed})")


def _is_file_name(inputs: Any) -> bool:
    if isinstance(inputs, os.PathLike):
        return True
    return isinstance(inputs, str) and "\n" not in inputs and len(inputs) < 4096 and \
        Path(inputs).expanduser().is_file()


def _read_file(loaded: LoadedModel, inputs: Any, n: int, length: int, tokenizer: Any,
               trust_remote_code: bool, warn: Warn) -> Inputs:
    path = Path(inputs).expanduser()
    if not path.exists():
        raise InputError("{inputs} {path}: no such file", path=path)
    if not path.is_file():
        raise InputError("{inputs} {path}: not a file", path=path)
    _fits(loaded, length)
    if is_shard(path) or path.suffix.lower() == ".bin":
        ids, source = read_shard(path, limit=n * length), f"token shard {path}"
    else:
        if tokenizer is None:
            tokenizer = load_tokenizer(loaded, trust_remote_code=trust_remote_code,
                                       what="{inputs} {path}", path=path)
        ids, source = _read_text(path, tokenizer, n * length, warn), f"text file {path}"
    return Inputs(_windows(ids, n, length, source, warn), source, tokenizer)


def _token_ids(inputs: Any) -> torch.Tensor:
    if isinstance(inputs, torch.Tensor):
        ids = inputs.detach().cpu()
    else:
        try:
            ids = torch.as_tensor(np.asarray(inputs))
        except (TypeError, ValueError) as error:
            raise InputError(
                "{inputs} must be token ids (a tensor, an array or lists of ints), text, a file "
                "path or None (to sample from the model); got {cls}: {error}",
                cls=type(inputs).__name__, error=one_line(error)) from None
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise InputError("token ids must be integers of shape (T,) or (N, T), got {shape} "
                         "{dtype}", shape=tuple(ids.shape), dtype=ids.dtype)
    if ids.shape[1] < 2:
        raise InputError("{inputs} hold {width} token per sequence; give at least 2",
                         width=ids.shape[1])
    return ids.long()


def load_inputs(loaded: LoadedModel, inputs: Any = None, *, tokenizer: Any = None,
                sequences: int = 100, tokens: int = 100, seed: int = 0, batch_size: int = 8,
                trust_remote_code: bool = False, warn: Warn | None = None,
                on_progress: Callable[[int, int], None] | None = None) -> Inputs:
    """The token ids to run ``loaded`` on, from ``inputs``:

    * token ids: a tensor, an array or lists of ints, of shape (T,) or (N, T);
    * text (a ``str`` that names no file): one sequence, tokenized by ``tokenizer`` or by the
      model directory's own tokenizer;
    * a file (a path, or a ``str`` naming one): a modded-nanogpt token shard (``.bin``) or a
      UTF-8 text file, cut into ``sequences`` consecutive sequences of ``tokens`` tokens (fewer
      when the file is short, with a warning);
    * None: ``sequences`` sequences of ``tokens`` tokens sampled from the model from its BOS
      token (temperature 1, seed ``seed``, ``batch_size`` at a time, ``on_progress(done,
      sequences)`` after each), or uniformly random ids when it gives no next-token logits.

    The ids are checked against the model's vocabulary and context. ``warn`` is called with what
    does not stop loading (default: a ``UserWarning``). Bad input raises
    :class:`~.messages.InputError` (a ``ValueError``).
    """
    if warn is None:
        def warn(message: Message) -> None:
            warn_user(message, UserWarning)

    given = inputs is not None and not _is_file_name(inputs)
    if inputs is None:
        found = _sample(loaded, sequences, tokens, seed, batch_size, warn, on_progress)
    elif not given:
        found = _read_file(loaded, inputs, sequences, tokens, tokenizer, trust_remote_code,
                           warn)
    elif isinstance(inputs, str):
        if tokenizer is None:
            tokenizer = load_tokenizer(loaded, trust_remote_code=trust_remote_code)
        ids = torch.tensor([encode(tokenizer, inputs)], dtype=torch.long)
        if ids.shape[1] < 2:
            raise InputError("the text {text!r} is {width} token long; give at least 2",
                             text=inputs, width=ids.shape[1])
        found = Inputs(ids, f"{ids.shape[1]} tokens of text", tokenizer)
    else:
        ids = _token_ids(inputs)
        found = Inputs(ids, f"{ids.shape[0]} sequences of {ids.shape[1]} token ids")
    _check(found, loaded, source="{inputs}" if given else "{source}")
    return found


def _check(found: Inputs, loaded: LoadedModel, source: str) -> None:
    ids, vocab = found.ids, loaded.vocab_size
    if vocab is not None and ids.numel():
        top = int(ids.max())
        if top >= vocab:
            raise InputError(source + " holds token id {top}, outside the model's vocabulary of "
                             "{vocab} ids (0 to {last}); was it made with another tokenizer?",
                             source=found.description, top=top, vocab=vocab, last=vocab - 1)
    if loaded.context is not None and ids.shape[1] > loaded.context:
        raise InputError(source + " of {width} tokens are longer than the model's context of "
                         "{context} tokens", source=found.description, width=ids.shape[1],
                         context=loaded.context)
