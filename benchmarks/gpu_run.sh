#!/usr/bin/env bash
# One short GPU run on a fresh H100/H200 machine: install what is missing, then every measurement
# fxfuse needs in priority order, each part under its own budget (benchmarks/gpu_run.py), within
# 8 minutes. Results land in benchmarks/results/*_<gpu>.json and gpu_run_<gpu>.md; commit them.
#   bash benchmarks/gpu_run.sh            # on the GPU machine, from the checkout
#   bash benchmarks/gpu_run.sh --dry      # anywhere: the same script at toy sizes on the CPU
set -uo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
PY=${PYTHON:-python}
if [[ "${1:-}" != "--dry" ]]; then
  # torch (CUDA build) and triton come with the machine's image or `pip install torch`; the rest is
  # small. Bounded: a slow mirror must not eat the run.
  timeout 90 $PY -m pip install -q -e ".[test]" transformers liger-kernel 2>&1 | tail -3 \
    || echo "NOT FINISHED: install (continuing with what is there)"
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader || true
fi
$PY benchmarks/gpu_run.py "$@"
rc=$?
echo "gpu_run.sh: $((SECONDS - start))s in all"
exit $rc
