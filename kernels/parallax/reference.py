"""Parallax attention in PyTorch: the differentiable reference (and the CPU path of the public ops).

    o_i = v̄_i (1 + t̄_i) - Σ_j p_ij t_ij v_j,   p = softmax(scale q kᵀ) (masked),  t = r kᵀ (unscaled)

which is v̄_i - Cov_p(v, k) r_i (docs/parallax-math.md#forward). With r = 0 it is softmax attention.
It avoids work (no repeated kv heads, one batched decode under a length mask); oracle.py writes the same
math plainly, and tests/kernels/test_oracle.py checks that the two agree.
"""

from __future__ import annotations

import itertools

import torch

from .._checks import (
    check_attn_inputs,
    check_cache_seqlens,
    check_cache_seqlens_values,
    check_cu_seqlens,
    check_flag,
)
from .._reference_utils import band_mask, compute_dtype, from_bhtd, masked_softmax, to_bhtd

_OP = "parallax_attn_reference"
_DECODE_OP = "parallax_decode_reference"


def _weights(qf, rf, kf, mask, scale):
    """(p, t) from compute-dtype (..., T_q, D) queries and probes and (..., T_k, D) keys; no checks."""
    p = masked_softmax(scale * qf @ kf.transpose(-1, -2), mask)
    t = rf @ kf.transpose(-1, -2)
    return p, t


def _output(p, t, vf):
    """o = v̄ (1 + t̄) - Σ_j p_ij t_ij v_j for (..., T_k, D) values."""
    pt = p * t
    v_bar = p @ vf
    t_bar = pt.sum(-1, keepdim=True)
    return v_bar * (1 + t_bar) - pt @ vf


def _checked_weights(shape, q, r, k, causal, scale, window_size):
    """parallax_weights for inputs already checked (`shape` from check_attn_inputs)."""
    cd = compute_dtype(q.dtype)
    scale = shape.head_dim**-0.5 if scale is None else scale
    qf, rf = to_bhtd(q, cd), to_bhtd(r, cd)
    kf = to_bhtd(k, cd, shape.heads_q)
    mask = band_mask(shape.seq_q, shape.seq_k, causal, window_size, q.device)
    return _weights(qf, rf, kf, mask, scale)


def parallax_weights(q, r, k, causal=True, scale=None, window_size=None):
    """(p, t) as (B, H_q, T_q, T_k) tensors in the compute dtype (for diagnostics and tests)."""
    shape = check_attn_inputs("parallax_weights", q, k, k, r, causal=causal, scale=scale, window_size=window_size)
    return _checked_weights(shape, q, r, k, causal, scale, window_size)


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
        offsets = check_cu_seqlens(_OP, cu_seqlens, q.shape[1], q.device, q.shape[0], seq_k=k.shape[1])
        return torch.cat(
            [
                parallax_attn_reference(
                    q[:, a:b], r[:, a:b], k[:, a:b], v[:, a:b], causal=causal, scale=scale, window_size=window_size
                )
                for a, b in itertools.pairwise(offsets)
            ],
            dim=1,
        )
    p, t = _checked_weights(shape, q, r, k, causal, scale, window_size)
    vf = to_bhtd(v, compute_dtype(q.dtype), shape.heads_q)
    return from_bhtd(_output(p, t, vf), q.dtype)


def parallax_decode_reference(
    q, r, k_cache, v_cache, cache_seqlens=None, scale=None, window_size=None, *, check_lengths=True
):
    """One query token per sequence against a KV cache whose first cache_seqlens[b] rows are valid.

    q, r: (B, 1, H_q, D); k_cache, v_cache: (B, L_max, H_kv, D); cache_seqlens: int32 (B,) lengths in
    [1, L_max], or None (full caches). The query sits at the last valid position (the new token's k/v
    are already in the cache).

    Lengths follow parallax_decode's rule: check_lengths (the default) raises a ValueError naming
    those outside [1, L_max]; with check_lengths=False their rows come out NaN, as the kernel's do.
    (With T > 1 query tokens, the last T positions, lengths start at T.)

    The batch is computed at once, with a (B, L_max) mask of each sequence's keys: the result is
    parallax_attn_reference on each sequence's valid prefix (cache rows past it are never used,
    whatever they hold). A NaN in q, r or the valid rows of the cache gives NaN, as in the kernel.
    """
    if cache_seqlens is None:
        return parallax_attn_reference(q, r, k_cache, v_cache, causal=True, scale=scale, window_size=window_size)
    check_attn_inputs(_DECODE_OP, q, k_cache, v_cache, r, causal=True, scale=scale, window_size=window_size)
    check_cache_seqlens(_DECODE_OP, cache_seqlens, q.shape[0], q.device)
    check_flag(_DECODE_OP, "check_lengths", check_lengths)
    B, T, H_q, D = q.shape
    L, H_kv = k_cache.shape[1], k_cache.shape[2]
    if check_lengths:
        check_cache_seqlens_values(_DECODE_OP, cache_seqlens, L, low=T)
    n = cache_seqlens.to(torch.int64)
    valid = (n >= T) & (n <= L)
    n = torch.where(valid, n, L)  # computed over a stand-in length, then replaced by NaN
    L = int(n.max())  # rows past every sequence are left out
    j = torch.arange(L, device=q.device)
    pos = n[:, None, None] - T + torch.arange(T, device=q.device)[:, None]  # (B, T, 1): query i's position
    keep = j <= pos
    if window_size is not None:
        keep = keep & (j > pos - window_size)
    past = j >= n[:, None]  # (B, L): cache rows past the sequence, whatever they hold, must add nothing
    cd = compute_dtype(q.dtype)
    scale = D**-0.5 if scale is None else scale
    # the G = H_q / H_kv query heads of a kv head as G * T rows, (B, H_kv, G * T, D): no repeated caches
    G = H_q // H_kv
    qf, rf = (x.to(cd).view(B, T, H_kv, G, D).permute(0, 2, 3, 1, 4).reshape(B, H_kv, G * T, D) for x in (q, r))
    kf = to_bhtd(k_cache[:, :L], cd).contiguous()
    vf = to_bhtd(v_cache[:, :L], cd)
    stale = past[:, None, :, None]
    # one copy: the contiguous one the matmuls need, zeroed in place, unless that would be the caller's cache
    vf = vf.contiguous().masked_fill_(stale, 0) if not vf.is_contiguous() else vf.masked_fill(stale, 0)
    p, t = _weights(qf, rf, kf, keep.repeat(1, G, 1)[:, None], scale)  # p is 0 past the sequence
    o = _output(p, t.masked_fill(past[:, None, None], 0), vf).view(B, H_kv, G, T, D)
    o = o.masked_fill(~valid[:, None, None, None, None], float("nan"))
    return o.permute(0, 3, 1, 2, 4).reshape(B, T, H_q, D).to(q.dtype).contiguous()
