"""The MLflow outbox on its own: a store that refuses writes (unreachable server, full artifact disk, a
crash mid-run) delays records but never loses them or blocks the caller. A fake client fails on demand; a
real SQLite store checks that what arrives is what was sent."""

from __future__ import annotations

import threading
import time
import warnings

import pytest
from mlflow import MlflowClient

from parallax_lightning.tracking import ParallaxMLFlowLogger
from parallax_lightning.tracking_outbox import StoreUnavailableWarning, TrackingOutbox, read_spool, replay_spool


class FlakyClient:
    """Wraps a client; while `down` is set its writes raise (as an unreachable server's would)."""

    def __init__(self, client, error: Exception | None = None):
        self.client = client
        self.error = error or ConnectionError("Connection refused: 127.0.0.1:5999")
        self.down = threading.Event()
        self.attempts = 0

    def __getattr__(self, name):
        method = getattr(self.client, name)

        def call(*args, **kwargs):
            self.attempts += 1
            if self.down.is_set():
                raise self.error
            return method(*args, **kwargs)

        return call


class HungClient:
    """A client whose metric writes hang until `release` is set, as on a dead connection."""

    def __init__(self, client, release: threading.Event):
        self.client, self.release = client, release

    def log_batch(self, *args, **kwargs):
        self.release.wait(30)
        return self.client.log_batch(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.client, name)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    folder = tmp_path_factory.mktemp("outbox")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = MlflowClient(uri)
    return uri, client, client.create_experiment("outbox")


def _run(store) -> str:
    _, client, exp = store
    return client.create_run(exp).info.run_id


def _steps(client, run_id, key="loss"):
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_unreachable_store_keeps_records_warns_once_and_writes_them_when_back(store, tmp_path):
    _, client, _ = store
    run_id = _run(store)
    flaky = FlakyClient(client)
    outbox = TrackingOutbox(flaky, run_id, "http://127.0.0.1:5999", tmp_path, retry_s=0.05, max_retry_s=0.1)
    flaky.down.set()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.monotonic()
        for step in range(50):
            outbox.submit_metrics([("loss", 10.0 - step / 10, 1000 + step, step)])
        assert time.monotonic() - t0 < 2.0  # the caller never waits for the store
        assert not outbox.flush(timeout=0.5)  # still down
        assert outbox.unavailable and outbox.pending == 50
        assert len(read_spool(outbox.spool_file)) == 50  # on disk too
        flaky.down.clear()
        assert outbox.close(timeout=30)
    outage = [w for w in caught if issubclass(w.category, StoreUnavailableWarning)]
    assert len(outage) == 1 and "Connection refused" in str(outage[0].message)
    assert _steps(client, run_id) == [(s, 10.0 - s / 10) for s in range(50)]
    assert not outbox.spool_file.exists()
    assert flaky.attempts > 2  # it did retry


def test_store_still_down_at_the_end_leaves_a_spool_that_replays(store, tmp_path):
    uri, client, _ = store
    run_id = _run(store)
    flaky = FlakyClient(client)
    flaky.down.set()
    outbox = TrackingOutbox(flaky, run_id, uri, tmp_path, retry_s=0.05, max_retry_s=0.1)
    outbox.submit_metrics([("loss", 1.0, 1, 0), ("loss", 0.5, 2, 1)])
    outbox.submit_tag("parallax.note", "kept")
    outbox.submit_status("FINISHED")
    with pytest.warns(StoreUnavailableWarning, match=f"replay_spool.*{run_id}"):
        assert not outbox.close(timeout=0.5)
    assert [r["kind"] for r in read_spool(outbox.spool_file)] == ["metrics", "tag", "status"]
    flaky.down.clear()  # the background writer may still get them in; replaying again is harmless
    assert replay_spool(outbox.spool_file, uri, timeout=30)
    run = client.get_run(run_id)
    assert _steps(client, run_id) == [(0, 1.0), (1, 0.5)]  # exact duplicates are dropped by MLflow
    assert run.data.tags["parallax.note"] == "kept" and run.info.status == "FINISHED"


def test_artifact_disk_full_keeps_the_file_and_uploads_it_later(store, tmp_path, monkeypatch):
    uri, client, _ = store
    run_id = _run(store)
    flaky = FlakyClient(client, error=OSError(28, "No space left on device"))
    flaky.down.set()
    outbox = TrackingOutbox(flaky, run_id, uri, tmp_path, retry_s=0.05, max_retry_s=0.1)
    outbox.submit_artifact(lambda path: path.write_text("model: parallax\n"), "configs/config.yaml")
    assert not outbox.flush(timeout=0.3)
    kept = outbox.artifact_dir / "configs" / "config.yaml"
    assert kept.read_text() == "model: parallax\n"
    flaky.down.clear()
    assert outbox.close(timeout=30)
    assert [a.path for a in client.list_artifacts(run_id, "configs")] == ["configs/config.yaml"]
    assert not kept.exists()


def test_a_crash_before_the_writer_caught_up_loses_nothing(store, tmp_path):
    """Records go to the spool before the writer sends them: a process killed with records in flight
    leaves them on disk, and continuing the run (resume) writes them first."""
    uri, client, _ = store
    logger = ParallaxMLFlowLogger(
        experiment_name="outbox", tracking_uri=uri, system_metrics=False, spool_dir=str(tmp_path)
    )
    run_id = logger.run_id
    stuck = threading.Event()
    logger.outbox.client = HungClient(client, stuck)
    logger.log_metrics({"loss": 3.0}, step=0)
    logger.log_metrics({"loss": 2.0}, step=1)
    assert [r["metrics"][0][3] for r in read_spool(logger.outbox.spool_file)] == [0, 1]
    # "Crash": this process never finishes the run; a new session continues it from the checkpoint.
    again = ParallaxMLFlowLogger(
        experiment_name="outbox", tracking_uri=uri, system_metrics=False, spool_dir=str(tmp_path), run_id=run_id
    )
    with pytest.warns(UserWarning, match="writing 2 record"):
        again.log_metrics({"loss": 1.0}, step=2)
    again.finalize("success")
    stuck.set()
    assert _steps(client, run_id) == [(0, 3.0), (1, 2.0), (2, 1.0)]
