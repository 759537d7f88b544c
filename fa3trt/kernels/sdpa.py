"""PyTorch SDPA as the kernels call it: one backend first with the others behind it, and a
ragged batch run one sequence at a time at its own length.

Shared by the cuDNN, flash and math kernels; (B, S, H, D) in and out, like the op.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

__all__ = ["BACKENDS", "dense", "one_sequence", "per_sequence", "padded_cu_seqlens"]

BACKENDS = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}


def padded_cu_seqlens(batch: int, seq: int, device: torch.device) -> torch.Tensor:
    """Sequence starts of a flattened padded batch: sequence i starts at row i*seq."""
    return torch.arange(0, (batch + 1) * seq, seq, dtype=torch.int32, device=device)


def dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str | None) -> torch.Tensor:
    """Attention over whole (B, S, H, D) sequences on SDPA's ``backend`` first.

    The others stay behind it: a shape the named kernel does not take (cuDNN refuses a key
    length of 1, say) still runs, on the next kernel in line.
    """
    ctx: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    if backend:
        first = BACKENDS[backend]
        ctx = sdpa_kernel([first] + [b for b in BACKENDS.values() if b != first], set_priority=True)
    with ctx:
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return o.transpose(1, 2).contiguous()


def one_sequence(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str) -> torch.Tensor:
    """(1, n, H, D) -> (1, n, H, D) (any layout). cuDNN through its op directly: the SDPA front
    end and its context manager cost more host time than a short sequence's kernel."""
    if backend == "cudnn" and q.shape[1] >= 2:
        return torch.ops.aten._scaled_dot_product_cudnn_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, False
        )[0].transpose(1, 2)
    return dense(q, k, v, backend)


def per_sequence(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lens: list[int], backend: str) -> torch.Tensor:
    """Each sequence at its own length: no padded key is read and no mask is built.

    The sequences run in order on the caller's stream: side streams gained nothing
    (docs/benchmarks.md, section 1).
    """
    s = q.shape[1]
    if all(n == s for n in lens):
        return dense(q, k, v, backend)
    out = torch.empty_like(q)
    for i, n in enumerate(lens):
        if n > 0:
            out[i : i + 1, :n] = one_sequence(q[i : i + 1, :n], k[i : i + 1, :n], v[i : i + 1, :n], backend)
        if n < s:
            out[i, n:].zero_()
    return out
