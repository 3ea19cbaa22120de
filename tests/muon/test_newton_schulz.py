"""newton_schulz: presets, the singular-value band, batching/orientation, torch.optim.Muon's bits. Torch only:
these run without triton installed (the Triton kernels are in test_triton_ns.py)."""

from __future__ import annotations

import math

import pytest
import torch

from parallax_muon import POLAR_EXPRESS, newton_schulz, resolve_coefficients


def with_spectrum(rows: int, cols: int, normalized_sv: torch.Tensor) -> torch.Tensor:
    """A random matrix U·diag(s)·Vᵀ (U, V random orthonormal) whose singular values are exactly `s`."""
    k = min(rows, cols)
    U, _ = torch.linalg.qr(torch.randn(rows, k, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(cols, k, dtype=torch.float64))
    return (U * normalized_sv) @ V.T


def log_spectrum(k: int, kappa: float) -> torch.Tensor:
    """k log-spaced singular values with condition number kappa, scaled so the Frobenius norm is 1."""
    s = torch.logspace(0, -math.log10(kappa), k, dtype=torch.float64)
    return s / s.norm()


# The 5-step polynomials in exact arithmetic map normalised singular values x = σ/‖G‖_F into:
#   jordan:         [0.6818, 1.1344] for x >= 0.006 (below that, the first steps cannot lift x far enough);
#   polar_express:  [0.8589, 1.1411] for x >= 0.003 (its own design error is 1 ± 0.1411).
# So the bands, [0.68, 1.14] and [0.86, 1.14], hold to the polynomial's precision in float64; the
# Polar Express ends sit 0.0011 outside 0.86/1.14 by construction, and bf16 rounding of the iterate moves
# singular values by a few 1e-3 more. Both slacks are spelled out in BANDS.
BANDS = {
    ("jordan", torch.float64): (0.68, 1.14),
    ("jordan", torch.bfloat16): (0.675, 1.145),
    ("polar_express", torch.float64): (0.858, 1.142),
    ("polar_express", torch.bfloat16): (0.853, 1.147),
}
# (rows, cols, kappa): the smallest normalised singular value stays >= 0.006 (16 values, κ=100 → 0.0068;
# 64 values, κ=10 → 0.026), or >= 0.003 for Polar Express (64 values, κ=100 → 0.0037).
CASES = [(16, 40, 100.0), (40, 16, 100.0), (16, 16, 100.0), (64, 96, 10.0), (96, 64, 10.0), (64, 64, 1.0)]
PE_CASES = [*CASES, (64, 128, 100.0), (128, 64, 100.0)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("preset", ["jordan", "polar_express"])
def test_singular_values_land_in_the_band(preset, dtype):
    lo, hi = BANDS[(preset, dtype)]
    for rows, cols, kappa in CASES if preset == "jordan" else PE_CASES:
        spectrum = log_spectrum(min(rows, cols), kappa)
        G = with_spectrum(rows, cols, spectrum) * 7.3  # the scale is irrelevant: NS normalises
        X = newton_schulz(G.float() if dtype != torch.float64 else G, 5, preset, dtype=dtype)
        assert X.shape == G.shape and X.dtype == dtype
        sv = torch.linalg.svdvals(X.double())
        assert lo <= sv.min().item() and sv.max().item() <= hi, (
            f"{preset} {dtype} {rows}x{cols} κ={kappa}: singular values in [{sv.min():.4f}, {sv.max():.4f}], "
            f"band [{lo}, {hi}]"
        )


def test_presets_and_user_lists():
    per_step, scale = resolve_coefficients("jordan", 3)
    assert per_step == ((3.4445, -4.7750, 2.0315),) * 3 and scale == 1.0
    per_step, scale = resolve_coefficients("polar_express", 7)
    assert per_step[:5] == POLAR_EXPRESS and per_step[5:] == (POLAR_EXPRESS[-1],) * 2 and scale == 1.02
    per_step, _ = resolve_coefficients("polar_express", 2)
    assert per_step == POLAR_EXPRESS[:2]
    per_step, scale = resolve_coefficients([(2.0, -1.5, 0.5), (1.5, -0.5, 0.0)], 3)
    assert per_step == ((2.0, -1.5, 0.5), (1.5, -0.5, 0.0), (1.5, -0.5, 0.0)) and scale == 1.0
    assert resolve_coefficients((3.0, -3.2, 1.2), 2)[0] == ((3.0, -3.2, 1.2),) * 2
    # A user list equal to the preset gives the preset's iteration (normalisation scale passed explicitly).
    G = torch.randn(24, 40)
    a = newton_schulz(G, 5, "polar_express")
    b = newton_schulz(G, 5, list(POLAR_EXPRESS), norm_scale=1.02)
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "bad, match",
    [
        ("newton", "unknown Newton–Schulz coefficient preset 'newton'"),
        ([(1.0, 2.0)], r"a list of \(a, b, c\) tuples, got \[\(1\.0, 2\.0\)\]"),
        ([], "coefficient list is empty"),
    ],
)
def test_bad_coefficients_are_named(bad, match):
    with pytest.raises(ValueError, match=match):
        newton_schulz(torch.randn(4, 6), 5, bad)


def test_bad_arguments():
    with pytest.raises(ValueError, match="ns_steps must be a positive int, got 0"):
        newton_schulz(torch.randn(4, 6), 0)
    with pytest.raises(ValueError, match=r"shape \(5,\)"):
        newton_schulz(torch.randn(5))
    with pytest.raises(ValueError, match="unknown Newton–Schulz backend 'cuda'"):
        newton_schulz(torch.randn(4, 6), backend="cuda")


def test_batched_equals_one_by_one_and_tall_is_transposed():
    G = torch.randn(3, 2, 20, 12)  # tall matrices in a (3, 2) batch
    G_before = G.clone()
    X = newton_schulz(G, 5, "jordan")
    assert torch.equal(G, G_before), "newton_schulz modified its input"
    assert X.shape == G.shape and X.dtype == torch.bfloat16
    for i in range(3):
        for j in range(2):
            one = newton_schulz(G[i, j], 5, "jordan")
            # Batched products may order fp32 sums differently: a rare bf16 rounding flip, at most ~1e-2
            # relative after five steps (see BF16_FLIP_TOL in test_optimizer.py).
            err = ((X[i, j].double() - one.double()).norm() / one.double().norm()).item()
            assert err < 2e-2, f"matrix {i},{j}: batched result differs by {err:.2e}"
            # A tall matrix is orthogonalized through its transpose: the very same computation.
            assert torch.equal(one, newton_schulz(G[i, j].T.contiguous(), 5, "jordan").T)


def test_bf16_input_is_not_modified_and_zero_stays_zero():
    G = torch.randn(8, 12, dtype=torch.bfloat16)
    keep = G.clone()
    newton_schulz(G)
    assert torch.equal(G, keep)
    Z = newton_schulz(torch.zeros(2, 8, 12))
    assert torch.isfinite(Z).all() and (Z == 0).all()


def test_same_bits_as_torch_muon_internal_ns():
    """The private NS of torch.optim.Muon is the oracle for precision: bf16 iterate, once-rounded products."""
    from torch.optim._muon import _zeropower_via_newtonschulz

    for shape in [(32, 48), (48, 32), (33, 17), (64, 64)]:
        G = torch.randn(shape)
        ours = newton_schulz(G, 5, "jordan")
        theirs = _zeropower_via_newtonschulz(G, (3.4445, -4.7750, 2.0315), 5, 1e-7)
        assert torch.equal(ours, theirs), f"{shape}: differs from torch.optim.Muon's Newton–Schulz"


@pytest.mark.parametrize(
    ("coefficients", "norm_scale", "divisor"), [("jordan", 4.0, 4.0), ("polar_express", None, 1.02)]
)
def test_input_is_divided_by_norm_scale_times_its_norm(coefficients, norm_scale, divisor):
    """One float64 step written out: X = G / (divisor·‖G‖_F), then a·X + (b·A + c·A²)·X with A = X Xᵀ. The
    divisor is the explicit norm_scale, or Polar Express's default 1.02 (ignoring it passed every other test)."""
    G = torch.randn(6, 10, dtype=torch.float64)
    a, b, c = resolve_coefficients(coefficients, 1)[0][0]
    X = G / (divisor * G.norm())
    A = X @ X.T
    want = a * X + (b * A + c * A @ A) @ X
    got = newton_schulz(G, 1, coefficients, norm_scale=norm_scale, dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
