"""The ``attn::custom_attn`` op: multi-head attention over (batch, seq, heads, head_dim) tensors.

Contract (what FA3 takes):
- q is (B, Sq, H, D), k and v (B, Sk, Hk, D) like FA3: cross-attention when Sq != Sk,
  grouped-query heads when Hk < H (H a multiple of Hk); fp32, fp16 or bf16, one dtype.
- ``seq_lens`` (int32, (B,)) are the query lengths and ``seq_lens_k`` the key lengths, both
  optional; ``seq_lens_k`` None means ``seq_lens`` when Sq == Sk (a padded batch of
  self-attention), else every key. Keys past a length are ignored and the output rows past a
  query length are zero, so a padded batch equals each sequence run alone.
- ``causal`` masks keys after each query, aligned bottom-right as in FlashAttention (query i
  of a sequence sees its keys up to i + key length - query length; a query that sees no key
  gives zeros). ``softmax_scale`` defaults to 1/sqrt(D).
- ``mode`` 0 computes in the input dtype; 1 is FP8 (``fa3trt.attention.kernels.fp8``: FA3's e4m3 kernel
  where it is built, else FP8 numerics in the input dtype, announced once).
- Under ``onnx_export_mode`` ``attention`` traces to one ``attn::plugin_node`` op, which
  ``torch.onnx.export`` with ``fa3trt.onnx.node.translation_table()`` writes as one
  ``attn::CustomAttnPlugin`` node with the TensorRT plugin's name, version and fields: inputs
  q, k, v, seq_lens, seq_lens_k (the lengths always present), attributes ``mode``, ``causal``,
  ``softmax_scale`` (the value, never a default), ``plugin_version``, ``plugin_namespace``.
  The branch is decided before tracing (``assume_constant_result``) and the op is a plain
  custom op, so strict ``torch.export`` (dynamo) traces it; run eagerly (an exported
  program's ``.module()``) it computes attention.

The kernel is chosen once per device by ``fa3trt.attention.kernels.selector`` and logged; a dtype, head
dim or feature (cross-attention, causal, grouped-query heads) it lacks runs on the next kernel
in line (logged once).

``recording_calls()`` collects each eager call's mode, head dim and dtype within a block: a
backend runs one batch under it at load, so it knows, for any model, which head dims need an
FP8 kernel and whether the kernel reads its lengths on the device.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch

from fa3trt.attention.kernels import fp8
from fa3trt.attention.kernels.base import FLOAT_DTYPES, default_scale
from fa3trt.attention.kernels.registry import get
from fa3trt.attention.kernels.selector import kernel_for, select_kernel
from fa3trt.errors import InvalidInputError

__all__ = [
    "attention",
    "recording_calls",
    "AttentionCall",
    "custom_attn",
    "onnx_export_mode",
    "plugin_node",
    "MODE_NATIVE",
    "MODE_FP8",
    "PLUGIN_NAME",
    "PLUGIN_VERSION",
    "PLUGIN_DOMAIN",
]

MODE_NATIVE = 0
MODE_FP8 = 1
PLUGIN_NAME = "CustomAttnPlugin"
PLUGIN_VERSION = "2"
"""2: key lengths as a fifth input, ``causal`` and ``softmax_scale`` fields (1: self-attention only)."""
PLUGIN_DOMAIN = "attn"


class AttentionCall(NamedTuple):
    """What one eager call of ``attention`` asked of the kernels."""

    mode: int
    head_dim: int
    dtype: torch.dtype
    causal: bool = False


_recorded: contextvars.ContextVar[list[AttentionCall] | None] = contextvars.ContextVar("fa3trt_calls", default=None)


@contextlib.contextmanager
def recording_calls() -> Iterator[list[AttentionCall]]:
    """The eager ``attention`` calls made in this block (this context), as they happen."""
    calls: list[AttentionCall] = []
    token = _recorded.set(calls)
    try:
        yield calls
    finally:
        _recorded.reset(token)


# --------------------------------------------------------------------------- the op
@torch.library.custom_op("attn::custom_attn", mutates_args=())
def custom_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_lens: torch.Tensor | None,
    seq_lens_k: torch.Tensor | None,
    mode: int,
    causal: bool,
    softmax_scale: float,
) -> torch.Tensor:
    name = select_kernel(q.device)
    features = {"cross": q.shape[1] != k.shape[1] or seq_lens_k is not None, "causal": causal}
    kernel = kernel_for(name, q.device, q.dtype, q.shape[-1], gqa=q.shape[2] != k.shape[2], **features)

    def run(q2: torch.Tensor, k2: torch.Tensor, v2: torch.Tensor) -> torch.Tensor:
        return kernel.forward(q2, k2, v2, seq_lens, seq_lens_k, causal=causal, scale=softmax_scale)

    if mode == MODE_FP8:
        # FP8 inputs on the chosen kernel's own FP8 kernel where it has one, whatever q's dtype.
        return fp8.run_fp8(get(name), q, k, v, seq_lens, run, seq_lens_k, causal=causal, scale=softmax_scale)
    return run(q, k, v)


@custom_attn.register_fake
def _(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_lens: torch.Tensor | None,
    seq_lens_k: torch.Tensor | None,
    mode: int,
    causal: bool,
    softmax_scale: float,
) -> torch.Tensor:
    return torch.empty_like(q)


@torch.library.custom_op("attn::plugin_node", mutates_args=())
def plugin_node(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_lens: torch.Tensor,
    seq_lens_k: torch.Tensor,
    mode: int,
    causal: bool,
    softmax_scale: float,
    plugin_namespace: str,
) -> torch.Tensor:
    """The ``CustomAttnPlugin`` node as a traced op (see the module docstring); eagerly, attention
    with both lengths, as TensorRT's plugin and ONNX Runtime's check run it."""
    return custom_attn(q, k, v, seq_lens, seq_lens_k, mode, causal, softmax_scale)


@plugin_node.register_fake
def _(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_lens: torch.Tensor,
    seq_lens_k: torch.Tensor,
    mode: int,
    causal: bool,
    softmax_scale: float,
    plugin_namespace: str,
) -> torch.Tensor:
    return torch.empty_like(q)


# Set by fa3trt.onnx.export for the duration of an export: torch.onnx.is_in_onnx_export() is not
# set by every torch release's dynamo exporter (2.11 leaves it False), this flag always is.
_exporting: contextvars.ContextVar[bool] = contextvars.ContextVar("fa3trt_exporting", default=False)


@contextlib.contextmanager
def onnx_export_mode() -> Iterator[None]:
    """Within this block ``attention`` emits the ``CustomAttnPlugin`` ONNX node."""
    global _decided
    if _decided is None:
        _decided = torch.compiler.assume_constant_result(_exporting_now)
    token = _exporting.set(True)
    try:
        yield
    finally:
        _exporting.reset(token)


def _exporting_now() -> bool:
    return _exporting.get()


# Strict torch.export (dynamo) cannot trace ContextVar.get: under it the branch is decided
# before tracing, by this wrapper that dynamo reads as a constant. Made on the first export:
# assume_constant_result imports torch._dynamo, which `import fa3trt` must not.
_decided: Callable[[], bool] | None = None


def _in_export() -> bool:
    if torch.compiler.is_compiling():
        return _decided is not None and _decided()
    return _exporting.get() or torch.onnx.is_in_onnx_export()


def _is_tracing() -> bool:
    return torch.compiler.is_compiling() or _in_export()


def _check_lengths(name: str, lens: torch.Tensor, b: int, s: int) -> None:
    if lens.dim() != 1 or lens.shape[0] != b:
        raise InvalidInputError(f"{name} must have shape ({b},) (one length per sequence), got {tuple(lens.shape)}")
    if lens.dtype not in (torch.int32, torch.int64):
        raise InvalidInputError(f"{name} must be int32, got {lens.dtype}")
    if lens.device.type == "cpu" and not _is_tracing() and b > 0:
        lo, hi = int(lens.min()), int(lens.max())
        if lo < 0 or hi > s:
            raise InvalidInputError(f"{name} must lie in [0, {s}] (the padded length), got min {lo}, max {hi}")


def _validate(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_lens: torch.Tensor | None,
    seq_lens_k: torch.Tensor | None,
    mode: int,
    softmax_scale: float | None,
) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise InvalidInputError(
                f"{name} must be 4-D (batch, seq, heads, head_dim), got shape {tuple(t.shape)}; "
                "reshape (B, S, H*D) inputs with .view(B, S, H, D)"
            )
        if t.dtype not in FLOAT_DTYPES:
            raise InvalidInputError(f"{name} has dtype {t.dtype}; use one of float32, float16, bfloat16")
    if not (q.dtype == k.dtype == v.dtype):
        raise InvalidInputError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    shapes = f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
    if k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3]:
        raise InvalidInputError(
            f"k and v must share one shape (batch, seq_k, heads_k, head_dim) with q's batch and head_dim; got {shapes}"
        )
    if k.shape[2] == 0 or q.shape[2] % k.shape[2]:
        raise InvalidInputError(
            f"q's heads must be a multiple of k's (grouped-query attention); got {shapes}: "
            "repeat k and v's heads, or use a head count that divides q's"
        )
    if mode not in (MODE_NATIVE, MODE_FP8):
        raise InvalidInputError(f"mode must be 0 (input dtype) or 1 (FP8), got {mode!r}")
    # 0 < scale < inf rather than math.isfinite: the same test (NaN fails both), and one dynamo
    # traces for the symbolic float a torch.compile trace with dynamic=True passes.
    if softmax_scale is not None and not (0 < softmax_scale < math.inf):
        raise InvalidInputError(
            f"softmax_scale must be a finite number > 0 (or None for 1/sqrt(D)), got {softmax_scale!r}"
        )
    if seq_lens is not None:
        _check_lengths("seq_lens", seq_lens, q.shape[0], q.shape[1])
    if seq_lens_k is not None:
        _check_lengths("seq_lens_k", seq_lens_k, q.shape[0], k.shape[1])


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_lens: torch.Tensor | None = None,
    mode: int = MODE_NATIVE,
    *,
    seq_lens_k: torch.Tensor | None = None,
    causal: bool = False,
    softmax_scale: float | None = None,
    plugin_namespace: str = "",
) -> torch.Tensor:
    """Attention of q (B, Sq, H, D) over k, v (B, Sk, Hk, D); see the module docstring.

    Under ``onnx_export_mode`` this traces to one ``attn::plugin_node`` op, exported as one
    ``attn::CustomAttnPlugin`` node (the TensorRT plugin's name, version and fields).
    """
    _validate(q, k, v, seq_lens, seq_lens_k, mode, softmax_scale)
    if seq_lens is not None and seq_lens.dtype != torch.int32:
        seq_lens = seq_lens.to(torch.int32)
    if seq_lens_k is seq_lens:
        seq_lens_k = None  # one set of lengths: the kernels' self-attention path
    elif seq_lens_k is not None and seq_lens_k.dtype != torch.int32:
        seq_lens_k = seq_lens_k.to(torch.int32)
    scale = default_scale(q.shape[3]) if softmax_scale is None else float(softmax_scale)
    if not torch.compiler.is_compiling() and (calls := _recorded.get()) is not None:
        calls.append(AttentionCall(int(mode), int(q.shape[3]), q.dtype, bool(causal)))
    if _in_export():
        b, sq, sk = q.shape[0], q.shape[1], k.shape[1]
        lens_q = torch.full((b,), sq, dtype=torch.int32, device=q.device) if seq_lens is None else seq_lens
        if seq_lens_k is not None:
            lens_k = seq_lens_k
        elif sq == sk:
            lens_k = lens_q
        else:
            lens_k = torch.full((b,), sk, dtype=torch.int32, device=q.device)
        return plugin_node(q, k, v, lens_q, lens_k, int(mode), bool(causal), scale, plugin_namespace)
    return custom_attn(q, k, v, seq_lens, seq_lens_k, int(mode), bool(causal), scale)
