"""What the platform costs: the real `fit` (Lightning, MLflow logging, diagnostics, checkpoints) against the same
training step outside Lightning (bench_e2e.measure), same model, sizes and tokens per step, one run.

    python benchmarks/bench_platform.py                            # small preset, T=1024, 32k tokens/step, Muon
    python benchmarks/bench_platform.py --attention parallax --steps 200

`fit` runs in a subprocess per attention kind (its own CUDA context and compile caches) on random token shards
written to a temporary folder (speed does not depend on the tokens), with the configs of experiments/lm/ (base,
small, the attention, muon) and `--model.compile true`. Its throughput is SpeedMonitor's perf/tokens_per_s at the
end of training, read back from the run's MLflow store (the clock starts after the first step, validation time
excluded). The outside-Lightning step is bench_e2e's compiled step at the same sizes.

Needs MLflow, omegaconf and jsonargparse (the platform's dependencies). The log and bench_platform.json go to $OUT
when it is set; the table is printed last.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from _common import RunLog, save_outputs  # noqa: E402  (after the path insert)

log = RunLog()
LOG = log.lines


def write_shards(folder: Path, vocab: int, tokens: int) -> None:
    from parallax_lightning.data.shards import write_shard

    rng = np.random.default_rng(0)
    write_shard(folder / "bench_train_000.bin", rng.integers(0, vocab, tokens, dtype=np.uint16))
    write_shard(folder / "bench_val_000.bin", rng.integers(0, vocab, 1 << 20, dtype=np.uint16))


def run_fit(args, attention: str, data: Path, work: Path) -> dict:
    store = work / f"{attention}.db"
    cmd = [
        sys.executable, "-m", "parallax_lightning", "fit",
        "--config", str(REPO / "experiments/lm/base.yaml"), "--config", str(REPO / "experiments/lm/small.yaml"),
        "--config", str(REPO / f"experiments/lm/{attention}.yaml"), "--config", str(REPO / "experiments/lm/muon.yaml"),
        "--data.train_files", str(data / "bench_train_*.bin"), "--data.val_files", str(data / "bench_val_*.bin"),
        "--data.vocab_size", str(args.vocab_size), "--data.seq_len", str(args.seq_len),
        "--data.batch_size", str(args.tokens_per_step // args.seq_len),
        "--trainer.max_steps", str(args.steps), "--trainer.val_check_interval", str(args.steps),
        "--trainer.limit_val_batches", "4", "--trainer.default_root_dir", str(work / "runs"),
        "--trainer.logger.init_args.tracking_uri", f"sqlite:///{store}",
        "--checkpoint.every_n_train_steps", str(args.steps), "--diagnostics.every_n_steps", str(args.diag_every),
        "--model.compile", "true",
    ]  # fmt: skip
    log(f"fit {attention}: {' '.join(cmd[3:])}")
    t = time.time()
    proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True)
    wall = time.time() - t
    (work / f"fit_{attention}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"fit {attention} exited {proc.returncode}: {proc.stderr[-2000:]}")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{store}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    run = runs[0]
    history = client.get_metric_history(run.info.run_id, "perf/tokens_per_s")
    mfu = client.get_metric_history(run.info.run_id, "perf/mfu")
    return {
        "tokens_per_s": history[-1].value if history else None,
        "mfu": mfu[-1].value if mfu else None,
        "wall_s": wall,
        "steps": args.steps,
    }


def outside(args, attention: str) -> dict:
    import bench_e2e

    e2e_args = argparse.Namespace(
        preset="small", vocab_size=args.vocab_size, tokens_per_step=args.tokens_per_step, optimizer="muon",
        warmup=3, seconds=5.0, min_steps=5, amp_on_cpu=False,
    )  # fmt: skip
    row = bench_e2e.measure(e2e_args, attention, args.seq_len, torch.device("cuda"), "compile")
    torch.cuda.empty_cache()
    return {"tokens_per_s": row["tokens_per_s"], "mfu": row["mfu"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--attention", nargs="+", default=["softmax", "parallax"])
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--tokens-per-step", type=int, default=32768)
    p.add_argument("--vocab-size", type=int, default=16384)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--diag-every", type=int, default=100, help="diagnostics interval inside fit (on by default)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_platform.py needs a CUDA GPU")
    log(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}")
    rows, errors = [], []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        write_shards(work, args.vocab_size, args.tokens_per_step * (args.steps + 8))
        for attention in args.attention:
            row = {"attention": attention}
            try:
                row["outside"] = outside(args, attention)
                log(f"outside Lightning {attention}: {row['outside']['tokens_per_s']:,.0f} tokens/s")
                row["fit"] = run_fit(args, attention, work, work)
                log(f"inside fit        {attention}: {row['fit']['tokens_per_s']:,.0f} tokens/s "
                    f"({row['fit']['wall_s']:.0f} s wall for {args.steps} steps)")  # fmt: skip
                row["ratio"] = row["fit"]["tokens_per_s"] / row["outside"]["tokens_per_s"]
            except Exception as e:
                errors.append(f"{attention}: {type(e).__name__}: {e}")
                log(f"{attention}: FAILED {type(e).__name__}: {e}")
            rows.append(row)
            for f in work.glob("fit_*.log"):
                LOG.append(f"--- {f.name}\n{f.read_text()[-4000:]}")
    table = [f"{'attention':<10}{'outside tok/s':>15}{'fit tok/s':>12}{'fit/outside':>13}{'fit MFU':>9}"]
    for row in rows:
        if "ratio" in row:
            mfu = f"{100 * row['fit']['mfu']:.1f}%" if row["fit"]["mfu"] else "—"
            table.append(f"{row['attention']:<10}{row['outside']['tokens_per_s']:>15,.0f}"
                         f"{row['fit']['tokens_per_s']:>12,.0f}{row['ratio']:>13.3f}{mfu:>9}")  # fmt: skip
    table.append("target: fit/outside >= 0.9 (logging and diagnostics on)")
    record = {"args": vars(args), "rows": rows, "errors": errors}
    save_outputs(os.environ.get("OUT"), "bench_platform", record, [*LOG, "", *table])
    log()
    print("\n".join(table))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
