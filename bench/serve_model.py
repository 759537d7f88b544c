"""A model served through the one pipeline vs the same model called directly, on one card, in one run.

Reads an app config (default ``examples/serve_flux_gpu.yaml``: FLUX.1's transformer at its real
width, 2 + 4 blocks, bf16; ``examples/serve_sd3_gpu.yaml``: an SD3 transformer with 4-D latents),
makes ``--requests`` requests of one shape, and measures requests/s at the bucket's batch limit:

- ``direct``: the model as a user would call it in their own process, its attention routed as
  the replica routes it: each batch's inputs from host arrays to the GPU, the model, the output
  back to the host (``direct-device``: the inputs already on the GPU, the output left there);
- ``served``: the app on an in-process Ray (one replica), the requests sent through the
  deployment handle ``--concurrency`` at a time; ``served+graphs``: with ``cuda_graphs: true``;
- ``compiled-sdpa``: the unrouted model under ``torch.compile`` (PyTorch's SDPA: what a user
  compiles without this project), ``compiled-routed``: the routed model compiled
  (``compile_routed``), and ``served+compile``: the app with ``compile: true``.

Each served answer is checked against the eager unrouted model (relative error, bf16 tolerance).
Ratios are against ``direct`` (and the compiled ones against ``compiled-sdpa``), same process,
same card.

    python -m bench.serve_model --config examples/serve_flux_gpu.yaml --out docs/benchmarks
    python -m bench.serve_model --config examples/serve_flux.yaml --device cpu --requests 8 --passes direct,served
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from bench._common import bar_plot, card, save
from fa3trt.config import AppArgs
from fa3trt.models.sources import load_source
from fa3trt.onnx.calls import select_output
from fa3trt.signature import Signature

PASSES = ("direct", "direct-device", "served", "served+graphs", "compiled-sdpa", "compiled-routed", "served+compile")


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b) / max(np.linalg.norm(b.astype(np.float64)), 1e-30))


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def make_requests(sig: Signature, length: int, other: dict[str, int], n: int) -> list[dict[str, np.ndarray]]:
    """``n`` requests of one shape (the bucketed axis at ``length``, every other at its ``other`` size),
    sharing their unbatched inputs (positions), as one client's requests of one size do."""
    reqs = [sig.sample_request(length, seed=i, other=other) for i in range(n)]
    for r in reqs[1:]:
        r.update({t.name: reqs[0][t.name] for t in sig.sent if not t.batched})
    return reqs


def _stack(sig: Signature, reqs: list[dict[str, np.ndarray]], device: torch.device) -> dict[str, torch.Tensor]:
    """One batch of equal-shape requests, each input from the host to ``device`` in its declared dtype."""
    out = {}
    for t in sig.sent:
        arr = np.stack([r[t.name] for r in reqs]) if t.batched else reqs[0][t.name]
        out[t.name] = torch.from_numpy(arr).to(device, t.torch_dtype, non_blocking=True)
    return out


def time_batches(run: Callable[[list[dict[str, np.ndarray]]], Any], reqs: list[Any], limit: int) -> float:
    """Requests/s of ``run`` over ``reqs`` in batches of ``limit`` (one untimed pass first)."""
    batches = [reqs[i : i + limit] for i in range(0, len(reqs), limit)]
    for b in batches:
        run(b)
    _sync()
    t0 = time.perf_counter()
    for b in batches:
        run(b)
    _sync()
    return len(reqs) / (time.perf_counter() - t0)


def direct_passes(app: AppArgs, reqs: list[Any], limit: int, device: torch.device, want: set[str]) -> dict[str, Any]:
    """The model called in this process (see the module docstring); the unrouted answers of the
    first requests (the reference)."""
    from fa3trt.attention.compiled import compile_routed
    from fa3trt.attention.routing import route_attention

    spec, sig = app.model, app.model.signature()
    model = load_source(spec).module.to(device)
    out: dict[str, Any] = {}

    def routed(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if spec.routing == "off":
            return select_output(model(**batch), spec.select)
        with route_attention(model, spec.routing, log_level=10):
            return select_output(model(**batch), spec.select)

    with torch.inference_mode():
        out["refs"] = [
            select_output(model(**_stack(sig, [r], device)), spec.select).float().cpu()[0].numpy() for r in reqs[:4]
        ]
        if "direct" in want:
            out["direct"] = time_batches(lambda b: routed(_stack(sig, b, device)).cpu(), reqs, limit)
        if "direct-device" in want:
            on_device = {
                id(b[0]): _stack(sig, b, device) for b in (reqs[i : i + limit] for i in range(0, len(reqs), limit))
            }
            out["direct-device"] = time_batches(lambda b: routed(on_device[id(b[0])]), reqs, limit)
        routed_err = _rel(routed(_stack(sig, reqs[:1], device)).float().cpu()[0].numpy(), out["refs"][0])
        out["routed_rel_err"] = routed_err
    if want & {"compiled-sdpa", "compiled-routed"}:
        # Compiled in the user's own way; the first pass compiles, the timed one replays. Each
        # compiled model's answer to the first request is checked too (eager unrouted reference).
        compiled: dict[str, Any] = {}
        with torch.inference_mode():
            if "compiled-sdpa" in want:
                compiled["compiled-sdpa"] = torch.compile(model)
            if "compiled-routed" in want and spec.routing != "off":
                compiled["compiled-routed"] = compile_routed(model, spec.routing)
            for name, fn in compiled.items():
                before = _dynamo_counts()
                out[name] = time_batches(lambda b, fn=fn: select_output(fn(**_stack(sig, b, device)), spec.select).cpu(), reqs, limit)  # fmt: skip
                answer = select_output(fn(**_stack(sig, reqs[:1], device)), spec.select).float().cpu()[0].numpy()
                out.setdefault("compiled_rel_err", {})[name] = _rel(answer, out["refs"][0])
                after = _dynamo_counts()  # what dynamo made of this pass: graphs, breaks, recompiles
                out.setdefault("dynamo", {})[name] = {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}  # fmt: skip
            if "compiled-routed" in compiled:
                out["compiled_routing"] = compiled["compiled-routed"].report.as_dict()
    return out


def _dynamo_counts() -> dict[str, int]:
    """Dynamo's own counters so far: unique graphs, graph breaks by reason, recompiles."""
    from torch._dynamo.utils import counters

    got = {f"stats {k}": v for k, v in counters["stats"].items()}
    got |= {f"break: {k[:120]}": v for k, v in counters["graph_break"].items()}
    return got | {f"recompiles {k}": v for k, v in counters["recompiles"].items()}


async def _send(handle: Any, reqs: list[dict[str, np.ndarray]], concurrency: int) -> tuple[list[Any], list[float]]:
    sem = asyncio.Semaphore(concurrency)
    lat: list[float] = []

    async def one(r: dict[str, np.ndarray]) -> Any:
        async with sem:
            t0 = time.perf_counter()
            y = await handle.infer.remote(r)
            lat.append(time.perf_counter() - t0)
            return y

    return list(await asyncio.gather(*(one(r) for r in reqs))), lat


def served_pass(
    raw: dict[str, Any], reqs: list[dict[str, np.ndarray]], concurrency: int, **extra: Any
) -> dict[str, Any]:
    """The app (``raw`` args with ``extra``) on Ray's Serve, the requests through its handle."""
    from ray import serve

    from deploy.app import build_app

    t0 = time.perf_counter()
    handle = serve.run(build_app(dict(raw, **extra)), name="fa3trt", route_prefix="/")
    start_s = time.perf_counter() - t0
    info = handle.info.remote().result()
    asyncio.run(_send(handle, reqs, concurrency))  # warm: every batch shape the timed pass meets
    t0 = time.perf_counter()
    answers, lat = asyncio.run(_send(handle, reqs, concurrency))
    seconds = time.perf_counter() - t0
    stats = handle.stats.remote().result()
    serve.delete("fa3trt")
    return {
        "start_s": start_s,
        "req_per_s": len(reqs) / seconds,
        "p50_ms": statistics.median(lat) * 1e3,
        "answers": answers,
        "routing": info.get("routing"),
        "attention_kernel": info.get("attention_kernel"),
        "cuda_graphs": info.get("cuda_graphs"),
        "buckets": stats["buckets"],
        "phases_s": stats["phases_s"],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="examples/serve_flux_gpu.yaml")
    p.add_argument("--length", type=int, default=None, help="the bucketed axis's size (default: the largest bucket)")
    p.add_argument("--other", type=int, default=None, help="every other named axis (default: its range's max)")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--passes", default=",".join(PASSES), help=f"comma-separated subset of {','.join(PASSES)}")
    p.add_argument("--out", default="docs/benchmarks")
    p.add_argument("--name", default=None, help="result file name (default serve_model_<config stem>)")
    p.add_argument("--device", default="cuda", help="cpu: a smoke run of the script with a tiny config")
    args = p.parse_args(argv)
    want = set(args.passes.split(","))
    if want - set(PASSES):
        p.error(f"unknown passes {sorted(want - set(PASSES))}; choose from {PASSES}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench.serve_model needs a CUDA GPU (or --device cpu for a smoke run)")
    if args.device == "cpu":
        want -= {"served+graphs"}
    raw = yaml.safe_load(Path(args.config).read_text())["applications"][0]["args"]
    raw = dict(raw, backend="torch")
    app = AppArgs.model_validate(raw)
    sig, buckets = app.model.signature(), app.bucket_set()
    length = args.length or sig.sample_sizes(buckets)[sig.bucketed]
    # Every other axis at its largest accepted size (at most --other where given).
    largest = sig.sample_sizes(buckets)
    other = {a: n for a, n in largest.items() if a != sig.bucketed}
    if args.other:
        other = {a: (sig.accepted(a, 1, min(n, args.other)) or (n, n))[1] for a, n in other.items()}
    limit = buckets.batch_limit(buckets.index(length), app.batching.max_batch_tokens)
    reqs = make_requests(sig, length, other, args.requests)
    name = args.name or f"serve_model_{Path(args.config).stem}"
    shown = ", ".join(f"{a}={n}" for a, n in other.items())
    print(f"card: {card()}   {app.model.describe()}, {sig.bucketed}={length}, {shown}, batch limit {limit}")
    d = direct_passes(app, reqs, limit, torch.device(args.device), want)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the direct model is gone; the replica gets the card
    rates = {k: d[k] for k in PASSES if k in d}
    served: dict[str, Any] = {}
    if want & {"served", "served+graphs", "served+compile"}:
        import ray
        from ray import serve

        ray.init(address="local", include_dashboard=False, logging_level="ERROR")
        serve.start(http_options={"host": "127.0.0.1", "port": 8000})
        try:
            for pass_, extra in (
                ("served", {}),
                ("served+graphs", {"cuda_graphs": True}),
                ("served+compile", {"compile": True}),
            ):
                if pass_ in want:
                    served[pass_] = served_pass(raw, reqs, args.concurrency, **extra)
                    rates[pass_] = served[pass_]["req_per_s"]
        finally:
            serve.shutdown()
            ray.shutdown()
    errors = {
        k: max(_rel(np.asarray(a[sig.output.name], np.float32), ref) for a, ref in zip(s["answers"], d["refs"]))
        for k, s in served.items()
    }
    base, compiled_base = rates.get("direct"), rates.get("compiled-sdpa")
    print(f"{'pass':18s} {'req/s':>8s} {'ratio':>8s}  vs")
    for k, v in rates.items():
        ref_name, ref = ("compiled-sdpa", compiled_base) if "compile" in k else ("direct", base)
        ratio = f"{v / ref:8.3f}" if ref else "       -"
        err = f"  answers' max rel err {errors[k]:.1e}" if k in errors else ""
        print(f"{k:18s} {v:8.2f} {ratio}  {ref_name}{err}")
    print(f"routed vs unrouted (eager, one request): rel err {d['routed_rel_err']:.2e}")
    for k, e in d.get("compiled_rel_err", {}).items():
        print(f"{k} vs unrouted eager (one request): rel err {e:.2e}")
    if "compiled_routing" in d:
        print(f"compiled-routed routing report (every call): {d['compiled_routing']}")
    for k, c in d.get("dynamo", {}).items():
        print(f"{k}: dynamo {c}")
    result = {
        "config": args.config,
        "card": card(),
        "model": app.model.describe(),
        "sizes": {sig.bucketed: length, "other": other},
        "batch_limit": limit,
        "requests": args.requests,
        "concurrency": args.concurrency,
        "req_per_s": rates,
        "served_over_direct": {
            k: rates[k] / base for k in rates if base and k.startswith("served") and "compile" not in k
        },
        "compiled_over_sdpa": {k: rates[k] / compiled_base for k in rates if compiled_base and "compile" in k},
        "answer_max_rel_err": errors,
        "routed_rel_err": d["routed_rel_err"],
        "compiled_rel_err": d.get("compiled_rel_err"),
        "dynamo": d.get("dynamo"),
        "served": {k: {kk: vv for kk, vv in s.items() if kk != "answers"} for k, s in served.items()},
        "compiled_routing": d.get("compiled_routing"),
    }
    save(args.out, name, result)
    bar_plot(args.out, name, list(rates), list(rates.values()), "requests/s", f"{app.model.describe()} - {card()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
