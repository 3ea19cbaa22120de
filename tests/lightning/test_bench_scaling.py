"""benchmarks/bench_scaling.py on the CPU: its dry mode (gloo, tiny model) launches the same workers the GPU run
launches, and the summary it draws from them (scaling efficiency, loss agreement, Muon's work done once)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import bench_scaling

    return bench_scaling


def _run(world, losses, rate, ns=10, mode="fsdp2"):
    return {
        "mode": mode,
        "world": world,
        "tokens_per_s_per_gpu": rate,
        "peak_mem_bytes": 2**30,
        "losses": losses,
        "ns_matrices_all_ranks": ns,
    }


def test_summary_compares_each_count_with_the_smallest(bench):
    rows = bench.summarize(
        [
            _run(2, [3.0, 2.0003], 90.0),
            _run(1, [3.0, 2.0], 100.0),
            _run(4, [3.0, 2.1], 80.0, ns=12),  # a diverged curve; Newton-Schulz work done twice somewhere
            _run(2, [3.0, float("nan")], 50.0, mode="ddp"),
        ],
        loss_rtol=1e-3,
    )
    by = {(r["mode"], r["world"]): r for r in rows}
    assert by["fsdp2", 2]["scaling_efficiency"] == pytest.approx(0.9)
    assert by["fsdp2", 2]["loss_equal"] and by["fsdp2", 2]["ns_once"]
    assert not by["fsdp2", 4]["loss_equal"] and by["fsdp2", 4]["ns_once"] is False
    assert by["ddp", 2]["baseline_world"] == 2 and not by["ddp", 2]["loss_equal"]  # NaN never agrees
    assert by["ddp", 2]["ns_once"] is None  # no one-process baseline to count against
    assert "| fsdp2 | 4 | 80 | 0.800 | 1.00 |" in bench.table(rows)


def test_rows_split_the_global_batch(bench):
    assert [bench.rank_rows(8, 4, r) for r in range(4)] == [slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 8)]


def test_a_batch_that_does_not_split_is_refused_before_any_run(bench):
    with pytest.raises(SystemExit, match="--global-batch 6 must split evenly over 4 processes"):
        bench.parse_args(["--gpus", "1", "4", "--global-batch", "6"])
    with pytest.raises(SystemExit, match="--backend nccl needs --device cuda"):
        bench.parse_args(["--device", "cpu", "--backend", "nccl"])


@pytest.mark.slow
def test_dry_run_on_two_gloo_processes(tmp_path):
    out = tmp_path / "scaling.json"
    args = ["--device", "cpu", "--gpus", "1", "2", "--modes", "fsdp2", "--preset", "tiny", "--vocab-size", "128"]
    args += ["--seq-len", "16", "--global-batch", "4", "--steps", "3", "--warmup", "1", "--precision", "fp32"]
    args += ["--compile", "off", "--out", str(out)]
    proc = subprocess.run(
        [sys.executable, str(BENCH / "bench_scaling.py"), *args],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"},
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["failures"] == []
    one, two = sorted(report["runs"], key=lambda r: r["world"])
    assert (one["world"], two["world"]) == (1, 2) and len(two["losses"]) == 3
    assert two["loss_equal"] and two["loss_max_rel_diff"] < 1e-4  # fp32: summation order only
    assert two["ns_once"] and two["ns_matrices_all_ranks"] > 0
    assert two["tokens_per_s_per_gpu"] > 0 and two["peak_mem_bytes"] > 0 and two["timed_steps"] == 2
