"""Attention kernels: one module per kernel, one registry, one selector.

Each kernel (``fa3``, ``flash_cute``, ``cudnn`` and ``cudnn_padded``, ``flash`` and
``flash_seqused``, ``efficient`` and ``efficient_seqused``, ``math``) is an ``AttentionKernel``
declaring what it supports as data; ``registry.KERNELS`` lists them in order of preference and
``selector`` picks one per device (``FA3TRT_ATTN_KERNEL`` overrides, one vocabulary). The
padded-row zeroing (``tail``), the FP8 fallback (``fp8``) and the cuDNN plan ledger
(``cudnn.plans``) each live in one place. Importing this package imports neither FA3, the CuTe
DSL nor the cuDNN frontend: each kernel imports its package on first use.
"""

from fa3trt.attention.kernels.base import AttentionKernel
from fa3trt.attention.kernels.registry import (
    KERNELS,
    available_kernels,
    device_length_kernels,
    direct_write_kernels,
    get,
    names,
)
from fa3trt.attention.kernels.selector import (
    KERNEL_ENV,
    choose_enqueue_kernel,
    enqueue_kernel,
    forced_kernel,
    kernel_for,
    lengths_on_device,
    select_kernel,
)

__all__ = [
    "AttentionKernel",
    "KERNELS",
    "KERNEL_ENV",
    "get",
    "names",
    "available_kernels",
    "device_length_kernels",
    "direct_write_kernels",
    "forced_kernel",
    "select_kernel",
    "kernel_for",
    "choose_enqueue_kernel",
    "enqueue_kernel",
    "lengths_on_device",
]
