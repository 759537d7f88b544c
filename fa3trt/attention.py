"""The ``attn::custom_attn`` op: non-causal multi-head attention over (B, S, H, D) tensors.

Contract:
- q, k, v are laid out (batch, seq, heads, head_dim) like FA3; fp32, fp16 or bf16, one dtype.
- ``seq_lens`` (int32, shape (B,)) is optional. Keys past a sequence's length are ignored and
  the output rows past it are zero, so a padded batch equals each sequence run alone.
- ``mode`` 0 computes in the input dtype; 1 is FP8 (FA3's e4m3 path with per-head descale
  factors when FA3 is installed, else an FP8 quantize/dequantize of q, k, v computed in the
  input dtype, announced once with a warning: the numerics of FP8 without its speed).

The kernel is chosen once per device and logged: FA3 (``flash_attn_interface``, see
``fa3trt._fa3``) on sm90, else FlashAttention's CuTe DSL kernel on sm90 (``flash_attn.cute``, see
``fa3trt._flash_cute``; cuDNN for the dense shapes under ``_CUTE_DENSE_MIN_SEQ`` that recur),
else PyTorch SDPA (cuDNN first on sm90, flash
otherwise), else math on CPU. ``FA3TRT_ATTN_KERNEL`` overrides the choice. Ragged batches never
use a dense boolean mask on GPU: FA3 and the CuTe kernel use ``seqused_q/k``; the SDPA kernels
run each sequence at its own length (lengths known on the host), cuDNN's padding-mask graph, or
PyTorch's flash kernel with ``seqused_k`` (one launch, no host sync). The cuDNN kernel runs a
shape once the work seen in it would have repaid cuDNN's plan build (see ``_CUDNN_AFTER_FLOPS``)
and a plan-free kernel before that.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import os
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from fa3trt import _cudnn_frontend, _fa3, _flash_cute
from fa3trt.errors import InvalidInputError

__all__ = [
    "attention",
    "custom_attn",
    "reference_attention",
    "select_kernel",
    "lengths_on_device",
    "available_kernels",
    "run_kernel",
    "fp8_quantize",
    "MODE_NATIVE",
    "MODE_FP8",
    "KERNEL_ENV",
    "onnx_export_mode",
]

log = logging.getLogger(__name__)

MODE_NATIVE = 0
MODE_FP8 = 1
KERNEL_ENV = "FA3TRT_ATTN_KERNEL"
PLUGIN_NAME = "CustomAttnPlugin"
PLUGIN_VERSION = "1"
PLUGIN_DOMAIN = "attn"

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_FP8_DTYPE = torch.float8_e4m3fn
_FP8_MAX = float(torch.finfo(_FP8_DTYPE).max)

Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


# --------------------------------------------------------------------------- SDPA kernels
def _padded_cu_seqlens(batch: int, seq: int, device: torch.device) -> torch.Tensor:
    # Sequence i starts at row i*seq of the flattened padded batch; seqused_* give the lengths.
    return torch.arange(0, (batch + 1) * seq, seq, dtype=torch.int32, device=device)


_SDPA_BACKENDS = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}


def _sdpa_dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str | None) -> torch.Tensor:
    # The named backend first, the others after it: a shape the named kernel does not take
    # (cuDNN refuses a key length of 1, say) still runs, on the next kernel in line.
    ctx: contextlib.AbstractContextManager[Any] = nullcontext()
    if backend:
        first = _SDPA_BACKENDS[backend]
        ctx = sdpa_kernel([first] + [b for b in _SDPA_BACKENDS.values() if b != first], set_priority=True)
    with ctx:
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return o.transpose(1, 2).contiguous()


def _zero_tail_rows(out: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    rows = torch.arange(out.shape[1], device=out.device)[None, :] < lens.to(out.device)[:, None]
    return out.masked_fill_(~rows[:, :, None, None], 0)


def _host_lengths(seq_lens: torch.Tensor) -> list[int]:
    # Free for CPU tensors; a device tensor costs one sync, which callers that care avoid by
    # passing host lengths (the serving path always has them on the host).
    return [int(x) for x in seq_lens.tolist()]


def _one_sequence(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str) -> torch.Tensor:
    """(1, n, H, D) -> (1, n, H, D) (any layout). cuDNN through its op directly: the SDPA front
    end and its context manager cost more host time than a short sequence's kernel."""
    if backend == "cudnn" and q.shape[1] >= 2:
        return torch.ops.aten._scaled_dot_product_cudnn_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, False
        )[0].transpose(1, 2)
    return _sdpa_dense(q, k, v, backend)


def _per_sequence(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lens: list[int], backend: str) -> torch.Tensor:
    """Each sequence at its own length: no padded keys are ever read, no mask is built.

    (Measured on an H200 at 8 sequences of 2048..300 tokens: 410 useful TFLOP/s against 190
    for cuDNN with a boolean padding mask; running the sequences on four side streams gave
    no gain, so they run in order on the caller's stream.)
    """
    s = q.shape[1]
    if all(n == s for n in lens):
        return _sdpa_dense(q, k, v, backend)
    out = torch.empty_like(q)
    for i, n in enumerate(lens):
        if n > 0:
            out[i : i + 1, :n] = _one_sequence(q[i : i + 1, :n], k[i : i + 1, :n], v[i : i + 1, :n], backend)
        if n < s:
            out[i, n:].zero_()
    return out


def _flash_seqused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_lens: torch.Tensor | None) -> torch.Tensor:
    """PyTorch's flash kernel with ``seqused_k``: ragged without a host sync (lengths stay on device)."""
    if seq_lens is None:
        return _sdpa_dense(q, k, v, "flash")
    b, s, h, d = q.shape
    cu = _padded_cu_seqlens(b, s, q.device)
    lens = seq_lens.to(device=q.device, dtype=torch.int32)
    out = torch.ops.aten._flash_attention_forward(
        q.reshape(b * s, h, d), k.reshape(b * s, h, d), v.reshape(b * s, h, d),
        cu, cu, s, s, 0.0, False, False, seqused_k=lens,
    )[0].view(b, s, h, d)
    return _zero_tail_rows(out, lens)


# cuDNN builds an execution plan per new shape (50-90 ms on an H100/H200; it showed as 59 ms
# p50 per single request of random length in serving), then runs ~1.8x faster than PyTorch's
# flash kernel, which needs no plan. Which one pays depends on how much work the shape will
# still see, which is unknown: so the shape runs on flash until the attention work done in it
# would have repaid a plan build (ski rental: never more than twice the better choice). With
# cuDNN saving ~45% of flash's time at ~350 TFLOP/s, 50 ms of plan is repaid by ~40 TFLOP.
# The seed's fixed 1x15708 shape (4 TFLOP per call) is on cuDNN from its 10th call; a stream
# of random lengths stays on flash and never pays a plan build. (Counting sightings instead
# made a 2-layer model build a plan on every request: its second layer is a second sighting.)
_CUDNN_AFTER_FLOPS = 40e12
_CUDNN_MAX_SHAPES = 4096
_shape_flops: dict[tuple[object, ...], float] = {}


def _cudnn_ready(q: torch.Tensor, n: int, graph: str = "sdpa") -> bool:
    """Count one call of the (1 or B, n, H, D) shape for a cuDNN ``graph``; True once it should run on cuDNN."""
    key = (graph, q.shape[0], n, q.shape[2], q.shape[3], q.dtype, q.device)
    done = _shape_flops.get(key, 0.0)
    if done >= _CUDNN_AFTER_FLOPS:
        return True
    if len(_shape_flops) >= _CUDNN_MAX_SHAPES and key not in _shape_flops:
        _shape_flops.clear()  # a bounded memory of shapes; forgetting only costs flash runs
    _shape_flops[key] = done + 4.0 * q.shape[0] * n * n * q.shape[2] * q.shape[3]
    return _shape_flops[key] >= _CUDNN_AFTER_FLOPS


def _cudnn_padded(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_lens: torch.Tensor) -> torch.Tensor | None:
    """A ragged batch in one cuDNN launch with a padding mask (cuDNN frontend), or None when the
    frontend is missing, refuses the shape, or fails: the caller then takes another path."""
    if q.dtype == torch.float32 or not _cudnn_frontend.available():
        return None
    try:
        return _cudnn_frontend.ragged_attention(q, k, v, seq_lens)
    except RuntimeError as e:
        _log_once(f"cuDNN padded-batch SDPA unavailable for {tuple(q.shape)} {q.dtype} ({e}); using per-sequence kernels")
        return None


@functools.cache
def _log_once(message: str) -> None:
    log.warning("%s", message)


def _cudnn_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_lens: torch.Tensor | None) -> torch.Tensor:
    """cuDNN for shapes that recur, PyTorch's flash kernel for the rest (see above).

    Ragged batches with lengths on the host run each sequence at its own length on cuDNN when
    every length recurs (fastest: 384 useful TFLOP/s at 8x2048..300 on an H200), else in one
    cuDNN launch with a padding mask (the cuDNN frontend, when installed, once the padded shape
    recurs: 373), else in one launch of the flash kernel with device-side lengths (214).
    Lengths on the device take the padding-mask launch first: no host sync.
    """
    if q.device.type != "cuda":
        return _math_kernel(q, k, v, seq_lens)
    b, s = q.shape[:2]
    on_device = seq_lens is not None and seq_lens.device.type == "cuda"
    if seq_lens is not None and on_device and _cudnn_ready(q, s, "padded"):
        out = _cudnn_padded(q, k, v, seq_lens)  # device lengths: no host sync on this path
        if out is not None:
            return out
    lens = None if seq_lens is None else _host_lengths(seq_lens)
    if lens is None or all(n == s for n in lens):
        return _sdpa_dense(q, k, v, "cudnn" if _cudnn_ready(q, s) else "flash")
    one = q[:1]
    ready = all(_cudnn_ready(one, n) for n in set(lens) if n > 0)
    if ready or q.dtype == torch.float32:  # the flash kernel takes fp16/bf16 only
        return _per_sequence(q, k, v, lens, "cudnn" if ready else "efficient")
    # Host lengths only: device lengths had their one look at the padded shape above.
    if seq_lens is not None and not on_device and _cudnn_ready(q, s, "padded"):  # the shape recurs, its lengths do not
        out = _cudnn_padded(q, k, v, seq_lens)
        if out is not None:
            return out
    return _flash_seqused(q, k, v, seq_lens)


def _sdpa_kernel(backend: str) -> Kernel:
    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_lens: torch.Tensor | None) -> torch.Tensor:
        if seq_lens is None:
            return _sdpa_dense(q, k, v, backend)
        return _per_sequence(q, k, v, _host_lengths(seq_lens), backend)

    return run


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_lens: torch.Tensor | None = None
) -> torch.Tensor:
    """Plain softmax(QK^T/sqrt(d))V with a key-padding mask, in float64 on the input's device.

    The numerical reference for tests and benchmarks; not used by any serving path.
    """
    b, s, h, d = q.shape
    qd, kd, vd = (t.double().transpose(1, 2) for t in (q, k, v))
    scores = qd @ kd.transpose(-1, -2) / d**0.5
    if seq_lens is not None:
        keep = torch.arange(s, device=q.device)[None, :] < seq_lens.to(q.device)[:, None]
        scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
    out = (scores.softmax(-1) @ vd).transpose(1, 2)
    if seq_lens is not None:
        out = torch.nan_to_num(out)  # a zero-length sequence has no keys at all
        out = _zero_tail_rows(out.contiguous(), seq_lens)
    return out.to(q.dtype)


def _math_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_lens: torch.Tensor | None) -> torch.Tensor:
    """CPU: SDPA's math/CPU kernel with a key-padding mask (cheap at the sizes a CPU serves)."""
    if seq_lens is None:
        return _sdpa_dense(q, k, v, None)
    s = q.shape[1]
    keep = torch.arange(s, device=q.device)[None, :] < seq_lens.to(q.device)[:, None]
    # A zero-length sequence would mask every key; give it one so softmax stays finite, and
    # zero its rows below like every other padded row.
    keep[:, 0] = True
    o = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=keep[:, None, None, :]
    )
    return _zero_tail_rows(o.transpose(1, 2).contiguous(), seq_lens)


# Dense batches shorter than this run on cuDNN once its plan for the shape is paid for. On
# H200s (bf16, 32 heads of 128) cuDNN led FlashAttention's CuTe kernel at 1x1024 (350 vs 253
# TFLOP/s) and 16x1024 (589 vs 507), the two were level within the run-to-run spread at 8x2048
# (cuDNN 546-631, CuTe 570-679 over four to eight runs) and 1x4096 (554-662 vs 532-692), and
# the CuTe kernel led from 1x6144 up (719 vs 671; 669-684 vs 558-579 at the seed's 1x15708).
# docs/benchmarks.md, section 1. (FA3 proper led cuDNN at every shape from 16x1024 to 1x15708,
# so it runs them all.)
_CUTE_DENSE_MIN_SEQ = 6144


def _full(seq_lens: torch.Tensor | None, s: int) -> bool:
    """No lengths, or host lengths that are all S: the batch is dense."""
    return seq_lens is None or (seq_lens.device.type == "cpu" and bool((seq_lens == s).all()))


def _fa3_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_lens: torch.Tensor | None) -> torch.Tensor:
    """FA3 (``fa3trt._fa3``) for every shape its build holds: on an H200 it led cuDNN at every
    dense shape measured, by 3-22% of device time, at a third of cuDNN's host time per call
    (docs/benchmarks.md, section 1). fp32 and head dims it was built without go to the next
    kernel in line (the CuTe kernel, else cuDNN)."""
    if not _fa3.supports(q):
        fallback = _flash_cute_kernel if _flash_cute.available(q.device) else _cudnn_kernel
        return fallback(q, k, v, seq_lens)
    return _fa3.attention(q, k, v, None if _full(seq_lens, q.shape[1]) else seq_lens)


def _flash_cute_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_lens: torch.Tensor | None) -> torch.Tensor:
    """FlashAttention's Hopper kernel (CuTe DSL) for ragged batches (``seqused_q/k``, one launch,
    lengths on the device) and long dense ones; short dense shapes that recur go to cuDNN (see
    above), fp32 and head dims it is not built for to the cuDNN kernel's own paths."""
    if not _flash_cute.supports(q):
        return _cudnn_kernel(q, k, v, seq_lens)
    s = q.shape[1]
    if _full(seq_lens, s):
        if s < _CUTE_DENSE_MIN_SEQ and _cudnn_ready(q, s):
            return _sdpa_dense(q, k, v, "cudnn")
        return _flash_cute.attention(q, k, v)
    return _flash_cute.attention(q, k, v, seq_lens)


def _cudnn_padded_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_lens: torch.Tensor | None) -> torch.Tensor:
    """The cuDNN frontend's padded-batch graph for every call (benchmarks; dense calls on SDPA cuDNN)."""
    if seq_lens is None:
        return _sdpa_dense(q, k, v, "cudnn")
    return _cudnn_frontend.ragged_attention(q, k, v, seq_lens)


KERNELS: dict[str, Kernel] = {
    "fa3": _fa3_kernel,
    "flash_cute": _flash_cute_kernel,
    "cudnn": _cudnn_kernel,
    "cudnn_padded": _cudnn_padded_kernel,
    "flash": _sdpa_kernel("flash"),
    "flash_seqused": _flash_seqused,
    "efficient": _sdpa_kernel("efficient"),
    "math": _math_kernel,
}


def available_kernels(device: torch.device | str) -> list[str]:
    """Kernels that can run on ``device`` (FA3 and FlashAttention's CuTe DSL kernel only when
    they import and the GPU is sm90)."""
    device = torch.device(device)
    if device.type != "cuda":
        return ["math"]
    names = ["cudnn", "flash", "flash_seqused", "efficient", "math"]
    if _cudnn_frontend.available():
        names.insert(1, "cudnn_padded")
    if _flash_cute.available(device):
        names.insert(0, "flash_cute")
    if _fa3.available(device):
        names.insert(0, "fa3")
    return names


_select_lock = threading.Lock()
_selected: dict[str, str] = {}


def select_kernel(device: torch.device | str) -> str:
    """The kernel this process uses on ``device``: chosen once, logged once."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = str(device)
    name = _selected.get(key)
    if name is not None:
        return name
    with _select_lock:
        if key in _selected:
            return _selected[key]
        available = available_kernels(device)
        forced = os.environ.get(KERNEL_ENV)
        if forced:
            if forced not in available:
                raise InvalidInputError(
                    f"{KERNEL_ENV}={forced!r} is not available on {device}; choose one of {available}"
                )
            name, why = forced, f"forced by {KERNEL_ENV}"
        elif device.type != "cuda":
            name, why = "math", "CPU"
        elif "fa3" in available:
            name, why = "fa3", "flash_attn_interface imports and the GPU is sm90"
        elif "flash_cute" in available:
            name, why = "flash_cute", "FlashAttention's CuTe DSL kernels import and the GPU is sm90"
        elif torch.cuda.get_device_capability(device) >= (9, 0):
            name, why = "cudnn", "sm90+ without FA3: cuDNN SDPA is the fastest PyTorch kernel there"
        else:
            name, why = "flash", "pre-sm90 GPU without FA3"
        log.info("attention kernel on %s: %s (%s)", device, name, why)
        _selected[key] = name
        return name


def lengths_on_device(kernel: str, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether ``kernel`` takes a padded batch's lengths on the GPU with no host sync (FA3 and
    FlashAttention's CuTe kernel, fp16/bf16, head dims they are built for). The SDPA kernels
    dispatch on lengths on the host instead."""
    if kernel == "flash_cute":
        return _flash_cute.supports_config(dtype, head_dim)
    if kernel == "fa3":
        return _fa3.supports_config(dtype, head_dim)
    return False


def run_kernel(
    name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_lens: torch.Tensor | None = None
) -> torch.Tensor:
    """Run one named kernel directly (benchmarks and tests); no validation, mode 0."""
    return KERNELS[name](q, k, v, seq_lens)


# --------------------------------------------------------------------------- FP8
def fp8_quantize(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(batch, head) e4m3 quantization of a (B, S, H, D) tensor.

    Returns (fp8 tensor, descale of shape (B, H) in float32) with ``t ≈ fp8 * descale``.
    """
    amax = t.abs().amax(dim=(1, 3)).float().clamp_min(1e-12)  # (B, H)
    descale = amax / _FP8_MAX
    q8 = (t.float() / descale[:, None, :, None]).clamp(-_FP8_MAX, _FP8_MAX).to(_FP8_DTYPE)
    return q8, descale


def _fp8_dequantize(q8: torch.Tensor, descale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q8.float() * descale[:, None, :, None]).to(dtype)


_fp8_warned = False


def _run_fp8(kernel: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_lens: torch.Tensor | None) -> torch.Tensor:
    global _fp8_warned
    (q8, qs), (k8, ks), (v8, vs) = fp8_quantize(q), fp8_quantize(k), fp8_quantize(v)
    if kernel == "fa3" and _fa3.supports(q8):
        out = _fa3.attention(q8, k8, v8, seq_lens, descale=(qs, ks, vs))
        return out.to(q.dtype)
    if not _fp8_warned:
        _fp8_warned = True
        warnings.warn(
            "attention mode=1 (FP8): no FA3 FP8 kernel here (FA3 not installed, or built without FP8 "
            "at this head dim), so q, k, v are quantized to FP8 e4m3 "
            f"and computed with the {kernel!r} kernel in {q.dtype}: FP8 numerics without FP8 speed. "
            "Build FA3 (flash-attention hopper/) for the FP8 kernel.",
            RuntimeWarning,
            stacklevel=3,
        )
    deq = [_fp8_dequantize(t8, s, q.dtype) for t8, s in ((q8, qs), (k8, ks), (v8, vs))]
    return KERNELS[kernel](deq[0], deq[1], deq[2], seq_lens)


# --------------------------------------------------------------------------- the op
@torch.library.custom_op("attn::custom_attn", mutates_args=())
def custom_attn(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_lens: torch.Tensor | None, mode: int
) -> torch.Tensor:
    kernel = select_kernel(q.device)
    if mode == MODE_FP8:
        return _run_fp8(kernel, q, k, v, seq_lens)
    return KERNELS[kernel](q, k, v, seq_lens)


@custom_attn.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_lens: torch.Tensor | None, mode: int) -> torch.Tensor:
    return torch.empty_like(q)


# Set by fa3trt.export for the duration of an export: torch.onnx.is_in_onnx_export() is not
# set by every torch release's dynamo exporter (2.11 leaves it False), this flag always is.
_exporting: contextvars.ContextVar[bool] = contextvars.ContextVar("fa3trt_exporting", default=False)


@contextlib.contextmanager
def onnx_export_mode() -> Iterator[None]:
    """Within this block ``attention`` emits the ``CustomAttnPlugin`` ONNX node."""
    token = _exporting.set(True)
    try:
        yield
    finally:
        _exporting.reset(token)


def _in_export() -> bool:
    return _exporting.get() or torch.onnx.is_in_onnx_export()


def _is_tracing() -> bool:
    return torch.compiler.is_compiling() or _in_export()


def _validate(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_lens: torch.Tensor | None, mode: int) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise InvalidInputError(
                f"{name} must be 4-D (batch, seq, heads, head_dim), got shape {tuple(t.shape)}; "
                "reshape (B, S, H*D) inputs with .view(B, S, H, D)"
            )
        if t.dtype not in _FLOAT_DTYPES:
            raise InvalidInputError(f"{name} has dtype {t.dtype}; use one of float32, float16, bfloat16")
    if not (q.dtype == k.dtype == v.dtype):
        raise InvalidInputError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.shape[:3] == k.shape[:3] == v.shape[:3]) or q.shape[3] != k.shape[3]:
        raise InvalidInputError(
            "q, k, v must agree on (batch, seq, heads) and q, k on head_dim; got "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if mode not in (MODE_NATIVE, MODE_FP8):
        raise InvalidInputError(f"mode must be 0 (input dtype) or 1 (FP8), got {mode!r}")
    if seq_lens is None:
        return
    b, s = q.shape[:2]
    if seq_lens.dim() != 1 or seq_lens.shape[0] != b:
        raise InvalidInputError(f"seq_lens must have shape ({b},) (one length per sequence), got {tuple(seq_lens.shape)}")
    if seq_lens.dtype not in (torch.int32, torch.int64):
        raise InvalidInputError(f"seq_lens must be int32, got {seq_lens.dtype}")
    if seq_lens.device.type == "cpu" and not _is_tracing() and b > 0:
        lo, hi = int(seq_lens.min()), int(seq_lens.max())
        if lo < 0 or hi > s:
            raise InvalidInputError(
                f"seq_lens must lie in [0, {s}] (the padded sequence length), got min {lo}, max {hi}"
            )


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_lens: torch.Tensor | None = None,
    mode: int = MODE_NATIVE,
    *,
    plugin_namespace: str = "",
) -> torch.Tensor:
    """Attention over (B, S, H, D) tensors; see the module docstring for the contract.

    Under ``torch.onnx.export`` this emits one ``attn::CustomAttnPlugin`` node (the TensorRT
    plugin's name, version and fields) instead of tracing into a kernel.
    """
    _validate(q, k, v, seq_lens, mode)
    if seq_lens is not None and seq_lens.dtype != torch.int32:
        seq_lens = seq_lens.to(torch.int32)
    if _in_export():
        if seq_lens is None:
            seq_lens = torch.full((q.shape[0],), q.shape[1], dtype=torch.int32, device=q.device)
        return torch.onnx.ops.symbolic(
            f"{PLUGIN_DOMAIN}::{PLUGIN_NAME}",
            [q, k, v, seq_lens],
            attrs={"mode": int(mode), "plugin_version": PLUGIN_VERSION, "plugin_namespace": plugin_namespace},
            dtype=q.dtype,
            shape=q.shape,
            version=1,
        )
    return custom_attn(q, k, v, seq_lens, int(mode))
