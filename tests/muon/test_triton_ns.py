"""The Triton Newton–Schulz kernels (interpreted on CPU) and the "auto" backend choice. A module of its own:
without triton installed it is skipped whole, and the torch-only checks of test_newton_schulz.py still run."""

from __future__ import annotations

import os

import pytest
import torch

from parallax_muon import resolve_coefficients
from parallax_muon.newton_schulz import iterate, normalize_

triton = pytest.importorskip("triton")
needs_interpreter = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="Triton kernels run on CUDA or under TRITON_INTERPRET=1",
)


from parallax_muon.triton_ns import _upper_tile  # noqa: E402  (after the triton import check)

tl = triton.language


@triton.jit
def enumerate_tiles(out, tiles, first):
    i = tl.program_id(0)
    ti, tj = _upper_tile(first + i, tiles)
    tl.store(out + 2 * i, ti)
    tl.store(out + 2 * i + 1, tj)


def _device():
    return "cuda" if torch.cuda.is_available() else "cpu"


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("N, n, k", [(2, 40, 50), (1, 33, 17), (1, 64, 32)])
def test_sym_mmt_matches_a_dense_product(N, n, k, dtype):
    """Half the tiles computed, all written: NaN-poisoned outputs catch an unwritten mirror tile."""
    from parallax_muon import triton_ns

    dev = _device()
    M = torch.randn(N, n, k, device=dev).to(dtype)
    out = torch.full((N, n, n), float("nan"), device=dev, dtype=dtype)
    triton_ns.sym_mmt(M, out=out, block=16, block_k=16)
    ref = M.double() @ M.double().mT
    tol = 1e-6 if dtype == torch.float32 else 2e-3
    assert torch.isfinite(out).all()
    assert ((out.double() - ref).norm() / ref.norm()).item() < tol

    C = ref.to(dtype)
    out2 = torch.full((N, n, n), float("nan"), device=dev, dtype=dtype)
    triton_ns.sym_mmt(C, alpha=-0.75, beta=2.5, C=C, out=out2, block=16, block_k=16)
    ref2 = -0.75 * (C.double() @ C.double().mT) + 2.5 * C.double()
    assert torch.isfinite(out2).all()
    assert ((out2.double() - ref2).norm() / ref2.norm()).item() < tol
    # Tiles below the diagonal are written as mirrors of the ones above, so they match bit for bit; a tile on
    # the diagonal is one product whose (i, j) and (j, i) entries need not round alike (the interpreter's
    # matmul does not), so there symmetry holds to rounding.
    tile = torch.arange(n, device=dev) // 16
    off_diagonal = tile[:, None] != tile[None, :]
    assert torch.equal(out2[:, off_diagonal], out2.mT[:, off_diagonal])
    assert ((out2 - out2.mT).double().norm() / out2.double().norm()).item() < tol


@needs_interpreter
def test_sym_mmt_rejects_aliasing_and_bad_shapes():
    from parallax_muon import triton_ns

    A = torch.randn(1, 16, 16, device=_device())
    with pytest.raises(ValueError, match="must not alias"):
        triton_ns.sym_mmt(A, C=A, beta=1.0, out=A, block=16, block_k=16)
    with pytest.raises(ValueError, match="out has shape"):
        triton_ns.sym_mmt(A, out=torch.empty(1, 8, 8, device=_device()), block=16, block_k=16)


@needs_interpreter
def test_triton_iteration_matches_torch_iteration():
    """Same Newton–Schulz result from the symmetric kernels as from batched matmuls (fp32 here; bf16 on GPU)."""
    from parallax_muon import triton_ns

    dev = _device()
    X = torch.randn(2, 24, 40, device=dev)
    X = normalize_(X.clone())
    per_step, _ = resolve_coefficients("polar_express", 5)
    ours = triton_ns.iterate(X.clone(), per_step, block=16, block_k=16)
    ref = iterate(X.clone(), per_step, backend="torch")
    assert ((ours - ref).norm() / ref.norm()).item() < 1e-5


@needs_interpreter
def test_upper_triangle_tile_enumeration():
    """Program p computes tile (ti, tj): every tile on or above the diagonal exactly once, for any tile count."""

    def check(tiles, first, count):
        got = torch.full((2 * count,), -1, dtype=torch.int32, device=_device())
        enumerate_tiles[(count,)](got, tiles, first)
        every = [[i, j] for i in range(tiles) for j in range(i, tiles)]
        assert got.view(-1, 2).tolist() == every[first : first + count], f"{tiles} tiles, programs {first}+{count}"

    for tiles in [1, 2, 3, 5, 8, 13]:
        check(tiles, 0, tiles * (tiles + 1) // 2)
    # Many tiles (the fp32 square root matters there): windows at the start, middle and end.
    for tiles in [64, 1000]:
        total = tiles * (tiles + 1) // 2
        for first in (0, total // 2 - 10, total - 25):
            check(tiles, first, 25)


def test_auto_backend_measures_once_per_shape_and_falls_back_on_triton_errors(monkeypatch):
    """The choice logic of backend='auto' (the CUDA timing itself runs on the GPU only)."""
    import importlib

    from parallax_muon import triton_ns

    ns = importlib.import_module("parallax_muon.newton_schulz")  # the module (the package exports the function)

    monkeypatch.setattr(ns, "_AUTO_CHOICE", {})
    monkeypatch.setattr(ns, "_triton_candidate", lambda X: True)
    timings = {"triton": 1.0, "torch": 2.0}
    calls = []

    def fake_time(fn):
        calls.append(fn)
        return timings["triton"] if len(calls) % 2 == 1 else timings["torch"]

    monkeypatch.setattr(ns, "_time_ms", fake_time)
    monkeypatch.setattr(triton_ns, "iterate", lambda X, per_step, **kw: X)
    per_step, _ = resolve_coefficients("jordan", 5)
    X = torch.randn(2, 8, 12)
    assert ns._use_triton(X, "auto", per_step) is True
    assert ns._use_triton(X, "auto", per_step) is True and len(calls) == 2  # measured once, then cached
    timings["triton"] = 3.0
    assert ns._use_triton(torch.randn(3, 8, 12), "auto", per_step) is False  # a new shape is measured anew

    def broken(X, per_step, **kw):
        raise RuntimeError("no kernel for you")

    monkeypatch.setattr(triton_ns, "iterate", broken)
    with pytest.warns(UserWarning, match="Triton Newton–Schulz kernels failed .* no kernel for you"):
        assert ns._use_triton(torch.randn(4, 8, 12), "auto", per_step) is False
    assert not ns._use_triton(torch.randn(2, 8, 12), "torch", per_step)
