"""Data-parallel scaling of decoder training with Muon: 1, 2, 4 (and 8) GPUs at one global batch.

    python benchmarks/bench_scaling.py                              # FSDP2 and DDP on 1, 2, 4, 8 GPUs, "small"
    python benchmarks/bench_scaling.py --gpus 1 2 4 --modes fsdp2 --preset base --global-batch 64
    python benchmarks/bench_scaling.py --device cpu --backend gloo --gpus 1 2 --preset tiny --steps 4 \\
        --warmup 1 --seq-len 32 --global-batch 4 --precision fp32     # dry run of the same code on CPU

For each mode (fsdp2: `fully_shard` per decoder block as the platform's FSDP2Strategy does; ddp: replicated
weights, DistributedDataParallel) and each process count N, this script launches
`python -m torch.distributed.run --standalone --nproc_per_node N` on itself in worker mode. Every run trains
the same model from the same initialisation on the same global batches (each step's batch is drawn for the
whole world, rank r takes rows [r·B/N, (r+1)·B/N)), so the loss curve of N processes is the one of one process
up to summation order (bf16: rounding). Muon runs in its distributed mode (row-sharded DTensors under FSDP2,
split Newton-Schulz work under DDP): each matrix is orthogonalized by exactly one rank, which is checked.

Recorded per run: tokens/s per GPU (timed steps after `--warmup`), scaling efficiency (tokens/s per GPU
against the same mode's smallest process count), peak memory per GPU (the largest over ranks:
torch.cuda.max_memory_allocated; on CPU the largest resident set), the global-batch loss per step and its
largest relative difference from the same mode's smallest process count. The JSON goes to `--out`
(default $OUT/bench_scaling.json, or ./bench_scaling.json), a table to stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODES = ("fsdp2", "ddp")


# -- arguments -----------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", type=int, nargs="+", default=[1, 2, 4, 8], help="process counts to run")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--preset", default="small", help="parallax_lightning.model_sizes.preset name (tiny, small, base)")
    p.add_argument("--attention", default=None, help="override the preset's attention (e.g. softmax)")
    p.add_argument("--vocab-size", type=int, default=50304)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--global-batch", type=int, default=32, help="sequences per step over all processes")
    p.add_argument("--steps", type=int, default=30, help="steps per run, warmup included")
    p.add_argument("--warmup", type=int, default=5, help="steps left out of the timing (compilation, caches)")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16", help="FSDP2 policy / DDP autocast")
    p.add_argument("--compile", choices=("on", "off"), default="on", help="torch.compile (per block under FSDP2)")
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--backend", choices=("nccl", "gloo"), default=None, help="default: nccl on cuda, gloo on cpu")
    p.add_argument("--loss-rtol", type=float, default=None, help="default: 2e-2 for bf16, 1e-4 for fp32")
    p.add_argument("--out", default=None)
    p.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.backend = args.backend or ("nccl" if args.device == "cuda" else "gloo")
    if args.loss_rtol is None:
        args.loss_rtol = 2e-2 if args.precision == "bf16" else 1e-4
    check_args(args)
    return args


def check_args(args) -> None:
    """Everything that would otherwise fail inside a launched run, named before any run starts."""
    if args.device == "cpu" and args.backend == "nccl":
        raise SystemExit("bench_scaling: --backend nccl needs --device cuda (use gloo on cpu)")
    if not 0 <= args.warmup < args.steps:
        raise SystemExit(f"bench_scaling: --warmup {args.warmup} must be below --steps {args.steps}")
    for n in [] if args.worker else args.gpus:
        if n < 1 or args.global_batch % n:
            raise SystemExit(
                f"bench_scaling: --global-batch {args.global_batch} must split evenly over {n} processes "
                "(every process count runs the same global batch)"
            )


# -- pure helpers (tested on CPU) ----------------------------------------------------------------------------
def rank_rows(global_batch: int, world: int, rank: int) -> slice:
    per = global_batch // world
    return slice(rank * per, (rank + 1) * per)


def summarize(results: list[dict], loss_rtol: float) -> list[dict]:
    """Add scaling efficiency and loss agreement, each against the same mode's smallest process count."""
    out = []
    for mode in dict.fromkeys(r["mode"] for r in results):
        runs = sorted((r for r in results if r["mode"] == mode), key=lambda r: r["world"])
        base = runs[0]
        for r in runs:
            eff = r["tokens_per_s_per_gpu"] / base["tokens_per_s_per_gpu"] if base["tokens_per_s_per_gpu"] else None
            diffs = [abs(a - b) / max(abs(b), 1e-12) for a, b in zip(r["losses"], base["losses"])]
            same_length = len(r["losses"]) == len(base["losses"])
            max_rel = max(diffs) if diffs else math.inf
            out.append(
                {
                    **r,
                    "baseline_world": base["world"],
                    "scaling_efficiency": eff,
                    "loss_max_rel_diff": max_rel,
                    "loss_equal": bool(same_length and max_rel <= loss_rtol and all(map(math.isfinite, r["losses"]))),
                    # Muon's Newton-Schulz work summed over ranks equals one process's: each matrix done once.
                    "ns_once": r["ns_matrices_all_ranks"] == base["ns_matrices_all_ranks"]
                    if base["world"] == 1
                    else None,
                }
            )
    return out


def table(rows: list[dict]) -> str:
    head = (
        "| mode | GPUs | tokens/s/GPU | scaling eff. | peak mem/GPU (GiB) | loss max rel diff | loss equal | NS once |"
    )
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        eff = "-" if r["scaling_efficiency"] is None else f"{r['scaling_efficiency']:.3f}"
        lines.append(
            f"| {r['mode']} | {r['world']} | {r['tokens_per_s_per_gpu']:,.0f} | {eff} | "
            f"{r['peak_mem_bytes'] / 2**30:.2f} | {r['loss_max_rel_diff']:.2e} | {r['loss_equal']} | {r['ns_once']} |"
        )
    return "\n".join(lines)


# -- worker --------------------------------------------------------------------------------------------------
def worker(args) -> None:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    sys.path.insert(0, str(REPO))
    from parallax_lightning.model import Decoder
    from parallax_lightning.model_sizes import preset
    from parallax_lightning.optim import OptimizerConfig, build_optimizer
    from parallax_lightning.strategies import shard_decoder

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    if args.device == "cuda":
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        device = torch.device("cpu")
    dist.init_process_group(args.backend)
    try:
        overrides = {"vocab_size": args.vocab_size, "max_seq_len": args.seq_len}
        if args.attention:
            overrides["attention"] = args.attention
        torch.manual_seed(args.seed)
        model = Decoder(preset(args.preset, **overrides))  # the same initialisation on every rank (seeded, CPU)
        compile_ = args.compile == "on"
        bf16 = args.precision == "bf16"
        optimizer_config = OptimizerConfig(name="muon", lr=args.lr, adamw_lr=args.lr / 5)
        if args.mode == "fsdp2":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import MixedPrecisionPolicy

            mesh = init_device_mesh(device.type, (world,))
            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
            shard_decoder(model, mesh, mp_policy=policy, compile_blocks=compile_)
            optimizer = build_optimizer(model, optimizer_config, verbose=False)
            step_model = model
        else:
            from torch.nn.parallel import DistributedDataParallel

            model.to(device)
            optimizer = build_optimizer(model, optimizer_config, verbose=False)  # before wrapping: plain names
            if compile_:
                model.compile()
            step_model = DistributedDataParallel(model, device_ids=[local] if device.type == "cuda" else None)
        rows = rank_rows(args.global_batch, world, rank)
        losses, times = [], []
        ns_done = 0
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16 and args.mode == "ddp")
        for step in range(args.steps):
            gen = torch.Generator().manual_seed(args.seed * 100_003 + step)  # the whole world's batch
            tokens = torch.randint(0, args.vocab_size, (args.global_batch, args.seq_len + 1), generator=gen)
            batch = tokens[rows].to(device, non_blocking=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            with autocast:
                logits = step_model(batch[:, :-1])
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            mean = loss.detach().clone()
            dist.all_reduce(mean)  # equal shares: the global batch's mean loss
            losses.append(mean.item() / world)
            ns_done = optimizer.last_step_info.get("ns_matrices", 0)
        timed = times[args.warmup :]
        tokens_per_rank = (args.global_batch // world) * args.seq_len * len(timed)
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device)
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
        stats = torch.tensor([peak, ns_done], dtype=torch.float64, device=device)
        peak_max = stats[:1].clone()
        dist.all_reduce(peak_max, op=dist.ReduceOp.MAX)
        ns_sum = stats[1:].clone()
        dist.all_reduce(ns_sum)
        rate = torch.tensor([tokens_per_rank / sum(timed)], dtype=torch.float64, device=device)
        dist.all_reduce(rate)  # mean over ranks below
        if rank == 0:
            result = {
                "mode": args.mode,
                "world": world,
                "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                "preset": args.preset,
                "seq_len": args.seq_len,
                "global_batch": args.global_batch,
                "precision": args.precision,
                "compile": compile_,
                "timed_steps": len(timed),
                "tokens_per_s_per_gpu": rate.item() / world,
                "peak_mem_bytes": int(peak_max.item()),
                "losses": losses,
                "ns_matrices_all_ranks": int(ns_sum.item()),
            }
            Path(args.result).write_text(json.dumps(result))
        dist.barrier()  # both ranks done with every collective before teardown (gloo aborts otherwise)
    finally:
        dist.destroy_process_group()


# -- launcher ------------------------------------------------------------------------------------------------
def worker_argv(args, mode: str, result: Path) -> list[str]:
    keep = ["preset", "vocab_size", "seq_len", "global_batch", "steps", "warmup", "precision", "compile", "lr"]
    keep += ["seed", "device", "backend"]
    argv = [str(Path(__file__).resolve()), "--worker", "--mode", mode, "--result", str(result)]
    for key in keep:
        argv += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    if args.attention:
        argv += ["--attention", args.attention]
    return argv


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    out = Path(args.out or Path(os.environ.get("OUT", ".")) / "bench_scaling.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    results, failures = [], []
    for mode in args.modes:
        for n in args.gpus:
            result = out.with_name(f".{out.stem}-{mode}-{n}.json")
            result.unlink(missing_ok=True)
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"]
            print(f"bench_scaling: {mode} on {n} process(es)", flush=True)
            try:
                proc = subprocess.run([*cmd, *worker_argv(args, mode, result)], env=env, timeout=args.timeout)
                code = proc.returncode
            except subprocess.TimeoutExpired:
                code = "timeout"
            if code != 0 or not result.is_file():
                failures.append(f"{mode} x{n}: exit {code}")
                continue
            results.append(json.loads(result.read_text()))
            result.unlink()
    rows = summarize(results, args.loss_rtol)
    out.write_text(json.dumps({"args": vars(args), "runs": rows, "failures": failures}, indent=1))
    print(table(rows))
    for f in failures:
        print(f"bench_scaling: FAILED {f}", file=sys.stderr)
    print(f"bench_scaling: results in {out}")
    ok = all(r["loss_equal"] and r["ns_once"] is not False for r in rows)
    return 1 if failures or not ok else 0


if __name__ == "__main__":
    sys.exit(main())
