"""FP8 attention (the op's mode 1): e4m3 quantization, the FP8 kernel's choice, and the one fallback.

The FP8 kernel is the first kernel of the registry's order that computes in FP8 (``fp8``), is
available on the device, holds the head dim and takes the call's features (FA3's e4m3 kernel
where ``python -m fa3trt.fa3_build`` built it, else cuDNN's FP8 SDPA); ``FA3TRT_ATTN_KERNEL``
naming an FP8 kernel forces it. q, k, v are quantized once, with the scales that kernel takes
(per (batch, head) for FA3, per tensor for cuDNN), computed on the device: no host sync. On a
GPU the quantization is one fused Triton pass per tensor (power-of-two factors from a sample of
its rows, checked against its amax in the same pass: ``fa3trt.attention.kernels.quantize``).
Without an FP8 kernel (the CPU, or a shape the kernel refuses) the caller's kernel computes on
the dequantized inputs in the input dtype: FP8 numerics without FP8 speed, announced once per
(kernel, dtype) with a ``RuntimeWarning``. The op and the TensorRT plugin both call ``run_fp8``.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable

import torch

from fa3trt.attention.kernels import cudnn_graph
from fa3trt.attention.kernels.base import FP8_DTYPE, FP8_MAX, AttentionKernel, dense_batch, key_lengths, log_once
from fa3trt.attention.kernels.quantize import quantize_pow2
from fa3trt.attention.kernels.registry import KERNELS, available_kernels
from fa3trt.attention.kernels.scale_cast import scale_cast
from fa3trt.attention.kernels.selector import forced_kernel
from fa3trt.errors import CudnnGraphUnsupportedError, MissingDependencyError

__all__ = [
    "FP8_DTYPE",
    "quantize",
    "dequantize",
    "fp8_kernel",
    "choose_fp8_kernel",
    "run_fp8",
    "EMULATION_WARNED",
    "fp8_refusal",
    "require_fp8_kernel",
]

log = logging.getLogger(__name__)

EMULATION_WARNED: set[tuple[str, torch.dtype]] = set()
"""(kernel, dtype) pairs whose emulated FP8 has been announced in this process."""


def quantize(
    t: torch.Tensor, per_tensor: bool = False, heads: int | None = None, lengths: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 quantization of a (B, S, H, D) tensor with factors computed on its device (no host sync).

    Returns (fp8 tensor, float32 descale) with ``t ≈ fp8 * descale``: descale of shape (B, heads)
    (per batch row and head, ``heads`` = H by default; fewer: one factor per group of H / heads
    consecutive heads, as FA3 takes q's under grouped-query attention, one per key head), or
    (1,) with ``per_tensor`` (one factor for the whole tensor). Each factor is a power of two
    that puts its group's largest value within (128, 448], chosen from a sample of the rows and
    checked against the true amax within the same pass (``quantize_pow2``): one pass over ``t``.
    ``lengths`` ((B,) int32, any device): each row's padding past its length counts for no
    factor and is quantized to 0, so a row's factors do not depend on the batch it is padded in.
    """
    groups = 0 if per_tensor else (t.shape[2] if heads is None else heads)
    return quantize_pow2(t, groups, FP8_DTYPE, FP8_MAX, lengths=lengths)


def dequantize(q8: torch.Tensor, descale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The inverse of ``quantize``, in ``dtype`` (any shape of descale it returns)."""
    return scale_cast(q8, descale, dtype, method="torch")


def choose_fp8_kernel(
    available: list[str],
    head_dim: int,
    forced: str | None = None,
    *,
    cross: bool = False,
    causal: bool = False,
    gqa: bool = False,
) -> type[AttentionKernel] | None:
    """The FP8 kernel for a call: ``forced`` where it is an FP8 kernel in ``available`` that
    holds ``head_dim`` and takes the call's features, else the first FP8 kernel of
    ``available`` (the registry's order) that does, else None (the call is emulated)."""
    first = [forced] if forced in available and KERNELS[forced].fp8 else []
    for name in first + available:
        k = KERNELS[name]
        if k.fp8 and k.supports(FP8_DTYPE, head_dim) and k.takes(cross=cross, causal=causal, gqa=gqa):
            return k
    return None


_chosen: dict[tuple[object, ...], type[AttentionKernel] | None] = {}


def fp8_kernel(
    device: torch.device, head_dim: int, *, cross: bool = False, causal: bool = False, gqa: bool = False
) -> type[AttentionKernel] | None:
    """``choose_fp8_kernel`` on ``device``, chosen once per (device, head dim, features, forced
    kernel) and logged once."""
    forced = forced_kernel()
    key = (str(device), head_dim, cross, causal, gqa, forced)
    if key not in _chosen:
        kernel = choose_fp8_kernel(available_kernels(device), head_dim, forced, cross=cross, causal=causal, gqa=gqa)
        _chosen[key] = kernel
        log.info("FP8 attention on %s at head dim %d: %s", device, head_dim, kernel.name if kernel else "emulated")
    return _chosen[key]


Emulated = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def run_fp8(
    kernel: type[AttentionKernel],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_lens: torch.Tensor | None,
    emulated: Emulated,
    seq_lens_k: torch.Tensor | None = None,
    *,
    causal: bool = False,
    scale: float | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of FP8-quantized q (B, Sq, H, D) over k, v (B, Sk, Hk, D), in q's dtype.

    On the device's FP8 kernel (``fp8_kernel``) where there is one for this call; otherwise
    ``emulated`` (the caller's call on ``kernel``, with its own lengths) runs on the dequantized
    inputs. ``out``: a buffer the FP8 kernel may write into (``forward_fp8``'s); the result is
    ``out`` itself when it did, its rows past a query length then the caller's to zero.
    """
    cross = q.shape[1] != k.shape[1] or (seq_lens_k is not None and seq_lens_k is not seq_lens)
    fk = fp8_kernel(q.device, q.shape[-1], cross=cross, causal=causal, gqa=q.shape[2] != k.shape[2])
    per_tensor = fk is not None and fk.fp8_scales == "tensor"
    # q's factors per key head (its group of query heads): FA3 takes q's descale as (B, Hk); the
    # padding past each length counts for no factor (host lengths that are all full: none).
    lens_k = key_lengths(seq_lens, seq_lens_k, q.shape[1], k.shape[1])
    lq = None if dense_batch(seq_lens, q.shape[1]) else seq_lens
    lk = None if dense_batch(lens_k, k.shape[1]) else lens_k
    q8, qs = quantize(q, per_tensor, k.shape[2], lq)
    (k8, ks), (v8, vs) = (quantize(t, per_tensor, None, lk) for t in (k, v))
    if fk is not None:
        try:
            res = fk.forward_fp8(
                q8, k8, v8, seq_lens, (qs, ks, vs), seq_lens_k, causal=causal, scale=scale, out_dtype=q.dtype, out=out
            )
            return res.to(q.dtype)
        except CudnnGraphUnsupportedError as e:  # cached per shape: one refusal, then emulation
            log_once(f"FP8 attention: {e}; this shape is emulated on {kernel.name!r}")
    elif (kernel.name, q.dtype) not in EMULATION_WARNED:
        EMULATION_WARNED.add((kernel.name, q.dtype))
        warnings.warn(
            f"attention mode=1 (FP8): no FP8 attention kernel here for head dim {q.shape[-1]} (FA3 with FP8, "
            "or cuDNN's FP8 SDPA through the cuDNN frontend on sm90+), so q, k, v are quantized to FP8 e4m3 and "
            f"computed with the {kernel.name!r} kernel in {q.dtype}: FP8 numerics without FP8 speed.",
            RuntimeWarning,
            stacklevel=3,
        )
    return emulated(dequantize(q8, qs, q.dtype), dequantize(k8, ks, q.dtype), dequantize(v8, vs, q.dtype))


def fp8_refusal(device_type: str, available: list[str], head_dim: int, *, causal: bool = False) -> str | None:
    """Why a model in mode 1 (FP8) must not load on this device, or None when it may.

    On a GPU, mode 1 loads only where a kernel computes in FP8 at this head dim (cuDNN's FP8
    SDPA on sm90+, or FA3 built with FP8): the emulation quantizes and computes in the input
    dtype, slower than mode 0 there (docs/benchmarks.md, section 1), which is no reason to
    choose FP8. On the CPU the emulation is the FP8 numerics reference and loads."""
    if device_type != "cuda":
        return None
    if choose_fp8_kernel(available, head_dim, causal=causal) is not None:
        return None
    what = "a causal FP8 attention kernel" if causal else "an FP8 attention kernel"
    return (
        f"attention mode 1 (FP8) needs {what} at head dim {head_dim} on this GPU, and none of "
        f"{available} is one: on sm90+ install the cuDNN frontend ({cudnn_graph.INSTALL_HINT}) for cuDNN's FP8 "
        "SDPA, or build FA3 with FP8 (python -m fa3trt.fa3_build <flash-attention checkout>, sm90); or set the "
        "model's attn_mode to 0. Without one FP8 would be emulated, slower than attn_mode 0."
    )


def require_fp8_kernel(device: torch.device, head_dim: int, *, causal: bool = False) -> None:
    """``MissingDependencyError`` with ``fp8_refusal``'s reason when mode 1 must not load here
    (``causal``: the model's calls are causal, which cuDNN's FP8 graph here does not take)."""
    reason = fp8_refusal(device.type, available_kernels(device), head_dim, causal=causal)
    if reason is not None:
        raise MissingDependencyError(reason)
