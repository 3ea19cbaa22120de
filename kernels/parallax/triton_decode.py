"""Triton split-KV (flash-decoding) kernels for Parallax decode: one query row per sequence.

Decode is memory-bound: each program streams one slice of one sequence's K/V cache for one kv
head, once, and keeps the streaming Parallax state (m, d1, d2, O1, O2: the online max, Σw, Σw·t, Σw·v, Σw·t·v,
with o = O1/d1·(1 + d2/d1) − O2/d1; docs/parallax-math.md#streaming derives it) for
every query head of that GQA group. t = r·k is computed on the same K tile as s = q·k, so the extra
Parallax work is arithmetic on data already in registers. The slices' states are merged exactly by
rescaling with their maxima in a small second kernel (skipped when one slice covers the sequence;
docs/parallax-math.md#decode).

Cache lengths are read on the device and the grid depends only on shapes, so a call is
CUDA-graph capturable for fixed shapes.

Why one long file: it holds one op's kernels (the dot and vector split kernels, the combine) with the host
plan that sizes and launches them; their alike parameter lists are Triton's kernel ABI (one scalar per stride).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton import knobs
from triton.runtime import driver

from .._alloc import empty
from . import decode
from ._launch_utils import LOG2E, _block_d, _device_index, _dot_precision
from .decode import call_key

# The combine kernel loads every slice of a row at once, so the split count is bounded.
_MAX_SPLITS = 256


@triton.jit
def _seq_range(SEQLENS, b, L_max, window, HAS_SEQLENS: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """(lo, n): the query at position n-1 sees keys [lo, n). An n outside [1, L_max] gives an empty
    range, so the output becomes NaN instead of reading outside the cache."""
    if HAS_SEQLENS:
        n = tl.load(SEQLENS + b).to(tl.int32)
        n = tl.where((n >= 1) & (n <= L_max), n, 0)
    else:
        n = L_max
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(n - window, 0)
    return lo, n


@triton.jit
def _workspace(WS, n_rows, D: tl.constexpr):
    """The slices' partial states in one fp32 buffer (one allocation per call): O1 and O2 as
    (n_rows, D) each, then m, d1, d2 as (3, n_rows)."""
    po1 = WS
    po2 = WS + n_rows.to(tl.int64) * D
    pstat = WS + 2 * n_rows.to(tl.int64) * D
    return po1, po2, pstat


@triton.jit
def _split_tiles(lo, n, split, num_splits, BLOCK_N: tl.constexpr):
    """Tiles [t0, t1) of BLOCK_N keys, counted from lo, that slice `split` owns, and the number of
    non-empty slices. Every owned tile starts at a valid key, so no tile is entirely masked."""
    n_tiles = tl.cdiv(n - lo, BLOCK_N)
    per_split = tl.cdiv(n_tiles, num_splits)
    t0 = split * per_split
    t1 = tl.minimum(t0 + per_split, n_tiles)
    used = tl.cdiv(n_tiles, tl.maximum(per_split, 1))
    return t0, t1, used


@triton.jit
def _split_program(
    SEQLENS,
    L_max,
    window,
    num_splits,
    H_KV: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_SEQLENS: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
):
    """(bh, b, h, split, lo, n, t0, t1, owned) of a split-kernel program: its batch x head index bh (axis 0: the
    y axis is limited to 65535) as batch b and head h, its slice, the sequence's key range [lo, n) and the tiles
    [t0, t1) it owns. A slice past the end of a short sequence owns none, runs no tile and stores nothing."""
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // H_KV
    h = bh % H_KV
    lo, n = _seq_range(SEQLENS, b, L_max, window, HAS_SEQLENS, HAS_WINDOW)
    t0, t1, _used = _split_tiles(lo, n, split, num_splits, BLOCK_N)
    return bh, b, h, split, lo, n, t0, t1, t0 < t1


@triton.jit(do_not_specialize=["L_max", "window"])
def _decode_split_dot_kernel(
    Q, R, K, V, SEQLENS, O, WS,
    scale_log2, L_max, window, num_splits, n_rows,
    stride_qb, stride_qh, stride_rb, stride_rh,
    stride_kb, stride_kl, stride_kh, stride_vb, stride_vl, stride_vh,
    stride_ob, stride_oh,
    H_KV: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, SINGLE: tl.constexpr,
    HAS_SEQLENS: tl.constexpr, HAS_WINDOW: tl.constexpr, NUM_STAGES: tl.constexpr, DOT_PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr,
):  # fmt: skip
    """One (slice, batch, kv head): the G query heads as a (BLOCK_G, D) block, tensor-core dots.

    USE_TMA loads the K/V tiles with Hopper bulk copies through descriptors built here, whose row
    bound is this sequence's own length, so rows at or past it arrive as zeros without masks."""
    _bh, b, h, split, lo, n, t0, t1, owned = _split_program(
        SEQLENS, L_max, window, num_splits, H_KV, BLOCK_N, HAS_SEQLENS, HAS_WINDOW
    )

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    g_ok = offs_g < G
    d_ok = offs_d < D
    hq = h * G + offs_g
    b64 = b.to(tl.int64)
    q_ptrs = Q + b64 * stride_qb + hq[:, None] * stride_qh + offs_d[None, :]
    r_ptrs = R + b64 * stride_rb + hq[:, None] * stride_rh + offs_d[None, :]
    gd_ok = g_ok[:, None] & d_ok[None, :]
    q = tl.load(q_ptrs, mask=gd_ok, other=0.0)
    r = tl.load(r_ptrs, mask=gd_ok, other=0.0)

    start = lo + t0 * BLOCK_N
    k_base = K + b64 * stride_kb + h * stride_kh
    v_base = V + b64 * stride_vb + h * stride_vh
    if USE_TMA:
        rows = tl.maximum(n, 1)  # an empty range runs no tile; keep the descriptor well formed
        k_desc = tl.make_tensor_descriptor(k_base, [rows, D], [stride_kl, 1], [BLOCK_N, BLOCK_D])
        v_desc = tl.make_tensor_descriptor(v_base, [rows, D], [stride_vl, 1], [BLOCK_N, BLOCK_D])
    else:
        k_ptrs = k_base + start.to(tl.int64) * stride_kl + offs_n[:, None] * stride_kl + offs_d[None, :]
        v_ptrs = v_base + start.to(tl.int64) * stride_vl + offs_n[:, None] * stride_vl + offs_d[None, :]

    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    # d1, d2 are summed over the keys only after the loop: one cross-warp reduction per tile (the max)
    d1_acc = tl.zeros([BLOCK_G, BLOCK_N], tl.float32)
    d2_acc = tl.zeros([BLOCK_G, BLOCK_N], tl.float32)
    o1 = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    o2 = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for it in tl.range(t0, t1, num_stages=NUM_STAGES):
        row0 = lo + it * BLOCK_N
        key_ok = row0 + offs_n < n
        if USE_TMA:
            k = k_desc.load([row0, 0])
            v = v_desc.load([row0, 0])
        else:
            if BLOCK_D == D:
                kv_mask = key_ok[:, None]
            else:
                kv_mask = key_ok[:, None] & d_ok[None, :]
            k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
            v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
            k_ptrs += BLOCK_N * stride_kl
            v_ptrs += BLOCK_N * stride_vl
        kt = tl.trans(k)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * scale_log2
        t = tl.dot(r, kt, input_precision=DOT_PRECISION)
        s = tl.where(key_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        pt = p * t
        d1_acc = d1_acc * alpha[:, None] + p
        d2_acc = d2_acc * alpha[:, None] + pt
        o1 = tl.dot(p.to(v.dtype), v, acc=o1 * alpha[:, None], input_precision=DOT_PRECISION)
        o2 = tl.dot(pt.to(v.dtype), v, acc=o2 * alpha[:, None], input_precision=DOT_PRECISION)
        m = m_new

    d1 = tl.sum(d1_acc, 1)
    d2 = tl.sum(d2_acc, 1)
    if SINGLE:
        inv = 1.0 / d1
        out = o1 * (inv * (1.0 + d2 * inv))[:, None] - o2 * inv[:, None]
        out = tl.where((d1 > 0)[:, None], out, float("nan"))
        o_ptrs = O + b64 * stride_ob + hq[:, None] * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=gd_ok)
    else:
        PO1, PO2, PSTAT = _workspace(WS, n_rows, D)
        row = (b * H_KV * G + hq) * num_splits + split
        g_st = g_ok & owned
        tl.store(PSTAT + row, m, mask=g_st)
        tl.store(PSTAT + n_rows + row, d1, mask=g_st)
        tl.store(PSTAT + 2 * n_rows + row, d2, mask=g_st)
        p_offs = row.to(tl.int64)[:, None] * D + offs_d[None, :]
        tl.store(PO1 + p_offs, o1, mask=gd_ok & owned)
        tl.store(PO2 + p_offs, o2, mask=gd_ok & owned)


@triton.jit(do_not_specialize=["L_max", "window"])
def _decode_split_vec_kernel(
    Q, R, K, V, SEQLENS, O, WS,
    scale_log2, L_max, window, num_splits, n_rows,
    stride_qb, stride_qh, stride_rb, stride_rh,
    stride_kb, stride_kl, stride_kh, stride_vb, stride_vl, stride_vh,
    stride_ob, stride_oh,
    H_KV: tl.constexpr, D: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, SINGLE: tl.constexpr,
    HAS_SEQLENS: tl.constexpr, HAS_WINDOW: tl.constexpr, NUM_STAGES: tl.constexpr,
):  # fmt: skip
    """One (slice, batch, head) without GQA: q and r as vectors, the dots as fp32 row reductions
    (no 16-row padding of a single query head)."""
    bh, b, h, split, lo, n, t0, t1, owned = _split_program(
        SEQLENS, L_max, window, num_splits, H_KV, BLOCK_N, HAS_SEQLENS, HAS_WINDOW
    )

    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    d_ok = offs_d < D
    b64 = b.to(tl.int64)
    q = tl.load(Q + b64 * stride_qb + h * stride_qh + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    r = tl.load(R + b64 * stride_rb + h * stride_rh + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    q = q * scale_log2

    start = lo + t0 * BLOCK_N
    k_ptrs = (
        K + b64 * stride_kb + h * stride_kh + start.to(tl.int64) * stride_kl
        + offs_n[:, None] * stride_kl + offs_d[None, :]
    )  # fmt: skip
    v_ptrs = (
        V + b64 * stride_vb + h * stride_vh + start.to(tl.int64) * stride_vl
        + offs_n[:, None] * stride_vl + offs_d[None, :]
    )  # fmt: skip

    m = tl.full([1], float("-inf"), tl.float32)
    d1_acc = tl.zeros([BLOCK_N], tl.float32)
    d2_acc = tl.zeros([BLOCK_N], tl.float32)
    o1 = tl.zeros([BLOCK_D], tl.float32)
    o2 = tl.zeros([BLOCK_D], tl.float32)
    pos = start + offs_n
    for _ in tl.range(t0, t1, num_stages=NUM_STAGES):
        key_ok = pos < n
        if BLOCK_D == D:
            kv_mask = key_ok[:, None]
        else:
            kv_mask = key_ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptrs, mask=kv_mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptrs, mask=kv_mask, other=0.0).to(tl.float32)
        s = tl.sum(k * q[None, :], 1)
        t = tl.sum(k * r[None, :], 1)
        s = tl.where(key_ok, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 0))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new)
        pt = p * t
        d1_acc = d1_acc * alpha + p
        d2_acc = d2_acc * alpha + pt
        o1 = o1 * alpha + tl.sum(p[:, None] * v, 0)
        o2 = o2 * alpha + tl.sum(pt[:, None] * v, 0)
        m = m_new
        pos += BLOCK_N
        k_ptrs += BLOCK_N * stride_kl
        v_ptrs += BLOCK_N * stride_vl

    d1 = tl.sum(d1_acc, 0)
    d2 = tl.sum(d2_acc, 0)
    if SINGLE:
        inv = 1.0 / d1
        out = o1 * (inv * (1.0 + d2 * inv)) - o2 * inv
        out = tl.where(d1 > 0, out, float("nan"))
        tl.store(O + b64 * stride_ob + h * stride_oh + offs_d, out.to(O.dtype.element_ty), mask=d_ok)
    else:
        PO1, PO2, PSTAT = _workspace(WS, n_rows, D)
        row = bh * num_splits + split
        one = tl.arange(0, 1)
        tl.store(PSTAT + row + one, m, mask=owned)
        tl.store(PSTAT + n_rows + row + one, tl.full([1], d1, tl.float32), mask=owned)
        tl.store(PSTAT + 2 * n_rows + row + one, tl.full([1], d2, tl.float32), mask=owned)
        p_offs = row.to(tl.int64) * D + offs_d
        tl.store(PO1 + p_offs, o1, mask=d_ok & owned)
        tl.store(PO2 + p_offs, o2, mask=d_ok & owned)


@triton.jit(do_not_specialize=["L_max", "window"])
def _decode_combine_kernel(
    SEQLENS, O, WS,
    L_max, window, num_splits, n_rows, stride_ob, stride_oh,
    H_Q: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_DC: tl.constexpr,
    HAS_SEQLENS: tl.constexpr, HAS_WINDOW: tl.constexpr,
):  # fmt: skip
    """One (batch, query head, chunk of D): merge the slices' states exactly, then
    o = O1/d1 (1 + d2/d1) - O2/d1. Every load is issued at once (one memory round trip): the partials
    were just written and sit in L2, so latency, not bandwidth, is this kernel's cost."""
    bh = tl.program_id(0)
    b = bh // H_Q
    h = bh % H_Q
    lo, n = _seq_range(SEQLENS, b, L_max, window, HAS_SEQLENS, HAS_WINDOW)
    _t0, _t1, used = _split_tiles(lo, n, 0, num_splits, BLOCK_N)
    PO1, PO2, PSTAT = _workspace(WS, n_rows, D)

    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.program_id(1) * BLOCK_DC + tl.arange(0, BLOCK_DC)
    s_ok = offs_s < used
    d_ok = offs_d < D
    rows = bh * num_splits + offs_s
    m = tl.load(PSTAT + rows, mask=s_ok, other=float("-inf"))
    d1 = tl.load(PSTAT + n_rows + rows, mask=s_ok, other=0.0)
    d2 = tl.load(PSTAT + 2 * n_rows + rows, mask=s_ok, other=0.0)
    p_offs = rows.to(tl.int64)[:, None] * D + offs_d[None, :]
    sd_ok = s_ok[:, None] & d_ok[None, :]
    o1 = tl.load(PO1 + p_offs, mask=sd_ok, other=0.0)
    o2 = tl.load(PO2 + p_offs, mask=sd_ok, other=0.0)
    w = tl.where(s_ok, tl.exp2(m - tl.max(m, 0)), 0.0)
    d1_sum = tl.sum(w * d1, 0)
    d2_sum = tl.sum(w * d2, 0)
    o1_sum = tl.sum(w[:, None] * o1, 0)
    o2_sum = tl.sum(w[:, None] * o2, 0)
    inv = 1.0 / d1_sum
    out = o1_sum * (inv * (1.0 + d2_sum * inv)) - o2_sum * inv
    out = tl.where(used > 0, out, float("nan"))
    o_ptrs = O + b.to(tl.int64) * stride_ob + h * stride_oh + offs_d
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=d_ok)


@dataclass(frozen=True)
class DecodeConfig:
    """Launch parameters of the split kernel; `None` fields are filled by the heuristic."""

    num_splits: int | None = None
    block_n: int | None = None
    num_warps: int | None = None
    num_stages: int | None = None
    use_dot: bool | None = None
    use_tma: bool | None = None


@dataclass(frozen=True)
class _Plan:
    use_dot: bool
    use_tma: bool
    block_g: int
    block_d: int
    block_n: int
    num_warps: int
    num_stages: int
    num_splits: int


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of `device`; the interpreter counts as a handful so tests stay small."""
    if device.type != "cuda":
        return 4
    return _sm_count(_device_index(device))


# The defaults below follow `bench_decode.py --sweep` at the shapes whose device time dominates: eager
# batch-1 timings are host-bound and too noisy to rank configs (benchmarks/RESULTS.md, "Design notes from
# measurements").


def choose_num_splits(programs: int, n_tiles: int, sms: int, waves: float = 1.0, min_tiles: int = 2) -> int:
    """Slices per sequence so that about `waves` programs per SM are launched in all, but no slice
    holds fewer than `min_tiles` tiles (a slice's fixed cost is its q/r load, its partial write and
    its row in the merge). The count is then trimmed so that, for a full cache, no slice is empty.

    waves=1: once the launch covers the SMs, more slices only add merge work (benchmarks/RESULTS.md,
    "Design notes from measurements")."""
    splits = max(1, min(math.ceil(waves * sms / programs), n_tiles // min_tiles, _MAX_SPLITS))
    per_split = math.ceil(n_tiles / splits)
    return math.ceil(n_tiles / per_split)


def default_config(head_dim: int) -> DecodeConfig:
    """Heuristic launch parameters (`benchmarks/bench_decode.py --sweep` measures the alternatives).

    Tensor-core dots even for one query head a group: the 16-row padding is free in a memory-bound
    loop, and the mma layout reduces over the keys without the per-tile cross-warp sums of the
    vector path, which was slower at every device-bound shape timed. The TMA path stays opt-in: it
    tied with pointer loads at every shape timed but one (benchmarks/RESULTS.md, "Design notes from
    measurements")."""
    block_n = 64 if head_dim <= 128 else 32 if head_dim <= 256 else 16
    stages = 3 if head_dim <= 256 else 2
    return DecodeConfig(block_n=block_n, num_warps=4, num_stages=stages, use_dot=True, use_tma=False)


def _plan(batch, heads_q, heads_kv, head_dim, L_max, window_size, sms, config) -> _Plan:
    group = heads_q // heads_kv
    base = default_config(head_dim)
    cfg = config or base
    block_n = cfg.block_n or base.block_n
    use_dot = group > 1 or (base.use_dot if cfg.use_dot is None else cfg.use_dot)
    span = L_max if window_size is None else min(L_max, window_size)
    n_tiles = triton.cdiv(span, block_n)
    num_splits = cfg.num_splits or choose_num_splits(batch * heads_kv, n_tiles, sms)
    return _Plan(
        use_dot=use_dot,
        use_tma=use_dot and bool(base.use_tma if cfg.use_tma is None else cfg.use_tma),
        block_g=max(16, triton.next_power_of_2(group)),
        block_d=_block_d(head_dim),  # tl.dot needs K >= 16
        block_n=block_n,
        num_warps=cfg.num_warps or base.num_warps,
        num_stages=cfg.num_stages or base.num_stages,
        num_splits=max(1, min(num_splits, n_tiles, _MAX_SPLITS)),
    )


def _tma_ready(*caches) -> bool:
    """Bulk copies need 16-byte aligned bases and strides."""
    return all(t.data_ptr() % 16 == 0 and all(st * t.element_size() % 16 == 0 for st in t.stride()[:3]) for t in caches)


def _scratch(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


# ------------------------------------------------------------------ launching

# An eager decode step pays the host path once per layer and token, and at batch 1 the device
# needs ~12 µs, so everything below is computed once per plan (shapes, strides, dtype, device,
# options) and a call only allocates its output and workspace and launches.


def _hooks_quiet() -> bool:
    """No launch hook is installed (profilers such as proton add them): a direct launch would skip
    them, so with one present every launch goes through the JIT."""
    rt = knobs.runtime
    for hook in (rt.launch_enter_hook, rt.launch_exit_hook):
        if hook is not None and getattr(hook, "calls", True):
            return False
    return True


class _Launch:
    """One kernel launch whose grid, scalars and constexprs are fixed; only the tensors change.

    The first call goes through the JIT, which compiles (or finds) the kernel for these arguments'
    specializations and launches it. Later calls hand that compiled kernel's launcher the same
    argument list directly (what Triton's own `CompiledKernel[grid](...)` does), skipping the JIT's
    per-call binding, specialization and cache-key work: most of an eager call's host time.
    Everything the JIT specializes on is fixed by the plan's key (dtypes, every integer argument)
    or checked per call (all pointers 16-byte aligned), so the JIT would pick the same kernel again.
    The kernel is launched directly only on the device it was loaded on; elsewhere the JIT runs."""

    __slots__ = ("device", "fn", "function", "grid", "launcher", "metadata", "options", "tail", "values")

    def __init__(self, fn, grid, tensor_names, values, options):
        names = tuple(fn.arg_names)
        if names[: len(tensor_names)] != tensor_names:
            raise AssertionError(
                f"{fn.__name__}: tensor arguments {names[: len(tensor_names)]}, expected {tensor_names}"
            )
        self.fn, self.values, self.options = fn, values, options
        self.grid = (*grid, *(1,) * (3 - len(grid)))
        self.tail = tuple(values[name] for name in names[len(tensor_names) :])  # in the signature's order
        self.launcher = self.function = self.metadata = self.device = None

    def __call__(self, tensors, device, stream):
        """Launch; `device` and `stream` are the current ones when a direct launch is allowed
        (aligned pointers, no launch hooks), else None."""
        if device is not None and device == self.device:
            g0, g1, g2 = self.grid
            self.launcher(g0, g1, g2, stream, self.function, self.metadata, None, None, None, *tensors, *self.tail)
            return
        kernel = self.fn[self.grid](*tensors, **self.values, **self.options)
        # The interpreter returns nothing; a compiled kernel has been loaded by the launch above.
        if device is not None and getattr(kernel, "function", None) is not None and hasattr(kernel, "packed_metadata"):
            self.launcher, self.function, self.metadata = kernel.run, kernel.function, kernel.packed_metadata
            self.device = device


_SPLIT_TENSORS = ("Q", "R", "K", "V", "SEQLENS", "O", "WS")
_COMBINE_TENSORS = ("SEQLENS", "O", "WS")
# Under TRITON_INTERPRET=1 the kernels are interpreted functions, with nothing compiled to launch.
_COMPILED = isinstance(_decode_combine_kernel, triton.runtime.JITFunction)


class DecodePlan:
    """Launch plan of one call signature: shapes, strides, dtype, device, lengths' dtype, scale,
    window, config and whether the inputs are 16-byte aligned (see `call_key`). Holds no tensors.

    Calling it allocates the output (and, when the cache is sliced, one fp32 workspace for the
    partial states) and launches. The workspace is allocated per call rather than kept in the plan:
    two calls in flight on different streams, or a call captured in a CUDA graph and replayed
    beside eager ones, would otherwise share it; the caching allocator makes the allocation cheap.
    """

    def __init__(self, q, r, k_cache, v_cache, cache_seqlens, scale, window_size, config=None, aligned=False):
        B, _, H_q, D = q.shape
        L_max, H_kv = k_cache.shape[1], k_cache.shape[2]
        self.copy_q, self.copy_r = q.stride(3) != 1, r.stride(3) != 1  # the kernel reads D with unit stride
        self.copy_lens = cache_seqlens is not None and B > 1 and cache_seqlens.stride(0) != 1
        q_st = (H_q * D, D) if self.copy_q else (q.stride(0), q.stride(2))
        r_st = (H_q * D, D) if self.copy_r else (r.stride(0), r.stride(2))
        plan = _plan(B, H_q, H_kv, D, L_max, window_size, sm_count(q.device), config)
        S = plan.num_splits
        self.plan, self.num_splits, self.single = plan, S, S == 1
        self.out_shape, self.dtype, self.device = (B, 1, H_q, D), q.dtype, q.device
        n_rows = B * H_q * S
        self.ws_shape = (n_rows * (2 * D + 3),)  # O1 and O2 (n_rows, D) each, then m, d1, d2 (3, n_rows)
        self.aligned = aligned and _COMPILED
        # Only where every call of this plan has aligned caches (aligned is part of its key).
        self.use_tma = plan.use_dot and plan.use_tma and aligned and _tma_ready(k_cache, v_cache)
        self.set_allocator = self.use_tma and q.is_cuda  # the descriptors go to global scratch per program
        flags = {"HAS_SEQLENS": cache_seqlens is not None, "HAS_WINDOW": window_size is not None}
        window = 0 if window_size is None else window_size
        scale = D**-0.5 if scale is None else scale
        out_st = (H_q * D, D)  # the output is allocated contiguous
        values = dict(
            scale_log2=scale * LOG2E, L_max=L_max, window=window, num_splits=S, n_rows=n_rows,
            stride_qb=q_st[0], stride_qh=q_st[1], stride_rb=r_st[0], stride_rh=r_st[1],
            stride_kb=k_cache.stride(0), stride_kl=k_cache.stride(1), stride_kh=k_cache.stride(2),
            stride_vb=v_cache.stride(0), stride_vl=v_cache.stride(1), stride_vh=v_cache.stride(2),
            stride_ob=out_st[0], stride_oh=out_st[1],
            H_KV=H_kv, D=D, BLOCK_D=plan.block_d, BLOCK_N=plan.block_n, SINGLE=S == 1,
            NUM_STAGES=plan.num_stages, **flags,
        )  # fmt: skip
        if plan.use_dot:
            fn = _decode_split_dot_kernel
            values.update(
                G=H_q // H_kv, BLOCK_G=plan.block_g, DOT_PRECISION=_dot_precision(q.dtype), USE_TMA=self.use_tma
            )
        else:
            fn = _decode_split_vec_kernel
        options = {"num_warps": plan.num_warps, "num_stages": plan.num_stages}
        self.split = _Launch(fn, (B * H_kv, S), _SPLIT_TENSORS, values, options)
        self.combine = None
        if S > 1:
            block_s = triton.next_power_of_2(S)
            block_dc = min(plan.block_d, max(16, 4096 // block_s))  # at most 32 fp32 per thread per tensor
            combine_values = dict(
                L_max=L_max, window=window, num_splits=S, n_rows=n_rows, stride_ob=out_st[0], stride_oh=out_st[1],
                H_Q=H_q, D=D, BLOCK_N=plan.block_n, BLOCK_S=block_s, BLOCK_DC=block_dc, **flags,
            )  # fmt: skip
            grid = (B * H_q, triton.cdiv(D, block_dc))
            self.combine = _Launch(_decode_combine_kernel, grid, _COMBINE_TENSORS, combine_values, {"num_warps": 4})

    def __call__(self, q, r, k_cache, v_cache, cache_seqlens):
        if self.copy_q:
            q = q.contiguous()
        if self.copy_r:
            r = r.contiguous()
        out = empty(self.out_shape, dtype=self.dtype, device=self.device)
        if cache_seqlens is None:
            lens = out  # never read: HAS_SEQLENS is off
        else:
            lens = cache_seqlens.contiguous() if self.copy_lens else cache_seqlens
        ws = out if self.single else empty(self.ws_shape, dtype=torch.float32, device=self.device)
        device = stream = None
        # Fresh allocations (out, ws, the copies) are aligned with the caching allocator; checked anyway.
        if self.aligned and not (out.data_ptr() | ws.data_ptr() | q.data_ptr() | r.data_ptr()) & 15 and _hooks_quiet():
            drv = driver.active
            device = drv.get_current_device()
            stream = drv.get_current_stream(device)
        if self.set_allocator:
            triton.set_allocator(_scratch)
        self.split((q, r, k_cache, v_cache, lens, out, ws), device, stream)
        if self.combine is not None:
            self.combine((lens, out, ws), device, stream)
        return out


_LOOK_UP = object()


def launch_plan(q, r, k_cache, v_cache, cache_seqlens, scale, window_size, config=None, *, key=_LOOK_UP) -> DecodePlan:
    """The plan of this call signature (and config), from decode's plan cache: for config None the
    very plan `parallax_decode` launches. On first use the signature goes through the full checks
    and its plan is built and filed there; inputs that `call_key` does not cover get a fresh plan
    every call.

    `key` (the signature's `call_key`, possibly None) is passed only by decode, which has checked the
    inputs and files what this returns: then a new plan is built, nothing looked up."""
    if key is not _LOOK_UP:
        aligned = key is not None and key[-1]
        return DecodePlan(q, r, k_cache, v_cache, cache_seqlens, scale, window_size, config, aligned=aligned)
    key = call_key(q, r, k_cache, v_cache, cache_seqlens, scale, window_size)
    plan = None
    if key is not None:
        plan = decode._PLANS.get(key if config is None else (key, config))
    if plan is None:
        plan = decode._new_entry(key, q, r, k_cache, v_cache, cache_seqlens, scale, window_size, config)
    return plan


def parallax_decode_triton(q, r, k_cache, v_cache, cache_seqlens, scale, window_size, config=None):
    """Launch the split kernel (and the combine kernel when it split); inputs already validated.

    q, r: (B, 1, H_q, D); k_cache, v_cache: (B, L_max, H_kv, D) with unit stride on D (read in place).
    `config` (a DecodeConfig) overrides the heuristic, for benchmarks and tests.
    """
    plan = launch_plan(q, r, k_cache, v_cache, cache_seqlens, scale, window_size, config)
    return plan(q, r, k_cache, v_cache, cache_seqlens)
