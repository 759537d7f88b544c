"""Helpers for tests and benchmarks: the numerical reference, one kernel as the op runs it, and
a queued device timer. Public and documented; no serving path uses them.

- ``reference_attention``: plain softmax(QK^T/sqrt(d))V with a key-padding mask in float64, the
  reference every kernel is compared against.
- ``run_kernel``: one named kernel as the op runs it (what it lacks on the next in line), mode 0.
- ``time_queued``: device and host time per call of work queued behind a GPU sleep.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from fa3trt.attention.kernels.selector import kernel_for

__all__ = ["reference_attention", "run_kernel", "time_queued"]


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_lens: torch.Tensor | None = None,
    seq_lens_k: torch.Tensor | None = None,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """Plain softmax(QK^T * scale)V in float64 on the input's device, in q's dtype, written out
    loop by loop from the op's contract: q (B, Sq, H, D), k and v (B, Sk, Hk, D) with each
    group of H / Hk query heads reading one key head; query lengths ``seq_lens``, key lengths
    ``seq_lens_k`` (None: ``seq_lens`` when Sq == Sk, else every key); ``causal`` aligned
    bottom-right; rows past a query length, and rows that see no key, are zero."""
    b, sq, h, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    scale = d**-0.5 if softmax_scale is None else softmax_scale
    lq = [sq] * b if seq_lens is None else [int(n) for n in seq_lens.tolist()]
    if seq_lens_k is not None:
        lk = [int(n) for n in seq_lens_k.tolist()]
    else:
        lk = lq if (seq_lens is not None and sq == sk) else [sk] * b
    out = torch.zeros(b, sq, h, d, dtype=torch.float64, device=q.device)
    group = h // hk
    for i in range(b):
        nq, nk = lq[i], lk[i]
        if nq == 0 or nk == 0:
            continue
        qi = q[i, :nq].double().transpose(0, 1)  # (H, nq, D)
        ki = k[i, :nk].double().transpose(0, 1).repeat_interleave(group, dim=0)  # (H, nk, D)
        vi = v[i, :nk].double().transpose(0, 1).repeat_interleave(group, dim=0)
        scores = qi @ ki.transpose(-1, -2) * scale
        if causal:
            allowed = torch.arange(nk, device=q.device)[None, :] <= torch.arange(nq, device=q.device)[:, None] + nk - nq
            scores = scores.masked_fill(~allowed, float("-inf"))
        out[i, :nq] = torch.nan_to_num(scores.softmax(-1) @ vi).transpose(0, 1)
    return out.to(q.dtype)


def run_kernel(
    name: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_lens: torch.Tensor | None = None,
    seq_lens_k: torch.Tensor | None = None,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """The kernel called ``name`` on the op's inputs as the op runs it when it is chosen: what
    it lacks (a dtype, a head dim, a feature) runs on the next kernel in line. No validation,
    mode 0."""
    cross = q.shape[1] != k.shape[1] or (seq_lens_k is not None and seq_lens_k is not seq_lens)
    kernel = kernel_for(name, q.device, q.dtype, q.shape[-1], cross=cross, causal=causal, gqa=q.shape[2] != k.shape[2])
    return kernel.forward(q, k, v, seq_lens, seq_lens_k, causal=causal, scale=softmax_scale)


def time_queued(fn: Callable[[], Any], *, calls: int = 20, sleep_cycles: int = 100_000_000) -> tuple[float, float]:
    """(device ms per call, host µs per call) of ``calls`` back-to-back calls queued behind a
    GPU sleep: the host issues them all before the GPU reaches the first, so the device time
    holds no gap the host left, and the host time no wait for the device. Rates measured this
    way hold steady across rounds where timing from an idle queue drifts (docs/benchmarks.md,
    section 1)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    torch.cuda._sleep(sleep_cycles)
    start.record()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host_us = (time.perf_counter() - t0) / calls * 1e6
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / calls, host_us
