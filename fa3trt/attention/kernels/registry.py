"""Every attention kernel by name, in order of preference: the one list the selector, the op,
the plugin and the benchmarks read."""

from __future__ import annotations

import torch

from fa3trt.attention.kernels.base import AttentionKernel
from fa3trt.attention.kernels.cudnn import Cudnn, CudnnPadded
from fa3trt.attention.kernels.cudnn_fp8 import CudnnFP8
from fa3trt.attention.kernels.fa3 import FA3
from fa3trt.attention.kernels.flash import Efficient, EfficientSeqused, Flash, FlashSeqused
from fa3trt.attention.kernels.flash_cute import FlashCute
from fa3trt.attention.kernels.math import Math
from fa3trt.errors import ConfigError

__all__ = ["KERNELS", "get", "names", "available_kernels", "device_length_kernels", "direct_write_kernels"]

KERNELS: dict[str, type[AttentionKernel]] = {
    k.name: k
    for k in (FA3, CudnnFP8, FlashCute, Cudnn, CudnnPadded, Flash, FlashSeqused, Efficient, EfficientSeqused, Math)
}
"""Name -> kernel, most preferred first (a kernel that lacks a shape falls to a later one)."""


def names() -> list[str]:
    return list(KERNELS)


def get(name: str) -> type[AttentionKernel]:
    """The kernel called ``name``, or ``ConfigError`` listing the names there are."""
    kernel = KERNELS.get(name)
    if kernel is None:
        raise ConfigError(f"no attention kernel is called {name!r}; choose one of {names()}")
    return kernel


def available_kernels(device: torch.device | str) -> list[str]:
    """Kernels that can run on ``device`` (FA3 and FlashAttention's CuTe kernel only when they
    import and the GPU is sm90), in order of preference."""
    return [n for n, k in KERNELS.items() if k.available(device)]


def device_length_kernels() -> list[str]:
    """Kernels that read the lengths on the GPU: the only ones that run inside TensorRT."""
    return [n for n, k in KERNELS.items() if k.device_lengths]


def direct_write_kernels() -> list[str]:
    """Kernels that write a caller's output buffer themselves."""
    return [n for n, k in KERNELS.items() if k.direct_write]
