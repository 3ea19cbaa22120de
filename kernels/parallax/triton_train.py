"""Parallax training kernels in Triton: one streaming forward and a two-kernel backward.

The math, derived: docs/parallax-math.md (#forward, #streaming, #saved-for-the-backward, #backward).
Layout is (batch, seq, heads, head_dim), read in place through strides. Per query row i:

    forward   d1 = Σ w,  d2 = Σ w t,  O1 = Σ w v,  O2 = Σ w t v     (w = exp2(s - m), online max m)
              o = O1/d1 (1 + d2/d1) - O2/d1;  saved: v̄ = O1/d1, lse = m + log2 d1 (base 2), t̄ = d2/d1
    backward  kernel 1 (dQ/dR, one program per query block): first T_i = dO·o and b_i = dO·v̄ for its own
              rows (stored for kernel 2), then a loop over key tiles for dq and dr;
              kernel 2 (dK/dV, one program per key block and kv head): a loop over the query heads of the
              GQA group and their query blocks, so dk and dv are summed in registers, without atomics.

Every loop over tiles is split into full tiles (no mask work at all) and the few boundary tiles (causal
diagonal, window edge, sequence tail) that are masked. On Hopper the loops read their tiles through TMA tensor
descriptors (the copy engine, which zero-fills past the sequence), so the loop holds no address registers;
packed batches and unaligned head dims use pointer loads. Scores live in the base-2 domain: the softmax
scale is multiplied by log2(e) once, so every exponential is a bare exp2.

Why one long file: it holds one op's kernels, and the forward and both backward kernels share the tile,
range and mask helpers of its "Shared pieces" section, which a split by direction would scatter; the
sections (configs, shared helpers, forward, dQ/dR, dK/dV, host launchers) are marked by banner comments.
The three kernels' long, alike parameter lists are Triton's kernel ABI (one scalar per stride), not logic.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .._alloc import empty
from .._dispatch import interpreting
from ._launch_utils import LOG2E, _block_d, _device_index, _dot_precision


# --------------------------------------------------------------------------------------------------------------
# Configs: chosen per head-dim class by a fixed table (no runtime autotuning, so a new shape costs one compile).
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and launch options of one kernel. block_m counts query rows, block_n key rows."""

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2
    # Forward only: rescale the accumulators only when a row's running max grows by more than 2^8 (weights
    # then stay below 256), instead of on every tile. It saves the multiply of both accumulators on most tiles
    # but needs a block-wide branch, which cost more than it saved wherever it was timed (benchmarks/RESULTS.md,
    # "Design notes from measurements"), hence off.
    lazy_rescale: bool = False
    # Read the tiles of the loop over the other side (K/V in the forward and dQ/dR kernels; q, r, dO in dK/dV)
    # with the copy engine (TMA tensor descriptors) where the inputs allow it (see _tma_layouts), instead of
    # per-thread pointer loads: no address registers or address arithmetic in the loop.
    tma: bool = True

    def __post_init__(self):
        for name in ("block_m", "block_n"):
            b = getattr(self, name)
            if b < 16 or b & (b - 1):
                raise ValueError(f"KernelConfig.{name} must be a power of two >= 16, got {b}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"KernelConfig.num_warps must be a power of two <= 16, got {self.num_warps}")
        if self.num_stages < 1:
            raise ValueError(f"KernelConfig.num_stages must be >= 1, got {self.num_stages}")


@dataclass(frozen=True)
class TrainConfigs:
    fwd: KernelConfig
    dq: KernelConfig  # dQ/dR kernel
    dkv: KernelConfig  # dK/dV kernel


# The interpreter pays per program and per tile, not per element: large tiles keep CPU tests fast.
_INTERPRETER = TrainConfigs(KernelConfig(32, 32, 1, 1), KernelConfig(32, 32, 1, 1), KernelConfig(32, 32, 1, 1))

# Hopper (sm90) table, keyed by the padded head dim, chosen by timing each kernel on its own
# (benchmarks/ab_train_kernels.py): one warpgroup a program, with tiles small enough that two programs share an
# SM; TMA descriptor loads, which pay most where the loop reads three tiles (dK/dV); a few spilled registers
# rather than narrower tiles. The timings: benchmarks/RESULTS.md, "Design notes from measurements".
_HOPPER = {
    64: TrainConfigs(KernelConfig(64, 64, 4, 3), KernelConfig(64, 64, 4, 3, tma=False), KernelConfig(64, 128, 8, 2)),
    128: TrainConfigs(KernelConfig(64, 64, 4, 2), KernelConfig(64, 32, 4, 3), KernelConfig(32, 64, 4, 3)),
    256: TrainConfigs(KernelConfig(32, 32, 4, 1), KernelConfig(32, 32, 4, 2), KernelConfig(16, 16, 4, 2)),
}
# Pre-Hopper GPUs (less shared memory, no wgmma): smaller tiles, fewer stages.
_OTHER = {
    64: TrainConfigs(KernelConfig(64, 64, 4, 2), KernelConfig(64, 32, 4, 2), KernelConfig(32, 64, 4, 2)),
    128: TrainConfigs(KernelConfig(64, 32, 4, 3), KernelConfig(64, 32, 4, 2), KernelConfig(32, 64, 4, 2)),
    256: TrainConfigs(KernelConfig(32, 32, 4, 1), KernelConfig(32, 32, 4, 1), KernelConfig(16, 16, 4, 2)),
}
# fp32 inputs run exact (ieee) dots on CUDA cores, so fp32 tests are tight. On a GPU that is a correctness
# path, not a fast one (those dots spill at any tile that holds the two accumulators): train in bf16/fp16.
# It keeps pointer loads: descriptor loads feeding CUDA-core dots have not been run on a GPU (only the bf16
# path has), and this path is not worth the risk.
_FP32 = {
    64: TrainConfigs(*(KernelConfig(64, 32, 4, 2, tma=False),) * 2, KernelConfig(32, 64, 4, 2, tma=False)),
    128: TrainConfigs(*(KernelConfig(32, 32, 4, 2, tma=False),) * 3),
    256: TrainConfigs(*(KernelConfig(16, 32, 4, 1, tma=False),) * 3),
}


def _dim_class(head_dim: int) -> int:
    return 64 if head_dim <= 64 else 128 if head_dim <= 128 else 256


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def default_configs(head_dim: int, dtype: torch.dtype, device: torch.device) -> TrainConfigs:
    """The launch configs used for a head dim, dtype and device (the table above)."""
    if device.type != "cuda" or interpreting():
        return _INTERPRETER
    return _gpu_configs(_dim_class(head_dim), dtype, _device_index(device))


@functools.cache
def _gpu_configs(dim_class: int, dtype: torch.dtype, index: int) -> TrainConfigs:
    if dtype == torch.float32:
        return _FP32[dim_class]
    major, _ = _capability(index)
    return (_HOPPER if major >= 9 else _OTHER)[dim_class]


# --------------------------------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------------------------------
# Kernel code keeps its argument lists dense (one line per tensor's strides): the formatter would give each
# of the ~60 arguments its own line.
# fmt: off
@triton.jit
def _load_tile(ptrs, rows, n_rows, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CHECK_ROWS: tl.constexpr):
    """Load a (rows, BLOCK_D) tile; bounds are checked only where they can be crossed (zeros outside)."""
    if CHECK_ROWS:
        if BLOCK_D == HEAD_DIM:
            x = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
        else:
            x = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    else:
        if BLOCK_D == HEAD_DIM:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    return x


@triton.jit
def _load_rows(DESC, base, offs, b, row, h, rows, n_rows, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               ROWS: tl.constexpr, MASK: tl.constexpr, TMA: tl.constexpr):
    """A (ROWS, BLOCK_D) tile of a (B, T, H, D) tensor inside a tile loop: with TMA from the tensor descriptor
    DESC at (b, row, h) (the copy engine zero-fills rows past T and columns past D, so no mask is needed),
    otherwise through base + offs like _load_tile."""
    if TMA:
        x = DESC.load([b, row, h, 0]).reshape(ROWS, BLOCK_D)
    else:
        x = _load_tile(base + offs, rows, n_rows, offs_d, HEAD_DIM, BLOCK_D, MASK)
    return x


@triton.jit
def _tile_offsets(s_t, s_d, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """int32 offsets of a (ROWS, BLOCK_D) tile from its first element. Loops carry a scalar base pointer and
    add these, instead of carrying a tensor of 64-bit pointers (which costs registers per element)."""
    return tl.arange(0, ROWS)[:, None] * s_t + tl.arange(0, BLOCK_D)[None, :] * s_d


@triton.jit
def _base(BASE, b, s_b, h, s_h, row, s_t):
    """Scalar pointer to element (b, row, h, 0), in int64 so long packed batches cannot overflow."""
    return BASE + b * s_b + h.to(tl.int64) * s_h + row * s_t


@triton.jit
def _ptrs(BASE, b, s_b, h, s_h, row, s_t, s_d, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """Pointers (or offsets, with BASE = 0) of a (ROWS, BLOCK_D) tile starting at `row`, for tiles loaded once."""
    return _base(BASE, b, s_b, h, s_h, row, s_t) + _tile_offsets(s_t, s_d, ROWS, BLOCK_D)


@triton.jit
def _load_block(BASE, b, s_b, h, s_h, row, s_t, s_d, rows, n_rows, offs_d, ROWS: tl.constexpr,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """The (ROWS, BLOCK_D) tile a program loads once, at (b, row, h) of a (B, T, H, D) tensor; zeros past n_rows."""
    return _load_tile(_ptrs(BASE, b, s_b, h, s_h, row, s_t, s_d, ROWS, BLOCK_D), rows, n_rows, offs_d, HEAD_DIM,
                      BLOCK_D, True)


@triton.jit
def _tma_coords(b, h, TMA: tl.constexpr):
    """Batch and head as the int32 coordinates of a descriptor load (TMA is never used with VARLEN, where b is 0)."""
    if TMA:
        return b.to(tl.int32), h.to(tl.int32)
    else:
        return 0, 0


@triton.jit
def _loop_base(BASE, b, s_b, h, s_h, row, s_t, TMA: tl.constexpr):
    """_base for a tensor a tile loop reads: unused (0) when it arrives as a TMA descriptor."""
    if TMA:
        return 0
    else:
        return _base(BASE, b, s_b, h, s_h, row, s_t)


@triton.jit
def _kv_loop_args(K, V, b, hk, row0, sk_b, sk_t, sk_h, sk_d, sv_b, sv_t, sv_h, sv_d, BLOCK_N: tl.constexpr,
                  BLOCK_D: tl.constexpr, TMA: tl.constexpr):
    """What a loop over the K/V tiles of kv head hk carries: base pointers and tile offsets (pointer loads) or
    descriptor coordinates (TMA)."""
    k_base = _loop_base(K, b, sk_b, hk, sk_h, row0, sk_t, TMA)
    v_base = _loop_base(V, b, sv_b, hk, sv_h, row0, sv_t, TMA)
    k_offs = _tile_offsets(sk_t, sk_d, BLOCK_N, BLOCK_D)
    v_offs = _tile_offsets(sv_t, sv_d, BLOCK_N, BLOCK_D)
    b_tma, hk_tma = _tma_coords(b, hk, TMA)
    return k_base, v_base, k_offs, v_offs, b_tma, hk_tma


@triton.jit
def _store_tile(ptrs, x, rows, n_rows, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    if BLOCK_D == HEAD_DIM:
        tl.store(ptrs, x, mask=rows[:, None] < n_rows)
    else:
        tl.store(ptrs, x, mask=(rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def _sequence(CU_SEQLENS, pid_b, t_q, t_k, total, VARLEN: tl.constexpr):
    """(batch index, first row, query length, key length) of the sequence this program works on.

    Packed offsets are clamped to 0 <= start <= end <= total (the packed length; the kernels pass stat_len,
    which is that under VARLEN), so wrong offsets (unchecked, or checked by an assert that has not fired
    yet) give an empty or short sequence: a wrong result at worst, never an access outside the tensors."""
    if VARLEN:
        start = tl.load(CU_SEQLENS + pid_b).to(tl.int64)
        end = tl.load(CU_SEQLENS + pid_b + 1).to(tl.int64)
        start = tl.minimum(tl.maximum(start, 0), total)
        end = tl.minimum(tl.maximum(end, start), total)
        seq_len = (end - start).to(tl.int32)
        return 0, start, seq_len, seq_len
    else:
        return pid_b.to(tl.int64), 0, t_q, t_k


@triton.jit
def _query_block(CU_SEQLENS, t_q, t_k, stat_len, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr,
                 VARLEN: tl.constexpr):
    """(query head, batch index, first row, query length, key length, first query row m0) of a program over
    query blocks (grid: blocks, query heads, sequences). Causal programs take the longest rows first, so the
    short ones fill the tail."""
    pid_m = tl.program_id(0)
    if CAUSAL:
        pid_m = tl.num_programs(0) - 1 - pid_m
    b, row0, t_q, t_k = _sequence(CU_SEQLENS, tl.program_id(2), t_q, t_k, stat_len, VARLEN)
    return tl.program_id(1), b, row0, t_q, t_k, pid_m * BLOCK_M


@triton.jit
def _query_positions(offs_m, t_q, t_k, CAUSAL: tl.constexpr):
    """Query rows' positions in key coordinates: causal queries are the last t_q positions
    (docs/parallax-math.md#masking)."""
    if CAUSAL:
        pos = offs_m + (t_k - t_q)
    else:
        pos = offs_m
    return pos


@triton.jit
def _key_ranges(m0, t_q, t_k, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                WINDOW: tl.constexpr):
    """Key tiles a query block [m0, m0+BLOCK_M) needs, as lo <= full_lo <= full_hi <= hi:
    [lo, full_lo) and [full_hi, hi) are masked tiles (window edge; causal diagonal and key tail),
    [full_lo, full_hi) are tiles every row of the block sees completely."""
    if CAUSAL:
        off = t_k - t_q  # queries are the last t_q positions
        hi = tl.minimum(t_k, m0 + BLOCK_M + off)
        full_hi = (tl.minimum(m0 + off + 1, t_k) // BLOCK_N) * BLOCK_N
    else:
        off = 0
        hi = t_k
        full_hi = (t_k // BLOCK_N) * BLOCK_N
    if WINDOW:
        lo = (tl.maximum(m0 + off - window + 1, 0) // BLOCK_N) * BLOCK_N
        full_lo = tl.cdiv(tl.maximum(m0 + BLOCK_M + off - window, 0), BLOCK_N) * BLOCK_N
    else:
        lo = m0 * 0  # a tensor like the other bounds, so callers can widen it
        full_lo = lo
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)
    return lo, full_lo, full_hi, hi


@triton.jit
def _query_ranges(n0, t_q, t_k, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                  WINDOW: tl.constexpr):
    """Query tiles a key block [n0, n0+BLOCK_N) is seen by, as lo <= full_lo <= full_hi <= hi:
    [lo, full_lo) and [full_hi, hi) are masked (causal diagonal; window edge and query tail)."""
    if CAUSAL:
        off = t_k - t_q
        lo = (tl.maximum(n0 - off, 0) // BLOCK_M) * BLOCK_M
        full_lo = tl.cdiv(tl.maximum(n0 + BLOCK_N - 1 - off, 0), BLOCK_M) * BLOCK_M
    else:
        off = 0
        lo = n0 * 0
        full_lo = lo
    if WINDOW:
        hi = tl.minimum(t_q, n0 + BLOCK_N - 1 + window - off)
        full_hi = (tl.maximum(tl.minimum(t_q, n0 + window - off), 0) // BLOCK_M) * BLOCK_M
    else:
        hi = t_q
        full_hi = (t_q // BLOCK_M) * BLOCK_M
    # A key block that runs past the end of the keys needs the key mask on every tile.
    full_hi = tl.where(n0 + BLOCK_N > t_k, 0, full_hi)
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)
    return lo, full_lo, full_hi, hi


@triton.jit
def _visible(rows_pos, cols, t_k, window, CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    """(rows, cols) mask of the keys each query sees; rows_pos are positions in key coordinates."""
    keep = cols[None, :] < t_k
    if CAUSAL:
        keep = keep & (cols[None, :] <= rows_pos[:, None])
    if WINDOW:
        keep = keep & (cols[None, :] > rows_pos[:, None] - window)
    return keep


# --------------------------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------------------------
@triton.jit
def _finite_or_zero(m, MASK: tl.constexpr):
    """The running max to subtract (docs/parallax-math.md#streaming). In masked tiles a row with no visible key
    yet has m = -inf: subtract 0 instead, so exp2 gives 0 rather than NaN (the row's m itself stays -inf)."""
    if MASK:
        m = tl.where(m == float("-inf"), 0.0, m)
    return m


@triton.jit
def _kv_scores(q, r, K, V, b_tma, hk_tma, k_base, v_base, k_offs, v_offs, n0, cols, t_k, offs_d,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr,
               DOT_PREC: tl.constexpr, TMA: tl.constexpr):
    """The K/V tile at key n0 of a loop over keys, and the unscaled, unmasked scores q·kᵀ and probe responses
    t = r·kᵀ of the query block against it."""
    k = _load_rows(K, k_base, k_offs, b_tma, n0, hk_tma, cols, t_k, offs_d, HEAD_DIM, BLOCK_D, BLOCK_N, MASK, TMA)
    v = _load_rows(V, v_base, v_offs, b_tma, n0, hk_tma, cols, t_k, offs_d, HEAD_DIM, BLOCK_D, BLOCK_N, MASK, TMA)
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
    t = tl.dot(r, tl.trans(k), input_precision=DOT_PREC)
    return k, v, qk, t


@triton.jit
def _fwd_tiles(
    o1, o2, d1, d2, m_i,
    q, r, K, V, b_tma, hk_tma, k_base, v_base, k_offs, v_offs, stride_kt, stride_vt,
    pos, offs_n, offs_d, lo, hi, t_k, window, qk_scale2,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    MASK: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, DOT_PREC: tl.constexpr,
    LAZY_RESCALE: tl.constexpr, TMA: tl.constexpr,
):
    k_base += lo.to(tl.int64) * stride_kt
    v_base += lo.to(tl.int64) * stride_vt
    for n0 in range(lo, hi, BLOCK_N):
        cols = n0 + offs_n
        # t beside qk, not after the exp: the later t spilled less but ran slower (benchmarks/RESULTS.md).
        _k, v, qk, t = _kv_scores(q, r, K, V, b_tma, hk_tma, k_base, v_base, k_offs, v_offs, n0, cols, t_k, offs_d,
                                  HEAD_DIM, BLOCK_D, BLOCK_N, MASK, DOT_PREC, TMA)
        if MASK:
            qk = tl.where(_visible(pos, cols, t_k, window, CAUSAL, WINDOW), qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale2)
        if LAZY_RESCALE:
            if tl.max((m_new > m_i + 8.0).to(tl.int32), 0) > 0:
                alpha = tl.math.exp2(m_i - _finite_or_zero(m_new, MASK))
                d1 = d1 * alpha
                d2 = d2 * alpha
                o1 = o1 * alpha[:, None]
                o2 = o2 * alpha[:, None]
                m_i = m_new
            w = tl.math.exp2(qk * qk_scale2 - _finite_or_zero(m_i, MASK)[:, None])
            wt = w * t
            d1 += tl.sum(w, 1)
            d2 += tl.sum(wt, 1)
            o1 = tl.dot(w.to(v.dtype), v, acc=o1, input_precision=DOT_PREC)
            o2 = tl.dot(wt.to(v.dtype), v, acc=o2, input_precision=DOT_PREC)
        else:
            m_sub = _finite_or_zero(m_new, MASK)
            alpha = tl.math.exp2(m_i - m_sub)
            w = tl.math.exp2(qk * qk_scale2 - m_sub[:, None])
            wt = w * t
            d1 = d1 * alpha + tl.sum(w, 1)
            d2 = d2 * alpha + tl.sum(wt, 1)
            o1 = tl.dot(w.to(v.dtype), v, acc=o1 * alpha[:, None], input_precision=DOT_PREC)
            o2 = tl.dot(wt.to(v.dtype), v, acc=o2 * alpha[:, None], input_precision=DOT_PREC)
            m_i = m_new
        k_base += BLOCK_N * stride_kt
        v_base += BLOCK_N * stride_vt
    return o1, o2, d1, d2, m_i


@triton.jit(do_not_specialize=["t_q", "t_k", "stat_len", "window"])
def _fwd_kernel(
    Q, R, K, V, O, VBAR, LSE, TBAR, CU_SEQLENS,
    sq_b, sq_t, sq_h, sq_d,
    sr_b, sr_t, sr_h, sr_d,
    sk_b, sk_t, sk_h, sk_d,
    sv_b, sv_t, sv_h, sv_d,
    so_b, so_t, so_h, so_d,
    t_q, t_k, n_heads, group, stat_len, window, qk_scale2,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, VARLEN: tl.constexpr, SAVE_STATS: tl.constexpr,
    DOT_PREC: tl.constexpr, LAZY_RESCALE: tl.constexpr, TMA: tl.constexpr,
):
    h, b, row0, t_q, t_k, m0 = _query_block(CU_SEQLENS, t_q, t_k, stat_len, BLOCK_M, CAUSAL, VARLEN)
    if m0 >= t_q:
        return
    hk = h // group

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_m = row0 + m0.to(tl.int64)
    q = _load_block(Q, b, sq_b, h, sq_h, row_m, sq_t, sq_d, offs_m, t_q, offs_d, BLOCK_M, HEAD_DIM, BLOCK_D)
    r = _load_block(R, b, sr_b, h, sr_h, row_m, sr_t, sr_d, offs_m, t_q, offs_d, BLOCK_M, HEAD_DIM, BLOCK_D)
    k_base, v_base, k_offs, v_offs, b_tma, hk_tma = _kv_loop_args(K, V, b, hk, row0, sk_b, sk_t, sk_h, sk_d, sv_b,
                                                                  sv_t, sv_h, sv_d, BLOCK_N, BLOCK_D, TMA)

    o1 = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    o2 = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    d1 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    d2 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    pos = _query_positions(offs_m, t_q, t_k, CAUSAL)
    lo, full_lo, full_hi, hi = _key_ranges(m0, t_q, t_k, window, BLOCK_M, BLOCK_N, CAUSAL, WINDOW)
    if WINDOW:
        o1, o2, d1, d2, m_i = _fwd_tiles(o1, o2, d1, d2, m_i, q, r, K, V, b_tma, hk_tma, k_base, v_base, k_offs,
                                         v_offs, sk_t, sv_t, pos, offs_n, offs_d, lo, full_lo, t_k, window, qk_scale2,
                                         HEAD_DIM, BLOCK_D, BLOCK_N, True, CAUSAL, WINDOW, DOT_PREC, LAZY_RESCALE, TMA)
    o1, o2, d1, d2, m_i = _fwd_tiles(o1, o2, d1, d2, m_i, q, r, K, V, b_tma, hk_tma, k_base, v_base, k_offs,
                                     v_offs, sk_t, sv_t, pos, offs_n, offs_d, full_lo, full_hi, t_k, window, qk_scale2,
                                     HEAD_DIM, BLOCK_D, BLOCK_N, False, CAUSAL, WINDOW, DOT_PREC, LAZY_RESCALE, TMA)
    o1, o2, d1, d2, m_i = _fwd_tiles(o1, o2, d1, d2, m_i, q, r, K, V, b_tma, hk_tma, k_base, v_base, k_offs,
                                     v_offs, sk_t, sv_t, pos, offs_n, offs_d, full_hi, hi, t_k, window, qk_scale2,
                                     HEAD_DIM, BLOCK_D, BLOCK_N, True, CAUSAL, WINDOW, DOT_PREC, LAZY_RESCALE, TMA)

    # Only rows past the end of the queries can see no key at all (d1 = 0); they are never stored.
    inv = 1.0 / tl.where(d1 > 0.0, d1, 1.0)
    vbar = o1 * inv[:, None]
    tbar = d2 * inv
    o = vbar * (1.0 + tbar)[:, None] - o2 * inv[:, None]
    o_off = _ptrs(0, b, so_b, h, so_h, row_m, so_t, so_d, BLOCK_M, BLOCK_D)
    _store_tile(O + o_off, o.to(O.dtype.element_ty), offs_m, t_q, offs_d, HEAD_DIM, BLOCK_D)
    if SAVE_STATS:
        _store_tile(VBAR + o_off, vbar.to(VBAR.dtype.element_ty), offs_m, t_q, offs_d, HEAD_DIM, BLOCK_D)
        stat = (b * n_heads + h) * stat_len + row0 + offs_m
        tl.store(LSE + stat, m_i + tl.math.log2(tl.maximum(d1, 1e-30)), mask=offs_m < t_q)
        tl.store(TBAR + stat, tbar, mask=offs_m < t_q)


# --------------------------------------------------------------------------------------------------------------
# Backward, kernel 1: the row terms T = dO·o and b = dO·v̄, then dq and dr
# --------------------------------------------------------------------------------------------------------------
@triton.jit
def _dq_tiles(
    dq, dr,
    q, r, do, lse, tbar1, b_minus_t, delta_b, K, V, b_tma, hk_tma, k_base, v_base, k_offs, v_offs,
    stride_kt, stride_vt, pos, offs_n, offs_d, lo, hi, t_k, window, qk_scale2,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    MASK: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, DOT_PREC: tl.constexpr, TMA: tl.constexpr,
):
    k_base += lo.to(tl.int64) * stride_kt
    v_base += lo.to(tl.int64) * stride_vt
    for n0 in range(lo, hi, BLOCK_N):
        cols = n0 + offs_n
        # The three score-sized products first, then both accumulating dots: faster than making each tile just
        # before its use (benchmarks/RESULTS.md).
        k, v, qk, t = _kv_scores(q, r, K, V, b_tma, hk_tma, k_base, v_base, k_offs, v_offs, n0, cols, t_k, offs_d,
                                 HEAD_DIM, BLOCK_D, BLOCK_N, MASK, DOT_PREC, TMA)
        a = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        p = tl.math.exp2(qk * qk_scale2 - lse[:, None])
        if MASK:
            p = tl.where(_visible(pos, cols, t_k, window, CAUSAL, WINDOW), p, 0.0)
        # With e = b - a and w = 1 + t̄ - t:  dT = p e,  dS = p ((b - T) - w e)  (docs/parallax-math.md#backward).
        e = delta_b[:, None] - a
        dt = p * e
        ds = p * (b_minus_t[:, None] - (tbar1[:, None] - t) * e)
        dq = tl.dot(ds.to(k.dtype), k, acc=dq, input_precision=DOT_PREC)
        dr = tl.dot(dt.to(k.dtype), k, acc=dr, input_precision=DOT_PREC)
        k_base += BLOCK_N * stride_kt
        v_base += BLOCK_N * stride_vt
    return dq, dr


@triton.jit(do_not_specialize=["t_q", "t_k", "stat_len", "window"])
def _bwd_dq_kernel(
    Q, R, K, V, O, VBAR, DO, LSE, TBAR, DELTA_T, DELTA_B, DQ, DR, CU_SEQLENS,
    sq_b, sq_t, sq_h, sq_d,
    sr_b, sr_t, sr_h, sr_d,
    sk_b, sk_t, sk_h, sk_d,
    sv_b, sv_t, sv_h, sv_d,
    so_b, so_t, so_h, so_d,
    sdo_b, sdo_t, sdo_h, sdo_d,
    sdq_b, sdq_t, sdq_h, sdq_d,
    t_q, t_k, n_heads, group, stat_len, window, qk_scale2, scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, VARLEN: tl.constexpr, DOT_PREC: tl.constexpr, TMA: tl.constexpr,
):
    h, b, row0, t_q, t_k, m0 = _query_block(CU_SEQLENS, t_q, t_k, stat_len, BLOCK_M, CAUSAL, VARLEN)
    if m0 >= t_q:
        return
    hk = h // group

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < t_q
    row_m = row0 + m0.to(tl.int64)
    q = _load_block(Q, b, sq_b, h, sq_h, row_m, sq_t, sq_d, offs_m, t_q, offs_d, BLOCK_M, HEAD_DIM, BLOCK_D)
    r = _load_block(R, b, sr_b, h, sr_h, row_m, sr_t, sr_d, offs_m, t_q, offs_d, BLOCK_M, HEAD_DIM, BLOCK_D)
    do = _load_block(DO, b, sdo_b, h, sdo_h, row_m, sdo_t, sdo_d, offs_m, t_q, offs_d, BLOCK_M, HEAD_DIM, BLOCK_D)
    o_off = _ptrs(0, b, so_b, h, so_h, row_m, so_t, so_d, BLOCK_M, BLOCK_D)
    o = _load_tile(O + o_off, offs_m, t_q, offs_d, HEAD_DIM, BLOCK_D, True)
    vbar = _load_tile(VBAR + o_off, offs_m, t_q, offs_d, HEAD_DIM, BLOCK_D, True)
    do32 = do.to(tl.float32)
    delta_t = tl.sum(do32 * o.to(tl.float32), 1)
    delta_b = tl.sum(do32 * vbar.to(tl.float32), 1)
    stat = (b * n_heads + h) * stat_len + row0 + offs_m
    tl.store(DELTA_T + stat, delta_t, mask=row_ok)
    tl.store(DELTA_B + stat, delta_b, mask=row_ok)
    # Rows past the end get lse = +inf, hence p = 0: they add nothing and need no mask in full tiles.
    lse = tl.load(LSE + stat, mask=row_ok, other=float("inf"))
    tbar1 = 1.0 + tl.load(TBAR + stat, mask=row_ok, other=0.0)
    b_minus_t = delta_b - delta_t

    k_base, v_base, k_offs, v_offs, b_tma, hk_tma = _kv_loop_args(K, V, b, hk, row0, sk_b, sk_t, sk_h, sk_d, sv_b,
                                                                  sv_t, sv_h, sv_d, BLOCK_N, BLOCK_D, TMA)
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    dr = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    pos = _query_positions(offs_m, t_q, t_k, CAUSAL)
    lo, full_lo, full_hi, hi = _key_ranges(m0, t_q, t_k, window, BLOCK_M, BLOCK_N, CAUSAL, WINDOW)
    if WINDOW:
        dq, dr = _dq_tiles(dq, dr, q, r, do, lse, tbar1, b_minus_t, delta_b, K, V, b_tma, hk_tma, k_base, v_base,
                           k_offs, v_offs, sk_t, sv_t, pos, offs_n, offs_d, lo, full_lo, t_k, window, qk_scale2,
                           HEAD_DIM, BLOCK_D, BLOCK_N, True, CAUSAL, WINDOW, DOT_PREC, TMA)
    dq, dr = _dq_tiles(dq, dr, q, r, do, lse, tbar1, b_minus_t, delta_b, K, V, b_tma, hk_tma, k_base, v_base, k_offs,
                       v_offs, sk_t, sv_t, pos, offs_n, offs_d, full_lo, full_hi, t_k, window, qk_scale2,
                       HEAD_DIM, BLOCK_D, BLOCK_N, False, CAUSAL, WINDOW, DOT_PREC, TMA)
    dq, dr = _dq_tiles(dq, dr, q, r, do, lse, tbar1, b_minus_t, delta_b, K, V, b_tma, hk_tma, k_base, v_base, k_offs,
                       v_offs, sk_t, sv_t, pos, offs_n, offs_d, full_hi, hi, t_k, window, qk_scale2,
                       HEAD_DIM, BLOCK_D, BLOCK_N, True, CAUSAL, WINDOW, DOT_PREC, TMA)

    dq_off = _ptrs(0, b, sdq_b, h, sdq_h, row_m, sdq_t, sdq_d, BLOCK_M, BLOCK_D)
    _store_tile(DQ + dq_off, (dq * scale).to(DQ.dtype.element_ty), offs_m, t_q, offs_d, HEAD_DIM, BLOCK_D)
    _store_tile(DR + dq_off, dr.to(DR.dtype.element_ty), offs_m, t_q, offs_d, HEAD_DIM, BLOCK_D)


# --------------------------------------------------------------------------------------------------------------
# Backward, kernel 2: dk and dv, summed over the query heads of a GQA group
# --------------------------------------------------------------------------------------------------------------
@triton.jit
def _row_stat(PTR, rows, t_q, other, MASK: tl.constexpr):
    """A per-row statistic of the query rows `rows`; `other` past t_q, checked only in masked tiles."""
    if MASK:
        x = tl.load(PTR + rows, mask=rows < t_q, other=other)
    else:
        x = tl.load(PTR + rows)
    return x


@triton.jit
def _dkv_tiles(
    dk, dv,
    k, v, Q, R, DO, b_tma, h_tma, q_base, r_base, do_base, q_offs, r_offs, do_offs, stat_base,
    LSE, TBAR, DELTA_T, DELTA_B, stride_qt, stride_rt, stride_dot,
    cols, offs_m, offs_d, lo, hi, t_q, t_k, off, window, qk_scale2, scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    MASK: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, DOT_PREC: tl.constexpr, TMA: tl.constexpr,
):
    """Transposed tiles (keys × queries), so dk and dv accumulate as plain (P-like)ᵀ·(query-side) products."""
    q_base += lo.to(tl.int64) * stride_qt
    r_base += lo.to(tl.int64) * stride_rt
    do_base += lo.to(tl.int64) * stride_dot
    for m0 in range(lo, hi, BLOCK_M):
        rows = m0 + offs_m
        q = _load_rows(Q, q_base, q_offs, b_tma, m0, h_tma, rows, t_q, offs_d, HEAD_DIM, BLOCK_D, BLOCK_M, MASK, TMA)
        r = _load_rows(R, r_base, r_offs, b_tma, m0, h_tma, rows, t_q, offs_d, HEAD_DIM, BLOCK_D, BLOCK_M, MASK, TMA)
        do = _load_rows(DO, do_base, do_offs, b_tma, m0, h_tma, rows, t_q, offs_d, HEAD_DIM, BLOCK_D, BLOCK_M, MASK,
                        TMA)
        lse = _row_stat(LSE + stat_base, rows, t_q, float("inf"), MASK)  # p = 0 past the queries
        tbar = _row_stat(TBAR + stat_base, rows, t_q, 0.0, MASK)
        delta_t = _row_stat(DELTA_T + stat_base, rows, t_q, 0.0, MASK)
        delta_b = _row_stat(DELTA_B + stat_base, rows, t_q, 0.0, MASK)
        qk_t = tl.dot(k, tl.trans(q), input_precision=DOT_PREC)
        t_t = tl.dot(k, tl.trans(r), input_precision=DOT_PREC)
        p_t = tl.math.exp2(qk_t * qk_scale2 - lse[None, :])
        if MASK:
            keep = (cols[:, None] < t_k) & (rows[None, :] < t_q)
            if CAUSAL:
                keep = keep & (cols[:, None] <= rows[None, :] + off)
            if WINDOW:
                keep = keep & (cols[:, None] > rows[None, :] + off - window)
            p_t = tl.where(keep, p_t, 0.0)
        # With e = b - a and w = 1 + t̄ - t:  dv weights p w,  dT = p e,  dS = p (b - T) - p w e
        # (docs/parallax-math.md#backward).
        pw_t = p_t * ((1.0 + tbar)[None, :] - t_t)
        dv = tl.dot(pw_t.to(do.dtype), do, acc=dv, input_precision=DOT_PREC)
        a_t = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)  # made after dv: fewer tiles alive at once
        e_t = delta_b[None, :] - a_t
        ds_t = p_t * ((delta_b - delta_t) * scale)[None, :] - pw_t * e_t * scale
        dk = tl.dot(ds_t.to(q.dtype), q, acc=dk, input_precision=DOT_PREC)
        dk = tl.dot((p_t * e_t).to(r.dtype), r, acc=dk, input_precision=DOT_PREC)
        q_base += BLOCK_M * stride_qt
        r_base += BLOCK_M * stride_rt
        do_base += BLOCK_M * stride_dot

    return dk, dv


@triton.jit(do_not_specialize=["t_q", "t_k", "stat_len", "window"])
def _bwd_dkv_kernel(
    Q, R, K, V, DO, LSE, TBAR, DELTA_T, DELTA_B, DK, DV, CU_SEQLENS,
    sq_b, sq_t, sq_h, sq_d,
    sr_b, sr_t, sr_h, sr_d,
    sk_b, sk_t, sk_h, sk_d,
    sv_b, sv_t, sv_h, sv_d,
    sdo_b, sdo_t, sdo_h, sdo_d,
    sdk_b, sdk_t, sdk_h, sdk_d,
    t_q, t_k, n_heads, group, stat_len, window, qk_scale2, scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, VARLEN: tl.constexpr, DOT_PREC: tl.constexpr, TMA: tl.constexpr,
):
    pid_n = tl.program_id(0)
    hk = tl.program_id(1)
    b, row0, t_q, t_k = _sequence(CU_SEQLENS, tl.program_id(2), t_q, t_k, stat_len, VARLEN)
    n0 = pid_n * BLOCK_N
    if n0 >= t_k:
        return

    cols = n0 + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_n = row0 + n0.to(tl.int64)
    k = _load_block(K, b, sk_b, hk, sk_h, row_n, sk_t, sk_d, cols, t_k, offs_d, BLOCK_N, HEAD_DIM, BLOCK_D)
    v = _load_block(V, b, sv_b, hk, sv_h, row_n, sv_t, sv_d, cols, t_k, offs_d, BLOCK_N, HEAD_DIM, BLOCK_D)
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    if CAUSAL:
        off = t_k - t_q
    else:
        off = 0
    lo, full_lo, full_hi, hi = _query_ranges(n0, t_q, t_k, window, BLOCK_M, BLOCK_N, CAUSAL, WINDOW)
    q_offs = _tile_offsets(sq_t, sq_d, BLOCK_M, BLOCK_D)
    r_offs = _tile_offsets(sr_t, sr_d, BLOCK_M, BLOCK_D)
    do_offs = _tile_offsets(sdo_t, sdo_d, BLOCK_M, BLOCK_D)
    for g in range(group):
        h = hk * group + g
        q_base = _loop_base(Q, b, sq_b, h, sq_h, row0, sq_t, TMA)
        r_base = _loop_base(R, b, sr_b, h, sr_h, row0, sr_t, TMA)
        do_base = _loop_base(DO, b, sdo_b, h, sdo_h, row0, sdo_t, TMA)
        b_tma, h_tma = _tma_coords(b, h, TMA)
        stat_base = (b * n_heads + h) * stat_len + row0
        if CAUSAL:
            dk, dv = _dkv_tiles(dk, dv, k, v, Q, R, DO, b_tma, h_tma, q_base, r_base, do_base, q_offs, r_offs,
                                do_offs, stat_base, LSE, TBAR, DELTA_T, DELTA_B,
                                sq_t, sr_t, sdo_t, cols, offs_m, offs_d, lo, full_lo, t_q, t_k, off, window,
                                qk_scale2, scale, HEAD_DIM, BLOCK_D, BLOCK_M, True, CAUSAL, WINDOW, DOT_PREC, TMA)
        dk, dv = _dkv_tiles(dk, dv, k, v, Q, R, DO, b_tma, h_tma, q_base, r_base, do_base, q_offs, r_offs,
                            do_offs, stat_base, LSE, TBAR, DELTA_T, DELTA_B,
                            sq_t, sr_t, sdo_t, cols, offs_m, offs_d, full_lo, full_hi, t_q, t_k, off, window,
                            qk_scale2, scale, HEAD_DIM, BLOCK_D, BLOCK_M, False, CAUSAL, WINDOW, DOT_PREC, TMA)
        dk, dv = _dkv_tiles(dk, dv, k, v, Q, R, DO, b_tma, h_tma, q_base, r_base, do_base, q_offs, r_offs,
                            do_offs, stat_base, LSE, TBAR, DELTA_T, DELTA_B,
                            sq_t, sr_t, sdo_t, cols, offs_m, offs_d, full_hi, hi, t_q, t_k, off, window,
                            qk_scale2, scale, HEAD_DIM, BLOCK_D, BLOCK_M, True, CAUSAL, WINDOW, DOT_PREC, TMA)

    dk_off = _ptrs(0, b, sdk_b, hk, sdk_h, row_n, sdk_t, sdk_d, BLOCK_N, BLOCK_D)
    _store_tile(DK + dk_off, dk.to(DK.dtype.element_ty), cols, t_k, offs_d, HEAD_DIM, BLOCK_D)
    _store_tile(DV + dk_off, dv.to(DV.dtype.element_ty), cols, t_k, offs_d, HEAD_DIM, BLOCK_D)


# fmt: on


# --------------------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------------------
def _tma_strides(t: torch.Tensor) -> tuple[int, ...] | None:
    """Strides for a TMA descriptor of t, or None where t is not laid out row-major: every stride 16-byte
    aligned and at least the extent of the dims inside it (padding allowed, as in a view of a fused qrkv
    projection; a transposed or expanded view is refused). A size-1 dim gets that extent as its stride."""
    return _row_major_strides(tuple(t.shape), t.stride(), t.element_size())


@functools.lru_cache(maxsize=256)
def _row_major_strides(shape: tuple, stride: tuple, element_size: int) -> tuple[int, ...] | None:
    # Cached on the layout alone: a training step calls this a few times per layer with the same layouts.
    if stride[-1] != 1:
        return None
    strides, extent = [1], shape[-1]
    for d in range(len(shape) - 2, -1, -1):
        st = stride[d] if shape[d] > 1 else extent
        if st < extent or st * element_size % 16:
            return None
        strides.insert(0, st)
        extent = st * shape[d]
    return tuple(strides)


def _tma_layouts(tensors, cu_seqlens) -> list[tuple[int, ...]] | None:
    """The descriptor strides of each of these (B, T, H, D) tensors, or None where their tiles cannot be read
    through TMA: before Hopper (the interpreter can), a base not 16-byte aligned, strides not row-major
    (_tma_strides). Packed (varlen) batches keep pointer loads: a descriptor only zero-fills past the whole
    tensor, not past a sequence, and a tile there must read zeros rather than the next sequence's rows."""
    if cu_seqlens is not None:
        return None
    x = tensors[0]
    if x.device.type == "cuda" and not interpreting() and _capability(_device_index(x.device))[0] < 9:
        return None
    layouts = [_tma_strides(t) if t.data_ptr() % 16 == 0 else None for t in tensors]
    return None if None in layouts else layouts


def _descriptors(tensors, cu_seqlens, rows: int, head_dim: int):
    """TMA descriptors reading (rows, padded head dim) tiles of one head of each (B, T, H, D) tensor, or None
    where the tensors do not allow them (_tma_layouts)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    layouts = _tma_layouts(tensors, cu_seqlens)
    if layouts is None:
        return None
    block = [1, rows, 1, _block_d(head_dim)]
    return [TensorDescriptor(t, list(t.shape), list(st), block) for t, st in zip(tensors, layouts)]


def _layout(q, k, cu_seqlens, max_seqlen):
    """(programs over sequences, query length, key length, longest query length, stats length)."""
    if cu_seqlens is not None:
        return cu_seqlens.numel() - 1, 0, 0, max_seqlen, q.shape[1]
    return q.shape[0], q.shape[1], k.shape[1], q.shape[1], q.shape[1]


# Registers and spills of the last compiled launch of each kernel ("fwd", "dq", "dkv"), for the benchmark's
# config sweep: a spilling config is the usual reason a larger tile is slower. Empty under the interpreter.
LAUNCH_STATS: dict[str, tuple[int, int]] = {}


def _record(name: str, compiled) -> None:
    regs, spills = getattr(compiled, "n_regs", None), getattr(compiled, "n_spills", None)
    if regs is not None:
        LAUNCH_STATS[name] = (regs, spills)


def parallax_fwd_triton(
    q, r, k, v, causal: bool, scale: float, window_size: int | None, cu_seqlens=None, max_seqlen: int = 0,
    save_stats: bool = True, config: KernelConfig | None = None,
):  # fmt: skip
    """Forward kernel. Returns o and, with save_stats, (v̄, lse in base 2, t̄) for the backward
    (lse and t̄ as float32 (B, H_q, T_q)); without, those three are empty tensors."""
    B, Tq, Hq, D = q.shape
    Hkv = k.shape[2]
    cfg = config or default_configs(D, q.dtype, q.device).fwd
    n_seq, t_q, t_k, max_q, stat_len = _layout(q, k, cu_seqlens, max_seqlen)
    o = empty((B, Tq, Hq, D), dtype=q.dtype, device=q.device)
    if save_stats:
        vbar = empty((B, Tq, Hq, D), dtype=q.dtype, device=q.device)
        lse = empty((B, Hq, Tq), dtype=torch.float32, device=q.device)
        tbar = empty((B, Hq, Tq), dtype=torch.float32, device=q.device)
    else:
        # Distinct (never aliased) placeholders: custom ops may not return one tensor twice.
        vbar = q.new_empty(0)
        lse = q.new_empty(0, dtype=torch.float32)
        tbar = q.new_empty(0, dtype=torch.float32)
    # Without varlen the kernel never reads CU_SEQLENS (only `if VARLEN` code does): pass o rather than allocate a
    # placeholder on every call. Its pointer has q's dtype, which the kernel already specializes on.
    cu = cu_seqlens if cu_seqlens is not None else o
    descs = _descriptors((k, v), cu_seqlens, cfg.block_n, D) if cfg.tma else None
    k_in, v_in = descs or (k, v)
    grid = (triton.cdiv(max_q, cfg.block_m), Hq, n_seq)
    # fmt: off
    compiled = _fwd_kernel[grid](
        q, r, k_in, v_in, o, vbar if save_stats else o, lse, tbar, cu,
        *q.stride(), *r.stride(), *k.stride(), *v.stride(), *o.stride(),
        t_q, t_k, Hq, Hq // Hkv, stat_len, window_size or 0, scale * LOG2E,
        HEAD_DIM=D, BLOCK_D=_block_d(D), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        CAUSAL=causal, WINDOW=window_size is not None, VARLEN=cu_seqlens is not None, SAVE_STATS=save_stats,
        DOT_PREC=_dot_precision(q.dtype), LAZY_RESCALE=cfg.lazy_rescale, TMA=descs is not None, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    # fmt: on
    _record("fwd", compiled)
    return o, vbar, lse, tbar


def parallax_bwd_triton(
    q, r, k, v, o, vbar, lse, tbar, do, causal: bool, scale: float, window_size: int | None, cu_seqlens=None,
    max_seqlen: int = 0, dq_config: KernelConfig | None = None, dkv_config: KernelConfig | None = None,
):  # fmt: skip
    """Backward kernels. Returns (dq, dr, dk, dv) in the input dtype, shaped like q, r, k, v."""
    B, Tq, Hq, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    if o.stride() != vbar.stride():
        raise ValueError("parallax backward: o and vbar must share strides (both come from the forward)")
    cfgs = default_configs(D, q.dtype, q.device)
    dq_cfg, dkv_cfg = dq_config or cfgs.dq, dkv_config or cfgs.dkv
    n_seq, t_q, t_k, max_q, stat_len = _layout(q, k, cu_seqlens, max_seqlen)
    max_k = max_q if cu_seqlens is not None else Tk
    delta_t = empty((B, Hq, Tq), dtype=torch.float32, device=q.device)
    delta_b = empty((B, Hq, Tq), dtype=torch.float32, device=q.device)
    dq = empty((B, Tq, Hq, D), dtype=q.dtype, device=q.device)
    dr = empty((B, Tq, Hq, D), dtype=q.dtype, device=q.device)
    dk = empty((B, Tk, Hkv, D), dtype=k.dtype, device=k.device)
    dv = empty((B, Tk, Hkv, D), dtype=k.dtype, device=k.device)
    cu = cu_seqlens if cu_seqlens is not None else dq  # never read without VARLEN (see parallax_fwd_triton)
    common = dict(
        HEAD_DIM=D, BLOCK_D=_block_d(D), CAUSAL=causal, WINDOW=window_size is not None,
        VARLEN=cu_seqlens is not None, DOT_PREC=_dot_precision(q.dtype),
    )  # fmt: skip
    kv_descs = _descriptors((k, v), cu_seqlens, dq_cfg.block_n, D) if dq_cfg.tma else None
    k_in, v_in = kv_descs or (k, v)
    qrdo_descs = _descriptors((q, r, do), cu_seqlens, dkv_cfg.block_m, D) if dkv_cfg.tma else None
    q_in, r_in, do_in = qrdo_descs or (q, r, do)
    # The dQ/dR kernel also writes T = dO·o and b = dO·v̄ (delta_t, delta_b), which the dK/dV kernel reads.
    # fmt: off
    compiled_dq = _bwd_dq_kernel[(triton.cdiv(max_q, dq_cfg.block_m), Hq, n_seq)](
        q, r, k_in, v_in, o, vbar, do, lse, tbar, delta_t, delta_b, dq, dr, cu,
        *q.stride(), *r.stride(), *k.stride(), *v.stride(), *o.stride(), *do.stride(), *dq.stride(),
        t_q, t_k, Hq, Hq // Hkv, stat_len, window_size or 0, scale * LOG2E, scale,
        BLOCK_M=dq_cfg.block_m, BLOCK_N=dq_cfg.block_n, TMA=kv_descs is not None, num_warps=dq_cfg.num_warps,
        num_stages=dq_cfg.num_stages, **common,
    )
    compiled_dkv = _bwd_dkv_kernel[(triton.cdiv(max_k, dkv_cfg.block_n), Hkv, n_seq)](
        q_in, r_in, k, v, do_in, lse, tbar, delta_t, delta_b, dk, dv, cu,
        *q.stride(), *r.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(),
        t_q, t_k, Hq, Hq // Hkv, stat_len, window_size or 0, scale * LOG2E, scale,
        BLOCK_M=dkv_cfg.block_m, BLOCK_N=dkv_cfg.block_n, TMA=qrdo_descs is not None, num_warps=dkv_cfg.num_warps,
        num_stages=dkv_cfg.num_stages, **common,
    )
    # fmt: on
    _record("dq", compiled_dq)
    _record("dkv", compiled_dkv)
    return dq, dr, dk, dv
