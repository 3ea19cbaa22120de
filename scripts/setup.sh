#!/usr/bin/env bash
# One-command set-up: creates .venv in the repository root and installs the three packages
# (editable) with every extra, lm-evaluation-harness ([eval], for `python -m parallax_lightning eval`)
# and the test tools.
#
# torch is installed first and on its own: a bare resolver run for lightning would otherwise
# pick a multi-GB CUDA build of torch on a CPU-only machine. PARALLAX_TORCH_SPEC and
# PARALLAX_TORCH_INDEX let a GPU user pick another build (e.g. an index URL of download.pytorch.org).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
TORCH_SPEC=${PARALLAX_TORCH_SPEC:-torch==2.13.0}

if [[ ! -x .venv/bin/python ]]; then
    "$PY" -m venv .venv
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)

if [[ -n "${PARALLAX_TORCH_INDEX:-}" ]]; then
    "${PIP[@]}" install "$TORCH_SPEC" --index-url "$PARALLAX_TORCH_INDEX"
else
    "${PIP[@]}" install "$TORCH_SPEC"
fi
"${PIP[@]}" install -c constraints.txt -e ".[all,dev,eval]"

.venv/bin/python - <<'PY'
import parallax_kernels, parallax_lightning, parallax_muon, torch
print(f"ready: torch {torch.__version__}, cuda={torch.cuda.is_available()}")
PY
