"""Public Parallax decode op: one new token per sequence against a KV cache.

An eager decode step (generate() without CUDA graphs) runs this once per layer and token, so the
host path is kept short: the first call with a given signature (shapes, strides, dtypes, devices,
scale, window) runs the full checks, which name any problem, and builds a launch plan; later calls
with an equal signature look the plan up and launch. The one host read per call is the check of
the lengths' values, which check_lengths=False leaves out (then nothing synchronizes).
"""

from __future__ import annotations

import functools

import torch

from .._checks import check_attn_inputs, check_cache_seqlens, check_cache_seqlens_values, check_flag
from .._dispatch import backend_for
from .reference import parallax_decode_reference

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_Tensor = torch.Tensor


def call_key(q, r, k_cache, v_cache, cache_seqlens, scale, window_size):
    """Everything the input checks and the launch plan depend on, as one hashable tuple, or None
    for inputs it does not describe (tensor subclasses, other layouts, unusual scale or window
    types), which then take the full checks every call.

    Two calls with equal keys pass or fail the checks alike, so the checks run once per key. The
    last element says whether every input pointer is 16-byte aligned: Triton specializes its
    kernels on that, and a plan launches its compiled kernel directly only when it holds."""
    if not (type(q) is _Tensor and type(r) is _Tensor and type(k_cache) is _Tensor and type(v_cache) is _Tensor):
        return None
    if not (scale is None or type(scale) is float or type(scale) is int):
        return None
    if not (window_size is None or type(window_size) is int):
        return None
    try:
        if cache_seqlens is None:
            lens, lens_ptr = None, 0
        elif type(cache_seqlens) is _Tensor:
            lens = (cache_seqlens.shape, cache_seqlens.stride(), cache_seqlens.dtype, cache_seqlens.device)
            lens_ptr = cache_seqlens.data_ptr()
        else:
            return None
        ptrs = q.data_ptr() | r.data_ptr() | k_cache.data_ptr() | v_cache.data_ptr() | lens_ptr
        return (
            q.shape, r.shape, k_cache.shape, v_cache.shape,
            q.stride(), r.stride(), k_cache.stride(), v_cache.stride(),
            q.dtype, r.dtype, k_cache.dtype, v_cache.dtype,
            q.device, r.device, k_cache.device, v_cache.device,
            lens, scale, window_size, not ptrs & 15,
        )  # fmt: skip
    except RuntimeError:  # sparse and other layouts have no strides or data pointer
        return None


def check_decode_inputs(op, q, r, k_cache, v_cache, cache_seqlens, scale, window_size):
    """The full checks, each naming the problem. The values of cache_seqlens are not read here: they
    change from call to call under one signature (see `check_lengths` of parallax_decode)."""
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
    check_cache_seqlens(op, cache_seqlens, k_cache.shape[0], q.device)


def _reference(q, r, k_cache, v_cache, cache_seqlens, scale, window_size):
    # parallax_decode has checked the lengths, or was told not to: the kernel's NaN rows then, not an error
    return parallax_decode_reference(
        q, r, k_cache, v_cache, cache_seqlens, scale=scale, window_size=window_size, check_lengths=False
    )


# The one plan cache: call_key -> run(q, r, k_cache, v_cache, cache_seqlens); the Triton plans of an
# explicit DecodeConfig (triton_decode.launch_plan's callers: benchmarks, tests) are filed under
# (call_key, config).
_PLANS: dict = {}
_MAX_PLANS = 256


def _new_entry(key, q, r, k_cache, v_cache, cache_seqlens, scale, window_size, config=None):
    """Run the full checks and build the run of a new signature; filed in _PLANS unless key is None.
    With a config the run is always the Triton plan."""
    check_decode_inputs("parallax_decode", q, r, k_cache, v_cache, cache_seqlens, scale, window_size)
    if config is not None or (backend_for(q) == "triton" and q.dtype in _KERNEL_DTYPES):
        from .triton_decode import launch_plan

        run = launch_plan(q, r, k_cache, v_cache, cache_seqlens, scale, window_size, config, key=key)
    else:
        run = functools.partial(_reference, scale=scale, window_size=window_size)
    if key is not None:
        if len(_PLANS) >= _MAX_PLANS:  # shapes that keep changing must not grow it without bound
            del _PLANS[next(iter(_PLANS))]
        _PLANS[key if config is None else (key, config)] = run
    return run


def parallax_decode(q, r, k_cache, v_cache, cache_seqlens=None, scale=None, window_size=None, *, check_lengths=True):
    """One new token per sequence against a KV cache (the token's own k, v already written).

    q, r: (B, 1, H_q, D); k_cache, v_cache: (B, L_max, H_kv, D), any strides with unit stride on D
    (read in place); cache_seqlens: int32 (B,) valid lengths in [1, L_max], or None when every cache
    is full. Sequence b's query sits at position cache_seqlens[b] - 1 and attends keys
    [max(0, n - window_size), n). Returns (B, 1, H_q, D) in the input dtype.

    check_lengths: read the lengths on the host and raise a ValueError naming those outside
    [1, L_max] (the default). For a CUDA tensor that is a device sync per call, and impossible under
    CUDA-graph capture, which raises a RuntimeError saying so: pass check_lengths=False there (or
    when the caller has checked the lengths itself). Unchecked, no backend reads outside the cache:
    a sequence whose length lies outside [1, L_max] gets a NaN output row.

    On CUDA (and under TRITON_INTERPRET=1) this runs the split-KV Triton kernel; with fixed shapes,
    cache_seqlens on the device and check_lengths=False it needs no host sync and is CUDA-graph
    capturable.
    """
    key = call_key(q, r, k_cache, v_cache, cache_seqlens, scale, window_size)
    run = None if key is None else _PLANS.get(key)
    if run is None:
        run = _new_entry(key, q, r, k_cache, v_cache, cache_seqlens, scale, window_size)
    if check_lengths is not True and check_lengths is not False:
        check_flag("parallax_decode", "check_lengths", check_lengths)
    if cache_seqlens is not None and check_lengths:
        check_cache_seqlens_values("parallax_decode", cache_seqlens, k_cache.shape[1])
    return run(q, r, k_cache, v_cache, cache_seqlens)
