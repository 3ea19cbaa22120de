"""`python -m parallax_lightning eval --ckpt_path CKPT --tasks T1 T2 [--limit N] [--include_path DIR]`.

Runs lm-evaluation-harness tasks (``lm_eval.simple_evaluate``) on a checkpoint through
:class:`parallax_lightning.lm_eval_adapter.ParallaxLM` and logs every numeric task metric into the MLflow run
that trained the checkpoint (its id travels in the checkpoint) as ``eval/<task>/<metric>`` at the
checkpoint's step, with `MlflowClient.log_batch`: the run's status is not touched (a FINISHED run stays
FINISHED), with a tag `parallax.eval.<task>.samples` saying how many documents each task used. The results also go to stdout as a table and, with --output, to a JSON file.

Everything that can be checked is checked before the evaluation starts: the checkpoint, the tokenizer, the
MLflow run, the task names.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

_KEY_CHARS = re.compile(r"[^\w\-./ ]")
TAG_PREFIX = "parallax."  # as tracking.TAG_PREFIX (not imported: that module imports lightning)


def metric_key(task: str, name: str) -> str:
    """'acc,none' of task 'piqa' -> 'eval/piqa/acc'; another filter than 'none' becomes a suffix:
    'exact_match,strict-match' -> 'eval/gsm8k/exact_match/strict-match'. Characters MLflow refuses become '_'."""
    metric, _, filt = name.partition(",")
    key = f"eval/{task}/{metric}" + (f"/{filt}" if filt and filt != "none" else "")
    return _KEY_CHARS.sub("_", key)


def task_metrics(results: Mapping[str, Any]) -> dict[str, float]:
    """Every finite numeric metric of lm-eval's results (tasks and groups) under its MLflow key."""
    out: dict[str, float] = {}
    for section in ("results", "groups"):
        for task, metrics in (results.get(section) or {}).items():
            if not isinstance(metrics, Mapping):
                continue
            for name, value in metrics.items():
                if name == "alias" or isinstance(value, bool) or not isinstance(value, (int, float)):
                    continue
                if math.isfinite(value):
                    out[metric_key(task, name)] = float(value)
    return out


def sample_tags(results: Mapping[str, Any]) -> dict[str, str]:
    """'parallax.eval.<task>.samples' -> '3 of 4': how many documents each metric stands on (--limit cuts them)."""
    tags = {}
    for task, counts in (results.get("n-samples") or {}).items():
        if isinstance(counts, Mapping) and "effective" in counts:
            key = _KEY_CHARS.sub("_", f"{TAG_PREFIX}eval.{task}.samples")
            tags[key] = f"{counts['effective']} of {counts.get('original', '?')}"
    return tags


def log_to_run(
    tracking_uri: str, run_id: str, metrics: Mapping[str, float], step: int, tags: Mapping[str, str] | None = None
) -> None:
    """Log metrics (and tags) into an existing run without starting, ending or changing its status."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, RunTag

    client = MlflowClient(tracking_uri)
    now = int(time.time() * 1000)
    items = [Metric(key, value, now, step) for key, value in sorted(metrics.items())]
    for start in range(0, len(items), 1000):  # MLflow's limit per batch
        client.log_batch(run_id, metrics=items[start : start + 1000])
    if tags:
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in sorted(tags.items())])


def _check_run(tracking_uri: str, run_id: str):
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        return MlflowClient(tracking_uri).get_run(run_id)
    except MlflowException as err:
        raise ValueError(
            f"the checkpoint's MLflow run {run_id} is not in {tracking_uri} ({err.message}); pass --tracking_uri "
            "where the run lives, or --no_mlflow to only print the results"
        ) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m parallax_lightning eval",
        description="Evaluate a checkpoint with lm-evaluation-harness tasks and log the metrics into its "
        "training run in MLflow (eval/<task>/<metric>). Needs the [eval] extra (pip install 'parallax-lab[eval]').",
    )
    parser.add_argument("--ckpt_path", required=True, help="a checkpoint written by `fit`, or a folder from `export`")
    parser.add_argument("--tasks", nargs="+", required=True, help="lm-eval task names, e.g. lambada_openai wikitext")
    parser.add_argument("--limit", type=float, default=None, help="examples per task (N >= 1, or a fraction < 1)")
    parser.add_argument("--num_fewshot", type=int, default=None)
    parser.add_argument("--include_path", default=None, help="a folder of task YAML files (local tasks)")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--max_length", type=int, default=None, help="longest scored window (default max_seq_len)")
    parser.add_argument("--tokenizer", default=None, help="'byte' or a tokenizer.json (default: the model's)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--tracking_uri", default=None, help="the MLflow store of the run (default: the checkpoint's)")
    parser.add_argument("--run_id", default=None, help="log into this run instead of the checkpoint's")
    parser.add_argument("--no_mlflow", action="store_true", help="print (and --output) the results only")
    parser.add_argument("--output", default=None, help="write lm-eval's results (without samples) to this JSON file")
    return parser


def evaluate(opts: argparse.Namespace) -> dict[str, Any]:
    """Check everything, run the tasks, log the metrics; returns {"results": ..., "metrics": ..., "run_id": ...}."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ValueError(
            "eval needs lm-evaluation-harness: pip install 'parallax-lab[eval]' (or pip install lm-eval)"
        ) from None
    import torch

    from .export import load_model
    from .generate_cli import resolve_dtype
    from .lm_eval_adapter import ParallaxLM

    if opts.limit is not None and not opts.limit > 0:
        raise ValueError(f"--limit must be positive, got {opts.limit}")
    if opts.include_path is not None and not Path(opts.include_path).is_dir():
        raise ValueError(f"--include_path {opts.include_path!r} is not a folder")
    device = torch.device(opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    loaded = load_model(
        opts.ckpt_path, tokenizer=opts.tokenizer, device=device, dtype=resolve_dtype(opts.dtype, device)
    )

    run_id, tracking_uri = None, None
    if not opts.no_mlflow:
        info = loaded.run_info or {}
        run_id = opts.run_id or info.get("run_id")
        tracking_uri = opts.tracking_uri or info.get("tracking_uri")
        if run_id is None:
            raise ValueError(
                f"{opts.ckpt_path!r} records no MLflow run: pass --run_id (and --tracking_uri), or --no_mlflow"
            )
        if tracking_uri is None:
            from .tracking import default_tracking_uri

            tracking_uri = default_tracking_uri()
        _check_run(tracking_uri, run_id)

    manager = TaskManager(include_path=opts.include_path)
    known = set(manager.all_tasks)
    unknown = [t for t in opts.tasks if t not in known]
    if unknown:
        raise ValueError(
            f"unknown lm-eval task(s) {unknown}"
            + (f" (local tasks come from --include_path {opts.include_path})" if opts.include_path else "")
        )
    lm = ParallaxLM.from_model(loaded.model, loaded.tokenizer, batch_size=opts.batch_size, max_length=opts.max_length)
    limit = None if opts.limit is None else (int(opts.limit) if opts.limit >= 1 else opts.limit)
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(opts.tasks),
        num_fewshot=opts.num_fewshot,
        limit=limit,
        task_manager=manager,
        log_samples=False,
        random_seed=opts.seed,
        numpy_random_seed=opts.seed,
        torch_random_seed=opts.seed,
        fewshot_random_seed=opts.seed,
    )
    metrics = task_metrics(results or {})
    if run_id is not None:
        log_to_run(tracking_uri, run_id, metrics, step=loaded.global_step or 0, tags=sample_tags(results or {}))
    if opts.output:
        Path(opts.output).write_text(json.dumps(_plain(results), indent=2, default=str) + "\n")
    return {"results": results, "metrics": metrics, "run_id": run_id, "tracking_uri": tracking_uri}


def _plain(results: Mapping[str, Any] | None) -> dict[str, Any]:
    return {k: v for k, v in (results or {}).items() if k in ("results", "groups", "versions", "n-shot", "config")}


def eval_main(args: list[str]) -> int:
    from .export import CheckpointError

    opts = build_parser().parse_args(args)
    try:
        out = evaluate(opts)
    except (CheckpointError, FileNotFoundError, ValueError) as err:
        print(f"parallax_lightning eval: {err}", file=sys.stderr)
        return 2
    for key, value in sorted(out["metrics"].items()):
        print(f"{key}\t{value:.6g}")
    if out["run_id"]:
        print(f"logged {len(out['metrics'])} metrics into MLflow run {out['run_id']} ({out['tracking_uri']})")
    return 0
