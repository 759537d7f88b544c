"""Serving benchmark: the project's bucketed batching against its baselines, in one run on one
machine, through Ray Serve deployment handles (closed loop, fixed concurrency).

Scenarios, all on the same model, mix and concurrency:
  direct         backend.run on one request at a time, no Serve (the no-serving baseline)
  noop serve     a Serve deployment that returns its input (Serve's own cost; batch-1 latency)
  unbatched      the app with max_batch_size 1 in every bucket
  one bucket     the app with a single bucket (everything padded to the largest length)
  buckets        the app as configured (one queue per bucket)
plus an open-loop (Poisson) run of `buckets` at ~70% of its closed-loop throughput. Each
result records the replica's busy fraction (time with a batch in flight / run time).
``--scenarios`` picks a subset (e.g. ``direct,buckets`` for a long-sequence mix). Scaling over
replicas is ``bench.scaling``.

    python -m bench.serving --preset tiny --mix 256-2048 --out docs/benchmarks        # CPU, a laptop
    python -m bench.serving --preset seed --layers 2 --mix 256-2048 --out docs/benchmarks   # one GPU per replica
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import Any

import numpy as np
import torch

from bench._common import card, pyplot, save, save_figure
from bench.serve_load import (
    LoadResult,
    handle_sender,
    make_inputs,
    padding_ratio,
    parse_mix,
    print_summary,
    run_load,
    stats_delta,
)

BATCH_WAIT_S = 0.005
SCENARIOS = ("direct", "noop", "unbatched", "one-bucket", "buckets", "batch1", "open")


def bucket_edges(hi: int) -> list[int]:
    edges, e = [], 256
    while e < hi:
        edges.append(e)
        e *= 2
    return edges + [hi]


def app_args(model: dict[str, Any], hi: int, max_batch_tokens: int, **over: Any) -> dict[str, Any]:
    """The benchmarked app's arguments: power-of-two buckets up to the mix's longest sequence,
    ``max_batch_tokens`` per batch, the benchmarks' batch wait; ``over`` replaces any of them."""
    batching = {"max_batch_tokens": max_batch_tokens, "batch_wait_timeout_s": BATCH_WAIT_S}
    return {"model": model, "buckets": bucket_edges(hi), "batching": batching} | over


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--mix", default="256-2048")
    p.add_argument("--requests", type=int, default=160)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--max-batch-tokens", type=int, default=16384)
    p.add_argument("--out", default="docs/benchmarks")
    p.add_argument("--name", default=None, help="result file name (default serving_<preset>_<mix>)")
    p.add_argument("--dtype", choices=["float16", "float32"], default="float16", help="request payload dtype")
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma-separated subset of {','.join(SCENARIOS)}")
    args = p.parse_args()
    want = set(args.scenarios.split(","))
    if want - set(SCENARIOS):
        p.error(f"unknown scenarios {sorted(want - set(SCENARIOS))}; choose from {SCENARIOS}")

    import ray
    from ray import serve

    from deploy.app import build_app
    from fa3trt.buckets import Buckets
    from fa3trt.models.spec import ReferenceSpec
    from fa3trt.requests import check_request
    from fa3trt.serving.batch import assemble, split, wire_dtype
    from fa3trt.serving.torch_backend import TorchBackend
    from fa3trt.transfer import to_host

    lo, hi = parse_mix(args.mix)
    model: dict[str, Any] = {"preset": args.preset} | ({"layers": args.layers} if args.layers else {})
    spec = ReferenceSpec(preset=args.preset, layers=args.layers or None)
    cfg = spec.config()
    inputs = make_inputs(args.requests, lo, hi, cfg.hidden, dtype=np.dtype(args.dtype))
    gpus = torch.cuda.device_count()
    results: dict[str, dict[str, Any]] = {}
    t_start = time.perf_counter()

    def record(name: str, res: LoadResult, stats: dict[str, Any] | None = None) -> None:
        print(f"[{time.perf_counter() - t_start:6.0f}s]", end=" ")
        print_summary(name, res, stats)
        sys.stdout.flush()
        results[name] = res.summary() | {"stats": stats or {}}

    # 1. direct backend, one request at a time, no Serve (the same host path as a replica's:
    #    assembly into a page-locked batch, the answer back by one DMA).
    if "direct" in want:
        backend = TorchBackend(spec)
        sig, buckets = backend.signature, Buckets((hi,))

        async def direct(x: np.ndarray) -> np.ndarray:
            reqs = [check_request(sig, {"x": x}, buckets, x.dtype)]
            batch = assemble(sig, reqs, backend.device, lengths_on_device=backend.lengths_on_device)
            return split(sig, to_host(backend.run(batch.inputs).to(wire_dtype(sig, reqs))), reqs)[0]

        asyncio.run(direct(inputs[0]))  # warm

        res = asyncio.run(run_load(direct, inputs, concurrency=1, progress=False))
        record("direct (no Serve, batch 1)", res)
        # At concurrency 1 latencies come in input order: the first 64 are the batch-1 set below.
        results["direct (no Serve, batch 1)"]["p50_first64_ms"] = float(np.percentile(res.latencies_ms[:64], 50))
        del backend
        if gpus:
            torch.cuda.empty_cache()

    ray.init(address="local", include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": 8123})

    @serve.deployment(max_ongoing_requests=1000)
    class Noop:
        async def infer(self, x: np.ndarray) -> np.ndarray:
            return x

    def load(
        name: str, concurrency: int, mode: str = "closed", rate: float = 0.0, data: list[np.ndarray] | None = None
    ) -> LoadResult:
        handle = serve.get_app_handle("fa3trt")
        before = handle.stats.remote().result()

        async def go() -> LoadResult:
            return await run_load(
                handle_sender(handle), data or inputs, mode=mode, concurrency=concurrency, rate=rate, progress=False
            )

        res = asyncio.run(go())
        record(name, res, stats_delta(before, handle.stats.remote().result(), res.seconds))
        return res

    def deploy(**over: Any) -> None:
        serve.run(
            build_app(app_args(model, hi, args.max_batch_tokens, backend="torch", replicas=1) | over),
            name="fa3trt",
            route_prefix="/",
            blocking=False,
        )
        handle = serve.get_app_handle("fa3trt")
        handle.infer.remote(inputs[0]).result()  # ready and warm

    # 2. a no-op Serve deployment: the floor of Serve's own latency at batch 1.
    if "noop" in want:
        serve.run(Noop.bind(), name="noop", route_prefix="/noop")
        noop = serve.get_app_handle("noop")
        res = asyncio.run(run_load(handle_sender(noop), inputs[:64], concurrency=1, progress=False))
        record("noop serve (batch 1)", res)
        serve.delete("noop")

    # 3-5. the app: unbatched, one bucket, buckets; batch-1 latency of the buckets app.
    edges = bucket_edges(hi)
    if "unbatched" in want:
        deploy(
            batching={
                "max_batch_tokens": args.max_batch_tokens,
                "bucket_overrides": {e: {"max_batch_size": 1} for e in edges},
            }
        )
        load("serve unbatched", args.concurrency)
    if "one-bucket" in want:
        deploy(buckets=[hi])
        load("serve one bucket", args.concurrency)
    if want & {"buckets", "batch1", "open"}:
        deploy()
        closed = load("serve buckets", args.concurrency)
        if "batch1" in want:
            load("serve buckets (batch 1 latency)", 1, data=inputs[:64])
        # 6. open loop at ~70% of the closed-loop throughput.
        if "open" in want:
            load("serve buckets open loop (70%)", args.concurrency, mode="open", rate=0.7 * closed.rps)
    serve.shutdown()
    ray.shutdown()

    r = results
    summary: dict[str, Any] = {}

    def ratio(key: str, a: str, b: str, field: str = "rps") -> None:
        if a in r and b in r:
            summary[key] = r[a][field] / r[b][field]

    ratio("bucketed_vs_unbatched_throughput", "serve buckets", "serve unbatched")
    ratio("bucketed_vs_one_bucket_throughput", "serve buckets", "serve one bucket")
    ratio("bucketed_p99_vs_unbatched_p99", "serve buckets", "serve unbatched", "p99_ms")
    ratio("bucketed_vs_direct_throughput", "serve buckets", "direct (no Serve, batch 1)")
    b1, nop, dir1 = "serve buckets (batch 1 latency)", "noop serve (batch 1)", "direct (no Serve, batch 1)"
    if b1 in r and nop in r:
        summary["batch1_p50_vs_noop_p50_ms"] = [r[b1]["p50_ms"], r[nop]["p50_ms"]]
        if dir1 in r:
            # The goal read as: Serve's path costs at most 20% over a no-op deployment's round trip
            # plus the model's own compute (direct, same requests), plus the batch wait.
            goal = 1.2 * (r[nop]["p50_ms"] + r[dir1]["p50_first64_ms"]) + 1e3 * BATCH_WAIT_S
            summary["batch1_p50_ms"], summary["batch1_goal_ms"] = r[b1]["p50_ms"], goal
    for name, key in (("serve buckets", "padding_ratio_buckets"), ("serve one bucket", "padding_ratio_one_bucket")):
        if name in r:
            summary[key] = padding_ratio(r[name]["stats"])
    if "serve buckets" in r and "busy_fraction" in r["serve buckets"]["stats"]:
        summary["busy_fraction_buckets"] = r["serve buckets"]["stats"]["busy_fraction"]
    print(f"card: {card()}  model {args.preset} layers={cfg.layers}  mix {args.mix}  concurrency {args.concurrency}")
    for k, v in summary.items():
        print(f"  {k}: {v}")
    name = args.name or f"serving_{args.preset}_{args.mix}"
    save(args.out, name, {"args": vars(args), "results": results, "summary": summary, "time_unix": time.time()})
    _plot(args.out, name, results, f"{args.preset}, mix {args.mix}, {card()}")


def _plot(out: str, name: str, results: dict[str, dict[str, Any]], title: str) -> None:
    names = [n for n in results if "latency" not in n and "noop" not in n]
    fig, (a, b) = pyplot().subplots(1, 2, figsize=(12, 4))
    a.barh(names, [results[n]["tokens_per_s"] for n in names], color="#4c72b0")
    a.set_xlabel("tokens/s")
    b.barh(names, [results[n]["p99_ms"] for n in names], color="#dd8452")
    b.set_xlabel("p99 latency (ms)")
    b.set_yticks([])
    save_figure(fig, out, name, title)


if __name__ == "__main__":
    main()
