"""FP8 attention (the op's mode 1): per-(batch, head) e4m3 quantization, and the one fallback.

A kernel with a real FP8 kernel (``AttentionKernel.fp8``, FA3) computes on the e4m3 inputs with
their descale factors. Any other kernel computes on the dequantized inputs in the input dtype:
FP8 numerics without FP8 speed, announced once per (kernel, dtype) with a ``RuntimeWarning``.
The op and the TensorRT plugin both call ``run_fp8``; only the fallback's kernel call differs.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

from fa3trt.attention.kernels.base import AttentionKernel
from fa3trt.attention.kernels.registry import KERNELS, available_kernels
from fa3trt.errors import MissingDependencyError

__all__ = ["FP8_DTYPE", "quantize", "dequantize", "run_fp8", "EMULATION_WARNED", "fp8_refusal", "require_fp8_kernel"]

FP8_DTYPE = torch.float8_e4m3fn
_FP8_MAX = float(torch.finfo(FP8_DTYPE).max)

EMULATION_WARNED: set[tuple[str, torch.dtype]] = set()
"""(kernel, dtype) pairs whose emulated FP8 has been announced in this process."""


def quantize(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(batch, head) e4m3 quantization of a (B, S, H, D) tensor.

    Returns (fp8 tensor, descale of shape (B, H) in float32) with ``t ≈ fp8 * descale``.
    """
    amax = t.abs().amax(dim=(1, 3)).float().clamp_min(1e-12)  # (B, H)
    descale = amax / _FP8_MAX
    q8 = (t.float() / descale[:, None, :, None]).clamp(-_FP8_MAX, _FP8_MAX).to(FP8_DTYPE)
    return q8, descale


def dequantize(q8: torch.Tensor, descale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The inverse of ``quantize``, in ``dtype``."""
    return (q8.float() * descale[:, None, :, None]).to(dtype)


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
) -> torch.Tensor:
    """Attention of FP8-quantized q (B, Sq, H, D) over k, v (B, Sk, Hk, D), in q's dtype.

    On ``kernel``'s FP8 kernel where it has one for this head dim; otherwise ``emulated`` runs
    on the dequantized inputs (the caller's kernel call, with its own lengths).
    """
    (q8, qs), (k8, ks), (v8, vs) = quantize(q), quantize(k), quantize(v)
    if kernel.fp8 and kernel.supports(FP8_DTYPE, q.shape[-1]):
        out = kernel.forward_fp8(q8, k8, v8, seq_lens, (qs, ks, vs), seq_lens_k, causal=causal, scale=scale)
        return out.to(q.dtype)
    if (kernel.name, q.dtype) not in EMULATION_WARNED:
        EMULATION_WARNED.add((kernel.name, q.dtype))
        warnings.warn(
            "attention mode=1 (FP8): no FP8 kernel here (FA3 not installed, or built without FP8 "
            f"at head dim {q.shape[-1]}), so q, k, v are quantized to FP8 e4m3 and computed with the "
            f"{kernel.name!r} kernel in {q.dtype}: FP8 numerics without FP8 speed. "
            "Build FA3 (python -m fa3trt.fa3_build) for the FP8 kernel.",
            RuntimeWarning,
            stacklevel=3,
        )
    return emulated(dequantize(q8, qs, q.dtype), dequantize(k8, ks, q.dtype), dequantize(v8, vs, q.dtype))


def fp8_refusal(device_type: str, available: list[str], head_dim: int) -> str | None:
    """Why a model in mode 1 (FP8) must not load on this device, or None when it may.

    On a GPU, mode 1 loads only where a kernel computes in FP8 (FA3 built with FP8 at this head
    dim): the emulation quantizes and computes in the input dtype, slower than mode 0 there
    (docs/benchmarks.md, section 1), which is no reason to choose FP8. On the CPU the emulation
    is the FP8 numerics reference and loads."""
    if device_type != "cuda":
        return None
    if any(KERNELS[n].fp8 and KERNELS[n].supports(FP8_DTYPE, head_dim) for n in available):
        return None
    return (
        f"attention mode 1 (FP8) needs an FP8 attention kernel at head dim {head_dim} on this GPU, and none of "
        f"{available} is one: build FA3 with FP8 (python -m fa3trt.fa3_build <flash-attention checkout>, sm90), "
        "or set the model's attn_mode to 0. Without it FP8 would be emulated, slower than attn_mode 0."
    )


def require_fp8_kernel(device: torch.device, head_dim: int) -> None:
    """``MissingDependencyError`` with ``fp8_refusal``'s reason when mode 1 must not load here."""
    reason = fp8_refusal(device.type, available_kernels(device), head_dim)
    if reason is not None:
        raise MissingDependencyError(reason)
