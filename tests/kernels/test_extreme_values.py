"""The public Parallax ops at extreme but legal inputs: finite in, finite out (and equal to the float64
reference up to rounding), forward and backward, on the Triton path (the interpreter on CPU machines).

How close is close enough: at these values the formula itself cancels large terms (o = v̄(1+t̄) − Σ p t v
with t = r·k in the thousands; p(dp − D) with p saturated at 1), so an fp32 computation can only be exact up
to a few units of rounding of the terms it adds up. `magnitudes` sizes those terms from the float64 weights
(a first-order error model of every output and gradient); the bound is 1e-4 relative plus 8 fp32 ulps of
that size. Moderate inputs are held to far tighter bounds in test_parallax_train.py / test_parallax_decode.py.

Extremes: logits q·k·scale of about 1e4 (softmax saturates to one key), probes r with a large norm (the
correction term dwarfs v̄), length-1 sequences, windows of one key, and decode with a window far smaller
than the cache so that most of the cache — whole key blocks and split slices — is masked. A NaN or inf
anywhere, or a mismatch with the reference, fails. Shapes are tiny: the interpreter's cost grows with the
number of programs.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from parallax_kernels import backend_for, parallax_attn, parallax_attn_reference, parallax_decode, parallax_weights

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    backend_for(torch.empty(0, device=DEVICE)) != "triton", reason="needs CUDA or TRITON_INTERPRET=1 with triton"
)


def _unit(*shape):
    x = torch.randn(*shape, dtype=torch.float64)
    return x / x.norm(dim=-1, keepdim=True)


def _make(B, T, H, Hkv, D, q_norm=1.0, k_norm=1.0, r_norm=0.3):
    """q, r, k, v in float64 with the given per-head norms (v has entries of order 1)."""
    q = q_norm * _unit(B, T, H, D)
    k = k_norm * _unit(B, T, Hkv, D)
    r = r_norm * _unit(B, T, H, D)
    v = torch.randn(B, T, Hkv, D, dtype=torch.float64)
    return q, r, k, v


def magnitudes(q, r, k, v, do, scale=None, window_size=None):
    """Per output and gradient, the norm of the sum of the absolute sizes of the terms it adds up (float64).

    With w_ij = p_ij (1 + t̄_i − t_ij): o_i = Σ_j w_ij v_j, dv_j = Σ_i w_ij dO_i, dt_ij = p_ij dO_i·(v̄_i − v_j),
    dS_ij = p_ij (dp_ij − Σ_l p_il dp_il) with dp_ij = dO_i·(v_j (1 + t̄_i − t_ij) + t_ij v̄_i); dq, dk, dr are
    dS and dt contracted with k, q, r (and k). Each product is replaced by the product of absolute sizes."""
    B, _, H, D = q.shape
    G = H // k.shape[2]
    scale = D**-0.5 if scale is None else scale
    p, t = parallax_weights(q, r, k, causal=True, scale=scale, window_size=window_size)  # (B, H, Tq, Tk)
    n = lambda x, g=1: x.repeat_interleave(g, dim=2).transpose(1, 2).norm(dim=-1)  # noqa: E731 - (B, H, T)
    nq, nr, ndo, nk, nv = n(q), n(r), n(do), n(k, G), n(v, G)
    # p = exp(s - lse) is recomputed from fp32 logits: an absolute rounding of eps·|s| in s and in lse is a
    # relative error of about 2·eps·|s| in p, which grows with the logits (1e4 here). Bound |s| by
    # scale·|q_i|·max_j |k_j| and count p at 1 + 2|s| times its size.
    s_max = scale * nq * nk.amax(dim=-1, keepdim=True)
    pe = p * (1 + 2 * s_max[..., None])
    at = t.abs()
    tbar = (p * t).sum(-1).abs()
    vbar = (p @ v.repeat_interleave(G, dim=2).transpose(1, 2)).norm(dim=-1)
    w = pe * (1 + tbar[..., None] + at)
    m = {"o": (w * nv[..., None, :]).sum(-1), "dv": (w * ndo[..., :, None]).sum(-2)}
    mdt = pe * ndo[..., None] * (vbar[..., None] + nv[..., None, :])
    m["dr"] = (mdt * nk[..., None, :]).sum(-1)
    a = ndo[..., None] * (nv[..., None, :] * (1 + tbar[..., None] + at) + at * vbar[..., None])
    mds = pe * (a + (p * a).sum(-1, keepdim=True))
    m["dq"] = scale * (mds * nk[..., None, :]).sum(-1)
    m["dk"] = scale * (mds * nq[..., :, None]).sum(-2) + (mdt * nr[..., :, None]).sum(-2)
    for key in ("dk", "dv"):  # key/value heads gather from their whole query group
        m[key] = m[key].reshape(B, H // G, G, -1).sum(2)
    return {key: x.norm().item() for key, x in m.items()}


ULPS = 8


def _assert_finite_and_close(got, want, magnitude, dtype, what):
    assert torch.isfinite(got).all(), f"{what}: {int((~torch.isfinite(got)).sum())} non-finite values"
    err = (got.double() - want).norm().item()
    tol = 1e-4 * want.norm().item() + ULPS * torch.finfo(dtype).eps * magnitude
    assert err <= tol, f"{what}: error {err:.3e} > {tol:.3e} (|reference| {want.norm().item():.3e})"


def _check_attn(inputs, dtype, **kwargs):
    """Forward and all four gradients of the kernel path vs the float64 reference."""
    ref = [x.clone().requires_grad_() for x in inputs]
    leaves = [x.to(dtype).to(DEVICE).requires_grad_() for x in inputs]
    do = torch.randn_like(inputs[0])
    want = parallax_attn_reference(*ref, **kwargs)
    want_grads = torch.autograd.grad(want, ref, do)
    got = parallax_attn(*leaves, **kwargs)
    grads = torch.autograd.grad(got, leaves, do.to(dtype).to(DEVICE))
    size = magnitudes(*inputs, do, **kwargs)
    _assert_finite_and_close(got.cpu(), want, size["o"], dtype, "o")
    for name, g, w in zip(("dq", "dr", "dk", "dv"), grads, want_grads):
        _assert_finite_and_close(g.cpu(), w, size[name], dtype, name)


# name -> (B, T, H, Hkv, D, q_norm, k_norm, r_norm, kwargs). D=16, scale 1/4: q_norm·k_norm=4e4 gives logits
# up to 1e4 in size.
ATTN_CASES = {
    "logits ~1e4 from q": (1, 24, 2, 1, 16, 2000.0, 20.0, 0.3, {}),
    "logits ~1e4 from q and k": (1, 24, 2, 1, 16, 200.0, 200.0, 0.3, {}),
    "logits ~1e4, window 5": (1, 24, 2, 2, 16, 2000.0, 20.0, 0.3, {"window_size": 5}),
    "|r| = 1e3": (1, 24, 2, 1, 16, 1.0, 1.0, 1e3, {}),
    "|r| = 1e3 with logits ~1e3": (1, 20, 2, 2, 16, 63.0, 63.0, 1e3, {}),
    "length-1 sequence": (2, 1, 2, 1, 16, 50.0, 50.0, 50.0, {}),
    "window of one key": (1, 20, 2, 1, 16, 200.0, 200.0, 1e3, {"window_size": 1}),
    "one query against many keys": (1, 1, 2, 2, 16, 200.0, 200.0, 1e3, {"k_len": 33}),
}


@pytest.mark.parametrize("case", list(ATTN_CASES))
def test_parallax_attn_is_finite_and_exact_at_extremes(case, poison):
    B, T, H, Hkv, D, qn, kn, rn, kwargs = ATTN_CASES[case]
    kwargs = dict(kwargs)
    k_len = kwargs.pop("k_len", T)
    q, r, _, _ = _make(B, T, H, Hkv, D, qn, kn, rn)
    _, _, k, v = _make(B, k_len, H, Hkv, D, qn, kn, rn)
    _check_attn((q, r, k, v), torch.float32, **kwargs)


def test_parallax_attn_fp16_logits_near_the_fp16_range(poison):
    # q·k = 4e4 (the fp16 maximum is 65504), logits 1e4.
    q, r, k, v = _make(1, 24, 2, 1, 16, 200.0, 200.0, 0.3)
    q, r, k, v = (x.half().double() for x in (q, r, k, v))  # the reference sees the same rounded inputs
    _check_attn((q, r, k, v), torch.float16)


def test_parallax_attn_packed_length_one_sequences(poison):
    q, r, k, v = _make(1, 7, 2, 1, 16, 200.0, 200.0, 1e3)
    bounds = [0, 1, 2, 5, 6, 7]
    cu = torch.tensor(bounds, dtype=torch.int32, device=DEVICE)
    ref = [x.clone().requires_grad_() for x in (q, r, k, v)]
    pieces = list(itertools.pairwise(bounds))
    want = parallax_attn_reference(*ref, cu_seqlens=torch.tensor(bounds, dtype=torch.int32))
    do = torch.randn_like(q)
    want_grads = torch.autograd.grad(want, ref, do)
    sizes = [magnitudes(*(x[:, a:b] for x in (q, r, k, v)), do[:, a:b]) for a, b in pieces]
    size = {key: sum(s[key] ** 2 for s in sizes) ** 0.5 for key in sizes[0]}
    leaves = [x.float().to(DEVICE).requires_grad_() for x in (q, r, k, v)]
    got = parallax_attn(*leaves, cu_seqlens=cu)
    grads = torch.autograd.grad(got, leaves, do.float().to(DEVICE))
    _assert_finite_and_close(got.cpu(), want, size["o"], torch.float32, "o")
    for name, g, w in zip(("dq", "dr", "dk", "dv"), grads, want_grads):
        _assert_finite_and_close(g.cpu(), w, size[name], torch.float32, name)


def _decode_reference(q, r, k, v, lens, window):
    """Float64 output and the size of the terms it adds up, per sequence over its valid cache rows."""
    out, size = [], 0.0
    for b, n in enumerate(lens.tolist()):
        parts = [x[b : b + 1] for x in (q, r)] + [x[b : b + 1, :n] for x in (k, v)]
        out.append(parallax_attn_reference(*parts, window_size=window))
        size += magnitudes(*parts, torch.zeros_like(parts[0]), window_size=window)["o"] ** 2
    return torch.cat(out), size**0.5


# name -> (B, L_max, H, Hkv, D, q_norm, k_norm, r_norm, window, lengths)
DECODE_CASES = {
    "window 3 in a cache of 160 (most blocks masked)": (3, 160, 2, 1, 16, 1.0, 1.0, 0.3, 3, [1, 97, 160]),
    "window 2 in a cache of 512 (whole slices masked)": (2, 512, 2, 1, 16, 200.0, 200.0, 1e3, 2, [300, 512]),
    "window 1, logits ~1e4, |r| = 1e3": (2, 96, 2, 2, 16, 200.0, 200.0, 1e3, 1, [1, 96]),
    "logits ~1e4 over a long cache": (2, 128, 4, 1, 16, 200.0, 200.0, 0.3, None, [2, 128]),
    "|r| = 1e3, window 17": (2, 128, 2, 1, 16, 1.0, 1.0, 1e3, 17, [5, 128]),
    "length-1 caches": (3, 64, 2, 2, 16, 200.0, 200.0, 1e3, None, [1, 1, 1]),
}


@pytest.mark.parametrize("case", list(DECODE_CASES))
def test_parallax_decode_is_finite_and_exact_at_extremes(case, poison):
    B, L, H, Hkv, D, qn, kn, rn, window, lengths = DECODE_CASES[case]
    q, r, _, _ = _make(B, 1, H, Hkv, D, qn, kn, rn)
    _, _, k, v = _make(B, L, H, Hkv, D, qn, kn, rn)
    lens = torch.tensor(lengths, dtype=torch.int32)
    for b, n in enumerate(lengths):  # rows past a sequence's length are never read: poison them
        k[b, n:], v[b, n:] = float("nan"), float("nan")
    want, size = _decode_reference(q, r, k, v, lens, window)
    got = parallax_decode(*(x.float().to(DEVICE) for x in (q, r, k, v)), lens.to(DEVICE), window_size=window)
    _assert_finite_and_close(got.cpu(), want, size, torch.float32, "decode output")
