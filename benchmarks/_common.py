"""What the benchmark scripts share: a run log printed as it goes and kept for $OUT, and writing results there.

The scripts run as ``python benchmarks/NAME.py``, so this folder is on ``sys.path`` and they import ``_common``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path


class RunLog:
    """``log(msg)`` prints ``msg`` (after the seconds since start, when ``timestamps``) and keeps the line."""

    def __init__(self, timestamps: bool = True) -> None:
        self.lines: list[str] = []
        self.start = time.time()
        self.timestamps = timestamps

    def elapsed(self) -> float:
        return time.time() - self.start

    def __call__(self, msg: str = "") -> None:
        line = f"[{self.elapsed():6.1f}s] {msg}" if msg and self.timestamps else msg
        print(line, flush=True)
        self.lines.append(line)


def save_outputs(out_dir: str | None, name: str, record, lines: list[str], default=None) -> None:
    """``{out_dir}/{name}.json`` (``record``) and ``{out_dir}/{name}.log`` (``lines``); nothing without ``out_dir``."""
    if not out_dir:
        return
    os.makedirs(out_dir, exist_ok=True)
    Path(out_dir, f"{name}.json").write_text(json.dumps(record, indent=1, default=default))
    Path(out_dir, f"{name}.log").write_text("\n".join(lines) + "\n")
