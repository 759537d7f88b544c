"""PyTorch's own fused kernels: flash (fp16/bf16, sm80+) and memory-efficient (any float dtype).

``flash`` and ``efficient`` run dense batches through SDPA and ragged ones one sequence at a
time (lengths on the host). ``flash_seqused`` and ``efficient_seqused`` run a ragged batch in
one launch with the lengths on the GPU (``seqused_k`` / ``seqlen_k`` over the flattened padded
batch): no host sync, so they run inside TensorRT and before sm90.
"""

from __future__ import annotations

import torch

from fa3trt.kernels import sdpa
from fa3trt.kernels.base import HALF_DTYPES, AttentionKernel, Shape, host_lengths
from fa3trt.kernels.tail import zero_tail_

__all__ = ["Flash", "FlashSeqused", "Efficient", "EfficientSeqused"]


class _SdpaKernel(AttentionKernel):
    """Dense through SDPA with this backend first; ragged one sequence at a time."""

    backend: str

    @classmethod
    def forward(cls, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_lens: torch.Tensor | None) -> torch.Tensor:
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

    @classmethod
    def forward(cls, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_lens: torch.Tensor | None) -> torch.Tensor:
        if seq_lens is None:
            return sdpa.dense(q, k, v, cls.name.removesuffix("_seqused"))
        b, s, h, d = q.shape
        lens = seq_lens.to(device=q.device, dtype=torch.int32)
        shape = cls.packed_shape(b, s, h, d)
        qp, kp, vp = (t.reshape(shape) for t in (q, k, v))
        out = cls.forward_packed(qp, kp, vp, lens, sdpa.padded_cu_seqlens(b, s, q.device), s)
        return zero_tail_(out.view(b, s, h, d), lens)


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
        cls, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lens: torch.Tensor, cu: torch.Tensor, s: int
    ) -> torch.Tensor:
        return torch.ops.aten._flash_attention_forward(q, k, v, cu, cu, s, s, 0.0, False, False, seqused_k=lens)[0]


class EfficientSeqused(_SequsedKernel):
    """PyTorch's memory-efficient kernel with ``seqlen_k`` over (1, B*S, H, D): any float
    dtype and any GPU, the enqueue kernel of last resort."""

    name = "efficient_seqused"

    @classmethod
    def packed_shape(cls, b: int, s: int, h: int, d: int) -> Shape:
        return (1, b * s, h, d)

    @classmethod
    def forward_packed(
        cls, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lens: torch.Tensor, cu: torch.Tensor, s: int
    ) -> torch.Tensor:
        return torch.ops.aten._efficient_attention_forward(q, k, v, None, cu, cu, s, s, 0.0, 0, False, seqlen_k=lens)[0]
