"""The plugin's runtime: attention over raw device pointers, exactly as TensorRT calls ``enqueue``.

Contract:
- ``enqueue_core`` takes raw device pointers, each input's dims, a dtype and a CUDA stream
  handle. It wraps the pointers as torch tensors without copying (``fa3trt.trt.plugin.views``),
  keeps those views and everything else a call needs per (pointers, shapes, dtype, stream) in
  an ``EnqueueCache``, runs on the given stream, writes
  the output in place and never synchronizes the host.
- The kernel is ``fa3trt.attention.kernels.selector.enqueue_kernel``'s choice: one that reads the lengths
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

from fa3trt.attention.kernels import fp8, tail
from fa3trt.attention.kernels.base import AttentionKernel, Ragged, default_scale, log_once
from fa3trt.attention.kernels.registry import KERNELS, available_kernels, direct_write_kernels
from fa3trt.attention.kernels.selector import choose_enqueue_kernel, enqueue_kernel
from fa3trt.attention.op import MODE_FP8, MODE_NATIVE, PLUGIN_NAME
from fa3trt.errors import ConfigError, InvalidInputError
from fa3trt.trt.plugin.fields import Shape, output_shape
from fa3trt.trt.plugin.views import EnqueueCache

__all__ = [
    "enqueue_core",
    "run_enqueue",
    "binding_kernel",
    "get_stream_ids",
    "set_stream_ids",
]

log = logging.getLogger(__name__)

_default_cache = EnqueueCache()


def binding_kernel(
    name: str | None, device: torch.device, dtype: torch.dtype, head_dim: int, **features: bool
) -> type[AttentionKernel]:
    """The kernel a binding runs: ``name`` (or the selector's choice) where it takes this dtype,
    head dim and these features (``cross``, ``causal``, ``gqa``), else the next one that reads
    lengths on the device and does (logged once)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    name = name or enqueue_kernel(index, dtype, head_dim)
    kernel = KERNELS[name]
    if kernel.supports(dtype, head_dim) and kernel.takes(**features):
        return kernel
    capability = torch.cuda.get_device_capability(device)
    others = [n for n in available_kernels(device) if n != name and KERNELS[n].takes(**features)]
    fallback = choose_enqueue_kernel(dtype, others, capability, None, head_dim)
    if not KERNELS[fallback].takes(**features):
        asked = ", ".join(f for f, on in features.items() if on)
        raise ConfigError(
            f"{PLUGIN_NAME}: no attention kernel on {device} that reads lengths on the GPU takes {asked} for "
            f"{dtype} at head dim {head_dim}; install FA3 or FlashAttention's CuTe kernel (sm90)"
        )
    log_once(
        f"{PLUGIN_NAME}: {name} has no kernel for {dtype} at head dim {head_dim} with {features}; runs on {fallback}"
    )
    return KERNELS[fallback]


class _Binding:
    """Everything one (pointers, shapes, dtype, stream, fields, kernel) call needs, made once.

    TensorRT calls ``enqueue`` with the same buffers again and again, so the steady state is
    one dict lookup for all of it. Also the stream as the (id, device index, device type)
    triple PyTorch's stream setter takes: switching streams without building ``Stream``
    objects costs a fraction of the ``torch.cuda.stream`` context manager.
    """

    __slots__ = (
        "ptrs",
        "dtype",
        "qkv",
        "ragged",
        "lens_col",
        "out",
        "out_shape",
        "kv_shape",
        "stream",
        "stream_ids",
        "device_index",
        "rows",
        "keep",
        "keep4",
        "zero",
        "kernel",
        "mode",
        "causal",
        "scale",
        "direct",
        "lens_safe",
        "lens_k_safe",
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
        seq_lens_k_ptr: int | None,
        causal: bool,
        softmax_scale: float | None,
        kernel: str | None,
        write: str = "auto",
    ) -> None:
        b, sq, h, d = self.out_shape = output_shape(q_shape, k_shape, v_shape)
        sk, hk = k_shape[1], k_shape[2]
        if dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise InvalidInputError(f"{PLUGIN_NAME}: dtype {dtype} is not supported; use float16, bfloat16 or float32")
        if mode not in (MODE_NATIVE, MODE_FP8):
            raise InvalidInputError(f"{PLUGIN_NAME}: mode must be 0 or 1, got {mode!r}")
        if write not in ("auto", "direct", "masked"):
            raise ConfigError(f"{PLUGIN_NAME}: write must be 'auto', 'direct' or 'masked', got {write!r}")
        if seq_lens_k_ptr is None and sq != sk:
            raise InvalidInputError(f"{PLUGIN_NAME}: q has {sq} rows and k {sk}: the key lengths are needed")
        self.mode, self.dtype, self.ptrs, self.cache = mode, dtype, (q_ptr, k_ptr, v_ptr), cache
        self.causal, self.scale = causal, default_scale(d) if softmax_scale is None else softmax_scale
        self.kv_shape = (b, sk, hk, d)
        self.out = cache.view(out_ptr, self.out_shape, dtype)
        device = self.out.device
        self.device_index = device.index if device.index is not None else torch.cuda.current_device()
        # One set of lengths (a padded batch of self-attention): the same view, the kernels'
        # self-attention path.
        lens_k_ptr = seq_lens_ptr if seq_lens_k_ptr is None else seq_lens_k_ptr
        cross = sq != sk or lens_k_ptr != seq_lens_ptr
        self.kernel = binding_kernel(kernel, device, dtype, d, cross=cross, causal=causal, gqa=hk != h)
        lens = cache.view(seq_lens_ptr, (b,), torch.int32)
        lens_k = cache.view(lens_k_ptr, (b,), torch.int32)
        self.lens_col = cache.view(seq_lens_ptr, (b, 1), torch.int32)
        self.stream = cache.stream(stream_handle, device)
        self.stream_ids = (self.stream.stream_id, self.stream.device_index, self.stream.device_type)
        with torch.cuda.stream(self.stream):
            cu_q, self.rows, self.keep, self.keep4, self.zero = cache.constants(stream_handle, device, b, sq, dtype)
            cu_k = cu_q if sk == sq else cache.constants(stream_handle, device, b, sk, dtype)[0]
        self.ragged = Ragged(lens, lens_k, cu_q, cu_k, sq, sk)
        # The kernel's input views (FP8 quantizes from (B, S, H, D) views of its own, per call).
        qshape, kshape = self.kernel.packed_shape(b, sq, h, d), self.kernel.packed_shape(b, sk, hk, d)
        self.qkv = None
        if mode != MODE_FP8:
            self.qkv = (
                cache.view(q_ptr, qshape, dtype),
                cache.view(k_ptr, kshape, dtype),
                cache.view(v_ptr, kshape, dtype),
            )
        # Direct: the kernel writes TensorRT's buffer itself, then one kernel zeroes the padded
        # rows. Masked: the kernel's own result is copied in by one masked write. A kernel that
        # writes no row past a length has its padded rows zeroed first, by the launch that also
        # clamps the lengths it reads: one small kernel per call.
        wants_direct = self.kernel.direct_write and mode == MODE_NATIVE and write != "masked"
        self.zero_first = self.kernel.unwritten_tail
        self.lens_safe = self.lens_k_safe = None
        if wants_direct:
            with torch.cuda.stream(self.stream):
                self.lens_safe = torch.empty((b,), dtype=torch.int32, device=device)
                self.lens_k_safe = self.lens_safe if lens_k is lens else torch.empty_like(self.lens_safe)
        self.zero_tail = None
        if wants_direct:
            clamp_into = self.lens_safe if self.zero_first else None
            self.zero_tail = tail.zero_tail_launcher(self.out, lens, clamp_into=clamp_into)
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
        assert self.qkv is not None and self.lens_safe is not None and self.lens_k_safe is not None
        q, k, v = self.qkv
        launch = self.kernel.launcher(q, k, v, self.lens_safe, self.lens_k_safe, self.out, self.causal, self.scale)
        if launch is None:
            self.direct = False
            return None
        self.launchers[threading.get_ident()] = launch
        return launch

    def _run_direct(self) -> bool:
        """The kernel straight into ``out`` with the lengths clamped to Sq and Sk (it must not
        read past the buffers), and the padded rows zeroed. False when the kernel refuses the shape."""
        launch = self._launcher()
        if launch is None:
            return False
        zero_tail: Callable[[], None] = self.zero_tail  # type: ignore[assignment]  # set whenever direct is
        r = self.ragged
        if self.lens_k_safe is not self.lens_safe:
            torch.clamp(r.lens_k, 0, r.sk, out=self.lens_k_safe)
        if self.zero_first:
            zero_tail()  # zeroes the padded rows and writes lens_safe
            launch()
        else:  # the kernel leaves the padded rows undefined: zero them after it
            torch.clamp(r.lens_q, 0, r.sq, out=self.lens_safe)
            launch()
            zero_tail()
        return True

    def _fp8(self) -> torch.Tensor:
        # FP8 quantizes q, k, v: new tensors are inherent to this mode (the zero-copy promise is
        # about mode 0). Same numerics as the op (fa3trt.attention.kernels.fp8).
        b, sq, h, d = self.out_shape
        q_ptr, k_ptr, v_ptr = self.ptrs
        q4 = self.cache.view(q_ptr, self.out_shape, self.dtype)
        k4, v4 = (self.cache.view(p, self.kv_shape, self.dtype) for p in (k_ptr, v_ptr))
        qshape = self.kernel.packed_shape(b, sq, h, d)
        kshape = self.kernel.packed_shape(*self.kv_shape)
        r, kernel, causal, scale = self.ragged, self.kernel, self.causal, self.scale

        def emulated(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return kernel.forward_packed(q.view(qshape), k.view(kshape), v.view(kshape), r, causal, scale)

        # Lengths past S would make the FP8 kernel read past the buffers.
        lens_q = r.lens_q.clamp(0, r.sq)
        lens_k = None if r.lens_k is r.lens_q else r.lens_k.clamp(0, r.sk)
        return fp8.run_fp8(kernel, q4, k4, v4, lens_q, emulated, lens_k, causal=causal, scale=scale, out=self.out)

    def run(self) -> None:
        if self.direct and self._run_direct():
            return
        if self.qkv is None:
            res = self._fp8()
            if res is self.out:  # the FP8 kernel wrote the output buffer itself: zero its padded rows
                tail.zero_tail_(self.out, self.ragged.lens_q)
                return
        else:
            q, k, v = self.qkv
            res = self.kernel.forward_packed(q, k, v, self.ragged, self.causal, self.scale)
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
    seq_lens_k_ptr: int | None = None,
    causal: bool = False,
    softmax_scale: float | None = None,
    cache: EnqueueCache | None = None,
    kernel: str | None = None,
    write: str = "auto",
) -> None:
    """Attention from q/k/v/seq_lens device pointers into ``out_ptr``, on stream ``stream_handle``.

    q is (B, Sq, H, D), k and v (B, Sk, Hk, D); ``seq_lens_ptr`` the query lengths and
    ``seq_lens_k_ptr`` the key lengths (None, or the same pointer: one set of lengths for a
    padded batch of self-attention); ``causal`` and ``softmax_scale`` as the op takes them.

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
        seq_lens_k_ptr,
        causal,
        softmax_scale,
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
