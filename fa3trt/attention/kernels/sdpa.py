"""PyTorch SDPA as the kernels call it: one backend first with the others behind it, a ragged
batch run one sequence at a time at its own lengths, and the general call (cross-attention,
causal masks aligned bottom-right, grouped-query heads, a scale of its own).

Shared by the cuDNN, flash and math kernels; (B, S, H, D) in and out, like the op.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.functional import scaled_dot_product_attention as torch_sdpa

from fa3trt.attention.kernels.base import host_lengths, key_lengths

__all__ = ["torch_sdpa", "BACKENDS", "dense", "one_sequence", "per_sequence", "padded_cu_seqlens", "attend", "general"]

# ``torch_sdpa``: PyTorch's SDPA under a name bound at import, the one every kernel calls, not
# looked up on torch.nn.functional at each call: fa3trt.route_attention replaces that attribute
# while a router is open, and inside a torch.compile graph no frame of the router wraps the op
# when it runs to tell the op's own calls from the model's (each routed call was routed again).

BACKENDS = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}


def padded_cu_seqlens(batch: int, seq: int, device: torch.device) -> torch.Tensor:
    """Sequence starts of a flattened padded batch: sequence i starts at row i*seq."""
    return torch.arange(0, (batch + 1) * seq, seq, dtype=torch.int32, device=device)


def _priority(backend: str | None) -> contextlib.AbstractContextManager[Any]:
    # The named backend first, the others after it: a shape the named kernel does not take
    # (cuDNN refuses a key length of 1, say) still runs, on the next kernel in line.
    if not backend:
        return contextlib.nullcontext()
    first = BACKENDS[backend]
    return sdpa_kernel([first] + [b for b in BACKENDS.values() if b != first], set_priority=True)


def dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str | None) -> torch.Tensor:
    """Attention over whole (B, S, H, D) sequences on SDPA's ``backend`` first."""
    with _priority(backend):
        o = torch_sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return o.transpose(1, 2).contiguous()


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str | None, *, causal: bool, scale: float | None
) -> torch.Tensor:
    """q (B, Sq, H, D) over every key of k, v (B, Sk, Hk, D) on SDPA's ``backend`` first;
    ``causal`` aligned bottom-right (query i sees keys up to i + Sk - Sq; a query that sees no
    key gives zeros). Returns (B, Sq, H, D), not necessarily contiguous."""
    sq, sk = q.shape[1], k.shape[1]
    mask = None
    if causal and sq != sk:
        mask = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(sk - sq)
    with _priority(backend):
        o = torch_sdpa(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=mask,
            is_causal=causal and sq == sk,
            scale=scale,
            enable_gqa=q.shape[2] != k.shape[2],
        ).transpose(1, 2)
    if causal and sq > sk:
        o[:, : sq - sk] = 0  # those queries see no key
    return o


def general(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_lens: torch.Tensor | None,
    seq_lens_k: torch.Tensor | None,
    backend: str | None,
    *,
    causal: bool,
    scale: float | None,
) -> torch.Tensor:
    """The op's general call (see ``fa3trt.attention.kernels.base``) on SDPA: dense when no lengths,
    else each sequence at its own query and key lengths (lengths read on the host)."""
    b, sq = q.shape[:2]
    sk = k.shape[1]
    lens_k = key_lengths(seq_lens, seq_lens_k, sq, sk)
    if seq_lens is None and lens_k is None:
        return attend(q, k, v, backend, causal=causal, scale=scale).contiguous()
    lq = [sq] * b if seq_lens is None else host_lengths(seq_lens)
    lk = lq if lens_k is seq_lens else [sk] * b if lens_k is None else host_lengths(lens_k)
    out = torch.zeros_like(q)
    for i, (nq, nk) in enumerate(zip(lq, lk)):
        if nq > 0 and nk > 0:
            out[i : i + 1, :nq] = attend(
                q[i : i + 1, :nq], k[i : i + 1, :nk], v[i : i + 1, :nk], backend, causal=causal, scale=scale
            )
    return out


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
