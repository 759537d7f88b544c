"""Markers: `gpu` needs CUDA, `tensorrt` needs TensorRT, `slow` runs with FA3TRT_SLOW=1.

Tests that need a missing thing are skipped, never faked.
"""

from __future__ import annotations

import os

import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    from fa3trt import tensorrt_available

    has_gpu = torch.cuda.is_available()
    has_trt = tensorrt_available()
    slow = os.environ.get("FA3TRT_SLOW") == "1"
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        if "tensorrt" in item.keywords and not has_trt:
            item.add_marker(pytest.mark.skip(reason="needs TensorRT"))
        if "slow" in item.keywords and not slow:
            item.add_marker(pytest.mark.skip(reason="slow: set FA3TRT_SLOW=1"))
