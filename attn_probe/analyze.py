"""``attn-probe analyze``: the protocol of "When Attention Collapses" on an existing model.

The paper (arXiv 2404.08634) feeds N = 100 sequences of T = 100 tokens to a trained model,
averages every head's rank@0.9 over the sequences and reports, per layer, the largest of its
heads' averages (MaxRank). This command does that on

* a Hugging Face model directory (``save_pretrained`` layout),
* a ``package.module:factory`` whose callable returns a ``torch.nn.Module``, or
* a llama2.c checkpoint (``.bin``, legacy format),

with tokens from a text file (tokenized with the model directory's tokenizer), from a
modded-nanogpt token shard, or sampled from the model itself. It writes the per-layer and per-head
tables, pictures of the collapse profile and of chosen heads' attention, and TensorBoard logs.

Nothing is unpickled here: llama2.c checkpoints are parsed as plain float32 arrays, Hugging Face
weights are read by transformers (safetensors, or ``torch.load`` with ``weights_only=True``), and
a model directory's own Python code runs only with ``--trust-remote-code``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from .console import Progress, UsageError

__all__ = [
    "LoadedModel",
    "add_arguments",
    "load_model",
    "parse_heads",
    "read_shard",
    "run_analyze",
]

#: modded-nanogpt token shards: a header of 256 little-endian int32 (magic, version, token
#: count, then zeros) followed by the tokens as little-endian uint16.
SHARD_MAGIC = 20240520
SHARD_VERSION = 1
SHARD_HEADER_INTS = 256
SHARD_HEADER_BYTES = SHARD_HEADER_INTS * 4

_HF_INSTALL = 'pip install "attn_probe[hf]"'
_FACTORY = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
_DEFAULT_HEADS = (0, 1, 2, 3)
_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "tokenizer.model",
    "spiece.model", "sentencepiece.bpe.model", "merges.txt",
)
_MODEL_FORMS = (
    "a Hugging Face model directory (with config.json), a llama2.c checkpoint (.bin) or a "
    "package.module:factory"
)


# --------------------------------------------------------------------------------- arguments


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _tau(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``attn-probe analyze``."""
    parser.description = (
        "Measure attention collapse of an existing model the way the paper 'When Attention "
        "Collapses' does: every head's rank@tau averaged over N sequences of T tokens, and "
        "MaxRank (the largest head average) per layer."
    )
    parser.add_argument(
        "model", metavar="MODEL",
        help="a Hugging Face model directory (save_pretrained layout), a llama2.c checkpoint "
             "(.bin), or package.module:factory, a callable importable from the current "
             "directory or sys.path that returns a torch.nn.Module",
    )
    parser.add_argument(
        "--data", metavar="PATH",
        help="a text file (tokenized with the model directory's tokenizer) or a modded-nanogpt "
             "token shard (.bin); cut into consecutive sequences of --tokens tokens. "
             "Default: sequences sampled from the model itself, starting at its BOS token",
    )
    parser.add_argument("--n", type=_positive_int, default=100,
                        help="number of sequences (%(default)s)")
    parser.add_argument("--tokens", type=_positive_int, default=100,
                        help="tokens per sequence (%(default)s)")
    parser.add_argument("--tau", type=_tau, default=0.9,
                        help="energy / mass threshold of rank@tau and columns@tau (%(default)s)")
    parser.add_argument("--out", metavar="DIR",
                        help="output directory (default: runs/analyze/<model name>); the files "
                             "of an earlier analysis there are replaced")
    parser.add_argument(
        "--heads", metavar="L:H,...",
        help="attention heatmaps to draw: comma-separated LAYER:HEADS items; LAYER is a layer "
             "number (negative counts from the end) or a tag like L07, HEADS a head number, a "
             "range 0-3 or * for all (write --heads=-1:0 when it starts with a minus). "
             "Default: first and last layer, heads 0-3",
    )
    parser.add_argument("--batch-size", type=_positive_int, default=8,
                        help="sequences per forward pass (%(default)s)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow a Hugging Face model directory to run its own Python code")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the sampled or random token ids (%(default)s)")
    parser.add_argument("--device", default="cpu",
                        help="torch device to run the model on (%(default)s)")


# ------------------------------------------------------------------------------ head choice


@dataclass(frozen=True)
class HeadChoice:
    """One ``LAYER:HEADS`` item of ``--heads``: ``heads`` None means all heads."""

    layer: int | str
    heads: tuple[int, ...] | None
    text: str


def parse_heads(spec: str) -> list[HeadChoice]:
    """Parse ``--heads``: ``"0:0-3,L04:1,-1:*"``. Raises :class:`UsageError` on bad syntax."""
    choices = []
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        layer_text, sep, head_text = item.partition(":")
        layer_text, head_text = layer_text.strip(), head_text.strip()
        if not sep or not layer_text or not head_text:
            raise UsageError(f"--heads item {item!r} is not LAYER:HEADS (e.g. 0:1, L04:0-3, -1:*)")
        layer: int | str
        if re.fullmatch(r"-?\d+", layer_text):
            layer = int(layer_text)
        elif re.fullmatch(r"[Ll]\d+", layer_text):
            layer = f"L{int(layer_text[1:]):02d}"
        else:
            raise UsageError(
                f"--heads item {item!r}: layer {layer_text!r} is neither a number nor a tag "
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
                raise UsageError(f"--heads item {item!r}: empty head range {head_text}")
            heads = tuple(range(low, high + 1))
        else:
            raise UsageError(
                f"--heads item {item!r}: heads {head_text!r} must be a number, a range like "
                "0-3 or *"
            )
        choices.append(HeadChoice(layer, heads, item))
    if not choices:
        raise UsageError(f"--heads {spec!r} names no head")
    return choices


def resolve_heads(
    choices: list[HeadChoice] | None, layer_names: list[str], num_heads: dict[str, int]
) -> dict[str, list[int]]:
    """Module name -> head numbers to draw, in layer order; bad layers or heads: UsageError.

    ``layer_names`` are all monitored modules in order (layer ``i`` is tag ``Lii``);
    ``num_heads`` gives the head count of those that ran.
    """
    ran = [name for name in layer_names if name in num_heads]
    count = len(layer_names)
    if choices is None:
        picked: dict[str, list[int]] = {}
        for name in (ran[0], ran[-1]):
            picked.setdefault(name, [h for h in _DEFAULT_HEADS if h < num_heads[name]])
        return picked
    tags = {f"L{i:02d}": name for i, name in enumerate(layer_names)}
    picked = {}
    for choice in choices:
        if isinstance(choice.layer, str):
            if choice.layer not in tags:
                raise UsageError(
                    f"--heads item {choice.text!r}: no layer {choice.layer}; the model has "
                    f"layers L00 to L{count - 1:02d}"
                )
            name = tags[choice.layer]
        else:
            if not -count <= choice.layer < count:
                raise UsageError(
                    f"--heads item {choice.text!r}: layer {choice.layer} out of range; the model "
                    f"has {count} attention layers (0 to {count - 1}, or -1 for the last)"
                )
            name = layer_names[choice.layer]
        if name not in num_heads:
            raise UsageError(f"--heads item {choice.text!r}: layer {name} does not run on tokens")
        available = num_heads[name]
        heads = list(range(available)) if choice.heads is None else list(choice.heads)
        bad = [h for h in heads if h >= available]
        if bad:
            raise UsageError(
                f"--heads item {choice.text!r}: head {bad[0]} out of range; that layer has "
                f"{available} heads (0 to {available - 1})"
            )
        merged = picked.setdefault(name, [])
        merged.extend(h for h in heads if h not in merged)
    return {name: picked[name] for name in layer_names if name in picked}


# ---------------------------------------------------------------------------------- models


@dataclass
class LoadedModel:
    """A model ready to measure, and what is known about how to feed it."""

    model: nn.Module
    name: str  #: short name, used for the default output directory
    kind: str  #: "hf", "llama2c" or "factory"
    description: str
    vocab_size: int | None
    bos: int
    context: int | None  #: longest sequence the model accepts, when known
    tokenizer_dir: Path | None = None
    hf: bool = False  #: called with keyword arguments (input_ids=...)

    def inputs(self, tokens: torch.Tensor) -> Any:
        if not self.hf:
            return tokens
        kwargs: dict[str, Any] = {"input_ids": tokens}
        if "use_cache" in inspect.signature(self.model.forward).parameters:
            kwargs["use_cache"] = False
        return kwargs

    def __call__(self, tokens: torch.Tensor) -> Any:
        inputs = self.inputs(tokens)
        return self.model(**inputs) if isinstance(inputs, dict) else self.model(inputs)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _import_transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise UsageError(
            f"this model needs Hugging Face transformers, which is not installed: {_HF_INSTALL}"
        ) from None
    return transformers


def _dtype_kwarg(transformers: Any) -> str:
    version = re.match(r"(\d+)\.(\d+)", transformers.__version__)
    major, minor = (int(version.group(1)), int(version.group(2))) if version else (5, 0)
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def _vocab_size(model: nn.Module) -> int | None:
    get = getattr(model, "get_input_embeddings", None)
    if callable(get):
        try:
            embedding = get()
        except Exception:  # noqa: BLE001 - not every model implements it
            embedding = None
        if isinstance(embedding, nn.Embedding):
            return int(embedding.num_embeddings)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if isinstance(vocab, int) and vocab > 0:
        return vocab
    vocab = getattr(model, "vocab_size", None)
    if isinstance(vocab, int) and vocab > 0:
        return vocab
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            return int(module.num_embeddings)
    return None


def _context(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "block_size", "max_seq_len"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _bos(model: nn.Module, vocab: int | None) -> int:
    config = getattr(model, "config", None)
    bos = getattr(config, "bos_token_id", None)
    if isinstance(bos, (list, tuple)):
        bos = bos[0] if bos else None
    if isinstance(bos, int) and bos >= 0 and (vocab is None or bos < vocab):
        return bos
    return 1 if vocab is None or vocab > 1 else 0


def _remote_code_error(path: Path) -> UsageError:
    return UsageError(
        f"{path} holds a model with its own Python code; pass --trust-remote-code if you trust it"
    )


def _from_pretrained(auto: Any, path: Path, config: Any, common: dict) -> tuple[Any, set] | None:
    """``auto.from_pretrained`` with SDPA, else eager attention: (model, missing weight names),
    or None when this Auto class has no model for the config."""
    for implementation in ("sdpa", "eager"):
        try:
            model, info = auto.from_pretrained(
                str(path), config=config, attn_implementation=implementation,
                output_loading_info=True, **common,
            )
            return model, set(info.get("missing_keys") or ())
        except ValueError as error:
            message = _one_line(error)
            if "trust_remote_code" in message:
                raise _remote_code_error(path) from None
            if "Unrecognized configuration class" in message:
                return None
            if implementation == "sdpa" and (
                "scaled_dot_product_attention" in message or "sdpa" in message.lower()
            ):
                continue  # no SDPA for this architecture: eager attention then
            raise UsageError(f"{path}: cannot load the model: {message}") from None
        except (OSError, ImportError) as error:
            raise UsageError(f"{path}: cannot load the model: {_one_line(error)}") from None
    return None


def _load_hf(path: Path, trust_remote_code: bool,
             warn: Callable[[str], None]) -> nn.Module:
    """A Hugging Face model directory as a causal LM, or as a bare model when the checkpoint
    has no language-model head (an encoder, say): never with made-up weights if avoidable."""
    transformers = _import_transformers()
    flags = {"local_files_only": True, "trust_remote_code": bool(trust_remote_code)}
    try:
        config = transformers.AutoConfig.from_pretrained(str(path), **flags)
    except ValueError as error:
        message = _one_line(error)
        if "trust_remote_code" in message:
            raise _remote_code_error(path) from None
        raise UsageError(f"{path}: cannot read the model config: {message}") from None
    except OSError as error:
        raise UsageError(f"{path}: cannot read the model config: {_one_line(error)}") from None

    common = {**flags, _dtype_kwarg(transformers): torch.float32}
    logging = transformers.utils.logging
    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()  # missing weights are reported below, in one line
    logging.disable_progress_bar()
    try:
        loaded = _from_pretrained(transformers.AutoModelForCausalLM, path, config, common)
        if loaded is None or loaded[1]:
            # No causal-LM class, or the checkpoint lacks its head: try the bare model.
            bare = _from_pretrained(transformers.AutoModel, path, config, common)
            if bare is not None and (loaded is None or not bare[1]):
                loaded = bare
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()
    if loaded is None:
        raise UsageError(
            f"{path}: transformers knows no model class for this config "
            f"(model_type={getattr(config, 'model_type', None)!r})"
        )
    model, missing = loaded
    if missing:
        names = sorted(missing)
        warn(f"{len(names)} weights of {type(model).__name__} are not in {path} and were "
             f"initialised at random: {', '.join(names[:4])}{', ...' if len(names) > 4 else ''}")
    return model


def _is_shard(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return len(head) == 4 and int(np.frombuffer(head, "<i4")[0]) == SHARD_MAGIC


def _load_factory(spec: str) -> tuple[nn.Module, str]:
    module_name, _, attr = spec.partition(":")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name and (module_name == error.name or module_name.startswith(error.name + ".")):
            raise UsageError(
                f"MODEL {spec!r}: no module named {error.name!r} (looked in the current directory "
                f"and sys.path); MODEL must be {_MODEL_FORMS}"
            ) from None
        raise UsageError(f"MODEL {spec!r}: importing {module_name} failed: {_one_line(error)}") \
            from None
    except Exception as error:  # noqa: BLE001 - the user's module; report it on one line
        raise UsageError(
            f"MODEL {spec!r}: importing {module_name} failed: {type(error).__name__}: "
            f"{_one_line(error)}"
        ) from None
    factory: Any = module
    for part in attr.split("."):
        if not hasattr(factory, part):
            raise UsageError(f"MODEL {spec!r}: module {module_name} has no attribute {attr!r}")
        factory = getattr(factory, part)
    if isinstance(factory, nn.Module):
        return factory, f"{module_name}.{attr}"
    if not callable(factory):
        raise UsageError(f"MODEL {spec!r}: {attr} is neither callable nor a torch.nn.Module")
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):
        signature = None
    if signature is not None:
        required = [
            p.name for p in signature.parameters.values()
            if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD,
                                                   p.KEYWORD_ONLY)
        ]
        if required:
            raise UsageError(
                f"MODEL {spec!r}: the factory must be callable without arguments, but it "
                f"requires {', '.join(required)}"
            )
    try:
        model = factory()
    except Exception as error:  # noqa: BLE001 - the user's factory; report it on one line
        raise UsageError(
            f"MODEL {spec!r}: the factory raised {type(error).__name__}: {_one_line(error)}"
        ) from None
    if not isinstance(model, nn.Module):
        raise UsageError(
            f"MODEL {spec!r}: the factory returned {type(model).__name__}, not a torch.nn.Module"
        )
    return model, f"{module_name}.{attr}"


def load_model(spec: str, *, trust_remote_code: bool = False, device: str = "cpu",
               warn: Callable[[str], None] | None = None) -> LoadedModel:
    """Load MODEL (a Hugging Face directory, a llama2.c ``.bin`` or ``module:factory``)."""
    if warn is None:
        def warn(message: str) -> None:
            print(f"warning: {message}", file=sys.stderr, flush=True)

    path = Path(spec).expanduser()
    if path.exists():
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise UsageError(
                    f"{path} is a directory without config.json, not a Hugging Face model "
                    f"directory; MODEL must be {_MODEL_FORMS}"
                )
            model = _load_hf(path, trust_remote_code, warn)
            kind, name = "hf", path.resolve().name
            description = f"Hugging Face {type(model).__name__} from {path}"
            tokenizer_dir: Path | None = path
            hf = True
        elif path.suffix.lower() == ".bin":
            if _is_shard(path):
                raise UsageError(
                    f"{path} is a token shard (data), not a model; pass it with --data"
                )
            _import_transformers()
            from .llama2c import load_llama2c

            try:
                model = load_llama2c(path, attn_implementation="sdpa")
            except (ValueError, FileNotFoundError) as error:
                hint = ""
                if (path.parent / "config.json").is_file():
                    hint = f"; for the Hugging Face model, give its directory {path.parent}"
                raise UsageError(_one_line(error) + hint) from None
            kind, name = "llama2c", path.stem
            description = f"llama2.c checkpoint {path} (as {type(model).__name__})"
            tokenizer_dir, hf = None, True
        else:
            raise UsageError(
                f"{path}: unknown model format {path.suffix or '(no suffix)'!r}; MODEL must be "
                f"{_MODEL_FORMS}"
            )
    elif _FACTORY.match(spec):
        model, name = _load_factory(spec)
        kind, tokenizer_dir, hf = "factory", None, False
        description = f"{type(model).__name__} from factory {spec}"
    else:
        raise UsageError(f"MODEL {spec!r}: no such file or directory; MODEL must be {_MODEL_FORMS}")

    try:
        model = model.to(torch.device(device))
    except (RuntimeError, ValueError, AssertionError) as error:
        raise UsageError(f"cannot move the model to device {device!r}: {_one_line(error)}") \
            from None
    model.eval()
    vocab = _vocab_size(model)
    return LoadedModel(
        model=model, name=re.sub(r"[^\w.-]+", "_", name) or "model", kind=kind,
        description=description, vocab_size=vocab, bos=_bos(model, vocab),
        context=_context(model), tokenizer_dir=tokenizer_dir, hf=hf,
    )


# ------------------------------------------------------------------------------------ data


def read_shard(path: str | os.PathLike[str], max_tokens: int | None = None) -> np.ndarray:
    """Tokens of a modded-nanogpt shard (uint16), at most ``max_tokens`` of them.

    The header is checked: magic number, version and that the file holds exactly the token count
    it announces. Any mismatch raises :class:`UsageError` saying what is wrong.
    """
    path = Path(path)
    size = path.stat().st_size
    if size < SHARD_HEADER_BYTES:
        raise UsageError(
            f"{path}: not a token shard: the {SHARD_HEADER_BYTES}-byte header is missing (file of "
            f"{size} bytes)"
        )
    header = np.fromfile(path, dtype="<i4", count=SHARD_HEADER_INTS)
    magic, version, count = (int(v) for v in header[:3])
    if magic != SHARD_MAGIC:
        raise UsageError(
            f"{path}: not a token shard: magic number {magic}, expected {SHARD_MAGIC} "
            "(a modded-nanogpt .bin shard)"
        )
    if version != SHARD_VERSION:
        raise UsageError(
            f"{path}: unsupported token shard version {version}, expected {SHARD_VERSION}"
        )
    expected = SHARD_HEADER_BYTES + 2 * count
    if count < 0 or size != expected:
        raise UsageError(
            f"{path}: token shard size mismatch: the header announces {count} tokens "
            f"({expected} bytes), the file has {size} bytes"
        )
    take = count if max_tokens is None else min(count, max_tokens)
    return np.fromfile(path, dtype="<u2", count=take, offset=SHARD_HEADER_BYTES)


def _read_text_tokens(path: Path, loaded: LoadedModel, needed: int, trust_remote_code: bool,
                      warn: Callable[[str], None]) -> np.ndarray:
    if loaded.tokenizer_dir is None:
        raise UsageError(
            f"--data {path} is text, which needs a tokenizer, and only a Hugging Face model "
            "directory brings one; give a token shard (.bin) or leave out --data to sample"
        )
    if not any((loaded.tokenizer_dir / name).is_file() for name in _TOKENIZER_FILES):
        raise UsageError(
            f"--data {path} is text, but {loaded.tokenizer_dir} has no tokenizer (none of "
            f"{', '.join(_TOKENIZER_FILES[:3])}, ...); give a token shard (.bin) or leave out "
            "--data to sample"
        )
    transformers = _import_transformers()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(
            str(loaded.tokenizer_dir), local_files_only=True,
            trust_remote_code=bool(trust_remote_code),
        )
    except (OSError, ValueError, TypeError, ImportError) as error:
        raise UsageError(
            f"--data {path} is text, but no tokenizer could be loaded from "
            f"{loaded.tokenizer_dir}: {_one_line(error)}"
        ) from None

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
        return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])

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


def _logits(output: Any, vocab: int | None) -> torch.Tensor | None:
    """The (B, T, V) next-token logits in a model output, if it holds any."""
    candidate = getattr(output, "logits", None)
    if candidate is None:
        if isinstance(output, torch.Tensor):
            candidate = output
        elif isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
            candidate = output[0]
    if not isinstance(candidate, torch.Tensor) or candidate.dim() != 3:
        return None
    if vocab is not None and candidate.shape[-1] != vocab:
        return None
    return candidate


@torch.no_grad()
def _sample_loop(loaded: LoadedModel, n: int, length: int, generator: torch.Generator,
                 device: torch.device) -> torch.Tensor:
    """Ancestral sampling by re-running the whole prefix (for models without a KV cache)."""
    tokens = torch.full((n, length), loaded.bos, dtype=torch.long, device=device)
    for pos in range(1, length):
        logits = _logits(loaded(tokens[:, :pos]), loaded.vocab_size)
        probs = torch.softmax(logits[:, -1, :].float(), dim=-1)
        tokens[:, pos] = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1) \
            .to(device)
    return tokens


def _device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _sample(loaded: LoadedModel, n: int, length: int, seed: int, batch_size: int,
            warn: Callable[[str], None]) -> tuple[torch.Tensor, str]:
    device = _device(loaded.model)
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
            f"{type(error).__name__}: {_one_line(error)}"
        ) from None
    logits = _logits(output, loaded.vocab_size)
    if logits is None:
        warn(f"{loaded.description} gives no next-token logits to sample from; measuring "
             f"uniformly random token ids (seed {seed}); pass --data for real text")
        ids = torch.randint(0, loaded.vocab_size, (n, length), generator=generator)
        return ids, f"uniformly random token ids below {loaded.vocab_size} (seed {seed})"

    use_cache = loaded.hf and getattr(output, "logits", None) is not None
    if use_cache:
        from .llama2c import sample_tokens
    bar = Progress("sampling")
    parts = []
    for start in range(0, n, batch_size):
        chunk = min(batch_size, n - start)
        if use_cache:
            cpu_generator = generator if device.type == "cpu" else None
            if cpu_generator is None:  # the generator must live on the model's device
                cpu_generator = torch.Generator(device=device).manual_seed(seed + start)
            parts.append(sample_tokens(loaded.model, chunk, length, generator=cpu_generator,
                                       bos=loaded.bos).cpu())
        else:
            parts.append(_sample_loop(loaded, chunk, length, generator, device).cpu())
        bar(start + chunk, n)
    return torch.cat(parts), f"sampled from the model (temperature 1, from token {loaded.bos}, " \
                             f"seed {seed})"


def load_tokens(args: argparse.Namespace, loaded: LoadedModel,
                warn: Callable[[str], None]) -> tuple[torch.Tensor, str]:
    """(N, T) token ids to measure, and a description of where they came from."""
    n, length = args.n, args.tokens
    if args.data is None:
        return _sample(loaded, n, length, args.seed, args.batch_size, warn)
    path = Path(args.data).expanduser()
    if not path.exists():
        raise UsageError(f"--data {path}: no such file")
    if not path.is_file():
        raise UsageError(f"--data {path}: not a file")
    if _is_shard(path) or path.suffix.lower() == ".bin":
        ids = read_shard(path, max_tokens=n * length)
        source = f"token shard {path}"
    else:
        ids = _read_text_tokens(path, loaded, n * length, args.trust_remote_code, warn)
        source = f"text file {path}"
    tokens, warning = _windows(ids, n, length, source)
    if warning:
        warn(warning)
    return tokens, source


def _check_tokens(tokens: torch.Tensor, loaded: LoadedModel, source: str) -> None:
    if loaded.vocab_size is not None and tokens.numel():
        top = int(tokens.max())
        if top >= loaded.vocab_size:
            raise UsageError(
                f"{source} holds token id {top}, outside the model's vocabulary of "
                f"{loaded.vocab_size} ids (0 to {loaded.vocab_size - 1}); was it made with "
                "another tokenizer?"
            )


# ---------------------------------------------------------------------------------- output


def _lazy_line(snapshot: Any) -> str:
    lazy = [layer for layer in snapshot.layers if layer.is_lazy]
    if lazy:
        return "lazy layers: " + ", ".join(f"{layer.tag} ({layer.name})" for layer in lazy)
    rule = snapshot.layers[0].rule if snapshot.layers else None
    percent = round(snapshot.tau * 100)
    if rule is None:
        return f"no lazy layer at tau={snapshot.tau:g}"
    share = ("all heads" if rule.min_lazy_share >= 1
             else f"at least {rule.min_lazy_share:.0%} of the heads")
    return (f"no lazy layer at tau={snapshot.tau:g} under rule: {share} with mean "
            f"rank@{percent} <= {rule.max_rank:g} and columns@{percent} <= {rule.max_columns:g}")


def _most_collapsed(snapshot: Any) -> Any | None:
    """The layer with the smallest MaxRank (ties: smallest mean rank, then the deeper one)."""
    best, best_key = None, None
    for layer in snapshot.layers:
        max_rank, mean_rank = layer.reduce("rank", "max"), layer.reduce("rank", "mean")
        if not math.isfinite(max_rank):
            continue
        key = (max_rank, mean_rank, -layer.index)
        if best_key is None or key < best_key:
            best, best_key = layer, key
    return best


def _batches(tokens: torch.Tensor, batch_size: int, loaded: LoadedModel,
             device: torch.device) -> Iterator[Any]:
    for start in range(0, tokens.shape[0], batch_size):
        yield loaded.inputs(tokens[start : start + batch_size].to(device))


def _save(figure: Any, path: Path, written: list[Path]) -> None:
    figure.savefig(path)
    written.append(path)


def _analyze(args: argparse.Namespace) -> int:
    from .capture import CaptureError, capture, plan_sites
    from .profile import rank_profile

    def warn(message: str) -> None:
        print(f"attn-probe analyze: warning: {message}", file=sys.stderr, flush=True)

    choices = parse_heads(args.heads) if args.heads is not None else None
    loaded = load_model(args.model, trust_remote_code=args.trust_remote_code,
                        device=args.device, warn=warn)
    if loaded.context is not None and args.tokens > loaded.context:
        raise UsageError(
            f"--tokens {args.tokens} is longer than the model's context of {loaded.context} tokens"
        )
    out = Path(args.out) if args.out else Path("runs") / "analyze" / loaded.name
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory")
    device = _device(loaded.model)

    # Find the attention modules and their head counts on a two-token input before anything
    # slow happens, so that a model without attention or a bad --heads fails at once.
    try:
        monitored = [site.name for site in plan_sites(loaded.model)]
    except (LookupError, CaptureError) as error:  # LookupError: no attention module found
        raise UsageError(_one_line(error)) from None
    probe = torch.full((1, min(2, args.tokens)), loaded.bos, dtype=torch.long, device=device)
    try:
        with capture(loaded.model, max_sequences=1) as cap:
            with torch.no_grad():
                loaded(probe)
            heads_per_layer = {name: int(a.shape[1]) for name, a in cap.attention.items()}
    except CaptureError as error:
        raise UsageError(_one_line(error)) from None
    except Exception as error:  # noqa: BLE001 - the model does not take token ids
        raise UsageError(
            f"calling the model on a (1, {probe.shape[1]}) tensor of token ids failed: "
            f"{type(error).__name__}: {_one_line(error)}"
        ) from None
    if not heads_per_layer:
        raise UsageError(
            f"{loaded.description}: attention modules were found but none ran on token ids"
        )
    heatmap_heads = resolve_heads(choices, monitored, heads_per_layer)

    params = sum(p.numel() for p in loaded.model.parameters())
    print(f"attn-probe analyze: {loaded.description}: {len(monitored)} attention layers, "
          f"{params:,} parameters", flush=True)
    torch.manual_seed(args.seed)
    tokens, source = load_tokens(args, loaded, warn)
    _check_tokens(tokens, loaded, source)
    n, length = tokens.shape
    print(f"data: {source}: {n} sequences of {length} tokens; tau = {args.tau:g}", flush=True)

    bar = Progress("measuring")
    try:
        with capture(loaded.model, max_sequences=1) as cap:
            with torch.no_grad():
                loaded(tokens[:1].to(device))
            samples = {name: a[0].detach().float().cpu() for name, a in cap.attention.items()}
        snapshot = rank_profile(
            loaded.model, _batches(tokens, args.batch_size, loaded, device), n_sequences=n,
            tau=args.tau, on_batch=lambda done: bar(done, n),
        )
    except CaptureError as error:
        raise UsageError(_one_line(error)) from None
    snapshot = dataclasses.replace(snapshot, samples=samples)
    if not snapshot.layers:
        raise UsageError("no attention was recorded: the model's attention modules never ran")

    from . import plots
    from .report import format_table, write_tables
    from .writers.tensorboard import TensorBoardWriter

    out.mkdir(parents=True, exist_ok=True)
    # Pictures and event files of an earlier run here would be mistaken for this one's.
    for stale in [*out.glob("heatmaps_L*.png"), *out.glob("head_profiles_L*.png"),
                  *(out / "tb").glob("events.out.tfevents.*")]:
        stale.unlink()
    written = list(write_tables(snapshot, out))
    np.save(out / "tokens.npy", tokens.numpy())
    written.append(out / "tokens.npy")

    percent = round(args.tau * 100)
    short = loaded.name if len(loaded.name) <= 28 else loaded.name[:27] + "…"
    _save(plots.max_rank_profile_for(
        snapshot, title=f"{short}: MaxRank@{percent}%, {n} seqs x {length} tokens"),
        out / "max_rank_profile.png", written)
    _save(plots.collapse_map_for(snapshot, "rank", title=f"{short}: mean rank@{percent}%",
                                 colorbar_label=f"rank@{percent}%"),
          out / "collapse_map.png", written)
    tags = {layer.name: layer.tag for layer in snapshot.layers}
    for name, heads in heatmap_heads.items():
        if not heads or name not in samples:
            continue
        figure = plots.attention_heatmaps(
            samples[name], heads=heads,
            title=f"{tags[name]} {name}: attention of sequence 0 ({length} tokens)",
        )
        _save(figure, out / f"heatmaps_{tags[name]}.png", written)
    collapsed = _most_collapsed(snapshot)
    if collapsed is not None:
        _save(plots.head_profiles_for(
            snapshot, collapsed.name,
            title=f"{collapsed.tag} {collapsed.name} (smallest MaxRank): per-head means"),
            out / f"head_profiles_{collapsed.tag}.png", written)

    with TensorBoardWriter(log_dir=str(out / "tb"), heatmap_heads=heatmap_heads,
                           max_heatmap_tokens=min(length, 128)) as writer:
        writer.write(snapshot, images=True)

    print()
    print(format_table(snapshot))
    profile = ", ".join(
        f"{layer.tag} {value:.2f}" for layer, value in zip(snapshot.layers,
                                                          snapshot.max_rank_profile())
    )
    print(f"\nMaxRank@{percent}: {profile}")
    print(_lazy_line(snapshot))
    print(f"\nwrote {out}: {', '.join(p.name for p in written)}")
    print(f"TensorBoard logs in {out / 'tb'}; see them with:\n  tensorboard --logdir {out / 'tb'}")
    return 0


def run_analyze(args: argparse.Namespace) -> int:
    """Entry point of ``attn-probe analyze``: problems with the input become one-line errors."""
    try:
        return _analyze(args)
    except FileNotFoundError as error:
        raise UsageError(_one_line(error)) from None
    except LookupError as error:
        if type(error) is LookupError:  # discovery's "no attention module" and friends
            raise UsageError(_one_line(error)) from None
        raise
