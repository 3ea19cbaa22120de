#!/usr/bin/env bash
# One-command set-up: creates .venv in the repository root and installs the three packages
# (editable) with every extra, lm-evaluation-harness ([eval], for `python -m parallax_lightning eval`)
# and the test tools.
#
# torch is installed first and on its own: a bare resolver run for lightning would otherwise
# pick a multi-GB CUDA build of torch on a CPU-only machine. Where torch comes from:
#   PARALLAX_TORCH_INDEX set      that index (e.g. https://download.pytorch.org/whl/cu128 on a GPU machine);
#   no NVIDIA GPU (no nvidia-smi, no /dev/nvidia0) and PyTorch's CPU index reachable
#                                 the CPU index (torch 2.13.0+cpu: no CUDA libraries to download);
#   otherwise                     PyPI (also when the CPU index is unreachable or the install from it fails).
# PARALLAX_TORCH_SPEC picks another version (default: the torch pin of constraints.txt; a local version
# such as 2.13.0+cpu satisfies `torch==2.13.0`). PARALLAX_SETUP_DRY_RUN=1 prints the choice and the
# commands, and installs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
TORCH_SPEC=${PARALLAX_TORCH_SPEC:-$(grep -m1 '^torch==' constraints.txt)}
CPU_INDEX=${PARALLAX_TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
DRY_RUN=${PARALLAX_SETUP_DRY_RUN:-0}

has_nvidia_gpu() {
    command -v nvidia-smi >/dev/null 2>&1 || [[ -e ${PARALLAX_NVIDIA_DEVICE:-/dev/nvidia0} ]]
}

# A quick look (5 s at most) so that a machine without internet access to that host falls back to PyPI
# instead of failing the install.
index_reachable() {
    "$PY" - "$1" <<'PY' >/dev/null 2>&1
import sys, urllib.request
urllib.request.urlopen(sys.argv[1].rstrip("/") + "/torch/", timeout=5).close()
PY
}

TORCH_INDEX=""
if [[ -n "${PARALLAX_TORCH_INDEX:-}" ]]; then
    TORCH_INDEX=$PARALLAX_TORCH_INDEX
    echo "setup: torch ($TORCH_SPEC) from PARALLAX_TORCH_INDEX=$TORCH_INDEX"
elif has_nvidia_gpu; then
    echo "setup: NVIDIA GPU found: torch ($TORCH_SPEC) from PyPI (its CUDA build)"
elif index_reachable "$CPU_INDEX"; then
    TORCH_INDEX=$CPU_INDEX
    echo "setup: no NVIDIA GPU: torch ($TORCH_SPEC) from the CPU index $CPU_INDEX (no CUDA libraries)"
else
    echo "setup: no NVIDIA GPU, and the CPU index $CPU_INDEX is not reachable: torch ($TORCH_SPEC) from PyPI"
fi

PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
TORCH_CMD=("${PIP[@]}" install "$TORCH_SPEC")
[[ -n "$TORCH_INDEX" ]] && TORCH_CMD+=(--index-url "$TORCH_INDEX")
REST_CMD=("${PIP[@]}" install -c constraints.txt -e ".[all,dev,eval]")

if [[ "$DRY_RUN" == 1 ]]; then
    echo "dry run: ${TORCH_CMD[*]}"
    echo "dry run: ${REST_CMD[*]}"
    exit 0
fi

if [[ ! -x .venv/bin/python ]]; then
    "$PY" -m venv .venv
fi
if ! "${TORCH_CMD[@]}"; then
    if [[ "$TORCH_INDEX" == "$CPU_INDEX" ]]; then
        echo "setup: installing torch from $CPU_INDEX failed: trying PyPI"
        "${PIP[@]}" install "$TORCH_SPEC"
    else
        exit 1
    fi
fi
"${REST_CMD[@]}"

.venv/bin/python - <<'PY'
import parallax_kernels, parallax_lightning, parallax_muon, torch
print(f"ready: torch {torch.__version__}, cuda={torch.cuda.is_available()}")
PY
