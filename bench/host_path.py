"""Host side of a replica's batch: requests into the GPU batch, answers back, per batch shape.

For each batch shape (rows of float16 requests as they arrive from Ray's object store, hidden
4096, the model in bfloat16), on one GPU in one process, wall milliseconds per batch of
  h2d  baseline  each row copied from pageable memory (``.to(device)``), converted on the GPU
       staged    ``fa3trt.serving.batch.assemble``: rows into one page-locked block, one DMA
  d2h  baseline  ``y.cpu()``: into fresh pageable memory through the driver's bounce buffer
       pinned    ``fa3trt.transfer.to_host``: one DMA into a reused page-locked block
and the GB/s each reaches. The ratio staged/baseline is the figure.

    python -m bench.host_path --out docs/benchmarks

Writes host_path.json and host_path.png there and prints a table with the card name.
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np
import torch

from bench._common import card, pyplot, save, save_figure, time_host_ms
from fa3trt.buckets import Buckets
from fa3trt.requests import Checked, check_request
from fa3trt.serving.batch import assemble
from fa3trt.signature import Signature, TensorSpec
from fa3trt.transfer import to_host

HIDDEN = 4096
SIGNATURE = Signature(
    (TensorSpec("x", "bfloat16", ("S", HIDDEN)), TensorSpec("seq_lens", "int32", (), fill="lengths")),
    TensorSpec("y", "bfloat16", ("S", HIDDEN)),
    "S",
    batching="pad",
)
"""The seed model's requests (the model in bfloat16)."""


def staged(reqs: list[Checked], device: torch.device) -> torch.Tensor:
    return assemble(SIGNATURE, reqs, device).inputs["x"]


def pageable_assemble(rows: list[np.ndarray], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The baseline: one blocking pageable copy per row, converted and padded on the GPU."""
    longest = max(r.shape[0] for r in rows)
    out = torch.empty((len(rows), longest, rows[0].shape[1]), dtype=dtype, device=device)
    for i, r in enumerate(rows):
        out[i, : r.shape[0]].copy_(torch.from_numpy(r).to(device))
        out[i, r.shape[0] :].zero_()
    return out


def batch_rows(b: int, longest: int, seed: int = 0) -> list[np.ndarray]:
    """``b`` float16 requests, the first ``longest`` rows, the rest between a quarter and all of it."""
    rng = np.random.default_rng(seed)
    lens = [longest] + [int(n) for n in rng.integers(max(1, longest // 4), longest + 1, b - 1)]
    return [rng.standard_normal((n, HIDDEN), dtype=np.float32).astype(np.float16) for n in lens]


def measure(b: int, longest: int, iters: int) -> dict[str, Any]:
    dev = torch.device("cuda")
    rows = batch_rows(b, longest)
    nbytes = sum(r.nbytes for r in rows)
    reqs = [check_request(SIGNATURE, {"x": r}, Buckets((longest,))) for r in rows]
    ref = pageable_assemble(rows, torch.bfloat16, dev)
    x = staged(reqs, dev)
    torch.testing.assert_close(x, ref, rtol=0, atol=0)  # the two paths build the same batch
    y = x.to(torch.float16)
    res = {
        "batch": b,
        "longest": longest,
        "request_bytes": nbytes,
        "answer_bytes": y.numel() * y.element_size(),
        "h2d_baseline_ms": time_host_ms(lambda: pageable_assemble(rows, torch.bfloat16, dev), warmup=2, iters=iters),
        "h2d_staged_ms": time_host_ms(lambda: staged(reqs, dev), warmup=2, iters=iters),
        "d2h_baseline_ms": time_host_ms(lambda: y.cpu().numpy(), warmup=2, iters=iters),
        "d2h_pinned_ms": time_host_ms(lambda: to_host(y).numpy(), warmup=2, iters=iters),
    }
    res["h2d_speedup"] = res["h2d_baseline_ms"] / res["h2d_staged_ms"]
    res["d2h_speedup"] = res["d2h_baseline_ms"] / res["d2h_pinned_ms"]
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="8x2048,32x512,1x15708", help="batch x longest row, comma-separated")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument(
        "--threads",
        type=int,
        default=4,
        help="PyTorch CPU threads, as a GPU replica has (deploy.app.replica_plan: 4 on a 64-core 4-GPU host)",
    )
    p.add_argument("--out", default="docs/benchmarks")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench.host_path measures host<->GPU copies and needs a CUDA GPU")
    torch.set_num_threads(args.threads)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    rows = [measure(b, s, args.iters) for b, s in shapes]
    print(
        f"card: {card()}  hidden {HIDDEN}, float16 requests, bfloat16 model, {args.threads} CPU threads; wall ms per batch (GB/s)"
    )
    print(
        f"{'batch':>10s} {'MB':>6s} {'h2d base':>15s} {'h2d staged':>15s} {'x':>5s} {'d2h base':>15s} {'d2h pinned':>15s} {'x':>5s}"
    )
    for r in rows:
        mb = r["request_bytes"] / 1e6

        def cell(ms: float, nbytes: int) -> str:
            return f"{ms:7.2f} ({nbytes / ms / 1e6:4.1f})"

        print(
            f"{r['batch']:>4d}x{r['longest']:<5d} {mb:6.0f} {cell(r['h2d_baseline_ms'], r['request_bytes']):>15s} "
            f"{cell(r['h2d_staged_ms'], r['request_bytes']):>15s} {r['h2d_speedup']:4.2f}x "
            f"{cell(r['d2h_baseline_ms'], r['answer_bytes']):>15s} {cell(r['d2h_pinned_ms'], r['answer_bytes']):>15s} {r['d2h_speedup']:4.2f}x"
        )
    save(args.out, "host_path", {"results": rows, "args": vars(args)})
    fig, ax = pyplot().subplots(figsize=(8, 4))
    labels = [f"{r['batch']}x{r['longest']}" for r in rows]
    xs = np.arange(len(rows))
    for k, (key, name) in enumerate(
        [
            ("h2d_baseline_ms", "h2d pageable"),
            ("h2d_staged_ms", "h2d staged"),
            ("d2h_baseline_ms", "d2h pageable"),
            ("d2h_pinned_ms", "d2h pinned"),
        ]
    ):
        ax.bar(xs + (k - 1.5) * 0.2, [r[key] for r in rows], 0.2, label=name)
    ax.set_xticks(xs, labels)
    ax.set_ylabel("ms per batch (lower is better)")
    ax.legend()
    save_figure(fig, args.out, "host_path", f"Replica host path, {card()}")


if __name__ == "__main__":
    main()
