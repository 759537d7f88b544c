"""``dtype(clamp(x * scale))`` of a (B, S, H, D) tensor in one pass, with the scale on the device.

FP8 attention quantizes q, k, v with it (to e4m3, clamped to e4m3's range; one scale for the
tensor, or one per (batch row, head)) and turns an e4m3 output back into the model's dtype. On an sm89+ GPU one Triton kernel reads each element once
and writes it once, in any of these dtypes, over strided rows (a fused QKV projection's views);
elsewhere (the CPU, Triton missing, rows it cannot walk) torch ops compute the same float32
product, clamp and cast: the same values, since both round once, to nearest even.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch

from fa3trt.errors import MissingDependencyError

__all__ = ["scale_cast"]

log = logging.getLogger(__name__)


@functools.cache
def _kernel() -> Any | None:
    """The Triton kernel over rows of a strided (rows, ROW) view, or None without Triton."""
    try:
        import triton
        import triton.language as tl
    except Exception as e:
        log.debug("Triton unavailable, scaled casts run as torch ops: %s", e)
        return None

    @triton.jit
    def cast(
        x_ptr,
        y_ptr,
        scale_ptr,
        row_stride,
        seq,
        ROW: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        PER_HEAD: tl.constexpr,
        BLOCK: tl.constexpr,
        CLAMP: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        keep = cols < ROW
        x = tl.load(x_ptr + row * row_stride + cols, mask=keep, other=0.0).to(tl.float32)
        if PER_HEAD:  # scale (B, H): this row's batch index, each column's head
            scale = tl.load(scale_ptr + (row // seq) * (ROW // HEAD_DIM) + cols // HEAD_DIM, mask=keep, other=0.0)
        else:
            scale = tl.load(scale_ptr)
        y = x * scale
        if CLAMP > 0:
            y = tl.minimum(tl.maximum(y, -CLAMP), CLAMP)
        tl.store(y_ptr + row * ROW + cols, y.to(y_ptr.dtype.element_ty), mask=keep)

    return cast


def scale_cast(
    t: torch.Tensor,
    scale: torch.Tensor,
    dtype: torch.dtype,
    *,
    clamp: float = 0.0,
    out: torch.Tensor | None = None,
    method: str = "auto",
) -> torch.Tensor:
    """``dtype(clamp(t * scale))`` as a contiguous tensor (``out`` where given); ``scale`` float32
    on t's device, of one element or of shape (B, H) (one per batch row and head); ``clamp`` > 0
    bounds the product to [-clamp, clamp]. ``method``: auto, triton or torch."""
    b, s, h, d = t.shape
    per_head = scale.numel() != 1 or scale.dim() == 2
    if per_head and tuple(scale.shape) != (b, h):
        raise ValueError(f"scale_cast: a scale of shape {tuple(scale.shape)} for a tensor of shape {tuple(t.shape)}; "
                         f"pass one element or ({b}, {h})")  # fmt: skip
    row = h * d
    rows_ok = t.stride(3) == 1 and t.stride(2) == d and (b == 1 or t.stride(0) == s * t.stride(1))
    kernel = _kernel() if method != "torch" and t.is_cuda and rows_ok else None
    if out is None:
        out = torch.empty((b, s, h, d), dtype=dtype, device=t.device)
    if kernel is not None and torch.cuda.get_device_capability(t.device) >= (8, 9):
        if t.numel():
            block = min(1024, 1 << (row - 1).bit_length())
            kernel[(b * s, -(-row // block))](
                t,
                out,
                scale.contiguous(),
                t.stride(1),
                s,
                ROW=row,
                HEAD_DIM=d,
                PER_HEAD=per_head,
                BLOCK=block,
                CLAMP=clamp,
            )
        return out
    if method == "triton":
        raise MissingDependencyError(f"scale_cast(method='triton') needs Triton on an sm89+ GPU; got {t.device}")
    y = t.float() * (scale[:, None, :, None] if per_head else scale)
    return out.copy_(y.clamp_(-clamp, clamp) if clamp > 0 else y)
