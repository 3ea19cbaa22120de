"""The public Parallax ops at extreme but legal inputs, forward and backward, on the Triton path (the
interpreter on CPU machines), held to what fp32 arithmetic allows on those inputs.

The oracle is float64 (the reference, and the closed forms of `closed_form`, which must agree with it) on the
very fp32 values the kernel reads. The bound is per element: ULPS × eps32 × the element's error size, a
first-order rounding-error model computed in float64 from the actual per-term magnitudes (the logits'
dot-product terms, the p-weighted spread of their errors, |t|, |t̄|, the saved v̄ and lse, ...), so a kernel
can only pass by being as exact as fp32 can be. Each test then applies the same bound to wrong answers — each
output replaced by zeros, the covariance term with the wrong sign, the backward's dS, dt and w terms with the
wrong sign — and asserts it rejects them, except where the truth makes them right (a lone key: no covariance,
dS = dt = 0) or where fp32 itself cannot resolve the value (BLIND). Measured: the kernel uses at most ~0.3 of
its bound; the wrong answers exceed theirs by 2× to 1e6×.

Extremes: logits q·k·scale of about 1e4 made of near-ties (so the softmax does not collapse onto one key and
the covariance and gradients stay alive), probes r with a large norm (the correction term dwarfs v̄),
length-1 sequences, windows of one key, and decode with a window far smaller than the cache so that most of
the cache — whole key blocks and split slices — is masked. Shapes are tiny: the interpreter's cost grows with
the number of programs.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from parallax_kernels import (
    parallax_attn,
    parallax_attn_reference,
    parallax_decode,
    parallax_decode_reference,
    parallax_weights,
)
from tests.helpers import KERNEL_DEVICE as DEVICE
from tests.helpers import needs_triton_kernels

pytestmark = needs_triton_kernels()


def _unit(*shape):
    x = torch.randn(*shape, dtype=torch.float64)
    return x / x.norm(dim=-1, keepdim=True)


def _fp32(x):
    """The float64 tensor of the values an fp32 kernel input holds: the reference sees what the kernel sees."""
    return x.float().double()


def _make(B, T, H, Hkv, D, q_norm=1.0, k_norm=1.0, r_norm=0.3, k_len=None):
    """q, r (T positions) and k, v (k_len positions, default T): fp32 values in float64 with the given per-head
    norms; v has entries of order 1.

    Large logits are made of near-ties: q and k point along one shared direction u with small parts n ⟂ u,
    so s = scale·|q||k|·(1 + n_q·n_k) is huge but the keys of a query differ by O(1) in logit. A softmax that
    saturates onto one key would make the covariance term and dq, dr, dk vanish, and then a wrong sign there
    could not be seen at all."""
    u = _unit(D)
    scale = D**-0.5
    # spread of the logits of one query: scale·|q|·|k|·a² ≈ 3
    a = min(1.0, (3 / max(scale * q_norm * k_norm, 1e-30)) ** 0.5)

    def along_u(n, *shape):
        x = torch.randn(*shape, D, dtype=torch.float64)
        x = x - (x @ u)[..., None] * u
        x = u + a * x / x.norm(dim=-1, keepdim=True)
        return n * x / x.norm(dim=-1, keepdim=True)

    q = along_u(q_norm, B, T, H)
    k_len = T if k_len is None else k_len
    k = along_u(k_norm, B, k_len, Hkv)
    r = r_norm * _unit(B, T, H, D)
    v = torch.randn(B, k_len, Hkv, D, dtype=torch.float64)
    return tuple(_fp32(x) for x in (q, r, k, v))


def _heads(x, G=1):
    return x.repeat_interleave(G, dim=2).transpose(1, 2)  # (B, H, T, D)


def _from_heads(x, G=1):
    """(B, H, T, D) -> (B, T, H // G, D), summing each group of G query heads (gradients of shared k, v)."""
    B, H, T, D = x.shape
    return x.reshape(B, H // G, G, T, D).sum(2).transpose(1, 2)


def closed_form(q, r, k, v, do, scale=None, window_size=None, broken=None, dtype=torch.float32):
    """Output and gradients from the closed forms, in float64, and a first-order rounding-error model.

    Returns ({name: exact value}, {name: error size}), all (B, T, H, D). The error size of an element is the
    sum, over every rounded operation it depends on, of the absolute size of that operation's result
    (evaluated in float64 from the actual per-term magnitudes): fp32 arithmetic can miss the exact value by
    about eps32 times it (times a small count for the longest sums, see ULPS). With
    w_ij = 1 + t̄_i − t_ij: o_i = Σ_j p_ij w_ij v_j, dv_j = Σ_i p_ij w_ij dO_i, dt_ij = p_ij dO_i·(v̄_i − v_j),
    dp_ij = dO_i·(w_ij v_j + t_ij v̄_i), dS_ij = p_ij (dp_ij − Σ_l p_il dp_il), dq = scale·dS k,
    dk = scale·dSᵀ q + dtᵀ r, dr = dt k.

    `broken` gets one thing wrong, to show the bound sees it: "cov" (o = v̄ + Cov·r), "dS" or "dt" (that
    term of the backward with the wrong sign), "w" (dv with 1 − t̄ + t).

    The kernels accumulate in fp32 but feed their matrix products operands in the input dtype (p, dS and dt
    of 16-bit inputs are 16-bit there): for a 16-bit `dtype` each product's absolute size is added again,
    scaled to that dtype's eps."""
    _, _, H, D = q.shape
    G = H // k.shape[2]
    scale = D**-0.5 if scale is None else scale
    p, t = parallax_weights(q, r, k, causal=True, scale=scale, window_size=window_size)  # (B, H, Tq, Tk)
    Q, R, K, V, dO = _heads(q), _heads(r), _heads(k, G), _heads(v, G), _heads(do)
    aQ, aR, aK, aV, adO = Q.abs(), R.abs(), K.abs(), V.abs(), dO.abs()
    # 16-bit inputs: matrix-product operands and the saved o, v̄ are rounded to the input dtype
    k16 = torch.finfo(dtype).eps / torch.finfo(torch.float32).eps if dtype.itemsize < 4 else 0.0
    s = scale * Q @ K.mT
    live = p > 0
    m = s.masked_fill(~live, float("-inf")).amax(-1, keepdim=True).abs()
    # A logit is off by its dot product's terms and its own rounding. The forward normalizes by the sum of
    # the exponentials, which is blind to a shift of a whole row, so p_ij moves by its logit's error against
    # the others' p-weighted mean: ds_ij (1 − p_ij) + Σ_{l≠j} p_il ds_il (nothing for a lone key), plus the
    # exponential's rounding. The backward recomputes p = exp(s − lse) from the stored lse (rounded at |lse|
    # ≈ the row's largest logit), which no normalization corrects: |m_i| more.
    ds = scale * aQ @ aK.mT + s.abs()
    pds = (p * ds).sum(-1, keepdim=True)
    ep_fwd = p * (ds * (1 - p) + pds - p * ds + 1)
    ep = ep_fwd + p * (m + 1)
    at = t.abs()
    et = aR @ aK.mT + at
    tbar = (p * t).sum(-1, keepdim=True)
    etbar = (ep_fwd * at + p * et).sum(-1, keepdim=True) + (p * at).sum(-1, keepdim=True)
    w = 1 + tbar - t
    if broken == "w":
        w = 1 - tbar + t
    ew = etbar + et + 1 + tbar.abs() + at
    vbar = p @ V
    evbar = ep_fwd @ aV + p @ aV + k16 * (p @ V).abs()  # v̄ and t̄ are the forward's, saved for the backward
    o = vbar * (1 + tbar) - (p * t) @ V if broken != "cov" else vbar * (1 - tbar) + (p * t) @ V
    eo = (ep_fwd * w.abs() + p * ew) @ aV + (p * w.abs()) @ aV
    dv = (p * w).mT @ dO
    edv = (ep * w.abs() + p * ew + p * w.abs()).mT @ adO
    dp = (dO @ V.mT) * w + t * (dO * vbar).sum(-1, keepdim=True)
    edp = (adO @ aV.mT) * (ew + w.abs()) + (et + at) * (adO * vbar.abs()).sum(-1, keepdim=True)
    edp = edp + at * (adO * evbar).sum(-1, keepdim=True)
    Dsum = (p * dp).sum(-1, keepdim=True)
    eD = (ep * dp.abs() + p * edp + p * dp.abs()).sum(-1, keepdim=True)
    eD = eD + (adO * (eo + k16 * o.abs())).sum(-1, keepdim=True)  # D = dO·o from the saved o
    dS = p * (dp - Dsum)
    edS = ep * (dp - Dsum).abs() + p * (edp + eD + dp.abs() + Dsum.abs())
    diff = (dO * vbar).sum(-1, keepdim=True) - dO @ V.mT
    dt = p * diff
    edt = ep * diff.abs() + p * ((adO * (evbar + vbar.abs())).sum(-1, keepdim=True) + adO @ aV.mT)
    sS = -1 if broken == "dS" else 1
    st = -1 if broken == "dt" else 1
    dq = sS * scale * dS @ K
    edq = scale * (edS + dS.abs()) @ aK
    dr = st * dt @ K
    edr = (edt + dt.abs()) @ aK
    dk = sS * scale * dS.mT @ Q + st * dt.mT @ R
    edk = scale * (edS + dS.abs()).mT @ aQ + (edt + dt.abs()).mT @ aR
    wa = 1 + tbar.abs() + at  # w's terms before they cancel: the kernels round p·t and p apart
    eo = eo + k16 * (p * wa) @ aV
    edv = edv + k16 * (p * wa).mT @ adO
    edq = edq + k16 * scale * dS.abs() @ aK
    edr = edr + k16 * dt.abs() @ aK
    edk = edk + k16 * (scale * dS.abs().mT @ aQ + dt.abs().mT @ aR)
    exact = {"o": o, "dq": dq, "dr": dr, "dk": _from_heads(dk, G), "dv": _from_heads(dv, G)}
    exact["o"], exact["dq"], exact["dr"] = (x.transpose(1, 2) for x in (o, dq, dr))
    err = {"o": eo.transpose(1, 2), "dq": edq.transpose(1, 2), "dr": edr.transpose(1, 2)}
    err["dk"], err["dv"] = _from_heads(edk, G), _from_heads(edv, G)
    return exact, err


# Rounding errors add up over sums of up to T_k ≤ 512 terms and D = 16 products; in practice they partly
# cancel, and the measured worst error is a few percent of one eps32·(error size) on these inputs.
ULPS = 1


def _bound(err, want, dtype):
    """Per element: ULPS fp32 roundings of the error size, plus the rounding of the result to `dtype`."""
    return ULPS * torch.finfo(torch.float32).eps * err + torch.finfo(dtype).eps * want.abs()


def _assert_within(got, want, err, dtype, what):
    assert torch.isfinite(got).all(), f"{what}: {int((~torch.isfinite(got)).sum())} non-finite values"
    bound = _bound(err, want, dtype)
    excess = (got.double() - want).abs() - bound
    worst = excess.argmax()
    assert (excess <= 0).all(), (
        f"{what}: {int((excess > 0).sum())} elements beyond the bound; worst |error| "
        f"{(got.double() - want).abs().flatten()[worst]:.3e} > {bound.flatten()[worst]:.3e} "
        f"(reference {want.flatten()[worst]:.3e})"
    )


def _rejected(wrong, want, err, dtype):
    return bool(((wrong - want).abs() > _bound(err, want, dtype)).any())


# Each wrong answer and the outputs it changes; it is rejected when the bound rejects at least one of them.
WRONG = {"cov": ("o",), "dS": ("dq", "dk"), "dt": ("dr", "dk"), "w": ("dv",)}


def _assert_rejects_wrong_answers(inputs, do, dtype, exact, err, one_key=False, blind=(), **kwargs):
    """The bound that accepted the kernel rejects each output replaced by zeros and each sign error above.

    With one visible key per query the covariance term, dS and dt are exactly zero and w is 1, so only zero
    o and dv are wrong answers there. `blind` names the zero outputs that fp32 cannot tell from the truth at
    all (the true value is below what any fp32 evaluation resolves, see the cases)."""
    for name in exact:
        if name in blind or (one_key and name in ("dq", "dr", "dk")):
            continue
        assert _rejected(torch.zeros_like(exact[name]), exact[name], err[name], dtype), f"the bound accepts {name} = 0"
    if one_key:
        return
    for kind, names in WRONG.items():
        names = [n for n in names if n not in blind]
        if not names:
            continue
        wrong = closed_form(*inputs, do, broken=kind, **kwargs)[0]
        assert any(_rejected(wrong[n], exact[n], err[n], dtype) for n in names), (
            f"the bounds of {names} accept the wrong answer '{kind}'"
        )


def _check_attn(inputs, dtype, one_key=False, blind=(), **kwargs):
    """Forward and all four gradients of the kernel path vs the float64 reference, within the rounding bound;
    then the same bound against wrong answers."""
    ref = [x.clone().requires_grad_() for x in inputs]
    leaves = [x.to(dtype).to(DEVICE).requires_grad_() for x in inputs]
    do = _fp32(torch.randn_like(inputs[0])).to(dtype).double()
    want = parallax_attn_reference(*ref, **kwargs)
    want_grads = torch.autograd.grad(want, ref, do)
    exact, err = closed_form(*inputs, do, dtype=dtype, **kwargs)
    # the closed forms are the reference's (autograd) values: a second, independent float64 oracle
    for name, x in zip(("o", "dq", "dr", "dk", "dv"), (want, *want_grads)):
        torch.testing.assert_close(exact[name], x, rtol=1e-9, atol=1e-9 * x.abs().max().item(), msg=name)
    got = parallax_attn(*leaves, **kwargs)
    grads = torch.autograd.grad(got, leaves, do.to(dtype).to(DEVICE))
    for name, g in zip(("o", "dq", "dr", "dk", "dv"), (got, *grads)):
        _assert_within(g.cpu(), exact[name], err[name], dtype, name)
    _assert_rejects_wrong_answers(inputs, do, dtype, exact, err, one_key=one_key, blind=blind, **kwargs)


# name -> (B, T, H, Hkv, D, q_norm, k_norm, r_norm, kwargs). D=16, scale 1/4: q_norm·k_norm=4e4 gives logits
# up to 1e4 in size.
ATTN_CASES = {
    "logits ~1e4 from q": (1, 24, 2, 1, 16, 2000.0, 20.0, 0.3, {}),
    "logits ~1e4 from q and k": (1, 24, 2, 1, 16, 200.0, 200.0, 0.3, {}),
    "logits ~1e4, window 5": (1, 24, 2, 2, 16, 2000.0, 20.0, 0.3, {"window_size": 5}),
    "|r| = 1e3": (1, 24, 2, 1, 16, 1.0, 1.0, 1e3, {}),
    "|r| = 1e3 with logits ~1e3": (1, 20, 2, 2, 16, 63.0, 63.0, 1e3, {}),
    "length-1 sequence": (2, 1, 2, 1, 16, 50.0, 50.0, 50.0, {}),
    "window of one key": (1, 20, 2, 1, 16, 200.0, 200.0, 1e3, {"window_size": 1}),
    # Logits ~1e2 here, not 1e4: with logits ~1e4 as well, the rounding of p alone (1e-3 relative) hid dr, o or
    # dq from zero for about 5% of draws, so the bound could not prove it rejects a wrong answer at every seed.
    "one query against many keys": (1, 1, 2, 2, 16, 20.0, 20.0, 1e3, {"k_len": 33}),
}
ONE_KEY = ("length-1 sequence", "window of one key")
# Queries over near-tied keys of norm 200 (also the packed test's 3-token piece): dq = scale·Σ_j dS_ij (k_j − k̄) keeps only the keys' small
# parts across u (Σ_j dS_ij = 0), 1/60 of |k|, while an fp32 error of 1e-3 in p (logits 1e4) moves it by the
# whole |k|: zero and the true dq are equally far from what fp32 can promise. With q as large as k, the same
# holds for dk = scale·Σ_i dS_ij q_i.
BLIND = {"logits ~1e4 from q and k": ("dq", "dk")}


@pytest.mark.parametrize("case", list(ATTN_CASES))
def test_parallax_attn_is_finite_and_exact_at_extremes(case, poison):
    B, T, H, Hkv, D, qn, kn, rn, kwargs = ATTN_CASES[case]
    kwargs = dict(kwargs)
    k_len = kwargs.pop("k_len", T)
    inputs = _make(B, T, H, Hkv, D, qn, kn, rn, k_len=k_len)
    _check_attn(inputs, torch.float32, one_key=case in ONE_KEY, blind=BLIND.get(case, ()), **kwargs)


def test_parallax_attn_fp16_logits_near_the_fp16_range(poison):
    # q·k = 4e4 (the fp16 maximum is 65504), logits 1e4.
    q, r, k, v = _make(1, 24, 2, 1, 16, 200.0, 200.0, 0.3)
    q, r, k, v = (x.half().double() for x in (q, r, k, v))  # the reference sees the same rounded inputs
    _check_attn((q, r, k, v), torch.float16, blind=BLIND["logits ~1e4 from q and k"])


def test_parallax_attn_packed_length_one_sequences(poison):
    inputs = _make(1, 7, 2, 1, 16, 200.0, 200.0, 1e3)
    bounds = [0, 1, 2, 5, 6, 7]
    cu = torch.tensor(bounds, dtype=torch.int32, device=DEVICE)
    do = _fp32(torch.randn_like(inputs[0]))
    parts = [closed_form(*(x[:, a:b] for x in (*inputs, do))) for a, b in itertools.pairwise(bounds)]
    exact = {name: torch.cat([p[0][name] for p in parts], dim=1) for name in parts[0][0]}
    err = {name: torch.cat([p[1][name] for p in parts], dim=1) for name in parts[0][1]}
    ref = [x.clone().requires_grad_() for x in inputs]
    want = parallax_attn_reference(*ref, cu_seqlens=torch.tensor(bounds, dtype=torch.int32))
    for name, x in zip(("o", "dq", "dr", "dk", "dv"), (want, *torch.autograd.grad(want, ref, do))):
        torch.testing.assert_close(exact[name], x, rtol=1e-9, atol=1e-9 * x.abs().max().item(), msg=name)
    leaves = [x.float().to(DEVICE).requires_grad_() for x in inputs]
    got = parallax_attn(*leaves, cu_seqlens=cu)
    grads = torch.autograd.grad(got, leaves, do.float().to(DEVICE))
    for name, g in zip(("o", "dq", "dr", "dk", "dv"), (got, *grads)):
        _assert_within(g.cpu(), exact[name], err[name], torch.float32, name)
        if name not in ("dq", "dk"):  # blind, as in BLIND
            assert _rejected(torch.zeros_like(exact[name]), exact[name], err[name], torch.float32), name


def _decode_reference(q, r, k, v, lens, window, broken=None):
    """Float64 output and its error size, per sequence over its valid cache rows."""
    out, size = [], []
    for b, n in enumerate(lens.tolist()):
        parts = [x[b : b + 1] for x in (q, r)] + [x[b : b + 1, :n] for x in (k, v)]
        exact, err = closed_form(*parts, torch.zeros_like(parts[0]), window_size=window, broken=broken)
        out.append(exact["o"])
        size.append(err["o"])
    return torch.cat(out), torch.cat(size)


# name -> (B, L_max, H, Hkv, D, q_norm, k_norm, r_norm, window, lengths)
DECODE_CASES = {
    "window 3 in a cache of 160 (most blocks masked)": (3, 160, 2, 1, 16, 1.0, 1.0, 0.3, 3, [1, 97, 160]),
    "window 2 in a cache of 512 (whole slices masked)": (2, 512, 2, 1, 16, 200.0, 200.0, 1e3, 2, [300, 512]),
    "window 1, logits ~1e4, |r| = 1e3": (2, 96, 2, 2, 16, 200.0, 200.0, 1e3, 1, [1, 96]),
    "logits ~1e4 over a long cache": (2, 128, 4, 1, 16, 200.0, 200.0, 0.3, None, [2, 128]),
    "|r| = 1e3, window 17": (2, 128, 2, 1, 16, 1.0, 1.0, 1e3, 17, [5, 128]),
    "length-1 caches": (3, 64, 2, 2, 16, 200.0, 200.0, 1e3, None, [1, 1, 1]),
}
DECODE_ONE_KEY = ("window 1, logits ~1e4, |r| = 1e3", "length-1 caches")


@pytest.mark.parametrize("case", list(DECODE_CASES))
def test_parallax_decode_is_finite_and_exact_at_extremes(case, poison):
    B, L, H, Hkv, D, qn, kn, rn, window, lengths = DECODE_CASES[case]
    q, r, k, v = _make(B, 1, H, Hkv, D, qn, kn, rn, k_len=L)
    lens = torch.tensor(lengths, dtype=torch.int32)
    for b, n in enumerate(lengths):  # rows past a sequence's length are never read: poison them
        k[b, n:], v[b, n:] = float("nan"), float("nan")
    want, err = _decode_reference(q, r, k, v, lens, window)
    torch.testing.assert_close(
        want, parallax_decode_reference(q, r, k, v, lens, window_size=window), rtol=1e-9, atol=1e-12
    )
    got = parallax_decode(*(x.float().to(DEVICE) for x in (q, r, k, v)), lens.to(DEVICE), window_size=window)
    _assert_within(got.cpu(), want, err, torch.float32, "decode output")
    # the same bound rejects a zero output and, where several keys are visible, a flipped covariance term
    assert _rejected(torch.zeros_like(want), want, err, torch.float32)
    if case not in DECODE_ONE_KEY:
        assert _rejected(_decode_reference(q, r, k, v, lens, window, broken="cov")[0], want, err, torch.float32)
