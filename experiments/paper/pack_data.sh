#!/usr/bin/env bash
# Pack the paper's token shards into one xz archive that travels to the GPU machine with the command:
#
#   bash experiments/paper/pack_data.sh [SHARDS=/tmp/paper_shards] [ARCHIVE=.gpu-data/paper_shards.tar.xz]
#
# The archive holds paper_shards/{meta.json,tokenizer.json,*.bin,SHA256SUMS}; run_grid.sh unpacks it and checks
# the sums. .gpu-data/ is git-ignored (/.gpu-data/ in .gitignore or .git/info/exclude); carry it with the call.
# Beside it goes a `tokenizers` wheel (3.4 MB, Python >= 3.10, manylinux x86_64): the shard data module opens
# tokenizer.json with it, and the GPU image is not known to have it; run_grid.sh installs it only when
# `import tokenizers` fails there. PACK_TOKENIZERS_WHEEL=0 skips it.
# The shards are made by experiments/paper/build_corpus.py + experiments/prepare_shards.py (see README.md).
set -euo pipefail
cd "$(dirname "$0")/../.."
src=${1:-/tmp/paper_shards}
dest=${2:-.gpu-data/paper_shards.tar.xz}
limit_mb=${PACK_LIMIT_MB:-26}
[[ -f $src/meta.json ]] || { echo "pack_data: $src has no meta.json (not a prepare_shards.py folder)" >&2; exit 2; }
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir "$stage/paper_shards"
for f in "$src"/meta.json "$src"/tokenizer.json "$src"/*.bin; do
    [[ -f $f ]] && ln -s "$(cd "$(dirname "$f")" && pwd)/$(basename "$f")" "$stage/paper_shards/"
done
(cd "$stage/paper_shards" && sha256sum -- * > SHA256SUMS)
mkdir -p "$(dirname "$dest")"
# -h stores the files the links point to; xz -9e: the shards are 16-bit tokens, they shrink to about 40%.
tar -chf - -C "$stage" paper_shards | xz -9e -T0 > "$dest.partial"
mv "$dest.partial" "$dest"
size=$(stat -c %s "$dest")
echo "pack_data: $dest $((size / 1024)) KiB from $(du -shL "$src" | cut -f1) in $src"
if [[ ${PACK_TOKENIZERS_WHEEL:-1} != 0 ]] && ! ls "$(dirname "$dest")"/tokenizers-*.whl >/dev/null 2>&1; then
    version=${TOKENIZERS_VERSION:-0.23.3}
    python3 -m pip download -q "tokenizers==$version" --no-deps --only-binary=:all: \
        --platform manylinux2014_x86_64 --python-version 3.12 --implementation cp -d "$(dirname "$dest")" \
        || echo "pack_data: could not fetch the tokenizers wheel (run_grid.sh then needs tokenizers installed)" >&2
fi
ls -l "$(dirname "$dest")"
if (( size > limit_mb * 1024 * 1024 )); then
    echo "pack_data: larger than ${limit_mb} MB: the GPU call carries at most 64 MiB in all (wheels included)" >&2
    exit 1
fi
# Everything a campaign call carries: .gpu-data/ and .gpu-wheels/ together must stay under 64 MiB.
carry=$(du -cb "$(dirname "$dest")" .gpu-wheels 2>/dev/null | tail -1 | cut -f1)
echo "pack_data: the call carries $((carry / 1024 / 1024)) MiB (.gpu-data + .gpu-wheels; the limit is 64 MiB)"
if (( carry > 64 * 1024 * 1024 )); then
    echo "pack_data: over the 64 MiB a GPU call may carry" >&2
    exit 1
fi
