#!/usr/bin/env bash
# The paper campaign's runs in one command: unpack the shards if needed, train the given runs (run_grid.py),
# export each to OUT/runs/<run>.json, print the report over those records last.
#
#   experiments/paper/run_grid.sh [OUT] --runs cell:lr:seed ... [--concurrent N] [--deadline-s S] [--tiny]
#
# On the GPU machine (repository root as working folder, .gpu-wheels/ and .gpu-data/ carried):
#   source benchmarks/gpu_env.sh && bash experiments/paper/run_grid.sh "$OUT" --runs ...
# CPU dry run (tiny model, a few steps, same data and code path):
#   bash experiments/paper/run_grid.sh /tmp/grid_tiny --tiny --runs parallax-muon:0.02:0 --max-steps 20
#
# OUT (default: $OUT, else ./paper_out) receives runs/, stores/, logs/, grid_status.tsv, artifacts.tar.gz.
# Data, first found: $PAPER_DATA (a shard folder), .gpu-data/paper_shards.tar.xz (unpacked into
# $PAPER_SCRATCH, default /tmp/paper_grid, and checked against its SHA256SUMS when it has one), /tmp/paper_shards.
set -euo pipefail
cd "$(dirname "$0")/../.."

out=${OUT:-paper_out}
if [[ $# -gt 0 && $1 != -* ]]; then
    out=$1
    shift
fi
scratch=${PAPER_SCRATCH:-/tmp/paper_grid}
mkdir -p "$out" "$scratch"
py=${PYTHON:-python3}
command -v "$py" >/dev/null || py=python

data=${PAPER_DATA:-}
archive=.gpu-data/paper_shards.tar.xz
if [[ -z $data && -f $archive ]]; then
    data=$scratch/data/paper_shards
    if [[ ! -f $data/meta.json ]]; then
        echo "run_grid: unpacking $archive into $scratch/data"
        mkdir -p "$scratch/data"
        tar -xJf "$archive" -C "$scratch/data"
    fi
    if [[ -f $data/SHA256SUMS ]]; then
        (cd "$data" && sha256sum --quiet -c SHA256SUMS) || { echo "run_grid: $data does not match its SHA256SUMS" >&2; exit 2; }
    else  # an archive packed by hand: the data module still checks every shard's header and token range
        echo "run_grid: $archive has no SHA256SUMS (not packed by pack_data.sh): contents not checksummed"
    fi
fi
if [[ -z $data && -f /tmp/paper_shards/meta.json ]]; then
    data=/tmp/paper_shards
fi
if [[ -z $data || ! -f $data/meta.json ]]; then
    echo "run_grid: no token shards: set PAPER_DATA, or pack them with experiments/paper/pack_data.sh" >&2
    exit 2
fi
echo "run_grid: data $data"

# The shard data module opens tokenizer.json with `tokenizers`; the GPU image may lack it: install the wheel
# that pack_data.sh put beside the archive (no network there).
if ! "$py" -c "import tokenizers" 2>/dev/null; then
    wheel=$(ls .gpu-data/tokenizers-*.whl 2>/dev/null | tail -1 || true)
    if [[ -n $wheel ]]; then
        echo "run_grid: installing $wheel into $scratch/site"
        "$py" -m pip install -q --no-index --no-deps --no-compile --target "$scratch/site" "$wheel"
        export PYTHONPATH=$scratch/site${PYTHONPATH:+:$PYTHONPATH}
    fi
fi

# Fail in one second, not after the first run, when the environment lacks a piece.
"$py" - "$@" <<'EOF'
import importlib.util, sys
missing = [m for m in ("parallax_lightning", "lightning", "mlflow", "jsonargparse", "omegaconf", "tokenizers")
           if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"run_grid: missing Python packages: {', '.join(missing)} (on the GPU machine: source benchmarks/gpu_env.sh; "
             "tokenizers: experiments/paper/pack_data.sh puts a wheel in .gpu-data/)")
if importlib.util.find_spec("matplotlib") is None:
    print("run_grid: WARNING matplotlib is missing: each run's end-of-training figures will fail after its metrics "
          "are logged (report.py --print-only still works)", flush=True)
if "--tiny" not in sys.argv[1:]:
    import torch
    if not torch.cuda.is_available():
        sys.exit("run_grid: no CUDA device; the full grid needs the GPU (use --tiny for a CPU dry run)")
EOF

status=0
"$py" experiments/paper/run_grid.py --data "$data" --out "$out" --scratch "$scratch" "$@" || status=$?

echo
"$py" experiments/paper/report.py --runs-dir "$out/runs" --print-only \
    || echo "run_grid: report.py failed (the records are still in $out/runs)" >&2
exit $status
