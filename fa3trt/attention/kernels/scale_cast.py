"""``dtype(clamp(x * scale))`` of a (B, S, H, D) tensor in one pass, with the scale on the device,
and the amax such a scale comes from.

FP8 attention turns an e4m3 output back into the model's dtype with ``scale_cast`` (and
dequantizes with it where it emulates); ``fa3trt.attention.kernels.quantize`` quantizes q, k, v
with the same walk over rows. On an sm89+ GPU one Triton kernel reads each element once and writes
it once, in any of these dtypes, over strided rows (a fused QKV projection's views); elsewhere
(the CPU, Triton missing, rows it cannot walk) torch ops compute the same float32 product, clamp
and cast: the same values, since each step rounds once, to nearest even. ``absmax`` (max |x| per
batch row and group of heads) is the same kernel's other pass on a GPU, the inf-norm reduction
elsewhere: a max, exact either way. ``triton_kernel`` and ``fell_back`` are the one place that
decides whether a Triton kernel of this package runs for a tensor and falls back when it fails.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import torch

from fa3trt.attention.kernels.base import log_once
from fa3trt.errors import MissingDependencyError

__all__ = ["scale_cast", "absmax", "triton_kernel", "fell_back", "tiles"]

log = logging.getLogger(__name__)

_failed: set[str] = set()
"""Devices where the Triton kernel failed to build: the torch ops run there."""


@functools.cache
def _kernel() -> Any | None:
    """The Triton kernel over rows of a strided (rows, ROW) view (the scaled cast, or with AMAX the
    amax reduction), or None without Triton."""
    try:
        import triton
        import triton.language as tl
    except Exception as e:
        log.debug("Triton unavailable, scaled casts and amax reductions run as torch ops: %s", e)
        return None

    @triton.jit
    def rows_pass(
        x_ptr,
        y_ptr,
        scale_ptr,
        row_stride,
        seq,
        seq_blocks,
        ROW: tl.constexpr,
        GROUPS: tl.constexpr,
        PER_GROUP: tl.constexpr,
        ROWS: tl.constexpr,
        BLOCK: tl.constexpr,
        CHUNKS: tl.constexpr,
        CLAMP: tl.constexpr,
        AMAX: tl.constexpr,
    ):
        # A program: ROWS rows of one batch row's sequence by BLOCK columns of one group of heads,
        # so its scale is one value (its division done once, not per element).
        width: tl.constexpr = ROW // GROUPS
        batch = tl.program_id(0) // seq_blocks
        seq_block = tl.program_id(0) % seq_blocks
        group = tl.program_id(1) // CHUNKS
        chunk = tl.program_id(1) % CHUNKS
        rows = seq_block * ROWS + tl.arange(0, ROWS)
        local = chunk * BLOCK + tl.arange(0, BLOCK)
        keep = (rows < seq)[:, None] & (local < width)[None, :]
        at_row = (batch * seq + rows).to(tl.int64)[:, None]
        cols = (group * width + local)[None, :]
        x = tl.load(x_ptr + at_row * row_stride + cols, mask=keep, other=0.0).to(tl.float32)
        at = (batch * GROUPS + group) * PER_GROUP  # the scale's index: 0 for one scale
        if AMAX:  # the tile's max joins the group's in y_ptr (int32) by one atomic: an amax is >= 0,
            # where float32's order is its bits' order as int32
            top = tl.max(tl.max(tl.abs(x), axis=1), axis=0)
            tl.atomic_max(y_ptr + at, top.to(tl.int32, bitcast=True))
        else:
            y = x * tl.load(scale_ptr + at).to(tl.float32)
            if CLAMP > 0:
                y = tl.minimum(tl.maximum(y, -CLAMP), CLAMP)
            tl.store(y_ptr + at_row * ROW + cols, y.to(y_ptr.dtype.element_ty), mask=keep)

    return rows_pass


def _rows_ok(t: torch.Tensor) -> bool:
    """Whether the kernels can walk ``t``'s (B, S, H, D) elements as strided rows of H * D."""
    b, s, h, d = t.shape
    return t.stride(3) == 1 and t.stride(2) == d and (b == 1 or t.stride(0) == s * t.stride(1))


def triton_kernel(
    t: torch.Tensor,
    method: str,
    who: str,
    sm: tuple[int, int] = (0, 0),
    build: Callable[[], Any | None] | None = None,
    walkable: bool | None = None,
) -> Any | None:
    """The Triton kernel ``build()`` makes (default: this module's) where it runs for ``t`` (Triton
    present, a GPU of compute capability ``sm`` or later where no kernel has failed, rows it can
    walk: ``walkable``, default ``_rows_ok``), else None for the torch ops; ``method`` "triton"
    raises instead, "torch" always gets None."""
    ok = _rows_ok(t) if walkable is None else walkable
    usable = method != "torch" and t.is_cuda and ok and str(t.device) not in _failed
    kernel = (build or _kernel)() if usable else None
    if kernel is None or torch.cuda.get_device_capability(t.device) < sm:
        if method == "triton":
            gpu = f"an sm{sm[0]}{sm[1]}+ GPU" if sm > (0, 0) else "a GPU"
            raise MissingDependencyError(f"{who}(method='triton') needs Triton on {gpu}; got {t.device}")
        return None
    return kernel


def fell_back(t: torch.Tensor, method: str, who: str, e: Exception) -> None:
    """Triton failing to build the kernel for ``t``'s GPU: the torch ops run there from now on
    (re-raised with ``method`` "triton")."""
    if method == "triton":
        raise e
    log_once(f"{who}: the Triton kernel failed on {t.device} ({type(e).__name__}: {e}); torch ops instead")
    _failed.add(str(t.device))


def tiles(t: torch.Tensor, groups: int, elements: int, seq: int | None = None) -> tuple[int, int, int, int]:
    """The kernels' tiles over ``t`` (B, S, H, D): (BLOCK columns of one group of heads, ROWS rows,
    CHUNKS of columns a group, sequence blocks a batch row), about ``elements`` a program; over
    ``seq`` rows a batch row where given (a pass over some of them), else S."""
    _, s, h, d = t.shape
    s = s if seq is None else seq
    width = h * d // max(groups, 1)  # columns of one group of heads
    block = min(2048, 1 << (width - 1).bit_length())
    rows = max(1, elements // block)
    return block, rows, -(-width // block), -(-s // rows)


def _amax_launch(kernel: Any, t: torch.Tensor, groups: int) -> torch.Tensor:
    """``kernel`` over ``t`` (rows walkable, see ``_rows_ok``): the amax per (batch row, group) as
    (B, groups) float32, or of the whole tensor as (1,) with ``groups`` 0."""
    b, s, h, d = t.shape
    bits = torch.zeros((b, groups) if groups else (1,), dtype=torch.int32, device=t.device)
    if not t.numel():
        return bits.view(torch.float32)
    block, rows, chunks, seq_blocks = tiles(t, groups, 4096)
    kernel[(b * seq_blocks, max(groups, 1) * chunks)](
        t, bits, bits, t.stride(1), s, seq_blocks,
        ROW=h * d, GROUPS=max(groups, 1), PER_GROUP=int(groups > 0), ROWS=rows, BLOCK=block,
        CHUNKS=chunks, CLAMP=0.0, AMAX=True,
    )  # fmt: skip
    return bits.view(torch.float32)


def absmax(t: torch.Tensor, groups: int = 0, *, method: str = "auto") -> torch.Tensor:
    """max |t| of a (B, S, H, D) tensor on its device, float32: per batch row and group of H /
    ``groups`` consecutive heads as (B, groups), or of the whole tensor as (1,) with ``groups`` 0.
    On a GPU one Triton pass reads each element once (no temporary); elsewhere the inf-norm
    reduction computes the same values (a max is exact). ``method``: auto, triton or torch."""
    b, s, h, d = t.shape
    if groups and h % groups:
        raise ValueError(f"absmax: {groups} groups do not divide the tensor's {h} heads (shape {tuple(t.shape)})")
    kernel = triton_kernel(t, method, "absmax")
    if kernel is not None:
        try:
            return _amax_launch(kernel, t, groups)
        except Exception as e:  # the torch reduction instead
            fell_back(t, method, "absmax", e)
    if not groups:
        return torch.linalg.vector_norm(t, ord=float("inf")).float().reshape(1)
    return torch.linalg.vector_norm(t.unflatten(2, (groups, h // groups)), ord=float("inf"), dim=(1, 3, 4)).float()


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
    t: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, clamp: float, out: torch.Tensor | None, method: str
) -> torch.Tensor | None:
    """The Triton pass where it runs (the output), else None for the torch ops."""
    b, s, h, d = t.shape
    groups = _groups(t, scale)
    kernel = triton_kernel(t, method, "scale_cast", (8, 9))
    if kernel is None:
        return None
    if out is None:
        out = torch.empty((b, s, h, d), dtype=dtype, device=t.device)
    if not t.numel():
        return out
    block, rows, chunks, seq_blocks = tiles(t, groups, 2048)
    try:
        kernel[(b * seq_blocks, max(groups, 1) * chunks)](
            t, out, scale.contiguous(), t.stride(1), s, seq_blocks,
            ROW=h * d, GROUPS=max(groups, 1), PER_GROUP=int(groups > 0), ROWS=rows, BLOCK=block, CHUNKS=chunks,
            CLAMP=clamp, AMAX=False,
        )  # fmt: skip
    except Exception as e:  # the torch ops compute the same values
        fell_back(t, method, "scale_cast", e)
        return None
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
    got = _launch(t, scale, dtype, clamp, out, method)
    if got is not None:
        return got
    if out is None:
        out = torch.empty(t.shape, dtype=dtype, device=t.device)
    y = t.float() * _per_element(t, scale)
    return out.copy_(y.clamp_(-clamp, clamp) if clamp > 0 else y)
