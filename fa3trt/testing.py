"""Helpers for tests and benchmarks: the numerical reference, a queued device timer, and
row splitting. Public and documented; no serving path uses them.

- ``reference_attention``: plain softmax(QK^T/sqrt(d))V with a key-padding mask in float64, the
  reference every kernel is compared against.
- ``run_kernel``: one named kernel as the op runs it (what it lacks on the next in line), mode 0.
- ``time_queued``: device and host time per call of work queued behind a GPU sleep.
- ``split_rows``: each sequence's own rows of a padded batch.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from fa3trt.kernels.selector import kernel_for
from fa3trt.kernels.tail import zero_tail_

__all__ = ["reference_attention", "run_kernel", "time_queued", "split_rows"]


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_lens: torch.Tensor | None = None
) -> torch.Tensor:
    """Plain softmax(QK^T/sqrt(d))V over (B, S, H, D) with a key-padding mask, in float64 on the
    input's device, returned in q's dtype; rows past each length are zero."""
    b, s, h, d = q.shape
    qd, kd, vd = (t.double().transpose(1, 2) for t in (q, k, v))
    scores = qd @ kd.transpose(-1, -2) / d**0.5
    if seq_lens is not None:
        keep = torch.arange(s, device=q.device)[None, :] < seq_lens.to(q.device)[:, None]
        scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
    out = (scores.softmax(-1) @ vd).transpose(1, 2)
    if seq_lens is not None:
        out = torch.nan_to_num(out)  # a zero-length sequence has no keys at all
        out = zero_tail_(out.contiguous(), seq_lens, method="masked_fill")
    return out.to(q.dtype)


def run_kernel(
    name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_lens: torch.Tensor | None = None
) -> torch.Tensor:
    """The kernel called ``name`` on (B, S, H, D) inputs as the op runs it when it is chosen: a
    dtype or head dim it lacks runs on the next kernel in line. No validation, mode 0."""
    return kernel_for(name, q.device, q.dtype, q.shape[-1]).forward(q, k, v, seq_lens)


def split_rows(y: torch.Tensor, seq_lens: Sequence[int] | torch.Tensor) -> list[torch.Tensor]:
    """Each sequence's own rows of a padded (B, L, D) output (views)."""
    lens = seq_lens.tolist() if isinstance(seq_lens, torch.Tensor) else list(seq_lens)
    return [y[i, :n] for i, n in enumerate(lens)]


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
