"""Parallax attention written the plain way, in float64: the oracle the reference is tested against.

parallax_attn_reference (reference.py) is built for speed on CPU (no repeated kv heads, a batched decode
with masked stale rows). These functions are built to be read at a glance instead: every kv head repeated
for its query heads, the full (T_q, T_k) mask, einsums, and the streaming statistics of
docs/parallax-math.md#forward written out as they are defined there. They check nothing and hide no NaN:
a NaN in an input a row reads gives NaN in that row (a NaN key or value can also reach rows that mask it
out, through 0·NaN, as in the reference and the kernels).
"""

from __future__ import annotations

import torch


def parallax_attn_einsum(q, r, k, v, causal=True, scale=None, window_size=None, cu_seqlens=None):
    """o in float64 for q, r: (B, T_q, H_q, D) and k, v: (B, T_k, H_kv, D); differentiable.

    Masking as in docs/parallax-math.md#masking: query i sits at key position T_k - T_q + i; causal keeps
    keys j <= that position, a window W also keeps only j > position - W; cu_seqlens (batch 1, T_q = T_k)
    also keeps only keys of the query's own sequence.
    """
    q, r, k, v = (x.double() for x in (q, r, k, v))
    T_q, H_q, D = q.shape[1], q.shape[2], q.shape[3]
    T_k, H_kv = k.shape[1], k.shape[2]
    k = k.repeat_interleave(H_q // H_kv, dim=2)  # query head h reads kv head h // (H_q / H_kv)
    v = v.repeat_interleave(H_q // H_kv, dim=2)
    scale = D**-0.5 if scale is None else scale

    dev = q.device
    pos = torch.arange(T_q, device=dev)[:, None] + (T_k - T_q)
    j = torch.arange(T_k, device=dev)[None, :]
    keep = torch.ones(T_q, T_k, dtype=torch.bool, device=dev)
    if causal:
        keep &= j <= pos
    if window_size is not None:
        keep &= j > pos - window_size
    if cu_seqlens is not None:
        seq = torch.zeros(T_k, dtype=torch.long, device=dev)
        for start in cu_seqlens.tolist()[1:-1]:
            seq[start:] += 1
        keep &= seq[:T_q, None] == seq[None, :]

    s = scale * torch.einsum("bihd,bjhd->bhij", q, k)
    t = torch.einsum("bihd,bjhd->bhij", r, k)
    s = torch.where(keep, s, float("-inf"))  # w = 0 for the keys a row does not see
    m = s.amax(-1, keepdim=True).detach()  # o does not depend on m: it only keeps exp from overflowing
    w = torch.exp(s - m)
    d1 = w.sum(-1)
    d2 = (w * t).sum(-1)
    O1 = torch.einsum("bhij,bjhd->bhid", w, v)
    O2 = torch.einsum("bhij,bjhd->bhid", w * t, v)
    d1, d2 = d1[..., None], d2[..., None]
    o = O1 / d1 * (1 + d2 / d1) - O2 / d1
    return o.transpose(1, 2)


def parallax_decode_einsum(q, r, k_cache, v_cache, cache_seqlens=None, scale=None, window_size=None):
    """The decode output in float64, one sequence at a time: the query is the last of the first
    cache_seqlens[b] cache rows (docs/parallax-math.md#decode); a length outside [1, L_max] gives a NaN row."""
    L = k_cache.shape[1]
    lengths = [L] * q.shape[0] if cache_seqlens is None else cache_seqlens.tolist()
    rows = []
    for b, n in enumerate(lengths):
        if 1 <= n <= L:
            kb, vb = k_cache[b : b + 1, :n], v_cache[b : b + 1, :n]
            rows.append(parallax_attn_einsum(q[b : b + 1], r[b : b + 1], kb, vb, True, scale, window_size))
        else:
            rows.append(torch.full(q[b : b + 1].shape, float("nan"), dtype=torch.float64, device=q.device))
    return torch.cat(rows)
