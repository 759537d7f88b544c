"""A request past ``request_timeout_s`` is answered 504 and leaves its batch queue: the batch that
runs later does not carry it, and the requests around it are answered correctly. Real Ray
Serve, in process, tiny model on the CPU."""

from __future__ import annotations

import concurrent.futures as cf
import io
import time
from collections.abc import Iterator

import numpy as np
import pytest
import requests
import torch

import fa3trt
from tests.deploy.cluster import local_app, post_npy

PORT = 8013
TIMEOUT_S = 1.0
WAIT_S = 4.0  # the slow bucket waits this long to fill a batch: longer than the timeout


@pytest.fixture(scope="module")
def app() -> Iterator[str]:
    args = {
        "backend": "torch",
        "buckets": [64, 256],
        "request_timeout_s": TIMEOUT_S,
        "batching": {
            "max_batch_tokens": 4096,
            "batch_wait_timeout_s": 0.0,
            "bucket_overrides": {256: {"batch_wait_timeout_s": WAIT_S}},
        },
    }
    with local_app(args, PORT) as url:
        yield url


def _post(url: str, x: np.ndarray) -> tuple[int, float, requests.Response]:
    t0 = time.perf_counter()
    r = post_npy(url, x)
    return r.status_code, time.perf_counter() - t0, r


def test_timed_out_request_gets_504_and_leaves_its_batch(app: str) -> None:
    model = fa3trt.build_model(fa3trt.ModelConfig.preset("tiny"))
    rng = np.random.default_rng(0)
    slow = rng.standard_normal((200, 256)).astype(np.float32)  # bucket 256: waits WAIT_S for company
    fast = [rng.standard_normal((int(n), 256)).astype(np.float32) for n in (10, 40, 64)]
    before = requests.get(f"{app}/v1/stats", timeout=30).json()["buckets"]["256"]
    with cf.ThreadPoolExecutor(4) as pool:
        slow_f = pool.submit(_post, app, slow)
        fast_rs = list(pool.map(lambda x: _post(app, x), fast))
        code, took, r = slow_f.result()
    assert code == 504, r.text
    assert "timed out after 1.0s" in r.json()["error"]
    assert TIMEOUT_S * 0.9 < took < WAIT_S, f"answered after {took:.2f}s"
    # The good requests around it: answered, and right (a reference run of the same model).
    for x, (c, _, resp) in zip(fast, fast_rs):
        assert c == 200, resp.text
        with torch.inference_mode():
            want = model(torch.from_numpy(x)[None])[0].numpy()
        np.testing.assert_allclose(np.load(io.BytesIO(resp.content)), want, atol=1e-4)
    # The cancelled request never ran: once its batch window has passed, the slow bucket has
    # run no batch for it.
    time.sleep(WAIT_S + 1.0)
    after = requests.get(f"{app}/v1/stats", timeout=30).json()["buckets"]["256"]
    assert after["requests"] == before["requests"], (before, after)
    # The app goes on serving.
    assert _post(app, fast[0])[0] == 200
