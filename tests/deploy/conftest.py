"""Fixtures the deploy tests share."""

from __future__ import annotations

import pytest

from tests.utils import TinyReference


@pytest.fixture(scope="session")
def tiny() -> TinyReference:
    """The tiny reference model's answers, eager in float32 (built once per session)."""
    return TinyReference()
