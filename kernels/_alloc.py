"""Output allocation for the kernels, with optional NaN poisoning for tests.

Every kernel launcher allocates its outputs (and the gradients it returns) through `empty`.
With poisoning on, floating outputs start as NaN, so an element a kernel forgets to write
fails the comparison against the reference instead of passing on whatever memory held.
"""

from __future__ import annotations

import contextlib
import os

import torch

_poison = os.environ.get("PARALLAX_POISON_OUTPUTS", "0") == "1"


@contextlib.contextmanager
def poison_outputs(enabled: bool = True):
    """Within the block, kernel outputs are NaN-filled before the kernels write them."""
    global _poison
    previous, _poison = _poison, enabled
    try:
        yield
    finally:
        _poison = previous


def empty(shape, *, dtype: torch.dtype, device) -> torch.Tensor:
    if _poison and dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)
