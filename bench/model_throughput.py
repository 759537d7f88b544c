"""Model throughput on one GPU: the torch backend at the seed preset vs the card's GEMM rate.

Measures, in one process on one card: the bf16 GEMM rate (8192^3, random data), then the seed
model (hidden 4096, 32 heads of 128, bf16, ``--layers``) through ``TorchBackend`` at the seed
shape (1 x 15708) and at 4 x 4096, and the same layers written as plain eager PyTorch with
cuDNN SDPA (the baseline: what the backend must not lose). Reports tokens/s and model FLOP
utilization = model TFLOP/s / GEMM TFLOP/s. Goal: >= 75%.

    python -m bench.model_throughput --out docs/benchmarks
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench._common import bar_plot, card, gemm_tflops, save, time_cuda_ms
from fa3trt.attention.kernels import cudnn  # noqa: E402
from fa3trt.models.reference import ModelConfig, Transformer
from fa3trt.models.spec import ReferenceSpec
from fa3trt.serving.torch_backend import TorchBackend


def model_flops(cfg: ModelConfig, b: int, s: int) -> float:
    d = cfg.hidden
    linear = 2 * b * s * (3 * d * d + d * d + 2 * cfg.mlp_ratio * d * d)
    attn = 4.0 * b * s * s * d
    return cfg.layers * (linear + attn)


def eager_baseline(model: Transformer, x: torch.Tensor) -> torch.Tensor:
    """The same weights through plain PyTorch ops and cuDNN SDPA: no custom op, no lengths."""
    cfg = model.cfg
    b, s, d = x.shape
    for blk in model.blocks:
        q, k, v = blk.qkv(blk.norm1(x)).view(b, s, 3, cfg.heads, cfg.head_dim).permute(2, 0, 3, 1, 4)
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            a = F.scaled_dot_product_attention(q, k, v)
        x = x + blk.proj(a.transpose(1, 2).reshape(b, s, d))
        x = x + blk.fc2(F.gelu(blk.fc1(blk.norm2(x)), approximate="tanh"))
    return model.norm(x)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="docs/benchmarks")
    p.add_argument("--layers", type=int, default=2)
    args = p.parse_args()
    gemm = gemm_tflops()
    spec = ReferenceSpec(preset="seed", layers=args.layers)
    cfg = spec.config()
    backend = TorchBackend(spec, device="cuda")
    rows: list[dict[str, Any]] = []
    for b, s in ((1, 15708), (4, 4096)):
        x = torch.randn(b, s, cfg.hidden, device="cuda", dtype=torch.bfloat16)
        batch = {"x": x, "seq_lens": torch.full((b,), s, dtype=torch.int32)}  # every row full: no padding
        f = model_flops(cfg, b, s)
        with torch.inference_mode():
            for name, fn in (
                ("fa3trt torch backend", lambda: backend.run(batch)),
                ("eager cuDNN baseline", lambda: eager_baseline(backend.module, x)),
            ):
                # Warm until the attention shape has repaid its cuDNN plan (the steady state of
                # a model called again and again at one shape, e.g. a diffusion sampler).
                per_forward = cfg.layers * 4.0 * b * s * s * cfg.hidden
                ms = time_cuda_ms(fn, warmup=math.ceil(cudnn.plans.after_flops / per_forward) + 2, iters=5, repeats=3)
                tflops = f / ms / 1e9
                rows.append(
                    {
                        "shape": f"{b}x{s}",
                        "path": name,
                        "ms": ms,
                        "tokens_per_s": b * s / ms * 1e3,
                        "tflops": tflops,
                        "mfu": tflops / gemm,
                    }
                )
    print(
        f"card: {card()}   bf16 GEMM {gemm:.0f} TFLOP/s   seed preset, {args.layers} layers, attention kernel {backend.kernel}"
    )
    print(f"{'shape':10s} {'path':22s} {'ms':>8s} {'tokens/s':>10s} {'TFLOP/s':>8s} {'MFU':>6s}")
    for r in rows:
        print(
            f"{r['shape']:10s} {r['path']:22s} {r['ms']:8.2f} {r['tokens_per_s']:10.0f} {r['tflops']:8.0f} {100 * r['mfu']:5.1f}%"
        )
    print("goal: MFU >= 75% of the measured GEMM rate")
    save(
        args.out,
        "model_throughput",
        {"gemm_tflops": gemm, "layers": args.layers, "kernel": backend.kernel, "rows": rows},
    )
    bar_plot(
        args.out,
        "model_throughput",
        [f"{r['shape']}\n{r['path']}" for r in rows],
        [100 * r["mfu"] for r in rows],
        "MFU (% of bf16 GEMM)",
        f"seed model, {args.layers} layers - {card()}",
        goal=75,
    )


if __name__ == "__main__":
    main()
