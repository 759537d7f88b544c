"""FP8 attention (mode 1) against bf16 on one GPU: per kernel and shape, with its error; end to end.

In one process on one card:

1. Attention per shape (the seed shape 1x15708x32x128, 8x2048 dense and ragged, a FLUX.1 image
   of 4608 tokens at 24 heads): every bf16 kernel available (``forward`` at its steady state,
   cuDNN after its plan) and every FP8 kernel, timed three ways: the op in mode 1 (quantization
   included: what a model pays), the FP8 kernel alone on quantized inputs, and the quantization
   alone, beside what an exact-amax quantization costs (a reduction pass, then the cast). Device time of calls queued behind a GPU sleep (``fa3trt.testing.time_queued``: what
   the GPU spends, as in a CUDA graph or a busy engine), median of 3 rounds, with the host's µs
   per call beside it. Error: relative to float64 attention on 1024 query rows of 2 heads (dense shapes).
   Speed-up: the best bf16 kernel's time over the op's FP8 time (goal >= 1.3x).
2. The error on realistic activations: q, k, v of every attention call of FLUX.1's transformer
   at its real width (``examples/serve_flux_gpu.yaml``, random weights), FP8 against float64.
3. End to end, mode 1 against mode 0 in the same process: the seed model (``--layers``) at the
   seed shape, and the FLUX-width DiT routed with ``attn_mode`` 0 and 1 at 4096 + 512 tokens;
   each answer's error against the mode-0 answer.

    python -m bench.fp8 --out docs/benchmarks --name fp8_h100
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml

from bench._common import card, pyplot, save, save_figure, time_cuda_ms
from fa3trt.attention.kernels import KERNEL_ENV, KERNELS, cudnn, fp8
from fa3trt.attention.kernels.base import FP8_DTYPE, FP8_MAX
from fa3trt.attention.kernels.registry import available_kernels
from fa3trt.attention.kernels.scale_cast import absmax, scale_cast
from fa3trt.attention.kernels.selector import select_kernel
from fa3trt.attention.op import attention
from fa3trt.testing import reference_attention, time_queued

SHAPES: list[tuple[str, int, int, int, int, bool]] = [
    ("seed 1x15708x32x128", 1, 15708, 32, 128, False),
    ("8x2048x32x128", 8, 2048, 32, 128, False),
    ("8x2048x32x128 ragged", 8, 2048, 32, 128, True),
    ("FLUX 1x4608x24x128", 1, 4608, 24, 128, False),
]
BF16_KERNELS = ("fa3", "flash_cute", "cudnn", "cudnn_padded")


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def _force(name: str | None) -> None:
    if name is None:
        os.environ.pop(KERNEL_ENV, None)
    else:
        os.environ[KERNEL_ENV] = name
    fp8._chosen.clear()


def _queued(fn: Any, warmup: int) -> tuple[float, float]:
    """(device ms, host µs) per call of ``fn``: the median of 3 rounds of ``time_queued``."""
    for _ in range(warmup):
        fn()
    rounds = sorted(time_queued(fn) for _ in range(3))
    return rounds[1]


def _error(out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: int = 1024) -> float:
    """``out`` against float64 attention on its first ``rows`` query rows of 2 heads (every key)."""
    want = reference_attention(q[:, :rows, :2].double(), k[:, :, :2].double(), v[:, :, :2].double())
    return _rel(out[:, :rows, :2], want)


def attention_rows() -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    avail = available_kernels("cuda")
    fp8_names = [n for n in avail if KERNELS[n].fp8]
    for label, b, s, h, d, ragged in SHAPES:
        g = torch.Generator(device="cuda").manual_seed(s + b)
        q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
        lens = None
        lens_list = [s] * b
        if ragged:
            lens_list = [s] + torch.randint(s // 4, s, (b - 1,), generator=torch.Generator().manual_seed(b)).tolist()
            lens = torch.tensor(lens_list, dtype=torch.int32, device="cuda")
        flops = sum(4.0 * n * n * h * d for n in lens_list)
        warm = math.ceil(cudnn.PLAN_AFTER_FLOPS / flops) + 2  # past cuDNN's plan (fa3trt.attention.kernels.cudnn)
        best = math.inf
        for name in BF16_KERNELS:
            if name not in avail:
                continue
            kern = KERNELS[name]
            ms, host_us = _queued(lambda kern=kern: kern.forward(q, k, v, lens), warm)
            err = None if ragged else _error(kern.forward(q, k, v, lens), q, k, v)
            best = min(best, ms)
            rows.append(
                dict(
                    shape=label, kernel=name, dtype="bf16", ms=ms, host_us=host_us, tflops=flops / ms / 1e9, rel_err=err
                )
            )
        for name in fp8_names:
            _force(name)
            chosen = fp8.fp8_kernel(q.device, d)
            if chosen is None or chosen.name != name:
                continue
            per_tensor = chosen.fp8_scales == "tensor"
            quant = [fp8.quantize(t, per_tensor) for t in (q, k, v)]
            (q8, qs), (k8, ks), (v8, vs) = quant
            scales = (qs, ks, vs)
            op_ms, host_us = _queued(lambda: attention(q, k, v, lens, 1), 3)
            kernel_ms, _ = _queued(lambda chosen=chosen: chosen.forward_fp8(q8, k8, v8, lens, scales), 3)
            quant_ms, _ = _queued(lambda: [fp8.quantize(t, per_tensor) for t in (q, k, v)], 3)
            # What an exact amax factor costs: a whole reduction pass, then the cast (the scheme before).
            groups = 0 if per_tensor else h
            two_pass_ms, _ = _queued(
                lambda: [scale_cast(t, FP8_MAX / absmax(t, groups), FP8_DTYPE, clamp=FP8_MAX) for t in (q, k, v)], 3
            )
            err = None if ragged else _error(attention(q, k, v, lens, 1), q, k, v)
            rows.append(
                dict(
                    shape=label,
                    kernel=name,
                    dtype="fp8",
                    ms=op_ms,
                    host_us=host_us,
                    kernel_ms=kernel_ms,
                    quantize_ms=quant_ms,
                    two_pass_quantize_ms=two_pass_ms,
                    tflops=flops / op_ms / 1e9,
                    kernel_tflops=flops / kernel_ms / 1e9,
                    rel_err=err,
                    speedup_vs_best_bf16=best / op_ms,
                    kernel_speedup_vs_best_bf16=best / kernel_ms,
                )
            )
        _force(None)
    return rows


def _flux_spec(config: str) -> Any:
    from fa3trt.config import AppArgs

    raw = yaml.safe_load(Path(config).read_text())["applications"][0]["args"]
    return AppArgs.model_validate(dict(raw, backend="torch")).model


def realistic_errors(config: str) -> list[dict[str, Any]]:
    """FP8 against float64 on the q, k, v of each attention call of the FLUX-width transformer."""
    from fa3trt.models.sources import load_source

    spec = _flux_spec(config)
    model = load_source(spec).module.to("cuda")
    sig = spec.signature()
    inputs = {n: t.to("cuda") for n, t in sig.samples({"S": 4096, "T": 512}, 1).items()}
    captured: list[tuple[torch.Tensor, ...]] = []
    sdpa = F.scaled_dot_product_attention

    def capture(*args: Any, **kwargs: Any) -> torch.Tensor:
        given = list(args[:3])  # diffusers passes query, key and value by keyword
        q, k, v = given + [kwargs[n] for n in ("query", "key", "value")[len(given) :]]
        captured.append(tuple(t.transpose(1, 2).contiguous() for t in (q, k, v)))
        return sdpa(*args, **kwargs)

    F.scaled_dot_product_attention = capture
    try:
        with torch.inference_mode():
            model(**inputs)
    finally:
        F.scaled_dot_product_attention = sdpa
    rows = []
    for i, (q, k, v) in enumerate(captured):
        row: dict[str, Any] = {
            "call": i,
            "shape": "x".join(map(str, q.shape)),
            "amax": [float(t.abs().max()) for t in (q, k, v)],
        }
        for name in [n for n in available_kernels("cuda") if KERNELS[n].fp8]:
            _force(name)
            row[name] = _error(attention(q, k, v, None, 1), q, k, v)
        row["bf16"] = _error(attention(q, k, v, None, 0), q, k, v)
        rows.append(row)
    _force(None)
    del model
    torch.cuda.empty_cache()
    return rows


def end_to_end(config: str, layers: int) -> list[dict[str, Any]]:
    from fa3trt.attention.routing import route_attention
    from fa3trt.models.sources import load_source
    from fa3trt.models.spec import ReferenceSpec

    rows: list[dict[str, Any]] = []
    with torch.inference_mode():
        x = torch.randn(1, 15708, 4096, device="cuda", dtype=torch.bfloat16)  # the seed preset's width
        outs = {}
        for mode in (0, 1):
            # The same seeded weights in both modes (the reference source's own init).
            model = load_source(ReferenceSpec(preset="seed", layers=layers, attn_mode=mode)).module.to("cuda").eval()
            per = layers * 4.0 * 15708**2 * 4096
            ms = time_cuda_ms(
                lambda model=model: model(x), warmup=math.ceil(cudnn.PLAN_AFTER_FLOPS / per) + 2, iters=3, repeats=3
            )
            outs[mode] = model(x)
            rows.append(dict(model=f"seed {layers} layers 1x15708", mode=mode, ms=ms))
            del model
        rows[-1]["rel_err_vs_mode0"] = _rel(outs[1], outs[0])
        spec = _flux_spec(config)
        model = load_source(spec).module.to("cuda")
        inputs = {n: t.to("cuda") for n, t in spec.signature().samples({"S": 4096, "T": 512}, 1).items()}
        eager = model(**inputs).sample
        for mode in (0, 1):

            def run(mode: int = mode) -> torch.Tensor:
                with route_attention(model, spec.routing, attn_mode=mode, log_level=10):
                    return model(**inputs).sample

            ms = time_cuda_ms(run, warmup=5, iters=5, repeats=3)
            out = run()
            rows.append(
                dict(model="FLUX width 2+4 blocks 4096+512", mode=mode, ms=ms, rel_err_vs_eager=_rel(out, eager))
            )
    for r in rows:
        base = next(x for x in rows if x["model"] == r["model"] and x["mode"] == 0)
        r["speedup_vs_mode0"] = base["ms"] / r["ms"]
    return rows


def plot(out: str, name: str, rows: list[dict[str, Any]]) -> None:
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    fig, ax = pyplot().subplots(figsize=(9, 4))
    series = list(dict.fromkeys(f"{r['kernel']} {r['dtype']}" for r in rows))
    width = 0.8 / max(1, len(series))
    for j, sname in enumerate(series):
        vals = [
            next((r["tflops"] for r in rows if r["shape"] == sh and f"{r['kernel']} {r['dtype']}" == sname), 0)
            for sh in shapes
        ]
        ax.bar([i + j * width for i in range(len(shapes))], vals, width, label=sname)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(shapes))], shapes, fontsize=8)
    ax.set_ylabel("attention TFLOP/s (FP8: quantization included)")
    ax.legend(fontsize=7)
    save_figure(fig, out, name, f"FP8 vs bf16 attention - {card()}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="docs/benchmarks")
    p.add_argument("--name", default="fp8")
    p.add_argument("--config", default="examples/serve_flux_gpu.yaml")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--parts", default="attention,realistic,e2e")
    args = p.parse_args()
    parts = set(args.parts.split(","))
    select_kernel("cuda")  # the op's own choice, made before any kernel is forced below
    result: dict[str, Any] = {"kernels": [n for n in available_kernels("cuda") if KERNELS[n].fp8]}
    print(f"card: {card()}   FP8 kernels: {result['kernels']}")
    if "attention" in parts:
        result["attention"] = rows = attention_rows()
        print(
            f"{'shape':24s} {'kernel':14s} {'dtype':5s} {'ms':>8s} {'host us':>8s} {'TFLOP/s':>8s} {'kern ms':>8s} {'quant ms':>8s} {'2-pass':>8s} {'x bf16':>7s} {'rel err':>8s}"
        )
        for r in rows:
            err = "" if r["rel_err"] is None else f"{r['rel_err']:.4f}"
            extra = (
                f"{r['kernel_ms']:8.3f} {r['quantize_ms']:8.3f} {r['two_pass_quantize_ms']:8.3f} "
                f"{r['speedup_vs_best_bf16']:6.2f}x"
                if r["dtype"] == "fp8"
                else " " * 35
            )
            print(
                f"{r['shape']:24s} {r['kernel']:14s} {r['dtype']:5s} {r['ms']:8.3f} {r['host_us']:8.0f} {r['tflops']:8.0f} {extra} {err:>8s}"
            )
        plot(args.out, args.name, rows)
        save(args.out, args.name, result)
    if "realistic" in parts:
        result["realistic"] = real = realistic_errors(args.config)
        for r in real:
            errs = "  ".join(f"{k} {r[k]:.4f}" for k in [*result["kernels"], "bf16"] if k in r)
            print(
                f"FLUX-width call {r['call']:2d} {r['shape']:18s} amax q/k/v {r['amax'][0]:.1f}/{r['amax'][1]:.1f}/{r['amax'][2]:.1f}  rel err: {errs}"
            )
        save(args.out, args.name, result)
    if "e2e" in parts:
        result["end_to_end"] = e2e = end_to_end(args.config, args.layers)
        for r in e2e:
            errs = "  ".join(f"{k} {r[k]:.4f}" for k in ("rel_err_vs_mode0", "rel_err_vs_eager") if k in r)
            print(f"{r['model']:34s} mode {r['mode']}  {r['ms']:8.2f} ms  {r['speedup_vs_mode0']:5.2f}x mode 0  {errs}")
        save(args.out, args.name, result)


if __name__ == "__main__":
    main()
