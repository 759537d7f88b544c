"""Which kernel runs: the op's choice per device, the plugin's inside TensorRT, and the next
kernel in line for a shape the chosen one lacks. Each choice is logged once.

``FA3TRT_ATTN_KERNEL`` names one kernel of ``fa3trt.attention.kernels.registry`` (one vocabulary for the
op, the plugin and the benchmarks); a name that is not a kernel, or not available on the
device, is a ``ConfigError`` listing the choices. Inside TensorRT only kernels that read the
lengths on the GPU can run: a forced kernel that reads them on the host is ignored there, and
logged, since it would synchronize the stream on every call.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections.abc import Sequence

import torch

from fa3trt.attention.kernels.base import AttentionKernel, cuda_capability, log_once
from fa3trt.attention.kernels.registry import KERNELS, available_kernels, device_length_kernels, get, names
from fa3trt.errors import ConfigError

__all__ = [
    "KERNEL_ENV",
    "forced_kernel",
    "select_kernel",
    "kernel_for",
    "choose_enqueue_kernel",
    "enqueue_kernel",
    "lengths_on_device",
]

log = logging.getLogger(__name__)

KERNEL_ENV = "FA3TRT_ATTN_KERNEL"
_LAST_RESORT = "efficient_seqused"  # device lengths, any float dtype, any GPU


def forced_kernel() -> str | None:
    """The kernel ``FA3TRT_ATTN_KERNEL`` names, None when unset; ``ConfigError`` for a name
    that is no kernel."""
    forced = os.environ.get(KERNEL_ENV) or None
    if forced is not None and forced not in KERNELS:
        raise ConfigError(f"{KERNEL_ENV}={forced!r} is not an attention kernel; set one of {names()} or unset it")
    return forced


def _device_key(device: torch.device | str) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


_select_lock = threading.Lock()
_selected: dict[str, str] = {}


def select_kernel(device: torch.device | str) -> str:
    """The kernel this process's op uses on ``device``: chosen once, logged once."""
    device = _device_key(device)
    key = str(device)
    name = _selected.get(key)
    if name is not None:
        return name
    with _select_lock:
        if key in _selected:
            return _selected[key]
        available = available_kernels(device)
        forced = forced_kernel()
        cap = cuda_capability(device)
        if forced:
            if forced not in available:
                raise ConfigError(
                    f"{KERNEL_ENV}={forced!r} is not available on {device}; set one of {available} or unset it"
                )
            name, why = forced, f"forced by {KERNEL_ENV}"
        elif device.type != "cuda":
            name, why = "math", "CPU"
        elif "fa3" in available:
            name, why = "fa3", "flash_attn_interface imports and the GPU is sm90"
        elif "flash_cute" in available:
            name, why = "flash_cute", "FlashAttention's CuTe DSL kernels import and the GPU is sm90"
        elif cap is not None and cap >= (9, 0):
            name, why = "cudnn", "sm90+ without FA3: cuDNN SDPA is the fastest PyTorch kernel there"
        else:
            name, why = "flash", "pre-sm90 GPU without FA3"
        log.info("attention kernel on %s: %s (%s)", device, name, why)
        _selected[key] = name
        return name


def kernel_for(
    name: str,
    device: torch.device,
    dtype: torch.dtype,
    head_dim: int,
    *,
    cross: bool = False,
    causal: bool = False,
    gqa: bool = False,
) -> type[AttentionKernel]:
    """``name``'s kernel where it holds this dtype and head dim and takes these features
    (cross-attention or key lengths of their own, a causal mask, fewer key heads), else the
    next one in the registry's order that is available on ``device`` and does (logged once
    per combination)."""
    kernel = get(name)
    features = {"cross": cross, "causal": causal, "gqa": gqa}
    if kernel.supports(dtype, head_dim) and kernel.takes(**features):
        return kernel
    later = list(KERNELS)[list(KERNELS).index(name) + 1 :]
    asked = ", ".join(f for f, on in features.items() if on) or "none"
    for other in later:
        candidate = KERNELS[other]
        if candidate.available(device) and candidate.supports(dtype, head_dim) and candidate.takes(**features):
            log_once(
                f"attention kernel {name!r} has no kernel for {dtype} at head dim {head_dim} with features "
                f"({asked}); those run on {other!r}"
            )
            return candidate
    raise ConfigError(
        f"no attention kernel on {device} runs {dtype} at head dim {head_dim} with features ({asked}); "
        "use float16, bfloat16 or float32"
    )


def _fits(kernel: type[AttentionKernel], dtype: torch.dtype, head_dim: int | None, capability: tuple[int, int]) -> bool:
    in_range = kernel.capability is None or kernel.capability[0] <= capability <= kernel.capability[1]
    takes = dtype in kernel.dtypes if head_dim is None else kernel.supports(dtype, head_dim)
    return in_range and takes


def choose_enqueue_kernel(
    dtype: torch.dtype,
    available: Sequence[str],
    capability: tuple[int, int],
    forced: str | None = None,
    head_dim: int | None = None,
) -> str:
    """The kernel ``enqueue`` runs: one that reads ``seq_lens`` on the device (no host sync).

    The first kernel in the registry's order that reads lengths on the device, is in
    ``available``, takes ``dtype`` (and ``head_dim`` when given) on ``capability`` and, where
    it declares ``auto_from``, runs on at least that capability; else the memory-efficient
    kernel, which takes fp32 and runs on every GPU. ``forced`` wins when it reads lengths on
    the device, is available and fits (else ``ConfigError``); a host-length kernel there is
    ignored and logged, an FP8-only kernel left to mode 1's choice.
    """
    if forced:
        kernel = get(forced)
        if kernel.device_lengths and kernel.dtypes:
            if forced != _LAST_RESORT and forced not in available:
                raise ConfigError(
                    f"{KERNEL_ENV}={forced} names a kernel that is not available here (available: {list(available)}); "
                    f"unset {KERNEL_ENV} or {kernel.install_hint}"
                )
            if not _fits(kernel, dtype, head_dim, capability):
                raise ConfigError(
                    f"{KERNEL_ENV}={forced} cannot run {dtype} on compute capability {capability}; "
                    f"use {KERNEL_ENV}={_LAST_RESORT} or unset it"
                )
            return forced
        if kernel.dtypes:  # an FP8-only kernel is forced for mode 1 calls (fa3trt.attention.kernels.fp8)
            _log_ignored_force(forced)
    for name in device_length_kernels():
        kernel = KERNELS[name]
        auto = kernel.auto_from is None or capability >= kernel.auto_from
        if name in available and auto and _fits(kernel, dtype, head_dim, capability):
            return name
    return _LAST_RESORT


@functools.cache
def _log_ignored_force(forced: str) -> None:
    log.warning(
        "%s=%s is ignored inside TensorRT: that kernel needs the lengths on the host (a stream sync per "
        "call); the plugin uses one of %s",
        KERNEL_ENV,
        forced,
        device_length_kernels(),
    )


@functools.cache
def enqueue_kernel(device_index: int, dtype: torch.dtype, head_dim: int) -> str:
    """The plugin's kernel on ``cuda:device_index`` for this dtype and head dim: chosen once, logged."""
    device = torch.device("cuda", device_index)
    name = choose_enqueue_kernel(
        dtype, available_kernels(device), torch.cuda.get_device_capability(device), forced_kernel(), head_dim
    )
    log.info("CustomAttnPlugin on cuda:%d for %s, head dim %d: kernel %s", device_index, dtype, head_dim, name)
    return name


def lengths_on_device(kernel: str, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether ``kernel`` takes a padded batch's lengths on the GPU with no host sync at this
    dtype and head dim (a batch's lengths then go to the GPU once, and CUDA graphs can hold it).
    The other kernels dispatch on lengths on the host."""
    k = get(kernel)
    return k.device_lengths and k.supports(dtype, head_dim)
