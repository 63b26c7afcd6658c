#!/usr/bin/env bash
# The GPU table in one go (about 6-8 minutes on one H100/H200): DP-SGD overhead of fedllm
# and of stock Opacus, the worker-cache throughput ratio, updates/s at 1, 4 and 8 clients
# per GPU, and a bfloat16 against a float32 base, all at the smollm2-135m shape (random
# weights: cost figures only). Needs an NVIDIA GPU; exits 2 at once without one.
#
#   bash benchmarks/gpu.sh            # from the repository root, in the project's venv
#   WORK=/path bash benchmarks/gpu.sh # where the shape and cohort runs are written
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "benchmarks/gpu.sh: no CUDA GPU here (torch.cuda.is_available() is false); run it on a machine with an" \
         "NVIDIA GPU and a CUDA build of torch. CPU figures: benchmarks/dp_overhead.py, benchmarks/throughput.py" >&2
    exit 2
fi
WORK=${WORK:-$(mktemp -d -t fedllm-gpu-XXXX)}
BASE="$WORK/smollm2-135m"
[ -f "$BASE/fedllm-shape.json" ] || "$PY" -m fedllm.cli base shape smollm2-135m --out "$BASE"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" benchmarks/gpu.py --base "$BASE" --device cuda --work "$WORK" "$@"
