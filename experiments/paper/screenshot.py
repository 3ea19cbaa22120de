"""Capture the MLflow UI's compare-runs view of the paper grid with headless Chromium.

    python experiments/paper/screenshot.py --tracking-uri sqlite:///path/mlflow.db [--experiment paper-grid]
        [--out experiments/paper/mlflow_compare.png]

Starts `mlflow server` on 127.0.0.1 (a free port) over the SQLite store, opens
`/#/compare-runs?runs=[...]&experiments=[...]` for the experiment's runs (or --run-ids) in headless
Chromium, saves a PNG, checks that the rendered page names every run (Chromium's --dump-dom after the same
virtual-time budget, from the same call), and stops the server's process group by its id. Needs the Debian package `chromium`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# environment.md: the flags that keep headless Chromium off the network and quiet on these machines.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--window-size=1600,1300",
)


class ChromiumNotFound(RuntimeError):
    """No Chromium/Chrome executable on PATH (install the Debian package `chromium`)."""


def find_chromium() -> str | None:
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sqlite_path(tracking_uri: str) -> Path:
    prefix = "sqlite:///"
    if not tracking_uri.startswith(prefix):
        raise ValueError(f"screenshot: the store must be an SQLite URI (sqlite:///...), got {tracking_uri!r}")
    path = Path(tracking_uri[len(prefix) :])
    if not path.is_file():
        raise FileNotFoundError(f"screenshot: no MLflow database at {path}")
    return path.resolve()


def _mlflow_command() -> list[str]:
    beside = Path(sys.executable).parent / "mlflow"
    if beside.is_file():
        return [str(beside)]
    found = shutil.which("mlflow")
    return [found] if found else [sys.executable, "-m", "mlflow"]


def compare_url(base: str, experiment_id: str, run_ids: list[str]) -> str:
    """The UI's compare-runs route (a hash route: runs and experiments as JSON lists)."""
    runs = urllib.parse.quote(json.dumps(run_ids, separators=(",", ":")))
    experiments = urllib.parse.quote(json.dumps([experiment_id], separators=(",", ":")))
    return f"{base}/#/compare-runs?runs={runs}&experiments={experiments}"


class MlflowServer:
    """`mlflow server` over an SQLite store on 127.0.0.1; a context manager that stops it by process group."""

    def __init__(self, db: Path, workdir: Path, port: int | None = None, timeout_s: float = 120.0):
        self.db, self.workdir, self.port, self.timeout_s = db, workdir, port or _free_port(), timeout_s
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log = workdir / "mlflow_server.log"

    def __enter__(self) -> MlflowServer:
        cmd = [*_mlflow_command(), "server", "--backend-store-uri", f"sqlite:///{self.db}"]
        cmd += ["--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]
        with open(self.log, "wb") as log:
            # Its own session: the server forks workers, and the whole group is stopped by this id at the end.
            self.proc = subprocess.Popen(
                cmd, cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.time() + self.timeout_s
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.base}/health", timeout=5) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                time.sleep(0.5)
        self.__exit__(None, None, None)
        raise TimeoutError(f"mlflow server did not answer on {self.base} within {self.timeout_s:.0f} s")

    def __exit__(self, *exc) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def _chromium(chromium: str, profile: Path, *args: str, timeout_s: float = 120.0) -> subprocess.CompletedProcess:
    cmd = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, timeout=timeout_s, start_new_session=True)


def _image_is_blank(path: Path) -> bool:
    """A page that never rendered is one flat colour."""
    import matplotlib.image

    pixels = matplotlib.image.imread(str(path))
    return float(pixels[..., :3].std()) < 0.01


def capture_compare_view(
    tracking_uri: str,
    experiment: str,
    run_ids: list[str],
    out: Path,
    wait_ms: int = 15000,
    check_dom: bool = True,
) -> Path:
    """Screenshot of the compare view of `run_ids` into `out`; raises when the page is blank or misses a run."""
    chromium = find_chromium()
    if chromium is None:
        raise ChromiumNotFound("screenshot: no chromium on PATH (apt-get install -y chromium)")
    db = _sqlite_path(tracking_uri)
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ValueError(f"screenshot: no experiment {experiment!r} in {db}")
    names = [client.get_run(r).info.run_name for r in run_ids]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="paper_shot_") as tmp:
        tmp = Path(tmp)
        with MlflowServer(db, tmp) as server:
            url = compare_url(server.base, exp.experiment_id, run_ids)
            # One Chromium call renders the page once, writes the PNG and prints the DOM as it stands then.
            done = _chromium(
                chromium,
                tmp / "profile",
                f"--virtual-time-budget={wait_ms}",
                "--dump-dom",
                f"--screenshot={out.resolve()}",
                url,
            )
            if not out.is_file():
                raise RuntimeError(
                    f"chromium wrote no screenshot (exit {done.returncode}): {done.stderr.decode()[-2000:]}"
                )
            if _image_is_blank(out):
                raise RuntimeError(f"the screenshot {out} is one flat colour: the MLflow UI did not render {url}")
            if check_dom:
                dom = done.stdout.decode(errors="replace")
                absent = [n for n in names if n not in dom]
                if absent:
                    raise RuntimeError(f"the compare view at {url} does not show run(s) {absent}")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tracking-uri", required=True)
    p.add_argument("--experiment", default="paper-grid")
    p.add_argument("--run-ids", nargs="+", default=None, help="default: every run of the experiment")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "mlflow_compare.png"))
    args = p.parse_args(argv)
    run_ids = args.run_ids
    if run_ids is None:
        from mlflow import MlflowClient

        client = MlflowClient(args.tracking_uri)
        exp = client.get_experiment_by_name(args.experiment)
        if exp is None:
            p.error(f"no experiment {args.experiment!r} in {args.tracking_uri}")
        run_ids = [r.info.run_id for r in client.search_runs([exp.experiment_id], max_results=50)]
    path = capture_compare_view(args.tracking_uri, args.experiment, run_ids, Path(args.out))
    print(f"screenshot: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
