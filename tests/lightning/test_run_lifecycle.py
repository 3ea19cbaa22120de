"""A run's record across failed starts: bad settings, a missing or mismatched checkpoint and an inconsistent
tokenizer are refused before an MLflow run is opened or a finished run is continued; a resume that fails for
another reason before its first step leaves the run it meant to continue as it was;
`python -m parallax_lightning ui` takes its MLflow server down with it."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import free_port

from .platform_utils import WORDS, mlflow_client, only_run, run_cli, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


def _runs(store: Path, experiment: str) -> list:
    client = mlflow_client(store)
    exp = client.get_experiment_by_name(experiment)
    return [] if exp is None else client.search_runs([exp.experiment_id])


def _record(store: Path, experiment: str) -> tuple:
    """Everything a failed start must leave alone: status, times, tags, parameters, metrics, artifacts."""
    client = mlflow_client(store)
    run = only_run(client, experiment)
    rid = run.info.run_id
    return (
        run.info.status,
        run.info.start_time,
        run.info.end_time,
        dict(run.data.tags),
        dict(run.data.params),
        dict(run.data.metrics),
        sorted(a.path for a in client.list_artifacts(rid)),
    )


def _finished_run(tmp_path: Path, corpus: Path, store: Path, experiment: str) -> tuple[Path, Path]:
    config = tiny_config(
        tmp_path,
        corpus,
        experiment=experiment,
        store=store,
        trainer={"max_steps": 2, "val_check_interval": 2, "logger": {"init_args": {"system_metrics": False}}},
        diagnostics={"every_n_steps": 0},
    )
    run_cli(["fit", "--config", str(config)], tmp_path)
    assert only_run(mlflow_client(store), experiment).info.status == "FINISHED"
    [ckpt] = list((tmp_path / "runs").rglob("last.ckpt"))
    return config, ckpt


# -- resuming a finished run ---------------------------------------------------------------------------------
def test_a_mismatched_resume_names_the_parameter_and_leaves_the_finished_run_alone(tmp_path, corpus, store):
    config, ckpt = _finished_run(tmp_path, corpus, store, "mismatched-resume")
    before = _record(store, "mismatched-resume")
    args = ["fit", "--config", str(config), "--ckpt_path", str(ckpt), "--model.model.d_model", "64"]
    with pytest.raises(ValueError) as info:
        run_cli([*args, "--trainer.max_steps", "4"], tmp_path)
    message = str(info.value)
    assert "model.embed.weight has shape (320, 32) in the checkpoint but (320, 64) in the model" in message
    assert "d_model 32 (now 64)" in message and str(ckpt) in message
    assert _record(store, "mismatched-resume") == before  # status, end time, tags: all as they were


def test_a_resume_that_fails_before_its_first_step_keeps_the_runs_status(tmp_path, corpus, store, monkeypatch):
    """A failure no check foresaw (here: restoring the module's state raises) still must not turn a finished
    run into a failed one, nor move its end time."""
    from parallax_lightning.lm_module import LanguageModelModule

    config, ckpt = _finished_run(tmp_path, corpus, store, "failed-resume")
    before = only_run(mlflow_client(store), "failed-resume")

    def on_load_checkpoint(self, checkpoint):
        raise RuntimeError("restore failed")

    monkeypatch.setattr(LanguageModelModule, "on_load_checkpoint", on_load_checkpoint)
    with pytest.raises(RuntimeError, match="restore failed"), pytest.warns(UserWarning, match="keeps its status"):
        run_cli(["fit", "--config", str(config), "--ckpt_path", str(ckpt), "--trainer.max_steps", "4"], tmp_path)
    after = only_run(mlflow_client(store), "failed-resume")
    assert after.info.run_id == before.info.run_id
    assert (after.info.status, after.info.end_time) == ("FINISHED", before.info.end_time)
    assert after.data.tags.get("parallax.resumes", "0") == "0"  # the attempt is not counted as a resume


def test_checkpoint_check_names_shapes_and_keys(tmp_path):
    import torch

    from parallax_lightning.checkpoint_io import check_checkpoint_fits

    module = torch.nn.Linear(2, 3)
    path = tmp_path / "x.ckpt"

    def check(state, **kwargs):
        torch.save(state, path)
        check_checkpoint_fits(path, module, **kwargs)

    check({"state_dict": {"weight": torch.zeros(3, 2), "bias": torch.zeros(3)}})
    with pytest.raises(ValueError, match=r"weight has shape \(3, 4\) in the checkpoint but \(3, 2\) in the model"):
        check({"state_dict": {"weight": torch.zeros(3, 4), "bias": torch.zeros(3)}})
    with pytest.raises(ValueError, match="the checkpoint lacks bias"):
        check({"state_dict": {"weight": torch.zeros(3, 2)}})
    check({"state_dict": {"weight": torch.zeros(3, 2)}}, strict=False)  # what strict_loading=False allows
    with pytest.raises(ValueError, match="the model has no extra"):
        check({"state_dict": {"weight": torch.zeros(3, 2), "bias": torch.zeros(3), "extra": torch.zeros(1)}})
    with pytest.raises(ValueError, match="holds no 'state_dict'"):
        check({"weight": torch.zeros(3, 2)})
    with pytest.raises(FileNotFoundError, match=r"gone\.ckpt' does not exist"):
        check_checkpoint_fits(tmp_path / "gone.ckpt", module)
    check_checkpoint_fits(tmp_path, module)  # a folder (a sharded checkpoint) is left to its strategy


# -- refused before a run is opened ---------------------------------------------------------------------------
def _inconsistent_tokenizer(folder: Path) -> Path:
    """A word-level tokenizer.json whose 'fox' has id 5000 in a vocabulary of 28 ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "<|endoftext|>": 1}
    vocab.update({w: i + 2 for i, w in enumerate(sorted(set(WORDS)))})
    vocab["fox"] = 5000
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path = folder / "tokenizer.json"
    tok.save(str(path))
    assert json.loads(path.read_text())["model"]["vocab"]["fox"] == 5000
    return path


def _adamw_checkpoint(folder: Path) -> Path:
    """A checkpoint that fits the tiny config's model but was written by AdamW (the config says Muon)."""
    import torch

    from parallax_lightning.lm_module import LanguageModelModule
    from parallax_lightning.model import DecoderConfig

    config = DecoderConfig(
        vocab_size=320, max_seq_len=16, d_model=32, n_layers=1, n_heads=2, mlp_hidden=64, attention="parallax"
    )
    module = LanguageModelModule(model=config)
    path = folder / "adamw.ckpt"
    hparams = {"optimizer": {"name": "adamw"}}
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": hparams, "optimizer_states": [{}]}, path)
    return path


EARLY = {
    "missing checkpoint": (lambda d: ["--ckpt_path", str(d / "gone.ckpt")], "gone.ckpt' does not exist"),
    "checkpoint of another optimizer": (
        lambda d: ["--ckpt_path", str(_adamw_checkpoint(d))],
        "was trained with model.optimizer.name='adamw' but the config says 'muon'",
    ),
    "Muon momentum of 1": (lambda d: ["--model.optimizer.momentum", "1.0"], "momentum must be in [0, 1), got 1.0"),
    "unknown adjust_lr": (lambda d: ["--model.optimizer.adjust_lr", "rms"], "'original', 'match_rms_adamw', 'none'"),
    "zero Newton-Schulz steps": (lambda d: ["--model.optimizer.ns_steps", "0"], "ns_steps must be an integer >= 1"),
    "unknown coefficients": (lambda d: ["--model.optimizer.ns_coefficients", "x"], "'jordan', 'polar_express'"),
    "validation every 0 batches": (lambda d: ["--trainer.val_check_interval", "0"], "val_check_interval=0"),
    "accumulating 0 batches": (lambda d: ["--trainer.accumulate_grad_batches", "0"], "accumulate_grad_batches=0"),
    "logging every 0 steps": (lambda d: ["--trainer.log_every_n_steps", "0"], "log_every_n_steps=0"),
    "tokenizer ids beyond its vocabulary": (
        lambda d: [f"--data.tokenizer={_inconsistent_tokenizer(d)}"],
        "maps token 'fox' to id 5000, outside its vocabulary of 28 ids",
    ),
}


@pytest.mark.parametrize("case", list(EARLY))
def test_bad_settings_are_refused_before_a_run_is_opened(case, tmp_path, corpus, store, capsys):
    args, names = EARLY[case]
    experiment = "early-" + case.replace(" ", "-")
    config = tiny_config(tmp_path, corpus, experiment=experiment, store=store)
    with pytest.raises((ValueError, FileNotFoundError, SystemExit)) as info:
        run_cli(["fit", "--config", str(config), *args(tmp_path)], tmp_path)
    message = str(info.value) + capsys.readouterr().err  # jsonargparse prints some errors, then exits
    assert names in message, message[-2000:]
    assert _runs(store, experiment) == []  # no run was opened, so none is left FAILED
    assert not (tmp_path / "runs").exists()


def test_optimizer_choices_are_the_ones_muon_accepts():
    from parallax_lightning import optim
    from parallax_muon.layout import ADJUST_LR
    from parallax_muon.newton_schulz import PRESETS

    assert optim.ADJUST_LR == ADJUST_LR and optim.NS_COEFFICIENTS == PRESETS


# -- the MLflow UI ----------------------------------------------------------------------------------------------
def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def _wait_for(condition, seconds: float, interval: float = 0.2) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return condition()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _members(psutil, pid: int) -> list[tuple]:
    """(process, process group) of `pid`'s descendants still alive now."""
    found = []
    for p in psutil.Process(pid).children(recursive=True):
        with contextlib.suppress(ProcessLookupError):  # a short-lived helper already gone
            found.append((p, os.getpgid(p.pid)))
    return found


def _gone(psutil, p) -> bool:
    try:
        return p.status() == psutil.STATUS_ZOMBIE  # exited, only waiting to be reaped
    except psutil.NoSuchProcess:
        return True


# A stand-in for `mlflow server`: a process group of a leader and a worker, as start_ui makes it.
def _ui_env() -> dict:
    """This checkout on the path; warnings off, so the log holds only what the UI says."""
    return {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "PYTHONWARNINGS": "ignore"}


def _reap(ui, members: list, log) -> None:
    """Whatever the test left running: the UI process and any process group of its members still alive."""
    if ui.poll() is None:
        ui.kill()
        ui.wait()
    for group in {g for _, g in members}:
        if _group_alive(group):
            os.killpg(group, signal.SIGKILL)
    log.close()


_FAKE_SERVER = """
import signal, subprocess, sys, time
import parallax_lightning.tracking_ui as tracking_ui

# As started from a terminal (a test runner in the background may pass these signals on ignored).
signal.signal(signal.SIGINT, signal.default_int_handler)
signal.signal(signal.SIGHUP, signal.SIG_DFL)

def start_ui(*args, **kwargs):
    worker = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); time.sleep(600)"
    return subprocess.Popen([sys.executable, "-c", worker], start_new_session=True)

tracking_ui.start_ui = start_ui
sys.exit(tracking_ui.ui_main(["--port", "5999"]))
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_ui_stops_its_server_group_on_a_signal(tmp_path, signum):
    psutil = pytest.importorskip("psutil")
    env = _ui_env()
    log = open(tmp_path / "ui.log", "w")  # noqa: SIM115 - closed below; a file, not a pipe a leaked server could hold
    ui = subprocess.Popen([sys.executable, "-c", _FAKE_SERVER], cwd=tmp_path, env=env, stdout=log, stderr=log)
    members: list = []
    try:
        assert _wait_for(lambda: len(_members(psutil, ui.pid)) >= 2 or ui.poll() is not None, 120)
        members = _members(psutil, ui.pid)
        [group] = {g for _, g in members}
        assert group != os.getpgid(ui.pid)  # the server has a group of its own
        ui.send_signal(signum)
        assert ui.wait(timeout=60) == 128 + signum, (tmp_path / "ui.log").read_text()[-2000:]
        assert _wait_for(lambda: all(_gone(psutil, p) for p, _ in members), 30)
        assert _wait_for(lambda: not _group_alive(group), 30)
    finally:
        _reap(ui, members, log)


@pytest.mark.slow
def test_ui_stopped_with_sigterm_leaves_no_mlflow_server_listening(tmp_path):
    psutil = pytest.importorskip("psutil")
    port = free_port()
    env = _ui_env()
    cmd = [sys.executable, "-m", "parallax_lightning", "ui", "--port", str(port)]
    cmd += ["--backend-store-uri", f"sqlite:///{tmp_path / 'ui.db'}"]
    log = open(tmp_path / "ui.log", "w")  # noqa: SIM115 - closed below; a file, not a pipe the server could hold
    ui = subprocess.Popen(cmd, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    members: list = []
    try:
        started = _wait_for(lambda: ui.poll() is not None or _listening(port), 240)
        assert started and ui.poll() is None, f"the UI did not start: {(tmp_path / 'ui.log').read_text()[-2000:]}"
        members = _members(psutil, ui.pid)
        [group] = {g for _, g in members}  # the server and its workers: one group
        ui.send_signal(signal.SIGTERM)
        assert ui.wait(timeout=120) == 128 + signal.SIGTERM
        assert _wait_for(lambda: all(_gone(psutil, p) for p, _ in members), 60)
        assert _wait_for(lambda: not _group_alive(group), 60)
        assert not _listening(port)
    finally:
        _reap(ui, members, log)
