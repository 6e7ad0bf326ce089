#!/usr/bin/env bash
# GPU smoke test, run from the repository root on a machine with CUDA GPUs:
#
#   bash bench/gpu_smoke.sh [OUT_DIR]      # OUT_DIR default: a new temporary folder
#
# 1. dsnet/configs/tiny.yml's three stages on Ray Train with --use-gpu and amp (float16 +
#    GradScaler), on 2 workers (NCCL, one GPU each) when 2+ GPUs are listed, else 1:
#    every collective of a GPU run, validation's counters included, takes this path.
# 2. bench/inference.py --devices cuda --quick: the slicing, grouped and masked forwards.
# Each step runs under `timeout` (30 + 270 + 140 s, +10 s each to kill): under 8 minutes. Exits non-zero
# on the first failure. Python: $PYTHON, else .venv/bin/python, else python3.
set -euo pipefail

PIPELINE_S=270   # Ray start-up (~5 s) + 3 fits of ~20 s + tiny epochs: generous
INFERENCE_S=140
START=$(date +%s)

PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
    if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
OUT_DIR="${1:-$(mktemp -d -t dsnet-gpu-smoke.XXXXXX)}"
mkdir -p "$OUT_DIR"

step() {  # step NAME SECONDS CMD...: run CMD under a time limit, report its wall time
    local name=$1 limit=$2 t0 rc=0
    shift 2
    echo "== $name (limit ${limit}s): $*"
    t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" || rc=$?
    if (( rc != 0 )); then
        (( rc == 124 || rc == 137 )) && echo "== $name: timed out after ${limit}s" >&2
        echo "== $name FAILED (exit $rc) after $(( $(date +%s) - t0 ))s" >&2
        exit "$rc"
    fi
    echo "== $name ok in $(( $(date +%s) - t0 ))s"
}

if ! GPU_LIST=$(nvidia-smi -L 2>/dev/null); then
    echo "nvidia-smi -L failed: no NVIDIA GPU here; this smoke test needs one" >&2
    exit 1
fi
GPUS=$(grep -c '^GPU ' <<<"$GPU_LIST" || true)
if (( GPUS >= 2 )); then WORKERS=2; else WORKERS=1; fi
echo "$GPU_LIST"
echo "GPUs: $GPUS -> $WORKERS Ray Train worker(s); python: $PY; output: $OUT_DIR"
step "environment" 30 "$PY" -c "import torch, ray; print('torch', torch.__version__, \
'cuda', torch.version.cuda, 'nccl', torch.cuda.nccl.version(), 'ray', ray.__version__, \
'devices', torch.cuda.device_count()); assert torch.cuda.is_available()"

# Short socket paths for Ray, no usage reporting, this run's own local Ray.
export RAY_USAGE_STATS_ENABLED=0 RAY_TMPDIR="${RAY_TMPDIR:-/tmp/ray-smoke}"
mkdir -p "$RAY_TMPDIR"
step "pipeline (tiny, $WORKERS GPU worker(s), amp)" "$PIPELINE_S" \
    "$PY" -m pipelines.full -c dsnet/configs/tiny.yml --output "$OUT_DIR" --name smoke \
    --use-gpu --num-workers "$WORKERS" --set amp=true
for f in subnets.csv dynamic.csv dsnet_final.pt; do
    [[ -s "$OUT_DIR/smoke/results/$f" ]] || { echo "missing $OUT_DIR/smoke/results/$f" >&2; exit 1; }
done

step "inference benchmark (cuda, quick)" "$INFERENCE_S" \
    "$PY" bench/inference.py --devices cuda --quick --out "$OUT_DIR/inference"

echo "gpu smoke passed in $(( $(date +%s) - START ))s; outputs under $OUT_DIR"
