"""What the explore views show, computed from one capture of the current sequence and cached:
the chosen head's attention, the layer's per-head figures, and MaxRank per layer over every
sequence (the paper's protocol), cancellable.

One forward pass records every layer's q and k (:class:`~attn_probe.protocol.Capture`). A change
of layer, head, tau or crop is served from that record: the matrix of another crop is rebuilt
from q and k, and the figures of a (sequence, layer, crop, tau) are computed once. Only another
sequence runs the model again.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import torch
from matplotlib.figure import Figure

from ..models.sampling import model_device
from ..options import ONE_TOKEN, CaptureOptions, check_capture, check_count, check_tau
from ..outputs import plots
from ..outputs.tables import html_table, layer_rows
from ..protocol import Capture, capture, rank_profile
from ..snapshot import Snapshot, find_layer, layer_tag, percent
from .sources import Source

__all__ = ["Explorer", "Layer", "check_options"]


def check_options(capture: CaptureOptions) -> CaptureOptions:
    """``capture`` when the explorer can measure by it, else ``TypeError`` or ``ValueError``:
    its views measure one sequence and MaxRank every sequence, whatever ``batch_rows`` says."""
    options = check_capture(capture)
    if options.batch_rows not in (1, None):
        raise ValueError(
            "explore measures one sequence in its views and every sequence in MaxRank: leave "
            f"batch_rows out of capture (got batch_rows={options.batch_rows})")
    return options


@dataclass(frozen=True)
class Layer:
    """A monitored attention module: its name, its position (the ``L03`` of its tag), heads."""

    name: str
    index: int
    heads: int

    @property
    def tag(self) -> str:
        return layer_tag(self.index)

    @property
    def label(self) -> str:
        return f"{self.tag} {self.name}"


class Explorer:
    """The views of one model on its token ids (a :class:`~.sources.Source`).

    ``capture``: what is measured (:class:`~attn_probe.CaptureOptions`: the modules, strategy
    and budgets; ``tau`` and ``crop`` are where :attr:`tau` and :attr:`crop` start, the crop at
    most the sequence, the whole sequence when None). The views measure one sequence and
    MaxRank every sequence, so ``batch_rows`` must be left as it is. ``sequence``: which of the
    N sequences the per-layer views show. ``runs`` counts the forward passes made for those
    views.
    """

    def __init__(self, source: Source, *, capture: CaptureOptions = CaptureOptions(),
                 sequence: int = 0, batch_size: int = 8) -> None:
        options = check_options(capture)
        self.source = source
        self.tokens = source.tokens
        self.options = options
        self.batch_size = check_count("batch_size", batch_size)
        self.tau = options.tau
        self.crop = self._check_crop(min(self.length, options.crop or self.length))
        self.sequence = self._check_sequence(sequence)
        self.runs = 0
        self.profile: Snapshot | None = None  #: the last MaxRank run
        self.profile_sequences = 0  #: sequences behind it
        self.profile_crop = 0  #: the token crop it was measured over
        self._lock = threading.Lock()
        self._capture: Capture | None = None
        self._layers: list[Layer] = []
        # keyed by the sequence too: what one sequence showed is never shown for another
        self._matrices: dict[tuple[int, str, int], np.ndarray] = {}
        self._figures: dict[tuple[int, str, int, float], dict[str, np.ndarray]] = {}

    # ------------------------------------------------------------------------------ choices

    @property
    def length(self) -> int:
        return int(self.tokens.shape[1])

    @property
    def count(self) -> int:
        """N, the sequences of the MaxRank run."""
        return int(self.tokens.shape[0])

    def _check_crop(self, crop: int) -> int:
        check_count("crop", crop, minimum=2, why=ONE_TOKEN)
        if crop > self.length:
            raise ValueError(f"crop must be at most the {self.length} tokens of the inputs, "
                             f"got {crop}")
        return crop

    def _check_sequence(self, sequence: int) -> int:
        check_count("sequence", sequence, minimum=0)
        if sequence >= self.count:
            raise ValueError(f"sequence must be below the {self.count} sequences of the inputs, "
                             f"got {sequence}")
        return sequence

    def set_tau(self, tau: float) -> None:
        self.tau = check_tau(tau)

    def set_crop(self, crop: int) -> None:
        self.crop = self._check_crop(crop)

    def set_sequence(self, sequence: int) -> None:
        if self._check_sequence(sequence) != self.sequence:
            self.sequence = sequence
            self._capture = None
            self._matrices.clear()
            self._figures.clear()

    @property
    def profile_is_current(self) -> bool:
        """Whether the last MaxRank run was measured at the current tau and crop."""
        return self.profile is not None and self.profile.tau == self.tau and \
            self.profile_crop == self.crop

    # ------------------------------------------------------------------------ one sequence

    def _recorded(self) -> Capture:
        if self._capture is not None:  # no lock: views stay live while MaxRank runs
            return self._capture
        with self._lock:
            if self._capture is None:
                loaded = self.source.loaded
                ids = self.tokens[self.sequence : self.sequence + 1]
                ids = ids.to(model_device(loaded.model))
                options = replace(self.options, batch_rows=1, crop=self.crop)
                with capture(loaded.model, options) as cap:
                    with torch.no_grad():
                        loaded(ids)
                self.runs += 1
                self._capture = cap
                self._layers = [
                    Layer(name, index, int(cap.attention[name].shape[1]))
                    for index, name in enumerate(cap.modules) if name in cap.attention
                ]
                if not self._layers:
                    raise ValueError("no attention was recorded: the model's attention "
                                     "modules never ran on these inputs")
            return self._capture

    @property
    def layers(self) -> list[Layer]:
        """The monitored layers that ran on the inputs, in model order."""
        self._recorded()
        return list(self._layers)

    def layer(self, key: str | int) -> Layer:
        """A layer by module name, tag (``"L03"``) or index (see :func:`find_layer`)."""
        return find_layer(self.layers, key)

    def attention(self, layer: str | int) -> np.ndarray:
        """(H, T, S) attention of the layer over the current crop of the current sequence."""
        name = self.layer(layer).name
        key = (self.sequence, name, self.crop)
        if key not in self._matrices:
            matrix = self._recorded().matrix(name, self.crop)
            self._matrices[key] = matrix[0].float().cpu().numpy()
        return self._matrices[key]

    def figures(self, layer: str | int) -> dict[str, np.ndarray]:
        """Figure -> (H,) per-head figures of the layer: ``rank`` and ``columns`` at tau and
        the other matrix figures over the crop, ``*_full`` and ``max_logit`` over the whole
        sequence (the names of :meth:`~attn_probe.protocol.Capture.metrics`)."""
        name = self.layer(layer).name
        key = (self.sequence, name, self.crop, self.tau)
        if key not in self._figures:
            found = self._recorded().metrics(self.tau, modules=[name], crop=self.crop)
            self._figures[key] = {k: v[0].double().cpu().numpy() for k, v in found[name].items()}
        return self._figures[key]

    def head_rows(self, layer: str | int) -> list[dict]:
        """One row per head: rank@tau and columns@tau over the crop, entropy (nats), its
        normalised value, sink mass and max logit over the whole sequence."""
        values = self.figures(layer)
        names = ("rank", "columns", "entropy_full", "entropy_norm_full", "sink_full",
                 "max_logit")
        heads = values["rank"].shape[0]
        nan = np.full(heads, np.nan)
        return [{"head": f"H{h:02d}", **{k: float(values.get(k, nan)[h]) for k in names}}
                for h in range(heads)]

    def head_table(self, layer: str | int) -> str:
        """:meth:`head_rows` as an HTML table."""
        pct = percent(self.tau)
        return html_table(self.head_rows(layer), {
            "head": "head", "rank": f"rank@{pct}%", "columns": f"columns@{pct}%",
            "entropy_full": "entropy (nats)", "entropy_norm_full": "entropy / log(keys)",
            "sink_full": "sink (key 0)", "max_logit": "max logit",
        })

    def token_labels(self) -> list[str] | None:
        """The strings of the current sequence's tokens, where a tokenizer or strings were
        given."""
        labels = self.source.labels
        return None if labels is None else labels(self.tokens[self.sequence])

    def heatmap(self, layer: str | int, head: int) -> Figure:
        """The head's attention over the crop, tokens on the axes where they are known."""
        chosen = self.layer(layer)
        if not 0 <= head < chosen.heads:
            raise ValueError(f"head {head} out of range: {chosen.label} has {chosen.heads} "
                             f"heads (0 to {chosen.heads - 1})")
        return plots.attention_heatmap(
            self.attention(chosen.name)[head], token_labels=self.token_labels(),
            title=f"{chosen.tag} H{head:02d}: sequence {self.sequence}, first {self.crop} "
                  "tokens")

    def head_profiles(self, layer: str | int) -> Figure:
        """Per-head rank@tau and columns@tau of the layer over the crop."""
        chosen = self.layer(layer)
        values = self.figures(chosen.name)
        return plots.head_profiles(
            values["rank"], values["columns"], tau=self.tau, ylabel="one sequence",
            title=f"{chosen.label}: sequence {self.sequence}, first {self.crop} tokens")

    # ------------------------------------------------------------------------ all sequences

    def run_profile(self, cancel: threading.Event | None = None,
                    on_progress: Callable[[int, int], None] | None = None) -> Snapshot | None:
        """MaxRank per layer over the N sequences at the current tau and crop
        (:func:`~attn_probe.rank_profile`); ``on_progress(done, N)`` after each batch. When
        ``cancel`` is set it stops after the batch under way: the profile then covers the
        sequences measured so far (None, and the last profile kept, if there were none)."""
        loaded, count = self.source.loaded, self.count
        device = model_device(loaded.model)
        tau, crop = self.tau, self.crop

        def batches():
            for start in range(0, count, self.batch_size):
                if cancel is not None and cancel.is_set():
                    return
                yield loaded.inputs(self.tokens[start : start + self.batch_size].to(device))

        done = [0]

        def measured(n: int) -> None:
            done[0] = n
            if on_progress is not None:
                on_progress(n, count)

        with self._lock:
            try:
                options = replace(self.options, tau=tau, batch_rows=None, crop=crop)
                snapshot = rank_profile(loaded.model, batches(), sequences=count,
                                        capture=options, on_batch=measured)
            except ValueError:
                if done[0] == 0 and cancel is not None and cancel.is_set():
                    return None
                raise
        self.profile, self.profile_sequences, self.profile_crop = snapshot, done[0], crop
        return snapshot

    def profile_plot(self) -> Figure:
        """MaxRank per layer of the last run (:meth:`run_profile`)."""
        if self.profile is None:
            raise ValueError("no MaxRank run yet: call run_profile() first")
        snapshot = self.profile
        return plots.max_rank_profile_for(
            snapshot, title=f"MaxRank@{percent(snapshot.tau)}% per layer: "
                            f"{self.profile_sequences} sequences, first {self.profile_crop} "
                            "tokens")

    def profile_table(self) -> str:
        """The last run's layers as an HTML table: MaxRank, mean rank and columns, laziness."""
        if self.profile is None:
            raise ValueError("no MaxRank run yet: call run_profile() first")
        pct = percent(self.profile.tau)
        return html_table(layer_rows(self.profile), {
            "layer": "layer", "module": "module", "rank/max": f"MaxRank@{pct}%",
            "rank/mean": f"mean rank@{pct}%", "columns/max": f"max columns@{pct}%",
            "lazy": "lazy",
        })
