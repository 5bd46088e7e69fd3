#!/usr/bin/env bash
# Data-parallel fine-tuning demo: `edgekiln run` on 2 ranks (torchrun, gloo on CPU).
#
#   scripts/ddp_demo.sh [OUT_DIR]          # default OUT_DIR: runs/ddp-demo (overwritten)
#   NPROC=4 PYTHON=python scripts/ddp_demo.sh
#
# Small on purpose (small_cnn on the 8x8 scikit-learn digits, 2 + 2 epochs, two targets):
# a couple of minutes on 2 cores. Each rank trains on its share of every global batch of 64;
# rank 0 alone writes OUT_DIR, captures, exports, validates and writes manifest.json last.
set -euo pipefail

PYTHON=${PYTHON:-$(dirname "$0")/../.venv/bin/python}
NPROC=${NPROC:-2}
OUT=${1:-runs/ddp-demo}

RECIPE=$(mktemp --suffix=.toml)
trap 'rm -f "$RECIPE"' EXIT
cat > "$RECIPE" <<'TOML'
[model]
source = "edgekiln.models:small_cnn"
kwargs = { input_size = 8 }

[data]
source = "digits"

[train]
float_epochs = 2
qat_epochs = 2
batch_size = 64          # the global batch: each of NPROC ranks takes 64 / NPROC rows
lr = 0.005
qat_lr = 0.0005
seed = 0

[sparsity]
target = 0.5

[targets]
names = ["onnxruntime", "mcu:nrf52840"]
latency_runs = 3
TOML

# One BLAS thread per rank: NPROC ranks already fill the cores.
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "$PYTHON" -m torch.distributed.run --standalone \
    --nproc-per-node="$NPROC" -m edgekiln run "$RECIPE" --out "$OUT" --force

test -f "$OUT/manifest.json" || { echo "no manifest.json in $OUT: the run is incomplete" >&2; exit 1; }
echo "complete run in $OUT (manifest.json written last, by rank 0)"
