"""The plain einsum oracle (kernels/parallax/oracle.py) against the reference, and the formulas of
docs/parallax-math.md against autograd of the oracle.

The chain the kernel tests rely on: kernel == oracle (test_parallax_train.py, test_parallax_decode.py
compare to the oracle directly), reference == oracle (here, on the awkward shapes), and the oracle is the
math of the document, whose backward formulas the kernels implement (checked here in float64).
"""

from __future__ import annotations

import pytest
import torch

from parallax_kernels import parallax_attn_reference, parallax_decode_reference
from parallax_kernels.parallax.oracle import parallax_attn_einsum, parallax_decode_einsum
from tests.helpers import assert_close_rel

# (B, T_q, T_k, H_q, H_kv, D, causal, window)
SHAPES = {
    "GQA 4:1, odd T": (1, 13, 13, 4, 1, 16, True, None),
    "GQA 3:1, window 4, D=12": (2, 11, 11, 6, 2, 12, True, 4),
    "window 1 (the diagonal only)": (1, 6, 6, 2, 2, 8, True, 1),
    "window wider than T": (1, 7, 7, 2, 1, 8, True, 50),
    "T_q < T_k": (1, 5, 17, 4, 2, 8, True, None),
    "T_q < T_k, window 3": (2, 3, 9, 2, 1, 8, True, 3),
    "non-causal, T_q > T_k, GQA": (2, 9, 6, 4, 2, 8, False, None),
    "one token": (1, 1, 1, 1, 1, 4, True, None),
}


def _leaves(B, Tq, Tk, Hq, Hkv, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    q, r, k, v = mk(B, Tq, Hq, D), 0.5 * mk(B, Tq, Hq, D), mk(B, Tk, Hkv, D), mk(B, Tk, Hkv, D)
    return [x.requires_grad_() for x in (q, r, k, v)], mk(B, Tq, Hq, D)


def _assert_same_with_grads(got, want, leaves, do, what):
    assert_close_rel(got, want, 1e-12, f"{what}: o")
    got_grads = torch.autograd.grad(got, leaves, do)
    want_grads = torch.autograd.grad(want, leaves, do)
    for name, a, b in zip(("dq", "dr", "dk", "dv"), got_grads, want_grads):
        # absolute below norm 1: with a window of 1, dq and dr are zero up to rounding
        err = (a - b).norm() / b.norm().clamp_min(1.0)
        assert err <= 1e-11, f"{what}: {name}: error {err:.3e}"


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_reference_equals_the_einsum_oracle(shape):
    B, Tq, Tk, Hq, Hkv, D, causal, window = shape
    leaves, do = _leaves(B, Tq, Tk, Hq, Hkv, D)
    got = parallax_attn_reference(*leaves, causal=causal, scale=0.6, window_size=window)
    want = parallax_attn_einsum(*leaves, causal=causal, scale=0.6, window_size=window)
    _assert_same_with_grads(got, want, leaves, do, "reference")


@pytest.mark.parametrize(
    "offsets,causal,window", [([0, 1, 8, 20], True, None), ([0, 9, 20], True, 4), ([0, 5, 20], False, None)]
)
def test_packed_reference_equals_the_einsum_oracle(offsets, causal, window):
    leaves, do = _leaves(1, 20, 20, 4, 2, 8, seed=1)
    cu = torch.tensor(offsets, dtype=torch.int32)
    got = parallax_attn_reference(*leaves, causal=causal, window_size=window, cu_seqlens=cu)
    want = parallax_attn_einsum(*leaves, causal=causal, window_size=window, cu_seqlens=cu)
    _assert_same_with_grads(got, want, leaves, do, "packed reference")


@pytest.mark.parametrize("window", [None, 1, 5])
def test_decode_reference_equals_the_einsum_oracle(window):
    """Lengths 1 and L_max among them, GQA 3:1, stale cache rows holding NaN and inf."""
    B, L, Hq, Hkv, D = 5, 19, 6, 2, 8
    (q, r, k, v), _ = _leaves(B, 1, L, Hq, Hkv, D, seed=2)
    q, r, k, v = (x.detach().clone() for x in (q, r, k, v))
    lens = torch.tensor([1, 19, 6, 12, 2], dtype=torch.int32)
    for b, n in enumerate(lens.tolist()):
        k[b, n:], v[b, n:] = float("nan"), float("inf")
    got = parallax_decode_reference(q, r, k, v, lens, scale=0.5, window_size=window)
    assert_close_rel(got, parallax_decode_einsum(q, r, k, v, lens, scale=0.5, window_size=window), 1e-12)


def test_decode_lengths_outside_the_cache_give_nan_rows_in_both():
    (q, r, k, v), _ = _leaves(3, 1, 6, 2, 1, 8, seed=3)
    lens = torch.tensor([0, 4, 7], dtype=torch.int32)
    with torch.no_grad():
        got = parallax_decode_reference(q, r, k, v, lens, check_lengths=False)
        want = parallax_decode_einsum(q, r, k, v, lens)
    assert torch.isnan(want[0]).all() and torch.isnan(want[2]).all()
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    assert_close_rel(got[1], want[1], 1e-12)


def test_the_oracle_hides_no_nan():
    """A NaN in a query gives NaN in exactly that row; a NaN in a key, in every row that sees it."""
    (q, r, k, v), _ = _leaves(1, 6, 6, 2, 2, 8, seed=4)
    with torch.no_grad():
        q[0, 3, 1, 0] = float("nan")
        o = parallax_attn_einsum(q, r, k, v)
        assert torch.isnan(o[0, 3, 1]).all() and torch.isnan(o).any(-1).sum() == 1
        k[0, 4, 0, 0] = float("nan")  # key 4 of kv head 0: seen by rows 4 and 5 of head 0
        o = parallax_attn_einsum(q, r, k, v)
        assert torch.isnan(o[0, 4:, 0]).all() and not torch.isnan(o[0, :, 1]).any(-1)[[0, 1, 2, 4, 5]].any()


# --------------------------------------------------------------------------------------------------------------
# The formulas of docs/parallax-math.md, each against autograd of the oracle
# --------------------------------------------------------------------------------------------------------------
def _parts(q, r, k, v, causal, scale, window):
    """p, t with kv heads repeated, (B, H, T_q, T_k), in the doc's notation."""
    G = q.shape[2] // k.shape[2]
    kr, vr = k.repeat_interleave(G, 2), v.repeat_interleave(G, 2)
    s = scale * torch.einsum("bihd,bjhd->bhij", q, kr)
    Tq, Tk = q.shape[1], k.shape[1]
    pos = torch.arange(Tq)[:, None] + Tk - Tq
    j = torch.arange(Tk)[None, :]
    keep = (j <= pos) & (j > pos - (window or Tk + 1)) if causal else torch.ones(Tq, Tk, dtype=torch.bool)
    p = torch.softmax(torch.where(keep, s, float("-inf")), -1)
    t = torch.einsum("bihd,bjhd->bhij", r, kr)
    return p, t, kr, vr


@pytest.mark.parametrize("shape", [SHAPES["GQA 3:1, window 4, D=12"], SHAPES["non-causal, T_q > T_k, GQA"]], ids=str)
def test_forward_forms_of_the_doc_agree(shape):
    """o = O1/d1 (1 + d2/d1) - O2/d1 = v̄ (1 + t̄) - Σ p t v = v̄ - Cov_p(v, k) r."""
    B, Tq, Tk, Hq, Hkv, D, causal, window = shape
    (q, r, k, v), _ = _leaves(B, Tq, Tk, Hq, Hkv, D, seed=5)
    with torch.no_grad():
        p, t, kr, vr = _parts(q, r, k, v, causal, 0.6, window)
        v_bar = torch.einsum("bhij,bjhd->bhid", p, vr)
        k_bar = torch.einsum("bhij,bjhd->bhid", p, kr)
        t_bar = (p * t).sum(-1, keepdim=True)
        moments = v_bar * (1 + t_bar) - torch.einsum("bhij,bjhd->bhid", p * t, vr)
        # Cov_p(v, k) r = Σ_j p_j (v_j - v̄)(k_j - k̄)·r
        kc_r = torch.einsum("bjhd,bhid->bhij", kr, r.transpose(1, 2)) - (k_bar * r.transpose(1, 2)).sum(-1)[..., None]
        cov_r = torch.einsum("bhij,bjhd->bhid", p * kc_r, vr) - v_bar * (p * kc_r).sum(-1, keepdim=True)
        want = parallax_attn_einsum(q, r, k, v, causal=causal, scale=0.6, window_size=window).transpose(1, 2)
    assert_close_rel(moments, want, 1e-12, "moment form")
    assert_close_rel(v_bar - cov_r, want, 1e-12, "covariance form")


@pytest.mark.parametrize("shape", [SHAPES["GQA 3:1, window 4, D=12"], SHAPES["non-causal, T_q > T_k, GQA"]], ids=str)
def test_backward_formulas_of_the_doc(shape):
    """dV, dT, dS, then dQ, dR, dK as docs/parallax-math.md#backward derives them."""
    B, Tq, Tk, Hq, Hkv, D, causal, window = shape
    scale = 0.6
    leaves, do = _leaves(B, Tq, Tk, Hq, Hkv, D, seed=6)
    o = parallax_attn_einsum(*leaves, causal=causal, scale=scale, window_size=window)
    want = torch.autograd.grad(o, leaves, do)
    q, r, k, v = (x.detach() for x in leaves)
    with torch.no_grad():
        p, t, kr, vr = _parts(q, r, k, v, causal, scale, window)
        g = do.transpose(1, 2)  # (B, H, T_q, D)
        v_bar = torch.einsum("bhij,bjhd->bhid", p, vr)
        t_bar = (p * t).sum(-1, keepdim=True)
        a = torch.einsum("bhid,bjhd->bhij", g, vr)  # a_ij = g_i·v_j
        b = (g * v_bar).sum(-1, keepdim=True)  # b_i = g_i·v̄_i
        T = (g * o.detach().transpose(1, 2)).sum(-1, keepdim=True)  # T_i = g_i·o_i
        e = b - a
        w = 1 + t_bar - t
        dT = p * e
        dS = p * ((b - T) - w * e)
        dq = scale * torch.einsum("bhij,bjhd->bihd", dS, kr)
        dr = torch.einsum("bhij,bjhd->bihd", dT, kr)
        dk = scale * torch.einsum("bhij,bihd->bjhd", dS, q) + torch.einsum("bhij,bihd->bjhd", dT, r)
        dv = torch.einsum("bhij,bhid->bjhd", p * w, g)
        G = Hq // Hkv
        dk, dv = (x.unflatten(2, (Hkv, G)).sum(3) for x in (dk, dv))  # a kv head gets its group's sum
    for name, got, ref in zip(("dq", "dr", "dk", "dv"), (dq, dr, dk, dv), want):
        assert_close_rel(got, ref, 1e-11, name)


def test_streaming_and_split_states_combine_exactly():
    """The running-max update of the forward and the merge of split-KV partial states (docs/parallax-math.md
    #streaming, #decode): states of key slices, each relative to its own max, merge into the oracle's o."""
    (q, r, k, v), _ = _leaves(1, 1, 23, 2, 2, 8, seed=7)
    with torch.no_grad():
        s = 3.0 * torch.einsum("bihd,bjhd->bhij", q, k)  # large scores: the maxima matter
        t = torch.einsum("bihd,bjhd->bhij", r, k)
        states = []
        for lo, hi in [(0, 5), (5, 16), (16, 23)]:
            ss, tt, vv = s[..., lo:hi], t[..., lo:hi], v[:, lo:hi]
            m = ss.amax(-1, keepdim=True)
            w = torch.exp(ss - m)
            states.append((m, w.sum(-1, keepdim=True), (w * tt).sum(-1, keepdim=True),
                           torch.einsum("bhij,bjhd->bhid", w, vv), torch.einsum("bhij,bjhd->bhid", w * tt, vv)))  # fmt: skip
        M = torch.stack([st[0] for st in states]).amax(0)
        d1, d2, O1, O2 = (sum(torch.exp(st[0] - M) * st[n] for st in states) for n in (1, 2, 3, 4))
        o = O1 / d1 * (1 + d2 / d1) - O2 / d1
        want = parallax_attn_einsum(q, r, k, v, causal=False, scale=3.0)
    assert_close_rel(o.transpose(1, 2), want, 1e-12)


def test_citations_of_the_math_doc_name_its_sections():
    """Code cites docs/parallax-math.md by section anchor: each cited anchor must be one of its headings."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    doc = (root / "docs" / "parallax-math.md").read_text()
    anchors = {
        re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in re.findall(r"^#+ (.+)$", doc, re.M)
    }
    cited = set()
    for path in [*root.glob("kernels/**/*.py"), *root.glob("tests/**/*.py")]:
        text = path.read_text()
        for group in re.findall(r"parallax-math\.md((?:\s*\(?#[\w-]+[,)]?)+)", text):
            cited |= {(path.name, a) for a in re.findall(r"#([\w-]+)", group)}
    assert len(cited) >= 5, cited
    assert not {a for _, a in cited} - anchors, sorted(c for c in cited if c[1] not in anchors)
