"""``attn-probe report LOGDIR [--out FILE.html]``: one self-contained HTML page of the runs under a
log directory, read from their TensorBoard event files and the probe's JSON Lines files alone
(see :mod:`attn_probe.outputs.report`)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Iterable

from .console import UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("log_dir", metavar="LOGDIR",
                        help="a TensorBoard log directory: one run, or runs in subdirectories "
                        "(as `tensorboard --logdir` takes it), where the probe's .jsonl files "
                        "are runs too; or one .jsonl file")
    parser.add_argument("--out", metavar="FILE.html", default=None,
                        help="where to write the page (default: LOGDIR/report.html, or "
                        "FILE.html beside a FILE.jsonl)")


def write_report(log_dir: str | os.PathLike, out: str | os.PathLike | None = None,
                 runs: Iterable[str | os.PathLike] | None = None) -> Path:
    """Read the runs under ``log_dir`` (or only the ``runs`` directories) and write their page
    to ``out`` (default ``log_dir/report.html``, or the ``.html`` beside a ``.jsonl`` file);
    returns its path. Bad input (no event files,
    not a directory, an unreadable file, ``out`` naming a directory) is a :class:`UsageError`."""
    from ..outputs.events import EventsError, read_runs
    from ..outputs.report import render_report

    if out is None:
        out = Path(log_dir).with_suffix(".html") if Path(log_dir).is_file() else \
            Path(log_dir) / "report.html"
    out = Path(out)
    if out.is_dir():
        raise UsageError(f"--out {out} is a directory; give the path of an .html file")
    try:
        found = read_runs(log_dir, runs)
    except EventsError as error:
        raise UsageError(str(error)) from None
    page = render_report(found, title=f"attn_probe report: {Path(log_dir).name or log_dir}",
                         source=str(log_dir))
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(page, encoding="utf-8")
    except OSError as error:
        raise UsageError(f"cannot write {out}: {error.strerror or error}") from None
    return out


def run_report(args: argparse.Namespace) -> int:
    path = write_report(args.log_dir, args.out)
    print(f"Report of the runs under {args.log_dir}: {path}")
    return 0
