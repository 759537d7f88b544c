"""A user's model through Serve vs the model called directly, in one run on one card.

Reads an app config naming a user's model (default ``examples/serve_flux_gpu.yaml``: FLUX.1's
transformer at its real width, 2 + 4 blocks, bf16), then:

1. direct: the model as the replica runs it (``fa3trt.serving.served.ModuleBackend``: loaded from its
   source, attention routed) called in this process on batches of equal-shape requests at the
   bucket's batch limit; its requests/s at saturation. The same requests through the eager,
   unrouted model give the reference answers.
2. served: the app deployed on an in-process Ray (one replica per GPU), ``--requests``
   requests of the same shape sent through the deployment handle ``--concurrency`` at a time;
   requests/s, p50 latency, and each answer's error against the unrouted reference (goal: within
   bf16 tolerance, relative error < 2e-2).

    python -m bench.serve_named --config examples/serve_flux_gpu.yaml --out docs/benchmarks
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from bench._common import bar_plot, card, save
from fa3trt.config import AppArgs
from fa3trt.models.spec import SourceSpec
from fa3trt.onnx.calls import select_output


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b) / max(np.linalg.norm(b.astype(np.float64)), 1e-30))


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def direct(args: AppArgs, length: int, other: int, n: int, device: str) -> dict[str, Any]:
    """Requests/s of the model called in-process at the bucket's batch limit, and the unrouted
    model's answers to the first requests (the reference)."""
    from fa3trt.serving.served import ModuleBackend

    assert isinstance(args.model, SourceSpec)
    backend = ModuleBackend(args.model, device)
    sig = backend.signature
    buckets = args.bucket_set()
    limit = buckets.batch_limit(buckets.index(length), args.batching.max_batch_tokens)
    reqs = [sig.sample_request(length, seed=i, other=other) for i in range(n)]
    for r in reqs:  # requests of one shape share their unbatched inputs (positions), as a client's would
        for t in sig.sent:
            if not t.batched:
                r[t.name] = reqs[0][t.name]
    checked = [sig.check(r, buckets) for r in reqs]
    # Reference: the unrouted model, one request at a time.
    refs = []
    with torch.inference_mode():
        for c in checked[: min(4, n)]:
            batch = sig.assemble([c], backend.device)
            out = select_output(backend.module(**batch), args.model.output.select)
            refs.append(sig.split(out.cpu(), [c])[0])
    batches = [checked[i : i + limit] for i in range(0, n, limit)]

    def run_all() -> None:
        for b in batches:
            sig.split(backend.run(sig.assemble(b, backend.device)).cpu(), b)

    run_all()  # warm
    _sync()
    t0 = time.perf_counter()
    run_all()
    _sync()
    seconds = time.perf_counter() - t0
    routed_err = max(
        _rel(sig.split(backend.run(sig.assemble([c], backend.device)).cpu(), [c])[0], ref)
        for c, ref in zip(checked, refs)
    )
    return {
        "requests": n,
        "batch_limit": limit,
        "seconds": seconds,
        "req_per_s": n / seconds,
        "routed_rel_err": routed_err,
        "reqs": reqs,
        "refs": refs,
    }


async def _send(handle: Any, reqs: list[dict[str, np.ndarray]], concurrency: int) -> tuple[list[Any], list[float]]:
    sem = asyncio.Semaphore(concurrency)
    lat: list[float] = []

    async def one(r: dict[str, np.ndarray]) -> Any:
        async with sem:
            t0 = time.perf_counter()
            out = await handle.infer.remote(r)
            lat.append(time.perf_counter() - t0)
            return out

    return list(await asyncio.gather(*(one(r) for r in reqs))), lat


def served(raw: dict[str, Any], reqs: list[dict[str, np.ndarray]], concurrency: int) -> dict[str, Any]:
    import ray
    from ray import serve

    from deploy.app import build_app

    ray.init(address="local", include_dashboard=False, logging_level="ERROR")
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": 8000})
        t0 = time.perf_counter()
        handle = serve.run(build_app(raw), name="fa3trt", route_prefix="/")
        start_s = time.perf_counter() - t0
        info = handle.info.remote().result()
        asyncio.run(_send(handle, reqs[: max(1, concurrency // 2)], concurrency))  # warm the path
        t0 = time.perf_counter()
        answers, lat = asyncio.run(_send(handle, reqs, concurrency))
        seconds = time.perf_counter() - t0
        stats = handle.stats.remote().result()
        serve.shutdown()
    finally:
        ray.shutdown()
    return {
        "start_s": start_s,
        "seconds": seconds,
        "req_per_s": len(reqs) / seconds,
        "p50_ms": statistics.median(lat) * 1e3,
        "answers": answers,
        "routing": info.get("routing"),
        "attention_kernel": info.get("attention_kernel"),
        "buckets": stats["buckets"],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="examples/serve_flux_gpu.yaml")
    p.add_argument("--length", type=int, default=4096, help="size of the bucketed axis (image tokens)")
    p.add_argument("--other", type=int, default=512, help="size of every other named axis (text tokens)")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--out", default="docs/benchmarks")
    p.add_argument("--name", default="serve_named_flux")
    p.add_argument("--device", default="cuda", help="cpu: a smoke run of the script with a tiny config")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench.serve_named needs a CUDA GPU (or --device cpu for a smoke run)")
    raw = yaml.safe_load(Path(args.config).read_text())["applications"][0]["args"]
    app = AppArgs.model_validate(raw)
    if not isinstance(app.model, SourceSpec):
        raise SystemExit(
            f"{args.config} serves the reference model; name a model source (README, 'Serve your own model')"
        )
    # Every named axis other than the bucketed one at --other.
    reqs_spec = app.model.signature()
    if any(args.other > hi or args.other < lo for lo, hi in reqs_spec.ranges.values()):
        raise SystemExit(f"--other {args.other} is outside an axis range {reqs_spec.ranges}")
    print(f"card: {card()}   {app.model.describe()}, {args.length} x {args.other} tokens, {args.requests} requests")
    d = direct(app, args.length, args.other, args.requests, args.device)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the direct model is gone; the replica gets the card
    print(
        f"direct: {d['req_per_s']:.2f} req/s (batches of {d['batch_limit']}); routed vs unrouted rel err {d['routed_rel_err']:.2e}"
    )
    s = served(raw, d["reqs"], args.concurrency)
    errs = [_rel(a[app.model.output.name], ref) for a, ref in zip(s["answers"], d["refs"])]
    ratio = s["req_per_s"] / d["req_per_s"]
    print(
        f"served (handle, concurrency {args.concurrency}): {s['req_per_s']:.2f} req/s, p50 {s['p50_ms']:.0f} ms, "
        f"{ratio:.3f}x direct; answers vs unrouted eager: max rel err {max(errs):.2e} (goal < 2e-2); "
        f"kernel {s['attention_kernel']}; routing {s['routing']}"
    )
    result = {
        "config": args.config,
        "model": app.model.describe(),
        "length": args.length,
        "other": args.other,
        "requests": args.requests,
        "concurrency": args.concurrency,
        "direct": {k: v for k, v in d.items() if k not in ("reqs", "refs")},
        "served": {k: v for k, v in s.items() if k != "answers"},
        "served_over_direct": ratio,
        "answer_max_rel_err": max(errs),
    }
    save(args.out, args.name, result)
    bar_plot(
        args.out,
        args.name,
        ["direct (in-process)", "served (handle)"],
        [d["req_per_s"], s["req_per_s"]],
        "requests/s",
        f"{app.model.describe()} {args.length}+{args.other} tokens, {card()}",
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
