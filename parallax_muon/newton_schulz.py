"""Newton–Schulz orthogonalization: the map G = U S Vᵀ  ↦  ≈ U Vᵀ at the heart of Muon.

Each step applies the odd quintic p(X) = a·X + b·(X Xᵀ) X + c·(X Xᵀ)² X, written as three matrix products

    A = X Xᵀ            (symmetric)
    B = b·A + c·A A     (symmetric)
    X ← a·X + B X

on the wide orientation of the matrix (rows ≤ cols), so the Gram matrix A is the small one. The input is
first scaled by its Frobenius norm (times a safety factor for the Polar Express list), which bounds the
spectral norm by 1, where the polynomials are designed to work.

Precision follows ``torch.optim.Muon``: the iterate lives in bf16, every product accumulates in fp32 and is
rounded to bf16 once (``baddbmm``'s ``beta·C + alpha·A B`` is one fused, once-rounded operation on both CPU
and CUDA), and the norm is taken of the bf16 values. On CPU this reproduces torch's result bit for bit.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

Coefficients = tuple[float, float, float]

# Keller Jordan's quintic: the slope at zero is maximised, so small singular values grow fast, at the price of
# not converging to exactly 1: outputs land in roughly [0.7, 1.13].
JORDAN: Coefficients = (3.4445, -4.7750, 2.0315)

# Polar Express (Amsel, Persson, Musco, Gower 2025, arXiv:2505.16932): one minimax-optimal quintic per step,
# computed for 5 steps with safety factor 2e-2 and cushion 2, as used by modded-nanogpt and microsoft/dion.
# The 1.02 safety factor is also applied to the normalisation (divide by 1.02·‖G‖_F).
POLAR_EXPRESS: tuple[Coefficients, ...] = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
POLAR_EXPRESS_NORM_SCALE = 1.02

PRESETS = ("jordan", "polar_express")
BACKENDS = ("auto", "torch", "triton")
DEFAULT_EPS = 1e-7  # torch.optim.Muon's clamp on the norm: an all-zero input stays zero instead of NaN

# The Triton kernels pay off once the Gram matrix has a few tiles; below this the launch overhead wins.
_TRITON_MIN_ROWS = 256


def resolve_coefficients(coefficients, steps: int) -> tuple[tuple[Coefficients, ...], float]:
    """The per-step (a, b, c) list for ``steps`` steps, and the default normalisation factor.

    A preset name or a user list of (a, b, c). A list shorter than ``steps`` repeats its last entry
    (a one-entry list is the same polynomial every step); a longer one is cut to ``steps``.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"ns_steps must be a positive int, got {steps!r}")
    if isinstance(coefficients, str):
        if coefficients == "jordan":
            base, scale = (JORDAN,), 1.0
        elif coefficients == "polar_express":
            base, scale = POLAR_EXPRESS, POLAR_EXPRESS_NORM_SCALE
        else:
            raise ValueError(
                f"unknown Newton–Schulz coefficient preset {coefficients!r}; expected one of {PRESETS} "
                "or a list of (a, b, c) tuples"
            )
    else:
        base = _as_coefficient_list(coefficients)
        scale = 1.0
    per_step = tuple(base[min(i, len(base) - 1)] for i in range(steps))
    return per_step, scale


def _as_coefficient_list(coefficients) -> tuple[Coefficients, ...]:
    try:
        items = list(coefficients)
        if items and all(isinstance(v, (int, float)) for v in items):
            items = [items]  # a single (a, b, c) given flat
        out = []
        for item in items:
            a, b, c = (float(v) for v in item)
            out.append((a, b, c))
    except (TypeError, ValueError):
        raise ValueError(
            f"Newton–Schulz coefficients must be a preset name {PRESETS} or a list of (a, b, c) tuples, "
            f"got {coefficients!r}"
        ) from None
    if not out:
        raise ValueError("Newton–Schulz coefficient list is empty")
    if not all(math.isfinite(v) for abc in out for v in abc):
        raise ValueError(f"Newton–Schulz coefficients must be finite, got {out}")
    return tuple(out)


def newton_schulz(
    G: Tensor,
    steps: int = 5,
    coefficients: str | Sequence[Coefficients] = "jordan",
    *,
    eps: float = DEFAULT_EPS,
    norm_scale: float | None = None,
    dtype: torch.dtype = torch.bfloat16,
    backend: str = "auto",
) -> Tensor:
    """Approximate the orthogonal polar factor U Vᵀ of each matrix in ``G`` (shape ``(..., rows, cols)``).

    Args:
        G: one matrix or a batch over leading dims; any float dtype. Not modified.
        steps: Newton–Schulz steps.
        coefficients: ``"jordan"``, ``"polar_express"``, or a list of (a, b, c) (see ``resolve_coefficients``).
        eps: lower clamp on the normaliser, so an all-zero matrix maps to zero.
        norm_scale: the input is divided by ``norm_scale·‖G‖_F``; default 1.0, or 1.02 for Polar Express.
        dtype: the working precision (bf16 as in every Muon; float32/float64 for reference computations).
        backend: ``"torch"`` (batched matmuls), ``"triton"`` (symmetric half-tile kernels, CUDA), or ``"auto"``
            (on CUDA, whichever of the two measured faster the first time this batch shape came up).

    Returns:
        A tensor of G's shape in ``dtype``.
    """
    if G.ndim < 2:
        raise ValueError(f"newton_schulz needs a matrix or a batch of matrices, got shape {tuple(G.shape)}")
    if G.is_complex():
        raise ValueError(f"newton_schulz does not support complex input (dtype {G.dtype})")
    per_step, default_scale = resolve_coefficients(coefficients, steps)
    scale = default_scale if norm_scale is None else float(norm_scale)
    _check_backend(backend)
    tall = G.size(-2) > G.size(-1)
    X = G.mT if tall else G
    lead = X.shape[:-2]
    n, m = X.shape[-2:]
    # A fresh contiguous working copy in the working dtype: the iteration below updates it in place.
    X = X.to(dtype=dtype, memory_format=torch.contiguous_format, copy=True).reshape(-1, n, m)
    normalize_(X, scale, eps)
    Y = iterate(X, per_step, backend=backend)
    Y = Y.reshape(*lead, n, m)
    return Y.mT if tall else Y


def normalize_(X: Tensor, scale: float = 1.0, eps: float = DEFAULT_EPS) -> Tensor:
    """Divide each matrix of the batch ``X`` (N, n, m) by ``scale·‖X‖_F`` (clamped below by eps), in place.

    The norm is computed of, and rounded to, X's own dtype, exactly like ``torch.optim.Muon``.
    """
    norms = torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True)
    if scale != 1.0:
        norms = norms * scale
    return X.div_(norms.clamp_(min=eps))


def iterate(X: Tensor, per_step: Sequence[Coefficients], *, backend: str = "auto") -> Tensor:
    """Run the Newton–Schulz steps on an already normalised wide batch ``X`` (N, n, m), n ≤ m.

    ``X`` is used as scratch; the result is returned (it may or may not share X's storage).
    """
    if X.ndim != 3 or X.size(-2) > X.size(-1):
        raise ValueError(f"iterate expects a wide batch (N, n, m) with n <= m, got {tuple(X.shape)}")
    if _use_triton(X, backend, per_step):
        from parallax_muon import triton_ns  # lazy: importing parallax_muon must not import triton

        return triton_ns.iterate(X, per_step)
    return _iterate_torch(X, per_step)


def _iterate_torch(X: Tensor, per_step: Sequence[Coefficients]) -> Tensor:
    if X.shape[0] == 1:
        # One matrix: exactly torch.optim.Muon's calls (mm/addmm), so the result is the same bits on any BLAS.
        # (A batched product may split its sums differently from the single-matrix one.)
        return _iterate_torch_2d(X[0], per_step).unsqueeze(0)
    N, n = X.shape[:2]
    A = X.new_empty(N, n, n)
    B = X.new_empty(N, n, n)
    Z = torch.empty_like(X)
    for a, b, c in per_step:
        torch.bmm(X, X.mT, out=A)
        torch.baddbmm(A, A, A, beta=b, alpha=c, out=B)
        torch.baddbmm(X, B, X, beta=a, out=Z)
        X, Z = Z, X
    return X


def _iterate_torch_2d(X: Tensor, per_step: Sequence[Coefficients]) -> Tensor:
    for a, b, c in per_step:
        A = X @ X.T
        B = torch.addmm(A, A, A, beta=b, alpha=c)
        X = torch.addmm(X, B, X, beta=a)
    return X


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown Newton–Schulz backend {backend!r}; expected one of {BACKENDS}")


def triton_available() -> bool:
    """Whether the Triton fast path can run here (CUDA, or the interpreter on CPU for tests)."""
    try:
        import importlib.util

        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        return False


# "auto" measures instead of guessing: the first time it meets a batch shape on a GPU it runs both paths and
# keeps the faster one for that (device, dtype, shape). The Triton kernels do half the work of the two
# symmetric products, but cuBLAS is the better-tuned matmul; which wins depends on the GPU and the shape.
_AUTO_CHOICE: dict[tuple, bool] = {}


def _triton_candidate(X: Tensor) -> bool:
    """The kernels target bf16/fp16 tensor cores; small Gram matrices are launch-bound either way."""
    return (
        X.is_cuda
        and X.dtype in (torch.bfloat16, torch.float16)
        and X.size(-2) >= _TRITON_MIN_ROWS
        and triton_available()
    )


def _use_triton(X: Tensor, backend: str, per_step: Sequence[Coefficients] = (JORDAN,)) -> bool:
    if backend == "torch":
        return False
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' was requested but triton is not installed")
        if not X.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(
                f"backend='triton' needs a CUDA tensor (got device {X.device}) or TRITON_INTERPRET=1 on CPU"
            )
        return True
    if not _triton_candidate(X):
        return False
    key = (X.device, X.dtype, tuple(X.shape))
    choice = _AUTO_CHOICE.get(key)
    if choice is None:
        choice = _AUTO_CHOICE[key] = _triton_is_faster(X, per_step)
    return choice


def _triton_is_faster(X: Tensor, per_step: Sequence[Coefficients]) -> bool:
    from parallax_muon import triton_ns

    try:
        triton_ns.iterate(X.clone(), per_step)  # compiles and autotunes outside the timing
    except Exception as e:  # a Triton problem must not stop training: use the matmul path and say why
        warnings.warn(
            f"parallax_muon: the Triton Newton–Schulz kernels failed on a {tuple(X.shape)} {X.dtype} batch "
            f"({type(e).__name__}: {e}); using batched matmuls",
            stacklevel=3,
        )
        return False
    return _time_ms(lambda: triton_ns.iterate(X.clone(), per_step)) < _time_ms(
        lambda: _iterate_torch(X.clone(), per_step)
    )


def _time_ms(fn, reps: int = 3) -> float:
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps
