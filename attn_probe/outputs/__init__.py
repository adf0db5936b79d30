"""Snapshot → what a person sees: TensorBoard scalars and images, matplotlib plots, tables.

The last stage of the data flow: everything here reads :class:`~attn_probe.snapshot.Snapshot`
objects (or plain arrays) and does no torch maths.

* :mod:`.base` — :class:`Output`, what the probe hands every output, and how;
* :mod:`.tensorboard` — :class:`TensorBoardOutput`, the tags and the custom-scalars layout;
* :mod:`.plots` — matplotlib plots (collapse map, MaxRank profile, heatmaps, head profiles,
  a summary of training runs);
* :mod:`.health` — the head-state pictures: layers x heads, and each layer over the steps;
* :mod:`.tables` — per-layer and per-head rows, the terminal table, CSV and JSON files, and
  alerts as a markdown table that reads back;
* :mod:`.events` — the runs under a log directory read back from their event files;
* :mod:`.report` — those runs as one self-contained HTML page, drawn with :mod:`.curves`.
"""

from .base import Output, check_outputs
from .tensorboard import TensorBoardOutput

__all__ = ["Output", "TensorBoardOutput", "check_outputs"]
