"""Shared test helpers: reusable markers, the relative-error metric, the tiny model's reference answers."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

gpu = pytest.mark.gpu
requires_tensorrt = pytest.mark.tensorrt
slow = pytest.mark.slow


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want|| in float64; NaN anywhere gives inf."""
    got, want = got.double(), want.double()
    if not torch.isfinite(got).all():
        return float("inf")
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


@contextlib.contextmanager
def captured_log(name: str, level: int = logging.WARNING) -> Iterator[list[str]]:
    """Messages of logger ``name`` within the block (Ray's loggers do not propagate to caplog)."""
    messages: list[str] = []

    class _List(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    logger, handler = logging.getLogger(name), _List(level)
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)


def as_requests(replica: Any, xs: list[np.ndarray]) -> list[Any]:
    """Single arrays as a replica queues them: checked against its model's signature, each
    answered in its own dtype (the single-array API's rule)."""
    from fa3trt.requests import check_request

    return [check_request(replica.signature, {"x": x}, replica.buckets, x.dtype) for x in xs]


class TinyReference:
    """The tiny reference model, eager and in float32 on the CPU: what the app's answers are
    compared against."""

    def __init__(self) -> None:
        import fa3trt

        self.model = fa3trt.build_model(fa3trt.ModelConfig.preset("tiny"))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Its answer to one sequence ``(seq, hidden)``, float32."""
        with torch.inference_mode():
            y: np.ndarray = self.model(torch.from_numpy(np.asarray(x, np.float32))[None])[0].numpy()
            return y
