"""Which implementation an op runs: Triton on CUDA, the Triton interpreter on CPU when
TRITON_INTERPRET=1, the pure-PyTorch reference elsewhere (or when Triton is not installed)."""

from __future__ import annotations

import functools
import os

import torch


@functools.cache
def triton_available() -> bool:
    try:
        import triton
        import triton.language  # noqa: F401
    except Exception:  # a missing or broken Triton only disables the kernels
        return False
    return True


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def backend_for(t: torch.Tensor) -> str:
    """'triton' (GPU or interpreter) or 'reference'."""
    if not triton_available():
        return "reference"
    if t.is_cuda:
        return "triton"
    if t.device.type == "cpu" and interpreting():
        return "triton"
    return "reference"
