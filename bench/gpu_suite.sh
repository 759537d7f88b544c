#!/usr/bin/env bash
# Every GPU check and benchmark of the project, for a lent GPU machine (see docs/benchmarks.md).
#   bash bench/gpu_suite.sh kernels   # GPU tests (op, plugin core, OOM split) + kernel/plugin/model benchmarks
#   bash bench/gpu_suite.sh serving   # the serving benchmark (seed preset) with its baselines, 256-2048 mix
#   bash bench/gpu_suite.sh long      # the serving benchmark on the seed (15000-16500) and 256-16384 mixes
#   bash bench/gpu_suite.sh ray       # 2 GPUs: build jobs on both cards, two Serve replicas, build timing, 1 vs 2 replicas
#   bash bench/gpu_suite.sh scale     # all GPUs: a `ray start` cluster, 1, 2, 4 (, 8) replicas at saturation
#                                     # (LAYERS=2, REPLICAS=1,2,4, VERIFY=values|shape, APP_JSON, SUFFIX, CLIENTS=<per replica>,
#                                     #  STEPS="multi model noop" (any of them), DURATION=<s>,
#                                     #  WARMUP=<s> (untimed load first), MIX=<lo-hi> (request lengths), FRESH=1 (a Ray
#                                     #  cluster started for each count); PROFILE=1 PROFILE_AT=<s>: py-spy
#                                     #  flame graphs of replicas and clients)
#   bash bench/gpu_suite.sh scale-serve  # all GPUs: build jobs, then `serve run serve_config.yaml` (a replica per GPU) over HTTP
#   bash bench/gpu_suite.sh pipeline  # the one pipeline: serving GPU tests (STEP=tests), bench.serve_model per CONFIGS with
#                                     # PASSES (STEP=models: served vs direct, CUDA graphs, compile), the seed model's served
#                                     # requests/s of this tree against BASELINE's (STEP=seed, RUNS; PROFILE=1: py-spy of the replica,
#                                     # PROFILE_AT, PROFILE_S); STEP=all for every step
#   bash bench/gpu_suite.sh generation  # generation on the server: bench.generation (step-level EDF/FIFO vs a loop per
#                                       # request vs request-level batching; CONFIG, REQUESTS, LOADS, SIZES, ARMS, TEXT, SUFFIX), its
#                                       # replay on a simulated clock (bench.generation_sim), then the generation GPU test
#                                       # (a FLUX-width generation vs the eager pipeline; TESTS=0: none; CUDA_GRAPHS=1:
#                                       # the config's passes as CUDA graphs)
#   bash bench/gpu_suite.sh fa3         # FA3 built from FA3_SRC (a flash-attention checkout with csrc/cutlass/include) by
#                                       # python -m fa3trt.fa3_build into /tmp/fa3build (later steps import it from there), a
#                                       # copy under $OUT/fa3build to carry to a fresh machine as FA3_BUILD=<that folder>
#   bash bench/gpu_suite.sh fp8         # FP8 attention: its GPU tests, then bench.fp8 (per kernel and shape vs bf16, the error,
#                                       # realistic activations, the seed model and a FLUX-width DiT end to end; PARTS, SUFFIX)
#   bash bench/gpu_suite.sh transports  # `serve run` of the 2-layer seed model: every transport (bench.transports), its identity twin
#                                       # (CLIENTS, CONCURRENCY, DURATION, WARMUP, TRANSPORTS, SUFFIX, CUDA_GRAPHS=1, INGRESS=N;
#                                       #  IDENTITY=0: no identity twin; PROFILE=1: py-spy of the replica)
# Logs and results go to ${OUT:-docs/benchmarks}.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-docs/benchmarks}
mkdir -p "$out"
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1
[ -d /tmp/site/bin ] && export PATH="/tmp/site/bin:$PATH"
# FlashAttention's CuTe DSL: the DSL's packages (a .pth file elsewhere) and a disk cache of compiled kernels.
[ -d /tmp/site/nvidia_cutlass_dsl/dsl_packages ] && export PYTHONPATH="$PYTHONPATH:/tmp/site/nvidia_cutlass_dsl/dsl_packages"
# FA3 proper, where the fa3 step built it on this machine (or FA3_BUILD names a build carried here).
fa3build=${FA3_BUILD:-/tmp/fa3build}
[ -d "$fa3build/flash_attn_3" ] && export PYTHONPATH="$PYTHONPATH:$(cd "$fa3build" && pwd)"
export FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=${FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED:-1}
export FLASH_ATTENTION_CUTE_DSL_CACHE_DIR=${FLASH_ATTENTION_CUTE_DSL_CACHE_DIR:-/tmp/flash_cute_cache}
log="$out/gpu_${1}.log"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$log"
serving() { python3 -m bench.serving --preset seed --layers 2 "$@" --out "$out" 2>&1 | grep --line-buffered -vE "^\(|INFO|WARNING" | tee -a "$log"; }
case "$1" in
  kernels)
    python3 -m pytest -q -m gpu tests/fa3trt tests/deploy/test_gpu_oom.py tests/deploy/test_gpu_streams.py -p no:cacheprovider 2>&1 | tee -a "$log" | tail -25
    for b in ${BENCHES:-attention fa3_kernel plugin_overhead host_path host_staging model_throughput routing cudnn_ragged_probe}; do
      [ -f "bench/$b.py" ] && python3 -m bench.$b --out "$out" 2>&1 | grep -v "^\s*$" | tee -a "$log"
    done
    ;;
  fa3)
    src=$(cd "${FA3_SRC:?FA3_SRC=<flash-attention checkout>}" && pwd)
    { command -v ninja || python3 -c "import ninja"; } >/dev/null 2>&1 || echo "no ninja: FA3's files compile one at a time" | tee -a "$log"
    start=$(date +%s)
    python3 -m fa3trt.fa3_build "$src" --inplace 2>&1 | grep -E "^\[[0-9]+/[0-9]+\]|error|Error|FA3 build" | tee -a "$log"
    echo "FA3 build: $(( $(date +%s) - start )) s" | tee -a "$log"
    rm -rf /tmp/fa3build && mkdir -p /tmp/fa3build
    cp -r "$src/hopper/flash_attn_3" "$src/hopper/flash_attn_interface.py" "$src/hopper/flash_attn_config.py" /tmp/fa3build/
    rm -rf "$out/fa3build" && cp -r /tmp/fa3build "$out/fa3build"
    PYTHONPATH="$PYTHONPATH:/tmp/fa3build" python3 -c "
import torch, flash_attn_interface, flash_attn_config
print('FA3 op:', torch.ops.flash_attn_3.fwd.default._schema.name, '; disabled:', sorted(k for k, v in flash_attn_config.CONFIG['build_flags'].items() if v))
" 2>&1 | tee -a "$log"
    ;;
  fp8)
    # FP8 attention (mode 1): its GPU tests (every FP8 kernel against float64, Triton quantization, CUDA graphs,
    # the plugin's enqueue core, a served model), then bench.fp8 (PARTS=attention,realistic,e2e).
    python3 -m pytest -q -m gpu tests/fa3trt/attention/kernels/test_fp8.py tests/fa3trt/attention/kernels/test_kernels.py \
      tests/fa3trt/trt/plugin/test_plugin.py -k "fp8 or FP8" -p no:cacheprovider 2>&1 | tee -a "$log" | tail -15
    python3 -m bench.fp8 --out "$out" --name "fp8${SUFFIX:-}" --parts "${PARTS:-attention,realistic,e2e}" 2>&1 \
      | grep --line-buffered -vE "UserWarning|^\s*$" | tee -a "$log"
    ;;
  generation)
    # CUDA_GRAPHS=1: the config with cuda_graphs: true (each pass one graph replay).
    config=${CONFIG:-examples/generate_flux_gpu.yaml}
    if [ "${CUDA_GRAPHS:-0}" = 1 ]; then
      sed 's/^\( *cuda_graphs:\) false/\1 true/' "$config" >/tmp/generation_graphs.yaml
      grep -q "cuda_graphs: true" /tmp/generation_graphs.yaml || { echo "CUDA_GRAPHS=1: no 'cuda_graphs: false' line in $config" | tee -a "$log"; exit 1; }
      config=/tmp/generation_graphs.yaml
    fi
    python3 -m bench.generation --config "$config" --requests "${REQUESTS:-60}" \
      --loads "${LOADS:-0.5,0.8,1.0}" --sizes "${SIZES:-512,768,1024}" --arms "${ARMS:-alone,request,step-fifo,step-edf}" --text "${TEXT:-512}" \
      --out "$out" --name "generation${SUFFIX:-}" 2>&1 | grep --line-buffered -vE "^\(|INFO|WARNING|UserWarning|exe_args|^\s*$" | tee -a "$log"
    # the same arrivals replayed from this run's pass times (the replay checked against the run)
    python3 -m bench.generation_sim "$out/generation${SUFFIX:-}.json" 2>&1 | tee -a "$log" | tail -16
    [ "${TESTS:-1}" = 1 ] && python3 -m pytest -q -m gpu tests/fa3trt/generation -p no:cacheprovider 2>&1 | tee -a "$log" | tail -8
    ;;
  pipeline)
    step=${STEP:-all}
    if [[ $step == all || $step == *tests* ]]; then
      python3 -m pytest -q -m gpu tests/fa3trt/serving tests/deploy/test_gpu_streams.py -p no:cacheprovider 2>&1 | tee -a "$log" | tail -15
    fi
    if [[ $step == all || $step == *models* ]]; then
      for cfg in ${CONFIGS:-examples/serve_flux_gpu.yaml examples/serve_sd3_gpu.yaml}; do
        python3 -m bench.serve_model --config "$cfg" --requests "${REQUESTS:-32}" --concurrency "${CONCURRENCY:-16}" \
          --passes "${PASSES:-direct,direct-device,served,served+graphs,compiled-sdpa,compiled-routed,served+compile}" \
          --out "$out" --name "serve_model_$(basename "$cfg" .yaml)${SUFFIX:-}" 2>&1 | grep --line-buffered -vE "^\(|INFO|WARNING|^\s*$" | tee -a "$log"
      done
    fi
    if [[ $step == all || $step == *seed* ]]; then
      # The seed model (2 layers) through the handle, closed loop, the 256-2048 mix: this tree and BASELINE (a
      # checkout of the code before, e.g. `git archive <commit>`), in turn, RUNS times, each in a fresh process.
      site=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages
      for run in ${RUNS:-1 2}; do
        for tree in "$PWD" ${BASELINE:+"$(cd "$BASELINE" && pwd)"}; do
          label=$([ "$tree" = "$PWD" ] && echo new || echo baseline)
          if [ "${PROFILE:-0}" = 1 ] && command -v py-spy >/dev/null; then
            # PROFILE=1: py-spy of the replica PROFILE_AT s after the start, for PROFILE_S s (every thread).
            (sleep "${PROFILE_AT:-60}"; pid=$(pgrep -f "ServeReplica" | head -1)
             [ -n "$pid" ] && py-spy record --pid "$pid" --duration "${PROFILE_S:-10}" --rate 200 --format raw --threads \
               --nonblocking --output "$out/pyspy_seed_${label}_run$run.txt" >/dev/null 2>&1) &
          fi
          (cd "$tree" && PYTHONPATH="$site:$tree" python3 -m bench.serving --preset seed --layers 2 --scenarios buckets \
            --requests "${SEED_REQUESTS:-640}" --concurrency 32 --out "$out" --name "serving_seed2_${label}_run$run" 2>&1 \
            | grep --line-buffered -E "serve buckets|card:" | sed "s/^/$label run $run: /" | tee -a "$log")
        done
      done
    fi
    ;;
  transports)
    # `serve run serve_config.yaml` of the seed model (LAYERS=2) with direct ingress on, then bench.transports: handles,
    # /v1 and KServe v2 over HTTP and gRPC through the proxy and straight to the replica, CLIENTS client processes,
    # batch 1, and the identity twin (PROFILE=1: py-spy of the replica under v2 HTTP direct afterwards, all threads
    # and those holding the GIL).
    export RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=token FA3TRT_MODEL_PRESET=seed FA3TRT_MODEL_LAYERS=${LAYERS:-2} RAY_SERVE_ENABLE_DIRECT_INGRESS=1
    ray stop --force >/dev/null 2>&1; ray get-auth-token --generate >/dev/null 2>&1 || true
    ray start --head --disable-usage-stats --dashboard-host=127.0.0.1 2>&1 | grep -iE "Ray runtime started" | tee -a "$log"
    export RAY_ADDRESS=auto
    # CUDA_GRAPHS=1: the app with cuda_graphs: true (each batch one graph replay); INGRESS=N: N ingress processes
    # in front of the model replica (ingress_replicas: N).
    config=serve_config.yaml extra=
    [ "${CUDA_GRAPHS:-0}" = 1 ] && extra="$extra\\n      cuda_graphs: true"
    [ -n "${INGRESS:-}" ] && extra="$extra\\n      ingress_replicas: $INGRESS"
    if [ -n "$extra" ]; then
      config=/tmp/serve_config_transports.yaml
      sed "s/^      backend: auto\$/      backend: auto$extra/" serve_config.yaml >"$config"
    fi
    serve run "$config" >"$out/serve_run_transports.log" 2>&1 &
    for _ in $(seq 300); do curl -sf http://127.0.0.1:8000/v1/info >/dev/null && serve status 2>/dev/null | grep -q "status: RUNNING" && break; sleep 1; done
    curl -s http://127.0.0.1:8000/v1/info | python3 -c "import json,sys; d=json.load(sys.stdin); print('app:', d['backend'], d['attention_kernel'], 'cuda_graphs', d['cuda_graphs'])" | tee -a "$log"
    python3 -m bench.transports --clients "${CLIENTS:-4}" --concurrency "${CONCURRENCY:-32}" --duration "${DURATION:-12}" \
      --warmup "${WARMUP:-3}" --transports "${TRANSPORTS:-handle,v1-http,v1-http-direct,v2-http,v2-http-direct,v2-grpc,v2-grpc-direct}" \
      --out "$out" --name "transports_seed${LAYERS:-2}${SUFFIX:-}" $([ "${IDENTITY:-1}" = 0 ] && echo --no-identity) 2>&1 | grep --line-buffered -vE "^\(|INFO|WARNING" | tee -a "$log"
    if [ "${PROFILE:-0}" = 1 ] && command -v py-spy >/dev/null; then
      # The replica under KServe v2 HTTP straight to it: where its time goes, and which threads hold the GIL.
      replica=$(pgrep -f "ServeReplica:fa3trt:ModelServer" | head -1)
      python3 -m bench.serve_load --transport v2-http --direct --target-host 127.0.0.1 --mix 256-2048 --requests 512 --duration 30 \
        --concurrency 32 --dtype float16 --verify shape 2>&1 | grep -E "^closed" | tee -a "$log" &
      load_pid=$!
      sleep 5
      for gil in "" "--gil"; do
        py-spy record --pid "$replica" --duration 10 --rate 200 --format raw --threads --nonblocking $gil \
          --output "$out/pyspy_replica_v2-http_direct${gil:+_gil}.txt" >/dev/null 2>&1
      done
      wait "$load_pid"  # not a bare wait: `serve run` is a background job too
    fi
    ray stop --force >/dev/null 2>&1
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
    python3 -m bench.scaling --address local --replicas 1,2 --preset seed --layers 2 --mix 256-2048 --out "$out" \
      --name scaling_seed_256-2048_2gpu 2>&1 | grep --line-buffered -vE "^\(|INFO|WARNING" | tee -a "$log"
    ;;
  scale|scale-serve)
    # The scale-out run (docs/benchmarks.md, "Scale-out"): a Ray cluster over every GPU of the machine.
    n=$(nvidia-smi -L | wc -l)
    counts=${REPLICAS:-$(python3 -c "print(','.join(str(c) for c in (1, 2, 4, 8) if c <= $n))")}
    nvidia-smi topo -m 2>&1 | grep -E "^GPU|CPU Affinity" | tee -a "$log"
    lscpu 2>/dev/null | grep -iE "^Socket|^NUMA node" | tee -a "$log"
    layers=${LAYERS:-2}
    # The model alone on 1, 2, 4 ... GPUs, without Ray: what the cards and the host allow.
    steps=${STEPS:-multi model noop}
    has() { [[ " $steps " == *" $1 "* ]]; }
    clients=${CLIENTS:-1}
    mix=${MIX:-256-2048}
    timing=(--duration "${DURATION:-30}" --warmup "${WARMUP:-8}" --clients-per-replica "$clients")
    csuf=$([ "$clients" = 1 ] || echo "_${clients}clients")
    [ "$1" = scale ] && has multi && python3 -m bench.multi_gpu --gpus "$counts" --layers "$layers" --out "$out" \
      --name "multi_gpu_seed${layers}_256-2048_${n}gpu${SUFFIX:-}" 2>&1 | grep --line-buffered -vE "Warning|warn" | tee -a "$log"
    export RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=token FA3TRT_MODEL_PRESET=seed FA3TRT_MODEL_LAYERS=$layers
    # scale-serve measures HTTP through the proxy and straight to every replica (direct ingress).
    [ "$1" = scale-serve ] && export RAY_SERVE_ENABLE_DIRECT_INGRESS=1
    ray stop --force >/dev/null 2>&1
    # Token authentication is on: every process (drivers, the serve CLI) reads ~/.ray/auth_token.
    ray get-auth-token --generate >/dev/null 2>&1 || true
    if [ "$1" = scale ] && [ "${FRESH:-0}" = 1 ]; then
      # FRESH=1: every replica count on a local cluster started for it (bench.scaling --fresh-cluster).
      cluster=(--address local --fresh-cluster); fsuf=_fresh
    else
      ray start --head --num-gpus="$n" --disable-usage-stats --dashboard-host=127.0.0.1 2>&1 | grep -iE "shm|object store|Ray runtime started" | tee -a "$log"
      export RAY_ADDRESS=auto
      cluster=(--address auto); fsuf=
    fi
    # Every GPU's SM clock, power, temperature and utilization every 5 s through the run: a batch
    # that takes longer with more replicas shows here if the cards themselves slowed down.
    nvidia-smi --query-gpu=timestamp,index,clocks.sm,clocks.mem,power.draw,temperature.gpu,utilization.gpu,clocks_throttle_reasons.active \
      --format=csv -l 5 >"$out/gpu_clocks_${1}_${n}gpu${SUFFIX:-}.csv" 2>/dev/null &
    smi=$!
    if [ "$1" = scale ]; then
      if [ "${PROFILE:-0}" = 1 ] && command -v py-spy >/dev/null; then
        # Once the largest count is under load (PROFILE_AT s after the start; 180 suits 1,2,4), sample every replica and
        # load client for 15 s: flame graphs of where their time goes.
        (sleep "${PROFILE_AT:-180}"
         for pid in $(pgrep -f "ServeReplica|LoadClient"); do
           py-spy record --pid "$pid" --duration 15 --rate 100 --nonblocking --output "$out/pyspy_$(tr -c 'A-Za-z0-9' _ </proc/$pid/comm | cut -c1-24)_$pid.svg" >/dev/null 2>&1 &
         done; wait) &
      fi
      verify=${VERIFY:-values}  # VERIFY=shape: load clients check shape and dtype only (less of the shared host's bandwidth)
      # APP_JSON: app arguments to override (e.g. '{"stream_per_bucket": false}'); SUFFIX names the result.
      has model && python3 -m bench.scaling "${cluster[@]}" --replicas "$counts" --preset seed --layers "$layers" --mix "$mix" --verify "$verify" \
        --app-json "${APP_JSON:-{\}}" "${timing[@]}" --out "$out" \
        --name "scaling_seed${layers}_${mix}_${n}gpu$([ "$verify" = values ] || echo "_verify-$verify")${csuf}${fsuf}${SUFFIX:-}" 2>&1 | grep --line-buffered -vE "^\(|INFO|WARNING" | tee -a "$log"
      # The same load on replicas that return their input: the serving path's own ceiling on this host.
      has noop && python3 -m bench.scaling "${cluster[@]}" --replicas "$counts" --noop --mix "$mix" --preset seed \
        "${timing[@]}" --out "$out" --name "scaling_noop_${mix}_${n}gpu${csuf}${fsuf}${SUFFIX:-}" 2>&1 | grep --line-buffered -vE "^\(|INFO|WARNING" | tee -a "$log"
    else
      # Engines (torch artifacts where TensorRT is missing) for the served model, one per GPU type.
      timeout 240 python3 -m build_jobs --address auto --no-progress 2>&1 | tail -4 | tee -a "$log"
      serve run serve_config.yaml >"$out/serve_run.log" 2>&1 &
      for _ in $(seq 300); do curl -sf http://127.0.0.1:8000/v1/info >/dev/null && serve status 2>/dev/null | grep -q "status: RUNNING" && break; sleep 1; done
      serve status 2>&1 | grep -E "status|replica_states|RUNNING" | head -8 | tee -a "$log"
      python3 -m bench.serve_load --url http://127.0.0.1:8000 --mix 256-2048 --requests 64 --concurrency $((16 * n)) --dtype float16 2>&1 | tail -3 | tee -a "$log"
      python3 -m bench.serve_load --url http://127.0.0.1:8000 --mix 256-2048 --requests $((256 * n)) --concurrency $((48 * n)) --dtype float16 \
        --json "$out/scale_serve_http_${n}gpu.json" 2>&1 | grep -v "load:" | tail -8 | tee -a "$log"
      python3 -m bench.serve_load --direct --target-host 127.0.0.1 --mix 256-2048 --requests $((256 * n)) --concurrency $((48 * n)) \
        --dtype float16 --json "$out/scale_serve_direct_${n}gpu.json" 2>&1 | grep -v "load:" | tail -$((8 + n)) | tee -a "$log"
      python3 - <<'PY' 2>&1 | tee -a "$log"
import collections, requests
seen = {}
for _ in range(64):
    i = requests.get("http://127.0.0.1:8000/v1/info", timeout=30).json()
    seen[i["replica"]] = (i["device_name"], i["cuda_visible_devices"], i["backend"], i["attention_kernel"])
for rid, v in sorted(seen.items()):
    print("replica", rid, *v)
print(len(seen), "replicas answered on", len({v[1] for v in seen.values()}), "distinct GPUs")
PY
      serve shutdown -y >/dev/null 2>&1
    fi
    ray stop --force >/dev/null 2>&1
    kill "$smi" 2>/dev/null
    ;;
  *) echo "usage: $0 kernels|serving|long|ray|scale|scale-serve" >&2; exit 2 ;;
esac
