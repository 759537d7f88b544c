"""Attention kernels on one GPU: TFLOP/s of every available kernel at the project's shapes.

Shapes (bf16, 32 heads of 128): the seed's 1x15708, 1x4096, and a ragged batch of 8 sequences
padded to 2048 (lengths 2048 down to 300). Ragged rows report *useful* TFLOP/s (FLOPs of the
real lengths only) and are compared with the same kernel on the unmasked full 8x2048 batch;
"cudnn+mask" is the dense boolean padding mask the project avoids, measured as the baseline.
Goals: the default kernel >= 95% of the fastest at each dense shape; ragged >= 90% of unmasked.
Every kernel is timed in the steady state of a recurring shape: the default (adaptive cuDNN)
kernel is first called until the shape has repaid a cuDNN plan (fa3trt.attention.kernels.cudnn). Device time
is taken with 20 calls queued behind a GPU sleep (``fa3trt.testing.time_queued``), so no gap the
host leaves between launches is counted, and the host's own µs per call are reported beside it
(for the paths that read device lengths on the host, that includes waiting for the GPU). The
goal's ragged/unmasked ratio is measured again in alternation (``--rounds`` pairs of timings
back to back). The first call of each kernel and shape is timed too (JIT compiles and plan
builds show there).

    python -m bench.attention --out docs/benchmarks
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from bench._common import bar_plot, card, save
from fa3trt.attention.kernels import cudnn, fa3, flash_cute
from fa3trt.attention.kernels.registry import available_kernels
from fa3trt.attention.kernels.selector import select_kernel
from fa3trt.testing import reference_attention, run_kernel, time_queued

H, D = 32, 128
RAGGED = [2048, 1900, 1700, 1500, 1200, 900, 600, 300]


def flops(lengths: list[int]) -> float:
    return sum(4.0 * n * n * H * D for n in lengths)


def first_call_ms(fn: Callable[[], Any]) -> float:
    """Wall time of one call to the end of its GPU work: a JIT compile or plan build on a
    kernel's first sight of a shape (or of its compile key) shows here."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3


def timed(fn: Callable[[], Any], rounds: int = 5) -> tuple[float, float]:
    """Median device ms and host µs per call over ``rounds`` queued timings."""
    fn()
    samples = [time_queued(fn) for _ in range(rounds)]
    return statistics.median(d for d, _ in samples), statistics.median(h for _, h in samples)


def paired(a: Callable[[], Any], b: Callable[[], Any], rounds: int) -> dict[str, Any]:
    """``a`` and ``b`` timed in alternation, ``rounds`` times: the median of a/b time ratios
    (each round's pair ran back to back, so a change of clock hits both alike)."""
    ta, tb, ratios = [], [], []
    for _ in range(rounds):
        x, _ = time_queued(a)
        y, _ = time_queued(b)
        ta.append(x)
        tb.append(y)
        ratios.append(y / x)  # b's time over a's: a's speed relative to b's, per FLOP counted alike
    return {
        "a_ms": statistics.median(ta),
        "b_ms": statistics.median(tb),
        "ratio_median": statistics.median(ratios),
        "ratio_range": [min(ratios), max(ratios)],
    }


def settle(fn: Callable[[], Any], padded_flops: float) -> None:
    """Call ``fn`` until the adaptive cuDNN kernel runs the shape the way a recurring shape
    runs: it plans a shape once the work seen in it would repay the plan build."""
    for _ in range(min(400, math.ceil(cudnn.plans.after_flops / padded_flops) + 1)):
        fn()


def masked_cudnn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    s = q.shape[1]
    keep = torch.arange(s, device=q.device)[None, :] < lens.to(q.device)[:, None]
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=keep[:, None, None, :]
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="docs/benchmarks")
    p.add_argument("--seed-len", type=int, default=15708)
    p.add_argument("--rounds", type=int, default=15, help="alternating rounds for the ragged/unmasked ratio")
    args = p.parse_args()
    dev = torch.device("cuda")
    default = select_kernel(dev)
    kernels = [k for k in available_kernels(dev) if k != "math"]
    g = torch.Generator(device="cuda").manual_seed(0)

    def qkv(b: int, s: int) -> list[torch.Tensor]:
        return [torch.randn(b, s, H, D, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(3)]

    rows: list[dict[str, Any]] = []
    for label, b, s in ((f"seed 1x{args.seed_len}", 1, args.seed_len), ("1x4096", 1, 4096), ("full 8x2048", 8, 2048)):
        q, k, v = qkv(b, s)
        for name in kernels:
            first = first_call_ms(lambda: run_kernel(name, q, k, v))
            settle(lambda: run_kernel(name, q, k, v), flops([s] * b))
            ms, host = timed(lambda: run_kernel(name, q, k, v))
            rows.append(
                {
                    "shape": label,
                    "kernel": name,
                    "ms": ms,
                    "tflops": flops([s] * b) / ms / 1e9,
                    "host_us": host,
                    "first_call_ms": first,
                }
            )
    q, k, v = qkv(8, 2048)
    lens_host = torch.tensor(RAGGED, dtype=torch.int32)
    lens_dev = lens_host.cuda()
    # Correctness of the ragged paths at this size, against the float64 reference on 2 sequences.
    ref = reference_attention(q[6:8], k[6:8], v[6:8], lens_dev[6:8])
    for name in kernels:
        for where, lens in (("host lens", lens_host), ("device lens", lens_dev)):
            first = first_call_ms(lambda: run_kernel(name, q, k, v, lens))
            settle(lambda: run_kernel(name, q, k, v, lens), flops([2048] * 8))
            out = run_kernel(name, q, k, v, lens)
            err = float((out[6:8].double() - ref.double()).norm() / ref.double().norm())
            ms, host = timed(lambda: run_kernel(name, q, k, v, lens))
            rows.append(
                {
                    "shape": f"ragged 8x2048 ({where})",
                    "kernel": name,
                    "ms": ms,
                    "tflops": flops(RAGGED) / ms / 1e9,
                    "host_us": host,
                    "rel_err": err,
                    "first_call_ms": first,
                }
            )
    ms, host = timed(lambda: masked_cudnn(q, k, v, lens_dev))
    rows.append(
        {
            "shape": "ragged 8x2048 (device lens)",
            "kernel": "cudnn+mask",
            "ms": ms,
            "tflops": flops(RAGGED) / ms / 1e9,
            "host_us": host,
        }
    )

    summary: dict[str, Any] = {"default_kernel": default}
    for shape in (f"seed 1x{args.seed_len}", "1x4096", "full 8x2048"):
        sel = [r for r in rows if r["shape"] == shape]
        best = max(sel, key=lambda r: r["tflops"])
        mine = next(r for r in sel if r["kernel"] == default)
        summary[shape] = {
            "fastest": best["kernel"],
            "fastest_tflops": best["tflops"],
            "default_tflops": mine["tflops"],
            "default_vs_fastest": mine["tflops"] / best["tflops"],
        }
    full = next(r for r in rows if r["shape"] == "full 8x2048" and r["kernel"] == default)
    rag = next(r for r in rows if r["shape"] == "ragged 8x2048 (host lens)" and r["kernel"] == default)
    summary["ragged_vs_unmasked"] = rag["tflops"] / full["tflops"]
    # The goal's ratio again, from the two measured in alternation (clock drift and boost cancel).
    pair = paired(lambda: run_kernel(default, q, k, v, lens_host), lambda: run_kernel(default, q, k, v), args.rounds)
    summary["ragged_vs_unmasked_paired"] = {
        "ratio_median": pair["ratio_median"] * flops(RAGGED) / flops([2048] * 8),
        "ratio_range": [r * flops(RAGGED) / flops([2048] * 8) for r in pair["ratio_range"]],
        "ragged_tflops": flops(RAGGED) / pair["a_ms"] / 1e9,
        "unmasked_tflops": flops([2048] * 8) / pair["b_ms"] / 1e9,
        "rounds": args.rounds,
    }
    # Each FlashAttention kernel's own ragged launch against its own dense one: no zeroing of
    # the padded rows, lengths on the device.
    own: dict[str, tuple[Callable[[], Any], Callable[[], Any]]] = {}
    if "fa3" in kernels:
        own["fa3"] = (lambda: fa3.attention(q, k, v, lens_dev, zero_tail=False), lambda: fa3.attention(q, k, v))
    if "flash_cute" in kernels:
        own["flash_cute"] = (
            lambda: flash_cute.attention(q, k, v, lens_dev, zero_tail=False),
            lambda: flash_cute.attention(q, k, v),
        )
    for name, (ragged, dense) in own.items():
        ck = paired(ragged, dense, args.rounds)
        summary[f"{name}_kernel_ragged_vs_dense"] = {
            "ratio_median": ck["ratio_median"] * flops(RAGGED) / flops([2048] * 8),
            "ratio_range": [r * flops(RAGGED) / flops([2048] * 8) for r in ck["ratio_range"]],
            "ragged_tflops": flops(RAGGED) / ck["a_ms"] / 1e9,
            "dense_tflops": flops([2048] * 8) / ck["b_ms"] / 1e9,
        }

    print(f"card: {card()}   default kernel: {default}")
    print(
        f"{'shape':32s} {'kernel':14s} {'ms':>8s} {'TFLOP/s':>9s} {'host us':>8s} {'rel err':>9s} {'1st call ms':>12s}"
    )
    for r in rows:
        err_txt = f"{r['rel_err']:.1e}" if "rel_err" in r else ""
        first_txt = f"{r['first_call_ms']:.1f}" if "first_call_ms" in r else ""
        print(
            f"{r['shape']:32s} {r['kernel']:14s} {r['ms']:8.3f} {r['tflops']:9.1f} {r['host_us']:8.1f} {err_txt:>9s} {first_txt:>12s}"
        )
    for shape in (f"seed 1x{args.seed_len}", "1x4096", "full 8x2048"):
        s = summary[shape]
        print(
            f"{shape}: default {s['default_tflops']:.0f} TFLOP/s = {100 * s['default_vs_fastest']:.1f}% of fastest ({s['fastest']}); goal >= 95%"
        )
    print(
        f"ragged 8x2048 with {default} (useful FLOPs): {100 * summary['ragged_vs_unmasked']:.1f}% of unmasked; goal >= 90%"
    )
    pr = summary["ragged_vs_unmasked_paired"]
    for name in own:
        ck = summary[f"{name}_kernel_ragged_vs_dense"]
        print(
            f"  {name}'s own launches, in alternation: ragged {ck['ragged_tflops']:.0f} vs dense {ck['dense_tflops']:.0f} "
            f"TFLOP/s = {100 * ck['ratio_median']:.1f}% (rounds {100 * ck['ratio_range'][0]:.1f}-{100 * ck['ratio_range'][1]:.1f}%)"
        )
    print(
        f"  measured in alternation, {pr['rounds']} rounds: ragged {pr['ragged_tflops']:.0f} vs unmasked {pr['unmasked_tflops']:.0f} "
        f"TFLOP/s = {100 * pr['ratio_median']:.1f}% (rounds {100 * pr['ratio_range'][0]:.1f}-{100 * pr['ratio_range'][1]:.1f}%)"
    )
    save(args.out, "attention", {"rows": rows, "summary": summary, "ragged_lengths": RAGGED})
    bar_plot(
        args.out,
        "attention",
        [f"{r['shape']}\n{r['kernel']}" for r in rows],
        [r["tflops"] for r in rows],
        "TFLOP/s (useful)",
        f"attention kernels, bf16, H={H} D={D} - {card()}",
    )


if __name__ == "__main__":
    main()
