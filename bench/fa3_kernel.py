"""FA3 proper on one GPU: the host cost of each way to call it, and its rate against cuDNN across
dense shapes and on the ragged batch, with the host out of the way.

Host µs per call at a small batch (8 x 128 tokens, so the GPU keeps up with the host) for: the
interface's ``flash_attn_varlen_func`` (an autograd Function around a Python custom op around
the registered op), its ``_flash_attn_forward``, the registered op ``torch.ops.flash_attn_3.fwd``
that ``fa3trt.attention.kernels.fa3`` calls, and the op's own paths (device and host lengths, dense), beside
cuDNN SDPA. Then device time per call (20 calls queued behind a GPU sleep,
``fa3trt.testing.time_queued``; ``--rounds`` rounds, all entries in alternation) for FA3 and
cuDNN at dense shapes from 16x1024 to the seed's 1x15708, and for the ragged 8 x 2048 batch
(lengths 2048..300) through the registered op, the interface's varlen function and the op.
Each member's length is also timed alone, as a dense batch of 8 such sequences: the ragged
batch at best takes an eighth of each, which bounds what any launch of it can keep. And other
ways to launch the batch than one varlen launch: a dense launch per sequence (its own length)
on 1, 4 or 8 CUDA streams, and two varlen launches (long half, short half) on two streams.

    python -m bench.fa3_kernel --out docs/benchmarks      # needs FA3 (python -m fa3trt.fa3_build)
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from typing import Any

import torch

from bench._common import bar_plot, card, host_us, save
from fa3trt.attention.kernels import fa3 as _fa3
from fa3trt.attention.kernels import sdpa
from fa3trt.attention.kernels.tail import zero_tail_
from fa3trt.buckets import to_device
from fa3trt.testing import run_kernel, time_queued

H, D = 32, 128
RAGGED = [2048, 1900, 1700, 1500, 1200, 900, 600, 300]
DENSE = {
    "16x1024": (16, 1024),
    "8x2048": (8, 2048),
    "1x4096": (1, 4096),
    "1x6144": (1, 6144),
    "1x8192": (1, 8192),
    "seed 1x15708": (1, 15708),
}


def flops(lengths: list[int]) -> float:
    return sum(4.0 * n * n * H * D for n in lengths)


def host_costs(fa3: Any, op: Any, qkv: list[torch.Tensor]) -> dict[str, float]:
    """Host µs per call of each way to call FA3 (and cuDNN, and the op's pieces) on an 8 x 128
    batch, small enough that the GPU keeps up with the host."""
    q, k, v = qkv
    dev = q.device
    lh = torch.tensor([128, 100, 90, 80, 70, 60, 50, 40], dtype=torch.int32)
    ld = lh.cuda()
    cu = torch.arange(0, 9 * 128, 128, dtype=torch.int32, device=dev)
    flat = [t.view(8 * 128, H, D) for t in (q, k, v)]
    scratch = q.clone()
    entries: dict[str, Callable[[], Any]] = {
        "interface flash_attn_varlen_func": lambda: fa3.flash_attn_varlen_func(
            *flat, cu, cu, 128, 128, seqused_q=ld, seqused_k=ld
        ),
        "interface _flash_attn_forward": lambda: fa3._flash_attn_forward(
            *flat, cu_seqlens_q=cu, cu_seqlens_k=cu, seqused_q=ld, seqused_k=ld, max_seqlen_q=128, max_seqlen_k=128
        ),
        "registered op (what fa3trt.attention.kernels.fa3 calls)": lambda: op(
            q, k, v, seqused_q=ld, seqused_k=ld, num_splits=1
        ),
        "op path, device lengths": lambda: run_kernel("fa3", q, k, v, ld),
        "op path, host lengths": lambda: run_kernel("fa3", q, k, v, lh),
        "op path, dense": lambda: run_kernel("fa3", q, k, v),
        "cuDNN SDPA, dense": lambda: sdpa.dense(q, k, v, "cudnn"),
        "zeroing padded rows (Triton)": lambda: zero_tail_(scratch, ld),
        "host lengths to the GPU": lambda: to_device(lh, dev),
    }
    return {name: host_us(fn, 300, warmup=20) for name, fn in entries.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--out", default="docs/benchmarks")
    p.add_argument("--name", default="fa3_kernel")
    args = p.parse_args()
    fa3 = _fa3.module()
    if fa3 is None or not _fa3.available("cuda"):
        raise SystemExit(f"FA3 is not available on this GPU; {_fa3.INSTALL_HINT}")
    op = torch.ops.flash_attn_3.fwd
    dev = torch.device("cuda")
    g = torch.Generator(device="cuda").manual_seed(0)

    def qkv(b: int, s: int) -> list[torch.Tensor]:
        return [torch.randn(b, s, H, D, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(3)]

    host = host_costs(fa3, op, qkv(8, 128))

    fns: dict[tuple[str, str], Callable[[], Any]] = {}
    work: dict[str, float] = {}
    for label, (b, s) in DENSE.items():
        t = qkv(b, s)
        fns[(label, "fa3")] = lambda t=t: _fa3.attention(*t)
        fns[(label, "cudnn")] = lambda t=t: sdpa.dense(*t, "cudnn")
        work[label] = flops([s] * b)
    q, k, v = qkv(8, 2048)
    ld = torch.tensor(RAGGED, dtype=torch.int32, device=dev)
    cu = torch.arange(0, 9 * 2048, 2048, dtype=torch.int32, device=dev)
    flat = [t.view(8 * 2048, H, D) for t in (q, k, v)]
    fns[("ragged 8x2048", "fa3 registered op")] = lambda: _fa3.attention(q, k, v, ld, zero_tail=False)
    fns[("ragged 8x2048", "fa3 interface varlen")] = lambda: fa3.flash_attn_varlen_func(
        *flat, cu, cu, 2048, 2048, seqused_q=ld, seqused_k=ld
    )
    fns[("ragged 8x2048", "op path")] = lambda: run_kernel("fa3", q, k, v, ld)
    # The dense batch through the kernel the ragged one gets (FA3's varlen template: no 2-CTA
    # cluster, no TMA store of O, a scheduler-preparation kernel first): what that kernel variant
    # costs apart from the raggedness.
    full = torch.full((8,), 2048, dtype=torch.int32, device=dev)
    fns[("8x2048", "fa3 varlen kernel")] = lambda: _fa3.attention(q, k, v, full, zero_tail=False)
    work["ragged 8x2048"] = flops(RAGGED)
    out = torch.zeros_like(q)
    streams = [torch.cuda.Stream() for _ in range(8)]

    def per_sequence(nstreams: int) -> None:
        main = torch.cuda.current_stream()
        ready = torch.cuda.Event()
        ready.record(main)
        for i, n in enumerate(RAGGED):
            side = streams[i % nstreams]
            side.wait_event(ready)
            with torch.cuda.stream(side):
                _fa3.attention(q[i : i + 1, :n], k[i : i + 1, :n], v[i : i + 1, :n], out=out[i : i + 1, :n])
        for side in streams[:nstreams]:
            main.wait_stream(side)

    def two_halves() -> None:
        main = torch.cuda.current_stream()
        ready = torch.cuda.Event()
        ready.record(main)
        for side, part in ((streams[0], slice(0, 4)), (streams[1], slice(4, 8))):
            side.wait_event(ready)
            m = max(RAGGED[part])
            with torch.cuda.stream(side):
                _fa3.attention(q[part, :m], k[part, :m], v[part, :m], ld[part], zero_tail=False)
        main.wait_stream(streams[0])
        main.wait_stream(streams[1])

    for ns in (1, 4, 8):
        fns[("ragged 8x2048", f"dense per sequence, {ns} stream(s)")] = lambda ns=ns: per_sequence(ns)
    fns[("ragged 8x2048", "2 varlen halves, 2 streams")] = two_halves
    # Each member's length alone, as a dense batch of 8 such sequences: what FA3 does with that
    # length at full occupancy. A ragged launch at best takes an eighth of each of these.
    for n in sorted(set(RAGGED)):
        t = qkv(8, n)
        fns[(f"members 8x{n}", "fa3")] = lambda t=t: _fa3.attention(*t)
        lens_n = torch.full((8,), n, dtype=torch.int32, device=dev)
        fns[(f"members 8x{n}", "fa3 varlen kernel")] = lambda t=t, lens_n=lens_n: _fa3.attention(
            *t, lens_n, zero_tail=False
        )
        work[f"members 8x{n}"] = flops([n] * 8)
    for fn in fns.values():
        for _ in range(30):  # FA3's first call loads its kernels; cuDNN plans each shape
            fn()
    samples: dict[tuple[str, str], list[float]] = {key: [] for key in fns}
    for _ in range(args.rounds):
        for key, fn in fns.items():
            samples[key].append(time_queued(fn)[0])
    rows = [
        {
            "shape": a,
            "kernel": b,
            "ms": statistics.median(ms),
            "ms_range": [min(ms), max(ms)],
            "tflops": work[a] / statistics.median(ms) / 1e9,
        }
        for (a, b), ms in samples.items()
    ]
    # The ragged batch if every member ran at the rate FA3 reaches on its length alone.
    ideal_ms = sum(statistics.median(samples[(f"members 8x{n}", "fa3")]) / 8 for n in RAGGED)
    dense_fa3 = samples[("8x2048", "fa3")]
    members_ratio = work["ragged 8x2048"] / ideal_ms / (work["8x2048"] / statistics.median(dense_fa3))
    # The same with the varlen kernel throughout: the raggedness alone, the kernel variant aside.
    dense_varlen = samples[("8x2048", "fa3 varlen kernel")]
    ideal_varlen_ms = sum(statistics.median(samples[(f"members 8x{n}", "fa3 varlen kernel")]) / 8 for n in RAGGED)
    varlen = {
        "dense_varlen_vs_dense": statistics.median(dense_fa3) / statistics.median(dense_varlen),
        "members_alone_vs_dense_varlen": statistics.median(dense_varlen)
        * work["ragged 8x2048"]
        / work["8x2048"]
        / ideal_varlen_ms,
        "registered_op_vs_dense_varlen": statistics.median(
            [
                work["ragged 8x2048"] / a / (work["8x2048"] / b)
                for a, b in zip(samples[("ragged 8x2048", "fa3 registered op")], dense_varlen)
            ]
        ),
    }
    ratios = {}
    for key in [k for k in samples if k[0].startswith("ragged")]:
        per_round = [work["ragged 8x2048"] / a / (work["8x2048"] / b) for a, b in zip(samples[key], dense_fa3)]
        ratios[key[1]] = {"median": statistics.median(per_round), "range": [min(per_round), max(per_round)]}

    print(f"card: {card()}")
    print("host µs per call (8 x 128 tokens, bf16):")
    for name, us in host.items():
        print(f"  {name:44s} {us:7.1f}")
    print(f"device time, 20 calls queued per timing, {args.rounds} rounds in alternation:")
    for r in rows:
        print(f"  {r['shape']:14s} {r['kernel']:22s} {r['ms']:8.3f} ms {r['tflops']:7.1f} TFLOP/s")
    print(
        f"the ragged batch at each member's own dense rate: {ideal_ms:.3f} ms = {100 * members_ratio:.1f}% "
        f"of FA3's dense 8x2048 rate (the most a ragged launch can keep, short of a faster kernel for short sequences)"
    )
    for name, rr in ratios.items():
        print(
            f"ragged 8x2048 via {name} against FA3's dense 8x2048: {100 * rr['median']:.1f}% "
            f"(rounds {100 * rr['range'][0]:.1f}-{100 * rr['range'][1]:.1f}%); goal >= 90%"
        )
    print(
        f"FA3's varlen kernel on the dense 8x2048 batch: {100 * varlen['dense_varlen_vs_dense']:.1f}% of its dense kernel's rate; "
        f"against that rate the ragged batch keeps {100 * varlen['registered_op_vs_dense_varlen']:.1f}% (registered op) "
        f"of at most {100 * varlen['members_alone_vs_dense_varlen']:.1f}% (each member alone, varlen kernel)"
    )
    save(
        args.out,
        args.name,
        {
            "host_us": host,
            "rows": rows,
            "ragged_vs_dense_fa3": ratios,
            "varlen_kernel": varlen,
            "members_alone_ms": ideal_ms,
            "members_alone_vs_dense_fa3": members_ratio,
            "ragged_lengths": RAGGED,
            "rounds": args.rounds,
            "build_flags": _fa3.build_flags(),
        },
    )
    bar_plot(
        args.out,
        args.name,
        [f"{r['shape']}\n{r['kernel']}" for r in rows],
        [r["tflops"] for r in rows],
        "TFLOP/s (useful)",
        f"FA3 vs cuDNN, bf16, H={H} D={D}, queued timing - {card()}",
    )


if __name__ == "__main__":
    main()
