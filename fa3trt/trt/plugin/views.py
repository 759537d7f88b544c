"""Zero-copy torch views of device memory TensorRT owns, and the per-plugin cache of everything
a call needs.

Contract: ``device_view`` wraps a raw device pointer as a contiguous torch tensor without
copying (``__cuda_array_interface__``; bf16 through an int16 view). ``EnqueueCache`` keeps
those views, streams, small constants and the enqueue core's bindings, bounded and thread-safe.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch

from fa3trt.attention.op import PLUGIN_NAME
from fa3trt.errors import ConfigError, InvalidInputError
from fa3trt.trt.plugin.fields import Shape

__all__ = ["device_view", "EnqueueCache", "ViewFactory"]

_TYPESTR = {torch.float32: "<f4", torch.float16: "<f2", torch.bfloat16: "<i2", torch.int32: "<i4"}


class _CudaArray:
    """The smallest object torch.as_tensor accepts for device memory it does not own."""

    __slots__ = ("__cuda_array_interface__",)

    def __init__(self, ptr: int, shape: Shape, typestr: str) -> None:
        # stream=None: no synchronization on import (the caller orders work on its stream).
        self.__cuda_array_interface__ = {
            "shape": shape,
            "typestr": typestr,
            "data": (ptr, False),
            "version": 3,
            "strides": None,
            "stream": None,
        }


def device_view(ptr: int, shape: Shape, dtype: torch.dtype) -> torch.Tensor:
    """A contiguous torch tensor over ``ptr`` (device memory owned by someone else). No copy.

    NumPy's array interface has no bfloat16, so bf16 is described as int16 and reinterpreted
    with ``.view(torch.bfloat16)``, which is free (same element size, same storage).
    """
    if dtype not in _TYPESTR:
        raise InvalidInputError(f"{PLUGIN_NAME}: no device view for dtype {dtype}; use one of {list(_TYPESTR)}")
    if not ptr:
        raise InvalidInputError(f"{PLUGIN_NAME}: null device pointer for a {dtype} tensor of shape {shape}")
    # No device= argument: torch takes the device the pointer lives on (device="cuda" would
    # copy memory of another GPU onto the current one).
    t = torch.as_tensor(_CudaArray(ptr, tuple(shape), _TYPESTR[dtype]))
    return t.view(torch.bfloat16) if dtype == torch.bfloat16 else t


ViewFactory = Callable[[int, Shape, torch.dtype], torch.Tensor]


class EnqueueCache:
    """Per-plugin-instance state of ``enqueue_core``: tensor views, streams and small constants.

    TensorRT passes the same buffers again and again; building the views every call costs more
    host time than the kernel's launch (``uncached`` in docs/benchmarks.md, section 2), a dict
    lookup next to nothing. Views are non-owning aliases, so an entry whose memory TensorRT later reuses is only
    looked up again when TensorRT hands out that (pointer, shape, dtype) again, i.e. when it is
    valid. Bounded (oldest entry evicted first) so shape churn cannot grow it without limit.
    Thread-safe: lookups are single dict reads, inserts take a lock. ``hits``/``misses`` are
    statistics for tests and benchmarks.
    """

    def __init__(self, max_views: int = 1024, factory: ViewFactory = device_view) -> None:
        if max_views < 8:
            raise ConfigError(f"EnqueueCache.max_views must be >= 8, got {max_views}")
        self.max_views = max_views
        self._factory = factory
        self._views: dict[tuple[int, Shape, torch.dtype], torch.Tensor] = {}
        self._streams: dict[tuple[int, int], torch.cuda.ExternalStream] = {}
        self._consts: dict[tuple[Any, ...], tuple[torch.Tensor, ...]] = {}
        self._bindings: dict[tuple[Any, ...], Any] = {}
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.binding_hits = 0

    def __len__(self) -> int:
        return len(self._views)

    def view(self, ptr: int, shape: Shape, dtype: torch.dtype) -> torch.Tensor:
        key = (ptr, shape, dtype)
        t = self._views.get(key)
        if t is not None:
            self.hits += 1
            return t
        t = self._factory(ptr, shape, dtype)
        with self._lock:
            while len(self._views) >= self.max_views:
                self._views.pop(next(iter(self._views)))
            self._views[key] = t
            self.misses += 1
        return t

    def binding(self, key: tuple[Any, ...], make: Callable[[], Any]) -> Any:
        """The per-call binding of ``enqueue_core`` for ``key``, made by ``make`` on a miss."""
        b = self._bindings.get(key)
        if b is not None:
            self.binding_hits += 1
            return b
        b = make()
        with self._lock:
            while len(self._bindings) >= self.max_views:
                self._bindings.pop(next(iter(self._bindings)))
            self._bindings[key] = b
        return b

    def stream(self, handle: int, device: torch.device) -> torch.cuda.ExternalStream:
        key = (handle, device.index if device.index is not None else torch.cuda.current_device())
        s = self._streams.get(key)
        if s is None:
            s = torch.cuda.ExternalStream(handle, device=device)
            with self._lock:
                self._streams[key] = s
        return s

    def constants(
        self, stream_handle: int, device: torch.device, b: int, s: int, dtype: torch.dtype
    ) -> tuple[torch.Tensor, ...]:
        """(cu_seqlens (B+1,), row index (1, S), keep mask buffer (B, S), its (B, S, 1, 1) view, zero).

        Created on the enqueue stream and keyed by it: a buffer is only ever touched in that
        stream's order, so reusing it across calls needs no synchronization.
        """
        key = (stream_handle, device, b, s, dtype)
        c = self._consts.get(key)
        if c is None:
            cu = torch.arange(0, (b + 1) * s, s, dtype=torch.int32, device=device)
            rows = torch.arange(s, dtype=torch.int32, device=device).view(1, s)
            keep = torch.empty((b, s), dtype=torch.bool, device=device)
            zero = torch.zeros((), dtype=dtype, device=device)
            c = (cu, rows, keep, keep.view(b, s, 1, 1), zero)
            with self._lock:
                if len(self._consts) >= self.max_views:
                    self._consts.pop(next(iter(self._consts)))
                self._consts[key] = c
        return c
