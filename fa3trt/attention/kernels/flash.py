"""PyTorch's own fused kernels: flash (fp16/bf16, sm80+) and memory-efficient (any float dtype).

``flash`` and ``efficient`` run dense batches through SDPA and ragged ones one sequence at a
time (lengths on the host). ``flash_seqused`` and ``efficient_seqused`` run a ragged batch in
one launch with the key lengths on the GPU (``seqused_k`` / ``seqlen_k`` over the flattened
padded batch): no host sync, so they run inside TensorRT and before sm90. They align a causal
mask to the padded query length, not each sequence's, so they take no causal calls.
"""

from __future__ import annotations

import torch

from fa3trt.attention.kernels import sdpa
from fa3trt.attention.kernels.base import (
    HALF_DTYPES,
    AttentionKernel,
    Ragged,
    Shape,
    default_scale,
    host_lengths,
    is_plain,
    key_lengths,
)
from fa3trt.attention.kernels.tail import zero_tail_

__all__ = ["Flash", "FlashSeqused", "Efficient", "EfficientSeqused"]


class _SdpaKernel(AttentionKernel):
    """Dense through SDPA with this backend first; ragged one sequence at a time."""

    backend: str

    @classmethod
    def forward(
        cls,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        seq_lens: torch.Tensor | None,
        seq_lens_k: torch.Tensor | None = None,
        *,
        causal: bool = False,
        scale: float | None = None,
    ) -> torch.Tensor:
        if not is_plain(q, k, seq_lens, seq_lens_k, causal, scale):
            return sdpa.general(q, k, v, seq_lens, seq_lens_k, cls.backend, causal=causal, scale=scale)
        if seq_lens is None:
            return sdpa.dense(q, k, v, cls.backend)
        return sdpa.per_sequence(q, k, v, host_lengths(seq_lens), cls.backend)


class Flash(_SdpaKernel):
    name = "flash"
    backend = "flash"


class Efficient(_SdpaKernel):
    name = "efficient"
    backend = "efficient"


class _SequsedKernel(AttentionKernel):
    device_lengths = True
    causal = False

    @classmethod
    def forward(
        cls,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        seq_lens: torch.Tensor | None,
        seq_lens_k: torch.Tensor | None = None,
        *,
        causal: bool = False,
        scale: float | None = None,
    ) -> torch.Tensor:
        b, sq, h, d = q.shape
        sk, hk = k.shape[1], k.shape[2]
        lens_k = key_lengths(seq_lens, seq_lens_k, sq, sk)
        if seq_lens is None and lens_k is None:
            return sdpa.attend(q, k, v, cls.name.removesuffix("_seqused"), causal=causal, scale=scale).contiguous()
        dev = q.device
        lq = torch.full((b,), sq, dtype=torch.int32, device=dev) if seq_lens is None else seq_lens.to(dev, torch.int32)
        if lens_k is seq_lens:
            lk = lq
        elif lens_k is None:
            lk = torch.full((b,), sk, dtype=torch.int32, device=dev)
        else:
            lk = lens_k.to(dev, torch.int32)
        r = Ragged(lq, lk, sdpa.padded_cu_seqlens(b, sq, dev), sdpa.padded_cu_seqlens(b, sk, dev), sq, sk)
        qp = q.reshape(cls.packed_shape(b, sq, h, d))
        kp, vp = (t.reshape(cls.packed_shape(b, sk, hk, d)) for t in (k, v))
        out = cls.forward_packed(qp, kp, vp, r, causal, default_scale(d) if scale is None else scale)
        return zero_tail_(out.view(b, sq, h, d), lq)


class FlashSeqused(_SequsedKernel):
    """PyTorch's flash kernel with ``seqused_k`` over (B*S, H, D) and cu_seqlens."""

    name = "flash_seqused"
    dtypes = HALF_DTYPES
    capability = ((8, 0), (99, 99))
    install_hint = "run on an sm80+ GPU"

    @classmethod
    def packed_shape(cls, b: int, s: int, h: int, d: int) -> Shape:
        return (b * s, h, d)

    @classmethod
    def forward_packed(
        cls, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, r: Ragged, causal: bool, scale: float
    ) -> torch.Tensor:
        return torch.ops.aten._flash_attention_forward(
            q, k, v, r.cu_q, r.cu_k, r.sq, r.sk, 0.0, False, False, scale=scale, seqused_k=r.lens_k
        )[0]


class EfficientSeqused(_SequsedKernel):
    """PyTorch's memory-efficient kernel with ``seqlen_k`` over (1, B*S, H, D): any float
    dtype and any GPU, the enqueue kernel of last resort. Grouped-query heads are repeated."""

    name = "efficient_seqused"

    @classmethod
    def packed_shape(cls, b: int, s: int, h: int, d: int) -> Shape:
        return (1, b * s, h, d)

    @classmethod
    def forward_packed(
        cls, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, r: Ragged, causal: bool, scale: float
    ) -> torch.Tensor:
        if k.shape[2] != q.shape[2]:
            k, v = (t.repeat_interleave(q.shape[2] // k.shape[2], dim=2) for t in (k, v))
        return torch.ops.aten._efficient_attention_forward(
            q, k, v, None, r.cu_q, r.cu_k, r.sq, r.sk, 0.0, 0, False, scale=scale, seqlen_k=r.lens_k
        )[0]
