"""scripts/setup.sh picks where torch comes from (dry run: nothing is installed), and the version pins accept
the builds that the CPU index and the GPU machine have."""

from __future__ import annotations

import contextlib
import functools
import http.server
import os
import re
import shutil
import socket
import subprocess
import threading
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet

REPO = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def _index(folder: Path):
    """A local stand-in for the CPU index (it answers for /torch/)."""
    (folder / "torch").mkdir(parents=True)
    (folder / "torch" / "index.html").write_text("<html></html>")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # nothing listens there: refused at once


def _dry_run(tmp_path: Path, gpu_tool: bool, device: bool, cpu_index: str, **env) -> list[str]:
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir(exist_ok=True)
    if gpu_tool:
        tool = fake_bin / "nvidia-smi"
        tool.write_text("#!/bin/sh\nexit 0\n")
        tool.chmod(0o755)
    # The machine's own PATH minus any folder with a real nvidia-smi: the tests mean the same on a GPU host.
    path = [str(fake_bin)] + [d for d in os.environ["PATH"].split(os.pathsep) if not (Path(d) / "nvidia-smi").exists()]
    node = tmp_path / "nvidia0"
    if device:
        node.write_text("")
    full_env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("PARALLAX_")},
        "PATH": os.pathsep.join(path),
        "PARALLAX_SETUP_DRY_RUN": "1",
        "PARALLAX_NVIDIA_DEVICE": str(node),
        "PARALLAX_TORCH_CPU_INDEX": cpu_index,
        **env,
    }
    out = subprocess.run(
        [shutil.which("bash"), str(REPO / "scripts" / "setup.sh")],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert not (tmp_path / ".venv").exists()
    return out.stdout.splitlines()


def test_cpu_machine_takes_torch_from_the_cpu_index_when_it_answers(tmp_path):
    with _index(tmp_path / "index") as url:
        lines = _dry_run(tmp_path, gpu_tool=False, device=False, cpu_index=url)
    assert lines[0] == f"setup: no NVIDIA GPU: torch (torch==2.13.0) from the CPU index {url} (no CUDA libraries)"
    assert lines[1].endswith(f"install torch==2.13.0 --index-url {url}")
    assert lines[2].endswith("install -c constraints.txt -e .[all,dev,eval]")


def test_cpu_machine_falls_back_to_pypi_when_the_cpu_index_does_not_answer(tmp_path):
    url = _closed_port_url()
    lines = _dry_run(tmp_path, gpu_tool=False, device=False, cpu_index=url)
    assert (
        lines[0] == f"setup: no NVIDIA GPU, and the CPU index {url} is not reachable: torch (torch==2.13.0) from PyPI"
    )
    assert lines[1].endswith("install torch==2.13.0") and "--index-url" not in lines[1]


@pytest.mark.parametrize(("gpu_tool", "device"), [(True, False), (False, True)])
def test_gpu_machine_takes_torch_from_pypi(tmp_path, gpu_tool, device):
    with _index(tmp_path / "index") as url:  # reachable, but not for a GPU machine
        lines = _dry_run(tmp_path, gpu_tool=gpu_tool, device=device, cpu_index=url)
    assert lines[0] == "setup: NVIDIA GPU found: torch (torch==2.13.0) from PyPI (its CUDA build)"
    assert "--index-url" not in lines[1]


def test_torch_index_variable_overrides_the_choice(tmp_path):
    with _index(tmp_path / "index") as url:
        lines = _dry_run(
            tmp_path,
            gpu_tool=False,
            device=False,
            cpu_index=url,
            PARALLAX_TORCH_INDEX="https://example.invalid/cu128",
            PARALLAX_TORCH_SPEC="torch==2.11.0",
        )
    assert lines[0] == "setup: torch (torch==2.11.0) from PARALLAX_TORCH_INDEX=https://example.invalid/cu128"
    assert lines[1].endswith("install torch==2.11.0 --index-url https://example.invalid/cu128")


def _pins() -> dict[str, str]:
    found = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        name, sep, version = line.partition("==")
        if sep and not line.startswith("#"):
            found[name.strip()] = version.strip()
    return found


def _ranges() -> dict[str, SpecifierSet]:
    text = (REPO / "pyproject.toml").read_text()
    found = {}
    for name, spec in re.findall(r'"([A-Za-z][\w.-]*)(?:\[[\w,]+\])?((?:[<>=!~][^";]*)?)"', text):
        if spec:
            found[name.lower()] = SpecifierSet(spec)
    return found


def test_version_pins_accept_the_cpu_and_gpu_builds():
    ranges, pins = _ranges(), _pins()
    # The CPU index's wheel carries a local version; `==2.13.0` (constraints.txt, setup.sh) accepts it.
    assert SpecifierSet(f"=={pins['torch']}").contains(f"{pins['torch']}+cpu")
    # The GPU machine runs torch 2.11 and triton 3.6; CI runs the pins of constraints.txt.
    assert ranges["torch"].contains("2.11.0+cu130") and ranges["torch"].contains(f"{pins['torch']}+cpu")
    assert ranges["triton"].contains("3.6.0")
    for name in ("torch", "triton", "lightning", "mlflow", "jsonargparse", "omegaconf", "lm-eval", "tokenizers"):
        spec = ranges[name]
        assert spec.contains(pins[name]), f"pyproject's {name}{spec} refuses constraints.txt's {pins[name]}"
        assert any(s.operator == "<" for s in spec) and any(s.operator == ">=" for s in spec), name
    assert ranges["safetensors"].contains(pins["safetensors"])
