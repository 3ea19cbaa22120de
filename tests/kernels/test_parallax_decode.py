"""The Triton Parallax decode kernel (split-KV) against the float64 einsum oracle and the PyTorch reference.

On CPU machines the kernels run under the Triton interpreter (fp32 and fp16; bf16 and speed are
checked on the GPU by benchmarks/bench_decode.py). Shapes are small, blocks are >= 16, and the
split count is forced where a case must exercise the exact merge of several slices.
"""

from __future__ import annotations

import pytest
import torch

from parallax_kernels import (
    parallax_attn,
    parallax_attn_reference,
    parallax_decode,
    parallax_decode_reference,
    softmax_decode,
)
from parallax_kernels._dispatch import backend_for
from parallax_kernels.parallax.oracle import parallax_decode_einsum
from parallax_kernels.parallax.triton_decode import DecodeConfig, choose_num_splits, parallax_decode_triton
from tests.helpers import assert_close_rel

# fp16 inputs against the exact oracle: the kernel rounds p and p*t to fp16 for the P·V dots
TOL = {torch.float32: 2e-5, torch.float16: 3e-3}


def _inputs(B, L, Hq, Hkv, D, dtype, lens=None, stale=float("nan")):
    """q, r, caches and per-sequence lengths (1 and L among them); cache rows past a sequence's
    length hold `stale` (NaN by default), so a kernel that reads them fails."""
    q = torch.randn(B, 1, Hq, D)
    r = torch.randn(B, 1, Hq, D) * D**-0.5  # keeps t = r·k of order 1, as RMS-normed probes do
    k, v = torch.randn(B, L, Hkv, D), torch.randn(B, L, Hkv, D)
    if lens is None:
        lens = torch.randint(1, L + 1, (B,))
        lens[0], lens[-1] = 1, L
    lens = lens.to(torch.int32)
    for b, n in enumerate(lens.tolist()):
        k[b, n:], v[b, n:] = stale, stale
    return (*(x.to(dtype) for x in (q, r, k, v)), lens)


def _check(got, q, r, k, v, lens, window=None, what="output"):
    """Against the float64 einsum oracle (test_oracle.py ties parallax_decode_reference to it)."""
    want = parallax_decode_einsum(q, r, k, v, lens, window_size=window)
    assert got.dtype == q.dtype and got.shape == q.shape
    assert_close_rel(got, want, TOL[q.dtype], what)


# (B, L_max, H_q, H_kv, D, dtype, window, config)
CASES = [
    ("mha-vec-splits", 3, 72, 2, 2, 64, torch.float32, None, DecodeConfig(3, block_n=16, use_dot=False)),
    ("mha-dot-splits", 3, 72, 2, 2, 64, torch.float32, None, DecodeConfig(num_splits=3, block_n=16, use_dot=True)),
    ("gqa8-d64", 2, 40, 8, 1, 64, torch.float32, None, DecodeConfig(num_splits=2, block_n=16)),
    ("gqa4-d128-fp16-window", 3, 64, 8, 2, 128, torch.float16, 20, DecodeConfig(num_splits=2, block_n=16)),
    ("mha-d128-fp16-vec-single", 2, 48, 2, 2, 128, torch.float16, None, DecodeConfig(1, block_n=32, use_dot=False)),
    ("mha-d64-fp16-dot-single", 2, 48, 2, 2, 64, torch.float16, None, DecodeConfig(1, block_n=16)),
    ("mha-d128-window-heuristic", 3, 80, 1, 1, 128, torch.float32, 9, None),
    ("gqa2-d96-unpadded", 2, 40, 4, 2, 96, torch.float32, 17, DecodeConfig(num_splits=3, block_n=16)),
    ("mha-d48-vec", 2, 40, 2, 2, 48, torch.float16, None, DecodeConfig(2, block_n=16, use_dot=False)),
    ("gqa2-d8", 2, 40, 4, 2, 8, torch.float32, None, DecodeConfig(2, block_n=16)),
    ("tma-gqa4-window", 3, 70, 8, 2, 64, torch.float32, 23, DecodeConfig(3, block_n=16, use_tma=True)),
    ("tma-d96-fp16-single", 2, 50, 2, 2, 96, torch.float16, None, DecodeConfig(1, block_n=16, use_tma=True)),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_matches_reference(case, poison):
    _, B, L, Hq, Hkv, D, dtype, window, config = case
    q, r, k, v, lens = _inputs(B, L, Hq, Hkv, D, dtype)
    got = parallax_decode_triton(q, r, k, v, lens, None, window, config)
    _check(got, q, r, k, v, lens, window)


def test_public_op_runs_the_kernel_and_handles_a_full_cache(poison):
    q, r, k, v, _ = _inputs(2, 40, 4, 2, 64, torch.float32, lens=torch.tensor([40, 40]))
    assert backend_for(q) == "triton"  # conftest turns the interpreter on where there is no GPU
    _check(parallax_decode(q, r, k, v), q, r, k, v, None)
    _check(parallax_decode(q, r, k, v, window_size=7), q, r, k, v, None, window=7)


def test_scale_and_short_sequences_in_many_slices(poison):
    """More slices than a short sequence has tiles: the empty slices must be ignored by the merge."""
    q, r, k, v, lens = _inputs(3, 96, 2, 1, 32, torch.float32, lens=torch.tensor([1, 17, 96]))
    got = parallax_decode_triton(q, r, k, v, lens, 0.3, None, DecodeConfig(num_splits=6, block_n=16))
    want = parallax_decode_einsum(q, r, k, v, lens, scale=0.3)
    assert_close_rel(got, want, TOL[torch.float32])


def test_many_slices_merge_in_head_dim_chunks(poison):
    """33 slices: the merge loads 64 slice rows at once and so covers D=128 in two column chunks."""
    q, r, k, v, lens = _inputs(1, 33 * 16, 2, 1, 128, torch.float32, lens=torch.tensor([33 * 16]))
    got = parallax_decode_triton(q, r, k, v, lens, None, None, DecodeConfig(num_splits=33, block_n=16))
    _check(got, q, r, k, v, lens)


def test_strided_cache_is_read_in_place(poison):
    """A cache that is a view (every other head of a larger buffer, padded length) gives the same result."""
    B, L, H, D = 2, 48, 2, 64
    big_k, big_v = torch.randn(B, L + 5, 2 * H, D), torch.randn(B, L + 5, 2 * H, D)
    k, v = big_k[:, :L, ::2], big_v[:, :L, ::2]
    assert not k.is_contiguous()
    q = torch.randn(B, 4, 2 * H, D)[:, 1:2, 1::2]  # a strided q as well
    r = torch.randn(B, 1, H, D) * D**-0.5
    lens = torch.tensor([L, 19], dtype=torch.int32)
    got = parallax_decode(q, r, k, v, cache_seqlens=lens)
    _check(got, q, r, k, v, lens)


def test_probe_zero_is_softmax_decode(poison):
    q, _, k, v, lens = _inputs(3, 40, 4, 2, 64, torch.float32, stale=0.0)
    got = parallax_decode(q, torch.zeros_like(q), k, v, cache_seqlens=lens, window_size=11)
    assert_close_rel(got, softmax_decode(q, k, v, cache_seqlens=lens, window_size=11), 2e-5)


@pytest.mark.parametrize("use_dot", [True, False])
def test_lengths_outside_the_cache_give_nan_on_the_device_path(use_dot, poison):
    """Under CUDA-graph capture the host range check is skipped; the kernel must then neither read
    outside the cache nor return plausible numbers for the bad sequences."""
    q, r, k, v, _ = _inputs(3, 32, 2, 2, 32, torch.float32, stale=0.0)
    lens = torch.tensor([0, 20, 33], dtype=torch.int32)
    for splits in (1, 2):
        cfg = DecodeConfig(num_splits=splits, block_n=16, use_dot=use_dot)
        got = parallax_decode_triton(q, r, k, v, lens, None, None, cfg)
        assert torch.isnan(got[0]).all() and torch.isnan(got[2]).all()
        want = parallax_decode_einsum(q[1:2], r[1:2], k[1:2], v[1:2], lens[1:2])
        assert_close_rel(got[1:2], want, TOL[torch.float32])


@pytest.mark.parametrize("window", [None, 6])
def test_prefill_then_decode_equals_one_full_forward(window, poison):
    """Prefill P tokens with parallax_attn, one chunk of C more tokens against the cache (queries
    end-aligned), then decode token by token into a cache with room to spare: every row equals the
    full causal forward over all T tokens."""
    B, T, P, C, Hq, Hkv, D = 2, 20, 8, 4, 4, 2, 32
    L_max = T + 3
    q, r = torch.randn(B, T, Hq, D), torch.randn(B, T, Hq, D) * D**-0.5
    k, v = torch.randn(B, T, Hkv, D), torch.randn(B, T, Hkv, D)
    full = parallax_attn_reference(q, r, k, v, window_size=window)

    k_cache = torch.full((B, L_max, Hkv, D), float("nan"))
    v_cache = torch.full((B, L_max, Hkv, D), float("nan"))
    k_cache[:, :P], v_cache[:, :P] = k[:, :P], v[:, :P]
    rows = [parallax_attn(q[:, :P], r[:, :P], k_cache[:, :P], v_cache[:, :P], window_size=window)]
    k_cache[:, P : P + C], v_cache[:, P : P + C] = k[:, P : P + C], v[:, P : P + C]
    s = slice(P, P + C)
    rows.append(parallax_attn(q[:, s], r[:, s], k_cache[:, : P + C], v_cache[:, : P + C], window_size=window))
    for t in range(P + C, T):
        k_cache[:, t], v_cache[:, t] = k[:, t], v[:, t]
        lens = torch.full((B,), t + 1, dtype=torch.int32)
        rows.append(parallax_decode(q[:, t : t + 1], r[:, t : t + 1], k_cache, v_cache, lens, window_size=window))
    got = torch.cat(rows, dim=1)
    for t in range(T):
        assert_close_rel(got[:, t], full[:, t], TOL[torch.float32], f"row {t}")


def test_split_heuristic():
    sms = 132
    # batch 1 with 8 heads: about one program per SM, never fewer than 2 tiles a slice
    assert choose_num_splits(programs=8, n_tiles=64, sms=sms) == 16
    assert choose_num_splits(programs=8, n_tiles=256, sms=sms) == 16
    assert choose_num_splits(programs=8, n_tiles=20, sms=sms) == 10
    # a batch that fills the SMs once runs one slice (no merge kernel)
    assert choose_num_splits(programs=32 * 8, n_tiles=256, sms=sms) == 1
    assert choose_num_splits(programs=132, n_tiles=256, sms=sms) == 1
    assert choose_num_splits(programs=64, n_tiles=256, sms=sms) == 3
    assert choose_num_splits(programs=1024, n_tiles=1, sms=sms) == 1
    # no empty slice on a full cache: the last slice owns at least one tile
    for programs in (1, 3, 8, 40, 300):
        for n_tiles in (1, 2, 5, 63, 64, 65, 257, 1000):
            s = choose_num_splits(programs, n_tiles, sms)
            per = -(-n_tiles // s)
            assert 1 <= s <= n_tiles and (s - 1) * per < n_tiles


# --- bad input gets a clear error, before any work ---


def _good(B=2, L=8, Hq=4, Hkv=2, D=16):
    return [torch.randn(B, 1, Hq, D), torch.randn(B, 1, Hq, D), torch.randn(B, L, Hkv, D), torch.randn(B, L, Hkv, D)]


def _replace(i, x, **kw):
    args = _good(**kw)
    args[i] = x
    return args


LENS = torch.tensor([3, 8], dtype=torch.int32)
BAD = [
    ("v shape", lambda: _replace(3, torch.randn(2, 9, 2, 16)), {}, ValueError, "v must have the shape of k"),
    ("r shape", lambda: _replace(1, torch.randn(2, 1, 2, 16)), {}, ValueError, "r must have the shape of q"),
    ("head dim of k", lambda: [*_good(D=32)[:2], *_good(D=16)[2:]], {}, ValueError,
     "head_dim mismatch: q has head_dim 32, k has head_dim 16"),
    ("batch", lambda: _replace(0, torch.randn(3, 1, 4, 16)), {}, ValueError, "r must have the shape of q"),
    ("heads", lambda: _good(Hq=3, Hkv=2), {}, ValueError, "query heads (3) must be a multiple of key/value heads (2)"),
    ("two tokens", lambda: [torch.randn(2, 2, 4, 16), torch.randn(2, 2, 4, 16), *_good()[2:]], {}, ValueError,
     "q must hold one token per sequence"),
    ("dtype mix", lambda: _replace(2, torch.randn(2, 8, 2, 16, dtype=torch.float16)), {}, ValueError,
     "dtype mismatch: q is torch.float32 but k is torch.float16"),
    ("int q", lambda: _replace(0, torch.ones(2, 1, 4, 16, dtype=torch.int32)), {}, ValueError, "q has dtype torch.int32"),
    ("length beyond cache", _good, {"cache_seqlens": torch.tensor([3, 9], dtype=torch.int32)}, ValueError,
     "cache_seqlens must lie in [1, 8], got [9]"),
    ("length zero", _good, {"cache_seqlens": torch.tensor([0, 8], dtype=torch.int32)}, ValueError,
     "cache_seqlens must lie in [1, 8], got [0]"),
    ("lens dtype", _good, {"cache_seqlens": torch.tensor([3.0, 8.0])}, ValueError,
     "cache_seqlens must be an int32 tensor of shape (2,), got dtype torch.float32"),
    ("lens shape", _good, {"cache_seqlens": LENS[:1]}, ValueError, "cache_seqlens must be an int32 tensor of shape (2,)"),
    ("lens type", _good, {"cache_seqlens": [3, 8]}, TypeError, "cache_seqlens must be a torch.Tensor or None, got list"),
    ("lens device", _good, {"cache_seqlens": LENS.to("meta")}, ValueError, "cache_seqlens is on meta but q is on cpu"),
    ("window", _good, {"window_size": 0}, ValueError, "window_size must be >= 1"),
    ("scale", _good, {"scale": float("nan")}, ValueError, "scale must be a finite positive number"),
    ("cache stride", lambda: _replace(2, torch.randn(2, 8, 2, 32)[..., ::2]), {}, ValueError,
     "k_cache must have unit stride along head_dim"),
]  # fmt: skip


@pytest.mark.parametrize("what,make,kwargs,exc,msg", BAD, ids=[b[0] for b in BAD])
def test_bad_inputs_are_named(what, make, kwargs, exc, msg):
    with pytest.raises(exc) as info:
        parallax_decode(*make(), **kwargs)
    assert msg in str(info.value)


@pytest.mark.parametrize("kwargs", [{}, {"check_lengths": True}], ids=["default", "check_lengths=True"])
def test_host_length_check_names_the_bad_lengths(kwargs):
    """Lengths are checked by default, wherever they live (for a CUDA tensor that is a sync)."""
    with pytest.raises(ValueError, match=r"cache_seqlens must lie in \[1, 8\], got \[0, 9, -2\]"):
        parallax_decode(*_good(B=4), torch.tensor([0, 9, 8, -2], dtype=torch.int32), **kwargs)


@pytest.mark.parametrize("backend", ["kernel", "reference", "softmax"])
@pytest.mark.parametrize("flag", [None, 0, "no"])
def test_check_lengths_takes_only_a_bool(backend, flag):
    """None was the old default (check CPU lengths only): passed now it must not quietly mean 'no check'."""
    run = _BACKENDS[backend]
    with pytest.raises(TypeError, match=f"check_lengths must be True or False, got {flag!r}"):
        run(*_same_inputs([0, 7]), check_lengths=flag)


def test_unchecked_lengths_outside_the_cache_give_nan_rows(poison):
    """check_lengths=False (CUDA-graph capture) skips the host read: the bad rows come back NaN
    (nothing outside the cache is read: its stale rows are NaN too), the rest exact."""
    q, r, k, v, _ = _inputs(3, 32, 2, 2, 32, torch.float32, lens=torch.tensor([32, 20, 32]))
    lens = torch.tensor([33, 20, 0], dtype=torch.int32)
    got = parallax_decode(q, r, k, v, cache_seqlens=lens, check_lengths=False)
    assert torch.isnan(got[0]).all() and torch.isnan(got[2]).all()
    _check(got[1:2], q[1:2], r[1:2], k[1:2], v[1:2], lens[1:2])


# Every decode backend on the same inputs: the kernel (fp32, interpreted here), parallax_decode's reference path
# (float64 inputs), the reference itself and softmax_decode (r = 0).
_BACKENDS = {
    "kernel": lambda q, r, k, v, lens, **kw: parallax_decode(q, r, k, v, lens, **kw),
    "op on the reference": lambda q, r, k, v, lens, **kw: parallax_decode(*_f64(q, r, k, v), lens, **kw).float(),
    "reference": lambda q, r, k, v, lens, **kw: parallax_decode_reference(q, r, k, v, lens, **kw),
    "softmax": lambda q, r, k, v, lens, **kw: softmax_decode(q, k, v, lens, **kw),
}


def _f64(*xs):
    return [x.double() for x in xs]


def _same_inputs(lens, L=24):
    q, r, k, v, _ = _inputs(len(lens), L, 4, 2, 16, torch.float32, lens=torch.tensor([L] * len(lens)))
    return q, r, k, v, torch.tensor(lens, dtype=torch.int32)


@pytest.mark.parametrize("backend", _BACKENDS, ids=list(_BACKENDS))
def test_one_length_rule_for_every_backend(backend, poison):
    """Lengths outside [1, L_max] (0, negative, past the cache, far past it) are a named ValueError by
    default and NaN rows with check_lengths=False, on every backend alike; the good rows agree."""
    run = _BACKENDS[backend]
    q, r, k, v, lens = _same_inputs([0, 7, -3, 25, 24, 2**31 - 1])
    with pytest.raises(ValueError, match=r"cache_seqlens must lie in \[1, 24\], got \[0, -3, 25, 2147483647\]"):
        run(q, r, k, v, lens)
    got = run(q, r, k, v, lens, check_lengths=False)
    bad = torch.tensor([True, False, True, True, False, True])
    assert torch.isnan(got[bad]).all(), "a length outside the cache must give a NaN row"
    r_used = torch.zeros_like(r) if backend == "softmax" else r
    for b in (1, 4):
        n = int(lens[b])
        want = parallax_attn_reference(q[b : b + 1], r_used[b : b + 1], k[b : b + 1, :n], v[b : b + 1, :n])
        assert_close_rel(got[b : b + 1], want, 2e-5, f"sequence {b}")


@pytest.mark.parametrize("backend", _BACKENDS, ids=list(_BACKENDS))
def test_nan_inputs_give_nan_on_every_backend(backend, poison):
    """A NaN in a query (or a probe) gives NaN in that head's row on every backend: the reference must not
    hide it (it once zeroed NaN weights, so its output was finite where the kernel's was NaN)."""
    run = _BACKENDS[backend]
    q, r, k, v, lens = _same_inputs([24, 9, 5])
    q[0, 0, 1, 3] = float("nan")
    r[1, 0, 2, 0] = float("nan")
    got = run(q, r, k, v, lens)
    assert torch.isnan(got[0, 0, 1]).all()
    if backend != "softmax":  # r is not an input there
        assert torch.isnan(got[1, 0, 2]).all()
    nan_rows = torch.isnan(got).any(-1)
    assert nan_rows.sum() == (1 if backend == "softmax" else 2), "NaN spread beyond the rows it belongs to"


def test_checks_run_once_per_call_signature(monkeypatch):
    """A decode loop pays the full checks on its first step only; any change of shape, stride, dtype,
    scale, window or lengths' dtype is a new signature and is checked again."""
    from parallax_kernels.parallax import decode

    calls = []
    full_checks = decode.check_decode_inputs
    monkeypatch.setattr(decode, "check_decode_inputs", lambda *a: calls.append(1) or full_checks(*a))
    monkeypatch.setattr(decode, "_PLANS", {})
    q, r, k, v, lens = _inputs(2, 40, 4, 2, 64, torch.float32, stale=0.0)
    for _ in range(3):
        parallax_decode(q, r, k, v, cache_seqlens=lens, scale=0.2)
    parallax_decode(q.clone(), r.clone(), k.clone(), v.clone(), cache_seqlens=lens.clone(), scale=0.2)
    assert len(calls) == 1
    variants = [
        (q, r, k, v, lens, 0.3, None), (q, r, k, v, lens, 0.2, 9), (q, r, k, v, lens.long(), 0.2, None),
        (q, r, k, v, None, 0.2, None), (q, r, k[:, :32], v[:, :32], None, 0.2, None),
        (q.half(), r.half(), k.half(), v.half(), lens, 0.2, None),
    ]  # fmt: skip
    for i, (*tensors, lengths, scale, window) in enumerate(variants, start=2):
        parallax_decode(*tensors, cache_seqlens=lengths, scale=scale, window_size=window)
        assert len(calls) == i
    with pytest.raises(ValueError, match="r must have the shape of q"):  # after good calls, still named
        parallax_decode(q, r[:, :, :2], k, v, cache_seqlens=lens)


def test_launch_plan_is_cached_per_signature():
    from parallax_kernels.parallax import triton_decode as td
    from parallax_kernels.parallax.decode import call_key

    q, r, k, v, lens = _inputs(2, 40, 4, 2, 64, torch.float32)
    plan = td.launch_plan(q, r, k, v, lens, None, None)
    assert td.launch_plan(q.clone(), r.clone(), k.clone(), v.clone(), lens.clone(), None, None) is plan
    assert td.launch_plan(q, r, k, v, lens, None, None, DecodeConfig(num_splits=2)) is not plan
    assert td.launch_plan(q[:1], r[:1], k[:1], v[:1], lens[:1], None, None) is not plan
    assert td.launch_plan(q, r, k[:, :32], v[:, :32], lens, None, None) is not plan
    assert td.launch_plan(q, r, k, v, None, None, None) is not plan
    assert td.launch_plan(q, r, k, v, lens, None, 5) is not plan
    # a view that is not 16-byte aligned gets its own plan (which always launches through the JIT:
    # test_direct_launch_passes_what_the_jit_passes)
    k_off = torch.randn(k.numel() + 1)[1:].view(k.shape)
    assert call_key(q, r, k, v, lens, None, None)[-1] and not call_key(q, r, k_off, v, lens, None, None)[-1]
    assert td.launch_plan(q, r, k_off, v, lens, None, None) is not plan


def test_launch_plan_is_the_plan_parallax_decode_launches(monkeypatch):
    """One plan cache: launch_plan hands back the plan the public op filed and launches (the
    benchmark checks that plan's direct launch), and files nothing beside it."""
    from parallax_kernels.parallax import decode
    from parallax_kernels.parallax import triton_decode as td

    monkeypatch.setattr(decode, "_PLANS", {})
    q, r, k, v, lens = _inputs(2, 40, 4, 2, 64, torch.float32)
    parallax_decode(q, r, k, v, cache_seqlens=lens)
    plan = td.launch_plan(q, r, k, v, lens, None, None)
    assert list(decode._PLANS) == [decode.call_key(q, r, k, v, lens, None, None)]
    assert decode._PLANS[decode.call_key(q, r, k, v, lens, None, None)] is plan


def test_call_key_leaves_unusual_inputs_to_the_full_checks():
    from parallax_kernels.parallax.decode import call_key

    good = _good()
    assert call_key(*good, None, None, None) is not None
    assert call_key(*good, LENS, 0.5, 3) is not None
    assert call_key(*good[:3], torch.nn.Parameter(good[3]), None, None, None) is None
    assert call_key(*good[:3], good[3].to_sparse(), None, None, None) is None
    assert call_key(*good, [3, 8], None, None) is None
    assert call_key(*good, None, torch.tensor(0.5), None) is None
    assert call_key(*good, None, None, True) is None  # a bool window is refused by name, not taken as 1


# --- the GPU compiler accepts what the interpreter ran ---

# (kernel, dtype, head_dim, group, config, split, lengths, window): the default launch of each path
AOT_VARIANTS = [
    ("dot", "bf16", 128, 8, True, True, True),
    ("dot", "fp16", 256, 1, False, False, False),
    ("vec", "bf16", 128, 1, True, False, True),
    ("combine", "bf16", 96, 4, True, True, False),
    ("tma", "bf16", 128, 4, True, True, False),
]


def _aot_main():  # pragma: no cover - runs in a subprocess without TRITON_INTERPRET
    """Compile the decode kernels for sm_90 with Triton's bundled ptxas and print one JSON line each."""
    import json

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from parallax_kernels.parallax import triton_decode as td

    L, H_kv = 4096, 8
    for kind, dt, D, G, split, lens, window in AOT_VARIANTS:
        plan = td._plan(1 if split else 1024, H_kv * G, H_kv, D, L, None, 132, None)  # the launcher's choices
        assert (plan.num_splits > 1) == split, plan
        ptr = "*" + dt
        if kind == "combine":
            fn = td._decode_combine_kernel
            values = dict(SEQLENS="*i32", O=ptr, WS="*fp32", L_max=L, window=0, num_splits=7, n_rows=H_kv * G * 7, stride_ob=H_kv * G * D, stride_oh=D, H_Q=H_kv * G, D=D,
                          BLOCK_N=plan.block_n, BLOCK_S=8, BLOCK_DC=plan.block_d)  # fmt: skip
            warps, stages = 4, 1
        else:
            fn = td._decode_split_vec_kernel if kind == "vec" else td._decode_split_dot_kernel
            values = dict(Q=ptr, R=ptr, K=ptr, V=ptr, SEQLENS="*i32", O=ptr, WS="*fp32", scale_log2=0.1, L_max=L,
                          window=0, num_splits=4, n_rows=64, stride_qb=H_kv * G * D, stride_qh=D, stride_rb=H_kv * G * D, stride_rh=D, stride_kb=L * H_kv * D,
                          stride_kl=H_kv * D, stride_kh=D, stride_vb=L * H_kv * D, stride_vl=H_kv * D, stride_vh=D,
                          stride_ob=H_kv * G * D, stride_oh=D, H_KV=H_kv, D=D, BLOCK_D=plan.block_d,
                          BLOCK_N=plan.block_n, SINGLE=not split, NUM_STAGES=plan.num_stages)  # fmt: skip
            if kind != "vec":
                values.update(G=G, BLOCK_G=plan.block_g, DOT_PRECISION="tf32", USE_TMA=kind == "tma")
            warps, stages = plan.num_warps, plan.num_stages
        values.update(HAS_SEQLENS=lens, HAS_WINDOW=window)
        signature, constants, attrs = {}, {}, {}
        for i, name in enumerate(fn.arg_names):
            value = values[name]
            if fn.params[i].is_constexpr:
                signature[name], constants[name] = "constexpr", value
            elif isinstance(value, str):  # a pointer: torch allocations are 16-byte aligned
                signature[name], attrs[(i,)] = value, [["tt.divisibility", 16]]
            elif isinstance(value, float):
                signature[name] = "fp32"
            else:
                signature[name] = "i32"
                if value % 16 == 0 and name not in ("L_max", "window"):
                    attrs[(i,)] = [["tt.divisibility", 16]]
        src = ASTSource(fn=fn, signature=signature, constexprs=constants, attrs=attrs)
        compiled = triton.compile(
            src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages}
        )
        print(json.dumps({"variant": [kind, dt, D, G], "shared": compiled.metadata.shared}), flush=True)


def test_kernels_compile_for_hopper():
    """The interpreter accepts programs that the GPU compiler rejects (dots under 16 rows, layout and
    shared-memory limits): compile the default launches for sm_90 with Triton's own ptxas, no GPU needed,
    and check that each fits an H100/H200 SM's 227 KiB of shared memory."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    triton = pytest.importorskip("triton")
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists():
        pytest.skip(f"this Triton wheel has no bundled ptxas ({ptxas})")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = "from tests.kernels.test_parallax_decode import _aot_main; _aot_main()"
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == len(AOT_VARIANTS)
    for line in lines:
        assert 0 < line["shared"] <= 227 * 1024, line


# --- the direct launch hands the compiled kernel exactly what the JIT would ---


def _direct_launch_main():  # pragma: no cover - runs in a subprocess without TRITON_INTERPRET
    """With a stand-in driver and compiled kernels that record their launches (no GPU needed),
    compare the JIT's launch (first call of a plan) with the direct one (later calls), argument by
    argument, and count how often the JIT runs. Prints one JSON line."""
    import json

    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget

    from parallax_kernels.parallax import decode
    from parallax_kernels.parallax import triton_decode as td

    class Driver:
        def get_current_device(self):
            return 0

        def get_current_stream(self, device):
            return 1234

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

    launches, jit_runs = [], []

    class Kernel:  # the parts of a CompiledKernel that a launch touches
        function, packed_metadata = 77, ("packed",)

        def __init__(self, name):
            self.name = name

        def launch_metadata(self, grid, stream, *args):
            return None

        def run(self, *args):
            launches.append((self.name, args))

    triton.runtime.driver.set_active(Driver())
    kernels = [td._decode_split_dot_kernel, td._decode_split_vec_kernel, td._decode_combine_kernel]
    for fn in kernels:

        def compile_(key, signature, device, constexprs, options, attrs, warmup, fn=fn):
            fn.device_caches[device][0][key] = kernel = Kernel(fn.__name__)
            return kernel

        def run(*args, fn=fn, jit_run=fn.run, **kwargs):
            jit_runs.append(fn.__name__)
            return jit_run(*args, **kwargs)

        fn._do_compile, fn.run = compile_, run
    decode.backend_for = lambda t: "triton"
    td.sm_count = lambda device: 132

    def same(a, b):
        if isinstance(a, torch.Tensor):
            return isinstance(b, torch.Tensor) and (a.shape, a.stride(), a.dtype) == (b.shape, b.stride(), b.dtype)
        return type(a) is type(b) and a == b

    def compare(first, second):
        """first: the JIT's launch; second: the direct one."""
        (name1, a1), (name2, a2) = first, second
        assert name1 == name2 and a1[:6] == a2[:6], (a1[:6], a2[:6])  # grid, stream, function, metadata
        assert a2[6:9] == (None, None, None)  # no launch metadata, no hooks
        assert len(a1) == len(a2) and all(same(x, y) for x, y in zip(a1[9:], a2[9:], strict=True))

    q = torch.randn(1, 1, 8, 128, dtype=torch.bfloat16)
    r = torch.randn(1, 1, 8, 128, dtype=torch.bfloat16)
    k, v = torch.randn(1, 4096, 2, 128, dtype=torch.bfloat16), torch.randn(1, 4096, 2, 128, dtype=torch.bfloat16)
    lens = torch.tensor([3000], dtype=torch.int32)
    big = [torch.randn(256, 1, 8, 64), torch.randn(256, 1, 8, 64), torch.randn(256, 64, 8, 64)]
    cases = {  # name: (call, inputs passed in place, launches per call)
        "dot gqa, lengths, window, sliced": (lambda: decode.parallax_decode(q, r, k, v, lens, None, 1000), 2),
        "vec, sliced": (
            lambda: td.parallax_decode_triton(q, r, k[:, :, :1], v[:, :, :1], None, 0.1, None, td.DecodeConfig(use_dot=False)),
            2,
        ),
        "one slice, fp32": (lambda: decode.parallax_decode(*big[:2], big[2], big[2]), 1),
    }  # fmt: skip
    report = {}
    for name, (call, per_call) in cases.items():
        launches.clear(), jit_runs.clear()
        call(), call(), call()
        assert len(launches) == 3 * per_call and len(jit_runs) == per_call, (name, len(launches), jit_runs)
        for i in range(per_call):
            compare(launches[i], launches[per_call + i])
            compare(launches[i], launches[2 * per_call + i])
        report[name] = "ok"
    # the caller's tensors are passed in place, in the signature's order
    launches.clear()
    decode.parallax_decode(q, r, k, v, lens, None, 1000)
    assert all(a is b for a, b in zip(launches[0][1][9:14], (q, r, k, v, lens), strict=True))
    # a launch hook (a profiler) sends every launch through the JIT, which calls the hooks
    hook = lambda metadata: None  # noqa: E731
    knobs.runtime.launch_enter_hook.add(hook)
    try:
        jit_runs.clear()
        decode.parallax_decode(q, r, k, v, lens, None, 1000)
        report["hook"] = len(jit_runs)
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    # pointers off 16-byte alignment: the JIT every time (its kernel is specialized on alignment)
    k_off = torch.randn(k.numel() + 8, dtype=torch.bfloat16)[1 : k.numel() + 1].view(k.shape)
    jit_runs.clear()
    for _ in range(3):
        decode.parallax_decode(q, r, k_off, v, lens, None, 1000)
    report["misaligned"] = len(jit_runs)
    print(json.dumps(report), flush=True)


def test_direct_launch_passes_what_the_jit_passes():
    """After the first call of a plan, launches skip the JIT and call the compiled kernel's launcher
    directly; this checks on the CPU (a stand-in driver, kernels that record their launches) that
    the grid, stream and every argument match what the JIT passed, in order, that the JIT runs once
    per plan, and that a launch hook or a misaligned pointer sends every launch back through it."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = "from tests.kernels.test_parallax_decode import _direct_launch_main; _direct_launch_main()"
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report == {
        "dot gqa, lengths, window, sliced": "ok",
        "vec, sliced": "ok",
        "one slice, fp32": "ok",
        "hook": 2,
        "misaligned": 6,
    }
