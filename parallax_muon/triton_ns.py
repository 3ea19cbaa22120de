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

import functools
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _sym_mmt_kernel(
    M,
    C,
    Out,
    pairs,
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
    BLOCK: tl.constexpr,
    BLOCK_K: tl.constexpr,
    IEEE: tl.constexpr,
):
    # One program per (upper-triangular tile pair, matrix of the batch). `pairs` lists (ti, tj) with ti <= tj.
    pid = tl.program_id(0)
    bid = tl.program_id(1).to(tl.int64)
    ti = tl.load(pairs + 2 * pid)
    tj = tl.load(pairs + 2 * pid + 1)
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
        # The mirror tile (tj, ti) is the transpose: out[rows_j, rows_i] = out_tile.T.
        mask_ji = (rows_j[:, None] < n) & (rows_i[None, :] < n)
        tl.store(obase + rows_j[:, None] * stride_or + rows_i[None, :] * stride_oc, tl.trans(out), mask=mask_ji)


@functools.lru_cache(maxsize=64)
def _tile_pairs(tiles: int, device: str) -> Tensor:
    """(ti, tj) for every tile on or above the diagonal, flattened; int32 on ``device``."""
    pairs = [(i, j) for i in range(tiles) for j in range(i, tiles)]
    return torch.tensor(pairs, dtype=torch.int32, device=device).flatten()


# Hopper-class defaults for bf16: 128×128 output tiles (64 for small Gram matrices), 64-wide K slices.
def _launch_config(n: int, dtype: torch.dtype) -> dict:
    if n <= 256:
        return {"BLOCK": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3}
    return {"BLOCK": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3}


def sym_mmt(
    M: Tensor,
    *,
    alpha: float = 1.0,
    beta: float = 0.0,
    C: Tensor | None = None,
    out: Tensor | None = None,
    block: int | None = None,
    block_k: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> Tensor:
    """``out = alpha · M Mᵀ + beta · C`` for a batch ``M`` (N, n, k); C, out: (N, n, n), C symmetric.

    Only the upper-triangular tiles are computed; the lower ones are written as their mirror. Block sizes
    default to a GPU configuration; tests pass small ones for the interpreter.
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
    cfg = _launch_config(n, M.dtype)
    BLOCK = block or cfg["BLOCK"]
    BLOCK_K = block_k or cfg["BLOCK_K"]
    tiles = triton.cdiv(n, BLOCK)
    pairs = _tile_pairs(tiles, str(M.device))
    Cc = C if C is not None else out  # never read when HAS_C is False
    grid = (tiles * (tiles + 1) // 2, N)
    _sym_mmt_kernel[grid](
        M,
        Cc,
        out,
        pairs,
        n,
        k,
        float(alpha),
        float(beta),
        *M.stride(),
        *Cc.stride(),
        *out.stride(),
        HAS_C=C is not None,
        BLOCK=BLOCK,
        BLOCK_K=BLOCK_K,
        IEEE=M.dtype == torch.float32,
        num_warps=num_warps or cfg["num_warps"],
        num_stages=num_stages or cfg["num_stages"],
    )
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
