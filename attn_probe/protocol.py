"""Offline measurement: the attention matrices of one pass, and the paper's N × T protocol.

:func:`capture` records every monitored head's attention matrix during forward passes you run
yourself. :func:`rank_profile` runs the protocol of "When Attention Collapses" (arXiv
2404.08634): N = 100 sequences of T = 100 tokens, each head's rank@tau averaged over the
sequences, and a layer's MaxRank the largest of its heads' averages.

>>> with attn_probe.capture(model, max_sequences=4, max_tokens=128) as cap:
...     model(tokens)
>>> cap.attention["model.layers.0.self_attn"].shape     # (B, H, T, T), float32
>>> cap.metrics(tau=0.9)["model.layers.0.self_attn"]["rank"]   # (B, H) rank@90%
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator

import torch
from torch import Tensor, nn

from ._compat import renamed
from .aggregate import HeadAccumulator
from .attention import ModuleSelector, Recorder, plan_sites
from .metrics import head_metrics
from .options import ONE_TOKEN, check_count, check_tau
from .snapshot import CollapseRule, Snapshot


class Capture:
    """Attention matrices of the forward passes inside a ``with`` block, by module name.

    Inside one block each module's attention is taken from its *first* forward call; later
    calls are counted in :attr:`calls` but not recorded. :meth:`reset` makes the next call
    count again (one capture per batch, as :func:`rank_profile` does). Use :func:`capture` to
    make one.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        modules: ModuleSelector = None,
        max_sequences: int | None = None,
        max_tokens: int | None = None,
        strategy: str = "auto",
    ) -> None:
        check_count("max_sequences", max_sequences, optional=True)
        check_count("max_tokens", max_tokens, optional=True)
        self.sites = plan_sites(model, modules, strategy)
        self._attention: dict[str, Tensor] = {}
        self._recorder = Recorder(
            self.sites, self._attention.__setitem__,
            max_sequences=max_sequences, max_tokens=max_tokens, strict=True, root=model,
        )

    @property
    def modules(self) -> list[str]:
        return [site.name for site in self.sites]

    @property
    def attention(self) -> dict[str, Tensor]:
        """Module name -> (B, H, T, S) float32 attention probabilities, in model order."""
        return {n: self._attention[n] for n in self.modules if n in self._attention}

    @property
    def calls(self) -> dict[str, int]:
        """Forward calls seen per module since the capture started."""
        return dict(self._recorder.calls)

    def metrics(self, tau: float = 0.9) -> dict[str, dict[str, Tensor]]:
        """Module name -> {"rank", "columns", "entropy", "sink", "dominant"}: (B, H) tensors."""
        tau = check_tau(tau)
        return {name: head_metrics(a, tau) for name, a in self.attention.items()}

    def reset(self) -> None:
        """Forget what was recorded; the next forward call of each module is recorded."""
        self._attention.clear()
        self._recorder.arm()

    def __enter__(self) -> "Capture":
        self._recorder.attach()
        self._recorder.arm()
        return self

    def __exit__(self, *exc) -> None:
        self._recorder.detach()

    def __iter__(self) -> Iterator[tuple[str, Tensor]]:
        return iter(self.attention.items())


def capture(
    model: nn.Module,
    *,
    modules: ModuleSelector = None,
    max_sequences: int | None = None,
    max_tokens: int | None = None,
    strategy: str = "auto",
) -> Capture:
    """Record the attention probabilities of ``model``'s attention modules.

    ``modules``: None finds every attention module; or names, glob patterns, or a predicate
    ``fn(name, module)``. ``max_sequences`` / ``max_tokens`` bound what is materialised per
    forward pass (for causal attention the first T tokens give exactly the attention of that
    prefix). ``strategy``: "auto" (interception, adapters where interception cannot see the
    kernel), "intercept" or "adapter" to force one.
    """
    return Capture(
        model, modules=modules, max_sequences=max_sequences, max_tokens=max_tokens,
        strategy=strategy,
    )


def _call(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def _batch_size(batch: Any) -> int:
    if isinstance(batch, dict):
        batch = batch.get("input_ids", next(iter(batch.values())))
    elif isinstance(batch, (tuple, list)):
        batch = batch[0]
    return int(batch.shape[0]) if isinstance(batch, torch.Tensor) and batch.dim() > 0 else 1


def rank_profile(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    max_sequences: int = 100,
    tau: float = 0.9,
    max_tokens: int | None = None,
    modules: ModuleSelector = None,
    strategy: str = "auto",
    rule: CollapseRule = CollapseRule(),
    samples: bool = False,
    on_batch: Callable[[int], None] | None = None,
    n_sequences: int | None = None,
) -> Snapshot:
    """Per-head mean rank@tau, columns@tau, entropy and sink mass over ``max_sequences``
    sequences (the paper's N).

    ``batches`` yields model inputs: a token tensor (``model(x)``), a tuple (``model(*x)``) or a
    dict (``model(**x)``), batch first. Batches are consumed until ``max_sequences`` sequences
    have been measured; runs under ``torch.no_grad`` and leaves the model's mode as it is. The
    result is a :class:`~attn_probe.snapshot.Snapshot`: ``snapshot.layers[i].heads["rank"]`` is
    layer i's per-head average, ``snapshot.max_rank_profile()`` the MaxRank per layer. With
    ``samples=True`` it keeps each layer's attention of the first sequence in
    ``snapshot.samples`` (for heatmaps). ``on_batch(n)`` is called with the sequences measured
    so far (for a progress bar). ``n_sequences`` is the deprecated name of ``max_sequences``.
    """
    if n_sequences is not None:
        max_sequences = renamed("n_sequences", "max_sequences", n_sequences)
    check_count("max_sequences", max_sequences)
    check_count("max_tokens", max_tokens, optional=True, minimum=2, why=ONE_TOKEN)
    tau = check_tau(tau)
    accumulator = HeadAccumulator()
    kept: dict[str, Tensor] = {}
    measured = 0
    with capture(model, modules=modules, max_tokens=max_tokens, strategy=strategy) as cap:
        for batch in batches:
            take = min(_batch_size(batch), max_sequences - measured)
            cap.reset()
            with torch.no_grad():
                _call(model, batch)
            for name, attention in cap.attention.items():
                if attention.shape[-2] < 2:
                    raise ValueError(
                        f"rank_profile: {name} attended over {attention.shape[-2]} token; "
                        f"give batches of at least 2 tokens ({ONE_TOKEN})"
                    )
                accumulator.update(name, head_metrics(attention[:take], tau))
                if samples and name not in kept:
                    kept[name] = attention[0].float().cpu()
            measured += take
            if on_batch is not None:
                on_batch(measured)
            if measured >= max_sequences:
                break
        order = cap.modules
    if measured == 0:
        raise ValueError("rank_profile got no batches: pass an iterable of model inputs")
    return Snapshot(step=0, tau=tau, layers=accumulator.compute(order, rule), samples=kept)
