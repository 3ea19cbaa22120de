"""Parallax training kernels on one GPU: bf16 correctness, then speed against the peers in the same run.

    python benchmarks/bench_train.py              # correctness + the anchors grid
    python benchmarks/bench_train.py --quick      # fewer correctness shapes + the main shape only
    python benchmarks/bench_train.py --sweep      # time explicit kernel configs, print the best per kernel
    python benchmarks/bench_train.py --host       # host time per call beside SDPA flash, and CUDA-graph replay
    python benchmarks/bench_train.py --authors-all  # also time the authors' kernel off the main shape
                                                    # (their autotuning outlasted every kept call's timeout)

Peers: torch SDPA (FLASH_ATTENTION and CUDNN_ATTENTION backends, softmax), the paper authors' Triton kernel
(`parallax.parallax_func`, PyPI parallax-kernel, layout (B, H, T, D)) and fla's `parallel_parallax`
(PyPI fla-core, layout (B, T, H, D)). Each peer gets its inputs in its native layout, made outside the timed
region. A missing or failing peer is reported, never fatal. `--peers-path DIR` (or $PEERS_PATH) puts a
`pip install --target DIR` folder on sys.path.

Timing: triton.testing.do_bench medians; forward with inputs that require grad (what training runs), and
forward+backward with a fixed output gradient. TFLOP/s count Parallax as 2x softmax attention
(fwd 4·B·H·T²·D, halved when causal; fwd+bwd 3.5x that). Full log and JSON go to $OUT when it is set.
The short table is printed last.

Why one long file: it is one GPU session's script, whose modes (correctness, timing, host time, the sweep)
share its peers, inputs and timers; the sections are marked by banner comments.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
import traceback

import torch
import torch.nn.functional as F
from _common import RunLog, save_outputs

DEVICE = "cuda"
DTYPE = torch.bfloat16
log = RunLog()
LOG = log.lines


# ------------------------------------------------------------------------------------------------- peers
def load_peers(names):
    """{name: callable or error string}. Each callable takes our (B, T, H, D) tensors' *native copies*."""
    peers = {}
    if "authors" in names:
        try:
            import parallax  # the paper authors' package

            peers["authors"] = parallax.parallax_func
        except Exception as e:  # a peer that cannot load is reported, not fatal
            peers["authors"] = f"unavailable: {type(e).__name__}: {e}"
    if "fla" in names:
        try:
            from fla.ops.parallax import parallel_parallax

            peers["fla"] = parallel_parallax
        except Exception as e:
            peers["fla"] = f"unavailable: {type(e).__name__}: {e}"
    return peers


def sdpa_backend(name):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.FLASH_ATTENTION if name == "flash" else SDPBackend.CUDNN_ATTENTION)


# ------------------------------------------------------------------------------------------------- inputs
def make_inputs(B, Tq, Tk, Hq, Hkv, D, seed=0):
    """Unit-variance q, r, k, v: what per-head RMSNorm on q, k and r hands the op in the paper's model."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    mk = lambda *s: torch.randn(*s, device=DEVICE, dtype=torch.float32, generator=g).to(DTYPE)  # noqa: E731
    return mk(B, Tq, Hq, D), mk(B, Tq, Hq, D), mk(B, Tk, Hkv, D), mk(B, Tk, Hkv, D), mk(B, Tq, Hq, D)


def rel_err(a, b):
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


# ------------------------------------------------------------------------------------------------- correctness
CORRECTNESS = [
    # name, (B, Tq, Tk, Hq, Hkv, D), causal, window, cu_seqlens offsets
    ("T=1000 GQA 8:2 D128", (2, 1000, 1000, 8, 2, 128), True, None, None),
    ("D=96", (2, 1024, 1024, 4, 4, 96), True, None, None),
    ("window 256, T=2048", (1, 2048, 2048, 4, 2, 128), True, 256, None),
    ("varlen [300,811,789,148] GQA 4:2 D64", (1, 2048, 2048, 4, 2, 64), True, None, [0, 300, 1111, 1900, 2048]),
    ("T_q=384 < T_k=1500 (prefill chunk)", (1, 384, 1500, 8, 2, 128), True, None, None),
    ("non-causal T=777 D64", (2, 777, 777, 4, 4, 64), False, None, None),
    ("D=256 T=1031", (1, 1031, 1031, 4, 2, 256), True, None, None),
    ("D=32 T=513", (2, 513, 513, 4, 1, 32), True, None, None),
]
QUICK_CORRECTNESS = {"T=1000 GQA 8:2 D128", "D=96", "varlen [300,811,789,148] GQA 4:2 D64"}


def correctness(shapes, tol=1e-2):
    from parallax_kernels import parallax_attn, parallax_attn_reference

    rows, ok = [], True
    for name, (B, Tq, Tk, Hq, Hkv, D), causal, window, offsets in shapes:
        try:
            q, r, k, v, do = make_inputs(B, Tq, Tk, Hq, Hkv, D)
            leaves = [x.clone().requires_grad_() for x in (q, r, k, v)]
            cu = None if offsets is None else torch.tensor(offsets, dtype=torch.int32, device=DEVICE)
            o = parallax_attn(*leaves, causal=causal, window_size=window, cu_seqlens=cu)
            grads = torch.autograd.grad(o, leaves, do)
            # The oracle computes in fp32 from the same bf16 values, so its error is not ours.
            ref_leaves = [x.float().requires_grad_() for x in (q, r, k, v)]
            want = parallax_attn_reference(*ref_leaves, causal=causal, window_size=window, cu_seqlens=cu)
            want_grads = torch.autograd.grad(want, ref_leaves, do.float())
            errs = [rel_err(o, want)] + [rel_err(g, w) for g, w in zip(grads, want_grads)]
            passed = max(errs) <= tol
            detail = " ".join(f"{n}={e:.2e}" for n, e in zip(("o", "dq", "dr", "dk", "dv"), errs))
        except Exception as e:
            passed, detail, errs = False, f"ERROR {type(e).__name__}: {e}", []
            LOG.append(traceback.format_exc())
        ok &= passed
        rows.append({"name": name, "passed": passed, "errors": errs, "detail": detail})
        log(f"correctness  {'PASS' if passed else 'FAIL'}  {name:40s} {detail}")
        torch.cuda.empty_cache()
    return ok, rows


def peer_agreement(peers, shape):
    """Do the peers compute the same function as ours (same scale, causal convention) at the main shape?"""
    from parallax_kernels import parallax_attn

    B, T, H, D = shape
    q, r, k, v, _ = make_inputs(B, T, T, H, H, D, seed=1)
    with torch.no_grad():
        ours = parallax_attn(q, r, k, v)
        for name, fn in peers.items():
            if isinstance(fn, str):
                continue
            try:
                if name == "authors":
                    tr = lambda x: x.transpose(1, 2).contiguous()  # noqa: E731
                    theirs = fn(tr(q), tr(r), tr(k), tr(v)).transpose(1, 2)
                else:
                    theirs = fn(q, r, k, v)
                log(f"agreement    ours vs {name}: rel err {rel_err(theirs, ours.float()):.2e}")
            except Exception as e:
                log(f"agreement    {name} FAILED: {type(e).__name__}: {e}")


# ------------------------------------------------------------------------------------------------- timing
# B, T, H, D: the main shape's T, so the authors' kernel (autotuning keyed on T, not B) tunes only once.
AGREEMENT_SHAPE = (1, 4096, 16, 128)
SWEEP_SHAPE = (4, 16, 4096)  # B, H, T (half the batch at head dim 256)
GRID = [(4, 16, 4096, 128), (8, 16, 1024, 128), (2, 16, 8192, 128), (4, 16, 4096, 64)]


def flops(B, H, T, D, causal=True):
    fwd = 4 * B * H * T * T * D * (0.5 if causal else 1.0)
    return fwd, 3.5 * fwd  # softmax attention; Parallax counts twice these


def bench(fn):
    from triton.testing import do_bench

    fn()  # compile / autotune outside the timed region
    torch.cuda.synchronize()
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def time_impl(name, fn_native, inputs, do):
    """(fwd ms, fwd+bwd ms) or an error string; inputs are already in the implementation's layout."""
    leaves = [x.detach().clone().requires_grad_() for x in inputs]

    def fwd():
        return fn_native(*leaves)

    def fwd_bwd():
        torch.autograd.grad(fn_native(*leaves), leaves, do)

    ctx = sdpa_backend(name) if name in ("flash", "cudnn") else contextlib.nullcontext()
    with ctx:
        return bench(fwd), bench(fwd_bwd)


def peak_memory_mb(fn_native, inputs, do):
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    torch.autograd.grad(fn_native(*leaves), leaves, do)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def softmax(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def timing(grid, peers, authors_all, on_progress=lambda results: None):
    """Times every implementation at every shape. The authors' kernel goes last at each shape (its first call
    autotunes for minutes), and on_progress gets the results after every measurement, so a run cut short by a
    timeout still leaves a table."""
    from parallax_kernels import parallax_attn

    results = []
    for si, (B, H, T, D) in enumerate(grid):
        shape_name = f"B{B} H{H} T{T} D{D}"
        q, r, k, v, do = make_inputs(B, T, T, H, H, D)
        bhtd = lambda x: x.transpose(1, 2).contiguous()  # noqa: E731
        impls = {
            "ours": (lambda q, r, k, v: parallax_attn(q, r, k, v), (q, r, k, v), do),
            "flash": (softmax, (bhtd(q), bhtd(k), bhtd(v)), bhtd(do)),
            "cudnn": (softmax, (bhtd(q), bhtd(k), bhtd(v)), bhtd(do)),
        }
        if "fla" in peers:
            impls["fla"] = (peers["fla"], (q, r, k, v), do)
        if "authors" in peers:
            if si == 0 or authors_all:
                impls["authors"] = (peers["authors"], (bhtd(q), bhtd(r), bhtd(k), bhtd(v)), bhtd(do))
            else:
                impls["authors"] = ("skipped off the main shape (autotuning takes minutes per shape; --authors-all)",)
        f_fwd, f_fb = flops(B, H, T, D)
        row = {"shape": shape_name, "ours_peak_mb": "-", "flash_peak_mb": "-"}
        results.append(row)
        for name, spec in impls.items():
            fn = spec[0]
            if isinstance(fn, str):
                row[name] = fn
                log(f"timing       {shape_name:22s} {name:8s} {fn}")
                continue
            try:
                t_f, t_fb = time_impl(name, fn, spec[1], spec[2])
                if name == "ours":
                    from parallax_kernels.parallax.triton_train import LAUNCH_STATS

                    log(f"kernels      {shape_name:22s} (registers, spills): {LAUNCH_STATS}")
                mult = 1 if name in ("flash", "cudnn") else 2
                row[name] = {"fwd_ms": t_f, "fwd_bwd_ms": t_fb,
                             "fwd_tflops": mult * f_fwd / t_f / 1e9, "fwd_bwd_tflops": mult * f_fb / t_fb / 1e9}  # fmt: skip
                log(f"timing       {shape_name:22s} {name:8s} fwd {t_f:7.3f} ms ({row[name]['fwd_tflops']:5.0f} TF/s)"
                    f"   fwd+bwd {t_fb:7.3f} ms ({row[name]['fwd_bwd_tflops']:5.0f} TF/s)")  # fmt: skip
            except Exception as e:
                row[name] = f"FAILED {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                LOG.append(traceback.format_exc())
                log(f"timing       {shape_name:22s} {name:8s} {row[name]}")
            torch.cuda.empty_cache()
            if name == "cudnn":  # peak memory after the fast ones, before the slow peers
                for which in ("ours", "flash"):
                    try:
                        row[f"{which}_peak_mb"] = peak_memory_mb(*impls[which])
                    except Exception as e:
                        row[f"{which}_peak_mb"] = f"FAILED {type(e).__name__}"
                log(f"memory       {shape_name:22s} fwd+bwd peak above inputs: ours {row['ours_peak_mb']} MB, "
                    f"flash {row['flash_peak_mb']} MB")  # fmt: skip
            on_progress(results)
        del q, r, k, v, do, impls
        torch.cuda.empty_cache()
    return results


# ------------------------------------------------------------------------------------------------- host time
HOST_SHAPES = [(1, 1, 128, 64), (8, 16, 1024, 128), (4, 16, 4096, 128)]  # (B, H, T, D)


def host_us(fn, calls=20, repeats=7):
    """Median host time of one call, in microseconds, with the GPU kept busy so it never waits for the host: a
    long sleep kernel goes first, then `calls` calls are queued (well under the launch queue's depth) and timed
    without synchronising. What is measured is what the CPU spends to issue the work."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        torch.cuda._sleep(400_000_000)  # ~0.2 s of GPU time at ~2 GHz: longer than the calls take to issue
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t) / calls * 1e6)
        torch.cuda.synchronize()
    times.sort()
    return times[len(times) // 2]


def host_timing(shapes, graphs=True):
    """Host time per call (fwd, fwd+bwd) of ours (eager path), ours through the custom op (what torch.compile
    calls), and SDPA flash; then device time of fwd+bwd eager vs replayed from a CUDA graph."""
    rows = []
    for shape in shapes:
        rows.append(_host_row(*shape, graphs=graphs))
        torch.cuda.empty_cache()
    return rows


def _host_row(B, H, T, D, graphs):
    from parallax_kernels import parallax_attn
    from parallax_kernels.parallax import op as parallax_op

    name = f"B{B} H{H} T{T} D{D}"
    q, r, k, v, do = make_inputs(B, T, T, H, H, D)
    leaves = [x.detach().clone().requires_grad_() for x in (q, r, k, v)]
    bhtd = [x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v)]
    do_bhtd = do.transpose(1, 2).contiguous()
    scale = D**-0.5
    impls = {
        "ours": (lambda: parallax_attn(*leaves), leaves, do),
        "ours_custom_op": (lambda: parallax_op.parallax_fwd(*leaves, True, scale, 0, None, 0, True)[0], leaves, do),
        "flash": (lambda: softmax(*bhtd), bhtd, do_bhtd),
    }
    row = {"shape": name}
    for impl, (fwd, grad_in, grad_out) in impls.items():

        def fwd_bwd(fwd=fwd, grad_in=grad_in, grad_out=grad_out):
            torch.autograd.grad(fwd(), grad_in, grad_out)

        with sdpa_backend("flash") if impl == "flash" else contextlib.nullcontext():
            row[impl] = {"fwd_host_us": host_us(fwd), "fwd_bwd_host_us": host_us(fwd_bwd), "fwd_bwd_ms": bench(fwd_bwd)}
        log(f"host         {name:22s} {impl:15s} fwd {row[impl]['fwd_host_us']:7.1f} us   fwd+bwd "
            f"{row[impl]['fwd_bwd_host_us']:7.1f} us host, {row[impl]['fwd_bwd_ms']:.3f} ms device")  # fmt: skip
    if graphs:
        try:
            row["ours_graph_fwd_bwd_ms"] = graph_ms(lambda: torch.autograd.grad(parallax_attn(*leaves), leaves, do))
            log(
                f"graph        {name:22s} ours fwd+bwd replayed from a CUDA graph: {row['ours_graph_fwd_bwd_ms']:.3f} ms"
            )
        except Exception as e:
            row["ours_graph_fwd_bwd_ms"] = f"FAILED {type(e).__name__}: {e}"
            log(f"graph        {name:22s} {row['ours_graph_fwd_bwd_ms']}")
    return row


def graph_ms(fn):
    """Median ms of fn replayed from a CUDA graph (captured after a warm-up on a side stream)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return bench(graph.replay)


def host_table(rows):
    lines = ["host time per call, us (fwd | fwd+bwd), GPU kept busy; device fwd+bwd ms eager and graph-replayed"]
    lines.append(f"{'shape':20s} {'ours':>15s} {'ours custom op':>15s} {'flash':>15s}  ours/flash  "
                 f"{'ours ms':>8s} {'graph ms':>8s} {'flash ms':>8s}")  # fmt: skip
    for row in rows:
        cells = [
            f"{row[n]['fwd_host_us']:6.0f}|{row[n]['fwd_bwd_host_us']:<6.0f}"
            for n in ("ours", "ours_custom_op", "flash")
        ]
        rat = row["ours"]["fwd_bwd_host_us"] / row["flash"]["fwd_bwd_host_us"]
        graph = row.get("ours_graph_fwd_bwd_ms")
        graph = f"{graph:.3f}" if isinstance(graph, float) else "-"
        lines.append(f"{row['shape']:20s} " + " ".join(f"{c:>15s}" for c in cells) + f"  {rat:10.2f}  "
                     f"{row['ours']['fwd_bwd_ms']:8.3f} {graph:>8s} {row['flash']['fwd_bwd_ms']:8.3f}")  # fmt: skip
    lines.append("target: ours fwd+bwd host time <= 1.5x flash's at B8 H16 T1024 D128")
    return lines


# ------------------------------------------------------------------------------------------------- sweep
# (block_m, block_n, num_warps, num_stages[, lazy_rescale]) candidates per padded head dim; the first of each
# list is the tile of the op's table entry (the sweep reads through TMA descriptors wherever the inputs allow;
# benchmarks/ab_train_kernels.py times each kernel with and without them). block_m counts query rows and block_n
# key rows in every kernel (the dK/dV kernel holds block_n keys and loops over block_m queries). Centred on the
# best of the H200 sweeps of 2026-12-03 (benchmarks/RESULTS.md): one-warpgroup tiles that fit two programs an SM,
# and their neighbours.
FWD_CANDIDATES = {
    64: [(64, 64, 4, 3), (64, 64, 4, 2), (128, 64, 8, 3), (128, 128, 8, 3), (64, 128, 4, 3), (64, 32, 4, 3)],
    128: [(64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 8, 3), (128, 64, 8, 4), (64, 32, 4, 3), (128, 32, 8, 3)],
    256: [(32, 32, 4, 1), (32, 32, 4, 2), (32, 16, 4, 2), (16, 32, 4, 1)],
}  # fmt: skip
DQ_CANDIDATES = {
    64: [(64, 64, 4, 3), (64, 64, 4, 2), (64, 32, 4, 3), (128, 64, 8, 3), (128, 64, 8, 2)],
    128: [(64, 32, 4, 3), (64, 32, 4, 4), (128, 32, 8, 3), (128, 64, 8, 3), (64, 64, 4, 2)],
    256: [(32, 32, 4, 2), (32, 32, 4, 3), (32, 16, 4, 2), (16, 32, 4, 2)],
}  # fmt: skip
DKV_CANDIDATES = {
    64: [(64, 128, 8, 2), (64, 128, 8, 3), (32, 128, 8, 3), (32, 64, 4, 3), (32, 64, 4, 4)],
    128: [(32, 64, 4, 3), (32, 64, 4, 2), (32, 128, 8, 2), (16, 64, 4, 3), (16, 128, 8, 3)],
    256: [(16, 16, 4, 2), (16, 32, 4, 2), (32, 32, 4, 2)],
}  # fmt: skip


def sweep_dim(D):
    """Time each candidate of each kernel at B4 H16 T4096 causal (B2 for D=256); returns summary rows.

    The dQ/dR and dK/dV kernels run back to back in one backward: a dQ/dR candidate is timed with dK/dV at its
    default, a dK/dV candidate with dQ/dR at the best found, so within one kernel's list the differences are
    that kernel's. A candidate whose result differs from the default config's (rel err > 1e-2) is WRONG.
    """
    from dataclasses import astuple

    from triton.testing import do_bench

    from parallax_kernels.parallax.triton_train import (
        LAUNCH_STATS,
        KernelConfig,
        default_configs,
        parallax_bwd_triton,
        parallax_fwd_triton,
    )

    B, H, T = SWEEP_SHAPE if D <= 128 else (SWEEP_SHAPE[0] // 2, *SWEEP_SHAPE[1:])
    q, r, k, v, do = make_inputs(B, T, T, H, H, D)
    scale = D**-0.5
    base = default_configs(D, q.dtype, q.device)
    saved = parallax_fwd_triton(q, r, k, v, True, scale, None, config=base.fwd)
    ref_grads = parallax_bwd_triton(q, r, k, v, *saved, do, True, scale, None)
    f_fwd, f_fb = flops(B, H, T, D)

    def fwd(cfg):
        return lambda: parallax_fwd_triton(q, r, k, v, True, scale, None, config=cfg)

    def bwd(dq_cfg, dkv_cfg):
        return lambda: parallax_bwd_triton(
            q, r, k, v, *saved, do, True, scale, None, dq_config=dq_cfg, dkv_config=dkv_cfg
        )

    def measure(fn, is_fwd):
        out = fn()
        err = (
            rel_err(out[0], saved[0].float()) if is_fwd else max(rel_err(a, b.float()) for a, b in zip(out, ref_grads))
        )
        torch.cuda.synchronize()
        return do_bench(fn, warmup=10, rep=50, return_mode="median"), err

    best, summary = {}, []
    for kind, cands in (("fwd", FWD_CANDIDATES[D]), ("dq", DQ_CANDIDATES[D]), ("dkv", DKV_CANDIDATES[D])):
        timings = []
        for c in cands:
            try:
                cfg = KernelConfig(*c)
                if kind == "fwd":
                    fn = fwd(cfg)
                elif kind == "dq":
                    fn = bwd(cfg, base.dkv)
                else:
                    fn = bwd(best.get("dq", base.dq), cfg)
                ms, err = measure(fn, kind == "fwd")
                wrong = err > 1e-2
                note = {"fwd": "", "dq": "  (+ dK/dV at default)", "dkv": "  (+ dQ/dR at best)"}[kind]
                regs, spills = LAUNCH_STATS.get(kind, ("?", "?"))
                log(f"sweep D{D:<3d} {kind:3s} {c!s:26s} {ms:7.3f} ms  regs {regs} spills {spills}  err {err:.1e}"
                    f"{'  WRONG' if wrong else ''}{note}")  # fmt: skip
                if not wrong:
                    timings.append((ms, c))
            except Exception as e:
                log(f"sweep D{D:<3d} {kind:3s} {c!s:26s} FAILED {type(e).__name__}: {str(e).splitlines()[0]}")
            torch.cuda.empty_cache()
        if timings:
            ms, c = min(timings)
            best[kind] = KernelConfig(*c)
            summary.append((D, kind, c, ms))
    t_fwd = measure(fwd(base.fwd), True)[0]
    t_bwd = measure(bwd(base.dq, base.dkv), False)[0]
    log(f"sweep D{D}: default table fwd {t_fwd:.3f} ms ({2 * f_fwd / t_fwd / 1e9:.0f} TF/s), "
        f"bwd {t_bwd:.3f} ms ({2 * (f_fb - f_fwd) / t_bwd / 1e9:.0f} TF/s)")  # fmt: skip
    if {"fwd", "dq", "dkv"} <= best.keys():
        t_fwd = measure(fwd(best["fwd"]), True)[0]
        t_bwd = measure(bwd(best["dq"], best["dkv"]), False)[0]
        log(f"sweep D{D}: best configs  fwd {t_fwd:.3f} ms ({2 * f_fwd / t_fwd / 1e9:.0f} TF/s), "
            f"bwd {t_bwd:.3f} ms ({2 * (f_fb - f_fwd) / t_bwd / 1e9:.0f} TF/s)")  # fmt: skip
        line = ", ".join(f"KernelConfig{astuple(best[k])}" for k in ("fwd", "dq", "dkv"))
        summary.append((D, "table line", f"TrainConfigs({line})", None))
    return summary


# ------------------------------------------------------------------------------------------------- main
def fmt_ms(x, key):
    return f"{x[key]:.3f}" if isinstance(x, dict) else "-"


def ratio(a, b, key):
    return f"{a[key] / b[key]:.2f}" if isinstance(a, dict) and isinstance(b, dict) else "-"


def timing_table(ok, rows, results):
    table = []
    if rows:
        table.append(f"correctness (bf16, rel err <= 1e-2, o/dq/dr/dk/dv): {'ALL PASS' if ok else 'FAILURES'} "
                     f"({sum(r['passed'] for r in rows)}/{len(rows)})")  # fmt: skip
    table.append("causal bf16, ms (fwd | fwd+bwd); ratios ours/peer; peak = ours fwd+bwd MB above inputs")
    head = f"{'shape':20s} {'ours':>15s} {'flash':>15s} {'cudnn':>15s} {'authors':>15s} {'fla':>15s}"
    table.append(head + "  ours/auth   ours/flash  ours/cudnn  peak")
    for row in results:
        cells = []
        for name in ("ours", "flash", "cudnn", "authors", "fla"):
            x = row.get(name)
            cells.append(f"{fmt_ms(x, 'fwd_ms'):>7s}|{fmt_ms(x, 'fwd_bwd_ms'):<7s}" if x is not None else "n/a")
        o = row.get("ours")
        rat = [f"{ratio(o, row.get(p), 'fwd_ms')}|{ratio(o, row.get(p), 'fwd_bwd_ms')}"
               for p in ("authors", "flash", "cudnn")]  # fmt: skip
        peak = row["ours_peak_mb"]
        peak = f"{peak:.0f}" if isinstance(peak, float) else str(peak)
        table.append(f"{row['shape']:20s} " + " ".join(f"{c:>15s}" for c in cells) + "  "
                     + "  ".join(f"{x:>10s}" for x in rat) + f"  {peak}")  # fmt: skip
    if results and isinstance(results[0].get("ours"), dict):
        o = results[0]["ours"]
        table.append(f"ours at the main shape: fwd {o['fwd_tflops']:.0f} TF/s, fwd+bwd {o['fwd_bwd_tflops']:.0f} "
                     "TF/s (Parallax FLOPs = 2x softmax)")  # fmt: skip
    table.append("targets: fwd+bwd ours/authors <= 0.75; fwd ours/flash <= 1.1; stretch fwd+bwd ours/cudnn <= 1.5")
    return table


def save(out_dir, record, table):
    save_outputs(out_dir, "bench_train", record, [*LOG, "", *table], default=str)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="three correctness shapes and the main shape only")
    ap.add_argument("--sweep", action="store_true", help="time explicit kernel configs instead of the peers")
    ap.add_argument("--sweep-dims", default="128,64", help="head dims to sweep (comma separated)")
    ap.add_argument("--authors-all", action="store_true", help="time the authors' kernel at every grid shape")
    ap.add_argument("--skip-correctness", action="store_true", help="timing only (e.g. a call for the authors' peer)")
    ap.add_argument("--peers", default="authors,fla", help="peers to load besides SDPA (comma separated)")
    ap.add_argument("--peers-path", default=os.environ.get("PEERS_PATH"), help="a pip --target folder of peers")
    ap.add_argument("--host", action="store_true", help="host time per call and CUDA-graph replay, not the peers")
    args = ap.parse_args()

    if not torch.cuda.is_available():
        sys.exit("bench_train.py needs a CUDA GPU")
    if args.peers_path:
        sys.path.insert(0, args.peers_path)
    import triton

    from parallax_kernels.parallax.triton_train import default_configs

    log(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    for D in (64, 128, 256):
        log(f"configs D{D}: {default_configs(D, torch.bfloat16, torch.device('cuda'))}")
    out_dir = os.environ.get("OUT")
    record = {"argv": sys.argv[1:]}
    table = []

    if args.host:
        rows = host_timing(HOST_SHAPES)
        record["host"] = rows
        table = host_table(rows)
    elif args.sweep:
        summary = [row for d in args.sweep_dims.split(",") for row in sweep_dim(int(d))]
        record["sweep"] = summary
        table.append("best config per kernel (B4 H16 T4096 causal bf16; D256 at B2):")
        table += [f"  D{D:<4d}{kind:11s}{c}" + (f"  {ms:.3f} ms" if ms else "") for D, kind, c, ms in summary]
    else:
        ok, rows = True, []
        if not args.skip_correctness:
            shapes = [s for s in CORRECTNESS if not args.quick or s[0] in QUICK_CORRECTNESS]
            ok, rows = correctness(shapes)
        record["correctness"] = rows
        peers = load_peers([p for p in args.peers.split(",") if p])
        for name, fn in peers.items():
            log(f"peer {name}: {'loaded' if not isinstance(fn, str) else fn}")

        def progress(results):
            record["timing"] = results
            partial = timing_table(ok, rows, results)
            save(out_dir, record, partial)
            print("\n".join(["(table so far)", *partial]), flush=True)

        results = timing(GRID[:1] if args.quick else GRID, peers, args.authors_all, progress)
        record["timing"] = results
        peer_agreement(peers, AGREEMENT_SHAPE)
        table = timing_table(ok, rows, results)

    log("")
    save(out_dir, record, table)
    print("\n".join(table), flush=True)


if __name__ == "__main__":
    main()
