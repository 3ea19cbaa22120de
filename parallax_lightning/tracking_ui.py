"""The MLflow UI: `python -m parallax_lightning ui` (`ui_main`) and `start_ui` serve it for a tracking store,
on 127.0.0.1 unless told otherwise (`exposure_warning` says what another address exposes), in a process group
of its own that Ctrl+C, SIGTERM or SIGHUP stop as a whole (`stop_process_group`). See SECURITY.md."""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import os
import signal
import subprocess
import sys
import time
import warnings

from .tracking import absolute_sqlite, default_tracking_uri

LOOPBACK = "127.0.0.1"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def ui_command(
    backend_store_uri: str | None = None, host: str = LOOPBACK, port: int = 5000, workers: int = 1
) -> list[str]:
    """The `mlflow server` command line for a store (default: this folder's mlflow.db), bound to `host`."""
    if not 0 < port < 65536:
        raise ValueError(f"port must be in 1..65535, got {port}")
    uri = absolute_sqlite(backend_store_uri or default_tracking_uri())
    return [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", host, "--port", str(port), "--workers", str(workers)]  # fmt: skip


def exposure_warning(host: str) -> str | None:
    """What binding the UI to a non-loopback address means, or None for 127.0.0.1 / ::1 / localhost."""
    if is_loopback(host):
        return None
    return (
        f"the MLflow UI will listen on {host}: anyone who can reach this machine's port can read every run, "
        "parameter and artifact (checkpoints included) and change or delete them; MLflow's server has no "
        "login by default. Prefer the default 127.0.0.1 with an SSH tunnel (ssh -L PORT:127.0.0.1:PORT host). "
        "See SECURITY.md."
    )


def start_ui(
    backend_store_uri: str | None = None, host: str = LOOPBACK, port: int = 5000, workers: int = 1, **popen_kwargs
) -> subprocess.Popen:
    """Start the MLflow UI (and REST API) in a new process group; stop it with os.killpg(proc.pid, SIGTERM).
    Binds to 127.0.0.1 unless `host` says otherwise, and warns when that exposes it to other machines."""
    warning = exposure_warning(host)
    if warning:
        warnings.warn(warning, stacklevel=2)
    cmd = ui_command(backend_store_uri, host=host, port=port, workers=workers)
    return subprocess.Popen(cmd, start_new_session=True, **popen_kwargs)


def ui_main(args: list[str]) -> int:
    """`python -m parallax_lightning ui`: the MLflow UI for a store, on 127.0.0.1 unless --host says otherwise."""
    parser = argparse.ArgumentParser(
        prog="python -m parallax_lightning ui",
        description="Serve the MLflow UI (and REST API) for a tracking store. It binds to 127.0.0.1: other "
        "machines cannot reach it (use an SSH tunnel). --host 0.0.0.0 exposes every run and artifact, "
        "without a login, to anyone who can reach the port; see SECURITY.md.",
    )
    parser.add_argument("--backend-store-uri", default=None, help="default: $MLFLOW_TRACKING_URI or ./mlflow.db")
    parser.add_argument("--host", default=LOOPBACK, help=f"address to bind (default {LOOPBACK}: this machine only)")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--workers", type=int, default=1)
    opts = parser.parse_args(args)
    warning = exposure_warning(opts.host)
    if warning:
        print(f"parallax_lightning ui: WARNING: {warning}", file=sys.stderr)
    proc = None
    # The server runs in its own process group (its workers too) so that it can be stopped as a whole: any
    # signal that would end this process stops that group first, or the server would outlive it.
    # A signal already ignored (`nohup` ignores SIGHUP) stays ignored.
    previous = {
        signum: signal.signal(signum, _raise_ui_stopped)
        for signum in _UI_STOP_SIGNALS
        if signal.getsignal(signum) is not signal.SIG_IGN
    }
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # printed above
            proc = start_ui(opts.backend_store_uri, host=opts.host, port=opts.port, workers=opts.workers)
        print(f"parallax_lightning ui: MLflow UI at http://{opts.host}:{opts.port} (Ctrl+C stops it)", file=sys.stderr)
        return proc.wait()
    except _UiStopped as stop:
        print(f"parallax_lightning ui: {signal.Signals(stop.signum).name}: stopping the MLflow server", file=sys.stderr)
        return 128 + stop.signum
    finally:
        if proc is not None:
            for signum in _UI_STOP_SIGNALS:  # a second Ctrl+C must not cut the clean-up short
                signal.signal(signum, signal.SIG_IGN)
            stop_process_group(proc)
        for signum, handler in previous.items():
            signal.signal(signum, handler)


_UI_STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)


class _UiStopped(BaseException):
    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise_ui_stopped(signum, frame) -> None:
    raise _UiStopped(signum)


def stop_process_group(proc, timeout: float = 20.0) -> None:
    """SIGTERM the process group led by `proc`, wait for all of it, SIGKILL whatever is left after `timeout`."""
    pgid = proc.pid
    if pgid <= 1 or pgid == os.getpgrp():
        # Not a group of its own (a pid of 0 would signal this process's own group, the shell that started it
        # included): leave the process alone rather than signal anything else.
        proc.wait()
        return
    for signum in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signum)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None and not _group_alive(pgid):
                return
            time.sleep(0.05)
    proc.wait()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
