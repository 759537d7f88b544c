"""Scale-out benchmark: the app's saturated throughput with 1, 2, 4 ... replicas, one per GPU, in
one Ray session on one cluster.

For each replica count N the app is deployed with N replicas, warmed, and driven through
deployment handles by load-client actors (``--clients-per-replica`` per replica; separate
processes, as other Ray jobs would call it) at a fixed concurrency per replica, so the load
grows with the replicas. Whether one client process is itself the limit shows by running the
same count with more clients sharing the same concurrency. The clients start together and send
for ``--duration`` seconds; throughput is the answers that arrive inside one window common to
all of them (from ``--ramp`` seconds after the start to the deadline), so neither the ramp-up
nor the drain after the deadline, nor the spread of the clients' ends, is counted against
larger replica counts. Efficiency is throughput(N) / (N x throughput(1)), the first count's
throughput scaled when it is not 1. Each replica's own counters (requests, busy fraction,
compute time per batch and its phases) are read before and after, and nvidia-smi samples the
GPUs through the pass, so a shortfall shows whether the replicas were idle (the path to them is
the limit), busy but slower (a shared host resource), or busy while their GPUs idled (their
host side: launching, staging, the event loop).

With ``--noop`` the replicas return their input instead (same placement, payloads and load):
the serving path's own ceiling on the host, against which the app's efficiency reads.

With ``--fresh-cluster`` each count runs on a local Ray cluster of its own, started for it and
stopped after it: no count inherits the state earlier passes left behind (the object store's
allocations, idle workers, the Serve controller's history). ``--merge`` combines result files
of separate runs (one count each) into one table and plot.

    ray start --head && python -m bench.scaling --address auto --replicas 1,2,4 --preset seed --layers 2
    python -m bench.scaling --address local --fresh-cluster --replicas 1,2,4 --preset seed --layers 2
    python -m bench.scaling --address local --replicas 1,2 --preset tiny --duration 10  # CPU dry run
    python -m bench.scaling --merge r1.json r2.json r4.json --name scaling_seed2_256-2048_fresh
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench._common import GpuSampler, card, cpu_shares, cpu_times, pyplot, save, save_figure
from bench.serve_load import VERIFY, handle_sender, make_inputs, parse_mix, run_load, stats_delta
from bench.serving import app_args

APP = "fa3trt-scaling"


class Echo:
    """A replica that returns its input (``--noop``): the serving path alone (handles, Ray's
    object store, the replica's event loop) at the same payloads, placement and load."""

    async def infer(self, x: np.ndarray) -> np.ndarray:
        return x


class LoadClient:
    """One load-generating process: its own handle, its own inputs, a closed loop."""

    def __init__(self, app: str, hidden: int, mix: tuple[int, int], dtype: str, seed: int) -> None:
        from ray import serve

        self.handle = serve.get_app_handle(app)
        self.inputs = make_inputs(512, *mix, hidden, seed=seed, dtype=np.dtype(dtype))

    def ready(self) -> bool:
        """Returns once the constructor (handle and inputs) is done."""
        return True

    def run(self, duration: float, concurrency: int, start_at: float, verify: str = "values") -> dict[str, Any]:
        """Closed loop from ``start_at`` (wall clock) until ``start_at + duration``."""
        time.sleep(max(0.0, start_at - time.time()))
        t0 = time.time()
        res = asyncio.run(
            run_load(
                handle_sender(self.handle),
                self.inputs,
                concurrency=concurrency,
                progress=False,
                duration=start_at + duration - t0,
                verify=verify,
            )
        )
        return {
            "start": t0,
            "end": time.time(),
            "requests": res.requests,
            "errors": res.errors,
            "completions": res.completions,
            "first_error": res.first_error,
        }


def merge(parts: list[dict[str, Any]], window: tuple[float, float]) -> dict[str, Any]:
    """One result from the clients' results: the answers that arrived inside ``window`` (wall
    clock, common to all clients) per second of it, and their latencies."""
    t0, t1 = window
    if t1 <= t0:
        raise ValueError(f"empty measurement window {window}")
    inside = [c for p in parts for c in p["completions"] if t0 <= c[0] <= t1]
    lat = np.asarray([c[1] for c in inside], dtype=np.float64)
    pct = (lambda q: float(np.percentile(lat, q))) if lat.size else (lambda q: float("nan"))
    seconds = t1 - t0
    return {
        "requests": len(inside),
        "errors": sum(p["errors"] for p in parts),
        "seconds": seconds,
        "rps": len(inside) / seconds,
        "tokens_per_s": sum(c[2] for c in inside) / seconds,
        "p50_ms": pct(50),
        "p99_ms": pct(99),
        "sent": sum(p["requests"] for p in parts),
        "span_s": max(p["end"] for p in parts) - min(p["start"] for p in parts),
        "clients": len(parts),
        "first_error": next((p["first_error"] for p in parts if p["first_error"]), None),
    }


def replica_stats(handle: Any, n: int, tries: int = 40) -> dict[str, dict[str, Any]]:
    """Every replica's counters, by replica id (each stats call reaches one replica at random)."""
    seen: dict[str, dict[str, Any]] = {}
    for _ in range(tries * n):
        st = handle.stats.remote().result()
        seen[st["replica"]] = st
        if len(seen) >= n:
            break
    return seen


def per_replica(
    before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]], seconds: float
) -> list[dict[str, Any]]:
    """Requests, busy fraction and compute per batch of each replica over one timed pass."""
    rows = []
    for rid, a in sorted(after.items()):
        d = stats_delta(before.get(rid, {"replica": rid, "buckets": {}}), a, seconds)
        batches = sum(b["batches"] for b in d["buckets"].values())
        rows.append(
            {
                "replica": rid,
                "requests": sum(b["requests"] for b in d["buckets"].values()),
                "batches": batches,
                "busy_fraction": d.get("busy_fraction"),
                "compute_ms_per_batch": 1e3
                * sum(b.get("compute_s", 0.0) for b in d["buckets"].values())
                / max(1, batches),
                "phases_ms_per_batch": d.get("phases_ms_per_batch", {}),
                "wake_lag": d.get("wake_lag"),
            }
        )
    return rows


def busiest_mean(utils: list[float], n: int) -> float | None:
    """Mean utilization of the ``n`` busiest GPUs (the replicas' own, one per GPU); None with no GPU."""
    if not utils:
        return None
    top = sorted(utils, reverse=True)[:n]
    return sum(top) / len(top)


def efficiency(results: dict[int, dict[str, Any]]) -> dict[int, float]:
    """throughput(N) / (N x per-replica throughput of the smallest count)."""
    base_n = min(results)
    per_replica = results[base_n]["rps"] / base_n
    return {n: r["rps"] / (n * per_replica) for n, r in results.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--address",
        default=None,
        help="Ray cluster: 'auto' (a `ray start` cluster), 'local', ray://... (default: Ray's resolution)",
    )
    p.add_argument("--replicas", default="1,2,4", help="comma-separated replica counts")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "tensorrt"])
    p.add_argument("--store", default=None, help="artifact store, for the tensorrt backend")
    p.add_argument("--mix", default="256-2048")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of load per replica count")
    p.add_argument(
        "--ramp", type=float, default=5.0, help="seconds at the start of --duration not counted (queues filling)"
    )
    p.add_argument(
        "--warmup", type=float, default=8.0, help="seconds of untimed load first, so every replica sees every bucket"
    )
    p.add_argument("--concurrency-per-replica", type=int, default=48)
    p.add_argument(
        "--clients-per-replica",
        type=int,
        default=1,
        help="load-client processes per replica, sharing its concurrency (more when one client process is the limit)",
    )
    p.add_argument("--max-batch-tokens", type=int, default=16384)
    p.add_argument("--dtype", choices=["float16", "float32"], default="float16", help="request payload dtype")
    p.add_argument("--goal", type=float, default=0.9, help="efficiency goal drawn on the plot")
    p.add_argument(
        "--verify",
        choices=VERIFY,
        default="values",
        help="load clients check each answer's values (one pass over its bytes) or only its shape and dtype",
    )
    p.add_argument(
        "--noop",
        action="store_true",
        help="replicas that return their input instead of the app: the serving path's own ceiling",
    )
    p.add_argument(
        "--app-json", default="{}", help="app arguments to override, as JSON (e.g. '{\"stream_per_bucket\": false}')"
    )
    p.add_argument(
        "--fresh-cluster",
        action="store_true",
        help="with --address local: start a Ray cluster for each replica count and stop it after",
    )
    p.add_argument(
        "--merge",
        nargs="+",
        default=None,
        metavar="JSON",
        help="combine result files of earlier runs (their counts must not overlap) into one result; runs nothing",
    )
    p.add_argument("--out", default="docs/benchmarks")
    p.add_argument("--name", default=None, help="result file name (default scaling_<preset>_<mix>)")
    args = p.parse_args()
    if args.merge:
        merged = merge_runs(args.merge)
        if isinstance(merged, str):
            p.error(merged)
        report(args.out, args.name or "scaling_merged", **merged)
        return
    if args.fresh_cluster and args.address != "local":
        p.error(f"--fresh-cluster starts a cluster for each count: give --address local (got --address {args.address})")
    counts = sorted({int(n) for n in args.replicas.split(",")})
    if not counts or counts[0] < 1:
        p.error(f"--replicas {args.replicas!r}: give positive replica counts, e.g. 1,2,4")
    if not 1 <= args.clients_per_replica <= args.concurrency_per_replica:
        p.error(
            f"--clients-per-replica {args.clients_per_replica} must be between 1 and --concurrency-per-replica {args.concurrency_per_replica}"
        )
    if not 0 <= args.ramp < args.duration:
        p.error(f"--ramp {args.ramp} must be at least 0 and shorter than --duration {args.duration}")
    try:
        extra = json.loads(args.app_json)
    except json.JSONDecodeError as e:
        p.error(f"--app-json {args.app_json!r} is not JSON: {e}")
    if not isinstance(extra, dict):
        p.error(f"--app-json must be a JSON object of app arguments, got {args.app_json!r}")

    import ray
    from ray import serve

    from deploy.app import build_app
    from fa3trt.models.reference import ModelConfig

    lo, hi = parse_mix(args.mix)
    hidden = ModelConfig.preset(args.preset, **({"layers": args.layers} if args.layers else {})).hidden

    def connect() -> tuple[int, dict[str, Any]]:
        """Join (or start) the cluster and Serve: the cluster's GPUs and the host's figures."""
        ray.init(address=args.address, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        if gpus and counts[-1] > gpus:
            p.error(
                f"--replicas {args.replicas!r} asks for {counts[-1]} replicas but the cluster has {gpus} GPUs (one replica per GPU); lower the counts or add GPUs"
            )
        # One replica per GPU; without GPUs the replicas share out every CPU (deploy.app.replica_plan).
        kind, need = ("GPU", counts[-1]) if gpus else ("CPU", resources.get("CPU", 1))
        free = ray.available_resources().get(kind, 0)
        if free < need:
            p.error(
                f"only {free:g} {kind}s of the cluster's {resources.get(kind, 0):g} are free and the run needs {need:g} (another app holds the rest); `serve shutdown` it first"
            )
        host = {
            "cpus": resources.get("CPU"),
            "object_store_gb": resources.get("object_store_memory", 0) / 1e9,
            "dev_shm_gb": shutil.disk_usage("/dev/shm").total / 1e9,
        }
        print(
            f"cluster: {gpus} GPUs, {host['cpus']:g} CPUs, object store {host['object_store_gb']:.1f} GB, /dev/shm {host['dev_shm_gb']:.1f} GB",
            flush=True,
        )
        serve.start(http_options={"host": "127.0.0.1", "port": 8124})
        return gpus, host

    model: dict[str, Any] = {"preset": args.preset} | ({"layers": args.layers} if args.layers else {})
    t_start = time.perf_counter()

    def run_count(n: int, gpus: int) -> dict[str, Any]:
        """Deploy ``n`` replicas, drive them (untimed, then timed) and remove the app."""
        if args.noop:
            actor = {"num_cpus": 1} | ({"num_gpus": 1} if gpus else {})  # placed as model replicas are: one per GPU
            echo = serve.deployment(
                name="Echo",
                num_replicas=n,
                max_ongoing_requests=4 * args.concurrency_per_replica,
                ray_actor_options=actor,
            )(Echo)
            serve.run(echo.bind(), name=APP, route_prefix="/scaling")
        else:
            over = ({"store": args.store} if args.store else {}) | extra
            serve.run(
                build_app(app_args(model, hi, args.max_batch_tokens, backend=args.backend, replicas=n, **over)),
                name=APP,
                route_prefix="/scaling",
            )
        # Clients reserve no CPU, so they never wait behind replicas for a slot on a small machine.
        client_cls = ray.remote(num_cpus=0)(LoadClient)
        clients = [
            client_cls.remote(APP, hidden, (lo, hi), args.dtype, seed=i) for i in range(n * args.clients_per_replica)
        ]
        app_handle = serve.get_app_handle(APP)
        ray.get([c.ready.remote() for c in clients])  # every client has its handle and inputs

        def drive(seconds: float) -> dict[str, Any]:
            start_at = time.time() + 1.0  # every client is waiting by then
            # The replica's concurrency shared out among its clients (the first ones take the remainder).
            share = [len(x) for x in np.array_split(np.arange(n * args.concurrency_per_replica), len(clients))]
            parts = ray.get([c.run.remote(seconds, k, start_at, args.verify) for c, k in zip(clients, share)])
            return merge(parts, (start_at + min(args.ramp, seconds / 2), start_at + seconds))

        drive(args.warmup)  # every replica sees every bucket's shapes before timing
        before = None if args.noop else replica_stats(app_handle, n)
        sampler, cpu0 = GpuSampler().start(), cpu_times()
        r = drive(args.duration)
        # The host's CPUs over the pass (this host's: a cluster of one machine): busy, idle and
        # stolen by a hypervisor.
        r["host_cpu"] = cpu_shares(cpu0, cpu_times())
        # nvidia-smi over the timed pass: a replica whose GPU idles while the replica is busy
        # is limited by its host side (launching, staging, its event loop), not by the GPU.
        r["gpus"] = {str(i): g for i, g in sampler.stop().items()}
        r["gpu_util_pct"] = busiest_mean([g["util_pct"] for g in r["gpus"].values()], n)
        # The counters cover the whole pass (ramp and drain included), so busy is over its span.
        r["replicas"] = [] if before is None else per_replica(before, replica_stats(app_handle, n), r["span_s"])
        pass_figures = "" if r["gpu_util_pct"] is None else f" GPUs busy {r['gpu_util_pct']:3.0f}%"
        if r["host_cpu"]:
            pass_figures += (
                f" host CPUs busy {100 * r['host_cpu']['busy']:.0f}% steal {100 * r['host_cpu']['steal']:.1f}%"
            )
        print(
            f"[{time.perf_counter() - t_start:6.0f}s] {n} replica(s): {r['requests']} req {r['errors']} err "
            f"{r['rps']:8.2f} req/s {r['tokens_per_s']:10.0f} tok/s p50 {r['p50_ms']:8.1f} ms p99 {r['p99_ms']:8.1f} ms{pass_figures}",
            flush=True,
        )
        if r["first_error"]:
            print(f"   first error: {r['first_error']}")
        for row in r["replicas"]:
            busy = f"{100 * row['busy_fraction']:4.0f}%" if row["busy_fraction"] is not None else "   -"
            ph = row["phases_ms_per_batch"]
            parts = "  (" + ", ".join(f"{k} {v:.1f}" for k, v in ph.items()) + ")" if ph else ""
            lag = row.get("wake_lag")
            lag_s = f"  wake lag {lag['mean_ms']:.2f} ms mean, {100 * lag['over_5ms']:.0f}% > 5 ms" if lag else ""
            print(
                f"   replica {row['replica'][:8]}: {row['requests']:5d} req {row['batches']:4d} batches  busy {busy}  {row['compute_ms_per_batch']:7.1f} ms/batch{parts}{lag_s}"
            )
        for c in clients:
            ray.kill(c)
        serve.delete(APP)
        return r

    results: dict[int, dict[str, Any]] = {}
    gpus, host = connect()
    for n in counts:
        if args.fresh_cluster and results:
            gpus, host = connect()
        results[n] = run_count(n, gpus)
        if args.fresh_cluster:
            serve.shutdown()
            ray.shutdown()
    if not args.fresh_cluster:
        # Only this benchmark's app is removed: Serve and any other app on the cluster stay as they were.
        ray.shutdown()
    report(
        args.out,
        args.name or f"scaling_{args.preset}_{args.mix}",
        results,
        args=vars(args),
        gpus=gpus,
        host=host,
        card_name=card(),
    )


def merge_runs(paths: list[str]) -> dict[str, Any] | str:
    """One result from the result files of several runs (``report``'s arguments), or why not."""
    runs = [json.loads(Path(f).read_text()) for f in paths]
    results: dict[int, dict[str, Any]] = {}
    for f, run in zip(paths, runs):
        for n, r in run["results"].items():
            if int(n) in results:
                return (
                    f"--merge: {f} has a result for {n} replica(s) that an earlier file has too; give each count once"
                )
            results[int(n)] = r
    cards = {run["card"] for run in runs}
    if len(cards) > 1:
        return f"--merge: the files come from different cards {sorted(cards)}; compare runs of one machine only"
    return {
        "results": dict(sorted(results.items())),
        "args": {"merged": paths, **runs[0]["args"]},
        "gpus": max(run["gpus"] for run in runs),
        "host": runs[0]["host"],
        "card_name": cards.pop(),
    }


def report(
    out: str,
    name: str,
    results: dict[int, dict[str, Any]],
    args: dict[str, Any],
    gpus: int,
    host: dict[str, Any],
    card_name: str,
) -> None:
    """Print the table of every count and save it (JSON + plot)."""
    counts = sorted(results)
    eff = efficiency(results)
    what = "echo replicas (--noop), no model" if args["noop"] else f"model {args['preset']} layers={args['layers']}"
    # Runs merged from several files had a cluster each; one file's counts shared the run's cluster.
    fresh = ", a fresh cluster per count" if args.get("fresh_cluster") or len(args.get("merged") or ()) > 1 else ""
    print(
        f"card: {card_name} x{gpus or 0}  {what}  mix {args['mix']}  concurrency {args['concurrency_per_replica']}/replica"
        f" from {args['clients_per_replica']} client(s)/replica{fresh}"
    )
    print(
        f"{'replicas':>8s} {'req/s':>9s} {'speedup':>8s} {'efficiency':>10s} {'p50 ms':>9s} {'p99 ms':>9s} {'GPUs busy':>9s}"
    )
    for n in counts:
        r = results[n]
        busy = "-" if r["gpu_util_pct"] is None else f"{r['gpu_util_pct']:.0f}%"
        print(
            f"{n:8d} {r['rps']:9.2f} {r['rps'] / results[counts[0]]['rps'] * counts[0]:7.2f}x {eff[n]:10.2f} {r['p50_ms']:9.1f} {r['p99_ms']:9.1f} {busy:>9s}"
        )
    goal = args["goal"]
    summary = {
        "efficiency": {str(n): e for n, e in eff.items()},
        "goal": goal,
        "met": all(e >= goal for e in eff.values()),
    }
    save(
        out,
        name,
        {
            "card": card_name,
            "args": args,
            "gpus": gpus,
            "host": host,
            "results": {str(n): r for n, r in results.items()},
            "summary": summary,
            "time_unix": time.time(),
        },
    )
    what = "echo replicas" if args["noop"] else f"{args['preset']} ({args['layers'] or 'preset'} layers)"
    _plot(out, name, results, eff, goal, f"{what}, mix {args['mix']}{fresh}, {card_name} x{max(gpus, 1)}")


def _plot(
    out: str, name: str, results: dict[int, dict[str, Any]], eff: dict[int, float], goal: float, title: str
) -> None:
    ns = sorted(results)
    per = results[ns[0]]["rps"] / ns[0]
    fig, (a, b) = pyplot().subplots(1, 2, figsize=(11, 4))
    a.plot(ns, [results[n]["rps"] for n in ns], "o-", label="measured", color="#4c72b0")
    a.plot(ns, [n * per for n in ns], "--", label="ideal (N x one replica)", color="gray")
    a.plot(ns, [goal * n * per for n in ns], ":", label=f"goal ({goal:g} x ideal)", color="#c44e52")
    a.set_xlabel("replicas (one per GPU)")
    a.set_ylabel("requests/s at saturation")
    a.set_xticks(ns)
    a.legend()
    b.bar([str(n) for n in ns], [eff[n] for n in ns], color="#55a868")
    b.axhline(goal, color="#c44e52", linestyle=":")
    b.set_ylim(0, 1.1)
    b.set_xlabel("replicas")
    b.set_ylabel("scaling efficiency")
    for i, n in enumerate(ns):
        b.text(i, eff[n] + 0.02, f"{eff[n]:.2f}", ha="center")
    save_figure(fig, out, name, title)


if __name__ == "__main__":
    main()
