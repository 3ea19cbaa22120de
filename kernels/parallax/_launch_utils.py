"""Host-side helpers shared by the Parallax Triton launchers (training in triton_train, decode in triton_decode)."""

from __future__ import annotations

import functools

import torch
import triton

# Scores live in the base-2 domain: the softmax scale is multiplied by log2(e) on the host, so every
# exponential in the kernels is a bare exp2. A plain float: it is only used by the launchers, never in @jit code.
LOG2E = 1.4426950408889634


@functools.cache
def _block_d(head_dim: int) -> int:
    # Head dims that are not powers of two are padded up to one and masked; 16 is tl.dot's minimum.
    return max(triton.next_power_of_2(head_dim), 16)


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs get exact fp32 products (no tf32 rounding); 16-bit inputs ignore the setting.
    return "ieee" if dtype == torch.float32 else "tf32"


def _device_index(device: torch.device) -> int:
    """The index of a CUDA device; a bare "cuda" device means the current one."""
    return device.index if device.index is not None else torch.cuda.current_device()
