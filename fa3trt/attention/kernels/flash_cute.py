"""FlashAttention's Hopper forward kernel from its CuTe DSL implementation (``flash_attn.cute``).

Why: FA3 proper (``flash_attn_interface``) has no wheel and is built from source with nvcc.
The same project (Dao-AILab flash-attention) ships its kernels rewritten in NVIDIA's CuTe DSL
as Python wheels: ``flash-attn-4`` and ``nvidia-cutlass-dsl`` (``pip install "fa3trt[hopper]"``,
or ``[hopper-cu13]`` with torch built for CUDA 13). On sm90 that package runs the FA3 design
(TMA loads, warp-specialized producer/consumer warpgroups, softmax overlapped with the two
GEMMs), compiled just in time. Its ``seqused_q/k`` path takes the padded (B, S, H, D) batch
with per-sequence lengths on the device and launches only the query tiles inside each
sequence (a varlen tile scheduler); each tile stops at its sequence's last key. A ragged
batch is one launch with no host sync (its ragged rate against its dense one:
docs/benchmarks.md, section 1).

Compilation: one JIT compile per (dtype, head dim, dense or ragged, ...) key, not per sequence
length or batch size, on the first call of that key in a process (docs/benchmarks.md). ``FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1`` keeps the compiled kernels on
disk for the next process. Output rows past a sequence's length are not written by the kernel;
they are zeroed here (``fa3trt.attention.kernels.tail``) unless the caller zeroes them itself.

The package is imported lazily (``available()`` on an sm90 device), never when fa3trt is
imported: its import loads the DSL's MLIR compiler.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import torch

from fa3trt.attention.kernels import cudnn, sdpa
from fa3trt.attention.kernels.base import HALF_DTYPES, SequsedKernel, dense_batch, device_lengths_of, is_plain
from fa3trt.attention.kernels.tail import zero_tail_
from fa3trt.errors import MissingDependencyError

__all__ = ["FlashCute", "available", "attention", "supports", "supports_config", "supports_head_dim", "INSTALL_HINT"]

log = logging.getLogger(__name__)

INSTALL_HINT = 'pip install "fa3trt[hopper]" ("fa3trt[hopper-cu13]" with torch built for CUDA 13)'

_DTYPES = HALF_DTYPES
_HEAD_DIMS = (64, 96, 128, 192, 256)

# Dense batches shorter than this run on cuDNN once its plan for the shape is paid for: cuDNN
# led this kernel at short dense shapes, and this kernel led from this length up
# (docs/benchmarks.md, section 1).
DENSE_MIN_SEQ = 6144


@functools.cache
def forward_fn() -> Callable[..., Any] | None:
    """The package's forward entry point, or None. It takes ``out=`` and returns (out, lse, ...)."""
    try:
        from flash_attn.cute.interface import _flash_attn_fwd  # type: ignore[import-not-found]
    except Exception as e:  # ImportError, or OSError/RuntimeError from the DSL's native libraries
        log.debug("FlashAttention CuTe DSL unavailable: %s", e)
        return None
    return _flash_attn_fwd  # type: ignore[no-any-return]


def available(device: torch.device | str) -> bool:
    """The kernel can run on ``device``: an sm90 GPU and the package imports."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device)[0] == 9 and forward_fn() is not None


def supports_head_dim(d: int) -> bool:
    """A head dim the sm90 kernel is built for."""
    return d in _HEAD_DIMS


def supports_config(dtype: torch.dtype, head_dim: int) -> bool:
    """fp16/bf16 and a head dim the sm90 kernel is built for."""
    return dtype in _DTYPES and supports_head_dim(head_dim)


def supports(q: torch.Tensor) -> bool:
    """``supports_config`` for q's dtype and head dim."""
    return supports_config(q.dtype, q.shape[-1])


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_lens: torch.Tensor | None = None,
    seq_lens_k: torch.Tensor | None = None,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    out: torch.Tensor | None = None,
    zero_tail: bool = True,
) -> torch.Tensor:
    """Attention of q (B, Sq, H, D) over k, v (B, Sk, Hk, D) on torch's current stream; no host sync.

    ``seq_lens`` / ``seq_lens_k`` (int32 (B,), any device; within [0, Sq] and [0, Sk], which
    callers guarantee or clamp; ``seq_lens_k`` None: ``seq_lens`` when Sq == Sk, else every
    key): keys past a length are never read and rows past a query length are zero (or left
    unwritten with ``zero_tail=False``). ``causal`` is aligned bottom-right; H a multiple of
    Hk. ``out``: a contiguous (B, Sq, H, D) tensor of q's dtype to write into instead of a new
    one. q, k, v may be strided views (a fused QKV projection's) whose last dimension is
    contiguous.
    """
    fwd = forward_fn()
    if fwd is None:
        raise MissingDependencyError(f"the FlashAttention CuTe DSL kernels are not installed; {INSTALL_HINT}")
    lens, lens_k = device_lengths_of(q, k, seq_lens, seq_lens_k)
    result = fwd(q, k, v, seqused_q=lens, seqused_k=lens_k, causal=causal, softmax_scale=softmax_scale, out=out)[0]
    if lens is not None and zero_tail:
        zero_tail_(result, lens)
    return result  # type: ignore[no-any-return]


class FlashCute(SequsedKernel):
    """Ragged batches (``seqused_q/k``, one launch, lengths on the device) and long dense ones;
    short dense shapes that recur go to cuDNN (``DENSE_MIN_SEQ``)."""

    name = "flash_cute"
    head_dims = _HEAD_DIMS
    capability = ((9, 0), (9, 99))
    install_hint = INSTALL_HINT

    call = staticmethod(attention)

    @classmethod
    def importable(cls) -> bool:
        return forward_fn() is not None

    @classmethod
    def forward(
        cls,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        seq_lens: torch.Tensor | None,
        seq_lens_k: torch.Tensor | None = None,
        *,
        causal: bool = False,
        scale: float | None = None,
    ) -> torch.Tensor:
        s = q.shape[1]
        plain = is_plain(q, k, seq_lens, seq_lens_k, causal, scale)
        if plain and dense_batch(seq_lens, s) and s < DENSE_MIN_SEQ and cudnn.plans.ready(q, s):
            return sdpa.dense(q, k, v, "cudnn")
        return super().forward(q, k, v, seq_lens, seq_lens_k, causal=causal, scale=scale)
