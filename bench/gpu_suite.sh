#!/usr/bin/env bash
# Every GPU check and benchmark of the project, for a lent GPU machine (see docs/benchmarks.md).
#   bash bench/gpu_suite.sh kernels   # GPU tests (op, plugin core, OOM split) + kernel/plugin/model benchmarks
#   bash bench/gpu_suite.sh serving   # the serving benchmark (seed preset) with its baselines, 256-2048 mix
#   bash bench/gpu_suite.sh long      # the serving benchmark on the seed (15000-16500) and 256-16384 mixes
#   bash bench/gpu_suite.sh ray       # 2 GPUs: build jobs on both cards, two Serve replicas, build timing, 1 vs 2 replicas
# Logs and results go to ${OUT:-docs/benchmarks}.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-docs/benchmarks}
mkdir -p "$out"
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1
[ -d /tmp/site/bin ] && export PATH="/tmp/site/bin:$PATH"
log="$out/gpu_${1}.log"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$log"
serving() { python3 -m bench.serving --preset seed --layers 2 "$@" --out "$out" 2>&1 | grep --line-buffered -vE "^\(|INFO|WARNING" | tee -a "$log"; }
case "$1" in
  kernels)
    python3 -m pytest -q -m gpu tests/fa3trt tests/deploy/test_gpu_oom.py -p no:cacheprovider 2>&1 | tee -a "$log" | tail -25
    for b in attention plugin_overhead model_throughput cudnn_ragged_probe; do
      [ -f "bench/$b.py" ] && python3 -m bench.$b --out "$out" 2>&1 | grep -v "^\s*$" | tee -a "$log"
    done
    ;;
  serving)
    serving --mix 256-2048 --requests "${REQUESTS:-256}" --concurrency 32 --scenarios direct,noop,unbatched,one-bucket,buckets,batch1,open
    ;;
  long)
    serving --mix seed --requests 48 --concurrency 8 --scenarios direct,unbatched,buckets --max-batch-tokens 65536
    serving --mix 256-16384 --requests 128 --concurrency 32 --scenarios direct,unbatched,one-bucket,buckets --max-batch-tokens 65536
    ;;
  ray)
    python3 -m pytest -q -s -m gpu tests/build_jobs/test_gpu.py tests/deploy/test_gpu_serve.py -p no:cacheprovider 2>&1 | tee -a "$log" | tail -60
    python3 -m bench.build_timing --specs 2 --out "$out" 2>&1 | grep -vE "^\(|INFO|WARNING" | tee -a "$log"
    serving --mix 256-2048 --requests "${REQUESTS:-256}" --concurrency 32 --scenarios scale --name serving_seed_scaling
    ;;
  *) echo "usage: $0 kernels|serving|long|ray" >&2; exit 2 ;;
esac
