"""Data for the platform: text sources, tokenizers, llm.c token shards, deterministic resumable batches,
and the Lightning DataModules built on them.

The DataModules import lightning; they load on first use so that the lightweight parts (sources,
tokenizers, shards) stay quick to import for `experiments/prepare_shards.py`.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "TokenDataModule": ".token_datamodule",
    "TextDataModule": ".text_datamodule",
    "TokenShardDataModule": ".shard_datamodule",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
