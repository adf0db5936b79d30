"""``attn-probe analyze``: the protocol of "When Attention Collapses" on an existing model.

The paper (arXiv 2404.08634) feeds N = 100 sequences of T = 100 tokens to a trained model,
averages every head's rank@0.9 over the sequences and reports, per layer, the largest of its
heads' averages (MaxRank). This module is the orchestration: it reads the options, loads the
model and the tokens (:mod:`attn_probe.models.loading`, :mod:`attn_probe.models.inputs`), runs
:func:`attn_probe.rank_profile` and writes the tables, pictures and TensorBoard logs.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from ..alerts import AlertRules
from ..attention import (
    CaptureError, Hints, NoAttentionFound, NoKernelCall, find_attention_modules, plan_sites,
)
from ..models.inputs import load_inputs
from ..models.loading import LoadedModel, load_model
from ..models.messages import InputError, Message
from ..models.sampling import model_device
from ..options import CaptureOptions
from ..snapshot import percent
from .console import Progress, UsageError, one_line
from .heads import parse_heads, resolve_heads

__all__ = ["OPTION_NAMES", "add_arguments", "run_analyze"]

#: The loaders' arguments as this command names them (:class:`~attn_probe.models.messages.Message`).
OPTION_NAMES = {
    "model": "MODEL", "inputs": "--data", "sequences": "--sequences", "tokens": "--tokens",
    "trust_remote_code": "--trust-remote-code", "device": "--device",
    "no_tokenizer": "give a token shard (.bin) or leave out --data to sample",
}


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _tokens(text: str) -> int:
    value = _positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(
            f"must be at least 2, got {value}: with one token every attention matrix is 1x1, "
            "of rank 1 whatever the model does"
        )
    return value


def _device(text: str) -> str:
    try:
        torch.device(text)
    except (RuntimeError, ValueError) as error:
        raise argparse.ArgumentTypeError(f"unknown device {text!r}: {one_line(error)}") from None
    return text


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
    parser.add_argument("--sequences", type=_positive_int, default=100,
                        help="number of sequences, the paper's N (%(default)s)")
    parser.add_argument("--tokens", type=_tokens, default=100,
                        help="tokens per sequence, at least 2 (%(default)s)")
    parser.add_argument("--tau", type=_tau, default=0.9,
                        help="energy / mass threshold of rank@tau and columns@tau (%(default)s)")
    parser.add_argument("--out", metavar="DIR",
                        help="output directory (default: runs/analyze/<model name>); the files "
                             "of an earlier analysis there are replaced")
    parser.add_argument(
        "--heatmaps", metavar="L:H,...",
        help="attention heatmaps to draw: comma-separated LAYER:HEADS items; LAYER is a layer "
             "number (negative counts from the end) or a tag like L07, HEADS a head number, a "
             "range 0-3 or * for all (write --heatmaps=-1:0 when it starts with a minus). "
             "Default: first and last layer, heads 0-3",
    )
    parser.add_argument(
        "--modules", metavar="NAME_OR_GLOB", action="append",
        help="measure these modules: a name of model.named_modules() or a glob over the names "
             "(e.g. 'transformer.h.*.attn'); repeat for more. Default: every module that looks "
             "like attention",
    )
    parser.add_argument("--batch-size", type=_positive_int, default=8,
                        help="sequences per forward pass (%(default)s)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow a Hugging Face model directory to run its own Python code")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the sampled or random token ids (%(default)s)")
    parser.add_argument("--device", type=_device, default="cpu",
                        help="torch device to run the model on (%(default)s)")


def _lazy_line(snapshot: Any, rule: Any) -> str:
    """The lazy layers, or the lazy rule (``AlertRules.lazy``) none of them met."""
    lazy = [layer for layer in snapshot.layers if layer.is_lazy]
    if lazy:
        return "lazy layers: " + ", ".join(f"{layer.tag} ({layer.name})" for layer in lazy)
    pct = percent(snapshot.tau)
    if rule is None:
        return f"no lazy layer at tau={snapshot.tau:g}"
    share = ("all heads" if rule.min_lazy_share >= 1
             else f"at least {rule.min_lazy_share:.0%} of the heads")
    return (f"no lazy layer at tau={snapshot.tau:g} under rule: {share} with mean "
            f"rank@{pct} <= {rule.max_rank:g} and columns@{pct} <= {rule.max_columns:g}")


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


def _save(plot: Any, path: Path, written: list[Path]) -> None:
    plot.savefig(path)
    written.append(path)


#: How to point at modules on the command line (discovery's messages say it for Python).
#: The alert rules of ``attn-probe analyze`` (the package's defaults); their lazy rule marks the
#: lazy layers.
RULES = AlertRules()

CLI_HINTS = Hints(
    none_found="Name the attention modules with --modules NAME_OR_GLOB (repeatable), e.g. "
    "--modules '{example}'; a module whose kernel cannot be seen needs an adapter, which a "
    "package.module:factory MODEL can register (attn_probe.register_adapter)",
    no_match="--modules takes names of model.named_modules() or globs over them",
    no_kernel="Leave it out of --modules, or register an adapter for {cls} in the module of a "
    "package.module:factory MODEL (attn_probe.register_adapter)",
)


def _sites(model: torch.nn.Module, modules: list[str] | None) -> list[Any]:
    """The monitored modules; each --modules must match some module (a typo is no silent
    no-op), and what went wrong is said in the command line's words."""
    try:
        for pattern in modules or ():
            find_attention_modules(model, pattern)
        return plan_sites(model, modules)
    except (NoAttentionFound, CaptureError) as error:
        raise _usage_error(error) from None


def _usage_error(error: Exception) -> UsageError:
    """A discovery or capture error in the command line's words."""
    if isinstance(error, NoAttentionFound):
        return UsageError(error.describe("--modules ", CLI_HINTS))
    if isinstance(error, NoKernelCall):
        return UsageError(error.describe(CLI_HINTS))
    return UsageError(one_line(error))


@contextlib.contextmanager
def _loader_errors() -> Iterator[None]:
    """The loaders' errors as one-line usage errors, in this command's option names."""
    try:
        yield
    except InputError as error:
        raise UsageError(error.worded(OPTION_NAMES)) from None
    except ImportError as error:  # an optional dependency the input needs
        raise UsageError(one_line(error)) from None


def _warn(message: Message) -> None:
    print(f"attn-probe analyze: warning: {message.worded(OPTION_NAMES)}", file=sys.stderr,
          flush=True)


def _analyze(args: argparse.Namespace) -> int:
    from ..protocol import capture, rank_profile

    choices = parse_heads(args.heatmaps) if args.heatmaps is not None else None
    with _loader_errors():
        loaded = load_model(args.model, trust_remote_code=args.trust_remote_code,
                            device=args.device, warn=_warn)
    out = Path(args.out) if args.out else Path("runs") / "analyze" / loaded.name
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory")
    device = model_device(loaded.model)

    # Find the attention modules and their head counts on a two-token input before anything
    # slow happens, so that a model without attention or a bad --heatmaps fails at once.
    monitored = [site.name for site in _sites(loaded.model, args.modules)]
    probe = torch.full((1, min(2, args.tokens)), loaded.bos, dtype=torch.long, device=device)
    try:
        with capture(loaded.model, CaptureOptions(modules=args.modules, batch_rows=1,
                                                  crop=None)) as cap:
            with torch.no_grad():
                loaded(probe)
            heads_per_layer = {name: int(a.shape[1]) for name, a in cap.attention.items()}
    except CaptureError as error:
        raise _usage_error(error) from None
    except Exception as error:  # noqa: BLE001 - the model does not take token ids
        raise UsageError(
            f"calling the model on a (1, {probe.shape[1]}) tensor of token ids failed: "
            f"{type(error).__name__}: {one_line(error)}"
        ) from None
    if not heads_per_layer:
        raise UsageError(
            f"{loaded.description}: attention modules were found but none ran on token ids"
        )
    heatmaps = resolve_heads(choices, monitored, heads_per_layer)

    params = sum(p.numel() for p in loaded.model.parameters())
    print(f"attn-probe analyze: {loaded.description}: {len(monitored)} attention layers, "
          f"{params:,} parameters", flush=True)
    torch.manual_seed(args.seed)
    with _loader_errors():
        found = load_inputs(
            loaded, None if args.data is None else Path(args.data), sequences=args.sequences,
            tokens=args.tokens, seed=args.seed, batch_size=args.batch_size,
            trust_remote_code=args.trust_remote_code, warn=_warn,
            on_progress=Progress("sampling"))
    tokens, source = found.ids, found.description
    n, length = tokens.shape
    print(f"data: {source}: {n} sequences of {length} tokens; tau = {args.tau:g}", flush=True)

    bar = Progress("measuring")
    try:
        snapshot = rank_profile(
            loaded.model, _batches(tokens, args.batch_size, loaded, device), sequences=n,
            capture=CaptureOptions(modules=args.modules, tau=args.tau, batch_rows=None,
                                   crop=None),
            samples=True, alerts=RULES, on_batch=lambda done: bar(done, n),
        )
    except CaptureError as error:
        raise _usage_error(error) from None
    samples = snapshot.samples
    if not snapshot.layers:
        raise UsageError("no attention was recorded: the model's attention modules never ran")

    from ..outputs import TensorBoardOutput, plots
    from ..outputs.tables import format_table, write_tables

    out.mkdir(parents=True, exist_ok=True)
    # Pictures and event files of an earlier run here would be mistaken for this one's.
    for stale in [*out.glob("heatmaps_L*.png"), *out.glob("head_profiles_L*.png"),
                  *(out / "tb").glob("events.out.tfevents.*")]:
        stale.unlink()
    written = list(write_tables(snapshot, out))
    np.save(out / "tokens.npy", tokens.numpy())
    written.append(out / "tokens.npy")

    pct = percent(args.tau)
    short = loaded.name if len(loaded.name) <= 28 else loaded.name[:27] + "…"
    _save(plots.max_rank_profile_for(
        snapshot, title=f"{short}: MaxRank@{pct}%, {n} seqs x {length} tokens"),
        out / "max_rank_profile.png", written)
    _save(plots.collapse_map_for(snapshot, "rank", title=f"{short}: mean rank@{pct}%",
                                 colorbar_label=f"rank@{pct}%"),
          out / "collapse_map.png", written)
    tags = {layer.name: layer.tag for layer in snapshot.layers}
    for name, heads in heatmaps.items():
        if not heads or name not in samples:
            continue
        plot = plots.attention_heatmaps(
            samples[name], heads=heads,
            title=f"{tags[name]} {name}: attention of sequence 0 ({length} tokens)",
        )
        _save(plot, out / f"heatmaps_{tags[name]}.png", written)
    collapsed = _most_collapsed(snapshot)
    if collapsed is not None:
        _save(plots.head_profiles_for(
            snapshot, collapsed.name,
            title=f"{collapsed.tag} {collapsed.name} (smallest MaxRank): per-head means"),
            out / f"head_profiles_{collapsed.tag}.png", written)

    with TensorBoardOutput(str(out / "tb"), heatmaps=heatmaps,
                           heatmap_crop=min(length, 128)) as output:
        output.write(snapshot)

    print()
    print(format_table(snapshot))
    profile = ", ".join(
        f"{layer.tag} {value:.2f}" for layer, value in zip(snapshot.layers,
                                                          snapshot.max_rank_profile())
    )
    print(f"\nMaxRank@{pct}: {profile}")
    print(_lazy_line(snapshot, RULES.lazy))
    if snapshot.alerts:
        print("alerts:\n" + "\n".join(f"  {alert.kind}: {alert.message}"
                                       for alert in snapshot.alerts))
    else:
        print("alerts: none (lazy layers, entropy collapse, logit growth, attention sinks)")
    print(f"\nwrote {out}: {', '.join(p.name for p in written)}")
    print(f"TensorBoard logs in {out / 'tb'}; see them with:\n  tensorboard --logdir {out / 'tb'}")
    return 0


def run_analyze(args: argparse.Namespace) -> int:
    """Entry point of ``attn-probe analyze``: problems with the input become one-line errors."""
    try:
        return _analyze(args)
    except FileNotFoundError as error:
        raise UsageError(one_line(error)) from None
