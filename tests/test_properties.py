"""Property tests of the kernels' input validation (hypothesis): every valid shape passes the checks and the
public ops return the right shape; every invalid call is refused with a ValueError/TypeError before any
kernel or reference computation is launched.

Valid calls run twice: in float64 (the public ops run the PyTorch reference for it: fast, no interpreter),
and in float32 and float16 on the Triton path (the interpreter on CPU machines; fewer examples), where a spy
proves the kernel ran and the result is compared with the float64 reference. Invalid calls use float32; the
launchers are replaced by a tripwire, so a call that got past validation fails the test instead of running.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from parallax_kernels import (
    AttnShape,
    backend_for,
    check_attn_inputs,
    parallax_attn,
    parallax_attn_reference,
    parallax_decode,
    parallax_decode_reference,
)
from parallax_kernels.parallax import decode as decode_mod
from parallax_kernels.parallax import op as op_mod

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# Interpreted kernels cost about a second a call: fewer examples.
KERNEL_SETTINGS = settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TRITON = backend_for(torch.empty(0)) == "triton"
needs_triton = pytest.mark.skipif(not TRITON, reason="needs TRITON_INTERPRET=1 with triton (or CUDA)")
# Relative error vs the float64 reference: fp32 math on inputs rounded to the dtype (Frobenius norm).
KERNEL_TOL = {torch.float32: 1e-4, torch.float16: 5e-3}


def _batch_heads_dim(draw, max_batch: int, max_kv_heads: int) -> tuple[int, int, int, int]:
    """B, H, Hkv and D of a valid call: H a multiple of Hkv (grouped-query attention up to 3:1)."""
    B = draw(st.integers(1, max_batch))
    Hkv = draw(st.integers(1, max_kv_heads))
    H = Hkv * draw(st.integers(1, 3))
    D = draw(st.integers(1, 9))
    return B, H, Hkv, D


@st.composite
def attn_calls(draw):
    """A valid parallax_attn call: sizes, causal flag, window and scale."""
    B, H, Hkv, D = _batch_heads_dim(draw, max_batch=2, max_kv_heads=3)
    causal = draw(st.booleans())
    Tk = draw(st.integers(1, 7))
    Tq = draw(st.integers(1, Tk)) if causal else draw(st.integers(1, 7))
    window = draw(st.one_of(st.none(), st.integers(1, Tk + 2))) if causal else None
    scale = draw(st.one_of(st.none(), st.floats(1e-3, 10.0)))
    return {"B": B, "Tq": Tq, "Tk": Tk, "H": H, "Hkv": Hkv, "D": D, "causal": causal, "window": window, "scale": scale}


def _tensors(c, dtype):
    q = torch.randn(c["B"], c["Tq"], c["H"], c["D"], dtype=dtype)
    r = torch.randn(c["B"], c["Tq"], c["H"], c["D"], dtype=dtype)
    k = torch.randn(c["B"], c["Tk"], c["Hkv"], c["D"], dtype=dtype)
    v = torch.randn(c["B"], c["Tk"], c["Hkv"], c["D"], dtype=dtype)
    return {"q": q, "r": r, "k": k, "v": v, "causal": c["causal"], "window_size": c["window"], "scale": c["scale"]}


@contextlib.contextmanager
def tripwire():
    """Anything that would compute attention raises AssertionError instead. (Decode builds a launch plan
    before it reads CPU-held lengths; the plan's run is the launch, so the plan is what gets the tripwire.
    Plans made meanwhile go to a scratch cache.)"""

    def launched(*args, **kwargs):
        raise AssertionError("a kernel or the reference was launched for an invalid call")

    from parallax_kernels.parallax import triton_decode

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(op_mod, "_run_triton", launched)
        mp.setattr(op_mod, "_reference", launched)
        mp.setattr(decode_mod, "_reference", launched)
        mp.setattr(triton_decode, "launch_plan", lambda *args, **kwargs: launched)
        mp.setattr(decode_mod, "_PLANS", {})
        yield


@SETTINGS
@given(attn_calls())
def test_valid_attention_calls_pass_validation_and_run(c):
    args = _tensors(c, torch.float64)
    shape = check_attn_inputs(
        "p", args["q"], args["k"], args["v"], args["r"], causal=c["causal"], scale=c["scale"], window_size=c["window"]
    )
    assert shape == AttnShape(c["B"], c["Tq"], c["Tk"], c["H"], c["Hkv"], c["D"])
    out = parallax_attn(**args)
    assert out.shape == args["q"].shape and out.dtype == torch.float64 and torch.isfinite(out).all()


@contextlib.contextmanager
def spies():
    """Counts of calls that reach the Triton forward, the attention reference, and new decode launch plans."""
    from parallax_kernels.parallax import triton_decode

    calls = {"fwd": 0, "reference": 0, "decode_plan": 0}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(op_mod, "_run_triton", counted("fwd", op_mod._run_triton))
        mp.setattr(op_mod, "_reference", counted("reference", op_mod._reference))
        mp.setattr(triton_decode, "launch_plan", counted("decode_plan", triton_decode.launch_plan))
        mp.setattr(decode_mod, "_PLANS", {})
        yield calls


def _rel(got, want):
    return ((got.double() - want).norm() / want.norm().clamp_min(1e-30)).item()


@needs_triton
@KERNEL_SETTINGS
@given(attn_calls(), st.sampled_from([torch.float32, torch.float16]))
def test_valid_attention_calls_run_the_kernel_and_match_the_reference(c, dtype):
    args = _tensors(c, torch.float64)
    args.update({n: args[n].to(dtype) for n in "qrkv"})
    with spies() as calls:
        out = parallax_attn(**args)
    assert calls == {"fwd": 1, "reference": 0, "decode_plan": 0}, calls
    want = parallax_attn_reference(**{**args, **{n: args[n].double() for n in "qrkv"}})
    assert out.shape == want.shape and out.dtype == dtype
    assert _rel(out, want) <= KERNEL_TOL[dtype], f"relative error {_rel(out, want):.2e}"


@needs_triton
def test_float64_takes_the_reference_and_float32_the_kernel():
    """The float64 dispatch, proven by which path ran (not by comparing the reference with itself)."""
    c = {"B": 1, "Tq": 3, "Tk": 3, "H": 2, "Hkv": 1, "D": 4, "causal": True, "window": None, "scale": None}
    with spies() as calls:
        parallax_attn(**_tensors(c, torch.float64))
    assert calls == {"fwd": 0, "reference": 1, "decode_plan": 0}
    with spies() as calls:
        parallax_attn(**_tensors(c, torch.float32))
    assert calls == {"fwd": 1, "reference": 0, "decode_plan": 0}
    d = {"B": 2, "H": 2, "Hkv": 1, "D": 4, "L": 5, "lens": [2, 5], "window": None}
    with spies() as calls:
        parallax_decode(**_decode_args(d, torch.float64))
    assert calls["decode_plan"] == 0
    with spies() as calls:
        parallax_decode(**_decode_args(d, torch.float32))
    assert calls["decode_plan"] == 1


# Each mutation turns a valid call into an invalid one (None: not applicable to that call).
def _mutations(c, args):
    q, r, k, v = args["q"], args["r"], args["k"], args["v"]
    yield "rank 3 q", {"q": q[0]}
    yield "integer k", {"k": k.to(torch.int32)}
    yield "boolean v", {"v": v > 0}
    yield "r shaped unlike q", {"r": torch.randn(*q.shape[:-1], q.shape[-1] + 1)}
    yield "v shaped unlike k", {"v": torch.randn(k.shape[0], k.shape[1] + 1, *k.shape[2:])}
    yield "batch mismatch", {"k": k.repeat(2, 1, 1, 1), "v": v.repeat(2, 1, 1, 1)}
    yield (
        "head_dim mismatch",
        {"k": torch.randn(*k.shape[:-1], k.shape[-1] + 1), "v": torch.randn(*v.shape[:-1], v.shape[-1] + 1)},
    )
    yield "dtype mismatch", {"r": r.half()}
    yield "empty batch", {"q": q[:0], "r": r[:0], "k": k[:0], "v": v[:0]}
    yield "not a tensor", {"q": q.tolist()}
    if c["Hkv"] > 1:
        yield (
            "heads not a multiple",
            {"q": q[:, :, :1].repeat(1, 1, c["Hkv"] + 1, 1), "r": r[:, :, :1].repeat(1, 1, c["Hkv"] + 1, 1)},
        )
    yield "zero scale", {"scale": 0.0}
    yield "infinite scale", {"scale": float("inf")}
    yield "tensor scale", {"scale": torch.tensor(1.0)}
    yield "window 0", {"window_size": 0, "causal": True}
    yield "window as float", {"window_size": 2.0, "causal": True}
    yield "window without causal", {"window_size": 1, "causal": False}
    yield (
        "more queries than keys",
        {
            "q": q.repeat(1, c["Tk"] + 1, 1, 1)[:, : c["Tk"] + 1],
            "r": r.repeat(1, c["Tk"] + 1, 1, 1)[:, : c["Tk"] + 1],
            "causal": True,
            "window_size": None,
        },
    )


@SETTINGS
@given(attn_calls(), st.data())
def test_invalid_attention_calls_are_refused_before_launch(c, data):
    args = _tensors(c, torch.float32)
    _, change = data.draw(st.sampled_from(list(_mutations(c, args))), label="mutation")
    with tripwire(), pytest.raises((ValueError, TypeError)):
        parallax_attn(**{**args, **change})


@st.composite
def decode_calls(draw):
    B, H, Hkv, D = _batch_heads_dim(draw, max_batch=3, max_kv_heads=2)
    L = draw(st.integers(1, 9))
    lens = draw(st.one_of(st.none(), st.lists(st.integers(1, L), min_size=B, max_size=B)))
    window = draw(st.one_of(st.none(), st.integers(1, L + 2)))
    return {"B": B, "H": H, "Hkv": Hkv, "D": D, "L": L, "lens": lens, "window": window}


def _decode_args(c, dtype):
    lens = None if c["lens"] is None else torch.tensor(c["lens"], dtype=torch.int32)
    return {
        "q": torch.randn(c["B"], 1, c["H"], c["D"], dtype=dtype),
        "r": torch.randn(c["B"], 1, c["H"], c["D"], dtype=dtype),
        "k_cache": torch.randn(c["B"], c["L"], c["Hkv"], c["D"], dtype=dtype),
        "v_cache": torch.randn(c["B"], c["L"], c["Hkv"], c["D"], dtype=dtype),
        "cache_seqlens": lens,
        "window_size": c["window"],
    }


@SETTINGS
@given(decode_calls())
def test_valid_decode_calls_run(c):
    args = _decode_args(c, torch.float64)
    out = parallax_decode(**args)
    assert out.shape == args["q"].shape and torch.isfinite(out).all()


@needs_triton
@KERNEL_SETTINGS
@given(decode_calls(), st.sampled_from([torch.float32, torch.float16]))
def test_valid_decode_calls_run_the_kernel_and_match_the_reference(c, dtype):
    args = _decode_args(c, torch.float64)
    args.update({n: args[n].to(dtype) for n in ("q", "r", "k_cache", "v_cache")})
    want = parallax_decode_reference(**{**args, **{n: args[n].double() for n in ("q", "r", "k_cache", "v_cache")}})
    with spies() as calls:
        out = parallax_decode(**args)
    assert calls["decode_plan"] == 1, calls
    assert out.shape == want.shape and out.dtype == dtype
    assert _rel(out, want) <= KERNEL_TOL[dtype], f"relative error {_rel(out, want):.2e}"


@SETTINGS
@given(decode_calls(), st.data())
def test_invalid_decode_calls_are_refused_before_launch(c, data):
    args = _decode_args(c, torch.float32)
    q, k = args["q"], args["k_cache"]
    B, L = c["B"], c["L"]
    mutations = [
        {"q": q.repeat(1, 2, 1, 1), "r": args["r"].repeat(1, 2, 1, 1)},  # two tokens
        {"cache_seqlens": torch.full((B,), L + 1, dtype=torch.int32)},  # longer than the cache
        {"cache_seqlens": torch.zeros(B, dtype=torch.int32)},  # empty cache
        {"cache_seqlens": torch.ones(B + 1, dtype=torch.int32)},  # one length too many
        {"cache_seqlens": torch.ones(B, dtype=torch.float32)},  # not integers
        {"cache_seqlens": [1] * B},  # not a tensor
        {"k_cache": torch.randn(B, L, c["Hkv"], 2 * c["D"])[..., ::2], "v_cache": args["v_cache"]},  # strided D
        {"window_size": 0},
        {"k_cache": k.double(), "v_cache": args["v_cache"].double()},  # dtype mismatch
    ]
    change = data.draw(st.sampled_from(mutations), label="mutation")
    with tripwire(), pytest.raises((ValueError, TypeError)):
        parallax_decode(**{**args, **change})


def test_the_tripwire_trips_on_a_valid_call():
    """Without this the refusals above could pass for a launch that happens not to raise."""
    c = {"B": 1, "Tq": 4, "Tk": 4, "H": 2, "Hkv": 1, "D": 16, "causal": True, "window": None, "scale": None}
    with tripwire(), pytest.raises(AssertionError, match="launched"):
        parallax_attn(**_tensors(c, torch.float32))
    d = {"B": 2, "H": 2, "Hkv": 1, "D": 16, "L": 5, "lens": [2, 5], "window": None}
    with tripwire(), pytest.raises(AssertionError, match="launched"):
        parallax_decode(**_decode_args(d, torch.float32))
