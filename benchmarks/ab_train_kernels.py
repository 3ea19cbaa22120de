"""A/B timing of the Parallax training kernels: this checkout's triton_train.py against another version of it,
kernel by kernel, in the same run on one GPU.

    python benchmarks/ab_train_kernels.py --baseline OLD_triton_train.py          # D128 main shape
    python benchmarks/ab_train_kernels.py --baseline OLD.py --dims 128,64 --json $OUT/ab.json

`--baseline` is a copy of kernels/parallax/triton_train.py from another commit (`git show REV:kernels/parallax/
triton_train.py > old.py`); it is loaded as a sibling module of the current one, so its relative imports
resolve. Each version runs each of its candidate configs (CANDIDATES below; the first of each list is that
version's table entry) at B4 H16 T4096 causal bf16 (B2 for head dim 256). The forward is timed with
triton.testing.do_bench; the dQ/dR and dK/dV kernels, which one backward call launches back to back, are timed
apart from a torch.profiler trace of that call (device time of each kernel, averaged over the traced calls).
Every result is checked against the current version's default configs (relative error <= 1e-2, else WRONG).
The short table is printed last: per kernel, the best config of each version and their ratio.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import flops, make_inputs, rel_err

SHAPE = (4, 16, 4096)  # B, H, T at head dims <= 128; B is halved at 256
# (block_m, block_n, num_warps, num_stages) + keyword options the version's KernelConfig knows (tma).
CANDIDATES = {
    128: {
        "fwd": [(128, 64, 8, 3), (128, 64, 8, 4), (128, 32, 8, 3), (64, 64, 4, 2), (64, 32, 4, 3)],
        "dq": [(128, 64, 8, 3), (128, 32, 8, 3), (128, 32, 8, 4), (64, 32, 4, 3), (64, 32, 4, 2)],
        "dkv": [(32, 64, 4, 3), (32, 64, 4, 2), (16, 64, 4, 3), (32, 32, 4, 3), (32, 128, 8, 2)],
    },
    64: {
        "fwd": [(64, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3)],
        "dq": [(64, 64, 4, 3), (128, 64, 8, 3), (64, 64, 4, 2)],
        "dkv": [(64, 128, 8, 2), (32, 128, 8, 3), (32, 64, 4, 3)],
    },
    256: {
        "fwd": [(32, 32, 8, 1), (32, 32, 4, 1), (16, 32, 4, 1)],
        "dq": [(32, 32, 8, 2), (32, 32, 4, 2), (16, 32, 4, 2)],
        "dkv": [(16, 16, 8, 2), (16, 16, 4, 2)],
    },
}
T0 = time.time()


def log(msg):
    print(f"[{time.time() - T0:6.1f}s] {msg}", flush=True)


def load_baseline(path):
    import parallax_kernels.parallax as pkg

    name = "parallax_kernels.parallax._ab_baseline"
    spec = importlib.util.spec_from_file_location(name, path, submodule_search_locations=None)
    mod = importlib.util.module_from_spec(spec)
    mod.__package__ = pkg.__name__
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def configs(mod, kind, D):
    """The version's own table entry first, then the candidates; with and without TMA where it knows TMA."""
    from dataclasses import fields

    table = getattr(mod.default_configs(D, torch.bfloat16, torch.device("cuda")), kind)
    has_tma = "tma" in {f.name for f in fields(mod.KernelConfig)}
    out = [table]
    for c in CANDIDATES[D][kind]:
        for tma in (True, False) if has_tma else (None,):
            out.append(mod.KernelConfig(*c, tma=tma) if has_tma else mod.KernelConfig(*c))
    return list(dict.fromkeys(out))


def kernel_times(fn, names, calls=10):
    """Average device ms per call of each kernel whose name contains one of `names`, from a profiler trace."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    totals = dict.fromkeys(names, 0.0)
    for ev in prof.key_averages():
        for n in names:
            if n in ev.key:
                totals[n] += ev.device_time_total / 1e3  # us -> ms
    return {n: t / calls for n, t in totals.items()}


def measure(mod, kind, cfg, base, saved, inputs, ref):
    """(ms, relative error vs the current version's default configs) of one kernel at one config."""
    from triton.testing import do_bench

    q, r, k, v, do, scale = inputs
    if kind == "fwd":

        def fn():
            return mod.parallax_fwd_triton(q, r, k, v, True, scale, None, config=cfg)

        err = rel_err(fn()[0], ref[0].float())
        torch.cuda.synchronize()
        return do_bench(fn, warmup=10, rep=50, return_mode="median"), err
    dq_cfg, dkv_cfg = (cfg, base.dkv) if kind == "dq" else (base.dq, cfg)

    def fn():
        return mod.parallax_bwd_triton(q, r, k, v, *saved, do, True, scale, None, dq_config=dq_cfg, dkv_config=dkv_cfg)

    err = max(rel_err(a, b.float()) for a, b in zip(fn(), ref[4:]))
    name = "_bwd_dq_kernel" if kind == "dq" else "_bwd_dkv_kernel"
    return kernel_times(fn, [name])[name], err


def run_dim(versions, D, base_kinds):
    B, H, T = SHAPE if D <= 128 else (SHAPE[0] // 2, *SHAPE[1:])
    q, r, k, v, do = make_inputs(B, T, T, H, H, D)
    inputs = (q, r, k, v, do, D**-0.5)
    cur = versions["new"]
    ref_fwd = cur.parallax_fwd_triton(q, r, k, v, True, inputs[-1], None)
    ref = (*ref_fwd, *cur.parallax_bwd_triton(q, r, k, v, *ref_fwd, do, True, inputs[-1], None))
    f_fwd, _ = flops(B, H, T, D)
    rows = []
    for vname, mod in versions.items():
        base = mod.default_configs(D, q.dtype, q.device)
        saved = mod.parallax_fwd_triton(q, r, k, v, True, inputs[-1], None, config=base.fwd)
        for kind in ("fwd", "dq", "dkv") if vname == "new" else base_kinds:
            for cfg in configs(mod, kind, D):
                try:
                    ms, err = measure(mod, kind, cfg, base, saved, inputs, ref)
                    regs = getattr(mod, "LAUNCH_STATS", {}).get(kind, ("?", "?"))
                    rows.append(dict(version=vname, D=D, kind=kind, config=repr(cfg), ms=ms, err=err, regs=regs,
                                     table=cfg == getattr(base, kind), wrong=err > 1e-2))  # fmt: skip
                    extra = f"  fwd {2 * f_fwd / ms / 1e9:.0f} TF/s" if kind == "fwd" else ""
                    log(f"D{D} {vname:4s} {kind:3s} {cfg!r:90s} {ms:7.3f} ms  regs/spills {regs}  err {err:.1e}"
                        f"{'  WRONG' if err > 1e-2 else ''}{extra}")  # fmt: skip
                except Exception as e:
                    log(f"D{D} {vname:4s} {kind:3s} {cfg!r} FAILED {type(e).__name__}: {str(e).splitlines()[0][:200]}")
                torch.cuda.empty_cache()
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", required=True, help="another version of kernels/parallax/triton_train.py")
    ap.add_argument("--dims", default="128")
    ap.add_argument("--json", help="write every row here")
    ap.add_argument("--base-kinds", default="fwd,dq,dkv", help="kernels to time in the baseline")
    ap.add_argument("--base-dims", default=None, help="head dims to time the baseline at (default: --dims)")
    args = ap.parse_args()
    if not Path(args.baseline).is_file():
        sys.exit(f"ab_train_kernels: no baseline file at {args.baseline}")
    from parallax_kernels.parallax import triton_train

    versions = {"new": triton_train, "base": load_baseline(args.baseline)}
    log(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}")
    rows = []
    base_dims = {int(x) for x in (args.base_dims or args.dims).split(",")}
    for D in (int(x) for x in args.dims.split(",")):
        kinds = args.base_kinds.split(",") if D in base_dims else []
        rows += run_dim(versions, D, kinds)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=str))
    print("\n| D | kernel | base best (ms) | new best (ms) | new / base | new config |")
    print("|---|---|---|---|---|---|")
    for D in sorted({r["D"] for r in rows}):
        for kind in ("fwd", "dq", "dkv"):
            best = {}
            for vname in versions:
                ok = [r for r in rows if r["D"] == D and r["kind"] == kind and r["version"] == vname and not r["wrong"]]
                if ok:
                    best[vname] = min(ok, key=lambda r: r["ms"])
            if "new" in best:
                n = best["new"]
                b = best.get("base")
                base_ms, ratio = (f"{b['ms']:.3f}", f"{n['ms'] / b['ms']:.3f}") if b else ("-", "-")
                print(f"| {D} | {kind} | {base_ms} | {n['ms']:.3f} | {ratio} | {n['config']} |")


if __name__ == "__main__":
    main()
