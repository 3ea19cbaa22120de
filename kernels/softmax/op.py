"""Softmax attention through torch's scaled_dot_product_attention (flash / cuDNN / efficient
backends on CUDA, the math backend on CPU), with GQA and a sliding window."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._checks import check_attn_inputs
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


def softmax_decode(q, k_cache, v_cache, cache_seqlens=None, scale=None, window_size=None):
    """One query token per sequence against a KV cache (the softmax counterpart of parallax_decode)."""
    check_attn_inputs("softmax_decode", q, k_cache, v_cache, causal=True, scale=scale, window_size=window_size)
    B, L = k_cache.shape[0], k_cache.shape[1]
    pos = torch.arange(L, device=q.device)
    lens = torch.full((B,), L, device=q.device) if cache_seqlens is None else cache_seqlens.to(q.device)
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
    return out.transpose(1, 2)
