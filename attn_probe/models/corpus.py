"""Built-in training text: the source of Python standard-library modules, as bytes.

No download: every CPython ships these files, so the demo, the examples and the tests can train on
real text anywhere (vocabulary 256).
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import torch

#: Standard-library modules whose source makes the corpus (all ship with every CPython).
CORPUS_MODULES = (
    "textwrap", "argparse", "inspect", "dataclasses", "functools", "fractions", "statistics",
    "difflib", "string", "shutil", "pathlib", "calendar", "enum", "typing", "heapq", "bisect",
)


def builtin_corpus(max_bytes: int = 2_000_000) -> torch.Tensor:
    """Bytes of Python standard-library source, as a uint8 tensor (no download)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for name in CORPUS_MODULES:
        path = stdlib / f"{name}.py"
        if not path.is_file():
            path = stdlib / name / "__init__.py"
        if path.is_file() and total < max_bytes:
            data = path.read_bytes()[: max_bytes - total]
            chunks.append(data)
            total += len(data)
    if total < 10_000:
        raise RuntimeError(f"could not read the Python standard library's source under {stdlib}")
    return torch.frombuffer(bytearray(b"\n".join(chunks)[:max_bytes]), dtype=torch.uint8).clone()
