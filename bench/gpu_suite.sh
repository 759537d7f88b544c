#!/usr/bin/env bash
# Every GPU check and benchmark of the project, for a lent GPU machine (see docs/benchmarks.md).
#   bash bench/gpu_suite.sh kernels   # GPU tests of the op and plugin core + kernel/plugin/model benchmarks
#   bash bench/gpu_suite.sh ray       # Ray on 2 GPUs: build jobs on both cards, two Serve replicas
#   bash bench/gpu_suite.sh serving   # the serving benchmark (seed preset) with its baselines, 1 and 2 replicas
# Logs and results go to ${OUT:-docs/benchmarks}.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-docs/benchmarks}
mkdir -p "$out"
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1
[ -d /tmp/site/bin ] && export PATH="/tmp/site/bin:$PATH"
log="$out/gpu_${1}.log"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$log"
case "$1" in
  kernels)
    python3 -m pytest -q -m gpu tests/fa3trt -p no:cacheprovider 2>&1 | tee -a "$log" | tail -25
    for b in attention plugin_overhead model_throughput; do python3 -m bench.$b --out "$out" 2>&1 | tee -a "$log"; done
    ;;
  ray)
    python3 -m pytest -q -s -m gpu tests/build_jobs/test_gpu.py tests/deploy/test_gpu_serve.py -p no:cacheprovider 2>&1 | tee -a "$log" | tail -60
    ;;
  serving)
    python3 -m bench.serving --preset seed --layers 2 --mix 256-2048 --requests "${REQUESTS:-256}" --concurrency 32 --out "$out" 2>&1 | grep --line-buffered -vE "^\(|INFO|WARNING" | tee -a "$log"
    ;;
  *) echo "usage: $0 kernels|ray|serving" >&2; exit 2 ;;
esac
