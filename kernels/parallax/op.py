"""Public Parallax ops: validate, then dispatch (Triton on CUDA or under the interpreter, the
PyTorch reference elsewhere)."""

from __future__ import annotations

import itertools

import torch

from .._checks import check_attn_inputs, check_cu_seqlens
from .reference import parallax_attn_reference


def parallax_attn(q, r, k, v, causal=True, scale=None, window_size=None, cu_seqlens=None):
    """Parallax attention, layout (B, T, H, D); differentiable.

    q, r: (B, T_q, H_q, D); k, v: (B, T_k, H_kv, D), H_q % H_kv == 0. With causal=True and
    T_q < T_k the queries are the last T_q positions. cu_seqlens (int32 offsets, batch 1) packs
    several sequences that do not attend to each other.
    """
    check_attn_inputs("parallax_attn", q, k, v, r, causal=causal, scale=scale, window_size=window_size)
    if cu_seqlens is not None:
        check_cu_seqlens("parallax_attn", cu_seqlens, q.shape[1], q.device, q.shape[0])
        if k.shape[1] != q.shape[1]:
            raise ValueError("parallax_attn: with cu_seqlens, q and k must have the same packed length")
        bounds = cu_seqlens.tolist()
        return torch.cat(
            [
                parallax_attn_reference(
                    q[:, a:b], r[:, a:b], k[:, a:b], v[:, a:b], causal=causal, scale=scale, window_size=window_size
                )
                for a, b in itertools.pairwise(bounds)
            ],
            dim=1,
        )
    return parallax_attn_reference(q, r, k, v, causal=causal, scale=scale, window_size=window_size)
