"""FP8 attention on cuDNN: the frontend's ``sdpa_fp8`` graph with a padding mask (``cudnn_fp8``).

q, k, v arrive as e4m3 with one float32 descale factor each (per tensor, on the device: no host
sync, ``fa3trt.attention.kernels.fp8.quantize``). cuDNN computes S = q·kᵀ in FP8 on Hopper's
tensor cores, dequantizes it with the q and k factors, takes the softmax in float32, quantizes P
to e4m3 with the fixed scale 448 (P is within [0, 1]) and computes P·v in FP8 again. The output
is written in the model's dtype where cuDNN takes that; otherwise in e4m3 with the scale
1/descale_v (an output row is a convex combination of v's rows, so |o| <= max|v|) and dequantized
here. Lengths work as in the bf16 graph (``cudnn_graph``): two device tensors drive the padding
mask, one plan serves every length mix of a padded shape, rows past a length are left undefined
by cuDNN and zeroed here.

Graphs, handles and workspaces are ``cudnn_graph``'s (per thread, bounded LRU), keyed by the
input dtype (e4m3) and the output dtype, so the FP8 and bf16 plans of one shape live side by side.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from fa3trt.attention.kernels import cudnn_graph
from fa3trt.attention.kernels.base import (
    FP8_DTYPE,
    FP8_MAX,
    AttentionKernel,
    default_scale,
)
from fa3trt.attention.kernels.scale_cast import scale_cast
from fa3trt.attention.kernels.tail import zero_tail_
from fa3trt.errors import CudnnGraphUnsupportedError, InvalidInputError

__all__ = ["CudnnFP8", "attention_fp8", "prepare_fp8"]

# Variant-pack uids beyond cudnn_graph's (q, k, v, o, seq_len_q, seq_len_kv: 1-6).
_UID_DESCALE_Q, _UID_DESCALE_K, _UID_DESCALE_V = 11, 12, 13
_UID_DESCALE_S, _UID_SCALE_S, _UID_SCALE_O = 14, 15, 16
_UID_AMAX_S, _UID_AMAX_O = 17, 18

_E4M3_OUT: set[tuple[object, ...]] = set()
"""Shapes whose graph with the output in the model's dtype cuDNN refused: they write e4m3."""

_OUT_TYPES = {torch.bfloat16: "BFLOAT16", torch.float16: "HALF", FP8_DTYPE: "FP8_E4M3"}

# Per device: the constant scalars of the graph (P's scale 448 and its inverse, the output scale
# 1), made by the first call on the device, which is never inside a CUDA graph capture: the plan
# build that comes with a first call cannot run inside one either (warm-up runs before capture).
_CONSTANTS: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _constants(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    c = _CONSTANTS.get(device)
    if c is None:
        c = _CONSTANTS[device] = tuple(  # type: ignore[assignment]
            torch.full((1,), x, dtype=torch.float32, device=device) for x in (FP8_MAX, 1.0 / FP8_MAX, 1.0)
        )
    return c  # type: ignore[return-value]


def _build_variant(cudnn: Any, handle: Any, key: cudnn_graph.GraphKey, amax_s: bool) -> cudnn_graph._Graph:
    b, sq, sk, h, hk, d, _, _, (qb, qs, qh, qd), (kb, ks, kh, kd), scale, out_dtype = key
    dt = cudnn.data_type
    e4m3, f32, i32 = dt.FP8_E4M3, dt.FLOAT, dt.INT32
    t0 = time.perf_counter()
    g = cudnn.pygraph(io_data_type=e4m3, intermediate_data_type=f32, compute_data_type=f32, handle=handle)
    # BHSD dims over BSHD memory, as in the bf16 graph (cudnn_graph._build).
    dims, strides = [b, h, sq, d], [sq * h * d, d, h * d, 1]
    kv_dims, kv_strides = [b, hk, sk, d], [kb, kh, ks, kd]
    q = g.tensor(name="q", dim=dims, stride=[qb, qh, qs, qd], data_type=e4m3, uid=cudnn_graph._UID_Q)
    k = g.tensor(name="k", dim=kv_dims, stride=kv_strides, data_type=e4m3, uid=cudnn_graph._UID_K)
    v = g.tensor(name="v", dim=kv_dims, stride=kv_strides, data_type=e4m3, uid=cudnn_graph._UID_V)
    len_q = g.tensor(name="seq_len_q", dim=[b, 1, 1, 1], stride=[1, 1, 1, 1], data_type=i32, uid=cudnn_graph._UID_LEN_Q)
    len_kv = g.tensor(
        name="seq_len_kv", dim=[b, 1, 1, 1], stride=[1, 1, 1, 1], data_type=i32, uid=cudnn_graph._UID_LEN_KV
    )

    def scalar(name: str, uid: int) -> Any:
        return g.tensor(name=name, dim=[1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=f32, uid=uid)

    common = dict(
        q=q,
        k=k,
        v=v,
        descale_q=scalar("descale_q", _UID_DESCALE_Q),
        descale_k=scalar("descale_k", _UID_DESCALE_K),
        descale_v=scalar("descale_v", _UID_DESCALE_V),
        descale_s=scalar("descale_s", _UID_DESCALE_S),
        scale_s=scalar("scale_s", _UID_SCALE_S),
        scale_o=scalar("scale_o", _UID_SCALE_O),
        attn_scale=scale,
        use_padding_mask=True,
        seq_len_q=len_q,
        seq_len_kv=len_kv,
    )
    try:
        o, _, amax_s_t, amax_o_t = g.sdpa_fp8(generate_stats=False, **common)
    except TypeError:  # releases before generate_stats took is_inference
        o, _, amax_s_t, amax_o_t = g.sdpa_fp8(is_inference=True, **common)
    o.set_output(True).set_dim(dims).set_stride(strides).set_uid(cudnn_graph._UID_O).set_data_type(
        getattr(dt, _OUT_TYPES[out_dtype])
    )
    scratch = [(amax_o_t, _UID_AMAX_O)] + ([(amax_s_t, _UID_AMAX_S)] if amax_s else [])
    for t, uid in scratch:
        t.set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(f32).set_uid(uid)
    g.validate()
    g.build_operation_graph()
    g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    g.check_support()
    g.build_plans()
    ms = (time.perf_counter() - t0) * 1e3
    return cudnn_graph._Graph(g, int(g.get_workspace_size()), ms, scratch_uids=tuple(uid for _, uid in scratch))


def _build(cudnn: Any, handle: Any, key: cudnn_graph.GraphKey) -> cudnn_graph._Graph:
    """The FP8 graph; frontends whose engines want S's amax as an output get it (and nobody reads it)."""
    try:
        return _build_variant(cudnn, handle, key, amax_s=False)
    except Exception:
        return _build_variant(cudnn, handle, key, amax_s=True)


def prepare_fp8(
    q8: torch.Tensor,
    k8: torch.Tensor,
    v8: torch.Tensor,
    descale: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    lens: torch.Tensor,
    lens_k: torch.Tensor,
    out: torch.Tensor,
    scale_o: torch.Tensor | None = None,
    scale: float | None = None,
) -> Callable[[], None]:
    """A launch of the FP8 graph on exactly these tensors (``cudnn_graph.prepared``): e4m3 q, k,
    v with float32 descale factors of one element each, int32 lengths within [0, Sq] and [0, Sk]
    on the device, ``out`` in the model's dtype or e4m3 (then ``scale_o`` its float32 scale).
    Padded rows are left as cuDNN leaves them. Raises CudnnGraphUnsupportedError."""
    key = cudnn_graph.graph_key(q8, k8, default_scale(q8.shape[3]) if scale is None else scale, out.dtype)
    scale_s, descale_s, one = _constants(q8.device)
    pack = {
        cudnn_graph._UID_Q: q8,
        cudnn_graph._UID_K: k8,
        cudnn_graph._UID_V: v8,
        cudnn_graph._UID_O: out,
        cudnn_graph._UID_LEN_Q: lens,
        cudnn_graph._UID_LEN_KV: lens_k,
        _UID_DESCALE_Q: descale[0],
        _UID_DESCALE_K: descale[1],
        _UID_DESCALE_V: descale[2],
        _UID_DESCALE_S: descale_s,
        _UID_SCALE_S: scale_s,
        _UID_SCALE_O: one if scale_o is None else scale_o,
    }
    return cudnn_graph.prepared(key, _build, pack, q8.device)


def _check(q8: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor, descale: tuple[torch.Tensor, ...]) -> None:
    if q8.dim() != 4 or k8.dim() != 4 or k8.shape != v8.shape or k8.shape[0] != q8.shape[0]:
        raise InvalidInputError(
            f"q must be (B, Sq, H, D) and k, v one (B, Sk, Hk, D) shape; got {tuple(q8.shape)}, {tuple(k8.shape)}"
        )
    if q8.shape[3] != k8.shape[3] or q8.shape[2] % k8.shape[2]:
        raise InvalidInputError(f"q {tuple(q8.shape)} and k {tuple(k8.shape)}: head dims differ or heads do not divide")
    if {q8.dtype, k8.dtype, v8.dtype} != {FP8_DTYPE} or q8.device.type != "cuda":
        raise InvalidInputError(f"q, k, v must be {FP8_DTYPE} on a CUDA device; got {q8.dtype} on {q8.device}")
    if any(t.numel() != 1 or t.dtype != torch.float32 for t in descale):
        raise InvalidInputError("cudnn_fp8 takes one float32 descale factor per tensor (quantize(per_tensor=True))")


def attention_fp8(
    q8: torch.Tensor,
    k8: torch.Tensor,
    v8: torch.Tensor,
    descale: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    seq_lens: torch.Tensor | None = None,
    seq_lens_k: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
    zero_tail: bool = True,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Non-causal attention of e4m3 q (B, Sq, H, D) over k, v (B, Sk, Hk, D), each ≈ fp8 · its
    descale factor, as a new tensor in ``out_dtype``; lengths as in ``cudnn_graph.ragged_attention``
    (rows past a query length zero unless ``zero_tail=False``), written into ``out`` when given
    (contiguous, ``out_dtype``). One cuDNN launch (plus a dequantization where cuDNN writes e4m3
    only, and the zeroing); no host sync."""
    _check(q8, k8, v8, descale)
    if q8.stride(3) != 1 or k8.stride(3) != 1 or v8.stride() != k8.stride():
        q8, k8, v8 = q8.contiguous(), k8.contiguous(), v8.contiguous()
    dev = q8.device
    lens, lens_k = cudnn_graph.clamped_lengths(q8, k8, seq_lens, seq_lens_k)
    if out is None:
        out = torch.empty(q8.shape, dtype=out_dtype, device=dev)
    shape_key = (tuple(q8.shape), tuple(k8.shape), dev, out_dtype)
    if shape_key not in _E4M3_OUT:
        try:
            prepare_fp8(q8, k8, v8, descale, lens, lens_k, out, scale=scale)()
            return zero_tail_(out, lens) if zero_tail and seq_lens is not None else out
        except CudnnGraphUnsupportedError:
            _E4M3_OUT.add(shape_key)  # cuDNN before Blackwell writes FP8 SDPA's output in e4m3 only
    # o8 = o / descale_v fits e4m3 (|o| <= max|v|), and one pass turns it into out's dtype.
    o8 = torch.empty(q8.shape, dtype=FP8_DTYPE, device=dev)
    prepare_fp8(q8, k8, v8, descale, lens, lens_k, o8, descale[2].reciprocal(), scale)()
    scale_cast(o8, descale[2], out_dtype, out=out)
    return zero_tail_(out, lens) if zero_tail and seq_lens is not None else out


class CudnnFP8(AttentionKernel):
    """cuDNN's FP8 SDPA: e4m3 inputs with per-tensor descale factors, a padding mask from device
    lengths, output in the model's dtype. FP8 only (``dtypes`` is empty: a bf16 call goes to the
    next kernel in line); non-causal; Hopper and later."""

    name = "cudnn_fp8"
    dtypes = ()
    fp8 = True
    fp8_scales = "tensor"
    device_lengths = True
    causal = False
    capability = ((9, 0), (12, 9))
    install_hint = cudnn_graph.INSTALL_HINT

    @classmethod
    def importable(cls) -> bool:
        return cudnn_graph.available()

    @classmethod
    def supports(cls, dtype: torch.dtype, head_dim: int) -> bool:
        return dtype == FP8_DTYPE and head_dim % 16 == 0 and head_dim <= 256

    @classmethod
    def forward_fp8(
        cls,
        q8: torch.Tensor,
        k8: torch.Tensor,
        v8: torch.Tensor,
        seq_lens: torch.Tensor | None,
        descale: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        seq_lens_k: torch.Tensor | None = None,
        *,
        causal: bool = False,
        scale: float | None = None,
        out_dtype: torch.dtype = torch.bfloat16,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if causal:
            raise InvalidInputError("cudnn_fp8 takes no causal mask (the selector sends causal calls elsewhere)")
        if out is not None and (out.dtype != out_dtype or not out.is_contiguous()):
            out = None
        return attention_fp8(q8, k8, v8, descale, seq_lens, seq_lens_k, scale=scale, out_dtype=out_dtype,
                             zero_tail=out is None, out=out)  # fmt: skip
