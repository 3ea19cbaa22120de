"""Parallax attention in plain PyTorch: the oracle every Parallax kernel is tested against.

    o_i = v̄_i (1 + t̄_i) - Σ_j p_ij t_ij v_j,   p = softmax(scale q kᵀ) (masked),  t = r kᵀ (unscaled)

which is v̄_i - Cov_p(v, k) r_i. With r = 0 it is softmax attention.
"""

from __future__ import annotations

import itertools

import torch

from .._checks import check_attn_inputs, check_cu_seqlens
from .._reference_utils import band_mask, compute_dtype, from_bhtd, masked_softmax, to_bhtd

_OP = "parallax_attn_reference"


def parallax_weights(q, r, k, causal=True, scale=None, window_size=None):
    """(p, t) as (B, H_q, T_q, T_k) tensors in the compute dtype (for diagnostics and tests)."""
    shape = check_attn_inputs("parallax_weights", q, k, k, r, causal=causal, scale=scale, window_size=window_size)
    cd = compute_dtype(q.dtype)
    scale = shape.head_dim**-0.5 if scale is None else scale
    qf, rf = to_bhtd(q, cd), to_bhtd(r, cd)
    kf = to_bhtd(k, cd, shape.heads_q)
    mask = band_mask(shape.seq_q, shape.seq_k, causal, window_size, q.device)
    p = masked_softmax(scale * qf @ kf.transpose(-1, -2), mask)
    t = rf @ kf.transpose(-1, -2)
    return p, t


def parallax_attn_reference(q, r, k, v, causal=True, scale=None, window_size=None, *, cu_seqlens=None):
    """Parallax attention, layout (B, T, H, D), fp32 math (fp64 for fp64 inputs), input dtype out.

    q, r: (B, T_q, H_q, D); k, v: (B, T_k, H_kv, D) with H_q % H_kv == 0.
    cu_seqlens (int32 offsets [0, ..., T], batch 1, as for parallax_attn) packs several sequences that do not
    attend to each other: q, r, k, v are cut at each pair of offsets (q and k must have the same packed
    length), each sequence is attended on its own and the outputs are concatenated along T.
    Differentiable through autograd, so the gradients are the reference gradients too.
    """
    shape = check_attn_inputs(_OP, q, k, v, r, causal=causal, scale=scale, window_size=window_size)
    if cu_seqlens is not None:
        if k.shape[1] != q.shape[1]:
            raise ValueError(
                f"{_OP}: with cu_seqlens, q and k must have the same packed length, got {q.shape[1]} and {k.shape[1]}"
            )
        offsets = check_cu_seqlens(_OP, cu_seqlens, q.shape[1], q.device, q.shape[0])
        return torch.cat(
            [
                parallax_attn_reference(
                    q[:, a:b], r[:, a:b], k[:, a:b], v[:, a:b], causal=causal, scale=scale, window_size=window_size
                )
                for a, b in itertools.pairwise(offsets)
            ],
            dim=1,
        )
    cd = compute_dtype(q.dtype)
    p, t = parallax_weights(q, r, k, causal=causal, scale=scale, window_size=window_size)
    vf = to_bhtd(v, cd, shape.heads_q)
    pt = p * t
    v_bar = p @ vf
    t_bar = pt.sum(-1, keepdim=True)
    o = v_bar * (1 + t_bar) - pt @ vf
    return from_bhtd(o, q.dtype)


def parallax_decode_reference(q, r, k_cache, v_cache, cache_seqlens=None, scale=None, window_size=None):
    """One query token per sequence against a KV cache whose first cache_seqlens[b] rows are valid.

    q, r: (B, 1, H_q, D); k_cache, v_cache: (B, L_max, H_kv, D); cache_seqlens: int (B,) or None (full).
    The query sits at the last valid position (the new token's k/v are already in the cache).
    """
    if cache_seqlens is None:
        return parallax_attn_reference(q, r, k_cache, v_cache, causal=True, scale=scale, window_size=window_size)
    outs = []
    for b, n in enumerate(cache_seqlens.tolist()):
        sl = slice(b, b + 1)
        outs.append(
            parallax_attn_reference(
                q[sl], r[sl], k_cache[sl, :n], v_cache[sl, :n], causal=True, scale=scale, window_size=window_size
            )
        )
    return torch.cat(outs, dim=0)
