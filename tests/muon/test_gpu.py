"""The CUDA path: bf16 Triton symmetric kernels and a full Muon step against torch.optim.Muon on the GPU.

Skipped on CPU machines. On the GPU: ``pytest -m gpu tests/muon``, or, where pytest is not installed,
``python tests/muon/test_gpu.py`` (runs every case below and exits non-zero on a failure).
"""

from __future__ import annotations

import itertools
import sys

import torch

from parallax_muon import Muon, newton_schulz
from parallax_muon.newton_schulz import iterate, normalize_, resolve_coefficients

try:
    import pytest
except ImportError:  # run as a script on a machine without pytest
    pytest = None

if pytest is not None:
    parametrize = pytest.mark.parametrize
    pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
else:

    def parametrize(names, values):
        def record(fn):
            fn.cases = [*getattr(fn, "cases", []), (names, values)]
            return fn

        return record


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


@parametrize("N, n, k", [(3, 300, 700), (2, 1024, 3072), (5, 768, 768), (1, 130, 2000)])
def test_sym_mmt_bf16_matches_cublas(N, n, k):
    from parallax_muon import triton_ns

    M = torch.randn(N, n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
    out = torch.full((N, n, n), float("nan"), device="cuda", dtype=torch.bfloat16)
    triton_ns.sym_mmt(M, out=out)
    ref = torch.bmm(M.float(), M.float().mT)
    assert torch.isfinite(out).all() and torch.equal(out, out.mT)
    assert rel(out, ref) < 4e-3  # bf16 output rounding (2^-9 relative) on an fp32 accumulation
    B = torch.full_like(out, float("nan"))
    triton_ns.sym_mmt(out, alpha=2.0315, beta=-4.775, C=out, out=B)
    ref_b = torch.baddbmm(out.float(), out.float(), out.float(), beta=-4.775, alpha=2.0315)
    assert torch.isfinite(B).all() and rel(B, ref_b) < 4e-3


@parametrize("preset", ["jordan", "polar_express"])
def test_triton_newton_schulz_matches_the_torch_path(preset):
    per_step, scale = resolve_coefficients(preset, 5)
    X = normalize_(torch.randn(6, 512, 1536, device="cuda").bfloat16(), scale)
    a = iterate(X.clone(), per_step, backend="triton")
    b = iterate(X.clone(), per_step, backend="torch")
    # Both round every product to bf16; only fp32 summation order differs, amplified a little by 5 steps.
    assert rel(a, b) < 2e-2
    # Against an fp32 iteration: the bf16 iterate itself (2⁻⁹ rounding per product, five steps).
    assert rel(newton_schulz(X[0].float(), 5, preset, dtype=torch.float32), a[0]) < 5e-2


@parametrize("backend", ["torch", "triton", "auto"])
def test_muon_step_on_cuda_matches_torch_muon(backend):
    shapes = [(2048, 1024), (1024, 2048), (1024, 1024), (3072, 1024), (1024, 3072), (300, 200)]
    params = [torch.randn(s, device="cuda") for s in shapes]
    ours = [p.clone().requires_grad_() for p in params]
    theirs = [p.clone().requires_grad_() for p in params]
    opt = Muon(ours, lr=0.02, weight_decay=0.1, backend=backend)
    ref = torch.optim.Muon(theirs, lr=0.02, weight_decay=0.1, nesterov=True, adjust_lr_fn="original")
    for _ in range(3):
        grads = [torch.randn(s, device="cuda") for s in shapes]
        for a, b, g in zip(ours, theirs, grads):
            a.grad, b.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    for a, b, p, s in zip(ours, theirs, params, shapes):
        # Compare the accumulated updates: the weights themselves are dominated by their initial values.
        # Both bf16; the Triton kernels order their fp32 sums differently from cuBLAS (rare bf16 flips).
        tol = 2e-2 if backend == "torch" else 3e-2
        assert rel(a.detach() - p, b.detach() - p) < tol, f"{s}: update differs from torch.optim.Muon"


def _run_as_script() -> int:
    failed = 0
    for name, fn in list(globals().items()):
        if not name.startswith("test_") or not callable(fn):
            continue
        cases = list(getattr(fn, "cases", []))
        cases += [m.args[:2] for m in getattr(fn, "pytestmark", []) if m.name == "parametrize"]
        grids = []
        for names, values in cases:
            keys = [k.strip() for k in names.split(",")]
            grids.append([dict(zip(keys, v if len(keys) > 1 else (v,))) for v in values])
        for combo in itertools.product(*grids) if grids else [()]:
            kwargs = {k: v for part in combo for k, v in part.items()}
            try:
                fn(**kwargs)
                print(f"PASS {name} {kwargs}")
            except Exception as e:  # report every case, then fail
                failed += 1
                print(f"FAIL {name} {kwargs}: {type(e).__name__}: {e}")
    print(f"{failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(_run_as_script())
