""":func:`explore`: an ipywidgets view of a model's attention for Jupyter, JupyterLab, VS Code
and Colab, or, outside a notebook, its figures.

``ipywidgets`` is the optional extra ``attn_probe[notebook]`` and is imported only when a view
is made. A notebook is recognised by its IPython kernel: ``IPython`` already imported, and its
shell (``get_ipython()``) attached to a kernel, as in every Jupyter front end; a script, a
terminal IPython or a test is not one.
"""

from __future__ import annotations

import io
import sys
import threading
from typing import Any, Sequence

from matplotlib.figure import Figure

from ..options import CaptureOptions
from ..snapshot import percent
from .explorer import Explorer, check_options
from .sources import load_source

__all__ = ["NOTEBOOK_INSTALL", "ExploreView", "explore", "in_notebook"]

NOTEBOOK_INSTALL = 'pip install "attn_probe[notebook]"'


def in_notebook() -> bool:
    """Whether this process is a notebook's kernel (Jupyter, JupyterLab, VS Code, Colab)."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    return shell is not None and getattr(shell, "kernel", None) is not None


def import_ipywidgets() -> Any:
    """``ipywidgets``, or ``ImportError`` in one line naming the extra that brings it."""
    try:
        import ipywidgets
    except ImportError:
        raise ImportError(f"attn_probe.explore needs ipywidgets: {NOTEBOOK_INSTALL}") from None
    return ipywidgets


def png(figure: Figure) -> bytes:
    """The figure as PNG bytes."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


class ExploreView:
    """The widgets of :func:`explore` on an :class:`~.explorer.Explorer`.

    Controls: ``layer``, ``head``, ``tau``, ``crop``, ``sequence``; in the batch tab ``run``,
    ``cancel`` and ``progress``. Views: ``heatmap``, ``heads`` (per-head rank and columns),
    ``table`` (per-head figures), ``profile`` and ``profile_table``. ``shown`` holds the figure
    each image view shows. Displaying the view displays :attr:`widget`.
    """

    def __init__(self, explorer: Explorer, *, layer: str | int = 0, head: int = 0) -> None:
        w = import_ipywidgets()
        self.explorer = explorer
        self.shown: dict[str, Figure] = {}
        layers = explorer.layers
        first = explorer.layer(layer)
        heatmap = explorer.heatmap(first.name, head)  # a bad head is one line, before any widget
        self.layer = w.Dropdown(options=[(item.label, item.name) for item in layers],
                                value=first.name, description="layer")
        self.head = w.Dropdown(options=self._head_options(first.heads), value=head,
                               description="head")
        self.tau = w.FloatSlider(value=explorer.tau, min=0.01, max=1.0, step=0.01,
                                 description="tau", continuous_update=False,
                                 readout_format=".2f")
        self.crop = w.IntSlider(value=explorer.crop, min=2, max=explorer.length,
                                  description="crop", continuous_update=False)
        self.sequence = w.IntSlider(value=explorer.sequence, min=0, max=explorer.count - 1,
                                    description="sequence", continuous_update=False,
                                    disabled=explorer.count == 1)
        def image(width: str) -> Any:  # scaled to its share of the notebook's width
            return w.Image(format="png", layout=w.Layout(width=width, height="auto"))

        self.heatmap, self.heads, self.profile = image("54%"), image("42%"), image("60%")
        self.table, self.profile_table = w.HTML(), w.HTML()
        self.run = w.Button(description=f"Run over {explorer.count} sequences",
                            button_style="primary", layout=w.Layout(width="auto"))
        self.cancel = w.Button(description="Cancel", disabled=True)
        self.progress = w.IntProgress(value=0, min=0, max=explorer.count,
                                      description="sequences")
        self.status = w.Label(value="MaxRank per layer over every sequence: press Run")

        layer_tab = w.VBox([w.HBox([self.heatmap, self.heads], layout=w.Layout(
            align_items="flex-start")), self.table])
        batch_tab = w.VBox([w.HBox([self.run, self.cancel, self.progress]), self.status,
                            self.profile, self.profile_table])
        tabs = w.Tab(children=[layer_tab, batch_tab])
        tabs.set_title(0, "layer")
        tabs.set_title(1, "MaxRank")
        self.widget = w.VBox([
            w.HTML(f"<b>{explorer.source.loaded.description}</b>: "
                   f"{explorer.source.description}"),
            w.HBox([self.layer, self.head]), w.HBox([self.tau, self.crop, self.sequence]),
            tabs,
        ])
        self._cancel_event = threading.Event()
        self._thread: threading.Thread | None = None
        self._measured = ""  # what the last MaxRank run measured, for the status line
        self._running = False

        self.layer.observe(self._on_layer, "value")
        self.head.observe(lambda _: self._draw_heatmap(), "value")
        self.tau.observe(self._on_tau, "value")
        self.crop.observe(self._on_crop, "value")
        self.sequence.observe(self._on_sequence, "value")
        self.run.on_click(lambda _: self.start())
        self.cancel.on_click(lambda _: self._cancel_event.set())
        self._show("heatmap", self.heatmap, heatmap)
        self._draw_layer()

    # --------------------------------------------------------------------------- drawing

    @staticmethod
    def _head_options(heads: int) -> list[tuple[str, int]]:
        return [(f"H{h:02d}", h) for h in range(heads)]

    def _show(self, name: str, view: Any, figure: Figure) -> None:
        self.shown[name] = figure
        view.value = png(figure)

    def _draw_heatmap(self) -> None:
        self._show("heatmap", self.heatmap,
                   self.explorer.heatmap(self.layer.value, self.head.value))

    def _draw_layer(self) -> None:
        """The per-head views of the layer: they depend on it, tau and the crop."""
        self._show("heads", self.heads, self.explorer.head_profiles(self.layer.value))
        self.table.value = self.explorer.head_table(self.layer.value)

    def _on_layer(self, _change: Any) -> None:
        heads = self.explorer.layer(self.layer.value).heads
        if len(self.head.options) != heads:
            head = min(self.head.value, heads - 1)
            with self.head.hold_trait_notifications():
                self.head.options = self._head_options(heads)
                self.head.value = head
        self._draw_heatmap()
        self._draw_layer()

    def _note_profile(self) -> None:
        """The status line: what the profile shown measured, and whether the controls have
        moved from the tau or crop it was measured at (then Run measures it again)."""
        explorer, profile = self.explorer, self.explorer.profile
        if profile is None or self._running:  # the status says what is being measured
            return
        if explorer.profile_is_current:
            self.status.value = self._measured
        else:
            self.status.value = (
                f"the profile shown is at tau {profile.tau:g}, first {explorer.profile_crop} "
                f"tokens: press Run to measure it at tau {explorer.tau:g}, first "
                f"{explorer.crop} tokens")

    def _on_tau(self, change: Any) -> None:
        self.explorer.set_tau(change.new)
        self._draw_layer()
        self._note_profile()

    def _on_crop(self, change: Any) -> None:
        self.explorer.set_crop(change.new)
        self._draw_heatmap()
        self._draw_layer()
        self._note_profile()

    def _on_sequence(self, change: Any) -> None:
        self.explorer.set_sequence(change.new)
        self._draw_heatmap()
        self._draw_layer()

    # ------------------------------------------------------------------------- batch mode

    def start(self) -> None:
        """Measure MaxRank per layer over every sequence, in a thread (as the Run button)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._cancel_event.clear()
        self._running = True
        self.progress.value = 0
        self.status.value = (f"measuring {self.explorer.count} sequences at tau "
                             f"{self.explorer.tau:g}, first {self.explorer.crop} tokens")
        for control in (self.run, self.crop, self.sequence):
            control.disabled = True
        self.cancel.disabled = False
        self._thread = threading.Thread(target=self._measure, daemon=True)
        self._thread.start()

    def wait(self, timeout: float | None = None) -> None:
        """Block until a MaxRank run under way has ended."""
        if self._thread is not None:
            self._thread.join(timeout)

    def _measure(self) -> None:
        explorer = self.explorer
        try:
            snapshot = explorer.run_profile(
                self._cancel_event, lambda done, _total: setattr(self.progress, "value", done))
            cancelled = self._cancel_event.is_set()
            if snapshot is None:
                self.status.value = "cancelled before the first batch: nothing measured"
            else:
                self._show("profile", self.profile, explorer.profile_plot())
                self.profile_table.value = explorer.profile_table()
                self._measured = (
                    f"{'cancelled: ' if cancelled else ''}MaxRank@{percent(snapshot.tau)}% over "
                    f"{explorer.profile_sequences} of {explorer.count} sequences")
                self.status.value = self._measured
        except Exception as error:  # noqa: BLE001 - shown in the view, not lost in a thread
            self.status.value = f"failed: {type(error).__name__}: {error}"
            snapshot = None
        finally:
            self._running = False
            self.cancel.disabled = True
            self.run.disabled = False
            self.crop.disabled = False
            self.sequence.disabled = explorer.count == 1
        if snapshot is not None:
            self._note_profile()  # tau moved while it ran

    # --------------------------------------------------------------------------- display

    def png(self, name: str) -> bytes:
        """The PNG an image view shows (``heatmap``, ``heads``, ``profile``)."""
        return png(self.shown[name])

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)


def explore(
    model: Any,
    inputs: Any = None,
    *,
    capture: CaptureOptions = CaptureOptions(),
    tokenizer: Any = None,
    token_strings: Sequence[Any] | None = None,
    sequences: int = 100,
    tokens: int = 100,
    layer: str | int = 0,
    head: int = 0,
    seed: int = 0,
    batch_size: int = 8,
    trust_remote_code: bool = False,
    device: str = "cpu",
    widget: bool | None = None,
) -> "ExploreView | dict[str, Figure]":
    """Look at a model's attention: one head's heatmap, per-head figures of a layer, MaxRank
    per layer over many sequences.

    ``model``: a ``torch.nn.Module``, or what ``attn-probe analyze`` takes: a Hugging Face model
    directory, a llama2.c ``.bin`` file or ``"package.module:factory"``. ``inputs``: token ids
    ((T,) or (N, T)), text (tokenized by ``tokenizer`` or the model directory's tokenizer), a
    token shard or text file (cut into ``sequences`` sequences of ``tokens`` tokens), or None:
    ``sequences`` sequences of ``tokens`` tokens sampled from the model (seed ``seed``).
    ``token_strings`` (or a tokenizer) name the tokens on the heatmap's axes. ``capture``
    (:class:`~attn_probe.CaptureOptions`): the modules, strategy and budgets, and where the tau
    and crop controls start (the crop: the tokens the matrices cover, at most the sequence;
    None: all of it); the views measure one sequence and MaxRank every sequence, so
    ``batch_rows`` is left out. ``layer`` (name, tag ``"L03"`` or index) and ``head`` are shown
    first. The model
    runs under ``torch.no_grad`` in the mode it is in (``model.eval()`` for attention without
    dropout); a model loaded from a path is put in eval mode.

    In a notebook (``widget`` None) or with ``widget=True`` it returns an :class:`ExploreView`
    (needs ``ipywidgets``: ``pip install "attn_probe[notebook]"``); changing the layer, head,
    tau or crop reuses the one forward pass already made. Elsewhere, or with
    ``widget=False``, it returns the figures: ``heatmap``, ``head_profiles`` and
    ``max_rank_profile`` (MaxRank per layer over every sequence).
    """
    check_options(capture)  # before anything slow, as a missing extra below
    if widget is None:
        widget = in_notebook()
    if widget:
        import_ipywidgets()
    source = load_source(model, inputs, tokenizer=tokenizer, token_strings=token_strings,
                         sequences=sequences, tokens=tokens, seed=seed, batch_size=batch_size,
                         trust_remote_code=trust_remote_code, device=device)
    explorer = Explorer(source, capture=capture, batch_size=batch_size)
    if widget:
        return ExploreView(explorer, layer=layer, head=head)
    chosen = explorer.layer(layer)
    explorer.run_profile()
    return {
        "heatmap": explorer.heatmap(chosen.name, head),
        "head_profiles": explorer.head_profiles(chosen.name),
        "max_rank_profile": explorer.profile_plot(),
    }
