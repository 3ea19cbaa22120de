"""The Triton Parallax decode kernel (split-KV) against the PyTorch reference.

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
from parallax_kernels.parallax.triton_decode import DecodeConfig, choose_num_splits, parallax_decode_triton
from tests.helpers import assert_close_rel

# fp16 inputs against the fp32-math reference: the kernel rounds p and p*t to fp16 for the P·V dots
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
    want = parallax_decode_reference(q.float(), r.float(), k.float(), v.float(), lens, window_size=window)
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
    want = parallax_decode_reference(q, r, k, v, lens, scale=0.3)
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
        want = parallax_decode_reference(q[1:2], r[1:2], k[1:2], v[1:2], lens[1:2])
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


def test_common_inputs_take_the_short_check():
    """Valid everyday inputs skip the full validation (a decode loop pays it per layer and token);
    anything else goes through it (the cases above prove that it then names the problem)."""
    from parallax_kernels.parallax.decode import _plainly_valid

    assert _plainly_valid(*_good())
    k = torch.randn(2, 8, 4, 16)[:, :, ::2]  # a strided cache view is still common
    assert _plainly_valid(*_good()[:2], k, k)
    assert not _plainly_valid(*[x.double() for x in _good()])  # fp64 runs the reference, full checks
    assert not _plainly_valid(*_good()[:3], torch.nn.Parameter(torch.randn(2, 8, 2, 16)))


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
            values = dict(SEQLENS="*i32", O=ptr, PO1="*fp32", PO2="*fp32", PSTAT="*fp32", L_max=L, window=0,
                          num_splits=7, n_rows=H_kv * G * 7, stride_ob=H_kv * G * D, stride_oh=D, H_Q=H_kv * G, D=D,
                          BLOCK_N=plan.block_n, BLOCK_S=8, BLOCK_DC=plan.block_d)  # fmt: skip
            warps, stages = 4, 1
        else:
            fn = td._decode_split_vec_kernel if kind == "vec" else td._decode_split_dot_kernel
            values = dict(Q=ptr, R=ptr, K=ptr, V=ptr, SEQLENS="*i32", O=ptr, PO1="*fp32", PO2="*fp32", PSTAT="*fp32",
                          scale_log2=0.1, L_max=L, window=0, num_splits=4, n_rows=64, stride_qb=H_kv * G * D,
                          stride_qh=D, stride_rb=H_kv * G * D, stride_rh=D, stride_kb=L * H_kv * D,
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
