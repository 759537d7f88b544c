"""Zero the padded rows of a (B, S, ...) batch: ``out[b, lens[b]:] = 0``, on the device, no host sync.

The one place padded rows are zeroed. The ragged kernels (cuDNN's padding-mask graph, FA3's and
FlashAttention's ``seqused_q`` path, PyTorch's ``seqused_k`` kernels) leave the output rows past
each length unwritten or undefined; the op's contract says they are zero. On a GPU a Triton
kernel writes only those rows, where a masked fill reads and writes the whole output
(docs/benchmarks.md, section 1); ``masked_fill_`` on the CPU and where Triton is missing.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from typing import Any

import torch

from fa3trt.errors import MissingDependencyError

__all__ = ["zero_tail_", "zero_tail_launcher", "triton_kernel"]

log = logging.getLogger(__name__)

_BLOCK_S, _BLOCK_C = 8, 512


@functools.cache
def triton_kernel() -> Any | None:
    """A Triton kernel zeroing rows >= len of each sequence of a (B, S, ROW) tensor, or None.
    ROW (H*D) is a compile-time constant: one compile per head layout, an unrolled column loop."""
    try:
        import triton
        import triton.language as tl
    except Exception as e:
        log.debug("Triton unavailable, padded rows are zeroed with masked_fill_: %s", e)
        return None

    @triton.jit
    def zero_tail(
        out_ptr,
        lens_ptr,
        clamped_ptr,
        S,
        ROW: tl.constexpr,
        BLOCK_S: tl.constexpr,
        BLOCK_C: tl.constexpr,
        CLAMP: tl.constexpr,
    ):
        b = tl.program_id(0)
        rows = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
        n = tl.load(lens_ptr + b)
        if CLAMP:  # also write the lengths clamped into [0, S] (for a kernel launched after this one)
            n = tl.minimum(tl.maximum(n, 0), S)
            if tl.program_id(1) == 0:
                tl.store(clamped_ptr + b, n)
        keep = (rows >= n) & (rows < S)  # rows to zero; all-false for a block inside the sequence
        base = out_ptr + b.to(tl.int64) * S * ROW + rows[:, None].to(tl.int64) * ROW
        zeros = tl.zeros((BLOCK_S, BLOCK_C), dtype=out_ptr.dtype.element_ty)
        for c in range(0, ROW, BLOCK_C):
            cols = c + tl.arange(0, BLOCK_C)
            tl.store(base + cols[None, :], zeros, mask=keep[:, None] & (cols[None, :] < ROW))

    return zero_tail


def zero_tail_launcher(
    out: torch.Tensor, lens: torch.Tensor, clamp_into: torch.Tensor | None = None
) -> Callable[[], None] | None:
    """A launch that zeroes out[b, lens[b]:] of a contiguous (B, S, ...) tensor in place, with
    its grid and arguments fixed once (for a caller that zeroes the same buffer again and
    again), or None without Triton. Lengths past S zero nothing, lengths below 0 everything.
    With ``clamp_into`` (int32 (B,)), the same launch also writes the lengths clamped into
    [0, S] there: for a kernel that runs next and must not read past S."""
    kernel = triton_kernel()
    b, s = out.shape[:2]
    row = math.prod(out.shape[2:])
    if kernel is None or out.device.type != "cuda" or not out.is_contiguous():
        return None
    grid = (b, -(-s // _BLOCK_S))
    clamped = lens if clamp_into is None else clamp_into
    clamp = clamp_into is not None

    def launch() -> None:
        if b and s and row:
            kernel[grid](out, lens, clamped, s, ROW=row, BLOCK_S=_BLOCK_S, BLOCK_C=_BLOCK_C, CLAMP=clamp)
        elif clamp and b:
            torch.clamp(lens, 0, s, out=clamped)

    return launch


def zero_tail_(out: torch.Tensor, lens: torch.Tensor, method: str = "auto") -> torch.Tensor:
    """Zero out[b, lens[b]:] in place (no host sync; ``lens`` moves to out's device, queued).
    ``method``: auto, triton or masked_fill."""
    b, s = out.shape[:2]
    row = math.prod(out.shape[2:])
    if b == 0 or s == 0 or row == 0:
        return out
    lens = lens.to(out.device, non_blocking=True)
    launch = zero_tail_launcher(out, lens) if method in ("auto", "triton") else None
    if launch is None and method == "triton":
        raise MissingDependencyError(
            f"zero_tail_(method='triton') needs Triton and a contiguous CUDA tensor, got {out.device}; use method='auto'"
        )
    if launch is not None:
        launch()
        return out
    pad = torch.arange(s, device=out.device)[None, :] >= lens[:, None]
    return out.masked_fill_(pad.view(b, s, *([1] * (out.dim() - 2))), 0)
