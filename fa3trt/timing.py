"""Device timing with CUDA events, for the replica's phase timings, the self-check and the benchmarks."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["timing_events", "time_cuda_ms"]


def timing_events(device: torch.device) -> tuple[torch.cuda.Event, torch.cuda.Event] | None:
    """A pair of CUDA timing events on ``device`` (to time work queued between their records),
    None off CUDA."""
    if device.type != "cuda":
        return None
    return torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)


def time_cuda_ms(fn: Callable[[], Any], *, warmup: int = 3, iters: int = 10, repeats: int = 5) -> float:
    """Median over ``repeats`` of the mean device time of ``iters`` back-to-back calls (ms)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / iters)
    return statistics.median(samples)
