"""Softmax attention in plain PyTorch (the r = 0 member of the family), same conventions as Parallax."""

from __future__ import annotations

from .._checks import check_attn_inputs
from .._reference_utils import band_mask, compute_dtype, from_bhtd, masked_softmax, to_bhtd


def softmax_attn_reference(q, k, v, causal=True, scale=None, window_size=None):
    shape = check_attn_inputs("softmax_attn_reference", q, k, v, causal=causal, scale=scale, window_size=window_size)
    cd = compute_dtype(q.dtype)
    scale = shape.head_dim**-0.5 if scale is None else scale
    qf = to_bhtd(q, cd)
    kf, vf = to_bhtd(k, cd, shape.heads_q), to_bhtd(v, cd, shape.heads_q)
    p = masked_softmax(
        scale * qf @ kf.transpose(-1, -2), band_mask(shape.seq_q, shape.seq_k, causal, window_size, q.device)
    )
    return from_bhtd(p @ vf, q.dtype)
