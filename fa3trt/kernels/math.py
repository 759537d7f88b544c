"""The CPU kernel: SDPA's math/CPU kernel with a key-padding mask (cheap at the sizes a CPU serves)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fa3trt.kernels import sdpa
from fa3trt.kernels.base import AttentionKernel
from fa3trt.kernels.tail import zero_tail_

__all__ = ["Math"]


class Math(AttentionKernel):
    name = "math"
    cuda_only = False

    @classmethod
    def forward(cls, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_lens: torch.Tensor | None) -> torch.Tensor:
        if seq_lens is None:
            return sdpa.dense(q, k, v, None)
        s = q.shape[1]
        lens = seq_lens.to(q.device)
        keep = torch.arange(s, device=q.device)[None, :] < lens[:, None]
        # A zero-length sequence would mask every key; give it one so softmax stays finite, and
        # zero its rows below like every other padded row.
        keep[:, 0] = True
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=keep[:, None, None, :]
        )
        return zero_tail_(o.transpose(1, 2).contiguous(), lens)
