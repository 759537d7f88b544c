"""``dtype(clamp(x * scale))`` of a (B, S, H, D) tensor in one pass, with the scale on the device.

FP8 attention quantizes q, k, v with it (``quantize_cast``: to e4m3, clamped to e4m3's range,
the scale derived from the amax inside the same pass; one scale for the tensor, or one per batch
row and group of heads) and turns an e4m3 output back into the model's dtype (``scale_cast``).
On an sm89+ GPU one Triton kernel reads each element once and writes it once, in any of these
dtypes, over strided rows (a fused QKV projection's views); elsewhere (the CPU, Triton missing,
rows it cannot walk) torch ops compute the same float32 scale, product, clamp and cast: the same
values, since each step rounds once, to nearest even.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch

from fa3trt.errors import MissingDependencyError

__all__ = ["scale_cast", "quantize_cast"]

log = logging.getLogger(__name__)

_TINY = 1e-12
"""The smallest amax a scale is derived from (an all-zero tensor gets a finite scale)."""


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
        descale_ptr,
        row_stride,
        seq,
        ROW: tl.constexpr,
        GROUPS: tl.constexpr,
        PER_GROUP: tl.constexpr,
        FROM_AMAX: tl.constexpr,
        BLOCK: tl.constexpr,
        CLAMP: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        keep = cols < ROW
        x = tl.load(x_ptr + row * row_stride + cols, mask=keep, other=0.0).to(tl.float32)
        rows = cols.to(tl.int64) * 0 + row  # the row as a vector, for the masks below
        if PER_GROUP:  # scale (B, GROUPS): this row's batch index, each column's group of heads
            at = (rows // seq) * GROUPS + cols // (ROW // GROUPS)
            first = (
                keep & (rows % seq == 0) & (cols % (ROW // GROUPS) == 0)
            )  # a batch's first row, a group's first column
        else:
            at = rows * 0
            first = (rows == 0) & (cols == 0)
        scale = tl.load(scale_ptr + at, mask=keep, other=1.0).to(tl.float32)
        if FROM_AMAX:  # scale_ptr holds the amax: descale = max(amax, tiny) / CLAMP, written once
            descale = tl.math.div_rn(tl.maximum(scale, 1e-12), tl.full(scale.shape, CLAMP, tl.float32))
            tl.store(descale_ptr + at, descale, mask=first)
            scale = tl.math.div_rn(tl.full(descale.shape, 1.0, tl.float32), descale)
        y = x * scale
        if CLAMP > 0:
            y = tl.minimum(tl.maximum(y, -CLAMP), CLAMP)
        tl.store(y_ptr + row * ROW + cols, y.to(y_ptr.dtype.element_ty), mask=keep)

    return cast


def _groups(t: torch.Tensor, scale: torch.Tensor) -> int:
    """How many scale groups each row of ``t`` has: 0 for one scale, else G of a (B, G) scale
    whose G divides H; anything else is refused, naming both shapes."""
    b, _, h, _ = t.shape
    if scale.dim() == 1 and scale.numel() == 1:
        return 0
    if scale.dim() == 2 and scale.shape[0] == b and scale.shape[1] > 0 and h % scale.shape[1] == 0:
        return int(scale.shape[1])
    raise ValueError(
        f"scale_cast: a scale of shape {tuple(scale.shape)} for a tensor of shape {tuple(t.shape)}; pass one "
        f"element or ({b}, G) with G dividing {h} (one per batch row and group of heads)"
    )


def _launch(
    t: torch.Tensor,
    scale: torch.Tensor,
    dtype: torch.dtype,
    clamp: float,
    out: torch.Tensor | None,
    method: str,
    descale: torch.Tensor | None,
) -> torch.Tensor | None:
    """The Triton pass where it runs (the output; ``descale`` written from the amax in ``scale``
    when given), else None for the torch ops."""
    b, s, h, d = t.shape
    groups = _groups(t, scale)
    rows_ok = t.stride(3) == 1 and t.stride(2) == d and (b == 1 or t.stride(0) == s * t.stride(1))
    kernel = _kernel() if method != "torch" and t.is_cuda and rows_ok else None
    if kernel is None or torch.cuda.get_device_capability(t.device) < (8, 9):
        if method == "triton":
            raise MissingDependencyError(f"scale_cast(method='triton') needs Triton on an sm89+ GPU; got {t.device}")
        return None
    if out is None:
        out = torch.empty((b, s, h, d), dtype=dtype, device=t.device)
    if t.numel():
        row = h * d
        block = min(1024, 1 << (row - 1).bit_length())
        kernel[(b * s, -(-row // block))](
            t, out, scale.contiguous(), scale if descale is None else descale, t.stride(1), s,
            ROW=row, GROUPS=max(groups, 1), PER_GROUP=groups > 0, FROM_AMAX=descale is not None, BLOCK=block,
            CLAMP=clamp,
        )  # fmt: skip
    return out


def _per_element(t: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """A (1,) or (B, G) scale broadcast over t's (B, S, H, D) elements."""
    groups = _groups(t, scale)
    if not groups:
        return scale
    return scale.repeat_interleave(t.shape[2] // groups, dim=1)[:, None, :, None]


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
    on t's device, of one element or of shape (B, G) (one per batch row and group of H / G
    consecutive heads); ``clamp`` > 0 bounds the product to [-clamp, clamp]. ``method``: auto,
    triton or torch."""
    got = _launch(t, scale, dtype, clamp, out, method, None)
    if got is not None:
        return got
    if out is None:
        out = torch.empty(t.shape, dtype=dtype, device=t.device)
    y = t.float() * _per_element(t, scale)
    return out.copy_(y.clamp_(-clamp, clamp) if clamp > 0 else y)


def quantize_cast(
    t: torch.Tensor, amax: torch.Tensor, dtype: torch.dtype, clamp: float, *, method: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(``dtype(clamp(t / descale))``, descale) with ``descale = max(amax, 1e-12) / clamp`` in
    float32: ``amax`` (any float dtype, one element or (B, G) as ``scale_cast``'s scale) maps to
    ``clamp``. One pass on the GPU, the scales derived inside it (no separate launches for them)."""
    descale = torch.empty(amax.shape, dtype=torch.float32, device=t.device)
    got = _launch(t, amax, dtype, clamp, None, method, descale)
    if got is not None:
        return got, descale
    descale = amax.float().clamp_min(_TINY) / clamp
    return scale_cast(t, descale.reciprocal(), dtype, clamp=clamp, method="torch"), descale
