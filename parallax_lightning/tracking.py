"""MLflow tracking: the logger the CLI uses by default, and helpers to record a run completely.

- `ParallaxMLFlowLogger`: Lightning's MLFlowLogger with a default store of `sqlite:///mlflow.db` in the
  working folder (MLflow 3.x refuses the old file store), environment tags (git commit and dirty flag,
  torch / triton / lightning / mlflow versions, GPU), MLflow system metrics when `psutil` is installed,
  parameters that may be re-logged on resume, and continuation of an existing run (`run_id`).
- `checkpoint_run_info` / `run_info_from_checkpoint`: the run id travels inside every checkpoint, so
  resuming from a checkpoint continues the same MLflow run.
- `flatten_config`, `log_params`, `log_text`, `log_figure`: the pieces the CLI and callbacks use.
- The MLflow UI (`python -m parallax_lightning ui`, `start_ui`) lives in tracking_ui.py.

Once a run is open, metrics, artifacts and the final status go through a `TrackingOutbox` (a background
writer with a write-ahead spool): a locked, unreachable or full store delays them but never stops training
or loses them; one warning says so. A run stopped by SIGTERM/SIGINT ends with status KILLED. A resume that
fails before its first step (nothing new logged) leaves the run's earlier status and end time as they were.

One file: the logger and the helpers that record a run share the run's life cycle (open, continue,
finalize); the write path is in tracking_outbox.py and the UI in tracking_ui.py.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only

from .redaction import redact, redact_tree
from .tracking_outbox import TrackingOutbox

DEFAULT_DB = "mlflow.db"
PARAM_VALUE_LIMIT = 6000  # MLflow 3 rejects longer parameter values
TAG_PREFIX = "parallax."


def default_tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI, else an SQLite store `mlflow.db` in the working folder (absolute, so a later
    change of folder does not split one run over two stores)."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{Path.cwd() / DEFAULT_DB}"


def absolute_sqlite(uri: str) -> str:
    """A relative `sqlite:///` store made absolute (a run resumed from another folder finds the same store)."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/") and uri[len(prefix) :] != ":memory:":
        return prefix + str(Path(uri[len(prefix) :]).resolve())
    return uri


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def git_state(path: str | os.PathLike | None = None) -> dict[str, str]:
    """Commit and dirty flag of the repository holding `path` (default: this package). A copy without `.git`
    (a `git archive` snapshot sent to another machine) names its commit in $PARALLAX_GIT_COMMIT; else 'unknown'."""
    where = Path(path) if path is not None else Path(__file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(where), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"git_commit": os.environ.get("PARALLAX_GIT_COMMIT", "").strip() or "unknown", "git_dirty": "unknown"}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"git_commit": commit, "git_dirty": "unknown" if status is None else str(bool(status)).lower()}


def environment_tags() -> dict[str, str]:
    """Tags that say what produced a run: code version, library versions, hardware."""
    tags = {TAG_PREFIX + k: v for k, v in git_state().items()}
    if tags[TAG_PREFIX + "git_commit"] != "unknown":
        tags["mlflow.source.git.commit"] = tags[TAG_PREFIX + "git_commit"]  # shown by the MLflow UI
    tags.update(
        {
            TAG_PREFIX + "torch_version": torch.__version__,
            TAG_PREFIX + "triton_version": _version("triton"),
            TAG_PREFIX + "lightning_version": _version("lightning"),
            TAG_PREFIX + "mlflow_version": _version("mlflow"),
            TAG_PREFIX + "python_version": platform.python_version(),
            TAG_PREFIX + "host": platform.node(),
        }
    )
    if torch.cuda.is_available():
        tags[TAG_PREFIX + "gpu"] = torch.cuda.get_device_name(0)
        tags[TAG_PREFIX + "gpu_count"] = str(torch.cuda.device_count())
    else:
        tags[TAG_PREFIX + "gpu"] = "none"
        tags[TAG_PREFIX + "cpu_count"] = str(os.cpu_count())
    return tags


_PARAM_NAME = re.compile(r"[\w\-. :/]+")


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config → {"a.b.c": "value"}; `init_args` levels are dropped (they only say 'arguments of')."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        if key == "init_args":
            name = prefix.rstrip(".")
            flat.update(flatten_config(value, f"{name}." if name else ""))
            continue
        name = f"{prefix}{key}"
        # A mapping whose keys are data, not names (e.g. optimizer.route's regexes), stays one JSON value:
        # MLflow refuses parameter names with other characters than these.
        if isinstance(value, Mapping) and value and all(_PARAM_NAME.fullmatch(str(k)) for k in value):
            flat.update(flatten_config(value, f"{name}."))
        else:
            text = json.dumps(value) if isinstance(value, (list, tuple, dict)) else str(value)
            flat[name] = text[:PARAM_VALUE_LIMIT]
    return flat


class ParallaxMLFlowLogger(MLFlowLogger):
    """MLFlowLogger with this platform's defaults (see the module docstring).

    Args:
        experiment_name: MLflow experiment (created if missing).
        run_name: None lets the CLI name the run after model, attention and optimizer.
        tracking_uri: None = $MLFLOW_TRACKING_URI or sqlite:///<working folder>/mlflow.db.
        run_id: continue this run (the CLI fills it in from a checkpoint when resuming).
        system_metrics: log MLflow system metrics (CPU, memory, GPU) while the run is active; needs psutil.
        system_metrics_interval: seconds between samples.
        spool_dir: where metrics and artifacts wait while the store is unavailable (a write-ahead log per run,
            replayed when the run is resumed). None = `mlflow_spool/` beside an SQLite store, else in the
            working folder.
        flush_timeout_s: how long the end of training waits for an unavailable store before leaving the
            backlog in the spool.
        retry_s: first wait between attempts while the store fails (doubling up to 30 s).
    """

    def __init__(
        self,
        experiment_name: str = "parallax",
        run_name: str | None = None,
        tracking_uri: str | None = None,
        tags: dict[str, Any] | None = None,
        log_model: bool = False,
        prefix: str = "",
        artifact_location: str | None = None,
        run_id: str | None = None,
        system_metrics: bool = True,
        system_metrics_interval: float = 10.0,
        spool_dir: str | None = None,
        flush_timeout_s: float = 60.0,
        retry_s: float = 1.0,
    ):
        tracking_uri = absolute_sqlite(tracking_uri or default_tracking_uri())
        super().__init__(
            experiment_name=experiment_name,
            run_name=redact(run_name) if run_name else run_name,
            tracking_uri=tracking_uri,
            tags=redact_tree(dict(tags)) if tags else tags,
            log_model=log_model,
            prefix=prefix,
            artifact_location=artifact_location,
            run_id=run_id,
        )
        # The run is created or continued here (`experiment`), through MlflowClient's public methods.
        self._store_uri = tracking_uri
        self._wanted_experiment = experiment_name
        self._wanted_run_name = redact(run_name) if run_name else None
        self._run_tags = redact_tree(dict(tags)) if tags else {}
        self._artifact_root = artifact_location
        self._metric_prefix = prefix
        self._model_logging = log_model
        self._client = None  # the MlflowClient, once the run is open
        self._run = (run_id, None)  # (run id, experiment id): the run id is known before the run opens on resume
        self._checkpoints = None  # the checkpoint callback whose files log_model uploads at the end
        self.system_metrics = system_metrics
        self.system_metrics_interval = system_metrics_interval
        self.resumed = run_id is not None
        self._monitor = None
        self.spool_dir = Path(spool_dir).resolve() if spool_dir else _default_spool_dir(tracking_uri)
        self.flush_timeout_s = flush_timeout_s
        self.retry_s = retry_s
        self._outbox: TrackingOutbox | None = None
        self._step_values: tuple[int | None, dict[str, float]] = (None, {})  # the latest step's logged values
        self._before_resume: tuple[str, int | None, str] | None = None  # (status, end_time, resumes) when resumed
        self._logged_metrics = False
        self.interrupted: str | None = None

    @property
    def tracking_uri(self) -> str:
        return self._store_uri

    @property
    def experiment_name(self) -> str:
        return self._wanted_experiment

    @property
    def started(self) -> bool:
        """Whether the run is open (reading `run_id` or `experiment` opens it)."""
        return self._client is not None

    @property
    def requested_run_id(self) -> str | None:
        """The run this logger continues (given, or set by `continue_run`), without opening it."""
        return self._run[0]

    def continue_run(self, run_id: str) -> None:
        """Log into an existing run instead of creating one (before the run is first used)."""
        if self.started and self._run[0] != run_id:
            raise RuntimeError(f"the logger already writes to run {self._run[0]}; cannot switch to {run_id}")
        self._run = (run_id, self._run[1])
        self.resumed = True

    def set_run_name(self, name: str) -> None:
        if self._wanted_run_name is None and not self.started:
            self._wanted_run_name = redact(name)

    @property
    @rank_zero_experiment
    def experiment(self):
        if self._client is None:
            self._open_run()
        return self._client

    @property
    def run_id(self) -> str | None:
        _ = self.experiment
        return self._run[0]

    @property
    def experiment_id(self) -> str | None:
        _ = self.experiment
        return self._run[1]

    def _open_run(self) -> None:
        """Continue the requested run, or create one in the experiment (created when missing or deleted)."""
        from mlflow.tracking import MlflowClient
        from mlflow.tracking.context.registry import resolve_tags
        from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME

        client = MlflowClient(self._store_uri)
        run_id = self._run[0]
        if run_id is not None:
            experiment_id = client.get_run(run_id).info.experiment_id
        else:
            experiment = client.get_experiment_by_name(self._wanted_experiment)
            if experiment is not None and experiment.lifecycle_stage != "deleted":
                experiment_id = experiment.experiment_id
            else:
                experiment_id = client.create_experiment(self._wanted_experiment, artifact_location=self._artifact_root)
            tags = dict(self._run_tags)
            if self._wanted_run_name is not None:
                tags[MLFLOW_RUN_NAME] = self._wanted_run_name
            run_id = client.create_run(experiment_id, tags=resolve_tags(tags)).info.run_id
        self._run = (run_id, experiment_id)
        self._client = client
        self._on_run_open(client)

    def _on_run_open(self, client) -> None:
        run_id = self._run[0]
        if self.resumed:
            run = client.get_run(run_id)
            previous = run.data.tags.get(TAG_PREFIX + "resumes", "0")
            self._before_resume = (run.info.status, run.info.end_time, previous)
            client.update_run(run_id, status="RUNNING")
            client.set_tag(run_id, TAG_PREFIX + "resumes", str(int(previous) + 1))
        for key, value in environment_tags().items():
            client.set_tag(run_id, key, value)
        # The outbox names the store in its messages only: without credentials.
        self._outbox = TrackingOutbox(client, run_id, redact(self._store_uri), self.spool_dir, retry_s=self.retry_s)
        replayed = self._outbox.load_spool()
        if replayed:
            warnings.warn(
                f"run {run_id}: writing {replayed} record(s) an earlier session kept in {self._outbox.spool_file} "
                "while the store was unavailable",
                stacklevel=3,
            )
        self._start_system_metrics(client)

    def _start_system_metrics(self, client) -> None:
        if not self.system_metrics:
            return
        if importlib.util.find_spec("psutil") is None:
            client.set_tag(self._run[0], TAG_PREFIX + "system_metrics", "off: psutil is not installed")
            warnings.warn(
                "MLflow system metrics are off: install psutil (pip install psutil) to record CPU/GPU/memory use",
                stacklevel=3,
            )
            return
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self._monitor = SystemMetricsMonitor(
            self._run[0],
            sampling_interval=self.system_metrics_interval,
            resume_logging=self.resumed,
            tracking_uri=self._store_uri,
        )
        self._monitor.start()

    @rank_zero_only
    def log_hyperparams(self, params) -> None:
        """Log parameters; on a resumed run, identical ones are skipped and changed ones are recorded in a
        tag (MLflow parameters are immutable, so re-logging a changed value would fail)."""
        if not isinstance(params, Mapping):
            params = vars(params)
        log_params(self.experiment, self.run_id, flatten_config(params))

    @property
    def outbox(self) -> TrackingOutbox:
        _ = self.experiment
        return self._outbox

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Queue metrics for the background writer (Lightning's MLFlowLogger writes them synchronously, which
        stalls training for as long as the store does). A metric logged again at the same step with the same
        value is skipped: `ParallaxCheckpoint` logs a checkpoint step's metrics before Lightning does."""
        step = int(step or 0)
        self._logged_metrics = True
        if self._step_values[0] != step:
            self._step_values = (step, {})
        seen = self._step_values[1]
        now = int(time.time() * 1000)
        records = []
        for key, value in metrics.items():
            if isinstance(value, str):
                continue
            if self._metric_prefix:
                key = f"{self._metric_prefix}{self.LOGGER_JOIN_CHAR}{key}"
            key = re.sub(r"[^a-zA-Z0-9_/. -]+", "", key)  # the characters MLflow accepts in a metric name
            value = value.item() if isinstance(value, torch.Tensor) else float(value)
            if seen.get(key) == value:
                continue
            seen[key] = value
            records.append((key, value, now, step))
        self.outbox.submit_metrics(records)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything logged so far is in the store (False: `timeout` passed first)."""
        if not self.started or self._outbox is None:
            return True
        return self._outbox.flush(timeout)

    def mark_interrupted(self, reason: str) -> None:
        """The run was stopped by a signal: it ends as KILLED (resumable), not FINISHED or FAILED."""
        self.interrupted = reason

    @rank_zero_only
    def finalize(self, status: str = "success") -> None:
        if self._monitor is not None:
            try:
                self._monitor.finish()
            except Exception as err:  # a store outage must not turn the end of training into a crash
                warnings.warn(f"MLflow system metrics did not stop cleanly: {err}", stacklevel=2)
            finally:
                self._monitor = None
        if not self.started:
            return
        status = {"success": "FINISHED", "finished": "FINISHED", "failed": "FAILED"}.get(status, status)
        if self.interrupted:
            self._outbox.submit_tag(TAG_PREFIX + "interrupted", self.interrupted)
            status = "KILLED"
        if self._checkpoints is not None and self._model_logging:
            self._log_checkpoint_files(self._checkpoints)
        if status == "FAILED" and self._failed_before_first_step():
            status, end_time, resumes = self._before_resume
            # A resume that fails before it trained anything leaves the run's record as it was: a finished
            # run stays finished (its end time too), a killed one stays resumable.
            warnings.warn(
                f"run {self._run[0]}: this resume failed before its first step; the run keeps its status {status}",
                stacklevel=2,
            )
            self._outbox.submit_tag(TAG_PREFIX + "resumes", resumes)
            self._outbox.submit_status(status, end_time=end_time)
        else:
            self._outbox.submit_status(status)
        self._outbox.close(self.flush_timeout_s)

    def after_save_checkpoint(self, checkpoint_callback) -> None:
        """log_model=True: the callback's newest files are uploaded when the run ends; "all": after each save."""
        self._checkpoints = checkpoint_callback
        if self._model_logging == "all" and rank_zero_only.rank == 0:
            self._log_checkpoint_files(checkpoint_callback)

    def _log_checkpoint_files(self, checkpoint_callback) -> None:
        """The best and last checkpoint files as artifacts under checkpoints/<file stem>/ (through the outbox)."""
        paths = {
            getattr(checkpoint_callback, "best_model_path", ""),
            getattr(checkpoint_callback, "last_model_path", ""),
        }
        for path in sorted(p for p in paths if p and Path(p).is_file()):
            source = Path(path).resolve()
            self.outbox.submit_artifact(
                lambda target, source=source: shutil.copyfile(source, target),
                f"checkpoints/{source.stem}/{source.name}",
            )

    def _failed_before_first_step(self) -> bool:
        return (
            self._before_resume is not None
            and self._before_resume[0] in ("FINISHED", "KILLED", "FAILED")
            and not self._logged_metrics
        )


def log_params(client, run_id: str, params: Mapping[str, str]) -> dict[str, tuple[str, str]]:
    """Log new parameters in batches; return {key: (old, new)} for those that differ from the run's.
    Values are logged without credentials (`redaction.redact`)."""
    from mlflow.entities import Param

    params = {k: redact(str(v)) for k, v in params.items()}
    existing = client.get_run(run_id).data.params
    fresh = {k: str(v)[:PARAM_VALUE_LIMIT] for k, v in params.items() if k not in existing}
    changed = {k: (existing[k], str(v)) for k, v in params.items() if k in existing and existing[k] != str(v)}
    items = [Param(k, v) for k, v in fresh.items()]
    for i in range(0, len(items), 100):  # MLflow takes at most 100 parameters per batch
        client.log_batch(run_id, params=items[i : i + 100])
    if changed:
        resumes = client.get_run(run_id).data.tags.get(TAG_PREFIX + "resumes", "0")
        text = json.dumps({k: {"was": a, "now": b} for k, (a, b) in changed.items()})
        client.set_tag(run_id, f"{TAG_PREFIX}changed_params.resume{resumes}", text[:5000])
        warnings.warn(
            f"run {run_id} continues with changed settings (kept as a tag, parameters stay as first logged): "
            + ", ".join(f"{k}: {a} -> {b}" for k, (a, b) in changed.items()),
            stacklevel=2,
        )
    return changed


def mlflow_loggers(trainer) -> list[MLFlowLogger]:
    return [lg for lg in getattr(trainer, "loggers", []) if isinstance(lg, MLFlowLogger)]


def checkpoint_run_info(trainer) -> dict[str, str] | None:
    """What a checkpoint records so that resuming continues the same run; the store's URI without credentials
    (resuming compares it with the current URI's credential-free form)."""
    for logger in mlflow_loggers(trainer):
        run_id = logger.run_id
        if run_id:
            uri = redact(logger_tracking_uri(logger))
            return {"run_id": run_id, "experiment_id": str(logger.experiment_id), "tracking_uri": uri}
    return None


def logger_tracking_uri(logger: MLFlowLogger) -> str:
    """The store an MLflow logger writes to: its own for ours, MLflow's resolution of the default otherwise
    (Lightning's MLFlowLogger does not expose the one it was given)."""
    if isinstance(logger, ParallaxMLFlowLogger):
        return logger.tracking_uri
    import mlflow

    return mlflow.get_tracking_uri()


def same_store(stored_uri: str | None, current_uri: str) -> bool:
    """Whether a checkpoint's tracking URI (stored without credentials) names the current store: the
    credential-free forms are compared, so other credentials for the same server are the same store."""
    return stored_uri is None or redact(absolute_sqlite(stored_uri)) == redact(absolute_sqlite(current_uri))


def run_info_from_checkpoint(path: str | os.PathLike) -> dict[str, str] | None:
    """The MLflow run recorded in a checkpoint (loaded weights-only and memory-mapped: no code runs). A sharded
    checkpoint (a folder written by torch.distributed.checkpoint) keeps it in its `meta.pt`."""
    path = Path(path)
    if path.is_dir():
        if not (path / "meta.pt").is_file():
            return None  # another strategy's folder (DeepSpeed): no run recorded where this can read it
        path = path / "meta.pt"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    from .checkpoint_io import load_weights_only

    checkpoint = load_weights_only(path, mmap=True)
    info = checkpoint.get("mlflow")
    return dict(info) if isinstance(info, Mapping) else None


def log_text(logger: MLFlowLogger, text: str, artifact_file: str) -> None:
    if rank_zero_only.rank != 0:
        return
    if isinstance(logger, ParallaxMLFlowLogger):
        logger.outbox.submit_artifact(lambda path: Path(path).write_text(text), artifact_file)
    else:
        logger.experiment.log_text(logger.run_id, text, artifact_file)


def log_figure(logger: MLFlowLogger, figure, artifact_file: str) -> None:
    if rank_zero_only.rank != 0:
        return
    if isinstance(logger, ParallaxMLFlowLogger):
        logger.outbox.submit_artifact(figure.savefig, artifact_file)
    else:
        logger.experiment.log_figure(logger.run_id, figure, artifact_file)


def metric_history(logger: MLFlowLogger, key: str, timeout: float = 30.0) -> list[tuple[int, float]]:
    """(step, value) pairs of a metric over the whole run, earlier sessions of a resumed run included.
    Raises TimeoutError when the store cannot be reached within `timeout` seconds."""
    if isinstance(logger, ParallaxMLFlowLogger) and not logger.flush(timeout):
        raise TimeoutError(
            f"MLflow store {redact(logger.tracking_uri)} did not take the run's metrics within {timeout} s"
        )
    history = logger.experiment.get_metric_history(logger.run_id, key)
    return sorted((m.step, m.value) for m in history)


def _default_spool_dir(tracking_uri: str) -> Path:
    prefix = "sqlite:///"
    if tracking_uri.startswith(prefix) and tracking_uri[len(prefix) :] != ":memory:":
        return Path(tracking_uri[len(prefix) :]).resolve().parent / "mlflow_spool"
    return Path.cwd() / "mlflow_spool"
