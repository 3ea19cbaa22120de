"""Run one task for several attention kinds and widths, then compare the runs in one table and one plot.

Each point of the grid is a separate `python -m parallax_lightning fit` process (the same CLI a user runs by
hand), tagged in MLflow with the sweep's id and its coordinates, and a child of the sweep's parent run (the
`mlflow.parentRunId` tag), so the MLflow UI folds a sweep's runs under one row; the parent holds the report.
The report is built from the MLflow runs alone (MlflowClient search by experiment and tag), so it can be
rebuilt later, or for a sweep whose runs were started elsewhere, with --report-only.

    python experiments/sweep.py --config experiments/long_context/mqar_cpu.yaml \\
        --attention softmax parallax --d_model 64 128 --metric val/acc val/acc/length_test --out sweeps/mqar

    python experiments/sweep.py --report-only --sweep-id <id> --experiment mqar-sweep --out sweeps/mqar

Writes <out>/sweep.md (a Markdown table per metric: attention kinds × widths, final value of each run) and
<out>/sweep.png (each metric against d_model, one line per attention kind), and prints the table.
Anything after `--` goes to every run unchanged (e.g. `-- --trainer.max_steps 300`).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

TAG = "parallax.sweep"
PARENT_TAG = "parallax.sweep_parent"  # on the parent run only (not TAG: the report reads TAG's runs)


def parse_args(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="the task's YAML config (what `fit --config` takes)")
    p.add_argument("--attention", nargs="+", default=["softmax", "parallax"], help="attention kinds to compare")
    p.add_argument("--d_model", nargs="+", type=int, default=None, help="widths (default: the config's)")
    p.add_argument(
        "--axis",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="another CLI key to sweep, e.g. model.model.n_layers=2,4 (repeatable)",
    )
    p.add_argument("--metric", nargs="+", default=["val/acc"], help="metrics to tabulate (final value per run)")
    p.add_argument("--experiment", default=None, help="MLflow experiment (default: <config stem>-sweep)")
    p.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db here")
    p.add_argument("--out", default="sweeps", help="folder for sweep.md, sweep.png, logs and checkpoints")
    p.add_argument("--sweep-id", default=None, help="name of this sweep (default: a fresh id)")
    p.add_argument("--parallel", type=int, default=1, help="runs at a time (1 on small machines)")
    p.add_argument("--report-only", action="store_true", help="build the report from existing runs of --sweep-id")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = p.parse_args(argv)
    args.extra = extra
    if not args.report_only and not args.config:
        p.error("--config is required unless --report-only")
    if args.report_only and not args.sweep_id:
        p.error("--report-only needs --sweep-id")
    if args.config and not Path(args.config).is_file():
        p.error(f"config file {args.config!r} does not exist")
    for axis in args.axis:
        if "=" not in axis or not axis.split("=", 1)[1]:
            p.error(f"--axis takes KEY=V1,V2,...; got {axis!r}")
    if args.parallel < 1:
        p.error("--parallel must be >= 1")
    return args


def default_tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def grid(args) -> list[dict[str, str]]:
    """Every combination of the swept keys, as {cli key: value}."""
    axes: dict[str, list[str]] = {"model.model.attention": list(args.attention)}
    if args.d_model:
        axes["model.model.d_model"] = [str(d) for d in args.d_model]
    for axis in args.axis:
        key, values = axis.split("=", 1)
        axes[key.removeprefix("--")] = values.split(",")
    keys = list(axes)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(axes[k] for k in keys))]


def short(point: dict[str, str]) -> str:
    return "-".join(f"{k.rsplit('.', 1)[-1]}{v}" if k != "model.model.attention" else v for k, v in point.items())


def command(args, point: dict[str, str], uri: str, out: Path, parent_run_id: str | None = None) -> list[str]:
    tags = {TAG: args.sweep_id, **{f"{TAG}.{k.rsplit('.', 1)[-1]}": v for k, v in point.items()}}
    if parent_run_id:
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

        tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
    cmd = [sys.executable, "-m", "parallax_lightning", "fit", "--config", args.config]
    for key, value in point.items():
        cmd += [f"--{key}", value]
    cmd += [
        "--trainer.logger.init_args.experiment_name", args.experiment,
        "--trainer.logger.init_args.tracking_uri", uri,
        "--trainer.logger.init_args.tags", json.dumps(tags),
        "--trainer.default_root_dir", str(out / "runs" / short(point)),
        "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip
    return cmd + list(args.extra)


def start_parent(args, uri: str) -> str:
    """The sweep's parent run (its children name it in their `mlflow.parentRunId` tag); returns its id."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(args.experiment)
    exp_id = exp.experiment_id if exp is not None else client.create_experiment(args.experiment)
    axes = {k: sorted({p[k] for p in grid(args)}) for k in grid(args)[0]}
    run = client.create_run(
        exp_id,
        run_name=f"sweep-{args.sweep_id}",
        tags={PARENT_TAG: args.sweep_id, f"{PARENT_TAG}.grid": json.dumps(axes)[:5000]},
    )
    return run.info.run_id


def end_parent(uri: str, parent_run_id: str, failed: int, out: Path) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    for name in ("sweep.md", "sweep.png"):
        if (out / name).is_file():
            client.log_artifact(parent_run_id, str(out / name))
    client.set_terminated(parent_run_id, "FAILED" if failed else "FINISHED")


def run_all(args, uri: str, out: Path, parent_run_id: str | None = None) -> dict[str, int]:
    points = grid(args)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    status: dict[str, int] = {}
    running: list[tuple[str, subprocess.Popen, float, object]] = []
    queue = list(points)
    while queue or running:
        while queue and len(running) < args.parallel:
            point = queue.pop(0)
            name = short(point)
            cmd = command(args, point, uri, out, parent_run_id)
            print(f"[sweep {args.sweep_id}] start {name}: {' '.join(cmd)}", flush=True)
            if args.dry_run:
                status[name] = 0
                continue
            log = open(out / "logs" / f"{name}.log", "w")  # noqa: SIM115 - closed when the run ends
            running.append((name, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), time.time(), log))
        for item in list(running):
            name, proc, t0, log = item
            if proc.poll() is not None:
                log.close()
                running.remove(item)
                status[name] = proc.returncode
                state = "done" if proc.returncode == 0 else f"FAILED (exit {proc.returncode}, see logs/{name}.log)"
                print(f"[sweep {args.sweep_id}] {name}: {state} in {time.time() - t0:.0f} s", flush=True)
        if running:
            time.sleep(1.0)
    return status


def collect(uri: str, experiment: str, sweep_id: str):
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise SystemExit(f"sweep: MLflow experiment {experiment!r} does not exist in {uri}")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{TAG}` = '{sweep_id}'", max_results=1000)
    if not runs:
        raise SystemExit(f"sweep: no runs tagged {TAG}={sweep_id!r} in experiment {experiment!r} ({uri})")
    return runs


def _value(run, key: str) -> float | None:
    value = run.data.metrics.get(key)
    return None if value is None or not math.isfinite(value) else float(value)


def _fmt(value) -> str:
    return "—" if value is None else f"{value:.3f}"


def report(runs, metrics: list[str], out: Path, sweep_id: str, experiment: str, uri: str) -> str:
    """Markdown tables (rows: attention kinds and any extra axes; columns: d_model) and a plot."""

    def coord(run, name):
        return run.data.tags.get(f"{TAG}.{name}") or run.data.params.get(f"model.model.{name}", "?")

    widths = sorted({coord(r, "d_model") for r in runs}, key=lambda w: (not w.isdigit(), int(w) if w.isdigit() else 0))
    extra_axes = sorted(
        {k[len(TAG) + 1 :] for r in runs for k in r.data.tags if k.startswith(TAG + ".")} - {"attention", "d_model"}
    )

    def row_key(run):
        return (coord(run, "attention"), *(f"{a}={run.data.tags.get(f'{TAG}.{a}', '?')}" for a in extra_axes))

    rows = sorted({row_key(r) for r in runs})
    latest = {}
    for r in sorted(runs, key=lambda r: r.info.start_time or 0):  # a re-run of a point replaces the earlier one
        latest[(row_key(r), coord(r, "d_model"))] = r
    lines = [
        f"# Sweep `{sweep_id}`",
        "",
        f"MLflow experiment `{experiment}` at `{uri}`; final value of each metric per run "
        f"({len(latest)} runs). Rebuild: `python experiments/sweep.py --report-only --sweep-id {sweep_id} "
        f"--experiment {experiment} --metric {' '.join(metrics)}`.",
        "",
    ]
    for metric in metrics:
        lines += [f"## {metric}", "", "| attention | " + " | ".join(f"d_model {w}" for w in widths) + " |"]
        lines.append("|---|" + "---|" * len(widths))
        for rk in rows:
            cells = [_fmt(_value(latest[(rk, w)], metric)) if (rk, w) in latest else "—" for w in widths]
            lines.append(f"| {' '.join(rk)} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Runs", "", "| attention | d_model | status | minutes | params (non-emb.) | run id |"]
    lines.append("|---|---|---|---|---|---|")
    for (rk, w), r in sorted(latest.items()):
        minutes = (r.info.end_time - r.info.start_time) / 60000 if r.info.end_time and r.info.start_time else None
        params = r.data.params.get("model.params_non_embedding", "?")
        lines.append(f"| {' '.join(rk)} | {w} | {r.info.status} | {_fmt(minutes)} | {params} | `{r.info.run_id}` |")
    text = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.md").write_text(text)
    _plot(latest, rows, widths, metrics, out / "sweep.png", sweep_id)
    return text


def _plot(latest, rows, widths, metrics, path: Path, sweep_id: str) -> None:
    try:
        import matplotlib
    except ImportError:  # the table is the result; the plot is a convenience
        print(f"sweep: matplotlib is not installed, so {path} is not drawn", file=sys.stderr)
        return

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.5 * len(metrics), 3.6), layout="constrained")
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    numeric = all(w.isdigit() for w in widths)
    for ax, metric in zip(axes, metrics):
        for rk in rows:
            xs, ys = [], []
            for i, w in enumerate(widths):
                value = _value(latest[(rk, w)], metric) if (rk, w) in latest else None
                if value is not None:
                    xs.append(int(w) if numeric else i)
                    ys.append(value)
            if xs:
                ax.plot(xs, ys, marker="o", label=" ".join(rk))
        if numeric and len(widths) > 1:
            ax.set_xscale("log", base=2)
        ax.set_xticks([int(w) for w in widths] if numeric else range(len(widths)), widths)
        ax.set_xlabel("d_model")
        ax.set_title(metric)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.suptitle(f"sweep {sweep_id}")
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    args = parse_args(argv)
    uri = args.tracking_uri or default_tracking_uri()
    if args.experiment is None:
        args.experiment = (Path(args.config).stem if args.config else "parallax") + "-sweep"
    args.sweep_id = args.sweep_id or time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
    out = Path(args.out)
    failed = 0
    parent = None
    if not args.report_only:
        parent = None if args.dry_run else start_parent(args, uri)
        try:
            status = run_all(args, uri, out, parent)
        except BaseException:
            if parent:
                end_parent(uri, parent, 1, out)
            raise
        failed = sum(code != 0 for code in status.values())
        if args.dry_run:
            return 0
    try:
        runs = collect(uri, args.experiment, args.sweep_id)
        text = report(runs, args.metric, out, args.sweep_id, args.experiment, uri)
    finally:
        if parent:
            end_parent(uri, parent, failed, out)
    print(text)
    print(f"wrote {out / 'sweep.md'}" + (f" and {out / 'sweep.png'}" if (out / "sweep.png").exists() else ""))
    if failed:
        print(f"sweep: {failed} run(s) failed; see {out / 'logs'}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
