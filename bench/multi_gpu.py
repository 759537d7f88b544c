"""The model on 1, 2, 4 ... GPUs of one host at once, without Ray: what the host and the cards
allow before any serving machinery is involved.

One process per GPU runs the torch backend in a closed loop for ``--duration`` seconds, all
processes starting together. Each batch is ``--batch`` requests of random lengths from
``--mix``, padded to the longest (as a replica's bucket batch is). The paths, one at a time:

- ``device``: inputs already on the GPU; the model, then a stream sync.
- ``staged``: the replica's path: float16 rows on the host staged into page-locked memory,
  one DMA in, the model, the answers back by one DMA (``fa3trt.serving.batch.assemble``,
  ``fa3trt.transfer.to_host``).
- ``staged-copy``: the staging alone, no model: the host side's own ceiling.
- ``device+graphs``, ``staged+graphs``: the first two with the backend's CUDA graphs
  (``cuda_graphs=True``; every batch shape captured before the clock starts).

Per count and path it prints batches/s over all processes, the efficiency
throughput(N) / (N x throughput(1)), and per batch: wall time, the GPU time between CUDA events
around the model, and the time the host took to enqueue the model. The SM clock of every card
(nvidia-smi, when present) is sampled through each run. A GPU time that grows with N, at the
same clock, means the cards wait on the host (launches); one that stays while the wall time
grows means the host side (staging) is the shared limit.

    python -m bench.multi_gpu --gpus 1,2,4 --preset seed --layers 2 --out docs/benchmarks
    python -m bench.multi_gpu --gpus 1,2 --device cpu --preset tiny --duration 2   # a dry run
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import statistics
import threading
import time
from typing import Any

import numpy as np
import torch

from bench._common import GpuSampler, card, pyplot, save, save_figure
from bench.serve_load import parse_mix
from fa3trt.attention.kernels.selector import lengths_on_device, select_kernel
from fa3trt.buckets import Buckets
from fa3trt.models.spec import ReferenceSpec
from fa3trt.requests import check_request
from fa3trt.serving.batch import assemble
from fa3trt.serving.torch_backend import TorchBackend
from fa3trt.timing import timing_events
from fa3trt.transfer import to_host

PATHS = ("device", "staged", "staged-copy", "device+graphs", "staged+graphs")


def _worker(rank: int, args: dict[str, Any], paths: list[str], barrier: Any, results: Any) -> None:
    try:
        _loops(rank, args, paths, barrier, results)
    except BaseException as e:  # reported to the parent, which fails loudly
        barrier.abort()
        results.put({"rank": rank, "error": f"{type(e).__name__}: {e}"})


def _loops(rank: int, args: dict[str, Any], paths: list[str], barrier: Any, results: Any) -> None:
    """Load and warm once, then run each path in turn, every process starting it together."""
    cuda = args["device"] == "cuda"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.set_num_threads(args["threads"])
    spec = ReferenceSpec(preset=args["preset"], layers=args["layers"] or None)
    backend = TorchBackend(spec, device=device)
    sig, hidden = backend.signature, spec.config().hidden
    rng = np.random.default_rng(rank)
    lo, hi = args["mix"]
    buckets = Buckets((hi,))
    pool = [
        check_request(sig, {"x": rng.standard_normal((int(n), hidden), dtype=np.float32).astype(np.float16)}, buckets)
        for n in rng.integers(lo, hi + 1, size=64)
    ]
    batches = [[pool[(i * args["batch"] + j) % len(pool)] for j in range(args["batch"])] for i in range(len(pool))]
    on_device = [assemble(sig, b, device, lengths_on_device=backend.lengths_on_device).inputs for b in batches]
    for b in on_device[:4]:
        backend.run(b)
    graphed = None
    if any(p.endswith("+graphs") for p in paths):
        graphed = TorchBackend(spec, device=device, cuda_graphs=True)
        for b in on_device:  # captures every shape the loop will see
            graphed.run(b)
    if cuda:
        torch.cuda.synchronize(device)
    for path in paths:
        barrier.wait()
        be = graphed if path.endswith("+graphs") and graphed is not None else backend
        results.put(_loop(rank, args, path.removesuffix("+graphs"), be, batches, on_device) | {"path": path})


def _loop(
    rank: int,
    args: dict[str, Any],
    path: str,
    backend: TorchBackend,
    batches: list[list[Any]],
    on_device: list[dict[str, torch.Tensor]],
) -> dict[str, Any]:
    device = backend.device
    cuda = device.type == "cuda"
    deadline = time.perf_counter() + args["duration"]
    wall, gpu, enqueue = [], [], []
    tokens = n = 0
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        if path == "device":
            batch = on_device[n % len(on_device)]
        else:
            reqs = batches[n % len(batches)]
            batch = assemble(backend.signature, reqs, device, lengths_on_device=backend.lengths_on_device).inputs
        ev = timing_events(device)
        if ev:
            ev[0].record()
        y = backend.run(batch).to(torch.float16) if path != "staged-copy" else batch["x"].to(torch.float16)
        if ev:
            ev[1].record()
        t1 = time.perf_counter()
        if path == "device":
            if cuda:
                torch.cuda.current_stream(device).synchronize()
        else:
            to_host(y)
        t2 = time.perf_counter()
        wall.append(t2 - t0)
        enqueue.append(t1 - t0)
        if ev:
            gpu.append(ev[0].elapsed_time(ev[1]) / 1e3)
        tokens += int(batch["seq_lens"].sum())
        n += 1
    return {
        "rank": rank,
        "path": path,
        "batches": n,
        "tokens": tokens,
        "span_s": sum(wall),
        "wall_ms": 1e3 * statistics.mean(wall),
        "gpu_ms": 1e3 * statistics.mean(gpu) if gpu else 0.0,
        "enqueue_ms": 1e3 * statistics.mean(enqueue),
    }


def run_count(count: int, args: dict[str, Any], paths: list[str]) -> list[dict[str, Any]]:
    """One result per path for ``count`` processes (one GPU each)."""
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(count + 1)
    results = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, args, paths, barrier, results), daemon=True) for r in range(count)]
    for p in procs:
        p.start()
    out = []
    try:
        for path in paths:
            with contextlib.suppress(threading.BrokenBarrierError):  # a worker failed: its error is in the queue
                barrier.wait(timeout=args["start_timeout"])
            sampler = GpuSampler().start()
            parts = [results.get(timeout=args["duration"] + args["start_timeout"]) for _ in procs]
            clocks = sampler.stop()
            errors = [p for p in parts if "error" in p]
            if errors:
                raise RuntimeError(f"{len(errors)} of {count} processes failed; first: {errors[0]['error']}")
            parts.sort(key=lambda p: p["rank"])
            out.append(
                {
                    "count": count,
                    "path": path,
                    "batches_per_s": sum(p["batches"] / p["span_s"] for p in parts),
                    "tokens_per_s": sum(p["tokens"] / p["span_s"] for p in parts),
                    "processes": parts,
                    "clocks": {str(i): c for i, c in clocks.items() if i < count},
                }
            )
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gpus", default="1,2,4", help="process counts (one GPU each)")
    p.add_argument(
        "--paths",
        default=",".join(PATHS),
        help=f"any of {', '.join(PATHS)} (the +graphs paths where the GPU's kernel allows CUDA graphs)",
    )
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: a dry run, every process on the CPU")
    p.add_argument("--preset", default="seed")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--mix", default="256-2048", help="request lengths lo-hi")
    p.add_argument("--batch", type=int, default=2, help="requests per batch (replicas at saturation ran 1.2-1.5)")
    p.add_argument("--duration", type=float, default=15.0)
    p.add_argument(
        "--threads", type=int, default=4, help="PyTorch threads per process (a replica's default is up to 4)"
    )
    p.add_argument("--start-timeout", type=float, default=600.0, help="seconds for every process to load and warm")
    p.add_argument("--out", default="docs/benchmarks")
    p.add_argument("--name", default=None)
    a = p.parse_args()
    counts = [int(c) for c in a.gpus.split(",")]
    paths = [x for x in a.paths.split(",") if x]
    bad = [x for x in paths if x not in PATHS]
    if bad:
        raise SystemExit(f"--paths: unknown {bad}; choose from {list(PATHS)}")
    if a.device == "cuda":
        have = torch.cuda.device_count()
        if max(counts) > have:
            raise SystemExit(f"--gpus asks for {max(counts)} GPUs, this machine has {have}; pass --gpus up to {have}")
    cfg = ReferenceSpec(preset=a.preset, layers=a.layers or None).config()
    graphs_ok = a.device == "cuda" and lengths_on_device(select_kernel("cuda"), cfg.torch_dtype, cfg.head_dim)
    if not graphs_ok and any(x.endswith("+graphs") for x in paths):
        print("CUDA graphs need FA3 or the CuTe kernel on a GPU (fa3trt[hopper]): the +graphs paths are left out")
        paths = [x for x in paths if not x.endswith("+graphs")]
    args = {
        "device": a.device,
        "preset": a.preset,
        "layers": a.layers,
        "mix": parse_mix(a.mix),
        "batch": a.batch,
        "duration": a.duration,
        "threads": a.threads,
        "start_timeout": a.start_timeout,
    }
    name = a.name or f"multi_gpu_{a.preset}{a.layers}_{a.mix}_{a.device}"
    where = card() if a.device == "cuda" else f"cpu ({os.cpu_count()} cores)"
    rows: list[dict[str, Any]] = []
    for count in counts:
        rows += run_count(count, args, paths)
    for path in paths:
        base = next(r for r in rows if r["path"] == path)  # the first count's
        for r in (r for r in rows if r["path"] == path):
            r["efficiency"] = r["batches_per_s"] / (base["batches_per_s"] * r["count"] / base["count"])
            per = r["processes"]
            mhz = " ".join(f"{c['sm_mhz']:.0f}" for c in r["clocks"].values())
            busy = " ".join(f"{c['util_pct']:.0f}%" for c in r["clocks"].values())
            print(
                f"{path:12s} {r['count']} x: {r['batches_per_s']:8.1f} batches/s {r['tokens_per_s'] / 1e3:8.1f} k tok/s "
                f"efficiency {r['efficiency']:.2f}   per batch: wall {statistics.mean(x['wall_ms'] for x in per):6.2f} ms "
                f"gpu {statistics.mean(x['gpu_ms'] for x in per):6.2f} enqueue {statistics.mean(x['enqueue_ms'] for x in per):6.2f}"
                + (f"   SM MHz {mhz}  busy {busy}" if mhz else ""),
                flush=True,
            )
    save(a.out, name, {"card": where, "args": args, "rows": rows})
    plt = pyplot()
    if plt is not None:
        fig, ax = plt.subplots(figsize=(6, 4))
        for path in paths:
            pts = [(r["count"], r["efficiency"]) for r in rows if r["path"] == path]
            ax.plot([c for c, _ in pts], [e for _, e in pts], marker="o", label=path)
        ax.axhline(0.9, color="grey", linestyle="--", linewidth=1, label="goal 0.9")
        ax.set_xlabel("GPUs (one process each)")
        ax.set_ylabel("throughput / (N x one GPU)")
        ax.set_ylim(0, 1.1)
        ax.legend()
        save_figure(fig, a.out, name, f"{a.preset} x{a.layers}, batches of {a.batch} from {a.mix} - {where}")


if __name__ == "__main__":
    main()
