"""modded-nanogpt token shards (``.bin``): recognising one, and reading its tokens."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .messages import InputError

__all__ = ["SHARD_MAGIC", "is_shard", "read_shard"]

#: modded-nanogpt token shards: a header of 256 little-endian int32 (magic, version, token
#: count, then zeros) followed by the tokens as little-endian uint16.
SHARD_MAGIC = 20240520
SHARD_VERSION = 1
SHARD_HEADER_INTS = 256
SHARD_HEADER_BYTES = SHARD_HEADER_INTS * 4


def is_shard(path: Path) -> bool:
    """Whether ``path`` starts with the shard magic number."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return len(head) == 4 and int(np.frombuffer(head, "<i4")[0]) == SHARD_MAGIC


def read_shard(path: str | os.PathLike[str], limit: int | None = None) -> np.ndarray:
    """Tokens of a modded-nanogpt shard (uint16), at most ``limit`` of them.

    The header is checked: magic number, version and that the file holds exactly the token count
    it announces. Any mismatch raises :class:`~.messages.InputError` (a ``ValueError``)
    saying what is wrong.
    """
    path = Path(path)
    size = path.stat().st_size
    if size < SHARD_HEADER_BYTES:
        raise InputError("{path}: not a token shard: the {header}-byte header is missing (file "
                         "of {size} bytes)", path=path, header=SHARD_HEADER_BYTES, size=size)
    header = np.fromfile(path, dtype="<i4", count=SHARD_HEADER_INTS)
    magic, version, count = (int(v) for v in header[:3])
    if magic != SHARD_MAGIC:
        raise InputError("{path}: not a token shard: magic number {magic}, expected {expected} "
                         "(a modded-nanogpt .bin shard)", path=path, magic=magic,
                         expected=SHARD_MAGIC)
    if version != SHARD_VERSION:
        raise InputError("{path}: unsupported token shard version {version}, expected "
                         "{expected}", path=path, version=version, expected=SHARD_VERSION)
    expected = SHARD_HEADER_BYTES + 2 * count
    if count < 0 or size != expected:
        raise InputError("{path}: token shard size mismatch: the header announces {count} "
                         "tokens ({expected} bytes), the file has {size} bytes", path=path,
                         count=count, expected=expected, size=size)
    take = count if limit is None else min(count, limit)
    return np.fromfile(path, dtype="<u2", count=take, offset=SHARD_HEADER_BYTES)
