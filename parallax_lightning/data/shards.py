"""llm.c / modded-nanogpt token shards: a 256-int32 header (magic 20240520, version, token count) followed
by the tokens, uint16 for version 1 (vocabularies up to 65,536) and uint32 for version 2.

Shards are memory-mapped, never read whole. Every header is checked before training, and a shard whose
header disagrees with its size is reported by name.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .files import atomic_path

MAGIC = 20240520
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
DTYPES = {1: np.uint16, 2: np.uint32}


class ShardError(ValueError):
    """A token shard is missing, truncated, or its header is not an llm.c header."""


def read_header(path: str | os.PathLike) -> tuple[int, int]:
    """Check a shard's header against its size; return (version, token count)."""
    path = Path(path)
    if not path.is_file():
        raise ShardError(f"token shard {str(path)!r} does not exist")
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise ShardError(
            f"token shard {str(path)!r} is corrupt: {size} bytes, shorter than the {HEADER_BYTES}-byte header"
        )
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    magic, version, count = int(header[0]), int(header[1]), int(header[2])
    if magic != MAGIC:
        raise ShardError(
            f"token shard {str(path)!r} is corrupt or not an llm.c shard: magic number {magic}, expected {MAGIC}"
        )
    if version not in DTYPES:
        raise ShardError(f"token shard {str(path)!r} has unsupported version {version} (supported: 1=uint16, 2=uint32)")
    itemsize = np.dtype(DTYPES[version]).itemsize
    expected = HEADER_BYTES + count * itemsize
    if count < 0 or size != expected:
        raise ShardError(
            f"token shard {str(path)!r} is corrupt: header says {count} tokens ({expected} bytes) "
            f"but the file has {size} bytes"
        )
    return version, count


def open_shard(path: str | os.PathLike) -> np.memmap:
    """The shard's tokens as a read-only memory map (header checked first)."""
    version, count = read_header(path)
    return np.memmap(path, dtype=DTYPES[version], mode="r", offset=HEADER_BYTES, shape=(count,))


def write_shard(path: str | os.PathLike, tokens: np.ndarray, version: int | None = None) -> Path:
    """Write tokens as one shard (atomically: a crash never leaves a half shard under the final name)."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be 1-D, got shape {tokens.shape}")
    top = int(tokens.max()) if tokens.size else 0
    if tokens.size and int(tokens.min()) < 0:
        raise ValueError("tokens must be non-negative")
    if version is None:
        version = 1 if top < 2**16 else 2
    if version not in DTYPES:
        raise ValueError(f"version must be 1 (uint16) or 2 (uint32), got {version}")
    if top >= np.iinfo(DTYPES[version]).max + 1:
        raise ValueError(f"token id {top} does not fit a version-{version} shard ({np.dtype(DTYPES[version]).name})")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = MAGIC, version, tokens.size
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype(np.dtype(DTYPES[version]).newbyteorder("<"), copy=False).tobytes())
    return path
