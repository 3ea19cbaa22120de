"""Parallax decode on the GPU: bf16 correctness first, then speed against the peers in the same run.

    python benchmarks/bench_decode.py            # correctness + timing over the anchors grid
    python benchmarks/bench_decode.py --quick    # the 5 anchor shapes only
    python benchmarks/bench_decode.py --sweep    # time kernel configs and split counts per shape
    python benchmarks/bench_decode.py --host     # no GPU needed: the Python host cost of one call

Peers (each optional; one that is missing or fails is reported, never fatal): torch SDPA softmax decode
with the cuDNN and FlashAttention backends (q of length 1 against the full cache), the paper authors'
Triton decode `parallax.triton.parallax_decode` (and their CuTeDSL `parallax_attn_with_kvcache` if it
imports), and fla's `parallax_decode_one_step`.

Timings, µs per call:
- `eager`: triton.testing.do_bench's median of single calls. The L2 is flushed before each call, and
  that flush (device work of its own) gives the host a head start: host cost shows only where it
  exceeds the flush.
- `graph`: replay of a CUDA graph of back-to-back calls cycling through enough copies of the cache
  to defeat the L2 (a decode loop under CUDA graphs): the device time. TB/s uses it.
- `loop`: eager back-to-back calls: max(host, device) per call, what an eager decode loop sees.
- `host`: the host's time per call while the GPU is kept busy, so calls only queue (Python, checks,
  allocation, launches).
`ours+lens` passes cache_seqlens on the device, unchecked (check_lengths=False: the default check reads the
lengths on the host, a sync per call).

--sweep times, per shape, the kernel configs (tensor-core vs vector path, block, warps, stages) at
the heuristic split count, then split counts around it, and prints the heuristic against the best;
the TMA (bulk-copy) path is swept last, after the pointer-load summary is out. It times CUDA-graph
replays (device time): do_bench of eager calls is host-bound at batch 1 (benchmarks/RESULTS.md).

--host runs on a CPU without a GPU: Triton's launches are replaced by no-ops behind a stand-in
driver, and it prints the Python cost of one parallax_decode call (validation, plan, allocation,
launch preparation), the figure that the plan cache and the direct launch cut.

Why one long file: it is one GPU session's script, whose modes (correctness, the timed grid, the sweep, the
host cost) share its peers, timers and input makers; the sections are marked by banner comments.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import traceback

import torch
import torch.nn.functional as F

D = 128
DTYPE = torch.bfloat16
# (B, H_q, H_kv, L): the anchor shapes of the project's targets, then GQA 32:8, then extra batch/length rows
ANCHORS = [(1, 8, 8, 4096), (1, 8, 8, 16384), (32, 8, 8, 4096), (32, 8, 8, 16384), (8, 32, 32, 32768)]
GQA = [(1, 32, 8, 16384), (32, 32, 8, 16384)]
EXTRA = [(8, 8, 8, 16384), (1, 8, 8, 32768), (32, 8, 8, 32768)]
L2_DEFEAT_BYTES = 256 << 20
DEVICE = "cuda"
# (B, H_q, H_kv, L, D, dtype, window, lengths, r scale): awkward cases besides the grid
CORRECTNESS_CASES = [
    (1, 8, 8, 4096, 128, torch.bfloat16, None, None, None),
    (32, 8, 8, 4096, 128, torch.bfloat16, None, None, None),
    (8, 32, 32, 8192, 128, torch.bfloat16, None, None, 1.0),  # probe of norm sqrt(D): |t| ~ 10
    (1, 32, 8, 16384, 128, torch.bfloat16, None, None, None),
    (4, 32, 8, 3000, 128, torch.bfloat16, None, "random", None),
    (3, 16, 2, 5000, 128, torch.bfloat16, 777, "random", None),
    (5, 8, 8, 2049, 64, torch.bfloat16, None, "random", None),
    (2, 8, 1, 1000, 64, torch.float16, 100, "random", None),
    (2, 4, 4, 1500, 96, torch.bfloat16, None, "random", None),
    (2, 8, 2, 1200, 256, torch.bfloat16, None, "random", None),
    (3, 4, 4, 700, 32, torch.float32, None, "random", None),
]

_log_file = None


def log(*parts):
    line = " ".join(str(p) for p in parts)
    print(line, flush=True)
    if _log_file is not None:
        _log_file.write(line + "\n")
        _log_file.flush()


def short_error(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip().splitlines()
    return text[0][:160] if text else type(e).__name__


def rel_err(a, b) -> float:
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


# ------------------------------------------------------------------ peers


def load_peers():
    """name -> fn(q, r, k, v) for every peer that imports; name -> error string for the rest."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    peers, missing = {}, {}

    def sdpa(backend):
        def run(q, r, k, v):
            with sdpa_kernel([backend]):
                out = F.scaled_dot_product_attention(
                    q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), enable_gqa=q.shape[2] != k.shape[2]
                )
            return out.transpose(1, 2)

        return run

    peers["cudnn"] = sdpa(SDPBackend.CUDNN_ATTENTION)
    peers["flash"] = sdpa(SDPBackend.FLASH_ATTENTION)
    try:
        from parallax.triton import parallax_decode as authors_decode

        peers["authors"] = lambda q, r, k, v: authors_decode(q, r, k, v)
    except Exception as e:
        missing["authors"] = short_error(e)
    try:
        import parallax

        if getattr(parallax, "cute_decode_available", False):
            peers["authors-cute"] = lambda q, r, k, v: parallax.parallax_attn_with_kvcache(q, r, k, v)
        else:
            missing["authors-cute"] = "parallax.cute_decode_available is False (needs nvidia-cutlass-dsl)"
    except Exception as e:
        missing["authors-cute"] = short_error(e)
    try:
        from fla.ops.parallax.decode import parallax_decode_one_step

        peers["fla"] = lambda q, r, k, v: parallax_decode_one_step(q, r, k, v)
    except Exception as e:
        missing["fla"] = short_error(e)
    return peers, missing


# ------------------------------------------------------------------ timing


def bench_us(fn, warmup=10, rep=50) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median") * 1e3


def loop_us(fn, calls: int = 50) -> float:
    """µs per call of eager back-to-back calls: the host's cost (Python, checks, launches) where it
    exceeds the device's, as a decode loop without CUDA graphs sees it (the L2 is not flushed)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


def host_us(fn, calls: int = 50) -> float:
    """µs of host time per call while the GPU is busy with a sleep kernel, so the calls only queue:
    Python, checks, allocation and launch cost, with no device time in it."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    torch.cuda._sleep(30_000_000)  # ~15 ms of device work ahead of the calls
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def graph_us(fns, calls: int, replays: int = 7) -> float:
    """Median µs per call of a CUDA graph that runs `calls` calls cycling through `fns`."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fns[i % len(fns)]()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(replays):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    del graph
    return statistics.median(times)


def make_inputs(B, Hq, Hkv, L, d=D, dtype=DTYPE, copies=1, r_scale=None):
    q = torch.randn(B, 1, Hq, d, device=DEVICE, dtype=dtype)
    r = torch.randn(B, 1, Hq, d, device=DEVICE, dtype=dtype) * (d**-0.5 if r_scale is None else r_scale)
    caches = [
        (
            torch.randn(B, L, Hkv, d, device=DEVICE, dtype=dtype),
            torch.randn(B, L, Hkv, d, device=DEVICE, dtype=dtype),
        )
        for _ in range(copies)
    ]
    return q, r, caches


def kv_bytes(B, Hkv, L, d=D, elt=2) -> int:
    return 2 * B * Hkv * L * d * elt


# ------------------------------------------------------------------ correctness


def check_graph_replay() -> bool:
    """cache_seqlens is read on the device: capture once, change the lengths in place, replay."""
    from parallax_kernels import parallax_decode, parallax_decode_reference

    try:
        B, Hq, Hkv, L = 4, 16, 4, 3000
        q, r, [(k, v)] = make_inputs(B, Hq, Hkv, L)
        lens = torch.tensor([1, 700, 2999, 3000], device=DEVICE, dtype=torch.int32)
        parallax_decode(q, r, k, v, cache_seqlens=lens, window_size=1024, check_lengths=False)  # compile first
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = parallax_decode(q, r, k, v, cache_seqlens=lens, window_size=1024, check_lengths=False)
        errs = []
        for new in ([1, 700, 2999, 3000], [3000, 5, 1024, 1025]):
            lens.copy_(torch.tensor(new, dtype=torch.int32))
            graph.replay()
            errs.append(rel_err(out, parallax_decode_reference(q, r, k, v, lens, window_size=1024)))
        good = max(errs) <= 1e-2
        log(f"  ours  CUDA graph replay with new cache_seqlens: {max(errs):.2e} {'ok' if good else 'FAIL'}")
        return good
    except Exception as e:
        log(f"  ours  CUDA graph replay with new cache_seqlens: FAIL {short_error(e)}")
        traceback.print_exc()
        return False


def check_length_checks() -> bool:
    """Lengths outside the cache: NaN rows without the host check (check_lengths=False), a named error
    with check_lengths=True (the default), and a named refusal of check_lengths=True under graph capture."""
    from parallax_kernels import parallax_decode

    ok = True
    # the signature of check_graph_replay's calls: compiled already
    q, r, [(k, v)] = make_inputs(4, 16, 4, 3000)
    bad = torch.tensor([0, 700, 3001, 3000], device=DEVICE, dtype=torch.int32)
    out = parallax_decode(q, r, k, v, cache_seqlens=bad, window_size=1024, check_lengths=False)
    rows = torch.isnan(out.float()).flatten(1).all(1).tolist()
    good = rows == [True, False, True, False]
    ok &= good
    log(f"  ours  lengths outside the cache, unchecked: NaN rows {rows} {'ok' if good else 'FAIL'}")
    try:
        parallax_decode(q, r, k, v, cache_seqlens=bad, window_size=1024, check_lengths=True)
        log("  ours  check_lengths=True with bad lengths: FAIL (no error)")
        ok = False
    except ValueError as e:
        log(f"  ours  check_lengths=True with bad lengths: ok ({short_error(e)})")
    try:
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                parallax_decode(q, r, k, v, cache_seqlens=bad, window_size=1024, check_lengths=True)
            log("  ours  check_lengths=True under capture: FAIL (no error)")
            ok = False
        except RuntimeError as e:
            named = "check_lengths=True" in str(e)
            ok &= named
            log(f"  ours  check_lengths=True under capture: {'ok' if named else 'FAIL'} ({short_error(e)})")
        torch.cuda.synchronize()
    except Exception as e:
        ok = False
        log(f"  ours  check_lengths=True under capture: FAIL {short_error(e)}")
    return ok


def check_correctness(peers) -> bool:
    from parallax_kernels import parallax_decode, parallax_decode_reference, poison_outputs
    from parallax_kernels.parallax.triton_decode import launch_plan

    log("== bf16/fp16 correctness against parallax_decode_reference (fp32 math), relative L2 error ==")
    ok = True
    for B, Hq, Hkv, L, d, dtype, window, lens_kind, r_scale in CORRECTNESS_CASES:
        q, r, [(k, v)] = make_inputs(B, Hq, Hkv, L, d, dtype, r_scale=r_scale)
        lens = None
        if lens_kind == "random":
            lens = torch.randint(1, L + 1, (B,), device=DEVICE, dtype=torch.int32)
            lens[0], lens[-1] = 1, L
        tol = 2e-5 if dtype == torch.float32 else 1e-2
        name = f"B{B} H{Hq}:{Hkv} L{L} D{d} {str(dtype)[6:]} window={window} lens={lens_kind or 'full'}"
        try:
            # The first call of a signature launches through Triton's JIT, later ones directly; both
            # into NaN-filled outputs, so an element either leaves unwritten fails.
            with poison_outputs(True):
                first = parallax_decode(q, r, k, v, cache_seqlens=lens, window_size=window)
                second = parallax_decode(q, r, k, v, cache_seqlens=lens, window_size=window)
            want = parallax_decode_reference(q, r, k, v, lens, window_size=window)
            err = max(rel_err(first, want), rel_err(second, want))
            plan = launch_plan(q, r, k, v, lens, None, window)
            direct = plan.split.launcher is not None
            good = err <= tol and direct
            ok &= good
            how = f"{plan.num_splits} slices, {'direct launch' if direct else 'NO direct launch'}"
            log(f"  ours  {name}: {err:.2e} ({how}) {'ok' if good else f'FAIL (> {tol:.0e})' if direct else 'FAIL'}")
        except Exception as e:
            ok = False
            log(f"  ours  {name}: FAIL {short_error(e)}")
            traceback.print_exc()

    ok &= check_graph_replay()
    ok &= check_length_checks()

    # the peers on one shape, to show they are called the right way
    q, r, [(k, v)] = make_inputs(2, 8, 8, 4096)
    want = parallax_decode_reference(q, r, k, v)
    want_softmax = parallax_decode_reference(q, torch.zeros_like(r), k, v)
    for name, fn in peers.items():
        try:
            softmax = name in ("cudnn", "flash")
            err = rel_err(fn(q, r, k, v), want_softmax if softmax else want)
            log(f"  {name:<13} B2 H8 L4096 (vs {'softmax' if softmax else 'Parallax'} reference): {err:.2e}")
        except Exception as e:
            log(f"  {name:<13} B2 H8 L4096: FAILED {short_error(e)}")
    return ok


# ------------------------------------------------------------------ timing over the grid


def time_shape(B, Hq, Hkv, L, peers, use_graph=True) -> dict:
    """Every method on one shape: do_bench on one cache, CUDA-graph replay over enough cache copies
    to defeat the L2 (the same copies for every method); eager loop and host time for ours and cuDNN."""
    from parallax_kernels import parallax_decode

    nbytes = kv_bytes(B, Hkv, L)
    copies = min(16, max(1, math.ceil(L2_DEFEAT_BYTES / nbytes)))
    q, r, caches = make_inputs(B, Hq, Hkv, L, copies=copies)
    lens = torch.full((B,), L, device=DEVICE, dtype=torch.int32)
    row = {"shape": f"B{B} H{Hq}:{Hkv} L{L}", "B": B, "Hq": Hq, "Hkv": Hkv, "L": L, "kv_bytes": nbytes}
    row.update(bench={}, graph={}, loop={}, host={})
    methods = {"ours": lambda q, r, k, v: parallax_decode(q, r, k, v), **peers}
    methods["ours+lens"] = lambda q, r, k, v: parallax_decode(q, r, k, v, cache_seqlens=lens, check_lengths=False)
    k0, v0 = caches[0]
    for name, fn in methods.items():
        try:
            if name in ("ours", "ours+lens", "cudnn"):
                row["loop"][name] = loop_us(lambda fn=fn: fn(q, r, k0, v0))
                row["host"][name] = host_us(lambda fn=fn: fn(q, r, k0, v0))
            if name != "ours+lens":
                row["bench"][name] = bench_us(lambda fn=fn: fn(q, r, k0, v0))
        except Exception as e:
            row["bench"][name] = short_error(e)
            continue  # a call that fails eagerly is not captured: a failed capture can poison the context
        if use_graph:
            try:
                fns = [lambda fn=fn, k=k, v=v: fn(q, r, k, v) for k, v in caches]
                row["graph"][name] = graph_us(fns, calls=max(2 * copies, 8))
            except Exception as e:
                row["graph"][name] = short_error(e)
                torch.cuda.synchronize()
    for kind in ("bench", "graph", "loop", "host"):
        parts = [f"{m}={t:.1f}" if isinstance(t, float) else f"{m}=FAILED({t})" for m, t in row[kind].items()]
        if parts:
            log(f"  {row['shape']:<20} {'eager' if kind == 'bench' else kind:<5} µs: " + "  ".join(parts))
    return row


def run_grid(shapes, peers, use_graph=True):
    rows = []
    for shape in shapes:
        rows.append(time_shape(*shape, peers, use_graph=use_graph))
        torch.cuda.empty_cache()
    return rows


def fmt_t(t, width=7) -> str:
    return f"{t:{width}.1f}" if isinstance(t, float) else f"{'-' if t is None else 'failed':>{width}}"


def fmt_ratio(a, b, width=6) -> str:
    ok = isinstance(a, float) and isinstance(b, float)
    return f"{a / b:{width - 1}.2f}x" if ok else f"{'-':>{width}}"


def print_table(rows, peer_names):
    others = [p for p in ("flash", "authors", "authors-cute", "fla") if p in peer_names]
    log("")
    log("== decode, bf16, D=128, µs per call. eager = do_bench median of single calls (L2 flushed; host cost "
        "shows only beyond the flush); graph = CUDA-graph replay (device time); loop = eager back-to-back "
        "calls; host = host time per call with the GPU busy; +lens = ours with cache_seqlens ==")  # fmt: skip
    w = 7
    head = f"{'':<20} {' ours ':-^{5 * w + 4}} {' cudnn ':-^{4 * w + 3}} {' ours / cudnn ':-^{3 * 6 + 2}}"
    log(head)
    head = f"{'shape':<20} " + " ".join(f"{c:>{w}}" for c in ("eager", "graph", "loop", "host", "+lens"))
    head += " " + " ".join(f"{c:>{w}}" for c in ("eager", "graph", "loop", "host"))
    head += " " + " ".join(f"{c:>6}" for c in ("eager", "graph", "loop"))
    head += f" {'TB/s':>6} " + " ".join(f"{c + ' eager':>{max(w, len(c) + 6)}}" for c in others)
    head += f" {'vs authors':>10}"
    log(head)
    for row in rows:
        b, g, lp, h = row["bench"], row["graph"], row["loop"], row["host"]
        ours_g = g.get("ours")
        basis = ours_g if isinstance(ours_g, float) else b.get("ours")
        tbs = f"{row['kv_bytes'] / basis / 1e6:6.2f}" if isinstance(basis, float) else f"{'-':>6}"
        line = f"{row['shape']:<20} " + " ".join(
            fmt_t(t.get(m)) for t, m in ((b, "ours"), (g, "ours"), (lp, "ours"), (h, "ours"), (lp, "ours+lens"))
        )
        line += " " + " ".join(fmt_t(t.get("cudnn")) for t in (b, g, lp, h))
        line += " " + " ".join(fmt_ratio(t.get("ours"), t.get("cudnn")) for t in (b, g, lp))
        line += f" {tbs} " + " ".join(fmt_t(b.get(c), max(w, len(c) + 6)) for c in others)
        line += f" {fmt_ratio(b.get('ours'), b.get('authors'), 10)}"
        log(line)
    log("ratios are our time / peer time (< 1 means ours is faster); TB/s = K and V bytes / graph time. "
        "Targets: <= 1.15x cudnn everywhere, >= 3.6 TB/s at B32 H8:8 L16384.")  # fmt: skip


# ------------------------------------------------------------------ sweep


KERNEL_CONFIGS = [  # (use_dot, block_n, num_warps, num_stages); the vector path only without GQA
    (True, 64, 4, 2), (True, 64, 4, 3), (True, 64, 4, 4), (True, 32, 4, 3), (True, 32, 4, 5),
    (True, 128, 4, 2), (True, 64, 8, 3), (True, 128, 8, 3),
    (False, 64, 4, 1), (False, 64, 4, 2), (False, 64, 4, 3), (False, 32, 4, 3), (False, 32, 2, 4),
    (False, 64, 8, 2), (False, 64, 8, 3), (False, 128, 8, 2),
]  # fmt: skip
TMA_CONFIGS = [(64, 4, 3), (64, 4, 4), (32, 4, 5), (128, 4, 2), (128, 4, 3), (64, 8, 3), (128, 8, 3)]


def describe(c) -> str:
    path = "tma" if c.use_tma else "dot" if c.use_dot else "vec"
    return f"{path}/n{c.block_n}/w{c.num_warps}/s{c.num_stages}"


def _timer(B, Hq, Hkv, L):
    """Device time of one config: CUDA-graph replay over enough cache copies to defeat the L2."""
    from parallax_kernels.parallax.triton_decode import parallax_decode_triton

    copies = min(16, max(1, math.ceil(L2_DEFEAT_BYTES / kv_bytes(B, Hkv, L))))
    q, r, caches = make_inputs(B, Hq, Hkv, L, copies=copies)

    def timed(cfg):
        fns = [lambda k=k, v=v: parallax_decode_triton(q, r, k, v, None, None, None, cfg) for k, v in caches]
        return graph_us(fns, calls=max(2 * copies, 8), replays=5)

    return timed


def _time_configs(name, timed, configs):
    results = []
    for cfg in configs:
        try:
            results.append((timed(cfg), cfg))
        except Exception as e:
            log(f"  {name} {describe(cfg)}: FAILED {short_error(e)}")
    results.sort(key=lambda x: x[0])
    return results


def _time_splits(name, timed, best, base_splits, n_tiles):
    from parallax_kernels.parallax.triton_decode import DecodeConfig

    factors = (0.25, 0.5, 0.75, 1, 1.5, 2, 3, 4)
    candidates = sorted({1, *(max(1, min(n_tiles, round(base_splits * f))) for f in factors)})
    split_times = []
    for splits in candidates:
        cfg = DecodeConfig(splits, best.block_n, best.num_warps, best.num_stages, best.use_dot, best.use_tma)
        try:
            split_times.append((timed(cfg), splits))
        except Exception as e:
            log(f"    {name} splits={splits}: FAILED {short_error(e)}")
    log(f"    splits with {describe(best)}: " + "  ".join(f"{s}={t:.1f}" for t, s in split_times))
    return min(split_times)


def sweep_shape(B, Hq, Hkv, L, sms, tma=False):
    """Configs at the heuristic split count, then split counts around it with the best config."""
    from parallax_kernels.parallax.triton_decode import DecodeConfig, _plan

    name = f"B{B} H{Hq}:{Hkv} L{L}"
    timed = _timer(B, Hq, Hkv, L)
    t_default = timed(None)
    if tma:
        configs = [DecodeConfig(None, bn, nw, ns, True, True) for bn, nw, ns in TMA_CONFIGS]
    else:
        configs = [
            DecodeConfig(None, bn, nw, ns, use_dot, False)
            for use_dot, bn, nw, ns in KERNEL_CONFIGS
            if use_dot or Hq == Hkv
        ]
    results = _time_configs(name, timed, configs)
    best = results[0][1]
    log(f"  {name}: heuristic {_plan(B, Hq, Hkv, D, L, None, sms, None)} -> {t_default:.1f}")
    log("    configs at heuristic splits: " + "  ".join(f"{describe(c)}={t:.1f}" for t, c in results))
    base_splits = _plan(B, Hq, Hkv, D, L, None, sms, best).num_splits
    t_best, s_best = _time_splits(name, timed, best, base_splits, -(-L // best.block_n))
    return name, t_default, t_best, best, s_best, s_best * B * Hkv / sms, base_splits


def print_sweep_summary(title, summary):
    log("")
    log(f"== {title}: heuristic vs best (programs/SM = splits * B * H_kv / SMs) ==")
    log(f"{'shape':<20} {'heuristic µs':>12} {'best µs':>8} {'gain':>6}  best config")
    for name, t_def, t_best, c, s, per_sm, base in summary:
        log(
            f"{name:<20} {t_def:12.1f} {t_best:8.1f} {t_def / t_best:5.2f}x  {describe(c)} splits={s} "
            f"({per_sm:.1f} programs/SM; the heuristic gives {base} splits for this config)"
        )


def run_sweep(shapes, t0):
    """Pointer-load configs for every shape first (summary printed), then the TMA path, which goes
    last because a fault there could end the process."""
    from parallax_kernels.parallax.triton_decode import sm_count

    sms = sm_count(torch.device(DEVICE))
    log(f"== sweep ({sms} SMs): µs per call by CUDA-graph replay (device time, L2 defeated) ==")
    summary = []
    for shape in shapes:
        summary.append(sweep_shape(*shape, sms))
        torch.cuda.empty_cache()
    print_sweep_summary("sweep summary, pointer loads", summary)
    log(f"({time.time() - t0:.0f} s) == sweep of the TMA (bulk copy) path ==")
    tma_summary = []
    for shape in shapes:
        try:
            tma_summary.append(sweep_shape(*shape, sms, tma=True))
        except Exception as e:
            log(f"  TMA sweep of {shape} FAILED: {short_error(e)}")
            break
        torch.cuda.empty_cache()
    log(f"sweep took {time.time() - t0:.0f} s")
    print_sweep_summary("sweep summary, pointer loads", summary)
    print_sweep_summary("sweep summary, TMA", tma_summary)
    return summary, tma_summary


# ------------------------------------------------------------------ host cost on a CPU


def run_host_cpu():
    """--host: the Python cost of one parallax_decode call, on a CPU with no GPU. A stand-in driver
    answers Triton's device and stream queries and every compiled kernel is a stand-in whose launch
    does nothing, so what is timed is everything but the CUDA allocator and the driver's launch:
    validation, the plan, CPU allocation, and Triton's launch preparation (the JIT's binding and
    cache lookup on a first call of a plan, or the direct launch after it). Per-call times are
    thread CPU time (min of 7 runs), so other processes on the machine inflate them little."""
    os.environ.pop("TRITON_INTERPRET", None)  # before Triton is imported: compiled kernels, not interpreted
    import triton
    from triton.backends.compiler import GPUTarget

    from parallax_kernels import parallax_decode
    from parallax_kernels.parallax import decode
    from parallax_kernels.parallax import triton_decode as td

    class Driver:
        def get_current_device(self):
            return 0

        def get_current_stream(self, device):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

    class Kernel:  # what a launch touches of a CompiledKernel
        function, packed_metadata = 1, None

        def launch_metadata(self, grid, stream, *args):
            return None

        def run(self, *args):
            return None

    triton.runtime.driver.set_active(Driver())
    for fn in (td._decode_split_dot_kernel, td._decode_split_vec_kernel, td._decode_combine_kernel):

        def compile_(key, signature, device, constexprs, options, attrs, warmup, fn=fn):
            fn.device_caches[device][0][key] = kernel = Kernel()
            return kernel

        fn._do_compile = compile_
    decode.backend_for = lambda t: "triton"  # CPU tensors take the GPU path
    td.sm_count = lambda device: 132  # an H200's SMs, so batch 1 slices the cache as there

    def per_call_us(fn, n=2000):
        for _ in range(100):
            fn()
        runs = []
        for _ in range(7):
            start = time.thread_time()
            for _ in range(n):
                fn()
            runs.append((time.thread_time() - start) / n * 1e6)
        return min(runs)

    log(f"== host cost of one call, CPU thread time, launches stubbed (torch {torch.__version__}, "
        f"triton {triton.__version__}) ==")  # fmt: skip
    for shape in [(1, 8, 8, 4096), (1, 32, 8, 16384), (32, 8, 8, 4096)]:
        _host_cost_of_shape(*shape, per_call_us, parallax_decode, decode, td)
    return 0


def _host_cost_of_shape(B, Hq, Hkv, L, per_call_us, parallax_decode, decode, td):
    q, r = torch.randn(B, 1, Hq, D, dtype=DTYPE), torch.randn(B, 1, Hq, D, dtype=DTYPE)
    k, v = torch.empty(B, L, Hkv, D, dtype=DTYPE), torch.empty(B, L, Hkv, D, dtype=DTYPE)
    lens = torch.full((B,), L, dtype=torch.int32)
    plan = td.launch_plan(q, r, k, v, None, None, None)
    t_call = per_call_us(lambda: parallax_decode(q, r, k, v))
    t_lens = per_call_us(lambda: parallax_decode(q, r, k, v, cache_seqlens=lens, check_lengths=False))
    t_key = per_call_us(lambda: decode.call_key(q, r, k, v, None, None, None))
    t_empty = per_call_us(lambda: torch.empty(plan.out_shape, dtype=DTYPE))
    plan.aligned = False  # as for a misaligned input: every launch through Triton's JIT
    t_jit = per_call_us(lambda: parallax_decode(q, r, k, v), n=500)
    plan.aligned = True
    log(f"  B{B} H{Hq}:{Hkv} L{L} ({plan.num_splits} slices, {1 + (plan.num_splits > 1)} launches): "
        f"parallax_decode {t_call:.1f} µs, with cache_seqlens {t_lens:.1f} µs (of which the signature "
        f"key {t_key:.1f} µs, one torch.empty {t_empty:.1f} µs); launching through the JIT instead: "
        f"{t_jit:.1f} µs")  # fmt: skip


# ------------------------------------------------------------------ main


def main(argv=None):
    global _log_file
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sweep", action="store_true", help="time configs and split counts per shape instead")
    ap.add_argument("--quick", action="store_true", help="only the 5 anchor shapes")
    ap.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph timings")
    ap.add_argument("--host", action="store_true", help="CPU only: the Python host cost of one call")
    args = ap.parse_args(argv)
    if args.host:
        return run_host_cpu()
    if not torch.cuda.is_available():
        sys.exit("bench_decode.py needs a CUDA GPU")
    out_dir = os.environ.get("OUT")
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        log_name = "bench_decode_sweep.log" if args.sweep else "bench_decode.log"
        _log_file = open(os.path.join(out_dir, log_name), "w")  # noqa: SIM115 (kept open for log())
    import triton

    log(f"GPU {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    torch.manual_seed(0)
    t0 = time.time()
    shapes = ANCHORS if args.quick else ANCHORS + GQA + EXTRA
    if args.sweep:
        run_sweep(ANCHORS if args.quick else ANCHORS + GQA, t0)
        return 0
    peers, missing = load_peers()
    for name, why in missing.items():
        log(f"peer {name} not available: {why}")
    ok = check_correctness(peers)
    log(f"correctness {'PASSED' if ok else 'FAILED'} ({time.time() - t0:.0f} s)")
    log("== timing ==")
    rows = run_grid(shapes, peers, use_graph=not args.no_graph)
    if out_dir:
        with open(os.path.join(out_dir, "bench_decode.json"), "w") as f:
            json.dump({"correct": ok, "missing_peers": missing, "rows": rows}, f, indent=1)
    log(f"total {time.time() - t0:.0f} s; correctness {'PASSED' if ok else 'FAILED'}")
    print_table(rows, list(peers))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
