"""Train the paper grid one run after another inside a wall-clock budget, each run logged to one MLflow store.

Called by experiments/paper/run_grid.sh (which unpacks the data first); usable on its own:

    python experiments/paper/run_grid.py --data /tmp/paper_shards --out /tmp/grid            # the four cells
    python experiments/paper/run_grid.py --data /tmp/paper_shards --out /tmp/grid --tiny     # CPU dry run
    python experiments/paper/run_grid.py ... --controls        # + param-matched softmax, compute-matched Parallax

Every run is `python -m parallax_lightning fit` over grid.yaml + the cell's attention and optimizer files
(+ tiny.yaml) + a generated file that points the data at --data, the store at <out>/mlflow.db, names the run
after its cell and tags it with the grid id, so report.py can find the runs of one invocation.

Budget: before each run the time left is shared among the runs still to go; a run's Lightning `max_time` is
min(--run-max-time-s, its share − --reserve-s) (the reserve covers start-up and tear-down, which max_time does
not count). A run that max_time stops has seen fewer tokens: report.py flags it. When a share is below
--min-run-s the remaining runs are skipped rather than started and killed. A failed run does not stop the grid.

Leaves in --out: mlflow.db (the store), grid.log (every run's output), grid_status.tsv (one line per run),
artifacts.tar.gz (the runs' MLflow artifacts: resolved configs and figures).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent

# cell -> (attention file, optimizer file); the order is the order of training (Muon first: the paper's claim).
CELLS = {
    "softmax-muon": ("softmax.yaml", "muon.yaml"),
    "parallax-muon": ("parallax.yaml", "muon.yaml"),
    "softmax-adamw": ("softmax.yaml", "adamw.yaml"),
    "parallax-adamw": ("parallax.yaml", "adamw.yaml"),
}
CONTROLS = {
    "softmax_pm-muon": ("softmax_param_matched.yaml", "muon.yaml"),
    "parallax_cm-muon": ("parallax_compute_matched.yaml", "muon.yaml"),
}
# The controls' preset names (for --tiny, whose shapes come from the tiny preset rather than the files).
CONTROL_PRESETS = {
    "softmax_param_matched.yaml": "softmax-param-matched",
    "parallax_compute_matched.yaml": "parallax-compute-matched",
}
TIME_LIMIT_LINE = "Time limit reached"


def max_time_string(seconds: float) -> str:
    """Lightning's DD:HH:MM:SS."""
    s = max(1, int(seconds))
    return f"00:{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"


def tiny_control_model(control_file: str) -> dict:
    """The tiny preset's version of a control (the files hold the small preset's shapes)."""
    from parallax_lightning.model import preset

    config = preset(f"tiny-{CONTROL_PRESETS[control_file]}")
    keys = ("attention", "n_heads", "n_kv_heads", "head_dim", "mlp_hidden")
    return {k: dataclasses.asdict(config)[k] for k in keys}


def run_overrides(args, cell: str, grid_id: str, max_time_s: float, control_file: str | None) -> dict:
    data = Path(args.data).resolve()
    logger_args = {
        "tracking_uri": f"sqlite:///{Path(args.out).resolve() / 'mlflow.db'}",
        "run_name": cell,
        # Artifacts stay out of --out (only a few files travel back); run_grid packs them into one archive.
        "artifact_location": str(Path(args.scratch).resolve() / "mlruns"),
        "tags": {
            "paper.grid_id": grid_id,
            "paper.cell": cell,
            "paper.max_time_s": str(int(max_time_s)),
            "paper.tiny": str(args.tiny).lower(),
            "paper.steps_rule": args.steps_rule,
        },
    }
    if args.experiment:
        logger_args["experiment_name"] = args.experiment
    overrides: dict = {
        "trainer": {
            "default_root_dir": str(Path(args.scratch).resolve() / "runs" / cell),
            "max_time": max_time_string(max_time_s),
            "logger": {"init_args": logger_args},
        },
        "data": {"init_args": {"train_files": str(data / "*_train_*.bin"), "val_files": str(data / "*_val_*.bin")}},
    }
    if args.max_steps:
        overrides["trainer"]["max_steps"] = args.max_steps
    if args.tiny and control_file is not None:
        overrides["model"] = {"init_args": {"model": tiny_control_model(control_file)}}
    for item in args.set:
        _set_dotted(overrides, item)
    return overrides


def _set_dotted(config: dict, item: str) -> None:
    """'trainer.val_check_interval=50' -> config["trainer"]["val_check_interval"] = 50 (value read as YAML)."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ValueError(f"--set expects KEY=VALUE with a dotted key, got {item!r}")
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"--set {item!r}: {part!r} already holds a value, not a section")
    node[leaf] = yaml.safe_load(value)


def base_files(args) -> list[Path]:
    """The config files every cell starts from."""
    return [HERE / "grid.yaml"] + ([HERE / "tiny.yaml"] if args.tiny else [])


def config_files(args, cell: str, plan: dict) -> list[Path]:
    attention, optimizer = plan[cell]
    return [*base_files(args), HERE / attention, HERE / optimizer]


def _merge(base: dict, update: dict) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


def shared_config(args) -> dict:
    """What every cell's run sees of the base files, --experiment and --set, merged in the order the CLI
    applies them (the files, then run_overrides, in which --set comes last)."""
    merged: dict = {}
    for path in base_files(args):
        _merge(merged, yaml.safe_load(path.read_text()) or {})
    if args.experiment:
        _merge(merged, {"trainer": {"logger": {"init_args": {"experiment_name": args.experiment}}}})
    for item in args.set:
        _set_dotted(merged, item)
    return merged


def stream(cmd: list[str], log, env: dict) -> tuple[int, bool]:
    """Run cmd, copying its output to stdout and the log with carriage returns (progress bars) as newlines.
    Returns (exit code, whether Lightning said the time limit was reached)."""
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    time_limited = False
    assert proc.stdout is not None
    for raw in iter(proc.stdout.readline, b""):
        text = raw.decode(errors="replace").replace("\r", "\n")
        for line in text.splitlines():
            if not line.strip():
                continue
            time_limited = time_limited or TIME_LIMIT_LINE in line
            print(line, flush=True)
            log.write(line + "\n")
        log.flush()
    return proc.wait(), time_limited


def tag_run(tracking_uri: str, experiment: str, grid_id: str, cell: str, tags: dict[str, str]) -> bool:
    """Add tags to the run of this grid and cell (after the process ended); False if there is no such run."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return False
    runs = client.search_runs(
        [exp.experiment_id], f"tags.`paper.grid_id` = '{grid_id}' and tags.`paper.cell` = '{cell}'", max_results=5
    )
    for run in runs:
        for key, value in tags.items():
            client.set_tag(run.info.run_id, key, value)
    return bool(runs)


STATUS_HEADER = "grid_id\tcell\tstate\twall_s\tstopped_by_max_time\tmax_time_s\tnote\n"


def write_status(out: Path, grid_id: str, rows) -> None:
    """Append to grid_status.tsv after every run, so a grid killed from outside still says what it did."""
    path = out / "grid_status.tsv"
    with open(path, "a") as f:
        if f.tell() == 0:
            f.write(STATUS_HEADER)
        for row in rows:
            f.write("\t".join([grid_id, *row]) + "\n")


def _tidy_spool(out: Path) -> Path | None:
    """The platform's logger may keep a write-ahead spool (`mlflow_spool/` beside the SQLite store) of records
    the store has not confirmed. Empty, it goes; with records left it moves into the artifact archive (only a
    few files travel back from the GPU machine), and the loss is said out loud: the store lacks them."""
    spool = out / "mlflow_spool"
    if not spool.is_dir():
        return None
    leftovers = [p for p in spool.rglob("*") if p.is_file() and p.stat().st_size > 0]
    if not leftovers:
        shutil.rmtree(spool)
        return None
    moved = out.resolve().parent / f"{out.resolve().name}_scratch_spool"
    if moved.exists():
        shutil.rmtree(moved)
    shutil.move(str(spool), moved)
    print(
        f"WARNING: {len(leftovers)} spool file(s) hold records the MLflow store did not take; they are in "
        f"artifacts.tar.gz under mlflow_spool/ (replay them with parallax_lightning.tracking_outbox.replay_spool)",
        flush=True,
    )
    return moved


def _data_settings(args) -> dict:
    """The runs' data.init_args (batch size and sequence length)."""
    return shared_config(args).get("data", {}).get("init_args", {})


def steps_from_bench(args) -> int | None:
    """max_steps that fill --target-train-s at the Parallax throughput bench_e2e.py measured on this machine
    (its slowest cell), times --lightning-efficiency for what the trainer adds (a sync per step for the NaN
    guard, logging, the data loader); rounded down to whole validation intervals so the last validation
    falls on the last step. None (keep the config's max_steps) when the file has no usable number."""
    import json

    try:
        bench = json.loads(Path(args.steps_from_bench).read_text())
    except (OSError, ValueError) as err:
        print(
            f"run_grid: --steps-from-bench: cannot read {args.steps_from_bench} ({err}); keeping max_steps", flush=True
        )
        return None
    data = _data_settings(args)
    seq_len, batch = int(data["seq_len"]), int(data["batch_size"])
    rows = [r for r in bench.get("results", []) if r.get("name") == "parallax" and r.get("seq_len") == seq_len]
    if not rows:
        print(f"run_grid: --steps-from-bench: no Parallax result at T={seq_len}; keeping max_steps", flush=True)
        return None
    tokens_per_s = rows[0]["tokens_per_s"] * args.lightning_efficiency
    interval = args.steps_multiple
    steps = int(args.target_train_s * tokens_per_s / (seq_len * batch) // interval * interval)
    clamped = max(args.min_steps, min(args.max_auto_steps, steps))
    args.steps_from_bench_note = (
        f"sized from bench_e2e's {rows[0]['tokens_per_s']:,.0f} Parallax tokens/s x {args.lightning_efficiency} "
        f"for {args.target_train_s:.0f} s of training"
    )
    print(
        f"run_grid: max_steps {clamped} (from {rows[0]['tokens_per_s']:,.0f} Parallax tokens/s in bench_e2e x "
        f"{args.lightning_efficiency} for {args.target_train_s:.0f} s of training at {batch}x{seq_len} tokens/step"
        + (f"; {steps} clamped to [{args.min_steps}, {args.max_auto_steps}]" if clamped != steps else "")
        + ")",
        flush=True,
    )
    return clamped


def experiment_name(args) -> str:
    """The MLflow experiment the runs go to (where tag_run looks for them)."""
    return shared_config(args).get("trainer", {}).get("logger", {}).get("init_args", {}).get("experiment_name")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", required=True, help="folder of the token shards (with meta.json and tokenizer.json)")
    p.add_argument("--out", required=True, help="folder for mlflow.db, grid.log, grid_status.tsv, artifacts.tar.gz")
    p.add_argument(
        "--scratch", default=None, help="checkpoint/artifact scratch folder (default: <out>/../grid_scratch)"
    )
    p.add_argument("--tiny", action="store_true", help="CPU dry run: tiny model, a few steps")
    p.add_argument("--controls", action="store_true", help="also the parameter- and compute-matched controls")
    p.add_argument(
        "--runs",
        nargs="+",
        default=None,
        help=f"a subset of cells (default: all); known: {', '.join([*CELLS, *CONTROLS])}",
    )
    p.add_argument("--experiment", default=None, help="MLflow experiment (default: grid.yaml's, paper-grid)")
    p.add_argument("--max-steps", type=int, default=None, help="override trainer.max_steps for every run")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config key of every run, e.g. trainer.val_check_interval=50 (repeatable)",
    )
    p.add_argument("--steps-from-bench", default=None, help="bench_e2e.json: size max_steps from its Parallax tokens/s")
    p.add_argument("--target-train-s", type=float, default=60.0, help="with --steps-from-bench: seconds of training")
    p.add_argument("--lightning-efficiency", type=float, default=0.85, help="trainer tokens/s / bench tokens/s")
    p.add_argument("--steps-multiple", type=int, default=100, help="round max_steps down to this (the val interval)")
    p.add_argument("--min-steps", type=int, default=300, help="with --steps-from-bench: at least this many steps")
    p.add_argument("--max-auto-steps", type=int, default=1500, help="with --steps-from-bench: at most this many")
    p.add_argument("--budget-s", type=float, default=420.0, help="wall-clock budget of the whole grid")
    p.add_argument("--run-max-time-s", type=float, default=100.0, help="Lightning max_time of one run (at most)")
    p.add_argument("--reserve-s", type=float, default=25.0, help="start-up + tear-down outside max_time, per run")
    p.add_argument("--min-run-s", type=float, default=30.0, help="skip a run whose max_time would be shorter")
    return p


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)

    if not (Path(args.data) / "meta.json").is_file():
        p.error(f"--data {args.data}: no meta.json there (expected the folder prepare_shards.py wrote)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    args.scratch = args.scratch or str(out.resolve().parent / f"{out.resolve().name}_scratch")
    Path(args.scratch).mkdir(parents=True, exist_ok=True)

    plan = dict(CELLS)
    if args.controls:
        plan.update(CONTROLS)
    if args.runs:
        unknown = [r for r in args.runs if r not in CELLS and r not in CONTROLS]
        if unknown:
            p.error(f"--runs: unknown cell(s) {unknown}; known: {', '.join([*CELLS, *CONTROLS])}")
        plan = {r: {**CELLS, **CONTROLS}[r] for r in args.runs}

    args.steps_rule = f"--max-steps {args.max_steps}" if args.max_steps else "the config's max_steps"
    if args.steps_from_bench and not args.max_steps:
        args.max_steps = steps_from_bench(args)
        if args.max_steps:
            args.steps_rule = args.steps_from_bench_note
    grid_id = time.strftime("%Y%m%d-%H%M%S") + ("-tiny" if args.tiny else "")
    tracking_uri = f"sqlite:///{out.resolve() / 'mlflow.db'}"
    experiment = experiment_name(args)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    status_rows = []
    print(f"paper grid {grid_id}: {len(plan)} runs, budget {args.budget_s:.0f} s, store {tracking_uri}", flush=True)
    with open(out / "grid.log", "a") as log:
        log.write(f"=== paper grid {grid_id}: {', '.join(plan)}\n")
        for i, cell in enumerate(plan):
            remaining = args.budget_s - (time.perf_counter() - t0)
            share = remaining / (len(plan) - i) - args.reserve_s
            max_time_s = min(args.run_max_time_s, share)
            if max_time_s < args.min_run_s:
                msg = f"skipped: {remaining:.0f} s of the grid budget left for {len(plan) - i} runs"
                print(f"=== {cell}: {msg}", flush=True)
                log.write(f"=== {cell}: {msg}\n")
                status_rows.append((cell, "skipped", "", "", f"{max_time_s:.0f}", msg))
                write_status(out, grid_id, status_rows[-1:])
                continue
            attention, _ = plan[cell]
            control = attention if attention in CONTROL_PRESETS else None
            override = Path(args.scratch) / f"{grid_id}_{cell}.yaml"
            override.write_text(yaml.safe_dump(run_overrides(args, cell, grid_id, max_time_s, control)))
            files = [*config_files(args, cell, plan), override]
            cmd = [sys.executable, "-m", "parallax_lightning", "fit"]
            for f in files:
                cmd += ["--config", str(f)]
            header = f"=== {cell}: max_time {max_time_s:.0f} s; " + " ".join(str(Path(f).name) for f in files)
            print(header, flush=True)
            log.write(header + "\n")
            start = time.perf_counter()
            rc, time_limited = stream(cmd, log, env)
            wall = time.perf_counter() - start
            state = "ok" if rc == 0 else f"exit {rc}"
            note = "stopped by max_time" if time_limited else ""
            outcome = {
                "paper.exit_code": str(rc),
                "paper.wall_s": f"{wall:.1f}",
                "paper.stopped_by_max_time": str(time_limited).lower(),
            }
            try:
                found = tag_run(tracking_uri, experiment, grid_id, cell, outcome)
            except Exception as err:  # the store's trouble must not cost the runs still to come
                found, note = True, (note + "; " if note else "") + f"tagging failed: {type(err).__name__}: {err}"
            if not found:
                note = (note + "; " if note else "") + "no MLflow run found"
            line = f"=== {cell}: {state} in {wall:.1f} s" + (f" ({note})" if note else "")
            print(line, flush=True)
            log.write(line + "\n")
            status_rows.append((cell, state, f"{wall:.1f}", str(time_limited).lower(), f"{max_time_s:.0f}", note))
            write_status(out, grid_id, status_rows[-1:])

    spool = _tidy_spool(out)
    artifacts = Path(args.scratch) / "mlruns"
    if artifacts.is_dir() or spool is not None:
        with tarfile.open(out / "artifacts.tar.gz", "w:gz") as tar:
            if artifacts.is_dir():
                tar.add(artifacts, arcname="mlruns")
            if spool is not None:
                tar.add(spool, arcname="mlflow_spool")
    total = time.perf_counter() - t0
    print(f"paper grid {grid_id}: done in {total:.0f} s", flush=True)
    for row in status_rows:
        print("  " + "  ".join(x for x in row if x), flush=True)
    return 0 if all(r[1] == "ok" for r in status_rows) else 1


if __name__ == "__main__":
    sys.exit(main())
