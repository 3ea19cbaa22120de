"""Evaluating a decoder on sequences longer than it was trained on.

`DecoderConfig.max_seq_len` is a guard, not a size: RoPE is computed afresh for any position and no buffer
depends on it, so a model trained at T runs unchanged at 2T or 4T; the guard only stops it from doing so by
accident. Length-generalisation experiments lift it on purpose, for the duration of one evaluation.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

from torch import nn


def is_length(value) -> bool:
    """A sequence length: a positive int (True is an int to Python, not a length)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def check_lengths(lengths, owner: str) -> None:
    """A configured list of evaluation lengths (None = the owner's default) is non-empty and all lengths."""
    if lengths is not None and (not lengths or not all(is_length(L) for L in lengths)):
        raise ValueError(f"{owner}.lengths must be positive integers, got {lengths!r}")


def _decoder(model: nn.Module) -> nn.Module:
    """The Decoder inside a LightningModule (`.model`) or the Decoder itself."""
    inner = getattr(model, "model", model)
    if not hasattr(inner, "config") or not hasattr(inner.config, "max_seq_len"):
        raise TypeError(f"expected a Decoder or a module holding one as `.model`, got {type(model).__name__}")
    return inner


@contextlib.contextmanager
def beyond_max_seq_len(model: nn.Module, length: int) -> Iterator[nn.Module]:
    """Within the block, the decoder accepts sequences (and KV caches) of up to `length` tokens; its config
    is restored afterwards, even on error. Yields the decoder."""
    decoder = _decoder(model)
    if not is_length(length):
        raise ValueError(f"beyond_max_seq_len: length must be a positive integer, got {length!r}")
    original = decoder.config
    if length > original.max_seq_len:
        decoder.config = dataclasses.replace(original, max_seq_len=length)
    try:
        yield decoder
    finally:
        decoder.config = original
