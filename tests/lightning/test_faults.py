"""Faults during training: signals, a killed process, a tracking store that goes away, NaN/inf, and
checkpoint writes that crash halfway. Each test runs a real (tiny) training and checks that nothing is lost:
the checkpoint on disk is complete, the MLflow run says what happened, and resuming reproduces the
uninterrupted run's curves step for step.
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import typing
import warnings
from collections import defaultdict
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml

from parallax_lightning.checkpoint_io import AtomicCheckpointIO, atomic_torch_save
from parallax_lightning.tracking_outbox import StoreUnavailableWarning

from .platform_utils import (
    bare_argv,
    history,
    mlflow_client,
    only_run,
    run_cli,
    single_thread,
    tiny_config,
    working_dir,
)

STEPS = 10
CURVES = ("train/loss", "val/loss", "lr-Muon/muon")


pytestmark = pytest.mark.usefixtures("one_thread")


def fault_config(folder: Path, corpus: Path, experiment: str, store: Path, **sections) -> Path:
    """10 steps, a checkpoint every 2, validation at 5 and 10; the MLflow writer retries quickly."""
    base = {
        "trainer": {
            "max_steps": STEPS,
            "val_check_interval": 5,
            "limit_val_batches": 1,
            "logger": {"init_args": {"system_metrics": False, "retry_s": 0.2}},
        },
        "checkpoint": {"every_n_train_steps": 2},
        "diagnostics": {"every_n_steps": 5},
    }
    for key, value in sections.items():
        base.setdefault(key, {}).update(value)
    return tiny_config(folder, corpus, experiment=experiment, store=store, **base)


def without_callbacks(config: Path) -> Path:
    """The same config without the test's fault-injecting callbacks (for the resumed session)."""
    data = yaml.safe_load(config.read_text())
    data["trainer"].pop("callbacks", None)
    path = config.with_name(config.stem + "_resume.yaml")
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus, store):
    """The uninterrupted run's curves: {key: {step: value}}."""
    folder = tmp_path_factory.mktemp("reference")
    with single_thread():
        run_cli(["fit", "--config", str(fault_config(folder, corpus, "reference", store))], folder)
    client = mlflow_client(store)
    run = only_run(client, "reference")
    curves = {key: dict(history(client, run.info.run_id, key)) for key in CURVES}
    assert sorted(curves["train/loss"]) == list(range(STEPS))
    return curves


def assert_same_curves(client, run_id: str, reference: dict) -> None:
    """Every step of the reference is in the run, and every value logged at a step (a replayed step is
    logged twice) equals the reference's."""
    for key, expected in reference.items():
        got = defaultdict(list)
        for step, value in history(client, run_id, key):
            got[step].append(value)
        assert sorted(got) == sorted(expected), f"{key}: steps {sorted(got)} != {sorted(expected)}"
        for step, values in got.items():
            assert values == pytest.approx([expected[step]] * len(values), rel=1e-5, abs=1e-7), f"{key} @ {step}"


def checkpoints(folder: Path, name: str = "*.ckpt") -> list[Path]:
    return sorted(folder.rglob(name))


def ckpt_step(path: Path) -> int:
    return int(torch.load(path, weights_only=True, map_location="cpu")["global_step"])


class SignalAt(pl.Callback):
    """Sends a signal to this process when training has done `step` optimizer steps."""

    def __init__(self, step: int, signum: int):
        self.step, self.signum = step, signum

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


def _handlers() -> tuple:
    return signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)


def _fit_until_signal(tmp_path, corpus, store, experiment: str, step: int, signum: int) -> tuple:
    """Fits with SignalAt(step, signum) and checks the exit code is 128 + signum; returns the config, the
    SystemExit and the signal handlers from before the fit."""
    callback = {"class_path": f"{__name__}.SignalAt", "init_args": {"step": step, "signum": int(signum)}}
    config = fault_config(tmp_path, corpus, experiment, store, trainer={"callbacks": [callback]})
    handlers = _handlers()
    with pytest.raises(SystemExit) as info:
        run_cli(["fit", "--config", str(config), "--allow_class_path", "tests"], tmp_path)
    assert info.value.code == 128 + signum
    return config, info.value, handlers


# -- signals ------------------------------------------------------------------------------------------------
def test_sigterm_saves_marks_the_run_killed_and_resume_continues_it(tmp_path, corpus, store, reference):
    config, stopped, handlers = _fit_until_signal(tmp_path, corpus, store, "sigterm", 3, signal.SIGTERM)
    assert "received SIGTERM" in str(stopped) and "last.ckpt" in str(stopped)
    client = mlflow_client(store)
    run = only_run(client, "sigterm")
    assert run.info.status == "KILLED"
    assert run.data.tags["parallax.interrupted"] == "SIGTERM at step 3"
    assert [s for s, _ in history(client, run.info.run_id, "train/loss")] == [0, 1, 2]  # the last step is logged
    [last] = checkpoints(tmp_path / "runs", "last.ckpt")
    assert ckpt_step(last) == 3
    assert _handlers() == handlers  # given back as they were (SIGINT is ignored when pytest runs in background)

    cli = run_cli(["fit", "--config", str(without_callbacks(config)), "--ckpt_path", str(last)], tmp_path)
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)  # it restored through it, too
    resumed = only_run(client, "sigterm")
    assert resumed.info.run_id == run.info.run_id and resumed.info.status == "FINISHED"
    assert_same_curves(client, run.info.run_id, reference)


def test_sigint_during_training_stops_after_the_step_with_a_checkpoint(tmp_path, corpus, store):
    _, _, handlers = _fit_until_signal(tmp_path, corpus, store, "sigint", 5, signal.SIGINT)
    run = only_run(mlflow_client(store), "sigint")
    assert run.info.status == "KILLED" and run.data.tags["parallax.interrupted"] == "SIGINT at step 5"
    # The 5th step is also a validation step: that validation ran and was logged (at step 4) before the stop.
    assert [s for s, _ in history(mlflow_client(store), run.info.run_id, "val/loss")] == [4]
    [last] = checkpoints(tmp_path / "runs", "last.ckpt")
    assert ckpt_step(last) == 5
    assert _handlers() == handlers  # handlers are given back


# -- a killed process -----------------------------------------------------------------------------------------
def _max_logged_step(db: Path, experiment: str) -> int:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            row = conn.execute(
                "SELECT max(m.step) FROM metrics m JOIN runs r ON m.run_uuid = r.run_uuid "
                "JOIN experiments e ON r.experiment_id = e.experiment_id WHERE e.name = ? AND m.key = 'train/loss'",
                (experiment,),
            ).fetchone()
    except sqlite3.OperationalError:  # tables not created yet, or a writer holds the lock for a moment
        return -1
    return -1 if row is None or row[0] is None else int(row[0])


@pytest.mark.slow
def test_sigkill_at_a_random_step_then_resume_reproduces_the_run(tmp_path, corpus, store, reference):
    """A real CLI process is killed with SIGKILL (no handler runs) at a step the test picks; what is on disk
    resumes into the same MLflow run and reproduces the uninterrupted curves."""
    config = fault_config(tmp_path, corpus, "killed", store)
    kill_after = random.randint(2, STEPS - 3)  # the seed is in the test header: PARALLAX_TEST_SEED replays it
    log = open(tmp_path / "killed.log", "w")  # noqa: SIM115 - closed below
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "parallax_lightning", "fit", "--config", str(config), "--torch_threads=1"],
        cwd=tmp_path,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    try:
        deadline = time.monotonic() + 300
        while _max_logged_step(store / "mlflow.db", "killed") < kill_after:
            assert proc.poll() is None, (
                f"training ended before the kill: {(tmp_path / 'killed.log').read_text()[-3000:]}"
            )
            assert time.monotonic() < deadline, "training did not reach the kill step in 300 s"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        log.close()
    assert proc.returncode == -signal.SIGKILL

    client = mlflow_client(store)
    killed = only_run(client, "killed")
    assert killed.info.status == "RUNNING"  # nothing could end it
    [last] = checkpoints(tmp_path / "runs", "last.ckpt")
    resume_step = ckpt_step(last)  # a complete checkpoint, loadable as data only
    assert 2 <= resume_step <= STEPS and resume_step % 2 == 0
    run_cli(["fit", "--config", str(config), "--ckpt_path", str(last)], tmp_path)
    resumed = only_run(client, "killed")
    assert resumed.info.run_id == killed.info.run_id and resumed.info.status == "FINISHED"
    assert resumed.data.tags["parallax.resumes"] == "1"
    assert_same_curves(client, killed.info.run_id, reference)
    for path in checkpoints(tmp_path / "runs"):
        ckpt_step(path)  # every checkpoint left behind is complete


class KillAfterSave(pl.Callback):
    """SIGKILLs this process the moment the checkpoint of `step` is on disk: inside the step's
    on_train_batch_end, before Lightning logs that step's metrics."""

    def __init__(self, step: int):
        self.step = step

    def setup(self, trainer, pl_module, stage):
        io = trainer.strategy.checkpoint_io
        save = io.save_checkpoint

        def save_then_die(checkpoint, path, storage_options=None):
            save(checkpoint, path, storage_options)
            if checkpoint["global_step"] == self.step and Path(path).name == "last.ckpt":  # the step's final save
                os.kill(os.getpid(), signal.SIGKILL)

        io.save_checkpoint = save_then_die


TRUST_TESTS = ("--allow_class_path", "tests")


@pytest.mark.slow
def test_sigkill_right_after_a_checkpoint_write_loses_no_metric(tmp_path, corpus, store, reference):
    """The narrowest window: the checkpoint of step 4 is written, the process dies before Lightning logs
    train/loss of that step. Resuming from that checkpoint starts after the step, so its metrics must already
    be in the store or in the tracking spool."""
    callback = {"class_path": f"{__name__}.KillAfterSave", "init_args": {"step": 4}}
    config = fault_config(tmp_path, corpus, "killed_after_save", store, trainer={"callbacks": [callback]})
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(root)}
    proc = subprocess.run(
        [sys.executable, "-m", "parallax_lightning", "fit", "--config", str(config), "--torch_threads=1", *TRUST_TESTS],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    [last] = checkpoints(tmp_path / "runs", "last.ckpt")
    assert ckpt_step(last) == 4
    run_cli(["fit", "--config", str(without_callbacks(config)), "--ckpt_path", str(last)], tmp_path)
    client = mlflow_client(store)
    resumed = only_run(client, "killed_after_save")
    assert resumed.info.status == "FINISHED"
    assert_same_curves(client, resumed.info.run_id, reference)
    # A checkpoint step's metrics are written twice (before the save, then by Lightning): stored once.
    assert [s for s, _ in history(client, resumed.info.run_id, "train/loss")] == list(range(STEPS))


# -- atomic checkpoint writes ---------------------------------------------------------------------------------
def test_a_write_that_crashes_halfway_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "ckpts" / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "w": torch.ones(1000)}, path)

    def crash_midway(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")  # the first bytes of a torch zip file, then the crash
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", crash_midway)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"global_step": 2, "w": torch.zeros(1000)}, path)
    monkeypatch.undo()
    assert io.load_checkpoint(path)["global_step"] == 1  # the previous one, complete
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # no temporary file left behind
    atomic_torch_save({"global_step": 3}, path)
    assert io.load_checkpoint(path)["global_step"] == 3


def test_save_last_link_is_replaced_in_one_rename(tmp_path, corpus, store):
    config = fault_config(tmp_path, corpus, "link", store, checkpoint={"save_last": "link", "save_top_k": -1})
    config_data = yaml.safe_load(config.read_text())
    config_data["trainer"]["max_steps"] = 4
    config.write_text(yaml.safe_dump(config_data))
    run_cli(["fit", "--config", str(config)], tmp_path)
    [last] = checkpoints(tmp_path / "runs", "last.ckpt")
    assert last.is_symlink() and ckpt_step(last) == 4
    assert not [p for p in last.parent.iterdir() if p.name.startswith(".")]


def test_save_last_link_ends_on_the_final_step(tmp_path, corpus, store):
    """Training that stops between two periodic saves leaves `last` at the final step, not a link to the
    previous periodic file (resuming from it would replay the steps after that)."""
    config = fault_config(
        tmp_path, corpus, "link_end", store, checkpoint={"save_last": "link", "every_n_train_steps": 3}
    )
    config_data = yaml.safe_load(config.read_text())
    config_data["trainer"]["max_steps"] = 4
    config.write_text(yaml.safe_dump(config_data))
    run_cli(["fit", "--config", str(config)], tmp_path)
    [last] = checkpoints(tmp_path / "runs", "last.ckpt")
    assert ckpt_step(last) == 4
    assert [ckpt_step(p) for p in checkpoints(tmp_path / "runs", "epoch=*.ckpt")] == [3]  # the periodic one stays


# -- the tracking store goes away -----------------------------------------------------------------------------
class LockStore(pl.Callback):
    """At `step`, another connection takes an exclusive lock on the SQLite store and keeps it `seconds`
    (longer than MLflow's 20 s busy timeout, so its writes fail rather than wait)."""

    events: typing.ClassVar[dict] = {}

    def __init__(self, db: str, step: int = 2, seconds: float = 21.0):
        self.db, self.step, self.seconds = db, step, seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step and "locked" not in self.events:
            conn = sqlite3.connect(self.db, timeout=30, isolation_level=None, check_same_thread=False)
            conn.execute("BEGIN EXCLUSIVE")
            self.events["locked"] = time.monotonic()

            def release():
                conn.execute("COMMIT")
                conn.close()
                self.events["released"] = time.monotonic()

            threading.Timer(self.seconds, release).start()

    def on_train_end(self, trainer, pl_module):
        self.events["trained"] = time.monotonic()


@pytest.mark.slow
def test_training_goes_on_while_the_sqlite_store_is_locked_and_every_metric_arrives(tmp_path, corpus, store, reference):
    LockStore.events = {}
    db = store / "mlflow.db"
    callback = {"class_path": f"{__name__}.LockStore", "init_args": {"db": str(db)}}
    config = fault_config(tmp_path, corpus, "locked", store, trainer={"callbacks": [callback]})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_cli(["fit", "--config", str(config), "--allow_class_path", "tests"], tmp_path)
    events = LockStore.events
    # Training did not wait for the store: all steps ran while it was locked.
    assert events["locked"] < events["trained"] < events["released"]
    outage = [w for w in caught if issubclass(w.category, StoreUnavailableWarning)]
    assert len(outage) == 1, [str(w.message) for w in outage]
    assert "database is locked" in str(outage[0].message) and str(db) in str(outage[0].message)
    client = mlflow_client(store)
    run = only_run(client, "locked")
    assert run.info.status == "FINISHED"
    assert_same_curves(client, run.info.run_id, reference)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "figures")}
    assert artifacts == {"figures/loss_curves.png", "figures/parallax_diagnostics.png"}
    assert not (store / "mlflow_spool" / f"{run.info.run_id}.jsonl").exists()  # backlog written, spool gone


# -- NaN / inf ------------------------------------------------------------------------------------------------
def _poison_gradient_at(monkeypatch, step: int, param: str = "model.blocks.0.attn.r_proj.weight"):
    """After the backward of `step`, one parameter's gradient gets a NaN (as an overflow would leave it)."""
    from parallax_lightning.lm_module import LanguageModelModule

    def on_after_backward(self):
        if self.trainer.global_step == step:
            dict(self.named_parameters())[param].grad.view(-1)[0] = float("nan")

    monkeypatch.setattr(LanguageModelModule, "on_after_backward", on_after_backward, raising=False)
    return param


def test_nonfinite_gradient_stops_with_the_parameter_layer_and_checkpoints_named(
    tmp_path, corpus, store, capsys, monkeypatch
):
    from parallax_lightning.cli import main

    param = _poison_gradient_at(monkeypatch, step=3)
    config = fault_config(tmp_path, corpus, "nan-grad", store)
    with bare_argv(), working_dir(tmp_path), pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(config)])
    assert info.value.code == 3
    err = capsys.readouterr().err
    assert f"gradient of {param} (layer 0) is not finite at step 3" in err
    assert "nonfinite-step3.ckpt" in err and "the last good periodic checkpoint is" in err
    assert "last.ckpt (step 2)" in err
    [saved] = checkpoints(tmp_path / "runs", "nonfinite-step3.ckpt")
    assert ckpt_step(saved) == 3 and torch.isfinite(torch.load(saved, weights_only=True)["state_dict"][param]).all()
    assert only_run(mlflow_client(store), "nan-grad").info.status == "FAILED"


def test_nonfinite_gradient_skip_mode_drops_the_step_and_goes_on(tmp_path, corpus, store, monkeypatch):
    from parallax_lightning.lm_module import LanguageModelModule

    param = _poison_gradient_at(monkeypatch, step=2)
    seen = {}

    def on_train_batch_start(self, batch, batch_idx):
        seen[self.trainer.global_step] = {n: p.detach().clone() for n, p in self.named_parameters()}

    monkeypatch.setattr(LanguageModelModule, "on_train_batch_start", on_train_batch_start, raising=False)
    config = fault_config(tmp_path, corpus, "nan-skip", store, model={"nonfinite": "skip"})
    config_data = yaml.safe_load(config.read_text())
    config_data["trainer"]["max_steps"] = 4
    config.write_text(yaml.safe_dump(config_data))
    with pytest.warns(UserWarning, match=rf"skipping step 2: gradient of {param} \(layer 0\) is not finite"):
        run_cli(["fit", "--config", str(config)], tmp_path)
    # Step 2's update was dropped: the weights entering step 3 are those entering step 2; others did move.
    for name, before in seen[2].items():
        assert torch.equal(before, seen[3][name]), name
    assert not torch.equal(seen[1]["model.embed.weight"], seen[2]["model.embed.weight"])
    client = mlflow_client(store)
    run = only_run(client, "nan-skip")
    assert run.info.status == "FINISHED"
    skips = history(client, run.info.run_id, "train/nonfinite_skips")  # a running count, from step 2 on
    assert skips[0] == (2, 1.0) and {v for _, v in skips} == {1.0}
    assert all(torch.isfinite(torch.tensor(v)) for _, v in history(client, run.info.run_id, "train/loss"))
