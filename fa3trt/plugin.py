"""The TensorRT plugin ``CustomAttnPlugin`` (IPluginV3) and its zero-copy enqueue core.

Contract:
- Name ``CustomAttnPlugin``, version ``"1"``, namespace chosen at registration (default ""): the
  same name, version and fields as the ONNX node ``fa3trt.export`` writes. One field, ``mode``
  (int32: 0 attention in the input dtype, 1 FP8). Inputs q, k, v (B, S, H, D) in one dtype
  (fp16, bf16 or fp32) and ``seq_lens`` (int32, (B,)); one output shaped like q, rows past each
  length zero.
- ``register_plugin(namespace)`` must run in every process (driver, build worker, replica)
  before an ONNX parse or an engine deserialize; it is idempotent, thread-safe and, once done,
  a dict lookup. ``require_registered`` raises ``PluginNotRegisteredError`` otherwise.
- ``enqueue_core`` is the plugin's runtime, a plain function over raw device pointers, shapes,
  a dtype and a CUDA stream handle, exactly what TensorRT hands ``enqueue``. It wraps the
  pointers as torch tensors without copying (``__cuda_array_interface__``; bf16 through an
  int16 view), caches those views per (pointer, shape, dtype), runs on the given stream, writes
  the output in place and never synchronizes the host.

Nothing here imports TensorRT at module level: the IPluginV3 classes are built on first use by
``plugin_classes()`` (``fa3trt._trt`` is the only module that imports ``tensorrt``).
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fa3trt import _cudnn_frontend, _fa3, _flash_cute, _tail, _trt
# Private helpers of the op are imported by name: `fa3trt.attention` as an attribute of the
# package is the `attention` function, not the module.
from fa3trt.attention import (
    KERNEL_ENV,
    MODE_FP8,
    MODE_NATIVE,
    PLUGIN_NAME,
    PLUGIN_VERSION,
    _fp8_dequantize,
    _log_once,
    _run_fp8,
    available_kernels,
    fp8_quantize,
)
from fa3trt.errors import ConfigError, InvalidInputError, MissingDependencyError, PluginNotRegisteredError

if TYPE_CHECKING:
    # Static only: mypy checks every TensorRT call below against tensorrt-stubs. At runtime
    # `trt` is the lazy proxy defined below, which imports TensorRT through fa3trt._trt.
    import tensorrt as trt

__all__ = [
    "PLUGIN_NAME",
    "PLUGIN_VERSION",
    "FIELD_NAMES",
    "DEVICE_LENGTH_KERNELS",
    "DIRECT_WRITE_KERNELS",
    "register_plugin",
    "is_registered",
    "require_registered",
    "plugin_classes",
    "parse_fields",
    "serialize_fields",
    "format_supported",
    "choose_enqueue_kernel",
    "output_shape",
    "EnqueueCache",
    "device_view",
    "enqueue_core",
    "run_enqueue",
    "LazyTensorRT",
    "tensorrt_available",
    "require_tensorrt",
]

log = logging.getLogger(__name__)

Shape = tuple[int, ...]

FIELD_NAMES = ("mode",)
"""The plugin's fields: what the ONNX node carries and what an engine serializes."""

# Attributes the ONNX parser consumes to find the creator; they may also reach create_plugin.
_LOOKUP_ATTRS = ("plugin_version", "plugin_namespace")

DEVICE_LENGTH_KERNELS = ("fa3", "flash_cute", "cudnn_padded", "flash_seqused", "efficient_seqused")
"""Kernels that read ``seq_lens`` on the device. Inside TensorRT the lengths exist only on the
device, and reading them on the host would synchronize the stream on every call, so the SDPA
kernels that loop over host lengths (cudnn, flash, efficient, math) cannot run in ``enqueue``."""


DIRECT_WRITE_KERNELS = ("fa3", "flash_cute", "cudnn_padded")
"""Kernels that write TensorRT's output buffer themselves (mode 0), followed by one kernel that
zeroes the padded rows; the others' results are copied in by one masked write."""


class LazyTensorRT:
    """Module-like proxy: ``trt.X`` imports TensorRT (through ``fa3trt._trt``) on first use.

    Lets the TensorRT-facing code be written as ``trt.Runtime(...)`` and type-checked against
    the stubs, while ``import fa3trt.plugin`` works on a machine without TensorRT.
    """

    def __getattr__(self, name: str) -> Any:
        return getattr(_trt.trt(), name)


if not TYPE_CHECKING:
    trt = LazyTensorRT()


def tensorrt_available() -> bool:
    """TensorRT imports and is the real library.

    ``_trt.available()`` alone is fooled by ``tensorrt-stubs``, whose ``tensorrt/`` folder of
    ``.pyi`` files imports as an empty namespace package.
    """
    return _trt.available() and hasattr(_trt.trt(), "Runtime")


def require_tensorrt() -> None:
    """Raise ``MissingDependencyError`` with the install hint unless real TensorRT imports."""
    _trt.trt()  # not importable at all: raises with the hint
    if not tensorrt_available():
        raise MissingDependencyError(
            "the importable 'tensorrt' is not TensorRT (only its type stubs are installed); " + _trt.INSTALL_HINT
        )


# --------------------------------------------------------------------------- fields
def parse_fields(fields: Iterable[tuple[str, Any]]) -> dict[str, int]:
    """Plugin fields from (name, data) pairs, as TensorRT passes them to ``create_plugin``.

    ``data`` is an array-like with one integer. Missing ``mode`` means 0, like the op's default.
    """
    parsed = {"mode": MODE_NATIVE}
    for name, data in fields:
        if name == "mode":
            arr = np.asarray(data).reshape(-1)
            if arr.size != 1:
                raise ConfigError(f"{PLUGIN_NAME} field 'mode' must hold one int32, got {arr.tolist()!r}")
            mode = int(arr[0])
            if mode not in (MODE_NATIVE, MODE_FP8):
                raise ConfigError(
                    f"{PLUGIN_NAME} field mode={mode}; use 0 (input dtype) or 1 (FP8): re-export the model "
                    "with ModelConfig.attn_mode set to 0 or 1"
                )
            parsed["mode"] = mode
        elif name in _LOOKUP_ATTRS:
            continue
        else:
            # A newer exporter may add fields; ignoring them keeps old engines loadable, and
            # the warning makes a misspelled field visible.
            log.warning("%s: ignoring unknown field %r (known: %s)", PLUGIN_NAME, name, FIELD_NAMES)
    return parsed


def serialize_fields(mode: int) -> list[tuple[str, np.ndarray]]:
    """What ``get_fields_to_serialize`` writes into an engine: the inverse of ``parse_fields``."""
    return [("mode", np.array([int(mode)], dtype=np.int32))]


# --------------------------------------------------------------------------- build-time decisions
_FLOAT_TYPE_NAMES = ("HALF", "BF16", "FLOAT")
_TORCH_BY_TRT_NAME = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT32": torch.int32}


def format_supported(pos: int, type_names: Sequence[str], linear: bool, num_inputs: int = 4) -> bool:
    """``supports_format_combination`` as a plain function over TensorRT ``DataType`` names.

    Positions: 0..2 q, k, v (one float dtype, chosen by q), 3 seq_lens (INT32), 4 the output
    (q's dtype). ``type_names[:pos + 1]`` are the types of positions 0..pos; only linear
    (dense row-major) layouts, because the kernels take contiguous (B, S, H, D) memory.
    """
    if not linear or num_inputs != 4 or not 0 <= pos <= 4 or len(type_names) <= pos:
        return False
    t = type_names[pos]
    if pos == 0:
        return t in _FLOAT_TYPE_NAMES
    if pos == 3:
        return t == "INT32"
    return t == type_names[0]


def output_shape(q_shape: Shape, k_shape: Shape, v_shape: Shape) -> Shape:
    """The output's shape, (B, S, H) from q and head_dim from V's own dims; checks the inputs.

    The seed read V's shape from Q's dims: here each shape comes from its own descriptor, and
    any disagreement is an error instead of an out-of-bounds read.
    """
    for name, shp in (("q", q_shape), ("k", k_shape), ("v", v_shape)):
        if len(shp) != 4:
            raise InvalidInputError(f"{PLUGIN_NAME}: {name} must be 4-D (B, S, H, D), got shape {tuple(shp)}")
    if tuple(k_shape) != tuple(q_shape) or tuple(v_shape) != tuple(q_shape):
        raise InvalidInputError(
            f"{PLUGIN_NAME}: q, k, v must have one shape (B, S, H, D), got q {tuple(q_shape)}, "
            f"k {tuple(k_shape)}, v {tuple(v_shape)}; check the QKV split before the attention node"
        )
    return (q_shape[0], q_shape[1], q_shape[2], v_shape[3])


def choose_enqueue_kernel(
    dtype: torch.dtype,
    available: Sequence[str],
    capability: tuple[int, int],
    forced: str | None = None,
) -> str:
    """The kernel ``enqueue`` runs: one that reads ``seq_lens`` on the device (no host sync).

    FA3 (``seqused_q/k``) when it is available (it is only listed on sm90); else FlashAttention's
    CuTe DSL kernel (``seqused_q/k``, listed on sm90 when it imports); else cuDNN's
    padded-batch graph (the cuDNN frontend, listed when it imports) on sm90 for fp16/bf16;
    else PyTorch's flash kernel with ``seqused_k`` on sm80+ for fp16/bf16; else PyTorch's
    memory-efficient kernel with ``seqlen_k``, the one that takes fp32 and runs before sm80.
    ``forced`` (``FA3TRT_ATTN_KERNEL``) wins when it names one of these and fits the dtype;
    a host-length kernel there is ignored (it would sync every call) and logged.
    """
    fits_flash = dtype in (torch.float16, torch.bfloat16) and capability >= (8, 0)
    if forced:
        if forced in DEVICE_LENGTH_KERNELS:
            if forced == "fa3" and "fa3" not in available:
                raise ConfigError(
                    f"{KERNEL_ENV}=fa3 but FA3 is not available here (needs flash_attn_interface and an sm90 GPU); "
                    f"unset {KERNEL_ENV} or install FA3"
                )
            if forced == "flash_cute" and "flash_cute" not in available:
                raise ConfigError(
                    f"{KERNEL_ENV}=flash_cute but FlashAttention's CuTe DSL kernels are not available here "
                    f"(needs an sm90 GPU); unset {KERNEL_ENV} or {_flash_cute.INSTALL_HINT}"
                )
            if forced == "cudnn_padded" and "cudnn_padded" not in available:
                raise ConfigError(
                    f"{KERNEL_ENV}=cudnn_padded but the cuDNN frontend is not available here; "
                    f"unset {KERNEL_ENV} or pip install nvidia-cudnn-frontend"
                )
            if forced in ("fa3", "flash_cute", "cudnn_padded", "flash_seqused") and not fits_flash:
                raise ConfigError(
                    f"{KERNEL_ENV}={forced} cannot run {dtype} on compute capability {capability}; "
                    f"use {KERNEL_ENV}=efficient_seqused or unset it"
                )
            return forced
        _log_ignored_force(forced)
    if dtype == torch.float32 or not fits_flash:
        return "efficient_seqused"
    if "fa3" in available:
        return "fa3"
    if "flash_cute" in available:
        return "flash_cute"
    if "cudnn_padded" in available and capability >= (9, 0):
        return "cudnn_padded"
    return "flash_seqused"


@functools.cache
def _log_ignored_force(forced: str) -> None:
    log.warning(
        "%s=%s is ignored inside TensorRT: that kernel needs the lengths on the host (a stream sync per "
        "call); the plugin uses one of %s", KERNEL_ENV, forced, DEVICE_LENGTH_KERNELS,
    )


@functools.cache
def _kernel_for(device_index: int, dtype: torch.dtype) -> str:
    device = torch.device("cuda", device_index)
    name = choose_enqueue_kernel(
        dtype, available_kernels(device), torch.cuda.get_device_capability(device), os.environ.get(KERNEL_ENV)
    )
    log.info("%s on cuda:%d for %s: kernel %s", PLUGIN_NAME, device_index, dtype, name)
    return name


# --------------------------------------------------------------------------- zero-copy views
_TYPESTR = {torch.float32: "<f4", torch.float16: "<f2", torch.bfloat16: "<i2", torch.int32: "<i4"}


class _CudaArray:
    """The smallest object torch.as_tensor accepts for device memory it does not own."""

    __slots__ = ("__cuda_array_interface__",)

    def __init__(self, ptr: int, shape: Shape, typestr: str) -> None:
        # stream=None: no synchronization on import (the caller orders work on its stream).
        self.__cuda_array_interface__ = {
            "shape": shape, "typestr": typestr, "data": (ptr, False), "version": 3, "strides": None, "stream": None,
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

    TensorRT passes the same buffers again and again; building the views costs tens of µs
    per call (67 µs for four pointers through cupy on an H100), a dict lookup costs well under
    one. Views are non-owning aliases, so an entry whose memory TensorRT later reuses is only
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

    def constants(self, stream_handle: int, device: torch.device, b: int, s: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
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


_default_cache = EnqueueCache()


# --------------------------------------------------------------------------- enqueue core
_fp8_logged = False


def _kernel_input_shape(name: str, b: int, s: int, h: int, d: int) -> Shape:
    # FA3, the CuTe kernel and cuDNN's graph take the padded batch as it is; PyTorch's flash
    # kernel takes packed (total, H, D) with cu_seqlens, the memory-efficient kernel (1, total,
    # H, D). Building the views in these shapes directly saves a reshape per tensor per call.
    if name in ("cudnn_padded", "flash_cute", "fa3"):
        return (b, s, h, d)
    return (1, b * s, h, d) if name == "efficient_seqused" else (b * s, h, d)


def _run_kernel(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lens: torch.Tensor, cu: torch.Tensor, s: int) -> torch.Tensor:
    """One attention kernel over packed inputs with device-side lengths. Returns a new tensor.

    None of these kernels takes a preallocated output in a stable public signature (FA3's
    ``out=`` lives in a private function whose arguments change between releases), so the
    result is written into TensorRT's buffer afterwards by one fused masked copy.
    """
    if name == "fa3":
        return _fa3.attention(q, k, v, lens.clamp(0, s), zero_tail=False)  # the masked write zeroes the tails
    if name == "flash_cute":
        # Lengths past S clamped (the kernel must not read past the buffers); rows zeroed by the caller.
        return _flash_cute.attention(q, k, v, lens.clamp(0, s), zero_tail=False)
    if name == "cudnn_padded":
        try:
            return _cudnn_frontend.ragged_attention(q, k, v, lens, zero_tail=False)  # the masked write zeroes them
        except _cudnn_frontend.CudnnGraphUnsupportedError as e:  # cached per shape: one refusal, then this path
            _log_once(f"{PLUGIN_NAME}: {e}; this shape runs on flash_seqused")
            b, s_, h, d = q.shape
            return _run_kernel("flash_seqused", q.view(b * s_, h, d), k.view(b * s_, h, d), v.view(b * s_, h, d), lens, cu, s)
    if name == "flash_seqused":
        return torch.ops.aten._flash_attention_forward(q, k, v, cu, cu, s, s, 0.0, False, False, seqused_k=lens)[0]
    if name == "efficient_seqused":
        return torch.ops.aten._efficient_attention_forward(
            q, k, v, None, cu, cu, s, s, 0.0, 0, False, seqlen_k=lens
        )[0]
    raise ConfigError(f"{PLUGIN_NAME}: kernel {name!r} cannot run inside TensorRT; use one of {DEVICE_LENGTH_KERNELS}")


class _Binding:
    """Everything one (pointers, shapes, dtype, stream, mode, kernel) call needs, made once.

    TensorRT calls ``enqueue`` with the same buffers again and again, so the steady state is
    one dict lookup for all of it. Also the stream as the (id, device index, device type)
    triple PyTorch's stream setter takes: switching streams without building ``Stream``
    objects costs a fraction of the ``torch.cuda.stream`` context manager.
    """

    __slots__ = ("ptrs", "dtype", "qkv", "lens", "lens_col", "out", "out_shape", "stream", "stream_ids",
                 "device_index", "cu", "rows", "keep", "keep4", "zero", "name", "mode", "shape", "direct",
                 "lens_safe", "launchers", "zero_tail", "zero_first")

    def __init__(self, cache: EnqueueCache, q_ptr: int, k_ptr: int, v_ptr: int, seq_lens_ptr: int, out_ptr: int,
                 q_shape: Shape, k_shape: Shape, v_shape: Shape, dtype: torch.dtype, stream_handle: int,
                 mode: int, kernel: str | None, write: str = "auto") -> None:
        b, s, h, d = self.out_shape = output_shape(q_shape, k_shape, v_shape)
        if dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise InvalidInputError(f"{PLUGIN_NAME}: dtype {dtype} is not supported; use float16, bfloat16 or float32")
        if mode not in (MODE_NATIVE, MODE_FP8):
            raise InvalidInputError(f"{PLUGIN_NAME}: mode must be 0 or 1, got {mode!r}")
        self.shape, self.mode, self.dtype, self.ptrs = (b, s, h, d), mode, dtype, (q_ptr, k_ptr, v_ptr)
        self.out = cache.view(out_ptr, self.out_shape, dtype)
        device = self.out.device
        self.device_index = device.index if device.index is not None else torch.cuda.current_device()
        self.name = kernel or _kernel_for(self.device_index, dtype)
        if self.name == "fa3" and not _fa3.supports_config(dtype, d):
            others = [n for n in available_kernels(device) if n != "fa3"]
            fallback = choose_enqueue_kernel(dtype, others, torch.cuda.get_device_capability(device))
            _log_once(f"{PLUGIN_NAME}: this FA3 build has no kernel for {dtype} at head dim {d}; this shape runs on {fallback}")
            self.name = fallback
        if self.name == "flash_cute" and not _flash_cute.supports_head_dim(d):
            _log_once(f"{PLUGIN_NAME}: head dim {d} is not one FlashAttention's CuTe kernel is built for; this shape runs on flash_seqused")
            self.name = "flash_seqused"
        self.lens = cache.view(seq_lens_ptr, (b,), torch.int32)
        self.lens_col = cache.view(seq_lens_ptr, (b, 1), torch.int32)
        self.stream = cache.stream(stream_handle, device)
        self.stream_ids = (self.stream.stream_id, self.stream.device_index, self.stream.device_type)
        with torch.cuda.stream(self.stream):
            self.cu, self.rows, self.keep, self.keep4, self.zero = cache.constants(stream_handle, device, b, s, dtype)
        # The kernel's input views (FP8 quantizes from (B, S, H, D) views of its own, per call).
        kshape = _kernel_input_shape(self.name, b, s, h, d)
        self.qkv = None if mode == MODE_FP8 else tuple(cache.view(p, kshape, dtype) for p in self.ptrs)
        if write not in ("auto", "direct", "masked"):
            raise ConfigError(f"{PLUGIN_NAME}: write must be 'auto', 'direct' or 'masked', got {write!r}")
        # Direct: the kernel writes TensorRT's buffer itself, then one kernel zeroes the padded
        # rows (FA3, FlashAttention's CuTe kernel and cuDNN's padding-mask graph take an output).
        # Masked: the kernel's own result is copied in by one masked write (every other kernel).
        # FA3 and the CuTe kernel write no row past a length, so their padded rows are zeroed
        # first, by the launch that also clamps the lengths they read: one small kernel per call.
        wants_direct = self.name in DIRECT_WRITE_KERNELS and mode == MODE_NATIVE and write != "masked"
        self.zero_first = self.name in ("fa3", "flash_cute")
        with torch.cuda.stream(self.stream):
            self.lens_safe = torch.empty((b,), dtype=torch.int32, device=device) if wants_direct else None
        self.zero_tail = None
        if wants_direct:
            clamp_into = self.lens_safe if self.zero_first else None
            self.zero_tail = _tail.zero_tail_launcher(self.out, self.lens, clamp_into=clamp_into)
        if write == "direct" and self.zero_tail is None:
            raise ConfigError(
                f"{PLUGIN_NAME}: a direct write needs one of {DIRECT_WRITE_KERNELS} in mode 0 and Triton; "
                f"this call runs {self.name}"
            )
        self.direct = self.zero_tail is not None
        self.launchers: dict[int, Callable[[], None]] = {}  # thread id -> prepared launch

    def _launcher(self) -> Callable[[], None] | None:
        """This thread's launch of the kernel into ``out`` with the clamped lengths, made once;
        None when cuDNN refuses the shape (the binding then takes the masked path for good)."""
        launch = self.launchers.get(threading.get_ident())
        if launch is not None:
            return launch
        assert self.qkv is not None and self.lens_safe is not None
        q, k, v = self.qkv
        lens, out = self.lens_safe, self.out
        if self.name == "fa3":
            def launch() -> None:
                _fa3.attention(q, k, v, lens, out=out, zero_tail=False)
        elif self.name == "flash_cute":
            def launch() -> None:
                _flash_cute.attention(q, k, v, lens, out=out, zero_tail=False)
        else:
            try:
                launch = _cudnn_frontend.prepare(q, k, v, lens, out)
            except _cudnn_frontend.CudnnGraphUnsupportedError as e:
                _log_once(f"{PLUGIN_NAME}: {e}; this shape runs on flash_seqused")
                self.direct = False
                return None
        self.launchers[threading.get_ident()] = launch
        return launch

    def _run_direct(self) -> bool:
        """The kernel straight into ``out`` with the lengths clamped to S (it must not read past
        the buffers), and the padded rows zeroed. False when cuDNN refuses the shape."""
        launch = self._launcher()
        if launch is None:
            return False
        zero_tail: Callable[[], None] = self.zero_tail  # type: ignore[assignment]  # set whenever direct is
        if self.zero_first:
            zero_tail()  # zeroes the padded rows and writes lens_safe
            launch()
        else:  # cuDNN leaves the padded rows undefined: zero them after it
            torch.clamp(self.lens, 0, self.shape[1], out=self.lens_safe)
            launch()
            zero_tail()
        return True

    def run(self, cache: EnqueueCache) -> None:
        if self.direct and self._run_direct():
            return
        if self.qkv is None:
            q_ptr, k_ptr, v_ptr = self.ptrs
            res = _fp8_attention(self.name, cache, q_ptr, k_ptr, v_ptr, self.shape, self.dtype, self.lens, self.cu)
        else:
            q, k, v = self.qkv
            res = _run_kernel(self.name, q, k, v, self.lens, self.cu, self.shape[1])
        torch.lt(self.rows, self.lens_col, out=self.keep)
        torch.where(self.keep4, res.view(self.out_shape), self.zero, out=self.out)


_get_stream = torch._C._cuda_getCurrentStream if hasattr(torch._C, "_cuda_getCurrentStream") else None
_set_stream = torch._C._cuda_setStream if hasattr(torch._C, "_cuda_setStream") else None


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
    CuTe kernel or the cuDNN padding-mask kernel (``DIRECT_WRITE_KERNELS``; ``write="auto"`` or
    ``"direct"``), the kernel writes ``out_ptr`` itself and one Triton
    kernel zeroes the rows past each length; with any other kernel, or ``write="masked"``, the
    kernel's result is copied in by one fused masked write (``torch.where`` into the out view)
    that also zeroes those rows. The host never waits for the device. Temporaries (the kernel's
    result and log-sum-exp) come from PyTorch's caching allocator on that stream, so steady
    state does no cudaMalloc. Raises on bad input.
    """
    if q_shape[0] * q_shape[1] * q_shape[2] * q_shape[3] == 0:
        output_shape(q_shape, k_shape, v_shape)  # still refuse mismatched shapes
        return
    cache = cache if cache is not None else _default_cache
    key = (q_ptr, k_ptr, v_ptr, seq_lens_ptr, out_ptr, q_shape, k_shape, v_shape, dtype, stream_handle, mode, kernel, write)
    bind = cache.binding(key, lambda: _Binding(cache, *key))  # type: ignore[arg-type]
    if _get_stream is None or _set_stream is None or torch.cuda.current_device() != bind.device_index:
        with torch.cuda.stream(bind.stream):
            bind.run(cache)
        return
    prev = _get_stream(bind.device_index)
    _set_stream(*bind.stream_ids)
    try:
        bind.run(cache)
    finally:
        _set_stream(*prev)


def _fp8_attention(
    name: str, cache: EnqueueCache, q_ptr: int, k_ptr: int, v_ptr: int, shape: Shape, dtype: torch.dtype,
    lens: torch.Tensor, cu: torch.Tensor,
) -> torch.Tensor:
    # FP8 quantizes q, k, v: new tensors are inherent to this mode (the zero-copy promise is
    # about mode 0). Same numerics as the op: per-(batch, head) e4m3 with descale factors.
    global _fp8_logged
    b, s, h, d = shape
    q4, k4, v4 = (cache.view(p, shape, dtype) for p in (q_ptr, k_ptr, v_ptr))
    if name == "fa3":
        return _run_fp8("fa3", q4, k4, v4, lens.clamp(0, s))  # lengths past S would read past the buffers
    if not _fp8_logged:
        _fp8_logged = True
        log.warning(
            "%s mode=1 (FP8) without FA3: q, k, v are quantized to e4m3 and computed with %s in %s "
            "(FP8 numerics without FP8 speed); build FA3 for the FP8 kernel", PLUGIN_NAME, name, dtype,
        )
    kshape = _kernel_input_shape(name, b, s, h, d)
    deq = [_fp8_dequantize(*fp8_quantize(t), dtype).view(kshape) for t in (q4, k4, v4)]
    return _run_kernel(name, deq[0], deq[1], deq[2], lens, cu, s)


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


# --------------------------------------------------------------------------- registration
_reg_lock = threading.Lock()
_registered: dict[str, Any] = {}  # namespace -> creator; held so Python keeps the object alive


def is_registered(namespace: str = "") -> bool:
    """Whether TensorRT's registry has ``CustomAttnPlugin`` v1 in ``namespace`` (False without TensorRT)."""
    if namespace in _registered:
        return True
    if not tensorrt_available():
        return False
    return trt.get_plugin_registry().get_creator(PLUGIN_NAME, PLUGIN_VERSION, namespace) is not None


def require_registered(namespace: str = "") -> None:
    """Raise ``PluginNotRegisteredError`` unless the plugin is registered in ``namespace``."""
    if not is_registered(namespace):
        raise PluginNotRegisteredError(
            f"TensorRT plugin {PLUGIN_NAME} v{PLUGIN_VERSION} (namespace {namespace!r}) is not registered in "
            f"this process (pid {os.getpid()}); call fa3trt.plugin.register_plugin({namespace!r}) before "
            "parsing ONNX or deserializing an engine, in every process that does either"
        )


def register_plugin(namespace: str = "") -> None:
    """Register the plugin creator with TensorRT's registry. Idempotent, thread-safe, cheap.

    The first call per process and namespace imports TensorRT and registers; later calls are
    one dict lookup. A creator registered earlier by other code under the same name, version
    and namespace is accepted as is.
    """
    if namespace in _registered:
        return
    require_tensorrt()
    with _reg_lock:
        if namespace in _registered:
            return
        registry = trt.get_plugin_registry()
        creator = registry.get_creator(PLUGIN_NAME, PLUGIN_VERSION, namespace)
        if creator is None:
            creator = plugin_classes()[1](namespace)
            if not registry.register_creator(creator, namespace):
                raise PluginNotRegisteredError(
                    f"TensorRT refused to register {PLUGIN_NAME} v{PLUGIN_VERSION} in namespace {namespace!r}; "
                    "another creator with that name, version and namespace may be half-registered: "
                    "restart the process"
                )
            log.info("registered TensorRT plugin %s v%s (namespace %r)", PLUGIN_NAME, PLUGIN_VERSION, namespace)
        _registered[namespace] = creator


# --------------------------------------------------------------------------- the TensorRT classes
def _fields_of(fc: Any) -> list[tuple[str, Any]]:
    return [(f.name, f.data) for f in fc] if fc is not None else []


@functools.cache
def plugin_classes() -> tuple[type, type]:
    """(CustomAttnPlugin, CustomAttnPluginCreator), defined on first use (imports TensorRT)."""
    require_tensorrt()  # fail here, with the install hint, rather than inside a class statement

    class CustomAttnPlugin(trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuild, trt.IPluginV3OneRuntime):
        """Attention over (B, S, H, D) tensors with per-sequence lengths; see the module docstring."""

        def __init__(self, mode: int = MODE_NATIVE, namespace: str = "", phase: Any = None) -> None:
            trt.IPluginV3.__init__(self)
            trt.IPluginV3OneCore.__init__(self)
            trt.IPluginV3OneBuild.__init__(self)
            trt.IPluginV3OneRuntime.__init__(self)
            # Python plugins must set every attribute TensorRT reads.
            self.plugin_name = PLUGIN_NAME
            self.plugin_version = PLUGIN_VERSION
            self.plugin_namespace = namespace
            self.num_outputs = 1
            # Identical attention layers time identically: share one timing-cache entry.
            self.timing_cache_id = f"{PLUGIN_NAME}.{PLUGIN_VERSION}.mode{mode}"
            self.mode = mode
            self.phase = phase
            self.tactic = 0
            self.cache = EnqueueCache()

        # -- core
        def get_capability_interface(self, type: Any) -> Any:
            return self

        def clone(self) -> CustomAttnPlugin:
            # A fresh cache: no mutable state is shared between clones (contexts, builder copies).
            c = CustomAttnPlugin(self.mode, self.plugin_namespace, self.phase)
            c.tactic = self.tactic
            return c

        # -- build
        def get_output_data_types(self, input_types: list[trt.DataType]) -> list[trt.DataType]:
            return [input_types[0]]

        def get_output_shapes(
            self, inputs: list[trt.DimsExprs], shape_inputs: list[trt.DimsExprs], expr_builder: trt.IExprBuilder
        ) -> list[trt.DimsExprs]:
            # The stubs lack DimsExprs' copy constructor, which TensorRT's own samples use.
            out = trt.DimsExprs(inputs[0])  # type: ignore[call-overload]  # (B, S, H) of q ...
            out[3] = inputs[2][3]  # ... and head_dim from V's own dims
            return [out]

        def supports_format_combination(self, pos: int, in_out: list[trt.DynamicPluginTensorDesc], num_inputs: int) -> bool:
            names = [t.desc.type.name for t in in_out[: pos + 1]]
            return format_supported(pos, names, in_out[pos].desc.format == trt.TensorFormat.LINEAR, num_inputs)

        def configure_plugin(self, inp: list[trt.DynamicPluginTensorDesc], out: list[trt.DynamicPluginTensorDesc]) -> None:
            if len(inp) != 4 or len(out) != 1:
                raise InvalidInputError(
                    f"{PLUGIN_NAME} takes 4 inputs (q, k, v, seq_lens) and gives 1 output, got {len(inp)} and {len(out)}"
                )

        def get_workspace_size(self, inp: list[trt.DynamicPluginTensorDesc], out: list[trt.DynamicPluginTensorDesc]) -> int:
            return 0  # kernel temporaries come from PyTorch's caching allocator on the stream

        def get_valid_tactics(self) -> list[int]:
            return []  # one implementation per (dtype, GPU); nothing for TensorRT to time

        # -- runtime
        def set_tactic(self, tactic: int) -> None:
            self.tactic = tactic

        def on_shape_change(self, inp: list[trt.PluginTensorDesc], out: list[trt.PluginTensorDesc]) -> None:
            # Called when shapes change, not per enqueue: validate here so a bad graph fails at
            # set_input_shape time with a readable message.
            # Dims iterates through __getitem__; the stubs omit __iter__ (same below).
            output_shape(tuple(inp[0].dims), tuple(inp[1].dims), tuple(inp[2].dims))  # type: ignore[arg-type]

        def enqueue(
            self,
            input_desc: list[trt.PluginTensorDesc],
            output_desc: list[trt.PluginTensorDesc],
            inputs: list[int],
            outputs: list[int],
            workspace: int,
            stream: int,
        ) -> None:
            q_desc = input_desc[0]
            dtype = _TORCH_BY_TRT_NAME.get(q_desc.type.name)
            status = 1
            if dtype is None:
                log.error("%s: unsupported input type %s", PLUGIN_NAME, q_desc.type.name)
            else:
                status = run_enqueue(
                    inputs[0], inputs[1], inputs[2], inputs[3], outputs[0],
                    tuple(q_desc.dims), tuple(input_desc[1].dims), tuple(input_desc[2].dims),  # type: ignore[arg-type]
                    dtype, stream, self.mode, cache=self.cache,
                )
            if status != 0:
                # TensorRT's Python binding turns an exception into a failed enqueue (non-zero
                # status to the C++ side, execute_async_v3 returns False); the reason is logged.
                raise RuntimeError(f"{PLUGIN_NAME} enqueue failed (status {status}); see the log above")

        def attach_to_context(self, resource_context: Any) -> CustomAttnPlugin:
            return self.clone()

        def get_fields_to_serialize(self) -> trt.PluginFieldCollection_:
            # The stubs type the name as FallbackString, which a str converts to implicitly.
            fields = [trt.PluginField(n, a, trt.PluginFieldType.INT32) for n, a in serialize_fields(self.mode)]  # type: ignore[call-overload]
            # pybind converts the list type implicitly; the stubs name only the underscore type.
            return trt.PluginFieldCollection(fields)  # type: ignore[return-value]

    class CustomAttnPluginCreator(trt.IPluginCreatorV3One):
        """Creates ``CustomAttnPlugin`` from ONNX attributes (build) or engine fields (runtime)."""

        def __init__(self, namespace: str = "") -> None:
            trt.IPluginCreatorV3One.__init__(self)
            self.name = PLUGIN_NAME
            self.plugin_version = PLUGIN_VERSION
            self.plugin_namespace = namespace
            self.field_names = trt.PluginFieldCollection(  # type: ignore[assignment]  # pybind converts
                [trt.PluginField("mode", np.array([], dtype=np.int32), trt.PluginFieldType.INT32)]  # type: ignore[call-overload]
            )

        def create_plugin(self, name: str, field_collection: Any, phase: Any) -> CustomAttnPlugin:
            fields = parse_fields(_fields_of(field_collection))
            return CustomAttnPlugin(fields["mode"], self.plugin_namespace, phase)

    return CustomAttnPlugin, CustomAttnPluginCreator
