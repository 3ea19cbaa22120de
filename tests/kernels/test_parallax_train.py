"""The Parallax Triton training kernels against the einsum oracle and the reference: output and all four gradients.

On CPU the kernels run under the Triton interpreter (fp32 and fp16; bf16 is broken there and is checked on
the GPU by benchmarks/bench_train.py and the `gpu` tests below). Every output and gradient the kernels
return is NaN-poisoned before they run (the `poison` fixture), so an element they forget to write fails.
Shapes are tiny but awkward: interpreted cost grows with the number of programs and tiles.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton", reason="the training kernels need triton (the kernels extra)")

from parallax_kernels import parallax_attn, parallax_attn_reference, parallax_weights  # noqa: E402
from parallax_kernels.parallax import op as parallax_op  # noqa: E402
from parallax_kernels.parallax.oracle import parallax_attn_einsum  # noqa: E402
from parallax_kernels.parallax.triton_train import (  # noqa: E402
    KernelConfig,
    default_configs,
    parallax_bwd_triton,
    parallax_fwd_triton,
)
from tests.helpers import KERNEL_DEVICE as DEVICE  # noqa: E402
from tests.helpers import assert_close_rel, needs_triton_kernels  # noqa: E402

pytestmark = needs_triton_kernels()
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 1.5e-2}


def _inputs(B, Tq, Tk, Hq, Hkv, D, dtype, r_scale=0.3):
    """Fresh random q, r, k, v (requiring grad) and an output gradient. r is scaled so the correction
    term is of the size a trained model gives it (comparable to v̄), not dominating it."""
    mk = lambda *s: torch.randn(*s, device=DEVICE, dtype=torch.float32)  # noqa: E731
    q, k, v = mk(B, Tq, Hq, D), mk(B, Tk, Hkv, D), mk(B, Tk, Hkv, D)
    r = r_scale * mk(B, Tq, Hq, D) / D**0.25
    leaves = [x.to(dtype).requires_grad_() for x in (q, r, k, v)]
    return leaves, mk(B, Tq, Hq, D).to(dtype)


def _reference(q, r, k, v, causal, window, offsets=None, scale=None):
    cu = None if offsets is None else torch.tensor(offsets, dtype=torch.int32, device=q.device)
    return parallax_attn_reference(q, r, k, v, causal=causal, window_size=window, scale=scale, cu_seqlens=cu)


def _check(got, grads, leaves, do, causal, window, tol, offsets=None, scale=None):
    """Output and gradients against the float64 einsum oracle (test_oracle.py ties the reference to it)."""
    cu = None if offsets is None else torch.tensor(offsets, dtype=torch.int32)
    want = parallax_attn_einsum(*leaves, causal=causal, scale=scale, window_size=window, cu_seqlens=cu)
    want_grads = torch.autograd.grad(want, leaves, do)
    assert_close_rel(got, want, tol, "o")
    for name, g, w in zip(("dq", "dr", "dk", "dv"), grads, want_grads):
        assert g.shape == w.shape and g.dtype == w.dtype, name
        assert_close_rel(g, w, tol, name)


# (B, T_q, T_k, H_q, H_kv, D, causal, window)
SHAPES = {
    "odd T, GQA 4:1, D=24": (1, 77, 77, 4, 1, 24, True, None),
    "T < block": (1, 5, 5, 2, 2, 32, True, None),
    "window 16, D=40": (1, 70, 70, 2, 1, 40, True, 16),
    "window wider than T": (1, 33, 33, 2, 2, 32, True, 50),
    "T_q < T_k (chunked prefill)": (1, 20, 75, 2, 2, 32, True, None),
    "T_q < T_k with window": (1, 21, 75, 2, 1, 32, True, 10),
    "non-causal cross": (2, 33, 50, 2, 1, 32, False, None),
    "non-causal T_q > T_k": (1, 50, 19, 2, 2, 32, False, None),
    "D=64": (1, 45, 45, 2, 2, 64, True, None),
    "D=128": (1, 40, 40, 1, 1, 128, True, None),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_matches_reference(poison, shape, dtype):
    B, Tq, Tk, Hq, Hkv, D, causal, window = shape
    leaves, do = _inputs(B, Tq, Tk, Hq, Hkv, D, dtype)
    o = parallax_attn(*leaves, causal=causal, window_size=window)
    grads = torch.autograd.grad(o, leaves, do)
    _check(o, grads, leaves, do, causal, window, TOL[dtype])


VARLEN = {
    "uneven causal": ([0, 7, 60, 61, 100], True, None),
    "window": ([0, 37, 100], True, 9),
    "non-causal": ([0, 37, 90], False, None),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", VARLEN.values(), ids=VARLEN.keys())
def test_varlen_matches_per_sequence_reference(poison, case, dtype):
    offsets, causal, window = case
    leaves, do = _inputs(1, offsets[-1], offsets[-1], 4, 2, 40, dtype)
    cu = torch.tensor(offsets, dtype=torch.int32, device=DEVICE)
    o = parallax_attn(*leaves, causal=causal, window_size=window, cu_seqlens=cu)
    grads = torch.autograd.grad(o, leaves, do)
    _check(o, grads, leaves, do, causal, window, TOL[dtype], offsets)


def test_varlen_with_max_seqlen_needs_no_offsets_read(poison, monkeypatch):
    """Given max_seqlen, the op must not read the offsets back to the host (a sync on CUDA)."""
    leaves, do = _inputs(1, 50, 50, 2, 2, 32, torch.float32)
    cu = torch.tensor([0, 20, 50], dtype=torch.int32, device=DEVICE)

    def no_tolist(*args, **kwargs):
        raise AssertionError("cu_seqlens was read back to the host")

    with monkeypatch.context() as m:
        m.setattr(torch.Tensor, "tolist", no_tolist)
        o = parallax_attn(*leaves, cu_seqlens=cu, max_seqlen=30)
        grads = torch.autograd.grad(o, leaves, do)
    _check(o, grads, leaves, do, True, None, 1e-5, [0, 20, 50])


# Non-square tiles, as the GPU tables use (query tile != key tile, several tiles per diagonal).
CONFIGS = {
    "fwd 64x32 lazy, dq 32x64, dkv 16x64": (
        KernelConfig(64, 32, lazy_rescale=True),
        KernelConfig(32, 64),
        KernelConfig(16, 64),
    ),
    "fwd 32x64, dq 64x16, dkv 64x32": (KernelConfig(32, 64), KernelConfig(64, 16), KernelConfig(64, 32)),
    # The loop tiles through per-thread pointers instead of TMA descriptors (the path of packed batches,
    # unaligned or strided head dims, and pre-Hopper GPUs).
    "pointer loads, fwd 32x16, dq 16x32, dkv 32x16": (
        KernelConfig(32, 16, tma=False),
        KernelConfig(16, 32, tma=False),
        KernelConfig(32, 16, tma=False),
    ),
}
CONFIG_SHAPES = {
    "GQA causal": (1, 77, 77, 4, 2, 32, True, None, None),
    "window": (1, 77, 77, 2, 1, 24, True, 13, None),
    "T_q < T_k window": (1, 30, 100, 2, 1, 32, True, 20, None),
    "non-causal": (1, 45, 100, 2, 1, 32, False, None, None),
    "varlen window": (1, 100, 100, 2, 1, 40, True, 9, [0, 37, 100]),
}


@pytest.mark.parametrize("configs", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("shape", CONFIG_SHAPES.values(), ids=CONFIG_SHAPES.keys())
def test_tile_configs(poison, shape, configs):
    B, Tq, Tk, Hq, Hkv, D, causal, window, offsets = shape
    fwd, dq, dkv = configs
    leaves, do = _inputs(B, Tq, Tk, Hq, Hkv, D, torch.float32)
    q, r, k, v = (x.detach() for x in leaves)
    cu = None if offsets is None else torch.tensor(offsets, dtype=torch.int32, device=DEVICE)
    max_seqlen = 0 if offsets is None else max(b - a for a, b in itertools.pairwise(offsets))
    scale = D**-0.5
    o, vbar, lse, tbar = parallax_fwd_triton(q, r, k, v, causal, scale, window, cu, max_seqlen, config=fwd)
    grads = parallax_bwd_triton(
        q, r, k, v, o, vbar, lse, tbar, do, causal, scale, window, cu, max_seqlen, dq_config=dq, dkv_config=dkv
    )
    _check(o, grads, leaves, do, causal, window, 1e-5, offsets)


def test_tma_is_used_only_where_descriptors_can_read_the_tiles():
    """A descriptor zero-fills only past the whole tensor and needs a contiguous, 16-byte aligned head dim:
    packed batches, unaligned head dims and strided head dims keep pointer loads."""
    from parallax_kernels.parallax.triton_train import _tma_layouts

    def _tma_ok(tensors, cu_seqlens):
        return _tma_layouts(tensors, cu_seqlens) is not None

    x = torch.randn(1, 8, 2, 32, device=DEVICE)
    cu = torch.tensor([0, 3, 8], dtype=torch.int32, device=DEVICE)
    assert _tma_ok((x, x), None)
    assert not _tma_ok((x, x), cu)
    assert not _tma_ok((x, torch.randn(1, 8, 2, 20, device=DEVICE).half()), None)  # 40-byte rows
    assert not _tma_ok((x, x.transpose(1, 3)), None)  # head dim not contiguous
    assert not _tma_ok((x[..., 1:],), None)  # base not 16-byte aligned
    assert not _tma_ok((torch.ones(1, device=DEVICE).expand(1, 8, 2, 32),), None)  # expanded dO
    assert not _tma_ok((torch.randn(1, 2, 8, 32, device=DEVICE).transpose(1, 2),), None)  # a (B, H, T, D) tensor
    fused = torch.randn(2, 8, 6, 32, device=DEVICE)  # q, r, k, v as views of one projection: padded rows
    assert _tma_ok(fused.split([2, 2, 1, 1], dim=2), None)


@pytest.mark.parametrize("lazy", [False, True], ids=["eager", "lazy"])
def test_saved_statistics_with_growing_logits(poison, lazy):
    """Logits that grow along the sequence push the running max up tile after tile, so the accumulators are
    rescaled mid-stream (lazily: only past 2^8). v̄, lse and t̄ are checked directly, then the gradients."""
    B, T, H, D = 1, 96, 2, 32
    leaves, do = _inputs(B, T, T, H, H, D, torch.float32)
    q, r, k, v = (x.detach() for x in leaves)
    # Late logits reach ~±150: without the mid-stream rescales exp2 would overflow fp32.
    q = 5.0 * q
    k = k * torch.linspace(0.1, 8.0, T, device=DEVICE)[None, :, None, None]
    scale = D**-0.5
    o, vbar, lse, tbar = parallax_fwd_triton(q, r, k, v, True, scale, None, config=KernelConfig(32, 16, 1, 1, lazy))

    p, t = parallax_weights(q, r, k, causal=True)
    s = (scale * q.transpose(1, 2) @ k.transpose(1, 2).transpose(-1, -2)).masked_fill(p == 0, float("-inf"))
    assert_close_rel(lse, torch.logsumexp(s, -1) / math.log(2), 1e-6, "lse (base 2)")
    assert_close_rel(tbar, (p * t).sum(-1), 1e-5, "t̄")
    assert_close_rel(vbar, (p @ v.transpose(1, 2)).transpose(1, 2), 1e-5, "v̄")
    grads = parallax_bwd_triton(q, r, k, v, o, vbar, lse, tbar, do, True, scale, None)
    # Logits of ~150 make the problem ill-conditioned: fp32 rounding of the logits alone moves the gradients
    # by ~150 x 6e-8 relative. So: an fp64 oracle, and a bound scaled to the logit size.
    leaves64 = [x.double().requires_grad_() for x in (q, r, k, v)]
    want = parallax_attn_reference(*leaves64)
    want_grads = torch.autograd.grad(want, leaves64, do.double())
    assert_close_rel(o, want, 1e-5, "o")
    for name, g, w in zip(("dq", "dr", "dk", "dv"), grads, want_grads):
        assert_close_rel(g, w, 1e-4, name)


def test_strided_inputs_and_gradients_are_read_in_place(poison):
    """q, r, k, v as views into one fused projection, a custom scale, and a zero-stride output gradient."""
    B, T, Hq, Hkv, D = 2, 37, 4, 2, 32
    fused = torch.randn(B, T, 2 * Hq + 2 * Hkv, D, device=DEVICE, requires_grad=True)
    q, r, k, v = fused.split([Hq, Hq, Hkv, Hkv], dim=2)
    assert not q.is_contiguous()
    o = parallax_attn(q, 0.3 * r, k, v, scale=0.2)
    (grad,) = torch.autograd.grad(o.sum(), fused)  # o.sum() hands the op an expanded, zero-stride dO
    fused_ref = fused.detach().clone().requires_grad_()
    qr, rr, kr, vr = fused_ref.split([Hq, Hq, Hkv, Hkv], dim=2)
    want = parallax_attn_reference(qr, 0.3 * rr, kr, vr, scale=0.2)
    (grad_ref,) = torch.autograd.grad(want.sum(), fused_ref)
    assert_close_rel(o, want, 1e-5, "o")
    assert_close_rel(grad, grad_ref, 1e-5, "d(fused qrkv)")


def test_probe_zero_is_softmax_attention(poison):
    leaves, _ = _inputs(2, 41, 41, 4, 2, 32, torch.float32)
    q, _, k, v = (x.detach() for x in leaves)
    o = parallax_attn(q, torch.zeros_like(q), k, v, causal=True)
    want = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
    ).transpose(1, 2)
    assert_close_rel(o, want, 1e-5)


def test_inference_forward_skips_statistics(poison):
    """Without grad the forward stores neither v̄ nor the row statistics, and gives the same output."""
    leaves, _ = _inputs(1, 40, 40, 2, 2, 32, torch.float32)
    q, r, k, v = (x.detach() for x in leaves)
    with torch.no_grad():
        o = parallax_attn(q, r, k, v)
    _, vbar, lse, tbar = parallax_fwd_triton(q, r, k, v, True, 32**-0.5, None, save_stats=False)
    assert vbar.numel() == lse.numel() == tbar.numel() == 0
    assert_close_rel(o, parallax_attn_reference(q, r, k, v), 1e-5)


def test_cpu_without_interpreter_runs_the_reference(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)

    def no_kernel(*args, **kwargs):
        raise AssertionError("the Triton op ran on CPU without the interpreter")

    monkeypatch.setattr(parallax_op, "_run_triton", no_kernel)
    q, r, k, v = (torch.randn(1, 9, 2, 16) for _ in range(4))
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    assert_close_rel(parallax_attn(q, r, k, v), parallax_attn_reference(q, r, k, v), 1e-6)
    got = parallax_attn(q, r, k, v, cu_seqlens=cu, max_seqlen=5)
    assert_close_rel(got[:, 4:], parallax_attn_reference(q[:, 4:], r[:, 4:], k[:, 4:], v[:, 4:]), 1e-6)


def test_float64_goes_to_the_reference(monkeypatch):
    """Proven by which path runs: the kernel launcher is a tripwire, the reference is counted."""
    calls = []

    def launched(*args, **kwargs):
        raise AssertionError("float64 reached the Triton kernel")

    reference = parallax_op._reference
    monkeypatch.setattr(parallax_op, "parallax_fwd", launched)
    monkeypatch.setattr(parallax_op, "_reference", lambda *a: calls.append(1) or reference(*a))
    leaves, do = _inputs(1, 9, 9, 2, 1, 8, torch.float64)
    o = parallax_attn(*leaves)
    assert calls == [1]
    grads = torch.autograd.grad(o, leaves, do)
    _check(o, grads, leaves, do, True, None, 1e-12)


def test_opcheck_fake_and_autograd_registration():
    """torch.library.opcheck: schema, fake (meta) implementation, autograd registration, AOT dispatch."""
    leaves, do = _inputs(1, 17, 17, 2, 1, 16, torch.float32)
    args = (*leaves, True, 0.25, 0, None, 0, True)
    torch.library.opcheck(parallax_op.parallax_fwd, args)
    q, r, k, v = (x.detach() for x in leaves)
    o, vbar, lse, tbar = parallax_op.parallax_fwd(q, r, k, v, True, 0.25, 0, None, 0, True)
    torch.library.opcheck(parallax_op.parallax_bwd, (do, q, r, k, v, o, vbar, lse, tbar, True, 0.25, 0, None, 0))


def test_eager_path_equals_the_custom_op(poison):
    """Eager calls bypass the custom-op dispatcher (host time) through an autograd.Function over the same
    launchers: output and all four gradients must be bit-identical to the registered custom op's."""
    leaves, do = _inputs(1, 37, 37, 4, 2, 32, torch.float32)
    scale = 32**-0.5
    o = parallax_attn(*leaves, window_size=20)
    grads = torch.autograd.grad(o, leaves, do)
    o_op = parallax_op.parallax_fwd(*leaves, True, scale, 20, None, 0, True)[0]
    grads_op = torch.autograd.grad(o_op, leaves, do)
    assert torch.equal(o, o_op)
    for name, g, w in zip(("dq", "dr", "dk", "dv"), grads, grads_op):
        assert torch.equal(g, w), name


def test_eager_path_does_not_go_through_the_custom_op(monkeypatch):
    """The eager path must really skip the dispatcher (else its host-time saving is gone)."""

    def dispatched(*args, **kwargs):
        raise AssertionError("eager parallax_attn went through the custom op")

    monkeypatch.setattr(parallax_op, "parallax_fwd", dispatched)
    monkeypatch.setattr(parallax_op, "parallax_bwd", dispatched)
    leaves, do = _inputs(1, 9, 9, 2, 2, 16, torch.float32)
    torch.autograd.grad(parallax_attn(*leaves), leaves, do)
    with torch.no_grad():
        parallax_attn(*leaves)


def test_torch_compile_fullgraph(poison):
    """A compiled block that calls parallax_attn traces into one graph (no break around the op)."""
    B, T, H, D = 1, 24, 2, 16
    proj = torch.nn.Linear(D, 4 * D, device=DEVICE)

    def block(x):
        q, r, k, v = proj(x).split(D, dim=-1)
        return parallax_attn(q, r, k, v, window_size=12).square().mean()

    x = torch.randn(B, T, H, D, device=DEVICE)
    compiled = torch.compile(block, fullgraph=True)
    loss = compiled(x)
    grads = torch.autograd.grad(loss, list(proj.parameters()))
    q, r, k, v = proj(x).split(D, dim=-1)
    want = parallax_attn_reference(q, r, k, v, window_size=12).square().mean()
    want_grads = torch.autograd.grad(want, list(proj.parameters()))
    assert_close_rel(loss, want, 1e-5, "loss")
    for g, w in zip(grads, want_grads):
        assert_close_rel(g, w, 1e-5, "param grad")


# ---------------------------------------------------------------------------------------------- invalid inputs
def _small(**kw):
    return [torch.randn(1, 8, 2, 16, device=DEVICE, **kw) for _ in range(4)]


BAD = [
    ("cu_seqlens float", {"cu_seqlens": torch.tensor([0.0, 8.0])}, ValueError, "1-D int32 tensor"),
    ("cu_seqlens end", {"cu_seqlens": torch.tensor([0, 5], dtype=torch.int32)}, ValueError, "end at the packed"),
    ("cu_seqlens empty seq", {"cu_seqlens": torch.tensor([0, 3, 3, 8], dtype=torch.int32)}, ValueError, "increasing"),
    ("max_seqlen alone", {"max_seqlen": 8}, ValueError, "only meaningful with cu_seqlens"),
    (
        "max_seqlen too long",
        {"cu_seqlens": torch.tensor([0, 8], dtype=torch.int32), "max_seqlen": 9},
        ValueError,
        "max_seqlen must lie in [1, 8]",
    ),
    (
        "max_seqlen float",
        {"cu_seqlens": torch.tensor([0, 8], dtype=torch.int32), "max_seqlen": 4.0},
        TypeError,
        "max_seqlen must be an int",
    ),
    ("window", {"window_size": 0}, ValueError, "window_size must be >= 1"),
    ("scale", {"scale": -1.0}, ValueError, "scale must be a finite positive"),
]


@pytest.mark.parametrize(("kwargs", "exc", "match"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_invalid_inputs_raise_before_launch(kwargs, exc, match, monkeypatch):
    kwargs = {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}

    def no_launch(*args, **kw):
        raise AssertionError("a kernel was launched")

    monkeypatch.setattr(parallax_op, "_run_triton", no_launch)
    with pytest.raises(exc, match=re.escape(match)):
        parallax_attn(*_small(), **kwargs)


def test_varlen_needs_equal_packed_lengths():
    q, r = _small()[:2]
    k, v = (torch.randn(1, 9, 2, 16, device=DEVICE) for _ in range(2))
    with pytest.raises(ValueError, match="same packed length"):
        parallax_attn(q, r, k, v, cu_seqlens=torch.tensor([0, 8], dtype=torch.int32, device=DEVICE))


def test_kernel_config_is_validated():
    with pytest.raises(ValueError, match="power of two >= 16"):
        KernelConfig(24, 32)
    with pytest.raises(ValueError, match="num_warps"):
        KernelConfig(32, 32, num_warps=3)


@pytest.mark.parametrize("head_dim", [32, 64, 96, 128, 160, 256])
def test_every_head_dim_has_configs(head_dim):
    from parallax_kernels.parallax import triton_train as tt

    for table in (tt._HOPPER, tt._OTHER, tt._FP32):
        cfgs = table[tt._dim_class(head_dim)]
        assert all(isinstance(c, KernelConfig) for c in (cfgs.fwd, cfgs.dq, cfgs.dkv))
    assert default_configs(head_dim, torch.float32, torch.device("cpu")).fwd.block_m >= 32


@pytest.mark.slow
@pytest.mark.skipif(not triton.__version__.startswith("3.7"), reason="sm90_spills.py reads Triton 3.7's compiler API")
def test_hopper_table_compiles_and_fits():
    """Cross-compile the Hopper table for sm90 (no GPU needed; Triton's wheel ships ptxas): the entries with the
    largest tiles fit the H100/H200 shared memory (one that does not fails at launch) and spill at most a few
    registers. (The fastest configs measured spill a little; tiles that spill hundreds of bytes were slow.)"""
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "sm90_spills.py"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run(
        [sys.executable, str(script), "--dims", "256,128", "--json"], env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stdout + run.stderr
    reports = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert len(reports) == 6, run.stdout
    for rep in reports:
        assert rep["shared_bytes"] <= 232448, rep  # 227 KiB a block on sm90
        assert rep["spill_stores"] <= 128 and rep["spill_loads"] <= 128, rep  # bytes a thread


# ---------------------------------------------------------------------------------------------- bad offsets
# Guard regions around every tensor hold NaNs with a payload of their own (one per buffer; arithmetic keeps a
# NaN's payload): a read of a guard spreads its NaN, and a write into a guard, of a computed value or of another
# guard's NaN, changes its bits.
_NAN_BITS = {torch.float32: (torch.int32, 0x7FC0D000), torch.float16: (torch.int16, 0x7E00)}


class _Guarded:
    """Tensors cut from the middle of larger buffers whose margins (as large as the tensor) are guards."""

    def __init__(self):
        self.buffers = []

    def empty(self, shape, *, dtype, device):
        n = math.prod(shape)
        int_dtype, nan = _NAN_BITS[dtype]
        bits = nan + 1 + len(self.buffers)
        buf = torch.empty(3 * n, dtype=dtype, device=device)
        buf.view(int_dtype).fill_(bits)
        self.buffers.append((buf, n, int_dtype, bits))
        return buf[n : 2 * n].view(shape)

    def copy(self, x):
        return self.empty(x.shape, dtype=x.dtype, device=x.device).copy_(x)

    def assert_untouched(self):
        for i, (buf, n, int_dtype, bits) in enumerate(self.buffers):
            guards = torch.cat([buf[:n], buf[2 * n :]]).view(int_dtype)
            assert (guards == bits).all(), f"buffer {i} ({n} elements): a kernel wrote outside its tensor"


BAD_OFFSETS = {
    "end past the packed length": [0, 5, 40],
    "negative start": [-8, 10, 32],
    "unsorted": [0, 20, 10, 32],
    "far past the end": [0, 2**30, 2**31 - 1],
    "far before the start": [-(2**31), -5, 32],
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("offsets", BAD_OFFSETS.values(), ids=BAD_OFFSETS.keys())
def test_bad_offsets_never_reach_outside_the_tensors(offsets, dtype, monkeypatch):
    """Offsets the kernels are handed unchecked (max_seqlen given, the device assert not yet fired) are
    clamped into [0, T]: inputs, outputs, statistics and gradients, all cut from guarded buffers, keep
    their guards, where an unclamped offset read and wrote past them (or crashed the interpreter)."""
    from parallax_kernels.parallax import triton_train

    guarded = _Guarded()
    monkeypatch.setattr(triton_train, "empty", guarded.empty)  # every output the launchers allocate
    T, H, D = 32, 2, 16
    q, r, k, v, do = (guarded.copy(torch.randn(1, T, H, D, device=DEVICE).to(dtype)) for _ in range(5))
    cu = torch.tensor(offsets, dtype=torch.int32, device=DEVICE)
    o, vbar, lse, tbar = parallax_fwd_triton(q, r, k, v, True, D**-0.5, None, cu, T)
    parallax_bwd_triton(q, r, k, v, o, vbar, lse, tbar, do, True, D**-0.5, None, cu, T)
    guarded.assert_untouched()


def test_offsets_past_the_end_are_cut_at_the_end(poison):
    """The clamp keeps the sequences' meaning: [0, 5, 40] over 32 rows is [0, 5, 32]."""
    leaves, do = _inputs(1, 32, 32, 2, 1, 16, torch.float32)
    q, r, k, v = (x.detach() for x in leaves)
    cu = torch.tensor([0, 5, 40], dtype=torch.int32, device=DEVICE)
    o, vbar, lse, tbar = parallax_fwd_triton(q, r, k, v, True, 0.25, None, cu, 32)
    grads = parallax_bwd_triton(q, r, k, v, o, vbar, lse, tbar, do, True, 0.25, None, cu, 32)
    _check(o, grads, leaves, do, True, None, 1e-5, [0, 5, 32], scale=0.25)


BAD_WITH_MAX_SEQLEN = {
    "end past the packed length": ([0, 5, 40], 32),
    "negative start": ([-8, 10, 32], 32),
    "unsorted": ([0, 20, 10, 32], 32),
    "empty sequence": ([0, 10, 10, 32], 32),
    "longer than max_seqlen": ([0, 10, 32], 16),
}


@pytest.mark.parametrize(("offsets", "max_seqlen"), BAD_WITH_MAX_SEQLEN.values(), ids=BAD_WITH_MAX_SEQLEN.keys())
def test_offsets_are_checked_without_a_host_read_when_max_seqlen_is_given(offsets, max_seqlen, monkeypatch):
    """With max_seqlen the offsets are checked on their device (no tolist: on CUDA that is a sync) before any
    launch; on CPU the failure is a ValueError naming the rule, max_seqlen and the offsets."""

    def no_launch(*args, **kw):
        raise AssertionError("a kernel was launched")

    def no_tolist(*args, **kwargs):
        raise AssertionError("cu_seqlens was read back to the host")

    monkeypatch.setattr(parallax_op, "parallax_fwd", no_launch)
    q, r, k, v = (torch.randn(1, 32, 2, 16, device=DEVICE) for _ in range(4))
    cu = torch.tensor(offsets, dtype=torch.int32, device=DEVICE)
    if DEVICE == "cuda":
        pytest.skip("on CUDA a bad value is a device-side assert, which would end this process's GPU use")
    with monkeypatch.context() as m, pytest.raises(ValueError) as info:
        m.setattr(torch.Tensor, "tolist", no_tolist)
        parallax_attn(q, r, k, v, cu_seqlens=cu, max_seqlen=max_seqlen)
    msg = str(info.value)
    assert "cu_seqlens must start at 0, end at the packed length 32 and increase strictly" in msg
    assert f"max_seqlen={max_seqlen}" in msg and f"got {offsets}" in msg


def test_device_offsets_check_is_queued_not_read(monkeypatch):
    """Off the CPU the flag goes to the device's asynchronous assert, never to the host."""
    from parallax_kernels import _checks

    queued = []

    class TorchWithSpy:  # torch itself stays untouched: patching torch._assert_async in place changed how
        # torch.compile traced it for the rest of the process (a later compiled test then failed)
        def __getattr__(self, name):
            return getattr(torch, name)

        @staticmethod
        def _assert_async(ok, msg):
            queued.append((ok.device.type, msg))

    monkeypatch.setattr(_checks, "torch", TorchWithSpy())
    cu = torch.tensor([0, 5, 40], dtype=torch.int32, device="meta")  # a meta tensor cannot be read at all
    assert _checks.check_cu_seqlens("op", cu, 32, cu.device, 1, max_seqlen=16) is None
    assert queued == [
        (
            "meta",
            "op: cu_seqlens must start at 0, end at the packed length 32 and increase strictly, "
            "with no sequence longer than max_seqlen=16",
        )
    ]


def test_offsets_check_traces_into_a_compiled_graph(poison):
    """Under torch.compile the device-side check is part of the graph (no break, no host read) and still
    refuses bad offsets when the graph runs."""
    q, r, k, v = (torch.randn(1, 24, 2, 16, device=DEVICE) for _ in range(4))
    step = torch.compile(lambda *a: parallax_attn(*a[:4], cu_seqlens=a[4], max_seqlen=14), fullgraph=True)
    cu = torch.tensor([0, 10, 24], dtype=torch.int32, device=DEVICE)
    assert_close_rel(step(q, r, k, v, cu), _reference(q, r, k, v, True, None, [0, 10, 24]), 1e-5)
    if DEVICE == "cuda":
        return  # a failing device-side assert would end this process's GPU use
    with pytest.raises(RuntimeError, match=r"no sequence longer than max_seqlen=14"):
        step(q, r, k, v, torch.tensor([0, 20, 24], dtype=torch.int32))


# ---------------------------------------------------------------------------------------------- GPU only (bf16)
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 needs the GPU (the interpreter's bf16 is broken)")
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_bf16_on_gpu(poison, shape):
    B, Tq, Tk, Hq, Hkv, D, causal, window = shape
    leaves, do = _inputs(B, Tq, Tk, Hq, Hkv, D, torch.bfloat16)
    o = parallax_attn(*leaves, causal=causal, window_size=window)
    grads = torch.autograd.grad(o, leaves, do)
    _check(o, grads, leaves, do, causal, window, TOL[torch.bfloat16])
