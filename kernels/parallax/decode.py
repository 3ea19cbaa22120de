"""Public Parallax decode op: one new token per sequence against a KV cache."""

from __future__ import annotations

import torch

from .._checks import check_attn_inputs, check_scale, check_window
from .._dispatch import backend_for
from .reference import parallax_decode_reference

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _plainly_valid(q, r, k, v) -> bool:
    """The common case in one pass, strictly narrower than the full checks (which then run only for
    anything unusual, to name the problem): a decode step pays this per layer and token."""
    if not (
        type(q) is torch.Tensor and type(r) is torch.Tensor and type(k) is torch.Tensor and type(v) is torch.Tensor
    ):
        return False
    qs, ks = q.shape, k.shape
    dtype, device = q.dtype, q.device
    return (
        len(qs) == 4 and len(ks) == 4 and qs[1] == 1 and r.shape == qs and v.shape == ks
        and qs[0] == ks[0] and qs[3] == ks[3] and min(qs[0], qs[2], qs[3], ks[1], ks[2]) >= 1
        and qs[2] % ks[2] == 0
        and dtype in _KERNEL_DTYPES and r.dtype == dtype and k.dtype == dtype and v.dtype == dtype
        and r.device == device and k.device == device and v.device == device
        and q.layout == r.layout == k.layout == v.layout == torch.strided
        and k.stride(3) == 1 and v.stride(3) == 1
    )  # fmt: skip


def check_decode_inputs(op, q, r, k_cache, v_cache, cache_seqlens, scale, window_size):
    if _plainly_valid(q, r, k_cache, v_cache):
        check_scale(op, scale)
        check_window(op, window_size, causal=True)
    else:
        _check_unusual_inputs(op, q, r, k_cache, v_cache, scale, window_size)
    _check_seqlens(op, q, k_cache, cache_seqlens)


def _check_unusual_inputs(op, q, r, k_cache, v_cache, scale, window_size):
    check_attn_inputs(op, q, k_cache, v_cache, r, causal=True, scale=scale, window_size=window_size)
    if q.shape[1] != 1:
        raise ValueError(
            f"{op}: q must hold one token per sequence, shape (B, 1, H_q, D); got {tuple(q.shape)} "
            "(use parallax_attn for chunks of several tokens)"
        )
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(-1) != 1:
            raise ValueError(
                f"{op}: {name} must have unit stride along head_dim (it is read in place), got strides "
                f"{tuple(t.stride())}"
            )


def _check_seqlens(op, q, k_cache, cache_seqlens):
    B = k_cache.shape[0]
    if cache_seqlens is None:
        return
    if not isinstance(cache_seqlens, torch.Tensor):
        raise TypeError(f"{op}: cache_seqlens must be a torch.Tensor or None, got {type(cache_seqlens).__name__}")
    if cache_seqlens.dtype not in (torch.int32, torch.int64) or tuple(cache_seqlens.shape) != (B,):
        raise ValueError(
            f"{op}: cache_seqlens must be an int32 tensor of shape ({B},), got dtype {cache_seqlens.dtype} "
            f"and shape {tuple(cache_seqlens.shape)}"
        )
    if cache_seqlens.device != q.device:
        raise ValueError(f"{op}: cache_seqlens is on {cache_seqlens.device} but q is on {q.device}")
    # The range check needs the values on the host: a sync on CUDA, and impossible while a CUDA graph
    # is being captured. There the kernel turns a length outside [1, L_max] into a NaN output instead.
    if cache_seqlens.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return
    L_max = k_cache.shape[1]
    lo, hi = torch.stack(torch.aminmax(cache_seqlens)).tolist()  # one sync
    if lo < 1 or hi > L_max:
        bad = [n for n in cache_seqlens.tolist() if not 1 <= n <= L_max]
        raise ValueError(f"{op}: cache_seqlens must lie in [1, {L_max}], got {bad}")


def parallax_decode(q, r, k_cache, v_cache, cache_seqlens=None, scale=None, window_size=None):
    """One new token per sequence against a KV cache (the token's own k, v already written).

    q, r: (B, 1, H_q, D); k_cache, v_cache: (B, L_max, H_kv, D), any strides with unit stride on D
    (read in place); cache_seqlens: int32 (B,) valid lengths in [1, L_max], or None when every cache
    is full. Sequence b's query sits at position cache_seqlens[b] - 1 and attends keys
    [max(0, n - window_size), n). Returns (B, 1, H_q, D) in the input dtype.

    On CUDA (and under TRITON_INTERPRET=1) this runs the split-KV Triton kernel; with fixed shapes and
    cache_seqlens on the device it needs no host sync while a CUDA graph is captured.
    """
    check_decode_inputs("parallax_decode", q, r, k_cache, v_cache, cache_seqlens, scale, window_size)
    if backend_for(q) == "triton" and q.dtype in _KERNEL_DTYPES:
        from .triton_decode import parallax_decode_triton

        return parallax_decode_triton(q, r, k_cache, v_cache, cache_seqlens, scale, window_size)
    return parallax_decode_reference(q, r, k_cache, v_cache, cache_seqlens, scale=scale, window_size=window_size)
