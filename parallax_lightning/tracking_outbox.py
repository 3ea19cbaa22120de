"""Metrics, artifacts and the final status on their way to an MLflow run, written by a background thread so
that a tracking store that is slow or unavailable never stalls or stops training.

Why a thread: an SQLite store that another process holds locked makes every write wait 20 s (MLflow's
busy timeout) before failing, and an unreachable server is retried with back-off for minutes. Training only
appends to an in-memory queue; the writer sends the queue in order, and when the store fails it keeps the
items, copies them to a JSONL spool file on disk (so a crash loses nothing either), and retries with
back-off. When the store answers again the backlog is written and the spool removed.

The spool of a run (`<spool_dir>/<run_id>.jsonl`, artifacts under `<spool_dir>/<run_id>/`) is replayed
when the run is continued (resume from a checkpoint), or by `replay_spool` by hand.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import threading
import time
import warnings
from collections import deque
from pathlib import Path
from typing import Any

MAX_METRICS_PER_BATCH = 1000  # MLflow's limit for one log_batch call
_THREAD_PREFIX = "parallax-mlflow-writer"


class StoreUnavailableWarning(UserWarning):
    """The MLflow tracking store could not be written; training goes on and the records are kept locally."""


class _FromWriterThread(logging.Filter):
    """Drops MLflow's and urllib3's own log records raised while the writer retries: one warning from us
    replaces a traceback per attempt."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.threadName.startswith(_THREAD_PREFIX)


_QUIETED = ("mlflow.store.db.utils", "mlflow.utils.rest_utils", "mlflow.tracking._tracking_service.client")
_quiet_lock = threading.Lock()
_quiet_installed = False


def _quiet_library_loggers() -> None:
    global _quiet_installed
    with _quiet_lock:
        if not _quiet_installed:
            for name in (*_QUIETED, "urllib3.connectionpool"):
                logging.getLogger(name).addFilter(_FromWriterThread())
            _quiet_installed = True


def _describe(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {text[:300]}" if text else type(err).__name__


class TrackingOutbox:
    """Ordered, retried writes to one MLflow run (see the module docstring).

    Every record is appended to the run's spool file when it is submitted (a write-ahead log: the process
    may be killed at any moment) and the file is emptied whenever the writer has caught up, so the spool
    always holds at least what the store has not confirmed. Replaying a spool may send records the store
    already has; MLflow drops exact duplicates (same key, value, step and timestamp).

    Args:
        client: an `MlflowClient` for the store.
        run_id: the run written to.
        tracking_uri: the store's URI (for messages).
        spool_dir: where records wait on disk.
        retry_s / max_retry_s: first and largest wait between attempts while the store fails.
    """

    def __init__(
        self,
        client,
        run_id: str,
        tracking_uri: str,
        spool_dir: str | Path,
        retry_s: float = 1.0,
        max_retry_s: float = 30.0,
    ):
        self.client = client
        self.run_id = run_id
        self.tracking_uri = tracking_uri
        self.spool_dir = Path(spool_dir)
        self.retry_s = retry_s
        self.max_retry_s = max_retry_s
        self._pending: deque[dict[str, Any]] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stop = False
        self._wal = None
        self._wal_error: str | None = None
        self._failing_since: float | None = None
        self._last_error: str | None = None
        self._warned = False
        self._recovered: list[tuple[float, int]] = []  # (seconds unavailable, backlog written) per outage
        _quiet_library_loggers()

    # -- paths -----------------------------------------------------------------------------------
    @property
    def spool_file(self) -> Path:
        return self.spool_dir / f"{self.run_id}.jsonl"

    @property
    def artifact_dir(self) -> Path:
        return self.spool_dir / self.run_id / "artifacts"

    # -- producer side (training thread) ---------------------------------------------------------
    def submit_metrics(self, metrics: list[tuple[str, float, int, int]]) -> None:
        """(key, value, timestamp_ms, step) tuples."""
        if metrics:
            self._submit({"kind": "metrics", "metrics": [list(m) for m in metrics]})

    def submit_artifact(self, write, artifact_file: str) -> None:
        """`write(path)` writes the artifact's content to a local file now (kept until it is uploaded);
        `artifact_file` is its path in the run, e.g. 'figures/loss.png'."""
        local = self.artifact_dir / artifact_file
        local.parent.mkdir(parents=True, exist_ok=True)
        write(local)
        self._submit({"kind": "artifact", "file": str(local), "path": artifact_file})

    def submit_status(self, status: str, end_time: int | None = None) -> None:
        """End the run with `status` at `end_time` (ms since the epoch; default now)."""
        end_time = int(time.time() * 1000) if end_time is None else int(end_time)
        self._submit({"kind": "status", "status": status, "end_time": end_time})

    def submit_tag(self, key: str, value: str) -> None:
        self._submit({"kind": "tag", "key": key, "value": value})

    def _submit(self, item: dict[str, Any]) -> None:
        with self._cond:
            self._append_wal_locked([item])
            self._pending.append(item)
            self._ensure_thread_locked()
            self._cond.notify_all()

    def _warn_unavailable(self) -> None:
        """The one warning of this run's first outage (later outages are summed up at the end)."""
        if self._warned:
            return
        self._warned = True
        kept = f"in memory and in {self.spool_file}" if self._wal_error is None else f"in memory ({self._wal_error})"
        warnings.warn(
            f"MLflow tracking store {self.tracking_uri} is unavailable ({self._last_error}); training continues. "
            f"Metrics and artifacts of run {self.run_id} are kept {kept} and will be written to the run when "
            "the store answers again, or at the end of training. (This warning is printed once.)",
            StoreUnavailableWarning,
            stacklevel=1,
        )

    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._pending)

    @property
    def unavailable(self) -> bool:
        return self._failing_since is not None

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything submitted so far is written (True) or `timeout` seconds pass (False)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            if self._pending:
                self._ensure_thread_locked()
                self._cond.notify_all()
            while self._pending:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(timeout=0.5 if left is None else min(left, 0.5))
            return True

    def close(self, timeout: float | None = 60.0) -> bool:
        """Flush, then stop the writer. If the store is still unavailable after `timeout` seconds, the
        backlog stays in the spool (replayed on resume or by `replay_spool`) and a warning says where."""
        done = self.flush(timeout)
        with self._cond:
            self._stop = True
            self._cond.notify_all()
            thread = self._thread
            if done:
                self._close_wal_locked(remove=True)
        if done:
            if thread is not None:
                thread.join(timeout=5)
            self._thread = None
            if self._recovered:
                logging.getLogger(__name__).warning(
                    "MLflow store %s was unavailable %d time(s), %.1f s in all; the %d records kept meanwhile are "
                    "now in run %s",
                    self.tracking_uri,
                    len(self._recovered),
                    sum(s for s, _ in self._recovered),
                    sum(n for _, n in self._recovered),
                    self.run_id,
                )
            return True
        # The writer is a daemon thread: it keeps trying while the process lives; the spool remains.
        warnings.warn(
            f"MLflow tracking store {self.tracking_uri} is still unavailable ({self._last_error}): "
            f"{self.pending} record(s) of run {self.run_id} are kept in {self.spool_file} (artifacts under "
            f"{self.artifact_dir}). They are written to the run when it is resumed, or with "
            f"parallax_lightning.tracking_outbox.replay_spool('{self.spool_file}', '{self.tracking_uri}').",
            StoreUnavailableWarning,
            stacklevel=2,
        )
        return False

    # -- replay ----------------------------------------------------------------------------------
    def load_spool(self) -> int:
        """Queue what a previous session left in this run's spool (written before anything new)."""
        if not self.spool_file.is_file():
            return 0
        items = read_spool(self.spool_file)
        with self._cond:
            self._pending.extendleft(reversed(items))
            if items:
                self._ensure_thread_locked()
                self._cond.notify_all()
        return len(items)

    # -- writer thread ---------------------------------------------------------------------------
    def _ensure_thread_locked(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stop = False
            self._thread = threading.Thread(target=self._run, name=f"{_THREAD_PREFIX}-{self.run_id}", daemon=True)
            self._thread.start()

    def _next_batch_locked(self) -> list[dict[str, Any]]:
        first = self._pending[0]
        if first["kind"] != "metrics":
            return [first]
        batch, count = [], 0
        for item in self._pending:
            if item["kind"] != "metrics" or (batch and count + len(item["metrics"]) > MAX_METRICS_PER_BATCH):
                break
            batch.append(item)
            count += len(item["metrics"])
        return batch

    def _run(self) -> None:
        wait = self.retry_s
        while True:
            with self._cond:
                while not self._pending and not self._stop:
                    self._cond.wait()
                if not self._pending:
                    return
                batch = self._next_batch_locked()
            try:
                self._write(batch)
            except Exception as err:  # any failure of the store: keep the records, retry later
                with self._cond:
                    first = self._failing_since is None
                    if first:
                        self._failing_since = time.monotonic()
                    self._last_error = _describe(err)
                if first:
                    self._warn_unavailable()
                with self._cond:
                    self._cond.notify_all()
                    self._cond.wait(timeout=wait)
                wait = min(wait * 2, self.max_retry_s)
                continue
            wait = self.retry_s
            with self._cond:
                if self._failing_since is not None:
                    self._recovered.append((time.monotonic() - self._failing_since, len(self._pending)))
                    self._failing_since = None
                for _ in batch:
                    self._pending.popleft()
                if not self._pending:
                    self._truncate_wal_locked()
                self._cond.notify_all()

    def _write(self, batch: list[dict[str, Any]]) -> None:
        from mlflow.entities import Metric

        kind = batch[0]["kind"]
        if kind == "metrics":
            metrics = [Metric(key=k, value=v, timestamp=t, step=s) for item in batch for k, v, t, s in item["metrics"]]
            self.client.log_batch(self.run_id, metrics=metrics)
        elif kind == "artifact":
            local = Path(batch[0]["file"])
            if local.is_file():  # gone means an earlier attempt uploaded it and a crash kept the record
                folder = str(Path(batch[0]["path"]).parent)
                self.client.log_artifact(self.run_id, str(local), None if folder == "." else folder)
                local.unlink()
        elif kind == "tag":
            self.client.set_tag(self.run_id, batch[0]["key"], batch[0]["value"])
        elif kind == "status":
            self.client.set_terminated(self.run_id, batch[0]["status"], batch[0]["end_time"])
        else:  # a spool from a newer version: skip what this one cannot write
            logging.getLogger(__name__).warning("skipping an unknown spool record kind %r", kind)

    # -- spool (write-ahead log) -----------------------------------------------------------------
    def _append_wal_locked(self, items: list[dict[str, Any]]) -> None:
        try:
            if self._wal is None:
                self.spool_dir.mkdir(parents=True, exist_ok=True)
                self._wal = open(self.spool_file, "a")  # noqa: SIM115 - kept open for the run's lifetime
            self._wal.write("".join(json.dumps(item) + "\n" for item in items))
            self._wal.flush()  # into the OS: survives the process being killed
        except OSError as err:  # the spool's disk may be the full one: the records stay in memory
            self._wal_error = f"spool {self.spool_file} not written: {_describe(err)}"

    def _truncate_wal_locked(self) -> None:
        if self._wal is not None:
            with contextlib.suppress(OSError):
                self._wal.truncate(0)

    def _close_wal_locked(self, remove: bool) -> None:
        if self._wal is not None:
            self._wal.close()
            self._wal = None
        if remove:
            self.spool_file.unlink(missing_ok=True)
            shutil.rmtree(self.spool_dir / self.run_id, ignore_errors=True)


def read_spool(path: str | Path) -> list[dict[str, Any]]:
    """The records of a spool file; a torn last line (a crash mid-append) is ignored."""
    items = []
    for line in Path(path).read_text().splitlines():
        try:
            items.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return items


def replay_spool(path: str | Path, tracking_uri: str, timeout: float | None = 120.0) -> bool:
    """Write a spool file left by a run whose store was unavailable to the end (True when all of it is in)."""
    from mlflow import MlflowClient

    path = Path(path)
    outbox = TrackingOutbox(MlflowClient(tracking_uri), path.stem, tracking_uri, path.parent)
    outbox.load_spool()
    return outbox.close(timeout)
