"""Token sources of ``attn-probe analyze``: a text file (with the model directory's tokenizer), a
modded-nanogpt token shard, or sequences sampled from the model itself."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch

from ..models.sampling import model_device, next_token_logits, sample_tokens
from .console import Progress, UsageError, import_transformers, one_line
from .shards import is_shard, read_shard

if TYPE_CHECKING:
    from .loading import LoadedModel

__all__ = ["check_tokens", "encode", "load_tokenizer", "load_tokens"]

_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "tokenizer.model",
    "spiece.model", "sentencepiece.bpe.model", "merges.txt",
)


def load_tokenizer(loaded: "LoadedModel", trust_remote_code: bool, what: str,
                   instead: str) -> Any:
    """The tokenizer of ``loaded``'s model directory, or a :class:`UsageError` saying that
    ``what`` is text and needs one, and what to give ``instead``."""
    if loaded.tokenizer_dir is None:
        raise UsageError(
            f"{what} is text, which needs a tokenizer, and only a Hugging Face model "
            f"directory brings one; {instead}"
        )
    if not any((loaded.tokenizer_dir / name).is_file() for name in _TOKENIZER_FILES):
        raise UsageError(
            f"{what} is text, but {loaded.tokenizer_dir} has no tokenizer (none of "
            f"{', '.join(_TOKENIZER_FILES[:3])}, ...); {instead}"
        )
    transformers = import_transformers("this model")
    try:
        return transformers.AutoTokenizer.from_pretrained(
            str(loaded.tokenizer_dir), local_files_only=True,
            trust_remote_code=bool(trust_remote_code),
        )
    except (OSError, ValueError, TypeError, ImportError) as error:
        raise UsageError(
            f"{what} is text, but no tokenizer could be loaded from "
            f"{loaded.tokenizer_dir}: {one_line(error)}"
        ) from None


def encode(tokenizer: Any, text: str) -> list[int]:
    """The token ids of ``text``, without special tokens (no BOS is added)."""
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def _read_text_tokens(path: Path, loaded: "LoadedModel", needed: int, trust_remote_code: bool,
                      warn: Callable[[str], None]) -> np.ndarray:
    tokenizer = load_tokenizer(loaded, trust_remote_code, f"--data {path}",
                               "give a token shard (.bin) or leave out --data to sample")

    def tokenize(raw: bytes, complete: bool) -> list[int]:
        if not complete:  # a prefix of a large file: end it at a line break
            cut = raw.rfind(b"\n")
            raw = raw[: cut + 1] if cut > 0 else raw
        try:
            text = raw.decode("utf-8", errors="strict" if complete else "ignore")
        except UnicodeDecodeError:
            raise UsageError(
                f"--data {path} is neither a token shard nor UTF-8 text"
            ) from None
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
            warn(f"{share:.0%} of the tokens of {path} are the unknown token: is this the "
                 "model's tokenizer and language?")
    return ids


def _windows(ids: np.ndarray, n: int, length: int, source: str) -> tuple[torch.Tensor, str | None]:
    available = ids.shape[0] // length
    if available == 0:
        raise UsageError(
            f"{source} has only {ids.shape[0]} tokens, fewer than one sequence of --tokens "
            f"{length}"
        )
    warning = None
    if available < n:
        warning = (f"{source} holds only {available} sequences of {length} tokens; measuring "
                   f"{available} instead of --n {n}")
        n = available
    tokens = torch.from_numpy(ids[: n * length].astype(np.int64)).reshape(n, length)
    return tokens, warning


def _sample(loaded: "LoadedModel", n: int, length: int, seed: int, batch_size: int,
            warn: Callable[[str], None]) -> tuple[torch.Tensor, str]:
    device = model_device(loaded.model)
    generator = torch.Generator().manual_seed(seed)
    if loaded.vocab_size is None:
        raise UsageError(
            f"cannot tell the vocabulary size of {loaded.description}, so no tokens can be "
            "made up for it; pass --data"
        )
    probe = torch.full((1, min(2, length)), loaded.bos, dtype=torch.long, device=device)
    try:
        with torch.no_grad():
            output = loaded(probe)
    except Exception as error:  # noqa: BLE001 - the model rejects token ids: say so on one line
        raise UsageError(
            f"calling the model on a (1, {probe.shape[1]}) tensor of token ids failed: "
            f"{type(error).__name__}: {one_line(error)}"
        ) from None
    logits = next_token_logits(output, loaded.vocab_size)
    if logits is None:
        warn(f"{loaded.description} gives no next-token logits to sample from; measuring "
             f"uniformly random token ids (seed {seed}); pass --data for real text")
        ids = torch.randint(0, loaded.vocab_size, (n, length), generator=generator)
        return ids, f"uniformly random token ids below {loaded.vocab_size} (seed {seed})"

    # Hugging Face models sample with their key/value cache; others re-run the prefix.
    call = None if loaded.hf and getattr(output, "logits", None) is not None else loaded
    bar = Progress("sampling")
    parts = []
    for start in range(0, n, batch_size):
        chunk = min(batch_size, n - start)
        parts.append(sample_tokens(loaded.model, chunk, length, bos=loaded.bos,
                                   generator=generator, call=call).cpu())
        bar(start + chunk, n)
    return torch.cat(parts), f"sampled from the model (temperature 1, from token {loaded.bos}, " \
                             f"seed {seed})"


def load_tokens(args: argparse.Namespace, loaded: "LoadedModel",
                warn: Callable[[str], None]) -> tuple[torch.Tensor, str]:
    """(N, T) token ids to measure, and a description of where they came from."""
    n, length = args.sequences, args.tokens
    if args.data is None:
        return _sample(loaded, n, length, args.seed, args.batch_size, warn)
    path = Path(args.data).expanduser()
    if not path.exists():
        raise UsageError(f"--data {path}: no such file")
    if not path.is_file():
        raise UsageError(f"--data {path}: not a file")
    if is_shard(path) or path.suffix.lower() == ".bin":
        ids = read_shard(path, limit=n * length)
        source = f"token shard {path}"
    else:
        ids = _read_text_tokens(path, loaded, n * length, args.trust_remote_code, warn)
        source = f"text file {path}"
    tokens, warning = _windows(ids, n, length, source)
    if warning:
        warn(warning)
    return tokens, source


def check_tokens(tokens: torch.Tensor, loaded: "LoadedModel", source: str) -> None:
    if loaded.vocab_size is not None and tokens.numel():
        top = int(tokens.max())
        if top >= loaded.vocab_size:
            raise UsageError(
                f"{source} holds token id {top}, outside the model's vocabulary of "
                f"{loaded.vocab_size} ids (0 to {loaded.vocab_size - 1}); was it made with "
                "another tokenizer?"
            )
