"""Snapshot → what a person sees: TensorBoard, W&B, MLflow or a JSON Lines file, matplotlib plots,
tables.

The last stage of the data flow: everything here reads :class:`~attn_probe.snapshot.Snapshot`
objects (or plain arrays) and does no torch maths.

* :mod:`.base` — :class:`Output`, what the probe hands every output, and how;
* :mod:`.scalars` — the scalars of a snapshot by tag, one table for every output;
* :mod:`.tracker` — :class:`TrackerOutput`, what every tracker is given;
* :mod:`.tensorboard`, :mod:`.jsonl`, :mod:`.wandb`, :mod:`.mlflow` — :class:`TensorBoardOutput`
  (with the custom-scalars layout), :class:`JsonlOutput`, :class:`WandbOutput`,
  :class:`MlflowOutput` (the last two import their library at the first write);
* :mod:`.plots` — matplotlib plots (collapse map, MaxRank profile, heatmaps, head profiles,
  a summary of training runs);
* :mod:`.health` — the head-state pictures: layers x heads, and each layer over the steps;
* :mod:`.tables` — per-layer and per-head rows, the terminal table, CSV and JSON files, and
  alerts as a markdown table that reads back;
* :mod:`.events` — the runs under a log directory read back from their event files and the
  probe's JSON Lines files;
* :mod:`.report` — those runs as one self-contained HTML page, drawn with :mod:`.curves`.
"""

from .base import Output, check_outputs
from .jsonl import JsonlOutput
from .mlflow import MlflowOutput
from .tensorboard import TensorBoardOutput
from .tracker import TrackerOutput
from .wandb import WandbOutput

__all__ = ["JsonlOutput", "MlflowOutput", "Output", "TensorBoardOutput", "TrackerOutput",
           "WandbOutput", "check_outputs"]
