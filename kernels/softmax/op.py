"""Softmax attention through torch's scaled_dot_product_attention (flash / cuDNN / efficient
backends on CUDA, the math backend on CPU), with GQA and a sliding window."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._checks import check_attn_inputs, check_cache_seqlens, check_cache_seqlens_values, check_flag
from .._reference_utils import band_mask


def softmax_attn(q, k, v, causal=True, scale=None, window_size=None):
    """Softmax attention, layout (B, T, H, D); GQA by H_q % H_kv == 0; queries end-aligned when T_q < T_k."""
    shape = check_attn_inputs("softmax_attn", q, k, v, causal=causal, scale=scale, window_size=window_size)
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    gqa = shape.heads_q != shape.heads_kv
    if causal and window_size is None and shape.seq_q == shape.seq_k:
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale, enable_gqa=gqa)
    else:
        # SDPA's is_causal aligns to the top-left corner; an explicit mask keeps our end-aligned band.
        mask = band_mask(shape.seq_q, shape.seq_k, causal, window_size, q.device)
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return out.transpose(1, 2)


def softmax_decode(q, k_cache, v_cache, cache_seqlens=None, scale=None, window_size=None, *, check_lengths=True):
    """One query token per sequence against a KV cache (the softmax counterpart of parallax_decode).

    q: (B, 1, H_q, D); k_cache, v_cache: (B, L_max, H_kv, D); cache_seqlens: int32 (B,) lengths in
    [1, L_max], or None (full caches). The lengths follow parallax_decode's rule: check_lengths (the
    default, a host read) raises a ValueError naming those outside [1, L_max]; check_lengths=False
    (under CUDA-graph capture) gives their rows NaN.
    """
    op = "softmax_decode"
    check_attn_inputs(op, q, k_cache, v_cache, causal=True, scale=scale, window_size=window_size)
    if q.shape[1] != 1:
        raise ValueError(f"{op}: q must hold one token per sequence, shape (B, 1, H_q, D); got {tuple(q.shape)}")
    B, L = k_cache.shape[0], k_cache.shape[1]
    check_cache_seqlens(op, cache_seqlens, B, q.device)
    check_flag(op, "check_lengths", check_lengths)
    if cache_seqlens is not None and check_lengths:
        check_cache_seqlens_values(op, cache_seqlens, L)
    pos = torch.arange(L, device=q.device)
    lens = torch.full((B,), L, device=q.device) if cache_seqlens is None else cache_seqlens
    keep = pos.unsqueeze(0) < lens.unsqueeze(1)
    if window_size is not None:
        keep = keep & (pos.unsqueeze(0) >= (lens.unsqueeze(1) - window_size))
    mask = keep[:, None, None, :]  # (B, 1, 1, L)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k_cache.transpose(1, 2),
        v_cache.transpose(1, 2),
        attn_mask=mask,
        scale=scale,
        enable_gqa=q.shape[2] != k_cache.shape[2],
    )
    if cache_seqlens is not None:  # unchecked lengths outside the cache: NaN rows, as parallax_decode gives
        out = out.masked_fill(((lens < 1) | (lens > L))[:, None, None, None], float("nan"))
    return out.transpose(1, 2)
