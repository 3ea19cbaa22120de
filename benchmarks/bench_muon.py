"""One Muon optimizer step on an H200: parallax_muon against torch.optim.Muon, in the same run.

Shape sets (hidden matrices only, fp32 parameters, random gradients):
  gpt2-small   12 layers, d=768: qkv (2304×768), attn proj (768×768), mlp fc (3072×768), mlp proj (768×3072)
  qwen3-0.6b   28 layers, d=1024, 16 q heads × 128, 8 kv heads: q (2048×1024), k, v (1024×1024),
               o (1024×2048), gate, up (3072×1024), down (1024×3072)

For each set it measures:
  step       a full optimizer step: torch.optim.Muon vs ours with the torch backend (batched matmuls) and with
             the Triton symmetric kernels; also ours with Polar Express coefficients;
  ns-only    the Newton–Schulz iteration alone on the same bf16 batches (torch vs Triton);
  error      per distinct shape: the update's relative distance to the exact polar factor U·Vᵀ (float64 SVD),
             for torch.optim.Muon's and our iteration, and between the two.

Run:  python benchmarks/bench_muon.py            (logs and JSON under $OUT when set; short table last)
      python benchmarks/bench_muon.py --quick    (fewer repetitions)
      python benchmarks/bench_muon.py --smoke    (CPU, tiny shapes, Triton labels fall back to torch: checks the
                                                  script itself, measures nothing)
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import sys
import time

import torch
from _common import RunLog, save_outputs

from parallax_muon import Muon, newton_schulz
from parallax_muon.newton_schulz import iterate, normalize_, resolve_coefficients

DEVICE = "cuda"
TRITON = "triton"  # the backend the "triton" rows use; --smoke on CPU swaps in "torch"

SETS = {
    "gpt2-small": (12, [(2304, 768), (768, 768), (3072, 768), (768, 3072)]),
    "qwen3-0.6b": (
        28,
        [(2048, 1024), (1024, 1024), (1024, 1024), (1024, 2048), (3072, 1024), (3072, 1024), (1024, 3072)],
    ),
    "smoke": (2, [(96, 32), (32, 32), (32, 64)]),
}

log = RunLog(timestamps=False)
LOG = log.lines


def time_ms(fn, warmup: int, reps: int) -> float:
    """Median of per-call CUDA-event times after warm-up (each call is a whole optimizer step)."""
    for _ in range(warmup):
        fn()
    if DEVICE != "cuda":
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def make_params(layers, shapes, seed=0):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    params = [torch.randn(s, device=DEVICE, generator=gen) * 0.02 for _ in range(layers) for s in shapes]
    grads = [torch.randn(p.shape, device=DEVICE, generator=gen) for p in params]
    return params, grads


def fresh(params, grads):
    ps = [torch.nn.Parameter(p.clone()) for p in params]
    for p, g in zip(ps, grads):
        p.grad = g
    return ps


def bench_set(name: str, layers: int, shapes, warmup: int, reps: int) -> dict:
    params, grads = make_params(layers, shapes)
    numel = sum(p.numel() for p in params)
    log(f"== {name}: {len(params)} matrices, {numel / 1e6:.1f}M parameters")
    row: dict = {"set": name, "matrices": len(params), "params_M": numel / 1e6}

    candidates = {
        "torch.optim.Muon": lambda ps: torch.optim.Muon(
            ps, lr=0.02, weight_decay=0.0, momentum=0.95, nesterov=True, adjust_lr_fn="original"
        ),
        "ours/torch": lambda ps: Muon(ps, lr=0.02, backend="torch"),
        "ours/triton": lambda ps: Muon(ps, lr=0.02, backend=TRITON),
        "ours/auto": lambda ps: Muon(ps, lr=0.02),  # the default: per bucket, the faster of the two, measured
        "ours/triton/polar_express": lambda ps: Muon(ps, lr=0.02, backend=TRITON, ns_coefficients="polar_express"),
        # One Newton–Schulz step instead of five: (5-step − 1-step)/4 is one NS step, the rest is the
        # momentum / copy / update overhead around it.
        "ours/triton/ns_steps=1": lambda ps: Muon(ps, lr=0.02, backend=TRITON, ns_steps=1),
    }
    updates = {}
    for label, make in candidates.items():
        ps = fresh(params, grads)
        opt = make(ps)
        t0 = time.perf_counter()
        opt.step()  # first step: allocates state, autotunes the Triton kernels
        sync()
        first = time.perf_counter() - t0
        updates[label] = [p.detach() - q for p, q in zip(ps[: len(shapes)], params[: len(shapes)])]  # first layer
        ms = time_ms(opt.step, warmup, reps)
        row[label] = ms
        log(f"  step {label:28s} {ms:8.2f} ms   (first step {first * 1e3:.0f} ms)")
        del opt, ps
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    choices = importlib.import_module("parallax_muon.newton_schulz")._AUTO_CHOICE
    picked = ", ".join(f"{'x'.join(map(str, k[2]))}: {'triton' if v else 'torch'}" for k, v in choices.items())
    log(f"  auto picked per batch shape (so far): {picked or 'torch (no Triton candidates)'}")
    per_ns_step = (row["ours/triton"] - row["ours/triton/ns_steps=1"]) / 4
    row["overhead"] = row["ours/triton/ns_steps=1"] - per_ns_step
    log(f"  => one NS step {per_ns_step:.2f} ms; momentum/copies/update around it {row['overhead']:.2f} ms")
    for label in ("ours/torch", "ours/triton", "ours/auto"):
        errs = [_rel(a, b) for a, b in zip(updates[label], updates["torch.optim.Muon"])]
        row[f"{label} update rel diff"] = max(errs)
        log(f"  first-step update of {label} vs torch.optim.Muon: max relative difference {max(errs):.2e}")

    # Newton–Schulz alone, on the bf16 batches the optimizer forms (same oriented shape → one batch).
    per_step, _ = resolve_coefficients("jordan", 5)
    batches: dict[tuple[int, int], list] = {}
    for g in grads:
        r, c = g.shape
        batches.setdefault((min(r, c), max(r, c)), []).append(g if r <= c else g.mT)
    stacked = [normalize_(torch.stack(b).bfloat16()) for b in batches.values()]
    for label, backend in (("torch", "torch"), ("triton", TRITON)):
        for X in stacked:
            iterate(X.clone(), per_step, backend=backend)  # autotune outside the timing
        ms = time_ms(
            lambda backend=backend: [iterate(X.clone(), per_step, backend=backend) for X in stacked], warmup, reps
        )
        row[f"ns/{label}"] = ms
        log(f"  ns-only {label:8s} {ms:8.2f} ms  ({', '.join(f'{len(b)}×{k[0]}×{k[1]}' for k, b in batches.items())})")

    # Accuracy against the exact polar factor, one matrix per distinct shape.
    from torch.optim._muon import _zeropower_via_newtonschulz

    for r, c in dict.fromkeys(shapes):
        G = torch.randn(r, c, device=DEVICE, dtype=torch.float64)
        U, _, Vh = torch.linalg.svd(G, full_matrices=False)
        polar = U @ Vh
        try:
            theirs = _zeropower_via_newtonschulz(G.float(), (3.4445, -4.7750, 2.0315), 5, 1e-7)
        except TypeError:  # a private function: its signature may change between torch versions
            theirs = newton_schulz(G.float(), 5, "jordan", backend="torch")
        ours = {
            "jordan/triton": newton_schulz(G.float(), 5, "jordan", backend=TRITON),
            "polar_express/triton": newton_schulz(G.float(), 5, "polar_express", backend=TRITON),
        }
        parts = [f"torch.optim.Muon {_rel(theirs, polar):.3f}"]
        parts += [f"{k} {_rel(v, polar):.3f}" for k, v in ours.items()]
        parts.append(f"ours-vs-torch {_rel(ours['jordan/triton'], theirs):.1e}")
        log(f"  error vs UVᵀ {r}×{c}: " + ", ".join(parts))
        row[f"err {r}x{c}"] = {"torch": _rel(theirs, polar), **{k: _rel(v, polar) for k, v in ours.items()}}
    return row


def _rel(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--sets", nargs="*", default=["gpt2-small", "qwen3-0.6b"])
    args = parser.parse_args()
    global DEVICE, TRITON
    if args.smoke:
        if not torch.cuda.is_available():
            DEVICE, TRITON = "cpu", "torch"
        args.sets = ["smoke"]
    elif not torch.cuda.is_available():
        print("bench_muon.py needs a CUDA GPU (or --smoke)", file=sys.stderr)
        return 2
    warmup, reps = (1, 2) if args.smoke else (2, 5) if args.quick else (3, 15)
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    log(f"device {name}, torch {torch.__version__}, triton rows use backend={TRITON!r}")
    rows = [bench_set(name, *SETS[name], warmup, reps) for name in args.sets]

    log("")
    log(
        "| set | torch.optim.Muon ms | ours/torch ms | ours/triton ms | ours/auto (default) ms | ratio (auto/torch.optim) "
        "| PE triton ms | NS-only torch / triton ms | overhead ms |"
    )
    log("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        base = r["torch.optim.Muon"]
        log(
            f"| {r['set']} | {base:.2f} | {r['ours/torch']:.2f} ({r['ours/torch'] / base:.2f}x) "
            f"| {r['ours/triton']:.2f} ({r['ours/triton'] / base:.2f}x) | {r['ours/auto']:.2f} | {r['ours/auto'] / base:.3f}x "
            f"| {r['ours/triton/polar_express']:.2f} | {r['ns/torch']:.2f} / {r['ns/triton']:.2f} | {r['overhead']:.2f} |"
        )
    save_outputs(os.environ.get("OUT"), "bench_muon", rows, LOG)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
