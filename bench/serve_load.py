"""Load generator for a running fa3trt app: closed loop (fixed concurrency) or open loop (Poisson
arrivals), over HTTP (.npy bodies to /v1), KServe v2 over HTTP or gRPC (tritonclient's asyncio
clients, binary tensors) or a Ray deployment handle, with a progress bar and a summary.

    python -m bench.serve_load --url http://127.0.0.1:8000 --mix 256-2048 --requests 400 --concurrency 32
    python -m bench.serve_load --transport v2-grpc --grpc-url 127.0.0.1:9000 --mix 256-2048 --concurrency 32
    python -m bench.serve_load --url http://127.0.0.1:8000 --mix 256-2048 --mode open --rate 40 --duration 30
    python -m bench.serve_load --direct --mix 256-2048 --concurrency 64   # every replica's own port

Every response is checked for shape, dtype and finiteness (a wrong answer counts as an error).
Mixes: ``seed`` (15000-16500 tokens), ``256-2048``, ``256-16384``, or any ``LO-HI``; lengths are
drawn uniformly. The summary prints requests/s, tokens/s, p50/p90/p99 latency and, from the
app's /v1/stats, the batch sizes and padding ratio observed during the run.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import itertools
import json
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from deploy.lag import lag_delta
from deploy.targets import replica_targets

MIXES = {"seed": (15000, 16500), "256-2048": (256, 2048), "256-16384": (256, 16384)}

Send = Callable[[np.ndarray], Awaitable[np.ndarray]]


def parse_mix(mix: str, max_len: int | None = None) -> tuple[int, int]:
    lo, hi = MIXES.get(mix) or tuple(int(x) for x in mix.split("-"))  # type: ignore[misc]
    if not 1 <= lo <= hi:
        raise ValueError(f"mix {mix!r} must be LO-HI with 1 <= LO <= HI, or one of {sorted(MIXES)}")
    if max_len is not None and hi > max_len:
        raise ValueError(f"mix {mix!r} reaches {hi} tokens but the app's largest bucket is {max_len}")
    return lo, hi


@dataclass
class LoadResult:
    mode: str
    requests: int
    errors: int
    seconds: float
    tokens: int
    latencies_ms: list[float] = field(repr=False)
    first_error: str | None = None
    # (wall-clock end, latency ms, tokens) of every good answer, for windowed rates across clients.
    completions: list[tuple[float, float, int]] = field(default_factory=list, repr=False)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    def pct(self, q: float) -> float:
        if not self.latencies_ms:
            return float("nan")
        return float(np.percentile(self.latencies_ms, q))

    def summary(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k not in ("latencies_ms", "completions")}
        d.update(
            rps=self.rps, tokens_per_s=self.tokens_per_s, p50_ms=self.pct(50), p90_ms=self.pct(90), p99_ms=self.pct(99)
        )
        return d


def all_finite(x: np.ndarray) -> bool:
    """Whether every element is finite, in one pass over the bytes. NumPy's float16 arithmetic is
    emulated: ``np.isfinite`` takes 13.6 ms for one 2048 x 4096 float16 answer on a 2-core host,
    enough to make a load client the bottleneck of a GPU replica. A half is finite exactly when
    its five exponent bits are not all ones: its bits with the sign cleared are below 0x7C00."""
    if x.size == 0:
        return True
    if x.dtype == np.float16:
        return int((x.view(np.uint16) & 0x7FFF).max()) < 0x7C00
    return bool(np.isfinite(x).all())


def single_width(info: dict[str, Any]) -> int:
    """The last axis's size of the one input a single-array request carries (``/v1/info``'s
    signature): the reference model's hidden size."""
    sent = [t for t in info["signature"]["inputs"] if t.get("fill") is None]
    if len(sent) != 1 or not isinstance(sent[0]["axes"][-1], int):
        raise SystemExit(f"this load sends one array (S, width) per request; the app's model takes {sent}")
    return int(sent[0]["axes"][-1])


def make_inputs(n: int, lo: int, hi: int, hidden: int, seed: int = 0, dtype: Any = np.float32) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    # A few distinct arrays per length class are enough: the server does not cache.
    pool = [rng.standard_normal((hi, hidden)).astype(dtype) for _ in range(4)]
    return [pool[i % 4][: int(n_)] for i, n_ in enumerate(rng.integers(lo, hi + 1, n))]


VERIFY = ("values", "shape")
"""How each answer is checked: shape, dtype and every element finite (one pass over its bytes
on the load generator's CPU), or shape and dtype alone (a load generator that shares the
servers' host then takes less of its memory bandwidth)."""


async def run_load(
    send: Send,
    inputs: list[np.ndarray],
    *,
    mode: str = "closed",
    concurrency: int = 16,
    rate: float = 10.0,
    seed: int = 0,
    progress: bool = True,
    duration: float | None = None,
    verify: str = "values",
) -> LoadResult:
    """Drive ``send`` with ``inputs``: closed loop at ``concurrency``, or open loop at ``rate``/s.

    Without ``duration`` every input is sent once. With it, requests go out for ``duration``
    seconds, cycling through ``inputs`` (closed loop: each worker sends its next request until
    the deadline; open loop: arrivals stop at the deadline), and the answers in flight then are
    awaited. ``seconds`` runs to the last answer.
    """
    from tqdm import tqdm

    if mode not in ("closed", "open"):
        raise ValueError(f"mode must be 'closed' or 'open', got {mode!r}")
    if not inputs:
        raise ValueError("run_load needs at least one input")
    if duration is not None and duration <= 0:
        raise ValueError(f"duration must be > 0 seconds, got {duration}")
    if verify not in VERIFY:
        raise ValueError(f"verify must be one of {VERIFY}, got {verify!r}")
    lat: list[float] = []
    done: list[tuple[float, float, int]] = []
    errors: list[str] = []
    sent = [0, 0]  # requests, tokens
    check_values = verify == "values"
    bar = tqdm(
        total=None if duration else len(inputs), desc=f"{mode} load", unit="req", disable=not progress, leave=False
    )

    async def one(x: np.ndarray) -> None:
        sent[0] += 1
        sent[1] += x.shape[0]
        t0 = time.perf_counter()
        try:
            y = await send(x)
            if y.shape != x.shape or y.dtype != x.dtype or (check_values and not all_finite(y)):
                raise ValueError(f"bad answer: shape {y.shape} dtype {y.dtype} for input {x.shape} {x.dtype}")
            ms = (time.perf_counter() - t0) * 1e3
            lat.append(ms)
            done.append((time.time(), ms, x.shape[0]))
        except Exception as e:  # counted, reported; the run goes on
            errors.append(f"{type(e).__name__}: {e}"[:300])
        bar.update(1)

    t_start = time.perf_counter()
    deadline = t_start + duration if duration else None
    if mode == "closed":
        order = iter(range(1 << 62)) if deadline else iter(range(len(inputs)))

        async def worker() -> None:
            for i in order:
                if deadline and time.perf_counter() >= deadline:
                    return
                await one(inputs[i % len(inputs)])

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    else:
        rng = np.random.default_rng(seed)
        tasks = []
        next_t = time.perf_counter()
        for i in range(1 << 62) if deadline else range(len(inputs)):
            next_t += rng.exponential(1.0 / rate)
            if deadline and next_t >= deadline:
                break
            await asyncio.sleep(max(0.0, next_t - time.perf_counter()))
            tasks.append(asyncio.create_task(one(inputs[i % len(inputs)])))
        await asyncio.gather(*tasks)
    bar.close()
    seconds = time.perf_counter() - t_start
    return LoadResult(mode, sent[0], len(errors), seconds, sent[1], lat, errors[0] if errors else None, done)


def http_sender(urls: str | list[str], session: Any) -> Send:
    """POST .npy bodies to ``urls`` in turn (one URL: a Serve proxy; several: replicas that
    serve HTTP themselves, see ``deploy.targets``)."""
    targets = itertools.cycle([urls] if isinstance(urls, str) else urls)

    async def send(x: np.ndarray) -> np.ndarray:
        buf = io.BytesIO()
        np.save(buf, x)
        async with session.post(
            f"{next(targets)}/v1/infer", data=buf.getvalue(), headers={"content-type": "application/x-npy"}
        ) as r:
            body = await r.read()
            if r.status != 200:
                raise RuntimeError(f"HTTP {r.status}: {body[:200]!r}")
            return np.load(io.BytesIO(body), allow_pickle=False)

    return send


def _v2_datatype(x: np.ndarray) -> str:
    return "FP16" if x.dtype == np.float16 else "FP32"


def v2_http_sender(clients: list[Any], model: str = "fa3trt") -> Send:
    """KServe v2 over HTTP with ``tritonclient.http.aio`` clients (in turn), binary tensors in and
    out: each sequence is one request of shape [1, S, hidden]."""
    from tritonclient.http.aio import InferInput, InferRequestedOutput

    targets = itertools.cycle(clients)
    out = [InferRequestedOutput("y", binary_data=True)]

    async def send(x: np.ndarray) -> np.ndarray:
        t = InferInput("x", [1, *x.shape], _v2_datatype(x))
        t.set_data_from_numpy(x[None], binary_data=True)
        result = await next(targets).infer(model, [t], outputs=out)
        return result.as_numpy("y")[0]

    return send


def v2_grpc_sender(clients: list[Any], model: str = "fa3trt", headers: dict[str, str] | None = None) -> Send:
    """KServe v2 over gRPC with ``tritonclient.grpc.aio`` clients (in turn; raw tensor
    contents). ``headers``: gRPC metadata, e.g. ``{"application": name}`` for Serve's proxy
    when the cluster serves several apps."""
    from tritonclient.grpc.aio import InferInput

    targets = itertools.cycle(clients)

    async def send(x: np.ndarray) -> np.ndarray:
        t = InferInput("x", [1, *x.shape], _v2_datatype(x))
        t.set_data_from_numpy(x[None])
        result = await next(targets).infer(model, [t], headers=headers)
        return result.as_numpy("y")[0]

    return send


def handle_sender(handle: Any) -> Send:
    async def send(x: np.ndarray) -> np.ndarray:
        return await handle.infer.remote(x)

    return send


def stats_delta(before: dict[str, Any], after: dict[str, Any], seconds: float | None = None) -> dict[str, Any]:
    """What one replica's /v1/stats counters did between two readings: per bucket its batches,
    requests, mean batch size and padding ratio; ``busy_fraction`` (time with a batch in flight
    over ``seconds``) when given. Empty when the two readings came from different replicas."""
    if before.get("replica") != after.get("replica"):
        return {}
    buckets = {}
    for edge, a in after["buckets"].items():
        b = before["buckets"].get(edge, {})
        d = {k: a[k] - b.get(k, 0) for k in ("batches", "requests", "tokens", "computed_tokens", "compute_s") if k in a}
        if d["batches"]:
            d["mean_batch"] = d["requests"] / d["batches"]
            d["padding_ratio"] = 1 - d["tokens"] / d["computed_tokens"] if d["computed_tokens"] else 0.0
            buckets[edge] = d
    out: dict[str, Any] = {"replica": after.get("replica"), "buckets": buckets}
    pa, pb = after.get("phases_s"), before.get("phases_s", {})
    if pa:
        n = pa["batches"] - pb.get("batches", 0)
        if n:
            out["phases_ms_per_batch"] = {k: 1e3 * (v - pb.get(k, 0.0)) / n for k, v in pa.items() if k != "batches"}
    if "wake_lag" in after:
        out["wake_lag"] = lag_delta(before.get("wake_lag"), after["wake_lag"])
    if seconds and "busy_s" in after:
        out["busy_fraction"] = (after["busy_s"] - before.get("busy_s", 0.0)) / seconds
    return out


def padding_ratio(stats: dict[str, Any]) -> float:
    """Padded tokens over computed tokens across the buckets of a ``stats_delta``."""
    tok = sum(d["tokens"] for d in stats.get("buckets", {}).values())
    comp = sum(d["computed_tokens"] for d in stats.get("buckets", {}).values())
    return 1 - tok / comp if comp else 0.0


def print_summary(name: str, res: LoadResult, stats: dict[str, Any] | None = None) -> None:
    s = res.summary()
    busy = (stats or {}).get("busy_fraction")
    print(
        f"{name:34s} {s['requests']:5d} req {s['errors']:3d} err {s['rps']:8.2f} req/s {s['tokens_per_s']:10.0f} tok/s "
        f"p50 {s['p50_ms']:8.1f} ms  p99 {s['p99_ms']:8.1f} ms"
        + (f"  busy {100 * busy:4.0f}%" if busy is not None else "")
    )
    if res.first_error:
        print(f"   first error: {res.first_error}")
    for edge, d in (stats or {}).get("buckets", {}).items():
        print(
            f"   bucket {edge:>6s}: {d['batches']:4d} batches, mean batch {d['mean_batch']:5.2f}, padding {100 * d['padding_ratio']:4.1f}%"
        )
    phases = (stats or {}).get("phases_ms_per_batch")
    if phases:
        print("   per batch (ms): " + ", ".join(f"{k} {v:.2f}" for k, v in phases.items()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--url", default="http://127.0.0.1:8000", help="the app's base URL; several, comma-separated, are used in turn"
    )
    p.add_argument(
        "--direct",
        action="store_true",
        help="send to every replica's own HTTP or gRPC port (Serve direct ingress) instead of --url / --grpc-url",
    )
    p.add_argument(
        "--dashboard",
        default="http://127.0.0.1:8265",
        help="--direct: Ray dashboard whose Serve REST API lists the replicas",
    )
    p.add_argument(
        "--app", default="fa3trt", help="the Serve application's name (--direct; the model name of v2 transports)"
    )
    p.add_argument(
        "--target-host",
        default=None,
        help="--direct: connect to this host instead of each listed node IP (e.g. 127.0.0.1)",
    )
    p.add_argument(
        "--transport",
        choices=["v1-http", "v2-http", "v2-grpc"],
        default="v1-http",
        help="v1-http: .npy bodies to /v1/infer; v2-http / v2-grpc: KServe v2 through tritonclient",
    )
    p.add_argument("--grpc-url", default="127.0.0.1:9000", help="v2-grpc: Serve's gRPC proxy (host:port)")
    p.add_argument("--mix", default="256-2048")
    p.add_argument("--mode", choices=["closed", "open"], default="closed")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--rate", type=float, default=10.0, help="open loop: mean arrivals per second")
    p.add_argument(
        "--duration",
        type=float,
        default=None,
        help="send for this many seconds (inputs reused) instead of --requests once each",
    )
    p.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    p.add_argument("--json", default=None, help="write the summary here")
    p.add_argument(
        "--verify",
        choices=VERIFY,
        default="values",
        help="check each answer's values are finite, or only its shape and dtype",
    )
    args = p.parse_args()

    import aiohttp
    import requests

    urls = (
        replica_targets(args.dashboard, args.app, "HTTP", args.target_host)
        if args.direct
        else [u.rstrip("/") for u in args.url.split(",") if u]
    )
    grpc_urls = [args.grpc_url]
    if args.direct:
        print(f"direct ingress: {len(urls)} replica(s): {', '.join(urls)}")
        if args.transport == "v2-grpc":
            grpc_urls = replica_targets(args.dashboard, args.app, "gRPC", args.target_host)
            print(f"direct ingress gRPC: {', '.join(grpc_urls)}")
    info = requests.get(f"{urls[0]}/v1/info", timeout=30).json()
    lo, hi = parse_mix(args.mix, max(info["buckets"]))
    inputs = make_inputs(args.requests, lo, hi, single_width(info), dtype=np.dtype(args.dtype))

    async def load(send: Send) -> LoadResult:
        return await run_load(
            send,
            inputs,
            mode=args.mode,
            concurrency=args.concurrency,
            rate=args.rate,
            duration=args.duration,
            verify=args.verify,
        )

    async def go() -> LoadResult:
        if args.transport == "v2-http":
            from tritonclient.http.aio import InferenceServerClient as HttpClient

            hosts = [u.split("://", 1)[-1] for u in urls]
            clients = [HttpClient(h, conn_limit=max(args.concurrency, 1), conn_timeout=600) for h in hosts]
            try:
                return await load(v2_http_sender(clients, args.app))
            finally:
                for c in clients:
                    await c.close()
        if args.transport == "v2-grpc":
            from tritonclient.grpc.aio import InferenceServerClient as GrpcClient

            grpc_clients = [GrpcClient(u) for u in grpc_urls]
            try:
                return await load(v2_grpc_sender(grpc_clients, args.app))
            finally:
                for gc in grpc_clients:
                    await gc.close()
        timeout = aiohttp.ClientTimeout(total=600)
        async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
            return await load(http_sender(urls, session))

    # Each direct URL is one replica, so its counters are that replica's; through a proxy a
    # stats call reaches any replica and the two readings match only with one replica.
    before = [requests.get(f"{u}/v1/stats", timeout=30).json() for u in urls]
    res = asyncio.run(go())
    stats = [
        stats_delta(b, requests.get(f"{u}/v1/stats", timeout=30).json(), res.seconds) for u, b in zip(urls, before)
    ]
    print(
        f"{info['device_name']} backend={info['backend']} buckets={info['buckets']} mix={args.mix} "
        f"mode={args.mode} transport={args.transport}"
    )
    print_summary(
        f"{args.mode} c={args.concurrency}" if args.mode == "closed" else f"open rate={args.rate}/s",
        res,
        stats[0] if len(stats) == 1 else None,
    )
    if len(stats) > 1:
        for st in stats:
            busy = st.get("busy_fraction")
            n = sum(d["requests"] for d in st.get("buckets", {}).values())
            print(
                f"   replica {str(st.get('replica'))[:8]}: {n:5d} req"
                + (f"  busy {100 * busy:4.0f}%" if busy is not None else "")
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "info": info,
                    "urls": urls,
                    "transport": args.transport,
                    "result": res.summary(),
                    "stats": stats if len(stats) > 1 else stats[0],
                    "median_latency_ms": statistics.median(res.latencies_ms) if res.latencies_ms else None,
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
