"""Train a list of the paper campaign's runs, each a complete schedule, each exported to a JSON record.

Called by experiments/paper/run_grid.sh (which unpacks the data first); usable on its own:

    python experiments/paper/run_grid.py --data /tmp/paper_shards --out /tmp/campaign \\
        --runs softmax-muon:0.02:0 parallax-muon:0.02:0 --concurrent 2 --deadline-s 520
    python experiments/paper/run_grid.py ... --runs $(python experiments/paper/report.py --next-runs)
    python experiments/paper/run_grid.py ... --tiny --runs parallax-muon:0.02:0                # CPU dry run

A run is `cell:lr:seed[:muon_lr]` (PROTOCOL.md §5): the cell names its config files (CELLS), lr is the learning
rate of the cell's optimizer (Muon's `lr` for Muon cells, `adamw_lr` for AdamW cells), seed the model seed index
(`seed_everything` = --seed-base + seed; the data order is grid.yaml's fixed data seed), muon_lr the Muon lr of
W_R in swap_wr_muon. Weight decay follows from the protocol's effective decay rate κ (--decay-rate): every decayed
group gets λ = κ / its lr. The run is named `<cell>_lr<lr>_s<seed>` (plus `_mlr<muon_lr>`).

Every run is `python -m parallax_lightning fit` over grid.yaml + the cell's files (+ tiny.yaml) + a generated
file (data, its own MLflow store <out>/stores/<run>/mlflow.db, run name, tags, optimizer settings, seed), with no
max_time: the schedule always completes (grid.yaml's max_steps). Runs go --concurrent at a time, one process
each, each logging to <out>/logs/<run>.log. A run is started only if its estimated wall time (--est-run-s ×
--concurrent, no concurrency gain assumed) fits before --deadline-s; a started run is never stopped. A finished
run is tagged (exit code, wall time) and exported to <out>/runs/<run>.json (export_runs.py), and runs already
exported complete (status ok) under --skip-done folders are skipped, so one command resumes a campaign.

Leaves in --out: runs/*.json (the records to commit), stores/<run>/mlflow.db, logs/<run>.log,
grid_status.tsv (one line per run), artifacts.tar.gz (the runs' MLflow artifacts: configs and figures).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import yaml
from omegaconf import OmegaConf

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent

# cell -> its config files after grid.yaml; the optimizer its files select (whose lr the run spec sets)
CELLS = {
    "softmax-muon": (("softmax.yaml", "muon.yaml"), "muon"),
    "parallax-muon": (("parallax.yaml", "muon.yaml"), "muon"),
    "softmax-adamw": (("softmax.yaml", "adamw.yaml"), "adamw"),
    "parallax-adamw": (("parallax.yaml", "adamw.yaml"), "adamw"),
    "softmax_pm-muon": (("softmax_param_matched.yaml", "muon.yaml"), "muon"),
    "parallax_cm-muon": (("parallax_compute_matched.yaml", "muon.yaml"), "muon"),
    "swap_wr_adamw": (("swap_wr_adamw.yaml",), "muon"),
    "swap_wr_muon": (("swap_wr_muon.yaml",), "adamw"),
}
# The controls' preset names (for --tiny, whose shapes come from the tiny preset rather than the files).
CONTROL_PRESETS = {
    "softmax_param_matched.yaml": "softmax-param-matched",
    "parallax_compute_matched.yaml": "parallax-compute-matched",
}
DEFAULT_LR = {"muon": 0.02, "adamw": 2e-3}
STATUS_HEADER = "run\tcell\tlr\tseed\tstate\twall_s\tnote\n"


@dataclasses.dataclass(frozen=True)
class RunSpec:
    cell: str
    lr: float
    seed: int
    muon_lr: float | None = None

    @property
    def name(self) -> str:
        return f"{self.cell}_lr{self.lr:g}_s{self.seed}" + (f"_mlr{self.muon_lr:g}" if self.muon_lr else "")

    @property
    def optimizer(self) -> str:
        return CELLS[self.cell][1]


def parse_spec(text: str) -> RunSpec:
    """'cell:lr:seed[:muon_lr]' (a bare cell: its optimizer's default lr, seed 0)."""
    parts = text.split(":")
    cell = parts[0]
    if cell not in CELLS:
        raise ValueError(f"run {text!r}: unknown cell {cell!r}; known: {', '.join(CELLS)}")
    if len(parts) > 4 or len(parts) == 2:
        raise ValueError(f"run {text!r}: expected cell:lr:seed[:muon_lr]")
    try:
        lr = float(parts[1]) if len(parts) > 1 else DEFAULT_LR[CELLS[cell][1]]
        seed = int(parts[2]) if len(parts) > 2 else 0
        muon_lr = float(parts[3]) if len(parts) > 3 else None
    except ValueError as err:
        raise ValueError(f"run {text!r}: lr and muon_lr must be numbers, seed an integer ({err})") from err
    if not lr > 0 or seed < 0 or (muon_lr is not None and not muon_lr > 0):
        raise ValueError(f"run {text!r}: lr and muon_lr must be positive, seed >= 0")
    if muon_lr is not None and CELLS[cell][1] != "adamw":
        raise ValueError(f"run {text!r}: muon_lr is for AdamW cells that route a parameter to Muon (swap_wr_muon)")
    return RunSpec(cell, lr, seed, muon_lr)


def optimizer_overrides(spec: RunSpec, args) -> dict:
    """lr and the weight decays λ = κ / lr of every group (PROTOCOL.md §4)."""
    kappa = args.decay_rate
    if spec.optimizer == "muon":
        adamw_lr = args.muon_adamw_lr
        return {
            "lr": spec.lr,
            "weight_decay": kappa / spec.lr,
            "adamw_lr": adamw_lr,
            "adamw_weight_decay": kappa / adamw_lr,
        }
    muon_lr = spec.muon_lr or DEFAULT_LR["muon"]
    return {"adamw_lr": spec.lr, "adamw_weight_decay": kappa / spec.lr, "lr": muon_lr, "weight_decay": kappa / muon_lr}


def tiny_control_model(control_file: str) -> dict:
    """The tiny preset's version of a control (the files hold the small preset's shapes)."""
    from parallax_lightning.model_sizes import preset

    config = preset(f"tiny-{CONTROL_PRESETS[control_file]}")
    keys = ("attention", "n_heads", "n_kv_heads", "head_dim", "mlp_hidden")
    return {k: dataclasses.asdict(config)[k] for k in keys}


def run_overrides(args, spec: RunSpec) -> dict:
    data = Path(args.data).resolve()
    store = Path(args.out).resolve() / "stores" / spec.name
    logger_args = {
        "tracking_uri": f"sqlite:///{store / 'mlflow.db'}",
        "run_name": spec.name,
        # Artifacts stay out of --out's stores; run_grid packs them into one archive.
        "artifact_location": str(Path(args.scratch).resolve() / "mlruns" / spec.name),
        "tags": {
            "paper.run": spec.name,
            "paper.cell": spec.cell,
            "paper.lr": repr(spec.lr),
            "paper.seed": str(spec.seed),
            "paper.decay_rate": repr(args.decay_rate),
            "paper.tiny": str(args.tiny).lower(),
            "paper.concurrent": str(args.concurrent),
        },
    }
    if spec.muon_lr:
        logger_args["tags"]["paper.muon_lr"] = repr(spec.muon_lr)
    if args.experiment:
        logger_args["experiment_name"] = args.experiment
    overrides: dict = {
        "seed_everything": args.seed_base + spec.seed,
        "model": {"init_args": {"optimizer": optimizer_overrides(spec, args)}},
        "trainer": {
            "default_root_dir": str(Path(args.scratch).resolve() / "runs" / spec.name),
            "max_time": None,  # the schedule always completes
            "logger": {"init_args": logger_args},
        },
        "data": {"init_args": {"train_files": str(data / "*_train_*.bin"), "val_files": str(data / "*_val_*.bin")}},
    }
    if args.max_steps:
        overrides["trainer"]["max_steps"] = args.max_steps
    control = next((f for f in CELLS[spec.cell][0] if f in CONTROL_PRESETS), None)
    if args.tiny and control is not None:
        overrides["model"]["init_args"]["model"] = tiny_control_model(control)
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


def config_files(args, spec: RunSpec) -> list[Path]:
    return [*base_files(args), *(HERE / f for f in CELLS[spec.cell][0])]


def shared_config(args) -> dict:
    """What every run sees of the base files, --experiment and --set, merged in the order the CLI applies them
    (nested sections merge, other values replace; `${...}` stays as written)."""
    layers = [yaml.safe_load(path.read_text()) or {} for path in base_files(args)]
    if args.experiment:
        layers.append({"trainer": {"logger": {"init_args": {"experiment_name": args.experiment}}}})
    merged = OmegaConf.to_container(OmegaConf.merge(*layers))
    for item in args.set:
        _set_dotted(merged, item)
    return merged


def _data_settings(args) -> dict:
    """The runs' data.init_args (batch size and sequence length)."""
    return shared_config(args).get("data", {}).get("init_args", {})


def experiment_name(args) -> str:
    """The MLflow experiment the runs go to."""
    return shared_config(args).get("trainer", {}).get("logger", {}).get("init_args", {}).get("experiment_name")


def _export_module():
    spec = importlib.util.spec_from_file_location("paper_export_runs", HERE / "export_runs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("paper_export_runs", module)
    spec.loader.exec_module(module)
    return module


def already_done(spec: RunSpec, folders: list[Path]) -> Path | None:
    for folder in folders:
        path = folder / f"{spec.name}.json"
        if path.is_file():
            try:
                if json.loads(path.read_text()).get("status") == "ok":
                    return path
            except ValueError:
                continue
    return None


def finish_run(args, spec: RunSpec, rc: int, wall: float) -> tuple[str, str]:
    """Tag the run's store with its outcome and export its record; returns (state, note)."""
    store = Path(args.out).resolve() / "stores" / spec.name
    uri = f"sqlite:///{store / 'mlflow.db'}"
    note = ""
    try:
        from mlflow import MlflowClient

        client = MlflowClient(uri)
        runs = [
            r
            for e in client.search_experiments()
            for r in client.search_runs([e.experiment_id], f"tags.`paper.run` = '{spec.name}'", max_results=5)
        ]
        for run in runs:
            client.set_tag(run.info.run_id, "paper.exit_code", str(rc))
            client.set_tag(run.info.run_id, "paper.wall_s", f"{wall:.1f}")
        if not runs:
            note = "no MLflow run found"
        written = _export_module().export_store(uri, Path(args.out) / "runs")
        status = json.loads(written[0].read_text())["status"] if written else "not exported"
    except Exception as err:  # the store's trouble must not cost the runs still to come
        status, note = "not exported", f"{type(err).__name__}: {err}"
    spool = store / "mlflow_spool"
    if spool.is_dir() and any(p.is_file() and p.stat().st_size for p in spool.rglob("*")):
        note = (note + "; " if note else "") + f"records left in {spool} (the store lacks them)"
    state = ("ok" if rc == 0 else f"exit {rc}") + f", record {status}"
    return state, note


def write_status(out: Path, row) -> None:
    path = out / "grid_status.tsv"
    with open(path, "a") as f:
        if f.tell() == 0:
            f.write(STATUS_HEADER)
        f.write("\t".join(row) + "\n")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", required=True, help="folder of the token shards (with meta.json and tokenizer.json)")
    p.add_argument("--out", required=True, help="folder for runs/, stores/, logs/, grid_status.tsv, artifacts")
    p.add_argument("--scratch", default=None, help="checkpoint/artifact scratch folder (default: <out>_scratch)")
    p.add_argument("--runs", nargs="+", required=True, help="cell:lr:seed[:muon_lr] ...; cells: " + ", ".join(CELLS))
    p.add_argument("--tiny", action="store_true", help="CPU dry run: tiny model, a few steps")
    p.add_argument("--experiment", default=None, help="MLflow experiment (default: grid.yaml's, paper-grid)")
    p.add_argument("--concurrent", type=int, default=1, help="runs at a time on the one GPU (one process each)")
    p.add_argument("--deadline-s", type=float, default=None, help="start no run that would end after this")
    p.add_argument("--est-run-s", type=float, default=110.0, help="wall time of one run running alone")
    p.add_argument("--decay-rate", type=float, default=1e-3, help="κ = lr·λ of every decayed group")
    p.add_argument("--muon-adamw-lr", type=float, default=2e-3, help="AdamW lr of embeddings/norms under Muon")
    p.add_argument("--seed-base", type=int, default=1234, help="seed_everything = this + the run's seed")
    p.add_argument(
        "--skip-done",
        action="append",
        default=None,
        help="skip runs with a complete record here (default: experiments/paper/runs and <out>/runs)",
    )
    p.add_argument("--max-steps", type=int, default=None, help="override trainer.max_steps (dry runs only)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config key of every run, e.g. trainer.val_check_interval=50 (repeatable)",
    )
    return p


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    try:
        specs = [parse_spec(s) for s in args.runs]
    except ValueError as err:
        p.error(str(err))
    if args.concurrent < 1:
        p.error(f"--concurrent must be >= 1, got {args.concurrent}")
    if not args.decay_rate >= 0:
        p.error(f"--decay-rate must be >= 0, got {args.decay_rate}")
    if not (Path(args.data) / "meta.json").is_file():
        p.error(f"--data {args.data}: no meta.json there (expected the folder prepare_shards.py wrote)")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        p.error(f"--runs names a run twice: {sorted(n for n in names if names.count(n) > 1)}")
    out = Path(args.out)
    for sub in ("runs", "stores", "logs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    args.scratch = args.scratch or str(out.resolve().parent / f"{out.resolve().name}_scratch")
    Path(args.scratch).mkdir(parents=True, exist_ok=True)
    skip = [Path(d) for d in (args.skip_done if args.skip_done is not None else [HERE / "runs", out / "runs"])]

    queue = []
    for spec in specs:
        done = already_done(spec, skip)
        if done is not None:
            print(f"=== {spec.name}: already complete ({done}); skipped", flush=True)
        else:
            queue.append(spec)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    print(f"paper runs: {len(queue)} to train, {args.concurrent} at a time, out {out}", flush=True)
    running: list[tuple[RunSpec, subprocess.Popen, float, object]] = []
    results = []
    while queue or running:
        while queue and len(running) < args.concurrent:
            elapsed = time.perf_counter() - t0
            needed = args.est_run_s * args.concurrent
            if args.deadline_s is not None and elapsed + needed > args.deadline_s:
                for spec in queue:
                    msg = f"not started: {args.deadline_s - elapsed:.0f} s to the deadline, a run needs ~{needed:.0f}"
                    print(f"=== {spec.name}: {msg}", flush=True)
                    write_status(out, (spec.name, spec.cell, f"{spec.lr:g}", str(spec.seed), "not started", "", msg))
                    results.append("not started")
                queue = []
                break
            spec = queue.pop(0)
            override = Path(args.scratch) / f"{spec.name}.override.yaml"
            override.write_text(yaml.safe_dump(run_overrides(args, spec)))
            cmd = [sys.executable, "-m", "parallax_lightning", "fit"]
            for f in [*config_files(args, spec), override]:
                cmd += ["--config", str(f)]
            log = open(out / "logs" / f"{spec.name}.log", "w")  # noqa: SIM115 (closed when the run ends)
            log.write(" ".join(cmd) + "\n")
            log.flush()
            proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
            print(f"=== {spec.name}: started at {time.perf_counter() - t0:.0f} s", flush=True)
            running.append((spec, proc, time.perf_counter(), log))
        time.sleep(0.5 if args.tiny else 2.0)
        for item in list(running):
            spec, proc, start, log = item
            rc = proc.poll()
            if rc is None:
                continue
            running.remove(item)
            log.close()
            wall = time.perf_counter() - start
            state, note = finish_run(args, spec, rc, wall)
            line = f"=== {spec.name}: {state} in {wall:.1f} s" + (f" ({note})" if note else "")
            print(line, flush=True)
            if rc != 0:
                tail = (out / "logs" / f"{spec.name}.log").read_text(errors="replace").splitlines()[-15:]
                print("\n".join("    " + t for t in tail), flush=True)
            write_status(out, (spec.name, spec.cell, f"{spec.lr:g}", str(spec.seed), state, f"{wall:.1f}", note))
            results.append(state)

    artifacts = Path(args.scratch) / "mlruns"
    if artifacts.is_dir():
        with tarfile.open(out / "artifacts.tar.gz", "w:gz") as tar:
            tar.add(artifacts, arcname="mlruns")
    print(f"paper runs: done in {time.perf_counter() - t0:.0f} s: {len(results)} run(s)", flush=True)
    return 0 if all(r.startswith("ok, record ok") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
