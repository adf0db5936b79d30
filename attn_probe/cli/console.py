"""Command-line helpers shared by the ``attn-probe`` subcommands: one-line errors, progress."""

from __future__ import annotations

import argparse
import sys
import time
from typing import NoReturn

from ..models.messages import one_line

__all__ = ["ArgumentParser", "Progress", "UsageError", "one_line"]


class UsageError(Exception):
    """Bad input from the command line: printed as one line, exit status 2."""


class ArgumentParser(argparse.ArgumentParser):
    """An ``argparse`` parser whose errors are one line, like every other bad input:
    ``attn-probe analyze: error: argument --tau: ...`` and exit status 2, without the usage."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


class Progress:
    """A one-line progress bar on stderr (redrawn in place on a terminal, sparse otherwise)."""

    def __init__(self, label: str, stream=None, width: int = 30):
        self.label, self.stream, self.width = label, stream or sys.stderr, width
        self.start = time.perf_counter()
        self._last_line = -1.0

    def __call__(self, done: int, total: int, extra: str = "") -> None:
        now = time.perf_counter()
        tty = self.stream.isatty()
        if not tty and done < total and now - self._last_line < 5:
            return
        self._last_line = now
        filled = int(self.width * done / max(total, 1))
        elapsed = now - self.start
        eta = elapsed / done * (total - done) if done else 0.0
        line = (f"{self.label} [{'#' * filled}{'.' * (self.width - filled)}] {done}/{total} "
                f"{elapsed:5.0f}s elapsed, {eta:4.0f}s left {extra}")
        self.stream.write(("\r" + line) if tty else line + "\n")
        if tty and done >= total:
            self.stream.write("\n")
        self.stream.flush()
