# Source this on the GPU machine (bash): puts the carried wheels and this repository on the path.
# The GPU image has torch, triton, lightning and torchmetrics; MLflow, omegaconf and jsonargparse
# travel as wheels in .gpu-wheels/ (an untracked folder the caller fills), the peers' kernels in .whl/.
set -o pipefail
export PYTHONUNBUFFERED=1
# A snapshot made with `git archive` has no .git: `git rev-parse HEAD > .snap/COMMIT` beside it lets the MLflow
# runs record which commit they ran (the parallax.git_commit tag).
[[ -f COMMIT ]] && export PARALLAX_GIT_COMMIT=$(<COMMIT)
site=/tmp/site
if [[ ! -d $site ]]; then
    wheels=()
    [[ -d .gpu-wheels ]] && wheels+=(.gpu-wheels/*.whl)
    [[ -d .whl ]] && wheels+=(.whl/*.whl)
    if (( ${#wheels[@]} )); then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target $site "${wheels[@]}" \
            || echo "gpu_env: wheel install failed" >&2
    fi
fi
export PYTHONPATH=$site:${PYTHONPATH:-}
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 \
    || echo "gpu_env: editable install failed" >&2
export OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,utilization.gpu --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
