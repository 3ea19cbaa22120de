"""Triton kernels for the two symmetric products of a Newton–Schulz step (the CUDA fast path).

    A = X Xᵀ               and          B = b·A + c·A A  (= b·A + c·A Aᵀ, A symmetric)

are both ``out = alpha·M Mᵀ + beta·C`` with a symmetric result, so one kernel computes only the tiles on and
above the diagonal and writes each off-diagonal tile twice (as itself and transposed): half the tensor-core
work of a dense matmul. The third product a·X + B X is a plain ``baddbmm`` (cuBLAS).

Accumulation is fp32; the epilogue ``alpha·acc + beta·C`` is computed in fp32 and rounded once to the
output dtype, the same contract as ``torch.baddbmm`` (cuBLAS), so results differ from the torch path only by
fp32 summation order.

This module imports triton at import time, so ``parallax_muon`` imports it lazily, only on the CUDA path
(or when a test asks for it under ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _upper_tile(pid, tiles):
    """The pid-th tile (ti, tj), ti <= tj, of a tiles×tiles grid, enumerating the upper triangle row by row.

    Row ti starts at index ti·tiles − ti·(ti−1)/2. ti comes from the quadratic formula in fp32 and is then
    corrected by one in either direction, so rounding in the square root cannot pick a wrong row.
    """
    t = tiles.to(tl.float32)
    p = pid.to(tl.float32)
    disc = (2.0 * t + 1.0) * (2.0 * t + 1.0) - 8.0 * p
    ti = tl.floor(((2.0 * t + 1.0) - tl.sqrt(disc)) / 2.0).to(tl.int32)
    ti = tl.maximum(tl.minimum(ti, tiles - 1), 0)
    start = ti * tiles - (ti * (ti - 1)) // 2
    ti = tl.where(start > pid, ti - 1, ti)
    start = ti * tiles - (ti * (ti - 1)) // 2
    nxt = start + (tiles - ti)
    ti = tl.where(pid >= nxt, ti + 1, ti)
    start = ti * tiles - (ti * (ti - 1)) // 2
    tj = ti + (pid - start)
    return ti, tj


@triton.jit
def _sym_mmt_kernel(
    M,
    C,
    Out,
    n,
    k,
    alpha,
    beta,
    stride_mb,
    stride_mr,
    stride_mk,
    stride_cb,
    stride_cr,
    stride_cc,
    stride_ob,
    stride_or,
    stride_oc,
    HAS_C: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # One program per (upper-triangular output tile, matrix of the batch).
    pid = tl.program_id(0)
    bid = tl.program_id(1).to(tl.int64)
    ti, tj = _upper_tile(pid, tl.cdiv(n, BLOCK))
    rows_i = ti * BLOCK + tl.arange(0, BLOCK)
    rows_j = tj * BLOCK + tl.arange(0, BLOCK)
    offs_k = tl.arange(0, BLOCK_K)
    base = M + bid * stride_mb
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for k0 in range(0, k, BLOCK_K):
        kk = k0 + offs_k
        kmask = kk[None, :] < k
        a = tl.load(
            base + rows_i[:, None] * stride_mr + kk[None, :] * stride_mk, mask=(rows_i[:, None] < n) & kmask, other=0.0
        )
        b = tl.load(
            base + rows_j[:, None] * stride_mr + kk[None, :] * stride_mk, mask=(rows_j[:, None] < n) & kmask, other=0.0
        )
        if IEEE:
            acc = tl.dot(a, tl.trans(b), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, tl.trans(b), acc)
    acc = acc * alpha
    mask_ij = (rows_i[:, None] < n) & (rows_j[None, :] < n)
    if HAS_C:
        c = tl.load(
            C + bid * stride_cb + rows_i[:, None] * stride_cr + rows_j[None, :] * stride_cc, mask=mask_ij, other=0.0
        )
        acc += beta * c.to(tl.float32)
    out = acc.to(Out.dtype.element_ty)
    obase = Out + bid * stride_ob
    tl.store(obase + rows_i[:, None] * stride_or + rows_j[None, :] * stride_oc, out, mask=mask_ij)
    if ti != tj:
        # The mirror tile (tj, ti) is the transpose: out[rows_j, rows_i] = tile.T.
        mask_ji = (rows_j[:, None] < n) & (rows_i[None, :] < n)
        tl.store(obase + rows_j[:, None] * stride_or + rows_i[None, :] * stride_oc, tl.trans(out), mask=mask_ji)


# A small pruned set for Hopper-class GPUs, tuned once per (n, k) shape class at the first step (seconds).
# Square output tiles only: the mirror store writes a BLOCK×BLOCK tile transposed.
_CONFIGS = [
    triton.Config({"BLOCK": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK": 128, "BLOCK_K": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK": 128, "BLOCK_K": 32}, num_warps=4, num_stages=5),
    triton.Config({"BLOCK": 128, "BLOCK_K": 128}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK": 64, "BLOCK_K": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK": 64, "BLOCK_K": 128}, num_warps=4, num_stages=3),
]
_sym_mmt_tuned = triton.autotune(configs=_CONFIGS, key=["n", "k", "HAS_C"])(_sym_mmt_kernel)


def _autotune_enabled(device: torch.device) -> bool:
    return device.type == "cuda" and os.environ.get("PARALLAX_MUON_AUTOTUNE", "1") != "0"


def sym_mmt(
    M: Tensor,
    *,
    alpha: float = 1.0,
    beta: float = 0.0,
    C: Tensor | None = None,
    out: Tensor | None = None,
    block: int | None = None,
    block_k: int | None = None,
) -> Tensor:
    """``out = alpha · M Mᵀ + beta · C`` for a batch ``M`` (N, n, k); C, out: (N, n, n), C symmetric.

    Only the tiles on and above the diagonal are computed; the ones below are written as their mirror.
    Without ``block``, CUDA launches are autotuned over a few configurations (``PARALLAX_MUON_AUTOTUNE=0``
    picks a fixed 128×128×64 one); tests pass small blocks for the interpreter.
    """
    if M.ndim != 3:
        raise ValueError(f"sym_mmt expects a batch (N, n, k), got shape {tuple(M.shape)}")
    N, n, k = M.shape
    if out is None:
        out = M.new_empty(N, n, n)
    if tuple(out.shape) != (N, n, n):
        raise ValueError(f"sym_mmt: out has shape {tuple(out.shape)}, expected {(N, n, n)}")
    if C is not None and tuple(C.shape) != (N, n, n):
        raise ValueError(f"sym_mmt: C has shape {tuple(C.shape)}, expected {(N, n, n)}")
    if out.data_ptr() == M.data_ptr() or (C is not None and out.data_ptr() == C.data_ptr()):
        raise ValueError("sym_mmt: out must not alias M or C (other programs still read them)")
    Cc = C if C is not None else out  # never read when HAS_C is False
    args = (M, Cc, out, n, k, float(alpha), float(beta), *M.stride(), *Cc.stride(), *out.stride())
    flags = {"HAS_C": C is not None, "IEEE": M.dtype == torch.float32}

    def grid(meta):
        tiles = triton.cdiv(n, meta["BLOCK"])
        return (tiles * (tiles + 1) // 2, N)

    if block is None and _autotune_enabled(M.device):
        _sym_mmt_tuned[grid](*args, **flags)
    else:
        meta = {"BLOCK": block or 128, "BLOCK_K": block_k or 64}
        _sym_mmt_kernel[grid(meta)](*args, **flags, **meta, num_warps=4, num_stages=3)
    return out


def iterate(X: Tensor, per_step: Sequence[tuple[float, float, float]], **launch) -> Tensor:
    """Newton–Schulz steps on a normalised wide batch X (N, n, m) with the symmetric kernels."""
    N, n = X.shape[:2]
    X = X.contiguous()
    A = X.new_empty(N, n, n)
    B = X.new_empty(N, n, n)
    Z = torch.empty_like(X)
    for a, b, c in per_step:
        sym_mmt(X, out=A, **launch)
        sym_mmt(A, alpha=c, beta=b, C=A, out=B, **launch)
        torch.baddbmm(X, B, X, beta=a, out=Z)
        X, Z = Z, X
    return X
