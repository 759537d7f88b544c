"""Getting a request from shared memory onto the GPU, as a replica does with one in Ray's object
store: which way is fastest, whether processes doing it at once slow each other, and what the
first touch of another process's pages costs.

Each worker process maps a file in /dev/shm holding 32 float16 requests of 1152 x 4096 (9.4 MB,
written by the worker) and moves them to its GPU one at a time, three ways:
  stage     copy into a reused page-locked buffer, then one DMA (fa3trt.buckets.assemble's path)
  register  cudaHostRegister the request's own pages, DMA straight from them, unregister
  pageable  one copy from the pageable mapping (the driver stages it)
with 1, 4 and 8 processes at once (``--procs``). Then, in one process, the staging copy of
requests another process wrote: pages this process has not touched yet (a page-table fill per
4 KiB page) against the same pages again.

    python -m bench.host_staging --out docs/benchmarks
"""

from __future__ import annotations

import argparse
import mmap
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import time
from typing import Any

import numpy as np

ROWS, HID, NBUF = 1152, 4096, 32
NBYTES = ROWS * HID * 2
METHODS = ("stage", "register", "pageable")


def _requests(path: str, fill: bool) -> tuple[mmap.mmap, list[np.ndarray]]:
    size = NBUF * NBYTES + 4096
    mode = "w+b" if fill else "r+b"
    with open(path, mode) as f:
        if fill:
            f.truncate(size)
        mm = mmap.mmap(f.fileno(), size)
    base = np.frombuffer(mm, dtype=np.uint8)
    off = (-base.ctypes.data) % 4096  # page-aligned requests, as the object store aligns them
    arrs = [
        np.frombuffer(mm, dtype=np.float16, count=ROWS * HID, offset=off + i * NBYTES).reshape(ROWS, HID)
        for i in range(NBUF)
    ]
    if fill:
        rng = np.random.default_rng(0)
        for a in arrs:
            a[...] = rng.standard_normal((ROWS, HID), dtype=np.float32).astype(np.float16)
    return mm, arrs


def _worker(idx: int, method: str, reps: int, threads: int, q: Any) -> None:
    import torch

    torch.set_num_threads(threads)
    cudart = torch.cuda.cudart()
    path = f"/dev/shm/fa3trt_host_staging_{os.getpid()}"
    _, arrs = _requests(path, fill=True)
    gpu = torch.empty(ROWS, HID, dtype=torch.float16, device="cuda")
    stage = torch.empty(ROWS, HID, dtype=torch.float16, pin_memory=True)
    stream = torch.cuda.Stream()
    times = []
    try:
        with torch.cuda.stream(stream):
            for r in range(reps):
                a = arrs[r % NBUF]
                t0 = time.perf_counter()
                if method == "stage":
                    stage.copy_(torch.from_numpy(a))
                    gpu.copy_(stage, non_blocking=True)
                elif method == "register":
                    rc = cudart.cudaHostRegister(a.ctypes.data, a.nbytes, 0)
                    if int(rc) != 0:
                        raise RuntimeError(f"cudaHostRegister returned {rc}")
                    gpu.copy_(torch.from_numpy(a), non_blocking=True)
                else:
                    gpu.copy_(torch.from_numpy(a))
                stream.synchronize()
                if method == "register":
                    cudart.cudaHostUnregister(a.ctypes.data)
                times.append(time.perf_counter() - t0)
        ok = torch.equal(gpu.cpu(), torch.from_numpy(arrs[(reps - 1) % NBUF]))
        q.put((idx, {"ms": 1e3 * statistics.median(times[5:]), "ok": ok}))
    except Exception as e:
        q.put((idx, {"error": f"{type(e).__name__}: {e}"}))
    finally:
        os.unlink(path)


def concurrent(method: str, procs: int, reps: int, threads: int) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    ps = [ctx.Process(target=_worker, args=(i, method, reps, threads, q)) for i in range(procs)]
    for p in ps:
        p.start()
    res = [q.get()[1] for _ in ps]
    for p in ps:
        p.join()
    errors = [r["error"] for r in res if "error" in r]
    if errors:
        return {"error": errors[0]}
    ms = statistics.median(r["ms"] for r in res)
    return {
        "ms": ms,
        "gb_per_s": NBYTES / ms / 1e6,
        "per_process_ms": [r["ms"] for r in res],
        "ok": all(r["ok"] for r in res),
    }


def first_touch(threads: int) -> dict[str, float]:
    """Staging copies of requests another process wrote: first touch here, then touched."""
    import torch

    torch.set_num_threads(threads)
    path = f"/dev/shm/fa3trt_host_staging_ft_{os.getpid()}"
    subprocess.run([sys.executable, "-m", "bench.host_staging", "--write", path], check=True)
    try:
        _, arrs = _requests(path, fill=False)
        stage = torch.empty(ROWS, HID, dtype=torch.float16, pin_memory=True)

        def pass_ms() -> float:
            ts = []
            for a in arrs:
                t0 = time.perf_counter()
                stage.copy_(torch.from_numpy(a))
                ts.append(time.perf_counter() - t0)
            return 1e3 * statistics.median(ts)

        return {"first_touch_ms": pass_ms(), "mapped_ms": pass_ms()}
    finally:
        os.unlink(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--procs", default="1,4,8")
    p.add_argument(
        "--threads", type=int, default=4, help="PyTorch threads per process (a replica's default is up to 4)"
    )
    p.add_argument("--reps", type=int, default=60)
    p.add_argument("--out", default="docs/benchmarks")
    p.add_argument("--name", default="host_staging")
    p.add_argument("--write", help=argparse.SUPPRESS)  # internal: fill a request file and exit
    args = p.parse_args()
    if args.write:
        _requests(args.write, fill=True)
        return
    from bench._common import card, pyplot, save, save_figure

    procs = [int(x) for x in args.procs.split(",")]
    table = {m: {n: concurrent(m, n, args.reps, args.threads) for n in procs} for m in METHODS}
    touch = first_touch(args.threads)
    print(
        f"card: {card()}   {os.cpu_count()} CPUs   {NBYTES / 1e6:.1f} MB float16 requests, {args.threads} threads per process"
    )
    print(f"{'method':10s} " + " ".join(f"{str(n) + ' proc':>18s}" for n in procs))
    for m, row in table.items():
        cells = [f"{r['ms']:7.3f} ms {r['gb_per_s']:5.1f} GB/s" if "ms" in r else r["error"][:18] for r in row.values()]
        print(f"{m:10s} " + " ".join(f"{c:>18s}" for c in cells))
    print(
        f"staging copy of another process's request: first touch {touch['first_touch_ms']:.3f} ms, pages mapped {touch['mapped_ms']:.3f} ms"
    )
    save(
        args.out,
        args.name,
        {
            "request_bytes": NBYTES,
            "threads": args.threads,
            "methods": {m: {str(n): r for n, r in row.items()} for m, row in table.items()},
            "first_touch": touch,
            "cpus": os.cpu_count(),
        },
    )
    fig, ax = pyplot().subplots(figsize=(7, 4))
    width = 0.8 / len(METHODS)
    for i, m in enumerate(METHODS):
        ax.bar([j + i * width for j in range(len(procs))], [table[m][n].get("ms", 0.0) for n in procs], width, label=m)
    ax.set_xticks([j + width for j in range(len(procs))], [f"{n} process(es)" for n in procs])
    ax.set_ylabel("ms per 9.4 MB request to the GPU")
    ax.legend()
    save_figure(fig, args.out, args.name, f"host staging of a request in shared memory - {card()}")


if __name__ == "__main__":
    main()
