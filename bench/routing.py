"""A third-party DiT at its real width, routed to the op vs unrouted, in one process on one card.

Builds diffusers' ``FluxTransformer2DModel`` at FLUX.1's width (24 heads of 128, joint
attention dim 4096; ``--double``/``--single`` blocks, random weights, bf16) and times its
forward pass unrouted (diffusers' processors calling PyTorch SDPA) and under
``fa3trt.route_attention`` (every self-attention call on the op's kernel: FA3 or the CuTe
kernel on sm90), alternating the two for ``--rounds`` rounds at each token count. Reports
the ratio (routed / unrouted time; goal: never above 1) and the routed output's error
against the unrouted one (bf16 tolerance), and the routing report's counts.

    python -m bench.routing --out docs/benchmarks
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from bench._common import bar_plot, card, save, time_cuda_ms
from fa3trt import route_attention
from fa3trt.attention.kernels.selector import select_kernel


class _PassMode(TorchFunctionMode):
    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        return func(*args, **(kwargs or {}))


def flux(double: int, single: int, device: str) -> torch.nn.Module:
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    with torch.device(device):  # random weights made on the card: seconds, not a CPU minute
        model = FluxTransformer2DModel(
            patch_size=1,
            in_channels=64,
            num_layers=double,
            num_single_layers=single,
            attention_head_dim=128,
            num_attention_heads=24,
            joint_attention_dim=4096,
            pooled_projection_dim=768,
            guidance_embeds=False,
            axes_dims_rope=(16, 56, 56),
        )
    return model.to(device=device, dtype=torch.bfloat16).eval()


def inputs(img: int, txt: int, device: str) -> dict[str, torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(1)
    side = int(img**0.5)
    ids = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(img // side), indexing="ij"), -1).reshape(-1, 2)
    img_ids = torch.cat([torch.zeros(img, 1), ids.float()], dim=1).to(device)
    return {
        "hidden_states": torch.randn(1, img, 64, device=device, generator=g, dtype=torch.bfloat16),
        "encoder_hidden_states": torch.randn(1, txt, 4096, device=device, generator=g, dtype=torch.bfloat16),
        "pooled_projections": torch.randn(1, 768, device=device, generator=g, dtype=torch.bfloat16),
        "timestep": torch.full((1,), 0.5, device=device, dtype=torch.bfloat16),
        "img_ids": img_ids,
        "txt_ids": torch.zeros(txt, 3, device=device),
    }


def measure(model: torch.nn.Module, x: dict[str, torch.Tensor], rounds: int) -> dict[str, Any]:
    def unrouted() -> torch.Tensor:
        return model(**x, return_dict=False)[0]

    def routed() -> torch.Tensor:
        with route_attention(model, "sdpa"):
            return model(**x, return_dict=False)[0]

    def mode_only() -> torch.Tensor:
        # Unrouted, under a TorchFunctionMode that only passes calls on: what the interception
        # itself costs (a Python frame in front of every torch call), apart from the kernel.
        with _PassMode():
            return model(**x, return_dict=False)[0]

    with torch.no_grad():
        want = unrouted().float()
        with route_attention(model, "sdpa") as report:
            got = model(**x, return_dict=False)[0].float()
        err = float((got - want).norm() / want.norm())
        times: dict[str, list[float]] = {"unrouted": [], "routed": [], "mode_only": []}
        for _ in range(rounds):  # alternating, so clock drift hits all alike
            times["unrouted"].append(time_cuda_ms(unrouted, warmup=1, iters=3, repeats=1))
            times["routed"].append(time_cuda_ms(routed, warmup=1, iters=3, repeats=1))
            times["mode_only"].append(time_cuda_ms(mode_only, warmup=1, iters=3, repeats=1))
    ms = {k: statistics.median(v) for k, v in times.items()}
    return {
        "ms": ms,
        "ms_rounds": times,
        "routed_over_unrouted": ms["routed"] / ms["unrouted"],
        "mode_only_over_unrouted": ms["mode_only"] / ms["unrouted"],
        "rel_err_vs_unrouted": err,
        "report": report.as_dict(),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--double", type=int, default=2, help="double-stream (joint) blocks")
    p.add_argument("--single", type=int, default=4, help="single-stream blocks")
    p.add_argument("--tokens", default="4096+512,16384+512", help="image+text tokens per run, comma-separated")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", default="docs/benchmarks")
    p.add_argument("--name", default="routing_flux")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench.routing needs a CUDA GPU")
    model = flux(args.double, args.single, "cuda")
    kernel = select_kernel("cuda")
    print(f"card: {card()}   Flux {args.double}+{args.single} blocks, 24x128, bf16; op kernel {kernel}")
    rows = []
    for spec in args.tokens.split(","):
        img, txt = (int(n) for n in spec.split("+"))
        r = {"image_tokens": img, "text_tokens": txt, **measure(model, inputs(img, txt, "cuda"), args.rounds)}
        rows.append(r)
        print(
            f"{img + txt:>6} tokens: unrouted {r['ms']['unrouted']:.2f} ms, routed {r['ms']['routed']:.2f} ms, "
            f"routed/unrouted {r['routed_over_unrouted']:.3f} (goal <= 1), interception alone "
            f"{r['mode_only_over_unrouted']:.3f}; rel err {r['rel_err_vs_unrouted']:.2e}; "
            f"{r['report']}"
        )
    save(args.out, args.name, {"kernel": kernel, "double": args.double, "single": args.single, "rows": rows})
    labels = [f"{r['image_tokens'] + r['text_tokens']} tok {k}" for r in rows for k in ("unrouted", "routed")]
    values = [r["ms"][k] for r in rows for k in ("unrouted", "routed")]
    bar_plot(args.out, args.name, labels, values, "ms per forward", f"Flux {args.double}+{args.single}, {card()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
