"""Export the paper campaign's MLflow runs to one small JSON per run, the records the repository keeps.

    python experiments/paper/export_runs.py --store sqlite:///OUT/stores/X/mlflow.db --out experiments/paper/runs/
    python experiments/paper/export_runs.py --stores-dir OUT/stores --out experiments/paper/runs/

A run is exported when it carries the `paper.run` tag that run_grid.py sets (its name, `<cell>_lr<lr>_s<seed>`,
becomes the file name). The JSON holds what report.py needs and what a reader checks a number against: the
resolved config (the run's config.yaml artifact when the artifacts are reachable, else null) and every MLflow
param, the final and per-step validation loss, training loss, the diagnostics at step 0 and at the end (and their
per-step means over layers), tokens, throughput, wall time, the git commit, and a status:

  ok          reached max_steps, exited 0, and has a validation loss at its last step
  incomplete  stopped before max_steps or without a last validation (killed, crashed, cut)
  failed      the process exited non-zero or MLflow marked the run FAILED

An existing JSON is replaced only by a record of the same run that is at least as far along (a later export of
a finished run never loses to a partial one), so re-exporting a store is safe.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

SCHEMA = 1
LIGHTNING_LOGGED = ("train/", "val/")  # logged by Lightning at (optimizer steps done − 1)
TRAINING_KEYS = ("train/", "val/", "perf/", "diag/")
TRAIN_LOSS_POINTS = 64


def _int(value, default=None):
    try:
        return int(float(value))
    except (TypeError, ValueError):
        return default


def _float(value, default=None):
    try:
        out = float(value)
    except (TypeError, ValueError):
        return default
    return out if math.isfinite(out) else default


def _history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _thin(points: list, n: int) -> list:
    if len(points) <= n:
        return points
    stride = len(points) / n
    picked = [points[int(i * stride)] for i in range(n)]
    return picked if picked[-1] == points[-1] else [*picked, points[-1]]


def diagnostics_summary(diag: dict[str, list[tuple[int, float]]]) -> dict:
    """{"step0": {stat: [per layer]}, "final": {...}, "final_step": s, "mean_history": {stat: [[step, mean]]}}.

    step0 is the measurement at step 0 (before any update), final the last step every layer was measured at."""
    by_stat: dict[str, dict[int, dict[int, float]]] = {}
    for key, history in diag.items():
        layer, _, stat = key.partition("/")
        index = _int(layer.removeprefix("layer"))
        if index is None:
            continue
        for step, value in history:
            by_stat.setdefault(stat, {}).setdefault(step, {})[index] = value
    out: dict = {"step0": {}, "final": {}, "final_step": None, "mean_history": {}}
    for stat, steps in sorted(by_stat.items()):
        n_layers = max(len(v) for v in steps.values())
        full = {s: [v[i] for i in sorted(v)] for s, v in steps.items() if len(v) == n_layers}
        if not full:
            continue
        if 0 in full:
            out["step0"][stat] = full[0]
        last = max(full)
        out["final"][stat] = full[last]
        out["final_step"] = max(out["final_step"] or 0, last)
        out["mean_history"][stat] = [[s, sum(v) / len(v)] for s, v in sorted(full.items())]
    return out


def run_record(client, run, artifacts_ok: bool = True) -> dict:
    """The JSON record of one MLflow run."""
    logged, tags, rid = run.data.params, run.data.tags, run.info.run_id
    config = None
    if artifacts_ok:
        try:
            import tempfile

            import yaml

            with tempfile.TemporaryDirectory() as tmp:
                config = yaml.safe_load(Path(client.download_artifacts(rid, "config.yaml", tmp)).read_text())
        except Exception:  # artifacts stayed on the GPU machine's scratch: the params still hold the config
            config = None
    # Runs log as parameters only the keys that differ from the defaults; config.yaml holds every key.
    from parallax_lightning.tracking import flatten_config

    params = {**flatten_config(config or {}), **logged}
    histories = {key: _history(client, rid, key) for key in run.data.metrics}
    for key in list(histories):  # key every history by optimizer steps done
        if key.startswith(LIGHTNING_LOGGED):
            histories[key] = [(s + 1, v) for s, v in histories[key]]
    steps = [s for k, h in histories.items() if k.startswith(TRAINING_KEYS) and not k.startswith("diag/") for s, _ in h]
    final_step = max(steps, default=0)
    max_steps = _int(params.get("trainer.max_steps"))
    batch, seq = _int(params.get("data.batch_size"), 0), _int(params.get("data.seq_len"), 0)
    devices = _int(params.get("trainer.devices"), 1) or 1
    val = histories.get("val/loss", [])
    exit_code = _int(tags.get("paper.exit_code"))
    if run.info.status == "FAILED" or (exit_code not in (None, 0)):
        status = "failed"
    elif max_steps is not None and final_step >= max_steps and val and val[-1][0] == max_steps:
        status = "ok"
    else:
        status = "incomplete"
    tps = [v for _, v in histories.get("perf/tokens_per_s", [])]
    mfu = [v for _, v in histories.get("perf/mfu", [])]
    diag = {k.removeprefix("diag/"): h for k, h in histories.items() if k.startswith("diag/")}
    return {
        "schema": SCHEMA,
        "run_name": tags.get("paper.run", run.info.run_name),
        "cell": tags.get("paper.cell"),
        "attention": params.get("model.model.attention"),
        "optimizer": params.get("model.optimizer.name"),
        "route": params.get("model.optimizer.route"),
        "lr": _float(tags.get("paper.lr")),
        "muon_lr": _float(params.get("model.optimizer.lr")),
        "adamw_lr": _float(params.get("model.optimizer.adamw_lr")),
        "weight_decay": _float(params.get("model.optimizer.weight_decay")),
        "adamw_weight_decay": _float(params.get("model.optimizer.adamw_weight_decay")),
        "seed": _int(tags.get("paper.seed")),
        "seed_everything": _int(params.get("seed_everything")),
        "data_seed": _int(params.get("data.seed")),
        "status": status,
        "mlflow_status": run.info.status,
        "exit_code": exit_code,
        "max_steps": max_steps,
        "final_step": final_step,
        "tokens_per_step": batch * seq * devices,
        "tokens": final_step * batch * seq * devices,
        "params_non_embedding": _int(params.get("model.params_non_embedding")),
        "final_val_loss": val[-1][1] if val else None,
        "final_val_step": val[-1][0] if val else None,
        "val_loss": [[s, v] for s, v in val],
        "train_loss": [[s, v] for s, v in _thin(histories.get("train/loss", []), TRAIN_LOSS_POINTS)],
        "tokens_per_s_median": statistics.median(tps) if tps else None,
        "mfu_median": statistics.median(mfu) if mfu else None,
        "wall_s": _float(tags.get("paper.wall_s")),
        "start_time_ms": run.info.start_time,
        "end_time_ms": run.info.end_time,
        "diagnostics": diagnostics_summary(diag),
        "git_commit": tags.get("parallax.git_commit"),
        "git_dirty": tags.get("parallax.git_dirty"),
        "device": tags.get("parallax.gpu"),
        "torch": tags.get("parallax.torch_version"),
        "triton": tags.get("parallax.triton_version"),
        "tags": {k: v for k, v in sorted(tags.items()) if k.startswith(("paper.", "parallax.", "synthetic"))},
        "params": dict(sorted(logged.items())),
        "config": config,
        "mlflow_run_id": rid,
    }


_PROGRESS = {"failed": 0, "incomplete": 1, "ok": 2}


def write_record(record: dict, out: Path) -> Path | None:
    """Write out/<run_name>.json unless a record there is further along; returns the path written or None."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{record['run_name']}.json"
    if path.exists():
        old = json.loads(path.read_text())
        if (
            old.get("mlflow_run_id") != record["mlflow_run_id"]
            and _PROGRESS.get(old.get("status"), 0) > _PROGRESS[record["status"]]
        ):
            return None
        if old.get("mlflow_run_id") == record["mlflow_run_id"] and (old.get("final_step") or 0) > record["final_step"]:
            return None
    path.write_text(json.dumps(record, indent=1, sort_keys=False) + "\n")
    return path


def export_store(tracking_uri: str, out: Path, experiment: str | None = None) -> list[Path]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    experiments = client.search_experiments()
    if experiment is not None:
        experiments = [e for e in experiments if e.name == experiment]
    written = []
    for exp in experiments:
        for run in client.search_runs([exp.experiment_id], max_results=10_000):
            if "paper.run" not in run.data.tags:
                continue
            path = write_record(run_record(client, run), out)
            if path is not None:
                written.append(path)
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", action="append", default=[], help="an MLflow tracking URI (sqlite:///...); repeatable")
    p.add_argument("--stores-dir", default=None, help="a folder of run_grid.py's per-run stores (*/mlflow.db)")
    p.add_argument("--out", required=True, help="where the JSONs go (experiments/paper/runs/)")
    p.add_argument("--experiment", default=None, help="only this MLflow experiment")
    args = p.parse_args(argv)
    stores = list(args.store)
    if args.stores_dir:
        found = sorted(Path(args.stores_dir).glob("*/mlflow.db"))
        if not found:
            p.error(f"--stores-dir {args.stores_dir}: no */mlflow.db there")
        stores += [f"sqlite:///{db.resolve()}" for db in found]
    if not stores:
        p.error("give --store URI (repeatable) or --stores-dir DIR")
    total = 0
    for uri in stores:
        written = export_store(uri, Path(args.out), args.experiment)
        total += len(written)
        for path in written:
            status = json.loads(path.read_text())["status"]
            print(f"export_runs: {path} ({status})")
    print(f"export_runs: {total} record(s) from {len(stores)} store(s) -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
