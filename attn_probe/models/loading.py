"""Loading a model to measure: a Hugging Face model directory, a llama2.c checkpoint, or a
``package.module:factory`` (what ``attn-probe analyze`` and :func:`attn_probe.explore` take).

Bad input is one :class:`~.messages.InputError` line (a ``ValueError``) naming the argument at
fault; a missing ``transformers`` is an ``ImportError`` saying how to install it. Nothing is
unpickled here: llama2.c checkpoints are parsed as plain float32 arrays, Hugging Face weights are
read by transformers (safetensors, or ``torch.load`` with ``weights_only=True``), and a model
directory's own Python code runs only with ``trust_remote_code``.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..notices import warn as warn_user
from .messages import InputError, Message, one_line
from .optional import import_transformers
from .shards import is_shard

__all__ = ["LoadedModel", "MODEL_FORMS", "load_model", "loaded_model"]

_FACTORY = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")

MODEL_FORMS = (
    "a Hugging Face model directory (with config.json), a llama2.c checkpoint (.bin) or a "
    "package.module:factory"
)


@dataclass
class LoadedModel:
    """A model ready to measure, and what is known about how to feed it."""

    model: nn.Module
    name: str  #: short name, used for the default output directory
    kind: str  #: "hf", "llama2c", "factory" or "module" (given as a torch.nn.Module)
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


def _remote_code_error(path: Path) -> InputError:
    return InputError("{path} holds a model with its own Python code; pass {trust_remote_code} "
                      "if you trust it", path=path)


def _cannot_load(path: Path, error: BaseException, named: bool = False) -> InputError:
    what = f"{type(error).__name__}: " if named else ""
    return InputError("{path}: cannot load the model: {error}", path=path,
                      error=what + one_line(error))


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
            message = one_line(error)
            if "trust_remote_code" in message:
                raise _remote_code_error(path) from None
            if "Unrecognized configuration class" in message:
                return None
            if implementation == "sdpa" and (
                "scaled_dot_product_attention" in message or "sdpa" in message.lower()
            ):
                continue  # no SDPA for this architecture: eager attention then
            raise _cannot_load(path, error) from None
        except (OSError, ImportError) as error:
            raise _cannot_load(path, error) from None
        except Exception as error:  # noqa: BLE001 - corrupt weights (SafetensorError, unpickling)
            raise _cannot_load(path, error, named=True) from None
    return None


def _load_hf(path: Path, trust_remote_code: bool,
             warn: Callable[[Message], None]) -> nn.Module:
    """A Hugging Face model directory as a causal LM, or as a bare model when the checkpoint
    has no language-model head (an encoder, say): never with made-up weights if avoidable."""
    transformers = import_transformers("this model")
    flags = {"local_files_only": True, "trust_remote_code": bool(trust_remote_code)}
    try:
        config = transformers.AutoConfig.from_pretrained(str(path), **flags)
    except ValueError as error:
        message = one_line(error)
        if "trust_remote_code" in message:
            raise _remote_code_error(path) from None
        raise InputError("{path}: cannot read the model config: {error}", path=path,
                         error=message) from None
    except OSError as error:
        raise InputError("{path}: cannot read the model config: {error}", path=path,
                         error=one_line(error)) from None

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
        raise InputError("{path}: transformers knows no model class for this config "
                         "(model_type={kind!r})", path=path,
                         kind=getattr(config, "model_type", None))
    model, missing = loaded
    if missing:
        names = sorted(missing)
        warn(Message("{count} weights of {cls} are not in {path} and were initialised at "
                     "random: {names}", count=len(names), cls=type(model).__name__, path=path,
                     names=", ".join(names[:4]) + (", ..." if len(names) > 4 else "")))
    return model


def _load_factory(spec: str) -> tuple[nn.Module, str]:
    module_name, _, attr = spec.partition(":")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name and (module_name == error.name or module_name.startswith(error.name + ".")):
            raise InputError(
                "{model} {spec!r}: no module named {name!r} (looked in the current directory "
                "and sys.path); {model} must be {forms}", spec=spec, name=error.name,
                forms=MODEL_FORMS) from None
        raise InputError("{model} {spec!r}: importing {module} failed: {error}", spec=spec,
                         module=module_name, error=one_line(error)) from None
    except Exception as error:  # noqa: BLE001 - the user's module; report it on one line
        raise InputError("{model} {spec!r}: importing {module} failed: {error}", spec=spec,
                         module=module_name,
                         error=f"{type(error).__name__}: {one_line(error)}") from None
    factory: Any = module
    for part in attr.split("."):
        if not hasattr(factory, part):
            raise InputError("{model} {spec!r}: module {module} has no attribute {attr!r}",
                             spec=spec, module=module_name, attr=attr)
        factory = getattr(factory, part)
    if isinstance(factory, nn.Module):
        return factory, f"{module_name}.{attr}"
    if not callable(factory):
        raise InputError("{model} {spec!r}: {attr} is neither callable nor a torch.nn.Module",
                         spec=spec, attr=attr)
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
            raise InputError("{model} {spec!r}: the factory must be callable without "
                             "arguments, but it requires {required}", spec=spec,
                             required=", ".join(required))
    try:
        model = factory()
    except Exception as error:  # noqa: BLE001 - the user's factory; report it on one line
        raise InputError("{model} {spec!r}: the factory raised {cls}: {error}", spec=spec,
                         cls=type(error).__name__, error=one_line(error)) from None
    if not isinstance(model, nn.Module):
        raise InputError("{model} {spec!r}: the factory returned {cls}, not a torch.nn.Module",
                         spec=spec, cls=type(model).__name__)
    return model, f"{module_name}.{attr}"


def load_model(model: nn.Module | str | os.PathLike[str], *, trust_remote_code: bool = False,
               device: str | torch.device = "cpu",
               warn: Callable[[Message], None] | None = None) -> LoadedModel:
    """Load ``model``: a Hugging Face model directory (``save_pretrained`` layout), a llama2.c
    checkpoint (``.bin``) or ``"package.module:factory"`` (a ``torch.nn.Module``, or a callable
    that returns one without arguments, importable from the current directory or
    ``sys.path``), moved to ``device`` and put in eval mode. A ``torch.nn.Module`` is taken as
    it is (its device and mode unchanged).

    ``trust_remote_code``: let a model directory run its own Python code. ``warn`` is called
    with what the caller should know but that does not stop loading (weights initialised at
    random); default: a ``UserWarning``. Bad input raises :class:`~.messages.InputError` (a
    ``ValueError``); a model that needs ``transformers`` without it, ``ImportError``.
    """
    if isinstance(model, nn.Module):
        name = type(model).__name__
        return loaded_model(model, name=name, kind="module", description=name)
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"model must be a torch.nn.Module, {MODEL_FORMS}; got "
                        f"{type(model).__name__}")
    if warn is None:
        def warn(message: Message) -> None:
            warn_user(message, UserWarning)

    spec = os.fspath(model)
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise InputError(
                    "{path} is a directory without config.json, not a Hugging Face model "
                    "directory; {model} must be {forms}", path=path, forms=MODEL_FORMS)
            module = _load_hf(path, trust_remote_code, warn)
            kind, name = "hf", path.resolve().name
            description = f"Hugging Face {type(module).__name__} from {path}"
            tokenizer_dir: Path | None = path
            hf = True
        elif path.suffix.lower() == ".bin":
            if is_shard(path):
                raise InputError("{path} is a token shard (data), not a model; pass it with "
                                 "{inputs}", path=path)
            import_transformers("this model")
            from .llama2c import load_llama2c

            try:
                module = load_llama2c(path, attn_implementation="sdpa")
            except (ValueError, FileNotFoundError) as error:
                hint = ""
                if (path.parent / "config.json").is_file():
                    hint = f"; for the Hugging Face model, give its directory {path.parent}"
                raise InputError("{error}", error=one_line(error) + hint) from None
            kind, name = "llama2c", path.stem
            description = f"llama2.c checkpoint {path} (as {type(module).__name__})"
            tokenizer_dir, hf = None, True
        else:
            raise InputError("{path}: unknown model format {suffix!r}; {model} must be {forms}",
                             path=path, suffix=path.suffix or "(no suffix)", forms=MODEL_FORMS)
    elif _FACTORY.match(spec):
        module, name = _load_factory(spec)
        kind, tokenizer_dir, hf = "factory", None, False
        description = f"{type(module).__name__} from factory {spec}"
    else:
        raise InputError("{model} {spec!r}: no such file or directory; {model} must be {forms}",
                         spec=spec, forms=MODEL_FORMS)

    try:
        module = module.to(torch.device(device))
    except (RuntimeError, ValueError, TypeError, AssertionError) as error:
        raise InputError("cannot move the model to {device} {value!r}: {error}", value=device,
                         error=one_line(error)) from None
    module.eval()
    return loaded_model(module, name=name, kind=kind, description=description,
                        tokenizer_dir=tokenizer_dir, hf=hf)


def loaded_model(model: nn.Module, *, name: str, kind: str, description: str,
                 tokenizer_dir: Path | None = None, hf: bool | None = None) -> LoadedModel:
    """A model in memory as a :class:`LoadedModel`: its vocabulary, BOS token and context read
    from the model. ``hf`` None: whether its forward takes ``input_ids`` by keyword."""
    if hf is None:
        try:
            hf = "input_ids" in inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            hf = False
    vocab = _vocab_size(model)
    return LoadedModel(
        model=model, name=re.sub(r"[^\w.-]+", "_", name) or "model", kind=kind,
        description=description, vocab_size=vocab, bos=_bos(model, vocab),
        context=_context(model), tokenizer_dir=tokenizer_dir, hf=hf,
    )
