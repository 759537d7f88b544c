"""A batch that fails is split and retried in halves: only the requests that fail on their own
fail, and the replica keeps serving.

The CPU test gives the replica's real torch backend a memory budget in tokens per batch (past
it the backend raises ``torch.OutOfMemoryError``, as CUDA's allocator does), so the policy is
checked in CI; ``test_gpu_oom.py`` provokes real CUDA out-of-memory errors on a GPU. Answers
are compared with the model run on each sequence alone.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from deploy.replica import ModelReplica
from fa3trt.errors import InvalidInputError
from tests.utils import TinyReference, as_requests, captured_log, rel_err

EDGE = 128


class TokenBudget:
    """The replica's backend, refusing batches of more than ``budget`` computed tokens."""

    def __init__(self, backend: Any, budget: int) -> None:
        self._backend = backend
        self.budget = budget
        self.batches: list[int] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)

    def run(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        x = batch["x"]
        self.batches.append(x.shape[0])
        if x.shape[0] * x.shape[1] > self.budget:
            raise torch.OutOfMemoryError(f"{x.shape[0] * x.shape[1]} tokens > budget {self.budget}")
        return self._backend.run(batch)


@pytest.fixture(scope="module")
def server() -> Any:
    return ModelReplica(
        {"model": {"preset": "tiny"}, "backend": "torch", "buckets": [64, EDGE]}, {"max_batch_tokens": 1024}
    )


def _want(tiny: TinyReference, x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(tiny(x))


def test_failed_batch_is_split_until_it_fits(server: Any, tiny: TinyReference) -> None:
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((int(n), 256)).astype(np.float32) for n in (128, 100, 90, 128, 70, 128, 110, 128)]
    real = server.backend
    server.backend = budget = TokenBudget(real, budget=2 * EDGE)
    try:
        with captured_log("ray.serve") as messages:
            ys = server._run_split(as_requests(server, xs), EDGE)
    finally:
        server.backend = real
    assert budget.batches[0] == 8 and max(b for b in budget.batches if b <= 2) == 2  # 8 -> 4 -> 2
    assert sum("retrying in halves" in m for m in messages) == 3  # one 8 and two 4s
    for x, y in zip(xs, ys):
        assert isinstance(y, np.ndarray) and y.shape == x.shape
        assert rel_err(torch.from_numpy(y), _want(tiny, x)) < 1e-4


def test_only_the_request_that_fails_alone_fails(server: Any, tiny: TinyReference) -> None:
    rng = np.random.default_rng(1)
    xs = [rng.standard_normal((int(n), 256)).astype(np.float32) for n in (40, 128, 60, 30)]
    failed_before = server.metrics.local[EDGE]["failed"]
    real = server.backend
    server.backend = TokenBudget(real, budget=100)  # the 128-token request never fits
    try:
        ys = server._run_split(as_requests(server, xs), EDGE)
    finally:
        server.backend = real
    assert isinstance(ys[1], RuntimeError) and "OutOfMemoryError" in str(ys[1])
    for i in (0, 2, 3):
        assert rel_err(torch.from_numpy(ys[i]), _want(tiny, xs[i])) < 1e-4
    assert server.metrics.local[EDGE]["failed"] == failed_before + 1
    # The replica keeps serving: the request that failed succeeds once memory allows.
    y = server._run_split(as_requests(server, [xs[1]]), EDGE)[0]
    assert rel_err(torch.from_numpy(y), _want(tiny, xs[1])) < 1e-4


def test_nonfinite_requests_are_refused_in_the_batch(server: Any, tiny: TinyReference) -> None:
    """NaN and Inf are checked on the assembled batch: the bad requests get InvalidInputError,
    the good ones batched with them the model's answer, and nothing is retried or failed."""
    rng = np.random.default_rng(2)
    xs = [rng.standard_normal((int(n), 256)).astype(np.float32) for n in (50, 128, 70, 90, 20)]
    xs[1][127, 255] = np.nan  # the last value: the check must cover whole rows
    xs[3][0, 0] = np.inf
    failed_before = server.metrics.local[EDGE]["failed"]
    with captured_log("ray.serve") as messages:
        ys = server._run_split(as_requests(server, xs), EDGE)
    for i in (1, 3):
        assert isinstance(ys[i], InvalidInputError) and "NaN or Inf" in str(ys[i]), ys[i]
    for i in (0, 2, 4):
        assert rel_err(torch.from_numpy(ys[i]), _want(tiny, xs[i])) < 1e-4
    assert server.metrics.local[EDGE]["failed"] == failed_before and not any("retrying" in m for m in messages)
    # Opted out, the same batch is computed as sent.
    server.args = server.args.model_copy(update={"reject_nonfinite": False})
    try:
        ys = server._run_split(as_requests(server, xs), EDGE)
    finally:
        server.args = server.args.model_copy(update={"reject_nonfinite": True})
    assert all(isinstance(y, np.ndarray) for y in ys) and np.isnan(ys[1]).any()
    assert rel_err(torch.from_numpy(ys[0]), _want(tiny, xs[0])) < 1e-4


def test_streams_per_bucket_only_on_a_gpu(server: Any) -> None:
    # A CPU replica has no streams to give its buckets; the setting defaults on and is validated.
    assert server.args.stream_per_bucket is True
    assert server._streams == [None, None]
    with pytest.raises(ValueError, match="stream_per_bucket"):
        ModelReplica({"model": {"preset": "tiny"}, "backend": "torch", "stream_per_bucket": "sometimes"})
