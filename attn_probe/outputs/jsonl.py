"""A plain JSON Lines file of a run: no extra package, append-only, read back by
``attn-probe report`` as it reads event files.

One JSON object a line (:data:`FORMAT` names the file's kind in its first line)::

    {"format": "attn_probe", "version": 1, "settings": {"every": 100, ...}}
    {"definitions": [["rank90/max/Lxx", "largest over heads: ..."], ...]}
    {"step": 0, "scalars": {"max_logit/log10/L00": 0.41, ...}, "alerts": []}
    {"step": 100, "scalars": {...}, "alerts": [{"kind": "logit", "layer": ..., ...}]}

Then the definitions of the tags at the run's tau and lazy rule
(:func:`attn_probe.figures.definitions`), and a line per sampled step, with every scalar of :mod:`attn_probe.outputs.scalars` and the alerts
new at that step with every field (``dataclasses.asdict``). Pictures are not kept: they live in
the trackers that can show them. A run that crashed leaves every step written before it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import BinaryIO, TYPE_CHECKING, Any

from ..figures import definitions
from .tracker import TrackerOutput

if TYPE_CHECKING:
    from ..snapshot import Alert, Snapshot

__all__ = ["FORMAT", "JsonlOutput", "VERSION"]

#: The ``format`` of a probe's JSON Lines file, in its first line.
FORMAT = "attn_probe"
#: The version of the lines' layout.
VERSION = 1


class JsonlOutput(TrackerOutput):
    """Appends each sampled step to a JSON Lines file at ``path`` (made, with its directory, at
    the first write, which starts with a line of the probe's settings; a file that exists is
    appended to, and its later runs' steps replace the earlier ones').

    Args:
        path: the ``.jsonl`` file.
        per_head, logit_cap: which scalars, as in
            :class:`~attn_probe.outputs.tracker.TrackerOutput`.
    """

    def __init__(self, path: str | os.PathLike, *, per_head: bool | str = True,
                 logit_cap: float | None = None) -> None:
        super().__init__(per_head=per_head, pictures_every=0, logit_cap=logit_cap)
        self.path = os.fspath(path)
        self._file: BinaryIO | None = None
        self._line: dict[str, Any] | None = None

    def _open(self) -> BinaryIO:
        if self._file is None:
            folder = os.path.dirname(self.path)
            if folder:
                os.makedirs(folder, exist_ok=True)
            # Unbuffered: each line is one write, which fails at once (a full disk) and
            # leaves nothing behind to fail again at close.
            self._file = open(self.path, "ab", buffering=0)
            self._write({"format": FORMAT, "version": VERSION, "settings": self.settings})
        return self._file

    def _write(self, record: dict[str, Any]) -> None:
        self._open().write((json.dumps(record) + "\n").encode("utf-8"))

    def first_write(self, snapshot: "Snapshot") -> None:
        if self._file is None and snapshot.layers:
            self._write({"definitions": definitions(tau=snapshot.tau,
                                                    lazy=snapshot.lazy_rule)})

    def log_scalars(self, step: int, values: dict[str, float]) -> None:
        self._line = {"step": step, "scalars": values, "alerts": []}

    def log_alerts(self, step: int, alerts: list["Alert"]) -> None:
        if self._line is not None:
            self._line["alerts"] = [dataclasses.asdict(alert) for alert in alerts]

    def flush(self) -> None:
        if self._line is not None:
            line, self._line = self._line, None
            self._write(line)

    def close(self) -> None:
        super().close()
        if self._file is not None:
            file, self._file = self._file, None
            file.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r})"
