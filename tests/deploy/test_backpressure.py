"""Backpressure: past max_queued_requests the service answers 503 at once instead of queueing
without bound, and every request it accepts is answered correctly. Real Ray Serve, in process."""

from __future__ import annotations

import concurrent.futures as cf
import io
import time
from collections.abc import Iterator

import numpy as np
import pytest

from tests.deploy.cluster import local_app, post_npy

PORT = 8011


@pytest.fixture(scope="module")
def app() -> Iterator[str]:
    # One bucket, batches of one, a tiny queue: a flood must overflow it.
    args = {
        "backend": "torch",
        "buckets": [2048],
        "batching": {"max_batch_tokens": 2048, "batch_wait_timeout_s": 0.0},
        "max_queued_requests": 2,
    }
    with local_app(args, PORT) as url:
        yield url


def _post(url: str, x: np.ndarray) -> tuple[int, float, bytes]:
    t0 = time.perf_counter()
    r = post_npy(url, x, timeout=120)
    return r.status_code, time.perf_counter() - t0, r.content


def test_flood_gets_fast_503s_and_correct_answers(app: str) -> None:
    x = np.random.default_rng(0).standard_normal((2048, 256)).astype(np.float32)
    with cf.ThreadPoolExecutor(24) as pool:
        results = list(pool.map(lambda _: _post(app, x), range(24)))
    codes = [c for c, _, _ in results]
    assert set(codes) <= {200, 503}, codes
    assert codes.count(503) >= 1, "no request was refused: the queue is unbounded"
    assert codes.count(200) >= 1
    ok = [np.load(io.BytesIO(b), allow_pickle=False) for c, _, b in results if c == 200]
    assert all(y.shape == x.shape and np.isfinite(y).all() for y in ok)
    assert all(np.array_equal(y, ok[0]) for y in ok)  # same input, same answer
    slowest_ok = max(t for c, t, _ in results if c == 200)
    refused = [t for c, t, _ in results if c == 503]
    assert max(refused) < slowest_ok, "a refusal waited as long as the accepted work"
    # Afterwards the service is healthy and serves normally.
    assert _post(app, x[:10])[0] == 200
