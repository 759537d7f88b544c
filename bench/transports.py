"""Every way to call a running fa3trt app, in one run on one card.

Through deployment handles (the baseline), ``/v1`` HTTP through Serve's proxy and straight to the
replicas (direct ingress), and KServe v2 over HTTP and gRPC through tritonclient's own asyncio
clients (proxy and direct): each transport driven at once by several client processes (Ray
actors on the cluster's machines), then at batch 1 (one request in flight, the same requests for
every transport). Then the same passes against the app's identity twin (``backend: identity`` on
one CPU beside it, in the requests' dtype: every step of serving but the model and the GPU),
which is the most a transport carries on this host. Every pass records each client process's
CPU time over its wall time (a client near 1.0 is the limit, not the server) and the replicas'
busy fraction.

    RAY_SERVE_ENABLE_DIRECT_INGRESS=1 ray start --head   # each replica serves HTTP and gRPC itself
    serve run serve_config.yaml &
    python -m bench.transports --clients 4 --concurrency 32 --duration 15 --out docs/benchmarks

Writes ``<out>/<name>.json`` and ``<out>/<name>.png``; the summary says the best network path's
requests/s over the handle path's and each transport's batch-1 p50 over the handle's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bench._common import card, pyplot, save, save_figure
from bench.scaling import merge, per_replica, replica_stats
from bench.serve_load import (
    VERIFY,
    Send,
    handle_sender,
    http_sender,
    make_inputs,
    parse_mix,
    run_load,
    single_width,
    v2_grpc_sender,
    v2_http_sender,
)

TRANSPORTS = ("handle", "v1-http", "v1-http-direct", "v2-http", "v2-http-direct", "v2-grpc", "v2-grpc-direct")
"""``handle``: ``DeploymentHandle.infer``; ``v1-http``: .npy bodies to ``/v1/infer``; ``v2-*``:
KServe v2 through tritonclient (binary tensors); ``-direct``: to each replica's own port."""


MODEL_DEPLOYMENT = "ModelServer"


@dataclass
class Target:
    """Where one transport sends: the app (handles; gRPC metadata), and its addresses."""

    app: str
    model: str
    urls: list[str] = field(default_factory=list)
    """Base URLs (``/v1`` and v2 HTTP) or ``host:port`` (gRPC)."""
    actor: Any = None
    """``handle`` to a plain actor's ``echo`` (the floor server) instead of the model deployment."""


@contextlib.asynccontextmanager
async def open_sender(transport: str, target: Target, concurrency: int) -> AsyncIterator[Send]:
    """A ``Send`` for ``transport`` to ``target``, its clients opened on the running loop and
    closed on exit."""
    kind = transport.removesuffix("-direct")
    if kind == "handle" and target.actor is not None:
        actor = target.actor

        async def echo(x: np.ndarray) -> np.ndarray:
            y: np.ndarray = await actor.echo.remote(x)
            return y

        yield echo
    elif kind == "handle":
        from ray import serve

        # The model deployment itself (also behind ingress replicas, where the app's handle
        # would reach an ingress replica first).
        yield handle_sender(serve.get_deployment_handle(MODEL_DEPLOYMENT, target.app))
    elif kind == "v1-http":
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=600)
        async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
            yield http_sender(target.urls, session)
    elif kind == "v2-http":
        from tritonclient.http.aio import InferenceServerClient as HttpClient

        hosts = [u.split("://", 1)[-1] for u in target.urls]
        clients = [HttpClient(h, conn_limit=max(concurrency, 1), conn_timeout=600) for h in hosts]
        try:
            yield v2_http_sender(clients, target.model)
        finally:
            for c in clients:
                await c.close()
    elif kind == "v2-grpc":
        from tritonclient.grpc.aio import InferenceServerClient as GrpcClient

        grpc_clients = [GrpcClient(u) for u in target.urls]
        try:
            # Serve's gRPC proxy picks the application by this metadata when several are up.
            yield v2_grpc_sender(grpc_clients, target.model, headers={"application": target.app})
        finally:
            for gc in grpc_clients:
                await gc.close()
    else:
        raise ValueError(f"unknown transport {transport!r}; choose from {TRANSPORTS}")


class TransportClient:
    """One load-generating process (a Ray actor with its own event loop): any transport, a
    closed loop, its own CPU time measured."""

    def __init__(self, hidden: int, mix: tuple[int, int], dtype: str, seed: int) -> None:
        self.hidden, self.dtype = hidden, np.dtype(dtype)
        self.inputs = make_inputs(256, *mix, hidden, seed=seed, dtype=self.dtype)

    def ready(self) -> bool:
        return True

    def node_id(self) -> str:
        import ray

        return str(ray.get_runtime_context().get_node_id())

    async def run(
        self,
        transport: str,
        target: Target,
        concurrency: int,
        start_at: float,
        duration: float | None,
        verify: str = "values",
        fixed: tuple[int, int, int, int] | None = None,
    ) -> dict[str, Any]:
        """Closed loop from ``start_at`` (wall clock) for ``duration`` s, cycling this client's
        inputs; or, with ``fixed`` = (n, lo, hi, seed), those ``n`` requests once each."""
        inputs = (
            self.inputs
            if fixed is None
            else make_inputs(fixed[0], fixed[1], fixed[2], self.hidden, fixed[3], self.dtype)
        )
        async with open_sender(transport, target, concurrency) as send:  # its setup before the start
            await asyncio.sleep(max(0.0, start_at - time.time()))
            cpu0, t0 = time.process_time(), time.time()
            # A client whose sender took past the start still sends for a moment: it never stops
            # the pass with an error.
            left = None if duration is None else max(0.1, start_at + duration - time.time())
            res = await run_load(send, inputs, concurrency=concurrency, progress=False, duration=left, verify=verify)
        wall = time.time() - t0
        return {
            "start": t0,
            "end": time.time(),
            "requests": res.requests,
            "errors": res.errors,
            "first_error": res.first_error,
            "completions": res.completions,
            "cpu_s": time.process_time() - cpu0,
            "wall_s": wall,
        }


def client_cpu(parts: list[dict[str, Any]]) -> dict[str, float]:
    """The client processes' CPU time over their wall time: the busiest one and the mean."""
    fr = [p["cpu_s"] / p["wall_s"] for p in parts if p["wall_s"] > 0]
    return {"max": max(fr, default=0.0), "mean": sum(fr) / len(fr) if fr else 0.0}


def summarize(results: dict[str, dict[str, Any]], batch1: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The issue's two figures: the best network path's requests/s over the handle path's, and
    each transport's batch-1 p50 over the handle's."""
    out: dict[str, Any] = {}
    base = results.get("handle")
    nets = {t: r for t, r in results.items() if t != "handle" and r["requests"]}
    if base and base["rps"] and nets:
        best = max(nets, key=lambda t: nets[t]["rps"])
        out.update(best_network=best, best_network_over_handle=nets[best]["rps"] / base["rps"])
        out["rps_over_handle"] = {t: r["rps"] / base["rps"] for t, r in nets.items()}
    b1 = batch1.get("handle")
    if b1 and b1["p50_ms"] == b1["p50_ms"] and b1["p50_ms"] > 0:
        out["batch1_p50_over_handle"] = {t: r["p50_ms"] / b1["p50_ms"] for t, r in batch1.items() if t != "handle"}
    return out


class Runner:
    """Drives one app's transports with a fixed set of client actors."""

    def __init__(self, args: argparse.Namespace, hidden: int, mix: tuple[int, int]) -> None:
        import ray

        self.args, self.mix = args, mix
        cls = ray.remote(num_cpus=0)(TransportClient)  # clients never wait behind replicas for a CPU
        self.clients = [cls.remote(hidden, mix, args.dtype, seed=i) for i in range(args.clients)]
        ray.get([c.ready.remote() for c in self.clients])

    def close(self) -> None:
        import ray

        for c in self.clients:
            ray.kill(c)

    def load(self, transport: str, target: Target, seconds: float) -> dict[str, Any]:
        import ray

        start_at = time.time() + 1.0
        share = [len(x) for x in np.array_split(np.arange(self.args.concurrency), len(self.clients))]
        parts = ray.get(
            [
                c.run.remote(transport, target, k, start_at, seconds, self.args.verify)
                for c, k in zip(self.clients, share)
            ]
        )
        r = merge(parts, (start_at + min(self.args.ramp, seconds / 2), start_at + seconds))
        r["client_cpu"] = client_cpu(parts)
        return r

    def batch1(self, transport: str, target: Target) -> dict[str, Any]:
        import ray

        lo, hi = self.mix
        part = ray.get(
            self.clients[0].run.remote(
                transport, target, 1, time.time(), None, self.args.verify, (self.args.batch1_requests, lo, hi, 99)
            )
        )
        r = merge([part], (part["start"], part["end"] + 1.0))
        r["client_cpu"] = client_cpu([part])
        return r

    def batch1_passes(self, targets: dict[str, Target], label: str) -> dict[str, dict[str, Any]]:
        batch1: dict[str, dict[str, Any]] = {}
        for t, target in targets.items():
            batch1[t] = b = self.batch1(t, target)
            print(f"{label:8s} {t:15s} batch 1: p50 {b['p50_ms']:7.1f} ms  p99 {b['p99_ms']:7.1f} ms", flush=True)
        return batch1

    def measure(self, app: str, targets: dict[str, Target], label: str) -> dict[str, Any]:
        """Every transport under load, then every transport at batch 1."""
        from ray import serve

        handle = serve.get_deployment_handle(MODEL_DEPLOYMENT, app)
        n = self.args.replicas
        results: dict[str, dict[str, Any]] = {}
        for t, target in targets.items():
            self.load(t, target, self.args.warmup)
            before = replica_stats(handle, n)
            r = self.load(t, target, self.args.duration)
            r["replicas"] = per_replica(before, replica_stats(handle, n), r["span_s"])
            results[t] = r
            busy = [x["busy_fraction"] for x in r["replicas"] if x["busy_fraction"] is not None]
            print(
                f"{label:8s} {t:15s} {r['rps']:8.2f} req/s  p50 {r['p50_ms']:7.1f} ms  p99 {r['p99_ms']:7.1f} ms"
                f"  {r['errors']} err  clients' CPU max {r['client_cpu']['max']:.2f}"
                + (f"  replica busy {100 * max(busy):.0f}%" if busy else ""),
                flush=True,
            )
            if r["first_error"]:
                print(f"   first error: {r['first_error']}")
        batch1 = self.batch1_passes(targets, label)
        return {"load": results, "batch1": batch1, "summary": summarize(results, batch1)}


def find_targets(args: argparse.Namespace, app: str, route_prefix: str, want: list[str]) -> dict[str, Target]:
    from urllib.parse import urlsplit

    from deploy.targets import replica_targets

    # The replicas listen where Serve's proxy does (http_options.host): by default, reach them
    # on the proxy URL's host.
    host = args.target_host or urlsplit(args.url).hostname
    prefix = route_prefix.rstrip("/")
    out = {}
    for t in want:
        target = Target(app, app)
        if t.endswith("-direct"):
            proto = "gRPC" if t.startswith("v2-grpc") else "HTTP"
            target.urls = replica_targets(args.dashboard, app, proto, host)  # type: ignore[arg-type]
        elif t.startswith("v2-grpc"):
            target.urls = [args.grpc_url]
        elif t != "handle":
            target.urls = [args.url.rstrip("/") + prefix]
        out[t] = target
    return out


def deploy_identity(app_args: dict[str, Any], name: str, route_prefix: str, dtype: str) -> None:
    """The app's identity twin under ``name``, beside the app: ``backend: identity`` in the
    requests' dtype (no conversion anywhere), one CPU per replica and no GPU (the GPUs are the
    model's), so what it carries is the transports' and batching's own ceiling on this host."""
    import ray
    from ray import serve

    from deploy.app import application, ingress_plan, replica_plan
    from fa3trt.config import AppArgs, apply_env_overrides

    args = apply_env_overrides(dict(app_args)) | {"backend": "identity", "replica_cpus": 1}
    args["model"] = dict(args["model"]) | {"dtype": dtype}
    parsed = AppArgs.model_validate(args)
    opts = replica_plan(parsed, 0, 0)  # the CPU plan: one CPU a replica (replica_cpus)
    n = int(opts.get("num_replicas", 1)) + (ingress_plan(parsed)["num_replicas"] if parsed.ingress_replicas else 0)
    free = ray.available_resources().get("CPU", 0.0)
    if free < n:
        raise SystemExit(
            f"the identity twin needs {n} free CPU(s) and the cluster has {free:g}: serve the app with "
            "replica_cpus set so one is left, or pass --no-identity"
        )
    serve.run(application(parsed, opts), name=name, route_prefix=route_prefix)


FLOOR_TRANSPORTS = ("handle", "v1-http-direct", "v2-http-direct", "v2-grpc-direct")
"""The transports the floor server answers (the proxies are Serve's, so they have no floor)."""


def measure_floor(runner: Runner, want: list[str]) -> dict[str, Any]:
    """Batch 1 through each transport to a bare echo process (``bench.transport_floor``): the
    clients, the wire and the codecs, no Serve and no model."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from bench.transport_floor import FLOOR_MODEL, FloorServer

    # On the node of the client that drives batch 1, which reaches it at 127.0.0.1: the floor is
    # a same-host call (on one machine, the app's host too).
    node = ray.get(runner.clients[0].node_id.remote())
    strategy = NodeAffinitySchedulingStrategy(node, soft=False)
    server = ray.remote(num_cpus=0)(FloorServer).options(scheduling_strategy=strategy).remote()
    try:
        addr = ray.get(server.start.remote())
        urls = {"handle": [], "v1-http-direct": [addr["http"]], "v2-http-direct": [addr["http"]]}
        urls["v2-grpc-direct"] = [addr["grpc"]]
        targets = {
            t: Target(FLOOR_MODEL, FLOOR_MODEL, urls[t], actor=server if t == "handle" else None)
            for t in FLOOR_TRANSPORTS
            if t in want
        }
        return {"batch1": runner.batch1_passes(targets, "floor")}
    finally:
        ray.kill(server)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--app", default="fa3trt", help="the Serve application's name (also its v2 model name)")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="Serve's HTTP proxy")
    p.add_argument("--grpc-url", default="127.0.0.1:9000", help="Serve's gRPC proxy (host:port)")
    p.add_argument("--dashboard", default="http://127.0.0.1:8265", help="the Ray dashboard (direct-ingress ports)")
    p.add_argument(
        "--target-host",
        default=None,
        help="reach the replicas' own ports on this host (default: --url's host) instead of each listed node IP",
    )
    p.add_argument("--transports", default=",".join(TRANSPORTS), help=f"comma-separated subset of {TRANSPORTS}")
    p.add_argument("--clients", type=int, default=4, help="client processes per pass")
    p.add_argument("--concurrency", type=int, default=32, help="requests in flight per pass, over all clients")
    p.add_argument("--duration", type=float, default=15.0, help="seconds of each timed pass")
    p.add_argument("--warmup", type=float, default=4.0, help="seconds of untimed load before each timed pass")
    p.add_argument("--ramp", type=float, default=1.0, help="seconds at the start of a pass left out of its figures")
    p.add_argument("--batch1-requests", type=int, default=48, help="requests of each batch-1 pass")
    p.add_argument("--mix", default="256-2048")
    p.add_argument("--dtype", choices=["float16", "float32"], default="float16")
    p.add_argument("--verify", choices=VERIFY, default="shape", help="what each client checks of an answer")
    p.add_argument("--no-identity", action="store_true", help="skip the identity twin's passes")
    p.add_argument("--no-floor", action="store_true", help="skip the floor server's batch-1 passes")
    p.add_argument("--out", default="docs/benchmarks")
    p.add_argument("--name", default=None, help="result name (default transports_<app>)")
    args = p.parse_args()
    want = [t for t in args.transports.split(",") if t]
    if set(want) - set(TRANSPORTS):
        p.error(f"unknown transports {sorted(set(want) - set(TRANSPORTS))}; choose from {TRANSPORTS}")

    import ray
    import requests

    ray.init(address="auto", logging_level="ERROR")
    info = requests.get(f"{args.url.rstrip('/')}/v1/info", timeout=30).json()
    app_args = info["app_args"]
    mix = parse_mix(args.mix, max(info["buckets"]))
    args.replicas = (
        int(app_args["replicas"])
        if app_args["replicas"] != "auto"
        else max(1, int(ray.cluster_resources().get("GPU", 0)))
    )
    print(
        f"{card()}: app {args.app} ({info['backend']}, {info['model']['spec']}), mix {args.mix} "
        f"{args.dtype}, {args.clients} client processes, concurrency {args.concurrency}, {args.duration:.0f} s passes"
    )
    runner = Runner(args, single_width(info), mix)
    phases: dict[str, Any] = {}
    try:
        phases["model"] = runner.measure(args.app, find_targets(args, args.app, "/", want), "model")
        if not args.no_identity:
            twin = f"{args.app}-identity"
            deploy_identity(app_args, twin, "/identity", args.dtype)
            try:
                phases["identity"] = runner.measure(twin, find_targets(args, twin, "/identity", want), "identity")
            finally:
                from ray import serve

                serve.delete(twin)
        if not args.no_floor:
            phases["floor"] = measure_floor(runner, want)
    finally:
        runner.close()
    name = args.name or f"transports_{args.app}"
    result = {
        "args": vars(args),
        "info": {k: info[k] for k in ("backend", "device_name", "model", "buckets")},
        **phases,
    }
    save(args.out, name, result)
    report(phases)
    plot(args.out, name, phases, f"{info['model']['spec']}, mix {args.mix}, {card()}")


def report(phases: dict[str, Any]) -> None:
    for label, ph in phases.items():
        s = ph.get("summary", {})
        if "best_network" in s:
            print(
                f"{label}: best network path {s['best_network']}: {s['best_network_over_handle']:.2f}x the handle path (goal >= 0.8)"
            )
        for t, v in s.get("batch1_p50_over_handle", {}).items():
            print(f"{label}: batch-1 p50 {t}: {v:.2f}x the handle path's (goal <= 1.2)")
    base = phases.get("model", {}).get("batch1", {}).get("handle")
    if "floor" in phases and base:
        for t, r in phases["floor"]["batch1"].items():
            print(
                f"floor: batch-1 p50 {t}: {r['p50_ms']:.1f} ms with no Serve and no model, "
                f"{r['p50_ms'] / base['p50_ms']:.2f}x the model's handle path"
            )


def plot(out: str, name: str, phases: dict[str, Any], title: str) -> None:
    fig, (a, b) = pyplot().subplots(1, 2, figsize=(13, 4.5))
    ts = list(next(iter(phases.values()))["batch1"])
    width = 0.8 / len(phases)
    for j, (label, ph) in enumerate(phases.items()):
        # The floor has batch-1 passes only, and only of the transports it serves.
        xs = [i + (j - (len(phases) - 1) / 2) * width for i in range(len(ts))]
        if "load" in ph:
            rps = [ph["load"][t]["rps"] for t in ts]
            a.bar(xs, rps, width, label=label)
            for x, v in zip(xs, rps):
                a.text(x, v, f"{v:.0f}", ha="center", va="bottom", fontsize=7)
        kept = [(x, ph["batch1"][t]["p50_ms"]) for x, t in zip(xs, ts) if t in ph["batch1"]]
        b.bar([x for x, _ in kept], [v for _, v in kept], width, label=label)
    for ax, ylabel in ((a, "requests/s"), (b, "batch-1 p50 (ms)")):
        ax.set_xticks(range(len(ts)), ts, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
    if "model" in phases and "handle" in phases["model"]["load"]:
        a.axhline(0.8 * phases["model"]["load"]["handle"]["rps"], color="#c44e52", linestyle="--", linewidth=1)
        b.axhline(1.2 * phases["model"]["batch1"]["handle"]["p50_ms"], color="#c44e52", linestyle="--", linewidth=1)
    save_figure(fig, out, name, f"transports: {title} (dashed: the goals vs the handle path)")


if __name__ == "__main__":
    main()
