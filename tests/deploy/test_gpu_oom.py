"""GPU proof: CUDA out of memory on a batch. The card's memory is filled (a real allocation)
until a batch of eight 4096-token requests no longer fits but two do; the replica splits the
batch and every request gets the right answer. With memory for none of them, only those
requests fail, and once memory is free again the replica serves normally. The seed preset
(4096 wide, bf16), one layer; answers compared with the model run on each sequence alone.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

import fa3trt
from deploy.replica import ModelReplica
from fa3trt.errors import InvalidInputError
from tests.utils import as_requests, captured_log, gpu, rel_err

pytestmark = gpu

EDGE = 4096


@pytest.fixture(scope="module")
def setup() -> tuple[Any, torch.nn.Module, list[np.ndarray]]:
    server = ModelReplica(
        {"model": {"preset": "seed", "layers": 1}, "backend": "torch", "buckets": [EDGE]},
        {"max_batch_tokens": 8 * EDGE},
    )
    assert server.backend.device.type == "cuda"
    model = fa3trt.build_model(fa3trt.ModelConfig.preset("seed", layers=1), device="cuda")
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((EDGE - 97 * i, 4096)).astype(np.float16) for i in range(8)]
    return server, model, xs


def _want(model: torch.nn.Module, x: np.ndarray) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.from_numpy(x).cuda().bfloat16()[None])[0].float().cpu()


def _fill_leaving(nbytes: int) -> torch.Tensor:
    """Allocate all free device memory but ``nbytes`` (the caching allocator emptied first)."""
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info()
    return torch.empty(max(0, free - nbytes), dtype=torch.uint8, device="cuda")


def _warm(server: Any, xs: list[np.ndarray]) -> None:
    """Run every batch the split can produce, twice, with memory to spare: kernels, cuDNN plans
    and library workspaces (some allocated outside PyTorch) all exist before memory runs out."""
    spans = [(i, i + n) for n in (8, 4, 2, 1) for i in range(0, len(xs), n)]
    for _ in range(2):
        for a, b in spans:
            assert all(isinstance(y, np.ndarray) for y in server._run_split(as_requests(server, xs[a:b]), EDGE))


def _single_request_bytes(server: Any, x: np.ndarray) -> int:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    server._run_split(as_requests(server, [x]), EDGE)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def test_oom_batch_is_split_and_every_request_answered(setup: tuple[Any, torch.nn.Module, list[np.ndarray]]) -> None:
    server, model, xs = setup
    want = [_want(model, x) for x in xs]
    _warm(server, xs)
    need = _single_request_bytes(server, xs[0])
    filler = _fill_leaving(3 * need + (256 << 20))  # room for two requests, not four or eight
    try:
        with captured_log("ray.serve") as messages:
            ys = server._run_split(as_requests(server, xs), EDGE)
    finally:
        del filler
        torch.cuda.empty_cache()
    assert any("out of memory" in m.lower() and "retrying in halves" in m for m in messages), messages
    for y, w in zip(ys, want):
        assert isinstance(y, np.ndarray), y
        assert rel_err(torch.from_numpy(y.astype(np.float32)), w) < 2e-2
    assert server.metrics.local[EDGE]["failed"] == 0


def test_requests_that_cannot_fit_fail_alone_and_the_replica_recovers(
    setup: tuple[Any, torch.nn.Module, list[np.ndarray]],
) -> None:
    server, model, xs = setup
    failed = server.metrics.local[EDGE]["failed"]
    filler = _fill_leaving(8 << 20)  # room for no request at all
    try:
        ys = server._run_split(as_requests(server, xs[:2]), EDGE)
    finally:
        del filler
        torch.cuda.empty_cache()
    assert all(isinstance(y, RuntimeError) and "OutOfMemoryError" in str(y) for y in ys), ys
    assert server.metrics.local[EDGE]["failed"] == failed + 2
    ys = server._run_split(as_requests(server, xs[:4]), EDGE)
    for x, y in zip(xs[:4], ys):
        assert rel_err(torch.from_numpy(y.astype(np.float32)), _want(model, x)) < 2e-2


def test_nonfinite_rows_are_refused_in_the_batch_on_the_gpu(
    setup: tuple[Any, torch.nn.Module, list[np.ndarray]],
) -> None:
    """NaN and Inf are found on the device, in the float16 -> bfloat16 batch; the bad requests
    get InvalidInputError and the good ones batched with them the model's answer."""
    server, model, xs = setup
    bad_nan, bad_inf = xs[1].copy(), xs[2].copy()
    bad_nan[-1, 4095] = np.nan  # the last value of the row: a reduction must reach it
    bad_inf[0, 0] = -np.inf
    batch = [xs[0], bad_nan, bad_inf, xs[3]]
    ys = server._run_split(as_requests(server, batch), EDGE)
    for i in (1, 2):
        assert isinstance(ys[i], InvalidInputError) and "NaN or Inf" in str(ys[i]) and "bfloat16" in str(ys[i])
    for i in (0, 3):
        assert rel_err(torch.from_numpy(ys[i].astype(np.float32)), _want(model, batch[i])) < 2e-2
