"""The CPU kernel: SDPA's math/CPU kernel with a key-padding (and causal) mask, cheap at the
sizes a CPU serves; it takes every call the op can express."""

from __future__ import annotations

import torch

from fa3trt.attention.kernels import sdpa
from fa3trt.attention.kernels.base import AttentionKernel, key_lengths
from fa3trt.attention.kernels.tail import zero_tail_

__all__ = ["Math"]


class Math(AttentionKernel):
    name = "math"
    cuda_only = False

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
        b, sq = q.shape[:2]
        sk = k.shape[1]
        lens_k = key_lengths(seq_lens, seq_lens_k, sq, sk)
        if seq_lens is None and lens_k is None:
            return sdpa.attend(q, k, v, None, causal=causal, scale=scale).contiguous()
        dev = q.device
        lq = torch.full((b,), sq, device=dev) if seq_lens is None else seq_lens.to(dev)
        lk = torch.full((b,), sk, device=dev) if lens_k is None else lens_k.to(dev)
        rows = torch.arange(sq, device=dev)[None, :, None]
        cols = torch.arange(sk, device=dev)[None, None, :]
        keep = cols < lk[:, None, None]  # (B, 1, Sk)
        if causal:
            keep = keep & (cols <= rows + (lk - lq)[:, None, None])  # (B, Sq, Sk), bottom-right
        keep = keep.expand(b, sq, sk)
        # A query that sees no key would make softmax divide by zero: give it one key, and
        # zero its row below like every padded row.
        seen = keep.any(-1)
        keep = keep.clone()
        keep[..., 0] |= ~seen
        o = sdpa.torch_sdpa(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=keep[:, None],
            scale=scale,
            enable_gqa=q.shape[2] != k.shape[2],
        ).transpose(1, 2)
        o = o.masked_fill(~seen[:, :, None, None], 0)
        return zero_tail_(o.contiguous(), lq)
