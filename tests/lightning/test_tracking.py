"""MLflow tracking: the default store, flattened params, re-logging on resume, environment tags, the run id
carried by checkpoints, system metrics, and a real `mlflow server` read back over its REST API."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request

import pytest
import torch

from parallax_lightning.tracking import (
    ParallaxMLFlowLogger,
    default_tracking_uri,
    environment_tags,
    flatten_config,
    git_state,
    log_params,
    run_info_from_checkpoint,
)
from parallax_lightning.tracking_ui import start_ui
from tests.helpers import free_port

from .platform_utils import mlflow_client, working_dir


def test_default_store_is_sqlite_in_the_working_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with working_dir(tmp_path):
        assert default_tracking_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"
        logger = ParallaxMLFlowLogger(experiment_name="x", tracking_uri="sqlite:///rel.db")
        assert logger.tracking_uri == f"sqlite:///{tmp_path / 'rel.db'}"  # relative paths pinned at start
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert default_tracking_uri() == "http://127.0.0.1:5000"


def test_flatten_config_drops_init_args():
    flat = flatten_config(
        {
            "model": {"class_path": "a.B", "init_args": {"model": {"d_model": 64}, "betas": [0.9, 0.95]}},
            "trainer": {"max_steps": 10, "logger": None},
        }
    )
    assert flat == {
        "model.class_path": "a.B",
        "model.model.d_model": "64",
        "model.betas": "[0.9, 0.95]",
        "trainer.max_steps": "10",
        "trainer.logger": "None",
    }


def test_a_mapping_keyed_by_data_is_one_json_param_that_mlflow_accepts(tmp_path):
    """optimizer.route's keys are regexes: as parameter names MLflow refuses them (a run failed at its start)."""
    from mlflow import MlflowClient
    from mlflow.entities import Param

    route = {r"\.r_proj\.weight$": "muon"}
    flat = flatten_config({"model": {"init_args": {"optimizer": {"route": route, "lr": 0.02}}}})
    assert flat == {"model.optimizer.route": json.dumps(route), "model.optimizer.lr": "0.02"}
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.create_run(client.create_experiment("route"))
    client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in flat.items()])
    assert json.loads(client.get_run(run.info.run_id).data.params["model.optimizer.route"]) == route


def test_git_state_and_environment_tags(tmp_path, monkeypatch):
    monkeypatch.delenv("PARALLAX_GIT_COMMIT", raising=False)
    state = git_state()
    assert len(state["git_commit"]) == 40 and state["git_dirty"] in ("true", "false")
    assert git_state(tmp_path) == {"git_commit": "unknown", "git_dirty": "unknown"}
    monkeypatch.setenv("PARALLAX_GIT_COMMIT", "f5e06a1")  # a snapshot without .git names its commit
    assert git_state(tmp_path) == {"git_commit": "f5e06a1", "git_dirty": "unknown"}
    assert git_state()["git_commit"] == state["git_commit"]  # a real repository wins over the variable
    tags = environment_tags()
    assert tags["parallax.torch_version"] == torch.__version__
    assert tags["parallax.gpu"] == (torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One MLflow store for the module: creating the tables costs seconds."""
    return tmp_path_factory.mktemp("store")


def _logger(store, experiment: str = "t", **kwargs) -> ParallaxMLFlowLogger:
    return ParallaxMLFlowLogger(experiment_name=experiment, tracking_uri=f"sqlite:///{store / 'mlflow.db'}", **kwargs)


def test_params_on_a_resumed_run_skip_equal_and_tag_changed(store):
    logger = _logger(store, experiment="resumed-params", system_metrics=False)
    logger.log_hyperparams({"a": 1, "b": {"c": "x"}})
    run_id = logger.run_id
    logger.finalize("success")
    again = _logger(store, experiment="resumed-params", system_metrics=False, run_id=run_id)
    with pytest.warns(UserWarning, match="a: 1 -> 2"):
        again.log_hyperparams({"a": 2, "b": {"c": "x"}, "d": 3})
    again.finalize("success")
    run = mlflow_client(store).get_run(run_id)
    assert run.data.params == {"a": "1", "b.c": "x", "d": "3"}
    assert json.loads(run.data.tags["parallax.changed_params.resume1"]) == {"a": {"was": "1", "now": "2"}}
    assert run.data.tags["parallax.resumes"] == "1"
    assert run.info.status == "FINISHED"


def test_resumed_run_is_running_until_finalized(store):
    logger = _logger(store, system_metrics=False)
    run_id = logger.run_id
    logger.finalize("success")
    again = _logger(store, system_metrics=False, run_id=run_id)
    again.log_metrics({"x": 1.0}, step=0)
    assert mlflow_client(store).get_run(run_id).info.status == "RUNNING"
    again.finalize("failed")
    assert mlflow_client(store).get_run(run_id).info.status == "FAILED"


def test_system_metrics_need_psutil(store):
    logger = _logger(store, system_metrics=True, system_metrics_interval=0.2)
    try:
        import psutil  # noqa: F401
    except ImportError:
        with pytest.warns(UserWarning, match="install psutil"):
            run_id = logger.run_id
        tag = mlflow_client(store).get_run(run_id).data.tags["parallax.system_metrics"]
        assert "psutil is not installed" in tag
        logger.finalize("success")
        return
    run_id = logger.run_id
    time.sleep(1.0)
    logger.finalize("success")
    assert any(k.startswith("system/") for k in mlflow_client(store).get_run(run_id).data.metrics)


def test_run_info_travels_in_checkpoints(tmp_path):
    torch.save({"state_dict": {}, "mlflow": {"run_id": "abc", "tracking_uri": "sqlite:///x.db"}}, tmp_path / "c.ckpt")
    assert run_info_from_checkpoint(tmp_path / "c.ckpt")["run_id"] == "abc"
    torch.save({"state_dict": {}}, tmp_path / "old.ckpt")
    assert run_info_from_checkpoint(tmp_path / "old.ckpt") is None
    with pytest.raises(FileNotFoundError, match=r"nope\.ckpt"):
        run_info_from_checkpoint(tmp_path / "nope.ckpt")


def test_log_params_in_batches_of_100(store):
    logger = _logger(store, system_metrics=False)
    params = {f"p{i:03d}": str(i) for i in range(250)}
    assert log_params(logger.experiment, logger.run_id, params) == {}
    assert mlflow_client(store).get_run(logger.run_id).data.params == params
    logger.finalize("success")


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


@pytest.mark.slow
def test_mlflow_server_serves_the_run_over_rest(store, tmp_path):
    logger = _logger(store, experiment="served", system_metrics=False, run_name="served-run")
    logger.log_hyperparams({"model": {"attention": "parallax"}})
    for step, loss in enumerate([3.0, 2.5, 2.0]):
        logger.log_metrics({"train/loss": loss}, step=step)
    experiment_id, run_id = logger.experiment_id, logger.run_id
    logger.finalize("success")

    port = free_port()
    # The platform's helper (python -m parallax_lightning ui): 127.0.0.1 unless told otherwise.
    server = start_ui(
        f"sqlite:///{store / 'mlflow.db'}", port=port, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        base = f"http://127.0.0.1:{port}/api/2.0/mlflow"
        deadline = time.time() + 120
        found = None
        while time.time() < deadline:
            if server.poll() is not None:
                pytest.fail(f"mlflow server exited: {server.stderr.read().decode()[-2000:]}")
            try:
                found = _post(f"{base}/runs/search", {"experiment_ids": [experiment_id]})
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.5)
        assert found is not None, "mlflow server did not answer within 120 s"
        [run] = found["runs"]
        assert run["info"]["run_id"] == run_id
        assert run["info"]["run_name"] == "served-run"
        assert {"key": "model.attention", "value": "parallax"} in run["data"]["params"]
        metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
        assert metrics["train/loss"] == 2.0
        psutil = pytest.importorskip("psutil")
        group = [psutil.Process(server.pid), *psutil.Process(server.pid).children(recursive=True)]

        def listening_ips(p):
            # A short-lived child may exit between the listing and this read (seen once in CI): it listens on
            # nothing then.
            try:
                return {c.laddr.ip for c in p.net_connections("tcp") if c.status == "LISTEN"}
            except psutil.NoSuchProcess:
                return set()

        listening = set().union(*map(listening_ips, group))
        assert listening == {"127.0.0.1"}, listening  # reachable from this machine only
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server forks workers: stop its whole process group
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
