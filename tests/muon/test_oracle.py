"""Muon against an oracle written here from the documented semantics, in float64, sharing no code with
parallax_muon (the other Muon tests compare with torch.optim.Muon, which has no per-head, fused-segment,
>2-D or lr_mult paths, or with the package's own Newton–Schulz).

The documented step (step.py, layout.py), per Muon group with lr' = lr·lr_mult:
    buf ← μ·buf + (1 − μ)·g;  u = (1 − μ)·g + μ·buf (Nesterov) or buf
    p ← p·(1 − lr'·wd)                                   (decoupled weight decay)
    each (slice, segment, head) block B of u:  p_B ← p_B − lr'·ratio(B)·NS5(B)
with NS5 the Jordan quintic (3.4445, −4.7750, 2.0315) on B/‖B‖_F (wide orientation) and ratio
√max(1, rows/cols) ("original"), 0.2·√max(rows, cols) ("match_rms_adamw") or 1 ("none") of the block.

The optimizer runs Newton–Schulz in bf16 whatever the parameter dtype (as torch.optim.Muon does), so its
update can only match the float64 oracle to bf16 accuracy: every product is rounded to 2⁻⁹ relative and the
quintic's slope (up to a = 3.44 near zero) carries that through five steps. Measured over 3000 random
matrices of the shapes used here: median 1.5 %, worst 4.8 % relative (Frobenius) per update. TOL is 8 %.
Parameters, momentum buffers and weight decay are float64, so those parts are exact; every case also checks
that the same bound REJECTS the oracle with one documented rule broken (the bound is not too loose to see it).
"""

from __future__ import annotations

import math

import pytest
import torch

from parallax_muon import Muon

JORDAN = (3.4445, -4.7750, 2.0315)
TOL = 0.08
# With bf16=True the oracle rounds as the optimizer does and differs only by the order of fp32 sums inside a
# product, which flips a rare bf16 rounding: at most ~1e-2 of an update (BF16_FLIP_TOL in test_optimizer.py).
BF16_TOL = 2e-2


def ns5(B: torch.Tensor, bf16: bool = False) -> torch.Tensor:
    """Five Jordan Newton–Schulz steps on one matrix, float64, written out.

    bf16=True rounds where the documented working precision rounds (the input, its norm, and each of the
    three products of a step, each computed exactly here and rounded once): for gradients of real models,
    whose small singular values the bf16 iteration cannot resolve to the 8 % of TOL (see BF16_TOL)."""
    a, b, c = JORDAN
    rnd = (lambda x: x.to(torch.bfloat16).double()) if bf16 else (lambda x: x)
    tall = B.shape[0] > B.shape[1]
    X = rnd(B.T if tall else B)
    X = rnd(X / max(rnd(X.norm()).item(), 1e-7))
    for _ in range(5):
        A = rnd(X @ X.T)
        X = rnd(a * X + rnd(b * A + c * A @ A) @ X)
    return X.T if tall else X


def ratio(rule: str, rows: int, cols: int) -> float:
    if rule == "original":
        return math.sqrt(max(1.0, rows / cols))
    if rule == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    return 1.0


def blocks(shape, group):
    """(slice, row start, row stop) of every block the documented layout cuts, and the (S, R, C) view shape."""
    if group.get("per_slice"):
        S, R, C = math.prod(shape[:-2]), shape[-2], shape[-1]
    else:
        S, R, C = 1, shape[0], math.prod(shape[1:])
    sizes = group.get("split_sizes") or [R]
    heads = group.get("num_heads") or 1
    heads = [heads] * len(sizes) if isinstance(heads, int) else list(heads)
    out, start = [], 0
    for size, h in zip(sizes, heads):
        for j in range(h):
            lo = start + j * size // h
            out += [(s, lo, lo + size // h) for s in range(S)]
        start += size
    return out, (S, R, C)


def oracle_step(p, g, buf, group, broken: str | None = None, bf16: bool = False):
    """The documented step in float64 on copies: (new p, new buf). `broken` names one rule to get wrong
    (to show the test's bound notices it)."""
    mu, nesterov = group["momentum"], group["nesterov"]
    lr_mult = group.get("lr_mult", 1.0)
    lr = group["lr"] * lr_mult
    buf = mu * buf + (1 - mu) * g
    u = (1 - mu) * g + mu * buf if nesterov else buf
    if broken == "nesterov":
        u = buf if nesterov else (1 - mu) * g + mu * buf
    wd_lr = group["lr"] if broken == "wd_ignores_lr_mult" else lr
    p = p * (1 - wd_lr * group.get("weight_decay", 0.0))
    cut = (
        {k: v for k, v in group.items() if k not in ("num_heads", "split_sizes", "per_slice")}
        if broken == "whole"
        else group
    )
    found, (S, R, C) = blocks(tuple(p.shape), cut)
    u3, p3 = u.reshape(S, R, C), p.reshape(S, R, C).clone()
    rule = group.get("adjust_lr", "original")
    for s, lo, hi in found:
        k = 1.0 if broken == "no_ratio" else ratio(rule, hi - lo, C)
        p3[s, lo:hi] -= (lr if broken != "lr_mult_ignored" else group["lr"]) * k * ns5(u3[s, lo:hi], bf16)
    return p3.reshape(p.shape), buf


def run_case(shape, group, steps=3, broken_variants=()):
    """Run Muon (float64 parameter) for `steps` steps; after each, compare with the oracle applied to the
    same parameter, and check that each broken variant of the oracle is rejected by the same bound."""
    p = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    opt = Muon([{"params": [p], **group}], lr=group["lr"], momentum=group["momentum"], nesterov=group["nesterov"])
    buf = torch.zeros(shape, dtype=torch.float64)
    rejected = dict.fromkeys(broken_variants, False)
    for step in range(steps):
        g = torch.randn(shape, dtype=torch.float64)
        before = p.detach().clone()
        p.grad = g.clone()
        opt.step()
        want, new_buf = oracle_step(before, g, buf, group)
        size = (want - before * (1 - group["lr"] * group.get("lr_mult", 1.0) * group.get("weight_decay", 0.0))).norm()
        err = ((p.detach() - want).norm() / size).item()
        assert err <= TOL, f"step {step}: Muon differs from the float64 oracle by {err:.3f} of its update"
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], new_buf, rtol=1e-12, atol=1e-12)
        for name in broken_variants:
            wrong, _ = oracle_step(before, g, buf, group, broken=name)
            rejected[name] |= ((p.detach() - wrong).norm() / size).item() > TOL
        buf = new_buf
    assert all(rejected.values()), f"the bound does not reject: {[k for k, v in rejected.items() if not v]}"


BASE = {"lr": 0.1, "momentum": 0.9, "nesterov": True}

CASES = {
    "2-D, lr_mult and weight decay": (
        (8, 12),
        {**BASE, "lr_mult": 0.5, "weight_decay": 2.0},
        ("wd_ignores_lr_mult", "lr_mult_ignored", "nesterov"),
    ),
    "tall 2-D, plain momentum, match_rms_adamw": (
        (64, 8),
        {**BASE, "nesterov": False, "adjust_lr": "match_rms_adamw", "weight_decay": 0.5},
        ("nesterov", "no_ratio"),
    ),
    "per-head blocks": ((12, 16), {**BASE, "num_heads": 3, "lr_mult": 2.0}, ("whole", "lr_mult_ignored")),
    "fused q|k|v with heads and tall segments": (
        (40, 8),
        {**BASE, "split_sizes": [8, 16, 16], "num_heads": [2, 1, 1], "weight_decay": 1.0, "lr_mult": 0.25},
        ("whole", "no_ratio", "wd_ignores_lr_mult"),
    ),
    "3-D as one matrix": ((6, 2, 3), {**BASE, "weight_decay": 0.3}, ("nesterov",)),
    "3-D per slice, tall slices": ((3, 8, 4), {**BASE, "per_slice": True}, ("whole", "no_ratio")),
}


@pytest.mark.parametrize("case", list(CASES))
def test_muon_matches_the_float64_oracle(case):
    shape, group, broken = CASES[case]
    run_case(shape, group, broken_variants=broken)


@pytest.mark.parametrize("lr_mult", [1.0, 0.3])
def test_weight_decay_alone_is_exact(lr_mult):
    """A zero gradient leaves only the decay: p·(1 − lr·lr_mult·wd), exactly, in float64."""
    p = torch.randn(6, 10, dtype=torch.float64, requires_grad=True)
    before = p.detach().clone()
    opt = Muon([{"params": [p], "lr_mult": lr_mult}], lr=0.2, weight_decay=1.5)
    p.grad = torch.zeros_like(p)
    opt.step()
    assert torch.equal(p.detach(), before * (1 - 0.2 * lr_mult * 1.5))


@pytest.mark.parametrize("weight_decay", [0.0, 0.5])
def test_adamw_group_lr_mult_is_torch_adamw_at_the_multiplied_lr(weight_decay):
    """torch.optim.AdamW has no lr_mult; the documented meaning is AdamW at lr·lr_mult (decay included)."""
    p = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    q = p.detach().clone().requires_grad_(True)
    ours = Muon([{"params": [p], "use_muon": False, "lr_mult": 0.4}], adamw_lr=0.05, adamw_weight_decay=weight_decay)
    ref = torch.optim.AdamW([q], lr=0.05 * 0.4, betas=(0.9, 0.95), eps=1e-8, weight_decay=weight_decay)
    for _ in range(3):
        g = torch.randn(5, 7, dtype=torch.float64)
        p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
