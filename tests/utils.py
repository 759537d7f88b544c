"""Shared test helpers: reusable markers and the relative-error metric."""

from __future__ import annotations

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
