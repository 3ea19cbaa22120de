"""Public Parallax decode op: one new token per sequence against a KV cache."""

from __future__ import annotations

import torch

from .._checks import check_attn_inputs
from .reference import parallax_decode_reference


def check_decode_inputs(op, q, r, k_cache, v_cache, cache_seqlens, scale, window_size):
    check_attn_inputs(op, q, k_cache, v_cache, r, causal=True, scale=scale, window_size=window_size)
    B = k_cache.shape[0]
    if q.shape[1] != 1:
        raise ValueError(
            f"{op}: q must hold one token per sequence, shape (B, 1, H_q, D); got {tuple(q.shape)} "
            "(use parallax_attn for chunks of several tokens)"
        )
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


def parallax_decode(q, r, k_cache, v_cache, cache_seqlens=None, scale=None, window_size=None):
    """One new token per sequence against a KV cache (the token's own k, v already written).

    q, r: (B, 1, H_q, D); k_cache, v_cache: (B, L_max, H_kv, D); cache_seqlens: int32 (B,) valid
    lengths in [1, L_max], or None when every cache is full.
    """
    check_decode_inputs("parallax_decode", q, r, k_cache, v_cache, cache_seqlens, scale, window_size)
    if cache_seqlens is not None:
        lens = cache_seqlens.tolist()
        bad = [n for n in lens if not 1 <= n <= k_cache.shape[1]]
        if bad:
            raise ValueError(f"parallax_decode: cache_seqlens must lie in [1, {k_cache.shape[1]}], got {bad}")
    return parallax_decode_reference(q, r, k_cache, v_cache, cache_seqlens, scale=scale, window_size=window_size)
