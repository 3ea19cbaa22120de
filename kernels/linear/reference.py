"""The uniform-weight members of the family (every visible key weighs 1/n_i instead of softmax).

- affine linear attention (uniform weights, with intercept, learned probe r):
      o_i = v̄_i (1 + t̄_i) - Σ_j u_ij t_ij v_j = v̄_i - Cov_u(v, k) r_i,   t_ij = r_i · k_j
  With r = 0 it is the running value average.
- linear attention (uniform weights, no intercept, learned probe; the probe is the query):
      o_i = Σ_j u_ij (scale · q_i · k_j) v_j
"""

from __future__ import annotations

from .._checks import check_attn_inputs
from .._reference_utils import compute_dtype, from_bhtd, to_bhtd, uniform_weights


def affine_linear_attn_reference(r, k, v, causal=True, window_size=None):
    shape = check_attn_inputs(
        "affine_linear_attn_reference", r, k, v, causal=causal, window_size=window_size, q_name="r"
    )
    cd = compute_dtype(r.dtype)
    rf = to_bhtd(r, cd)
    kf, vf = to_bhtd(k, cd, shape.heads_q), to_bhtd(v, cd, shape.heads_q)
    u = uniform_weights(shape.seq_q, shape.seq_k, causal, window_size, r.device, cd)
    ut = u * (rf @ kf.transpose(-1, -2))
    o = (u @ vf) * (1 + ut.sum(-1, keepdim=True)) - ut @ vf
    return from_bhtd(o, r.dtype)


def linear_attn_reference(q, k, v, causal=True, scale=None, window_size=None):
    shape = check_attn_inputs("linear_attn_reference", q, k, v, causal=causal, scale=scale, window_size=window_size)
    cd = compute_dtype(q.dtype)
    scale = shape.head_dim**-0.5 if scale is None else scale
    qf = to_bhtd(q, cd)
    kf, vf = to_bhtd(k, cd, shape.heads_q), to_bhtd(v, cd, shape.heads_q)
    u = uniform_weights(shape.seq_q, shape.seq_k, causal, window_size, q.device, cd)
    o = (u * (scale * qf @ kf.transpose(-1, -2))) @ vf
    return from_bhtd(o, q.dtype)
