"""The plugin's runtime: attention over raw device pointers, exactly as TensorRT calls ``enqueue``.

Contract:
- ``enqueue_core`` takes raw device pointers, each input's dims, a dtype and a CUDA stream
  handle. It wraps the pointers as torch tensors without copying (``fa3trt.plugin.views``),
  keeps those views and everything else a call needs per (pointers, shapes, dtype, stream) in
  an ``EnqueueCache``, runs on the given stream, writes
  the output in place and never synchronizes the host.
- The kernel is ``fa3trt.kernels.selector.enqueue_kernel``'s choice: one that reads the lengths
  on the GPU. Kernels that write a caller's buffer (``direct_write``) write TensorRT's output
  themselves; the others' results are copied in by one masked write.
- ``run_enqueue`` is the same with a status code (0, or 1 with the reason logged).
No TensorRT here: torch only, so it is tested on a GPU without TensorRT.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import torch

from fa3trt.errors import ConfigError, InvalidInputError
from fa3trt.kernels import fp8, tail
from fa3trt.kernels.base import AttentionKernel, log_once
from fa3trt.kernels.registry import KERNELS, available_kernels, direct_write_kernels
from fa3trt.kernels.selector import choose_enqueue_kernel, enqueue_kernel
from fa3trt.op import MODE_FP8, MODE_NATIVE, PLUGIN_NAME
from fa3trt.plugin.fields import Shape, output_shape
from fa3trt.plugin.views import EnqueueCache

__all__ = [
    "enqueue_core",
    "run_enqueue",
    "binding_kernel",
    "get_stream_ids",
    "set_stream_ids",
]

log = logging.getLogger(__name__)

_default_cache = EnqueueCache()


def binding_kernel(name: str | None, device: torch.device, dtype: torch.dtype, head_dim: int) -> type[AttentionKernel]:
    """The kernel a binding runs: ``name`` (or the selector's choice) where it takes this dtype
    and head dim, else the next one that reads lengths on the device (logged once)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    name = name or enqueue_kernel(index, dtype, head_dim)
    kernel = KERNELS[name]
    if kernel.supports(dtype, head_dim):
        return kernel
    others = [n for n in available_kernels(device) if n != name]
    fallback = choose_enqueue_kernel(dtype, others, torch.cuda.get_device_capability(device), None, head_dim)
    log_once(f"{PLUGIN_NAME}: {name} has no kernel for {dtype} at head dim {head_dim}; this shape runs on {fallback}")
    return KERNELS[fallback]


class _Binding:
    """Everything one (pointers, shapes, dtype, stream, mode, kernel) call needs, made once.

    TensorRT calls ``enqueue`` with the same buffers again and again, so the steady state is
    one dict lookup for all of it. Also the stream as the (id, device index, device type)
    triple PyTorch's stream setter takes: switching streams without building ``Stream``
    objects costs a fraction of the ``torch.cuda.stream`` context manager.
    """

    __slots__ = (
        "ptrs",
        "dtype",
        "qkv",
        "lens",
        "lens_col",
        "out",
        "out_shape",
        "stream",
        "stream_ids",
        "device_index",
        "cu",
        "rows",
        "keep",
        "keep4",
        "zero",
        "kernel",
        "mode",
        "shape",
        "direct",
        "lens_safe",
        "launchers",
        "zero_tail",
        "zero_first",
        "cache",
    )

    def __init__(
        self,
        cache: EnqueueCache,
        q_ptr: int,
        k_ptr: int,
        v_ptr: int,
        seq_lens_ptr: int,
        out_ptr: int,
        q_shape: Shape,
        k_shape: Shape,
        v_shape: Shape,
        dtype: torch.dtype,
        stream_handle: int,
        mode: int,
        kernel: str | None,
        write: str = "auto",
    ) -> None:
        b, s, h, d = self.out_shape = output_shape(q_shape, k_shape, v_shape)
        if dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise InvalidInputError(f"{PLUGIN_NAME}: dtype {dtype} is not supported; use float16, bfloat16 or float32")
        if mode not in (MODE_NATIVE, MODE_FP8):
            raise InvalidInputError(f"{PLUGIN_NAME}: mode must be 0 or 1, got {mode!r}")
        if write not in ("auto", "direct", "masked"):
            raise ConfigError(f"{PLUGIN_NAME}: write must be 'auto', 'direct' or 'masked', got {write!r}")
        self.shape, self.mode, self.dtype, self.ptrs, self.cache = (
            (b, s, h, d),
            mode,
            dtype,
            (q_ptr, k_ptr, v_ptr),
            cache,
        )
        self.out = cache.view(out_ptr, self.out_shape, dtype)
        device = self.out.device
        self.device_index = device.index if device.index is not None else torch.cuda.current_device()
        self.kernel = binding_kernel(kernel, device, dtype, d)
        self.lens = cache.view(seq_lens_ptr, (b,), torch.int32)
        self.lens_col = cache.view(seq_lens_ptr, (b, 1), torch.int32)
        self.stream = cache.stream(stream_handle, device)
        self.stream_ids = (self.stream.stream_id, self.stream.device_index, self.stream.device_type)
        with torch.cuda.stream(self.stream):
            self.cu, self.rows, self.keep, self.keep4, self.zero = cache.constants(stream_handle, device, b, s, dtype)
        # The kernel's input views (FP8 quantizes from (B, S, H, D) views of its own, per call).
        kshape = self.kernel.packed_shape(b, s, h, d)
        self.qkv = None if mode == MODE_FP8 else tuple(cache.view(p, kshape, dtype) for p in self.ptrs)
        # Direct: the kernel writes TensorRT's buffer itself, then one kernel zeroes the padded
        # rows. Masked: the kernel's own result is copied in by one masked write. A kernel that
        # writes no row past a length has its padded rows zeroed first, by the launch that also
        # clamps the lengths it reads: one small kernel per call.
        wants_direct = self.kernel.direct_write and mode == MODE_NATIVE and write != "masked"
        self.zero_first = self.kernel.unwritten_tail
        with torch.cuda.stream(self.stream):
            self.lens_safe = torch.empty((b,), dtype=torch.int32, device=device) if wants_direct else None
        self.zero_tail = None
        if wants_direct:
            clamp_into = self.lens_safe if self.zero_first else None
            self.zero_tail = tail.zero_tail_launcher(self.out, self.lens, clamp_into=clamp_into)
        if write == "direct" and self.zero_tail is None:
            raise ConfigError(
                f"{PLUGIN_NAME}: a direct write needs one of {direct_write_kernels()} in mode 0 and Triton; "
                f"this call runs {self.kernel.name}"
            )
        self.direct = self.zero_tail is not None
        self.launchers: dict[int, Callable[[], None]] = {}  # thread id -> prepared launch

    def _launcher(self) -> Callable[[], None] | None:
        """This thread's launch of the kernel into ``out`` with the clamped lengths, made once;
        None when the kernel refuses the shape (the binding then takes the masked path for good)."""
        launch = self.launchers.get(threading.get_ident())
        if launch is not None:
            return launch
        assert self.qkv is not None and self.lens_safe is not None
        q, k, v = self.qkv
        launch = self.kernel.launcher(q, k, v, self.lens_safe, self.out)
        if launch is None:
            self.direct = False
            return None
        self.launchers[threading.get_ident()] = launch
        return launch

    def _run_direct(self) -> bool:
        """The kernel straight into ``out`` with the lengths clamped to S (it must not read past
        the buffers), and the padded rows zeroed. False when the kernel refuses the shape."""
        launch = self._launcher()
        if launch is None:
            return False
        zero_tail: Callable[[], None] = self.zero_tail  # type: ignore[assignment]  # set whenever direct is
        if self.zero_first:
            zero_tail()  # zeroes the padded rows and writes lens_safe
            launch()
        else:  # the kernel leaves the padded rows undefined: zero them after it
            torch.clamp(self.lens, 0, self.shape[1], out=self.lens_safe)
            launch()
            zero_tail()
        return True

    def _fp8(self) -> torch.Tensor:
        # FP8 quantizes q, k, v: new tensors are inherent to this mode (the zero-copy promise is
        # about mode 0). Same numerics as the op (fa3trt.kernels.fp8).
        b, s, h, d = self.shape
        q4, k4, v4 = (self.cache.view(p, self.shape, self.dtype) for p in self.ptrs)
        kshape = self.kernel.packed_shape(b, s, h, d)
        lens, cu, kernel = self.lens, self.cu, self.kernel

        def emulated(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return kernel.forward_packed(q.view(kshape), k.view(kshape), v.view(kshape), lens, cu, s)

        # Lengths past S would make the FP8 kernel read past the buffers.
        return fp8.run_fp8(kernel, q4, k4, v4, lens.clamp(0, s), emulated)

    def run(self) -> None:
        if self.direct and self._run_direct():
            return
        if self.qkv is None:
            res = self._fp8()
        else:
            q, k, v = self.qkv
            res = self.kernel.forward_packed(q, k, v, self.lens, self.cu, self.shape[1])
        torch.lt(self.rows, self.lens_col, out=self.keep)
        torch.where(self.keep4, res.view(self.out_shape), self.zero, out=self.out)


# PyTorch's current-stream getter and setter over (id, device index, device type) triples, None
# where this torch lacks them: a fraction of the host time of the torch.cuda.stream context.
get_stream_ids = torch._C._cuda_getCurrentStream if hasattr(torch._C, "_cuda_getCurrentStream") else None
set_stream_ids = torch._C._cuda_setStream if hasattr(torch._C, "_cuda_setStream") else None


def enqueue_core(
    q_ptr: int,
    k_ptr: int,
    v_ptr: int,
    seq_lens_ptr: int,
    out_ptr: int,
    q_shape: Shape,
    k_shape: Shape,
    v_shape: Shape,
    dtype: torch.dtype,
    stream_handle: int,
    mode: int = MODE_NATIVE,
    *,
    cache: EnqueueCache | None = None,
    kernel: str | None = None,
    write: str = "auto",
) -> None:
    """Attention from q/k/v/seq_lens device pointers into ``out_ptr``, on stream ``stream_handle``.

    Exactly what TensorRT hands ``enqueue``: raw pointers, each input's own dims, one dtype and
    a ``cudaStream_t``. All work is queued on that stream (``torch.cuda.ExternalStream``), never
    on PyTorch's current stream: TensorRT produced the inputs on it and reads the output after
    it. Zero copies of q, k, v. The output is written in place: with FA3, FlashAttention's
    CuTe kernel or the cuDNN padding-mask kernel (``direct_write`` kernels; ``write="auto"`` or
    ``"direct"``), the kernel writes ``out_ptr`` itself and one Triton kernel zeroes the rows
    past each length; with any other kernel, or ``write="masked"``, the
    kernel's result is copied in by one fused masked write (``torch.where`` into the out view)
    that also zeroes those rows. The host never waits for the device. Temporaries (the kernel's
    result and log-sum-exp) come from PyTorch's caching allocator on that stream, so steady
    state does no cudaMalloc. Raises on bad input.
    """
    if q_shape[0] * q_shape[1] * q_shape[2] * q_shape[3] == 0:
        output_shape(q_shape, k_shape, v_shape)  # still refuse mismatched shapes
        return
    cache = cache if cache is not None else _default_cache
    key = (
        q_ptr,
        k_ptr,
        v_ptr,
        seq_lens_ptr,
        out_ptr,
        q_shape,
        k_shape,
        v_shape,
        dtype,
        stream_handle,
        mode,
        kernel,
        write,
    )
    bind = cache.binding(key, lambda: _Binding(cache, *key))  # type: ignore[arg-type]
    if get_stream_ids is None or set_stream_ids is None or torch.cuda.current_device() != bind.device_index:
        with torch.cuda.stream(bind.stream):
            bind.run()
        return
    prev = get_stream_ids(bind.device_index)
    set_stream_ids(*bind.stream_ids)
    try:
        bind.run()
    finally:
        set_stream_ids(*prev)


def run_enqueue(*args: Any, **kwargs: Any) -> int:
    """``enqueue_core`` with a status code: 0 on success, 1 with the reason logged on failure.

    The C++ plugin contract is a status code; TensorRT's Python binding instead expects
    ``enqueue`` to raise, so ``CustomAttnPlugin.enqueue`` raises when this returns non-zero.
    """
    try:
        enqueue_core(*args, **kwargs)
    except Exception:
        log.exception("%s enqueue failed", PLUGIN_NAME)
        return 1
    return 0
