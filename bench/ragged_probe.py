"""Where FlashAttention's CuTe kernel loses time on a ragged batch (the ragged goal of
``bench.attention``): the same 8 sequences of 2048..300 tokens launched several ways, each
timed in alternation with the dense 8x2048 launch of the same kernel.

- ``padded seqused``: the op's launch, (B, S, H, D) with per-sequence lengths on the device.
  The kernel's varlen scheduler sizes its grid from B*S, so query tiles past every length are
  launched and exit at once.
- ``packed cu_seqlens``: the same tokens pre-packed to (sum of lengths, H, D): the grid holds
  only the sequences' tiles (the packing copy is not timed: it is the kernel's ceiling).
- ``padded, S cut to 128 past the longest``: a view, no copy (what a bucket's padding allows).
- ``two launches``: the longest half and a view of the shortest half cut to its own longest.
- ``empty tiles``: one 2048-token sequence and seven of length 0 against one sequence alone:
  the cost of the tiles that exit at once.

    python -m bench.ragged_probe --out docs/benchmarks
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch

from bench._common import card, save, time_cuda_ms
from bench.attention import RAGGED, flops, paired
from fa3trt.attention.kernels import flash_cute as _flash_cute


def _fwd(**kw: Any) -> torch.Tensor:
    fwd = _flash_cute.forward_fn()
    assert fwd is not None
    return fwd(causal=False, **kw)[0]  # type: ignore[no-any-return]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="docs/benchmarks")
    p.add_argument("--rounds", type=int, default=9)
    args = p.parse_args()
    if not _flash_cute.available("cuda"):
        raise SystemExit("needs an sm90 GPU with FlashAttention's CuTe DSL kernels: " + _flash_cute.INSTALL_HINT)
    torch.manual_seed(0)
    b, s, h, d = 8, 2048, 32, 128
    q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    lens = torch.tensor(RAGGED, dtype=torch.int32, device="cuda")
    cu = torch.zeros(b + 1, dtype=torch.int32, device="cuda")
    cu[1:] = torch.cumsum(lens, 0)
    keep = torch.arange(s, device="cuda")[None, :] < lens[:, None]
    qp, kp, vp = (t[keep] for t in (q, k, v))
    half = b // 2
    cut = -(-max(RAGGED) // 128) * 128
    cut2 = -(-max(RAGGED[half:]) // 128) * 128
    side = torch.cuda.Stream()

    def dense() -> torch.Tensor:
        return _fwd(q=q, k=k, v=v)

    def two_streams() -> None:
        side.wait_stream(torch.cuda.current_stream())
        _fwd(q=q[:half], k=k[:half], v=v[:half], seqused_q=lens[:half], seqused_k=lens[:half])
        with torch.cuda.stream(side):
            _fwd(q=q[half:, :cut2], k=k[half:, :cut2], v=v[half:, :cut2], seqused_q=lens[half:], seqused_k=lens[half:])
        torch.cuda.current_stream().wait_stream(side)

    variants: dict[str, Callable[[], Any]] = {
        "padded seqused": lambda: _fwd(q=q, k=k, v=v, seqused_q=lens, seqused_k=lens),
        "packed cu_seqlens": lambda: _fwd(
            q=qp, k=kp, v=vp, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=s, max_seqlen_k=s
        ),
        "padded, S cut to 128 past the longest": lambda: _fwd(
            q=q[:, :cut], k=k[:, :cut], v=v[:, :cut], seqused_q=lens, seqused_k=lens
        ),
        "two launches, one stream": lambda: (
            _fwd(q=q[:half], k=k[:half], v=v[:half], seqused_q=lens[:half], seqused_k=lens[:half]),
            _fwd(q=q[half:, :cut2], k=k[half:, :cut2], v=v[half:, :cut2], seqused_q=lens[half:], seqused_k=lens[half:]),
        ),
        "two launches, two streams": two_streams,
    }
    # Every variant agrees with the padded launch on every valid row.
    ref: torch.Tensor = variants["padded seqused"]()
    got_packed = torch.zeros_like(ref)
    got_packed[keep] = variants["packed cu_seqlens"]()
    err = float((got_packed - ref)[keep].abs().max())
    print(f"card: {card()}   packed vs padded max abs diff on valid rows: {err:.2e}")
    rows: list[dict[str, Any]] = []
    useful = flops(RAGGED)
    for name, fn in variants.items():
        fn()
        pr = paired(fn, dense, args.rounds)
        rows.append(
            {
                "variant": name,
                "ms": pr["a_ms"],
                "tflops": useful / pr["a_ms"] / 1e9,
                "dense_tflops": flops([s] * b) / pr["b_ms"] / 1e9,
                "vs_dense": pr["ratio_median"] * useful / flops([s] * b),
                "vs_dense_range": [r * useful / flops([s] * b) for r in pr["ratio_range"]],
            }
        )
    one = (q[:1], k[:1], v[:1])
    full = torch.tensor([s] + [0] * (b - 1), dtype=torch.int32, device="cuda")
    t_one = time_cuda_ms(lambda: _fwd(q=one[0], k=one[1], v=one[2]), warmup=3, iters=30)
    t_one_used = time_cuda_ms(
        lambda: _fwd(q=one[0], k=one[1], v=one[2], seqused_q=full[:1], seqused_k=full[:1]), warmup=3, iters=30
    )
    t_empty = time_cuda_ms(lambda: _fwd(q=q, k=k, v=v, seqused_q=full, seqused_k=full), warmup=3, iters=30)
    empty_tiles = (b - 1) * (s // 128) * h
    empty = {
        "one_dense_ms": t_one,
        "one_seqused_ms": t_one_used,
        "with_7_empty_ms": t_empty,
        "empty_tiles": empty_tiles,
        "us_per_empty_tile": (t_empty - t_one_used) * 1e3 / empty_tiles,
    }
    print(f"{'variant':40s} {'ms':>7s} {'TFLOP/s':>8s} {'dense':>6s} {'of dense':>9s}")
    for r in rows:
        print(
            f"{r['variant']:40s} {r['ms']:7.3f} {r['tflops']:8.0f} {r['dense_tflops']:6.0f} {100 * r['vs_dense']:8.1f}%"
            f"  ({100 * r['vs_dense_range'][0]:.1f}-{100 * r['vs_dense_range'][1]:.1f})"
        )
    print(
        f"empty tiles: 1x2048 dense {t_one:.3f} ms, seqused {t_one_used:.3f} ms, with 7 empty sequences "
        f"{t_empty:.3f} ms: {empty['us_per_empty_tile'] * 1e3:.1f} ns per empty tile ({empty_tiles} tiles)"
    )
    save(
        args.out,
        "ragged_probe",
        {"card": card(), "lengths": RAGGED, "rows": rows, "empty_tiles": empty, "packed_max_abs_diff": err},
    )


if __name__ == "__main__":
    main()
