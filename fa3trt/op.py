"""The ``attn::custom_attn`` op: non-causal multi-head attention over (B, S, H, D) tensors.

Contract:
- q, k, v are laid out (batch, seq, heads, head_dim) like FA3; fp32, fp16 or bf16, one dtype.
- ``seq_lens`` (int32, shape (B,)) is optional. Keys past a sequence's length are ignored and
  the output rows past it are zero, so a padded batch equals each sequence run alone.
- ``mode`` 0 computes in the input dtype; 1 is FP8 (``fa3trt.kernels.fp8``: FA3's e4m3 kernel
  where it is built, else FP8 numerics in the input dtype, announced once).
- Under ``torch.onnx.export`` (``onnx_export_mode``) ``attention`` emits one
  ``attn::CustomAttnPlugin`` node with the TensorRT plugin's name, version and fields.

The kernel is chosen once per device by ``fa3trt.kernels.selector`` and logged; a dtype or
head dim it lacks runs on the next kernel in line (logged once).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch

from fa3trt.errors import InvalidInputError
from fa3trt.kernels import fp8
from fa3trt.kernels.base import FLOAT_DTYPES
from fa3trt.kernels.registry import get
from fa3trt.kernels.selector import kernel_for, select_kernel

__all__ = [
    "attention",
    "custom_attn",
    "onnx_export_mode",
    "MODE_NATIVE",
    "MODE_FP8",
    "PLUGIN_NAME",
    "PLUGIN_VERSION",
    "PLUGIN_DOMAIN",
]

MODE_NATIVE = 0
MODE_FP8 = 1
PLUGIN_NAME = "CustomAttnPlugin"
PLUGIN_VERSION = "1"
PLUGIN_DOMAIN = "attn"


# --------------------------------------------------------------------------- the op
@torch.library.custom_op("attn::custom_attn", mutates_args=())
def custom_attn(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_lens: torch.Tensor | None, mode: int
) -> torch.Tensor:
    name = select_kernel(q.device)
    kernel = kernel_for(name, q.device, q.dtype, q.shape[-1])
    if mode == MODE_FP8:
        # FP8 inputs on the chosen kernel's own FP8 kernel where it has one, whatever q's dtype.
        return fp8.run_fp8(get(name), q, k, v, seq_lens, lambda q8, k8, v8: kernel.forward(q8, k8, v8, seq_lens))
    return kernel.forward(q, k, v, seq_lens)


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
        if t.dtype not in FLOAT_DTYPES:
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
        raise InvalidInputError(
            f"seq_lens must have shape ({b},) (one length per sequence), got {tuple(seq_lens.shape)}"
        )
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
