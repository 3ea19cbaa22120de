"""Local Linear Attention (LLA, arXiv 2510.01450): the exact per-query ridge solve, the 'r solved'
member of the family. O(D^3) per query and a (T, D, D) covariance per head: small models only.

    p = softmax(scale q kᵀ),  k̄ = p k,  v̄ = p v
    C_kk = Σ_j p_ij (k_j - k̄_i)(k_j - k̄_i)ᵀ,   C_vk = Σ_j p_ij (v_j - v̄_i)(k_j - k̄_i)ᵀ
    o_i = v̄_i + C_vk (C_kk + λ I)⁻¹ (q_i - k̄_i)
"""

from __future__ import annotations

import torch

from .._checks import check_attn_inputs
from .._reference_utils import band_mask, compute_dtype, from_bhtd, masked_softmax, to_bhtd


def lla_attn_reference(q, k, v, causal=True, scale=None, ridge=0.1, window_size=None):
    shape = check_attn_inputs("lla_attn_reference", q, k, v, causal=causal, scale=scale, window_size=window_size)
    if not (isinstance(ridge, (int, float)) and ridge > 0):
        raise ValueError(f"lla_attn_reference: ridge must be a positive number (it keeps C_kk invertible), got {ridge}")
    cd = compute_dtype(q.dtype)
    scale = shape.head_dim**-0.5 if scale is None else scale
    qf = to_bhtd(q, cd)
    kf, vf = to_bhtd(k, cd, shape.heads_q), to_bhtd(v, cd, shape.heads_q)
    mask = band_mask(shape.seq_q, shape.seq_k, causal, window_size, q.device)
    p = masked_softmax(scale * qf @ kf.transpose(-1, -2), mask)
    k_bar, v_bar = p @ kf, p @ vf
    # Second moments minus outer products of the means: the weighted covariances, per query row.
    c_kk = torch.einsum("bhij,bhjd,bhje->bhide", p, kf, kf) - k_bar.unsqueeze(-1) * k_bar.unsqueeze(-2)
    c_vk = torch.einsum("bhij,bhjd,bhje->bhide", p, vf, kf) - v_bar.unsqueeze(-1) * k_bar.unsqueeze(-2)
    eye = torch.eye(shape.head_dim, dtype=cd, device=q.device)
    x = torch.linalg.solve(c_kk + ridge * eye, (qf - k_bar).unsqueeze(-1))
    o = v_bar + (c_vk @ x).squeeze(-1)
    return from_bhtd(o, q.dtype)
