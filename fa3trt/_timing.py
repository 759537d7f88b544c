"""Device timing shared by the self-check and the benchmarks: CUDA events, warm-up first."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch


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


def time_queued(fn: Callable[[], Any], *, calls: int = 20, sleep_cycles: int = 100_000_000) -> tuple[float, float]:
    """(device ms per call, host µs per call) of ``calls`` back-to-back calls queued behind a
    GPU sleep (~50 ms at 2 GHz): the host issues them all before the GPU reaches the first, so
    the device time holds no gap the host left, and the host time no wait for the device.
    Kernel rates measured this way hold steady across rounds (±0.5%) where back-to-back
    timing from an idle queue drifts by up to ~10% between runs (docs/benchmarks.md, section 1)."""
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
