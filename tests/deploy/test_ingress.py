"""Ingress processes (``ingress_replicas: 2``): `serve run serve_config.yaml` on a real local Ray
cluster with direct ingress on. Two CPU ingress replicas take /v1, KServe v2 HTTP and gRPC, and
hand each request to the model replica by handle. Answers are compared with the PyTorch model
called directly; a bad request gets the same error as without ingress replicas."""

from __future__ import annotations

import io
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from deploy.targets import PROTOCOLS, replica_targets
from tests.deploy.isolated import Cluster, isolated_serve_cluster
from tests.utils import TinyReference

HIDDEN = 256


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    args = {"ingress_replicas": 2, "replica_cpus": 1}
    env = {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1"}
    with isolated_serve_cluster(tmp_path_factory.mktemp("ingress"), args, num_cpus=3, extra_env=env) as c:
        # The app answers once one ingress replica is up; wait for both to list their ports.
        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                both = [
                    replica_targets(c.dashboard, "fa3trt", p, "127.0.0.1", c.env["RAY_AUTH_TOKEN"]) for p in PROTOCOLS
                ]
            except RuntimeError:  # none listed yet
                both = []
            if both and all(len(t) == 2 for t in both):
                break
            time.sleep(1)
        yield c


def test_v1_through_the_proxy_and_each_ingress_replica(cluster: Cluster, tiny: TinyReference) -> None:
    x = np.random.default_rng(0).standard_normal((37, HIDDEN)).astype(np.float32)
    urls = replica_targets(cluster.dashboard, "fa3trt", "HTTP", "127.0.0.1", cluster.env["RAY_AUTH_TOKEN"])
    assert len(urls) == 2  # the ingress replicas listen; the model replica does not
    seen = set()
    for url in [cluster.http, *urls]:
        buf = io.BytesIO()
        np.save(buf, x)
        r = requests.post(f"{url}/v1/infer", data=buf.getvalue(), headers={"content-type": "application/x-npy"})
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(np.load(io.BytesIO(r.content)), tiny(x), atol=1e-4)
        info = requests.get(f"{url}/v1/info", timeout=30).json()
        assert info["backend"] == "torch" and info["buckets"] and "ingress_replica" in info
        seen.add(info["ingress_replica"])
    assert len(seen) == 2
    stats = requests.get(f"{urls[0]}/v1/stats", timeout=30).json()
    assert sum(b["requests"] for b in stats["buckets"].values()) >= 3  # the model replica's counters
    # A bad request: the model replica's check, the same 422 and message.
    bad = requests.post(f"{urls[1]}/v1/infer", json={"x": [[0.0] * 7]}, timeout=30)
    assert bad.status_code == 422 and "256" in bad.json()["error"], bad.text
    assert "Traceback" not in bad.text and "ray::" not in bad.text  # the model replica's message, unwrapped


def test_kserve_v2_over_http_and_grpc(cluster: Cluster, tiny: TinyReference) -> None:
    x = np.random.default_rng(1).standard_normal((2, 20, HIDDEN)).astype(np.float16)
    grpc_direct = replica_targets(cluster.dashboard, "fa3trt", "gRPC", "127.0.0.1", cluster.env["RAY_AUTH_TOKEN"])
    assert len(grpc_direct) == 2
    for c in (
        httpclient.InferenceServerClient(cluster.http.removeprefix("http://")),
        grpcclient.InferenceServerClient(cluster.grpc),
        grpcclient.InferenceServerClient(grpc_direct[0]),
    ):
        assert c.is_model_ready("fa3trt")
        meta = c.get_model_metadata("fa3trt")
        platform = meta["platform"] if isinstance(meta, dict) else meta.platform
        assert platform == "fa3trt_torch"
        client_mod = httpclient if isinstance(c, httpclient.InferenceServerClient) else grpcclient
        t = client_mod.InferInput("x", list(x.shape), "FP16")
        t.set_data_from_numpy(x)
        y = c.infer("fa3trt", [t]).as_numpy("y")
        assert y.dtype == np.float16 and y.shape == x.shape
        for i in range(2):
            np.testing.assert_allclose(y[i].astype(np.float32), tiny(x[i]), atol=2e-3, rtol=1e-3)
        wrong = client_mod.InferInput("x", [1, 4, 7], "FP32")
        wrong.set_data_from_numpy(np.zeros((1, 4, 7), np.float32))
        with pytest.raises(InferenceServerException, match="shape") as err:
            c.infer("fa3trt", [wrong])
        assert "Traceback" not in str(err.value)


def test_handle_calls_go_through_an_ingress_replica(cluster: Cluster, tiny: TinyReference, tmp_path: Path) -> None:
    x = np.random.default_rng(2).standard_normal((11, HIDDEN)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    code = (
        "import numpy as np, ray; from ray import serve; ray.init(address='auto', logging_level='ERROR'); "
        f"y = serve.get_app_handle('fa3trt').infer.remote(np.load('{tmp_path / 'x.npy'}')).result(); "
        f"np.save('{tmp_path / 'y.npy'}', y)"
    )
    r = subprocess.run([sys.executable, "-c", code], env=cluster.env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), tiny(x), atol=1e-4)
