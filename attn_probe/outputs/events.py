"""Reading runs back: the runs under a log directory, each run's scalars, its latest images and
its alerts, from TensorBoard event files (the ``alerts`` text written by
:class:`~attn_probe.outputs.TensorBoardOutput`) or from the probe's JSON Lines files
(:class:`~attn_probe.outputs.jsonl.JsonlOutput`, which hold no images).

Only the event files are read (with TensorBoard's own ``EventAccumulator``), so this works on a
run that crashed, on another machine, and on runs logged through the Hugging Face or Lightning
callbacks. A run is a directory that holds event files itself (``events.out.tfevents.*``), as
TensorBoard counts runs; a probe's ``.jsonl`` file is a run of its own.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

from ..alerts.run import Run
from ..snapshot import Alert
from .jsonl import FORMAT
from .tables import markdown_rows, parse_alerts_markdown

__all__ = ["EventsError", "LOSS_TAGS", "RunEvents", "find_runs", "read_jsonl", "read_run",
           "read_runs"]

#: The name of an event file.
EVENT_FILE = "events.out.tfevents.*"
#: The name of a probe's JSON Lines file.
JSONL_FILE = "*.jsonl"
#: Tags a training loss is logged under, in order of preference: the demo's and the Hugging Face
#: Trainer's (``train/loss``), Lightning's ``self.log("train_loss")`` (``_step`` with
#: ``on_epoch=True`` too), a bare ``loss``.
LOSS_TAGS = ("train/loss", "train_loss", "train_loss_step", "loss")
#: The text tag of the alerts (TensorBoard stores ``add_text("alerts")`` under this name).
ALERTS_TAG = "alerts/text_summary"
#: The text tag of the figures' definitions at the run's tau and rules (``add_text("figures")``).
FIGURES_TAG = "figures/text_summary"
_LAYER = re.compile(r"L(\d+)$")


class EventsError(ValueError):
    """A log directory or event file that cannot be read; the message says which and why."""


Series = tuple[np.ndarray, np.ndarray]


@dataclass(frozen=True)
class RunEvents:
    """What one run's event files hold."""

    name: str  #: the run's directory relative to the log directory (``.``: the directory itself)
    path: Path
    #: tag -> (steps, values), ascending steps, one value a step (the last one written)
    scalars: dict[str, Series] = field(default_factory=dict)
    #: tag -> (step, PNG bytes) of the latest image
    images: dict[str, tuple[int, bytes]] = field(default_factory=dict)
    #: every alert of the run, in step order (within a step, as the probe wrote them)
    alerts: tuple[Alert, ...] = ()
    #: (tag, meaning) of its scalars at the run's tau and rules, as the run wrote them (empty
    #: when it did not)
    definitions: tuple[tuple[str, str], ...] = ()

    @property
    def run(self) -> Run:
        """The run's alerts as the one model of a run (what warned first, where, since when)."""
        return Run(self.name, self.alerts)

    @property
    def loss(self) -> tuple[str, Series] | None:
        """(tag, series) of the training loss, when the run logged one (:data:`LOSS_TAGS`)."""
        for tag in LOSS_TAGS:
            if tag in self.scalars:
                return tag, self.scalars[tag]
        return None

    def layers(self, prefix: str) -> dict[str, Series]:
        """Layer tag (``L07``) -> series of the tags ``{prefix}/Lxx``, in layer order."""
        found = {}
        for tag, series in self.scalars.items():
            head, _, last = tag.rpartition("/")
            if head == prefix and _LAYER.match(last):
                found[last] = series
        return dict(sorted(found.items(), key=lambda item: int(item[0][1:])))

    @property
    def last_step(self) -> int | None:
        steps = [int(s[0][-1]) for s in self.scalars.values() if s[0].size]
        return max(steps) if steps else None


def find_runs(log_dir: str | os.PathLike) -> list[Path]:
    """The runs under ``log_dir``, sorted: the directories that hold event files (``log_dir``
    itself included) and the probe's ``.jsonl`` files; ``log_dir`` may be such a file itself.
    :class:`EventsError` when ``log_dir`` does not exist or holds no run."""
    root = Path(log_dir)
    if not root.exists():
        raise EventsError(f"{root} does not exist")
    if root.is_file():
        if root.suffix == ".jsonl":
            return [root]
        raise EventsError(f"{root} is not a directory (give the log directory of the runs, "
                          "or a .jsonl file of the probe)")
    runs = {path.parent for path in root.rglob(EVENT_FILE) if path.is_file()}
    runs.update(path for path in root.rglob(JSONL_FILE) if path.is_file() and _is_probe_jsonl(path))
    if not runs:
        raise EventsError(f"no TensorBoard event files ({EVENT_FILE}) nor JSON Lines files of "
                          f"the probe ({JSONL_FILE}) under {root}")
    return sorted(runs)


def _is_probe_jsonl(path: Path) -> bool:
    """Whether ``path`` starts with the line a :class:`~attn_probe.outputs.jsonl.JsonlOutput`
    writes first."""
    try:
        with open(path, encoding="utf-8") as file:
            first = json.loads(file.readline() or "null")
    except (OSError, ValueError):
        return False
    return isinstance(first, dict) and first.get("format") == FORMAT


def _accumulate(path: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    try:
        with open(path, "rb") as file:
            empty = not file.read(1)
    except OSError as error:
        raise EventsError(f"cannot read {path}: {error.strerror or error}") from None
    accumulator = EventAccumulator(str(path), size_guidance={"scalars": 0, "tensors": 0,
                                                             "images": 1})
    accumulator.Reload()
    try:
        accumulator.FirstEventTimestamp()
    except ValueError:  # not one record could be read
        if not empty:
            raise EventsError(f"{path} is not a TensorBoard event file: no record in it could "
                              "be read") from None
        return None
    return accumulator


def _text(event) -> str:
    from tensorboard.util import tensor_util

    values = np.atleast_1d(tensor_util.make_ndarray(event.tensor_proto)).ravel()
    return "\n".join(v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)
                     for v in values)


def read_run(path: str | os.PathLike, name: str | None = None) -> RunEvents:
    """Everything :class:`RunEvents` holds, from the event files directly in ``path`` (a run
    logged by several writers, such as a framework's and the probe's, has one file each), or
    from ``path``, a probe's ``.jsonl`` file (:func:`read_jsonl`)."""
    path = Path(path)
    if path.is_file() and path.suffix == ".jsonl":
        return read_jsonl(path, name)
    files = sorted(p for p in path.glob(EVENT_FILE) if p.is_file())
    if not files:
        raise EventsError(f"no TensorBoard event files ({EVENT_FILE}) in {path}")
    points: dict[str, list[tuple[int, float, float]]] = {}
    images: dict[str, tuple[int, float, bytes]] = {}
    alerts: dict[tuple, Alert] = {}
    definitions: tuple[tuple[str, str], ...] = ()
    for file in files:
        accumulator = _accumulate(file)
        if accumulator is None:
            continue
        tags = accumulator.Tags()
        for tag in tags["scalars"]:
            points.setdefault(tag, []).extend(
                (e.step, e.wall_time, e.value) for e in accumulator.Scalars(tag))
        for tag in tags["images"]:
            for e in accumulator.Images(tag):
                if tag not in images or (e.step, e.wall_time) >= images[tag][:2]:
                    images[tag] = (e.step, e.wall_time, e.encoded_image_string)
        if ALERTS_TAG in tags["tensors"]:
            for event in accumulator.Tensors(ALERTS_TAG):
                for alert in parse_alerts_markdown(_text(event)):
                    alerts[(alert.step, alert.layer, alert.kind, alert.heads)] = alert
        if FIGURES_TAG in tags["tensors"]:
            for event in accumulator.Tensors(FIGURES_TAG):
                definitions = tuple((row[0], row[1]) for row in markdown_rows(_text(event))
                                    if len(row) == 2)
    return _run(path, name, points, alerts,
                {tag: (step, png) for tag, (step, _, png) in sorted(images.items())}, definitions)


def _run(path: Path, name: str | None, points: dict[str, list[tuple[int, float, float]]],
         alerts: dict[tuple, Alert], images: dict[str, tuple[int, bytes]],
         definitions: tuple[tuple[str, str], ...]) -> RunEvents:
    """A :class:`RunEvents` of what was read: ``points`` tag -> (step, order, value), of which
    the last written of each step is kept; ``alerts`` in step order (else as written)."""
    scalars = {}
    for tag, found in points.items():
        last = {step: value for step, _, value in sorted(found)}  # the latest write of a step
        steps = np.array(sorted(last), dtype=np.int64)
        scalars[tag] = (steps, np.array([last[s] for s in steps], dtype=np.float64))
    ordered = sorted(alerts.values(), key=lambda alert: alert.step)  # else as written
    return RunEvents(
        name=name if name is not None else path.name,
        path=path,
        scalars=dict(sorted(scalars.items())),
        images=images,
        alerts=tuple(ordered),
        definitions=definitions,
    )


def read_jsonl(path: str | os.PathLike, name: str | None = None) -> RunEvents:
    """What a probe's JSON Lines file holds (:mod:`attn_probe.outputs.jsonl`) as a
    :class:`RunEvents`: its scalars, alerts and definitions (no images). A last line cut short by a crash
    is left out; any other line that is not a record of the probe is an :class:`EventsError`
    naming it."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise EventsError(f"cannot read {path}: {getattr(error, 'strerror', None) or error}"
                          ) from None
    fields = {field.name for field in dataclasses.fields(Alert)}
    points: dict[str, list[tuple[int, float, float]]] = {}
    alerts: dict[tuple, Alert] = {}
    definitions: tuple[tuple[str, str], ...] = ()
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
            if "format" in record:
                continue
            if "definitions" in record:
                definitions = tuple((str(tag), str(meaning))
                                    for tag, meaning in record["definitions"])
                continue
            step = int(record["step"])
            for tag, value in record["scalars"].items():
                points.setdefault(tag, []).append((step, number, float(value)))
            for found in record["alerts"]:
                alert = Alert(**{key: tuple(value) if isinstance(value, list) else value
                                 for key, value in found.items() if key in fields})
                alerts[(alert.step, alert.layer, alert.kind, alert.heads)] = alert
        except (ValueError, TypeError, KeyError, AttributeError) as error:
            if number == len(lines) and not line.endswith("}"):
                break  # the last line, cut short
            raise EventsError(f"{path}, line {number}: not a record of the probe ({error})"
                              ) from None
    return _run(path, name, points, alerts, {}, definitions)


def read_runs(log_dir: str | os.PathLike, runs: Iterable[str | os.PathLike] | None = None
              ) -> list[RunEvents]:
    """Every run under ``log_dir`` (:func:`find_runs`), or the ``runs`` directories, named by
    their path relative to ``log_dir``."""
    root = Path(log_dir)
    paths = find_runs(root) if runs is None else [Path(run) for run in runs]
    out = []
    for path in paths:
        try:
            name = path.resolve().relative_to(root.resolve()).as_posix()
        except ValueError:
            name = path.name
        if name == ".":
            name = root.resolve().name
        out.append(read_run(path, name))
    return out
