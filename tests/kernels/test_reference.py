"""The reference ops against independent per-query loops in float64, and their invariants."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from parallax_kernels import (
    affine_linear_attn_reference,
    linear_attn_reference,
    lla_attn_reference,
    parallax_attn,
    parallax_attn_reference,
    parallax_decode,
    parallax_decode_reference,
    softmax_attn,
    softmax_attn_reference,
    softmax_decode,
)
from tests.helpers import assert_close_rel

# (B, T_q, T_k, H_q, H_kv, D, causal, window)
SHAPES = [
    (2, 7, 7, 2, 2, 8, True, None),
    (1, 13, 13, 4, 1, 16, True, None),  # GQA 4:1, odd length
    (2, 11, 11, 4, 2, 12, True, 4),  # window, head dim not a power of two
    (1, 5, 17, 2, 1, 8, True, None),  # T_q < T_k: queries aligned to the end
    (1, 3, 9, 2, 2, 8, True, 3),  # T_q < T_k with a window
    (2, 6, 9, 2, 1, 8, False, None),  # non-causal cross attention
    (1, 1, 1, 1, 1, 4, True, None),  # a single token
]


def _visible(i: int, t_q: int, t_k: int, causal: bool, window):
    """Keys visible to query row i, written out independently of the library's mask helper."""
    if not causal:
        return list(range(t_k))
    pos = t_k - t_q + i
    lo = 0 if window is None else max(0, pos - window + 1)
    return list(range(lo, pos + 1))


def _rand(B, T, H, D):
    return torch.randn(B, T, H, D, dtype=torch.float64)


def _naive(q, r, k, v, causal, scale, window, kind):
    """Per (batch, head, query) loop in float64."""
    B, Tq, Hq, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    out = torch.zeros(B, Tq, Hq, D, dtype=torch.float64)
    for b in range(B):
        for h in range(Hq):
            g = h // (Hq // Hkv)
            for i in range(Tq):
                js = _visible(i, Tq, Tk, causal, window)
                K, V = k[b, js, g], v[b, js, g]
                if kind in ("affine_linear", "linear"):
                    w = torch.full((len(js),), 1.0 / len(js), dtype=torch.float64)
                else:
                    w = torch.softmax(scale * K @ q[b, i, h], 0)
                if kind == "softmax":
                    out[b, i, h] = w @ V
                elif kind in ("parallax", "affine_linear"):
                    k_mean, v_mean = w @ K, w @ V
                    cov_vk = (V - v_mean).T @ torch.diag(w) @ (K - k_mean)
                    out[b, i, h] = v_mean - cov_vk @ r[b, i, h]
                elif kind == "linear":
                    out[b, i, h] = (w * (scale * K @ q[b, i, h])) @ V
                elif kind == "lla":
                    k_mean, v_mean = w @ K, w @ V
                    c_kk = (K - k_mean).T @ torch.diag(w) @ (K - k_mean)
                    c_vk = (V - v_mean).T @ torch.diag(w) @ (K - k_mean)
                    x = torch.linalg.solve(c_kk + 0.1 * torch.eye(D, dtype=torch.float64), q[b, i, h] - k_mean)
                    out[b, i, h] = v_mean + c_vk @ x
    return out


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_parallax_reference_matches_naive_loop(shape):
    B, Tq, Tk, Hq, Hkv, D, causal, window = shape
    q, r = _rand(B, Tq, Hq, D), 0.3 * _rand(B, Tq, Hq, D)
    k, v = _rand(B, Tk, Hkv, D), _rand(B, Tk, Hkv, D)
    scale = 0.7 / math.sqrt(D)
    got = parallax_attn_reference(q, r, k, v, causal=causal, scale=scale, window_size=window)
    assert_close_rel(got, _naive(q, r, k, v, causal, scale, window, "parallax"), 1e-12)


@pytest.mark.parametrize("kind", ["softmax", "linear", "affine_linear", "lla"])
@pytest.mark.parametrize("shape", SHAPES[:5], ids=str)
def test_family_references_match_naive_loop(kind, shape):
    B, Tq, Tk, Hq, Hkv, D, causal, window = shape
    q, r = _rand(B, Tq, Hq, D), 0.3 * _rand(B, Tq, Hq, D)
    k, v = _rand(B, Tk, Hkv, D), _rand(B, Tk, Hkv, D)
    scale = 1 / math.sqrt(D)
    if kind == "softmax":
        got = softmax_attn_reference(q, k, v, causal=causal, window_size=window)
    elif kind == "linear":
        got = linear_attn_reference(q, k, v, causal=causal, window_size=window)
    elif kind == "affine_linear":
        got = affine_linear_attn_reference(r, k, v, causal=causal, window_size=window)
    else:
        got = lla_attn_reference(q, k, v, causal=causal, ridge=0.1, window_size=window)
    tol = 1e-9 if kind == "lla" else 1e-12
    assert_close_rel(got, _naive(q, r, k, v, causal, scale, window, kind), tol, kind)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_r_zero_is_softmax_attention(shape):
    B, Tq, Tk, Hq, Hkv, D, causal, window = shape
    q, k, v = torch.randn(B, Tq, Hq, D), torch.randn(B, Tk, Hkv, D), torch.randn(B, Tk, Hkv, D)
    got = parallax_attn_reference(q, torch.zeros_like(q), k, v, causal=causal, window_size=window)
    # Independent oracle: torch's SDPA on explicitly expanded heads and an explicit end-aligned mask.
    rep = Hq // Hkv
    kt, vt = k.repeat_interleave(rep, 2).transpose(1, 2), v.repeat_interleave(rep, 2).transpose(1, 2)
    mask = torch.ones(Tq, Tk, dtype=torch.bool)
    for i in range(Tq):
        mask[i] = False
        mask[i, _visible(i, Tq, Tk, causal, window)] = True
    want = F.scaled_dot_product_attention(q.transpose(1, 2), kt, vt, attn_mask=mask).transpose(1, 2)
    assert_close_rel(got, want, 1e-5)
    assert_close_rel(softmax_attn(q, k, v, causal=causal, window_size=window), want, 1e-5, "softmax_attn")


def test_constant_values_come_back():
    """The effective weights p_ij (1 + t̄_i - t_ij) sum to one, so a constant v is returned as is."""
    q, r = torch.randn(2, 9, 4, 16), 3 * torch.randn(2, 9, 4, 16)
    k = torch.randn(2, 9, 2, 16)
    v = torch.randn(2, 1, 2, 16).expand(2, 9, 2, 16).contiguous()
    o = parallax_attn_reference(q, r, k, v, window_size=5)
    assert_close_rel(o, v.repeat_interleave(2, 2), 1e-5)


def test_dtype_in_dtype_out_and_fp32_math():
    q, r, k, v = (torch.randn(1, 8, 2, 16, dtype=torch.float16) for _ in range(4))
    o = parallax_attn_reference(q, r, k, v)
    assert o.dtype == torch.float16
    want = parallax_attn_reference(q.double(), r.double(), k.double(), v.double())
    assert_close_rel(o, want, 2e-3)


def test_reference_is_differentiable():
    q, r, k, v = (torch.randn(1, 6, 2, 8, dtype=torch.float64, requires_grad=True) for _ in range(4))
    assert torch.autograd.gradcheck(lambda *a: parallax_attn_reference(*a, window_size=4), (q, r, k, v))


def test_decode_equals_last_row_of_full_attention():
    B, L, Hq, Hkv, D = 3, 12, 4, 2, 16
    k, v = torch.randn(B, L, Hkv, D), torch.randn(B, L, Hkv, D)
    q, r = torch.randn(B, 1, Hq, D), torch.randn(B, 1, Hq, D)
    lens = torch.tensor([1, 7, 12], dtype=torch.int32)
    got = parallax_decode(q, r, k, v, cache_seqlens=lens, window_size=5)
    for b, n in enumerate(lens.tolist()):
        want = parallax_attn_reference(q[b : b + 1], r[b : b + 1], k[b : b + 1, :n], v[b : b + 1, :n], window_size=5)
        assert_close_rel(got[b : b + 1], want, 1e-6, f"sequence {b}")
    zeros = torch.zeros_like(q)
    assert_close_rel(
        parallax_decode(q, zeros, k, v, cache_seqlens=lens), softmax_decode(q, k, v, cache_seqlens=lens), 1e-5
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 6])
def test_batched_decode_reference_is_the_per_sequence_reference(dtype, window):
    """The decode reference computes the batch at once under a length mask; it must equal
    parallax_attn_reference on each sequence's valid prefix (T_q = 1), whatever the rows past it hold."""
    torch.manual_seed(0)
    B, L, Hq, Hkv, D = 6, 29, 6, 2, 12
    q, r = torch.randn(B, 1, Hq, D, dtype=dtype), torch.randn(B, 1, Hq, D, dtype=dtype) * D**-0.5
    k, v = torch.randn(B, L, Hkv, D, dtype=dtype), torch.randn(B, L, Hkv, D, dtype=dtype)
    lens = torch.tensor([1, 29, 5, 17, 6, 28], dtype=torch.int32)
    for b, n in enumerate(lens.tolist()):
        k[b, n:], v[b, n:] = float("nan"), float("inf")
    got = parallax_decode_reference(q, r, k, v, lens, scale=0.4, window_size=window)
    assert got.dtype == dtype and got.shape == q.shape and got.is_contiguous()
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
    for b, n in enumerate(lens.tolist()):
        s = slice(b, b + 1)
        want = parallax_attn_reference(q[s], r[s], k[s, :n], v[s, :n], scale=0.4, window_size=window)
        assert_close_rel(got[s], want, tol, f"sequence {b} (length {n})")


def test_parallax_attn_packed_sequences_do_not_mix():
    q, r, k, v = (torch.randn(1, 10, 2, 8) for _ in range(4))
    cu = torch.tensor([0, 3, 10], dtype=torch.int32)
    got = parallax_attn(q, r, k, v, cu_seqlens=cu)
    for a, b in [(0, 3), (3, 10)]:
        want = parallax_attn_reference(q[:, a:b], r[:, a:b], k[:, a:b], v[:, a:b])
        assert_close_rel(got[:, a:b], want, 1e-6)


def _qrkv(B=1, T=4, Hq=2, Hkv=2, D=8, **kw):
    return [torch.randn(B, T, Hq, D, **kw), torch.randn(B, T, Hq, D, **kw)] + [
        torch.randn(B, T, Hkv, D, **kw) for _ in range(2)
    ]


def _with(i, x):
    t = _qrkv()
    t[i] = x
    return t


BAD = [
    ("rank", lambda: _with(0, torch.randn(4, 2, 8)), {}, ValueError, "q must have 4 dims"),
    ("r shape", lambda: _with(1, torch.randn(1, 4, 1, 8)), {}, ValueError, "r must have the shape of q"),
    ("v shape", lambda: _with(3, torch.randn(1, 5, 2, 8)), {}, ValueError, "v must have the shape of k"),
    ("heads", lambda: _qrkv(Hq=3, Hkv=2), {}, ValueError, "query heads (3) must be a multiple of key/value heads (2)"),
    ("head dim", lambda: _with(2, torch.randn(1, 4, 2, 4)), {}, ValueError, "v must have the shape of k"),
    ("dtype", lambda: _with(2, torch.randn(1, 4, 2, 8, dtype=torch.float64)), {}, ValueError, "dtype mismatch"),
    ("int dtype", lambda: _with(0, torch.ones(1, 4, 2, 8, dtype=torch.int32)), {}, ValueError, "torch.int32"),
    ("window 0", _qrkv, {"window_size": 0}, ValueError, "window_size must be >= 1"),
    ("window acausal", _qrkv, {"window_size": 2, "causal": False}, ValueError, "needs causal=True"),
    ("scale", _qrkv, {"scale": -1.0}, ValueError, "scale must be a finite positive number, got -1.0"),
    ("more queries", lambda: _with(0, torch.randn(1, 6, 2, 8)), {}, ValueError, "r must have the shape of q"),
    ("not a tensor", lambda: _with(2, [1.0]), {}, TypeError, "k must be a torch.Tensor"),
]


@pytest.mark.parametrize("what,make,kwargs,exc,msg", BAD, ids=[b[0] for b in BAD])
@pytest.mark.parametrize("fn", [parallax_attn, parallax_attn_reference], ids=["op", "reference"])
def test_bad_inputs_are_named(fn, what, make, kwargs, exc, msg):
    with pytest.raises(exc) as info:
        fn(*make(), **kwargs)
    assert msg in str(info.value)


def test_causal_more_queries_than_keys_is_rejected():
    q, r = torch.randn(1, 6, 2, 8), torch.randn(1, 6, 2, 8)
    k, v = torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match=r"more queries \(6\) than keys \(4\)"):
        parallax_attn(q, r, k, v)


def test_device_mismatch_is_rejected():
    q, r, k, v = _qrkv()
    with pytest.raises(ValueError, match="device mismatch: q is on cpu but k is on meta"):
        parallax_attn(q, r, k.to("meta"), v)


def test_decode_bad_inputs():
    q, r = torch.randn(2, 1, 2, 8), torch.randn(2, 1, 2, 8)
    k, v = torch.randn(2, 5, 2, 8), torch.randn(2, 5, 2, 8)
    with pytest.raises(ValueError, match=r"cache_seqlens must lie in \[1, 5\], got \[6\]"):
        parallax_decode(q, r, k, v, cache_seqlens=torch.tensor([3, 6], dtype=torch.int32))
    with pytest.raises(ValueError, match="one token per sequence"):
        parallax_decode(torch.randn(2, 2, 2, 8), torch.randn(2, 2, 2, 8), k, v)
    with pytest.raises(ValueError, match=r"cache_seqlens must be an int32 tensor of shape \(2,\)"):
        parallax_decode(q, r, k, v, cache_seqlens=torch.tensor([3], dtype=torch.int32))


def test_lla_ridge_must_be_positive():
    q, _, k, v = _qrkv()
    with pytest.raises(ValueError, match="ridge must be a positive number"):
        lla_attn_reference(q, k, v, ridge=0.0)


@pytest.mark.parametrize("window", [None, 3])
def test_a_nan_query_gives_nan_in_the_references_as_in_the_kernel(window, poison):
    """The oracles once zeroed NaN attention weights (nan_to_num), so a NaN query gave a finite row where
    the kernel gives NaN; only rows that see no key at all may have zero weights."""
    q, r, k, v = _qrkv(T=9)
    q[0, 4, 1, 2] = float("nan")
    got = parallax_attn(q, r, k, v, window_size=window)
    for name, want in (
        ("parallax", parallax_attn_reference(q, r, k, v, window_size=window)),
        ("softmax", softmax_attn_reference(q, k, v, window_size=window)),
    ):
        assert torch.isnan(want[0, 4, 1]).all(), name
        assert torch.isnan(want).any(-1).sum() == 1, f"{name}: NaN beyond the row of the NaN query"
    assert torch.equal(torch.isnan(got), torch.isnan(parallax_attn_reference(q, r, k, v, window_size=window)))


def test_decode_lengths_are_checked_by_default_wherever_they_live():
    """A CUDA tensor of lengths was checked only on request, so 0 or L_max + 1 gave NaN rows silently; the
    default is now the check (check_lengths=False is the opt-out, for CUDA-graph capture)."""
    import inspect

    for op in (parallax_decode, softmax_decode, parallax_decode_reference):
        assert inspect.signature(op).parameters["check_lengths"].default is True, op.__name__


def test_host_reads_are_refused_by_name_under_capture(monkeypatch):
    """Under CUDA-graph capture a host read fails inside CUDA; both ops that would read (packed offsets without
    max_seqlen, checked decode lengths) refuse first through the one check in _checks, naming the fix."""
    from parallax_kernels import _checks

    monkeypatch.setattr(_checks, "capturing", lambda t: True)  # as if every tensor were being captured
    q, r, k, v = (x.double() for x in _qrkv(T=10))
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="being captured; pass max_seqlen"):
        parallax_attn(q, r, k, v, cu_seqlens=cu)
    parallax_attn(q, r, k, v, cu_seqlens=cu, max_seqlen=6)  # nothing to read: allowed
    lens = torch.tensor([3], dtype=torch.int32)
    for decode in (
        lambda: parallax_decode(q[:, :1], r[:, :1], k, v, cache_seqlens=lens),
        lambda: softmax_decode(q[:, :1], k, v, cache_seqlens=lens),
    ):
        with pytest.raises(RuntimeError, match="being captured; pass check_lengths=False"):
            decode()
    parallax_decode(q[:, :1], r[:, :1], k, v, cache_seqlens=lens, check_lengths=False)


@pytest.mark.parametrize("fn", [parallax_attn, parallax_attn_reference], ids=["op", "reference"])
def test_packed_q_and_k_must_have_one_length(fn):
    q, r, k, v = _qrkv(T=8)
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"q and k must have the same packed length, got 8 and 9"):
        fn(q, r, torch.cat([k, k[:, :1]], 1), torch.cat([v, v[:, :1]], 1), cu_seqlens=cu)
