"""Where the host time of one Parallax training call goes, on the GPU: the launchers alone (with and without TMA
descriptors), one bare Triton launch with as many arguments as the forward kernel, and a cProfile of fwd+bwd.

    python benchmarks/host_profile.py            # B1 H1 T128 D64 (the GPU is idle most of the time there)

Host times use bench_train.host_us (the GPU kept busy by a sleep kernel, calls issued without synchronising).
"""

from __future__ import annotations

import cProfile
import io
import pstats
import sys
from dataclasses import replace
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import host_us, make_inputs


# fmt: off
@triton.jit
def _noop(X, N: tl.constexpr):
    pass


@triton.jit
def _noop48(X, a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15, a16, a17, a18, a19, a20, a21, a22, a23, a24, a25, a26, a27, a28, a29, a30, a31, a32, a33, a34, a35, a36, a37, a38, a39, a40, a41, a42, a43, a44, a45, a46, a47, N: tl.constexpr):
    pass
# fmt: on


def main():
    from parallax_kernels import parallax_attn
    from parallax_kernels.parallax import triton_train as tt

    B, H, T, D = 1, 1, 128, 64
    q, r, k, v, do = make_inputs(B, T, T, H, H, D)
    leaves = [x.detach().clone().requires_grad_() for x in (q, r, k, v)]
    cfgs = tt.default_configs(D, q.dtype, q.device)
    no_tma = replace(cfgs.fwd, tma=False)
    o, vbar, lse, tbar = tt.parallax_fwd_triton(q, r, k, v, True, 0.125, None)
    ints = list(range(3, 51))  # not 1 (Triton specializes ints equal to 1)
    rows = {
        "fwd launcher (TMA)": lambda: tt.parallax_fwd_triton(q, r, k, v, True, 0.125, None),
        "fwd launcher (pointers)": lambda: tt.parallax_fwd_triton(q, r, k, v, True, 0.125, None, config=no_tma),
        "bwd launchers (TMA)": lambda: tt.parallax_bwd_triton(q, r, k, v, o, vbar, lse, tbar, do, True, 0.125, None),
        "bwd launchers (pointers)": lambda: tt.parallax_bwd_triton(
            q,
            r,
            k,
            v,
            o,
            vbar,
            lse,
            tbar,
            do,
            True,
            0.125,
            None,
            dq_config=replace(cfgs.dq, tma=False),
            dkv_config=replace(cfgs.dkv, tma=False),
        ),
        "bare Triton launch, 1 tensor + 48 ints": lambda: _noop48[(1,)](q, *ints, N=1),
        "bare Triton launch, 1 tensor": lambda: _noop[(1,)](q, N=1),
        "torch.empty x4": lambda: [torch.empty(8, device="cuda") for _ in range(4)],
        "parallax_attn fwd+bwd": lambda: torch.autograd.grad(parallax_attn(*leaves), leaves, do),
    }
    for name, fn in rows.items():
        print(f"{name:45s} {host_us(fn):8.1f} us", flush=True)
    fb = rows["parallax_attn fwd+bwd"]
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(200):
        fb()
    prof.disable()
    torch.cuda.synchronize()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(22)
    print(out.getvalue())


if __name__ == "__main__":
    main()
