"""What the user chooses, checked once: :class:`CaptureOptions` and the checks of counts and tau.

The lowest layer of the package: it imports nothing from it. Every entry point that measures
(:class:`~attn_probe.AttentionProbe`, :func:`~attn_probe.capture`,
:func:`~attn_probe.rank_profile`, :func:`~attn_probe.explore`, ``attn-probe analyze``) takes
its capture settings as one :class:`CaptureOptions`, and every public function that takes a
count or a threshold checks it here, so the same mistake reads the same everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence, Union

if TYPE_CHECKING:
    from torch import nn

#: ``modules=`` accepts a name, a glob (``"transformer.h.*.attn"``), a list of those, or a
#: predicate ``fn(name, module) -> bool``.
ModuleSelector = Union[str, Sequence[str], Callable[[str, "nn.Module"], bool], None]

#: How a module's attention is rebuilt: interception of its kernel calls where it can be seen,
#: adapters elsewhere (``"auto"``), or one of the two forced.
STRATEGIES = ("auto", "intercept", "adapter")

#: Default bytes of working memory for one streaming pass over the whole sequence.
DEFAULT_MEMORY_BUDGET = 64 * 2**20

#: Default bound on one module's attention matrix per pass: (rows, H, T, S) float32 bytes.
DEFAULT_MATRIX_BUDGET = 256 * 2**20

#: How a sequence's tokens are laid out over a context-parallel group: process ``r`` holds the
#: ``r``-th chunk, or (load-balanced) chunks ``r`` and ``2W-1-r`` of ``2W``.
CONTEXT_LAYOUTS = ("contiguous", "head_tail")

#: Why attention over fewer than two tokens is refused where figures are computed.
ONE_TOKEN = "a 1x1 attention matrix has rank 1 whatever the model does"


def check_tau(tau: Any) -> float:
    """``tau`` as a float in (0, 1], or ``ValueError``."""
    try:
        value = float(tau)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"tau must be a number in (0, 1], got {tau!r}") from None
    if not 0.0 < value <= 1.0:  # also rejects NaN
        raise ValueError(f"tau must be in (0, 1], got {tau!r}")
    return value


def check_count(name: str, value: Any, *, optional: bool = False, minimum: int = 1,
                why: str = "") -> Any:
    """``value`` when it is an int of at least ``minimum`` (or None, when ``optional``), else
    ``ValueError`` naming the option (and saying ``why``, when given)."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        what = {0: "a non-negative int", 1: "a positive int"}.get(minimum, f"an int >= {minimum}")
        raise ValueError(
            f"{name} must be {what}{' or None' if optional else ''}, got {value!r}"
            + (f": {why}" if why else "")
        )
    return value


def check_group(name: str, group: Any) -> Any:
    """``group`` when it is None, a ``torch.distributed`` ``ProcessGroup`` or a
    one-dimensional ``DeviceMesh`` (a dimension of a larger one), else ``TypeError``."""
    if group is None:
        return None
    import torch.distributed as dist

    if dist.is_available() and isinstance(group, dist.ProcessGroup):
        return group
    if getattr(group, "ndim", None) == 1 and callable(getattr(group, "get_group", None)):
        return group
    raise TypeError(f"{name} must be a torch.distributed ProcessGroup or a one-dimensional "
                    "DeviceMesh (one dimension of a larger mesh, e.g. mesh['tp']), or None; "
                    f"got {group!r}")


def check_modules(modules: Any) -> ModuleSelector:
    """``modules`` when it is a selector (None, a name or glob, a list of those, a predicate),
    else ``TypeError``."""
    if modules is None or callable(modules) or isinstance(modules, str):
        return modules
    try:
        patterns = list(modules)
    except TypeError:
        patterns = None
    if patterns is None or not all(isinstance(p, str) for p in patterns):
        raise TypeError("modules takes None (every attention module), a module name or glob "
                        "pattern, a list of those, or a predicate fn(name, module); got "
                        f"{modules!r}")
    return tuple(patterns)


@dataclass(frozen=True, kw_only=True)
class CaptureOptions:
    """Which attention is measured, and how much of it: one object for every entry point.

    Args:
        modules: the modules to watch: None (every attention module the probe finds), a
            module name or glob (``"transformer.h.*.attn"``), a list of those, or a predicate
            ``fn(name, module) -> bool``.
        strategy: ``"auto"`` (intercept each module's kernel calls, rebuild from its weights
            where the kernel cannot be seen), ``"intercept"`` or ``"adapter"``.
        tau: the share of energy (rank@tau) and of squared mass (columns@tau); the paper's 0.9.
        batch_rows: how many rows of the model's input batch are measured per sampled pass
            (None: all): sequences for a language model, images for a vision model. Where an
            attention kernel's batch holds several rows per input row (windowed attention such
            as Swin: each image's windows, in order) every window of those rows is measured.
            The batch of the model's input is its first tensor argument's first dimension when
            that tensor is token ids ``(B, T)`` or images ``(B, C, H, W)``; otherwise, and
            for adapters, a row is a row of the attention call.
        crop: the figures of the attention matrix (rank@tau, columns@tau, and the heatmaps)
            use its first ``crop`` queries, and keys where that is exact (causal attention:
            the matrix of a prefix); None: every token. The whole-sequence figures (``*_full``,
            the logit figures) cover every token whatever the crop, streamed in bounded memory.
        memory_budget: bytes of working memory the whole-sequence pass may use per module.
        matrix_budget: the most bytes one module's float32 attention matrix may take per
            measured call (None: no bound); a module over it is not measured, and the message
            says how to crop.
        tensor_parallel: the process group (``ProcessGroup``, or a one-dimensional
            ``DeviceMesh`` such as ``mesh["tp"]``) over which every module's heads are split, in
            rank order; None: found per module from its DTensor weights where they are sharded
            (``parallelize_module``). Figures are per global head (:mod:`attn_probe.parallel`).
        context_parallel: the group over which each sequence's tokens are split; figures are
            those of the whole sequence. The probe's alone: :func:`~attn_probe.capture` and
            :func:`~attn_probe.rank_profile` measure one process's heads and tokens.
        context_layout: how the tokens are laid out over ``context_parallel``:
            ``"contiguous"`` (process ``r`` holds the ``r``-th chunk, of any length) or
            ``"head_tail"`` (the sequence in ``2W`` chunks, process ``r`` holding chunks ``r``
            and ``2W-1-r``).
        threads: the most intra-op threads (``torch.set_num_threads``) the figures are
            computed with on the CPU, torch's own count restored afterwards (None: torch's own
            count). One thread by default: the figures are many small float64 parallel regions,
            each of which waits for every thread of the pool, and on a machine where another
            process holds a core that wait made a sampled step tens of times slower (see
            docs/performance.md). Figures on an accelerator are not affected.

    The defaults suit a training run: one row and 256 tokens per call, a few MiB per layer.
    :func:`~attn_probe.capture` and :func:`~attn_probe.rank_profile` default to every row and
    token of the passes you give them (``CaptureOptions(batch_rows=None, crop=None)``).
    """

    modules: ModuleSelector = None
    strategy: str = "auto"
    tau: float = 0.9
    batch_rows: int | None = 1
    crop: int | None = 256
    memory_budget: int = DEFAULT_MEMORY_BUDGET
    matrix_budget: int | None = DEFAULT_MATRIX_BUDGET
    tensor_parallel: Any = None
    context_parallel: Any = None
    context_layout: str = "contiguous"
    threads: int | None = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "modules", check_modules(self.modules))
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        object.__setattr__(self, "tau", check_tau(self.tau))
        check_count("batch_rows", self.batch_rows, optional=True)
        check_count("crop", self.crop, optional=True, minimum=2, why=ONE_TOKEN)
        check_count("memory_budget", self.memory_budget)
        check_count("matrix_budget", self.matrix_budget, optional=True)
        check_group("tensor_parallel", self.tensor_parallel)
        check_group("context_parallel", self.context_parallel)
        if self.context_layout not in CONTEXT_LAYOUTS:
            raise ValueError(f"context_layout must be one of {CONTEXT_LAYOUTS}, got "
                             f"{self.context_layout!r}")
        check_count("threads", self.threads, optional=True)


#: What :func:`~attn_probe.capture` and :func:`~attn_probe.rank_profile` measure by default:
#: every row and every token of the passes they are given.
EVERYTHING = CaptureOptions(batch_rows=None, crop=None)


def check_capture(options: Any) -> CaptureOptions:
    """``options`` when it is a :class:`CaptureOptions`, else ``TypeError`` saying how to make
    one."""
    if not isinstance(options, CaptureOptions):
        raise TypeError("capture takes attn_probe.CaptureOptions(...) (modules, strategy, tau, "
                        "batch_rows, crop, memory_budget, matrix_budget, tensor_parallel, "
                        "context_parallel, context_layout, threads), got "
                        f"{options!r}")
    return options
