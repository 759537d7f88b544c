"""e4m3 quantization of q, k, v in one pass over each: power-of-two factors from a sample.

Contract:
- ``quantize_pow2(t, groups, dtype, clamp, lengths=None)`` of a (B, S, H, D) tensor returns
  (``dtype(clamp(t * 2^k))`` contiguous, ``descale = 2^-k`` float32): one factor per batch row
  and group of H / ``groups`` consecutive heads, (B, groups), or one for the tensor, (1,), with
  ``groups`` 0.
- The factor is a power of two, so the product is exact and the cast the only rounding (to
  nearest even): the Triton kernel and the torch ops give the same bits.
- k maps an amax ``a`` into (2^(TOP-1), 2^TOP], TOP = floor(log2 clamp) (e4m3: 448 -> 256):
  k = TOP - ceil(log2 a). The amax it starts from is that of every ``SAMPLE``-th row of the
  group (a pass over 1/SAMPLE of it); the cast pass takes the group's true amax as it goes, and
  where the true amax times the sample's factor would pass ``clamp`` (a large value the sample
  missed) a last pass casts that group again with the true amax's factor. So every group's
  largest value lands within (2^(TOP-1), clamp] (an all-zero group's at 0), the result depends
  on the group's values alone (its batch row's up to ``lengths``, where given: the padding past
  it reads as 0, counts for no factor and is written as 0; with one factor for the tensor, every
  row's), not on the launch or the device, and the common case reads t once (and 1/SAMPLE
  of it) and writes it once: the one quantization pass FP8 attention pays for, where an exact
  amax factor needs a whole reduction pass before it.
- On an sm89+ GPU the passes are one Triton kernel (three launches: the sample's amax, the cast,
  the recast that exits at once where no group needs it), with the factors on the device: no
  host sync, capturable in a CUDA graph. Elsewhere (the CPU, Triton missing, heads that are not
  rows of H * D) torch ops compute the same values.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Any

import torch

from fa3trt.attention.kernels.scale_cast import absmax, fell_back, scale_cast, tiles, triton_kernel
from fa3trt.transfer import lengths_to_device

__all__ = ["quantize_pow2", "SAMPLE"]

log = logging.getLogger(__name__)

SAMPLE = 16
"""The sample is every SAMPLE-th row of each batch row's sequence (rows 0, SAMPLE, 2 SAMPLE, ...)."""

TINY = 1e-12
"""The smallest amax a factor is derived from (an all-zero group gets a finite factor)."""

HUGE = 3.0e38
"""The largest (an Inf gets a finite factor)."""


@functools.cache
def _kernel() -> Any | None:
    """The Triton kernel of the three passes (``STAGE`` 0, 1, 2), or None without Triton."""
    try:
        import triton
        import triton.language as tl
    except Exception as e:
        log.debug("Triton unavailable, e4m3 quantization runs as torch ops: %s", e)
        return None

    @triton.jit
    def pow2_pass(
        x_ptr,
        y_ptr,
        est_ptr,
        amax_ptr,
        descale_ptr,
        lens_ptr,
        batch_stride,
        row_stride,
        seq,
        seq_blocks,
        tiles,
        ROW: tl.constexpr,
        GROUPS: tl.constexpr,
        PER_GROUP: tl.constexpr,
        ROWS: tl.constexpr,
        BLOCK: tl.constexpr,
        CHUNKS: tl.constexpr,
        STEP: tl.constexpr,
        CLAMP: tl.constexpr,
        TOP: tl.constexpr,
        STAGE: tl.constexpr,
        SPREAD: tl.constexpr,
        LENS: tl.constexpr,
    ):
        # est_ptr, amax_ptr: int32 bits of float32 amaxes (>= 0, where float32's order is its bits'
        # order as int32), joined by atomic max. A factor 2^(TOP - ceil(log2 a)) and its inverse
        # are made from the exponent bits: exact. With LENS, a batch row's rows past its length
        # (lens_ptr) are read as 0: they count for no amax and are written as 0.
        width: tl.constexpr = ROW // GROUPS
        if STAGE == 2:
            # Program (piece, i): a group's tiles i, i + SPREAD, ... where its sample's factor
            # failed (none elsewhere); program (piece, 0) writes the group's descale either way.
            piece = tl.program_id(0)
            at = piece * PER_GROUP
            a_bits = tl.minimum(tl.maximum(tl.load(amax_ptr + at).to(tl.float32, bitcast=True), 1e-12), 3.0e38)
            a_bits = a_bits.to(tl.int32, bitcast=True)
            e_bits = tl.minimum(tl.maximum(tl.load(est_ptr + at).to(tl.float32, bitcast=True), 1e-12), 3.0e38)
            e_bits = e_bits.to(tl.int32, bitcast=True)
            a_up = ((a_bits >> 23) & 255) - 127 + ((a_bits & 8388607) != 0).to(tl.int32)
            e_up = ((e_bits >> 23) & 255) - 127 + ((e_bits & 8388607) != 0).to(tl.int32)
            amax = a_bits.to(tl.float32, bitcast=True)
            redo = amax * ((TOP - e_up + 127) << 23).to(tl.float32, bitcast=True) > CLAMP
            up = tl.where(redo, a_up, e_up)
            if tl.program_id(1) == 0:
                tl.store(descale_ptr + at, ((up - TOP + 127) << 23).to(tl.float32, bitcast=True))
            scale = ((TOP - up + 127) << 23).to(tl.float32, bitcast=True)
            for i in range(tl.program_id(1), tl.where(redo, tiles, 0), SPREAD):
                tile = piece * tiles + i
                chunk = tile % CHUNKS
                seq_block = (tile // CHUNKS) % seq_blocks
                group = (tile // CHUNKS // seq_blocks) % GROUPS
                batch = tile // CHUNKS // seq_blocks // GROUPS
                if LENS:  # noqa: SIM108 (a branch Triton resolves at compile time)
                    valid = tl.minimum(tl.maximum(tl.load(lens_ptr + batch), 0), seq)
                else:
                    valid = seq
                rows = seq_block * ROWS + tl.arange(0, ROWS)
                local = chunk * BLOCK + tl.arange(0, BLOCK)
                inside = (rows < seq)[:, None] & (local < width)[None, :]
                keep = (rows < valid)[:, None] & (local < width)[None, :]
                cols = (group * width + local)[None, :]
                src = batch.to(tl.int64) * batch_stride + rows.to(tl.int64)[:, None] * row_stride + cols
                x = tl.load(x_ptr + src, mask=keep, other=0.0).to(tl.float32)
                y = tl.minimum(tl.maximum(x * scale, -CLAMP), CLAMP)
                dst = (batch * seq + rows).to(tl.int64)[:, None] * ROW + cols
                tl.store(y_ptr + dst, y.to(y_ptr.dtype.element_ty), mask=inside)
        else:
            # Program: ROWS rows (every STEP-th) of one batch row by BLOCK columns of one group.
            batch = tl.program_id(0) // seq_blocks
            seq_block = tl.program_id(0) % seq_blocks
            group = tl.program_id(1) // CHUNKS
            chunk = tl.program_id(1) % CHUNKS
            if LENS:  # noqa: SIM108 (a branch Triton resolves at compile time)
                valid = tl.minimum(tl.maximum(tl.load(lens_ptr + batch), 0), seq)
            else:
                valid = seq
            rows = (seq_block * ROWS + tl.arange(0, ROWS)) * STEP
            local = chunk * BLOCK + tl.arange(0, BLOCK)
            keep = (rows < valid)[:, None] & (local < width)[None, :]
            cols = (group * width + local)[None, :]
            src = batch.to(tl.int64) * batch_stride + rows.to(tl.int64)[:, None] * row_stride + cols
            x = tl.load(x_ptr + src, mask=keep, other=0.0).to(tl.float32)
            top = tl.max(tl.max(tl.abs(x), axis=1), axis=0).to(tl.int32, bitcast=True)
            at = (batch * GROUPS + group) * PER_GROUP
            if STAGE == 0:
                tl.atomic_max(est_ptr + at, top)
            else:
                e_bits = tl.minimum(tl.maximum(tl.load(est_ptr + at).to(tl.float32, bitcast=True), 1e-12), 3.0e38)
                e_bits = e_bits.to(tl.int32, bitcast=True)
                e_up = ((e_bits >> 23) & 255) - 127 + ((e_bits & 8388607) != 0).to(tl.int32)
                y = x * ((TOP - e_up + 127) << 23).to(tl.float32, bitcast=True)
                y = tl.minimum(tl.maximum(y, -CLAMP), CLAMP)
                dst = (batch * seq + rows).to(tl.int64)[:, None] * ROW + cols
                inside = (rows < seq)[:, None] & (local < width)[None, :]
                tl.store(y_ptr + dst, y.to(y_ptr.dtype.element_ty), mask=inside)
                tl.atomic_max(amax_ptr + at, top)

    return pow2_pass


def _ceil_log2(a: torch.Tensor) -> torch.Tensor:
    """ceil(log2 a) of float32 ``a`` clamped to [TINY, HUGE], from its bits (int32)."""
    bits = a.float().clamp(TINY, HUGE).view(torch.int32)
    return ((bits >> 23) & 255) - 127 + ((bits & 0x7FFFFF) != 0).to(torch.int32)


def _pow2(n: torch.Tensor) -> torch.Tensor:
    """2^n as float32, exactly, for int32 n within float32's normal exponents."""
    return ((n + 127) << 23).to(torch.int32).view(torch.float32)


def _torch(
    t: torch.Tensor, groups: int, dtype: torch.dtype, clamp: float, top: int, lengths: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch ops computing the kernel's values (the module docstring's rule)."""
    if lengths is not None:  # rows past a length read as 0
        keep = torch.arange(t.shape[1], device=t.device)[None, :] < lengths.to(t.device)[:, None]
        t = torch.where(keep[:, :, None, None], t, torch.zeros((), dtype=t.dtype, device=t.device))
    est, amax = absmax(t[:, ::SAMPLE], groups, method="torch"), absmax(t, groups, method="torch")
    est_up, amax_up = _ceil_log2(est), _ceil_log2(amax)
    redo = amax.clamp(TINY, HUGE) * _pow2(top - est_up) > clamp
    up = torch.where(redo, amax_up, est_up)
    return scale_cast(t, _pow2(top - up), dtype, clamp=clamp, method="torch"), _pow2(up - top)


def _launch(
    kernel: Any,
    t: torch.Tensor,
    groups: int,
    dtype: torch.dtype,
    clamp: float,
    top: int,
    lengths: torch.Tensor | None,
) -> Any:
    b, s, h, d = t.shape
    g = max(groups, 1)
    out = torch.empty((b, s, h, d), dtype=dtype, device=t.device)
    stats = torch.zeros((2, b, groups) if groups else (2, 1), dtype=torch.int32, device=t.device)
    descale = torch.empty(stats.shape[1:], dtype=torch.float32, device=t.device)
    lens = stats if lengths is None else lengths_to_device(lengths, t.device)
    block, rows, chunks, blocks = tiles(t, groups, 4096, seq=math.ceil(s / SAMPLE))  # the sample
    fixed = dict(
        ROW=h * d, GROUPS=g, PER_GROUP=int(groups > 0), BLOCK=block, CHUNKS=chunks, CLAMP=clamp, TOP=top,
        LENS=lengths is not None,
    )  # fmt: skip
    head = (t, out, stats[0], stats[1], descale, lens, t.stride(0), t.stride(1), s)
    kernel[(b * blocks, g * chunks)](*head, blocks, 0, **fixed, ROWS=rows, STEP=SAMPLE, STAGE=0, SPREAD=1)
    _, rows, _, blocks = tiles(t, groups, 2048)
    kernel[(b * blocks, g * chunks)](*head, blocks, 0, **fixed, ROWS=rows, STEP=1, STAGE=1, SPREAD=1)
    pieces, per_piece = (b * groups, blocks * chunks) if groups else (1, b * blocks * chunks)
    spread = 1 << (min(per_piece, max(1, 1024 // pieces)).bit_length() - 1)  # about 1024 programs in all
    kernel[(pieces, spread)](*head, blocks, per_piece, **fixed, ROWS=rows, STEP=1, STAGE=2, SPREAD=spread)
    return out, descale


def quantize_pow2(
    t: torch.Tensor,
    groups: int,
    dtype: torch.dtype,
    clamp: float,
    *,
    lengths: torch.Tensor | None = None,
    method: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(``dtype(clamp(t * 2^k))``, ``2^-k``) per batch row and group of heads, (B, ``groups``), or
    for the tensor with ``groups`` 0 (see the module docstring). ``lengths`` ((B,) int32, any
    device): each batch row's rows past its length count for no factor and are written as 0
    (a padded batch's padding then moves no row's factors). ``method``: auto, triton or torch."""
    b, s, h, d = t.shape
    if groups and h % groups:
        raise ValueError(f"quantize: {groups} groups do not divide the tensor's {h} heads (shape {tuple(t.shape)})")
    if clamp < 1:
        raise ValueError(f"quantize: clamp must be >= 1 (the format's largest value), got {clamp}")
    if lengths is not None and tuple(lengths.shape) != (b,):
        raise ValueError(f"quantize: lengths of shape {tuple(lengths.shape)} for {b} batch rows; pass ({b},)")
    if not t.numel():
        return torch.empty(t.shape, dtype=dtype, device=t.device), torch.ones(
            (b, groups) if groups else (1,), dtype=torch.float32, device=t.device
        )
    top = math.floor(math.log2(clamp))
    walkable = t.stride(3) == 1 and t.stride(2) == d
    kernel = triton_kernel(t, method, "quantize", (8, 9), build=_kernel, walkable=walkable)
    if kernel is not None:
        try:
            return _launch(kernel, t, groups, dtype, clamp, top, lengths)  # type: ignore[no-any-return]
        except Exception as e:  # the torch ops compute the same values
            fell_back(t, method, "quantize", e)
    return _torch(t, groups, dtype, clamp, top, lengths)
