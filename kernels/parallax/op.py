"""Public Parallax attention op: validate, then dispatch (the Triton kernels on CUDA or under the
interpreter, the PyTorch reference elsewhere and for float64).

The kernels are registered as torch.library custom ops (`parallax_kernels::parallax_fwd` and
`parallax_kernels::parallax_bwd`) with fake implementations and autograd, so torch.compile traces a model
that calls `parallax_attn` into one graph instead of breaking around the op. Eager calls reach the same
launchers through a plain `torch.autograd.Function` instead: the custom-op dispatcher (default filling, alias
checks, redispatch through autograd) costs more host time per call than the launches themselves, and in eager
mode nothing needs it. Both paths run the same kernels with the same arguments, so they give identical results.
"""

from __future__ import annotations

import itertools

import torch

from .._checks import check_attn_inputs, check_cu_seqlens, refuse_host_read_under_capture
from .._dispatch import backend_for
from .reference import parallax_attn_reference

_OP = "parallax_attn"


# --------------------------------------------------------------------------------------------------------------
# The launches, and the two ways autograd reaches them. window_size 0 means no window; max_seqlen is only read
# with cu_seqlens.
# --------------------------------------------------------------------------------------------------------------
def _launch_fwd(q, r, k, v, causal, scale, window_size, cu_seqlens, max_seqlen, save_stats):
    """(o, v̄, lse, t̄) from the forward kernel; the last three are empty unless save_stats."""
    from .triton_train import parallax_fwd_triton

    return parallax_fwd_triton(
        q, r, k, v, causal, scale, window_size or None, cu_seqlens, max_seqlen, save_stats=save_stats
    )


def _launch_bwd(do, q, r, k, v, o, vbar, lse, tbar, causal, scale, window_size, cu_seqlens, max_seqlen):
    """(dq, dr, dk, dv) from the backward kernels."""
    from .triton_train import parallax_bwd_triton

    return parallax_bwd_triton(
        q, r, k, v, o, vbar, lse, tbar, do, causal, scale, window_size or None, cu_seqlens, max_seqlen
    )


def _save(ctx, q, r, k, v, causal, scale, window_size, cu_seqlens, max_seqlen, save_stats, output):
    """Keep what _grads needs: the inputs, the forward's (o, v̄, lse, t̄) and the call's options."""
    o, vbar, lse, tbar = output
    ctx.save_for_backward(q, r, k, v, o, vbar, lse, tbar, cu_seqlens)
    ctx.args = (causal, scale, window_size, max_seqlen, save_stats)


def _grads(ctx, do, launch_bwd):
    """(dq, dr, dk, dv) for the output gradient `do`, through launch_bwd: the custom op while tracing,
    _launch_bwd itself in eager mode."""
    q, r, k, v, o, vbar, lse, tbar, cu_seqlens = ctx.saved_tensors
    causal, scale, window_size, max_seqlen, save_stats = ctx.args
    if not save_stats:
        raise RuntimeError(
            "parallax_attn: backward through a forward that ran without saving its statistics "
            "(grad mode was off or no input required grad when it ran)"
        )
    return launch_bwd(do, q, r, k, v, o, vbar, lse, tbar, causal, scale, window_size, cu_seqlens, max_seqlen)


@torch.library.custom_op("parallax_kernels::parallax_fwd", mutates_args=())
def parallax_fwd(
    q: torch.Tensor,
    r: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    scale: float,
    window_size: int,
    cu_seqlens: torch.Tensor | None,
    max_seqlen: int,
    save_stats: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(o, v̄, lse, t̄); the last three are empty unless save_stats (they are what the backward reads)."""
    return _launch_fwd(q, r, k, v, causal, scale, window_size, cu_seqlens, max_seqlen, save_stats)


@parallax_fwd.register_fake
def _(q, r, k, v, causal, scale, window_size, cu_seqlens, max_seqlen, save_stats):
    B, T, H, _ = q.shape
    o = q.new_empty(q.shape)
    if not save_stats:
        return o, q.new_empty(0), q.new_empty(0, dtype=torch.float32), q.new_empty(0, dtype=torch.float32)
    return (
        o,
        q.new_empty(q.shape),
        q.new_empty((B, H, T), dtype=torch.float32),
        q.new_empty((B, H, T), dtype=torch.float32),
    )


@torch.library.custom_op("parallax_kernels::parallax_bwd", mutates_args=())
def parallax_bwd(
    do: torch.Tensor,
    q: torch.Tensor,
    r: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    vbar: torch.Tensor,
    lse: torch.Tensor,
    tbar: torch.Tensor,
    causal: bool,
    scale: float,
    window_size: int,
    cu_seqlens: torch.Tensor | None,
    max_seqlen: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dr, dk, dv) from the output gradient and what the forward saved."""
    return _launch_bwd(do, q, r, k, v, o, vbar, lse, tbar, causal, scale, window_size, cu_seqlens, max_seqlen)


@parallax_bwd.register_fake
def _(do, q, r, k, v, o, vbar, lse, tbar, causal, scale, window_size, cu_seqlens, max_seqlen):
    return q.new_empty(q.shape), r.new_empty(r.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    _save(ctx, *inputs, output)
    # Only o is ever used downstream; do not materialize zero gradients for v̄, lse and t̄.
    ctx.set_materialize_grads(False)


def _backward(ctx, do, _dvbar, _dlse, _dtbar):
    if do is None:
        return (None,) * 10
    return (*_grads(ctx, do, parallax_bwd), None, None, None, None, None, None)


parallax_fwd.register_autograd(_backward, setup_context=_setup_context)


class _EagerParallax(torch.autograd.Function):
    """The eager path: the custom ops' launches under a plain autograd.Function (see the module docstring)."""

    @staticmethod
    def forward(ctx, q, r, k, v, causal, scale, window_size, cu_seqlens, max_seqlen):
        out = _launch_fwd(q, r, k, v, causal, scale, window_size, cu_seqlens, max_seqlen, True)
        _save(ctx, q, r, k, v, causal, scale, window_size, cu_seqlens, max_seqlen, True, out)
        return out[0]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do):
        return (*_grads(ctx, do, _launch_bwd), None, None, None, None, None)


def _run_triton(q, r, k, v, causal, scale, window_size, cu_seqlens, max_seqlen, save_stats):
    """o from the Triton kernels: through the custom op while torch.compile traces, else the eager path."""
    if torch.compiler.is_compiling():
        return parallax_fwd(q, r, k, v, causal, scale, window_size, cu_seqlens, max_seqlen, save_stats)[0]
    if save_stats:
        return _EagerParallax.apply(q, r, k, v, causal, scale, window_size, cu_seqlens, max_seqlen)
    return _launch_fwd(q, r, k, v, causal, scale, window_size, cu_seqlens, max_seqlen, False)[0]


# --------------------------------------------------------------------------------------------------------------
# Public function
# --------------------------------------------------------------------------------------------------------------
def _check_max_seqlen(max_seqlen, total: int) -> int:
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int):
        raise TypeError(f"{_OP}: max_seqlen must be an int or None, got {type(max_seqlen).__name__}")
    if not 1 <= max_seqlen <= total:
        raise ValueError(f"{_OP}: max_seqlen must lie in [1, {total}] (the packed length), got {max_seqlen}")
    return max_seqlen


def parallax_attn(q, r, k, v, causal=True, scale=None, window_size=None, cu_seqlens=None, max_seqlen=None):
    """Parallax attention, layout (B, T, H, D); differentiable.

    q, r: (B, T_q, H_q, D); k, v: (B, T_k, H_kv, D), H_q % H_kv == 0. With causal=True and T_q < T_k the
    queries are the last T_q positions. cu_seqlens (int32 offsets [0, ..., T], batch 1) packs several
    sequences that do not attend to each other; max_seqlen, the longest of them, may be given with it (as in
    flash-attn) to spare the host synchronization that reading the offsets costs: the offsets are then
    checked on the device (on CUDA a bad value is a device-side assert, which ends the process's use of the
    GPU; on CPU a ValueError), and the kernels clamp them, so they never read or write outside the tensors.
    Runs the Triton kernels on CUDA (and on CPU under TRITON_INTERPRET=1), the reference otherwise and for
    float64 inputs.
    """
    shape = check_attn_inputs(_OP, q, k, v, r, causal=causal, scale=scale, window_size=window_size)
    if cu_seqlens is not None:
        if max_seqlen is None:
            reads = "with cu_seqlens and no max_seqlen, finding the longest sequence reads the offsets"
            refuse_host_read_under_capture(_OP, cu_seqlens, reads, "pass max_seqlen")
        else:
            max_seqlen = _check_max_seqlen(max_seqlen, q.shape[1])
        # With max_seqlen the offsets are checked on their device (no host sync), else read and checked here.
        offsets = check_cu_seqlens(
            _OP, cu_seqlens, q.shape[1], q.device, q.shape[0], max_seqlen=max_seqlen, seq_k=k.shape[1]
        )
        if max_seqlen is None:
            max_seqlen = max(b - a for a, b in itertools.pairwise(offsets))
    elif max_seqlen is not None:
        raise ValueError(f"{_OP}: max_seqlen is only meaningful with cu_seqlens")

    if backend_for(q) != "triton" or q.dtype == torch.float64:
        return _reference(q, r, k, v, causal, scale, window_size, cu_seqlens)

    scale = shape.head_dim**-0.5 if scale is None else float(scale)
    save_stats = torch.is_grad_enabled() and any(t.requires_grad for t in (q, r, k, v))
    return _run_triton(q, r, k, v, causal, scale, window_size or 0, cu_seqlens, max_seqlen or 0, save_stats)


def _reference(q, r, k, v, causal, scale, window_size, cu_seqlens):
    return parallax_attn_reference(
        q, r, k, v, causal=causal, scale=scale, window_size=window_size, cu_seqlens=cu_seqlens
    )
