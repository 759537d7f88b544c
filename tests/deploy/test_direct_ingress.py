"""HTTP without the proxy hop: with Ray Serve's direct ingress on (RAY_SERVE_ENABLE_DIRECT_INGRESS=1
where Ray starts), each replica of the app serves its routes on a port of its own, Serve's REST
API lists those ports, and the load generator finds and uses them. On a real `ray start` cluster
with `serve run serve_config.yaml`, no mocks."""

from __future__ import annotations

import io
import sys
from collections.abc import Iterator

import numpy as np
import pytest
import requests
import torch

import fa3trt
from deploy.targets import replica_targets
from tests.deploy.cluster import URL, post_npy, run, serve_cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    with serve_cluster(tmp_path_factory.mktemp("direct"), {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1"}) as env:
        yield env


def test_replicas_answer_on_their_own_ports(cluster: dict[str, str]) -> None:
    # serve_config.yaml binds HTTP to the loopback, so the listed node IP is replaced by it.
    urls = replica_targets("http://127.0.0.1:8265", "fa3trt", host="127.0.0.1", token=cluster["RAY_AUTH_TOKEN"])
    assert len(urls) == 1 and urls[0] != URL and 30000 <= int(urls[0].rsplit(":", 1)[1]) <= 31000, urls
    model = fa3trt.build_model(fa3trt.ModelConfig.preset("tiny"))
    x = np.random.default_rng(0).standard_normal((37, 256)).astype(np.float32)
    r = post_npy(urls[0], x)
    assert r.status_code == 200, r.text
    with torch.inference_mode():
        want = model(torch.from_numpy(x)[None])[0].numpy()
    np.testing.assert_allclose(np.load(io.BytesIO(r.content)), want, atol=1e-4)
    info = requests.get(f"{urls[0]}/v1/info", timeout=30).json()
    assert info["replica"] == r.headers["x-fa3trt-replica"]
    # The proxy still serves the same app.
    assert requests.get(f"{URL}/v1/info", timeout=30).status_code == 200


def test_load_generator_sends_to_the_replicas(cluster: dict[str, str]) -> None:
    r = run(
        [
            sys.executable,
            "-m",
            "bench.serve_load",
            "--direct",
            "--target-host",
            "127.0.0.1",
            "--requests",
            "12",
            "--concurrency",
            "4",
            "--mix",
            "64-300",
        ],
        cluster,
        timeout=180,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "direct ingress: 1 replica(s): http://127.0.0.1:30" in r.stdout
    assert " 12 req   0 err" in r.stdout, r.stdout


def test_an_app_without_targets_is_a_clear_error(cluster: dict[str, str]) -> None:
    with pytest.raises(
        RuntimeError, match="no direct-ingress HTTP targets for app 'nope'.*RAY_SERVE_ENABLE_DIRECT_INGRESS=1"
    ):
        replica_targets("http://127.0.0.1:8265", "nope", token=cluster["RAY_AUTH_TOKEN"])
