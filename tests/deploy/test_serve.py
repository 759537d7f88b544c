"""End to end on a real local Ray cluster: `serve run serve_config.yaml` as a subprocess, HTTP
and handle clients in other processes. No mocks.

Numbers are compared with the PyTorch model called directly; fp32 on the CPU, so the only
difference is summation order in batched vs single GEMMs (tolerance 1e-4 abs).
"""

from __future__ import annotations

import concurrent.futures as cf
import io
import shutil
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
import yaml

from deploy.lag import lag_delta
from tests.deploy.cluster import ROOT, URL, post_npy, run, serve_cluster
from tests.utils import TinyReference

ATOL = 1e-4


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    with serve_cluster(tmp_path_factory.mktemp("serve")) as env:
        yield env


def _post_npy(x: np.ndarray) -> requests.Response:
    return post_npy(URL, x)


def test_http_npy_and_json_match_the_model(cluster: dict[str, str], tiny: TinyReference) -> None:
    rng = np.random.default_rng(1)
    for n in (1, 77, 128, 129, 600, 2048):
        x = rng.standard_normal((n, 256)).astype(np.float32)
        r = _post_npy(x)
        assert r.status_code == 200, r.text
        y = np.load(io.BytesIO(r.content), allow_pickle=False)
        assert y.shape == x.shape and y.dtype == x.dtype
        np.testing.assert_allclose(y, tiny(x), atol=ATOL)
    x64 = rng.standard_normal((5, 256))
    y64 = np.load(io.BytesIO(_post_npy(x64).content))
    assert y64.dtype == np.float64
    xj = rng.standard_normal((3, 256)).astype(np.float32)
    r = requests.post(f"{URL}/v1/infer", json={"x": xj.tolist()}, timeout=60)
    assert r.status_code == 200
    np.testing.assert_allclose(np.array(r.json()["y"]), tiny(xj), atol=ATOL)


def test_info(cluster: dict[str, str]) -> None:
    info = requests.get(f"{URL}/v1/info", timeout=30).json()
    assert info["backend"] == "torch" and info["buckets"] == [128, 512, 2048]
    assert info["signature"]["inputs"][0]["axes"] == ["S", 256] and info["device"] == "cpu"
    assert info["model"]["spec"] == "fa3trt tiny (2 layers, 256 wide) float32" and info["routing"] is None


def test_client_errors_do_not_hurt_good_requests(cluster: dict[str, str], tiny: TinyReference) -> None:
    rng = np.random.default_rng(2)
    good = [rng.standard_normal((int(n), 256)).astype(np.float32) for n in rng.integers(1, 128, 12)]
    bad = [
        (np.zeros((3, 100), np.float32), 422),
        (np.zeros((3000, 256), np.float32), 422),
        (np.full((3, 256), np.nan, np.float32), 422),
        (np.zeros((3, 256), np.complex64), 422),  # (integers are numbers: they are taken as floats)
    ]

    def send(item: tuple[str, object]) -> tuple[str, requests.Response]:
        kind, x = item
        return kind, _post_npy(x)  # type: ignore[arg-type]

    items = [("good", x) for x in good] + [("bad", x) for x, _ in bad]
    rng.shuffle(items)  # type: ignore[arg-type]
    with cf.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(send, items))
    goods = iter(x for k, x in items if k == "good")
    for (kind, r), (_, x) in zip(results, items):
        if kind == "good":
            assert r.status_code == 200, r.text
            np.testing.assert_allclose(np.load(io.BytesIO(r.content)), tiny(x), atol=ATOL)  # type: ignore[arg-type]
        else:
            assert r.status_code == 422, r.text
    del goods
    # Unparseable bodies and protocol errors.
    assert (
        requests.post(
            f"{URL}/v1/infer", data=b"{oops", headers={"content-type": "application/json"}, timeout=30
        ).status_code
        == 400
    )
    assert (
        requests.post(f"{URL}/v1/infer", data=b"abc", headers={"content-type": "text/plain"}, timeout=30).status_code
        == 415
    )
    assert requests.get(f"{URL}/v1/nope", timeout=30).status_code == 404
    big = b"\x93NUMPY" + b"0" * (64 << 20)
    assert (
        requests.post(
            f"{URL}/v1/infer", data=big, headers={"content-type": "application/x-npy"}, timeout=60
        ).status_code
        == 413
    )
    assert requests.get(f"{URL}/v1/info", timeout=30).status_code == 200  # still healthy


def test_concurrent_requests_batch_within_buckets(cluster: dict[str, str], tiny: TinyReference) -> None:
    stats0 = requests.get(f"{URL}/v1/stats", timeout=30).json()
    before = stats0["buckets"]
    rng = np.random.default_rng(3)
    small = [rng.standard_normal((int(n), 256)).astype(np.float32) for n in rng.integers(60, 128, 48)]
    mid = [rng.standard_normal((int(n), 256)).astype(np.float32) for n in rng.integers(300, 512, 8)]
    with cf.ThreadPoolExecutor(32) as pool:
        rs = list(pool.map(_post_npy, small + mid))
    for x, r in zip(small + mid, rs):
        assert r.status_code == 200
        np.testing.assert_allclose(np.load(io.BytesIO(r.content)), tiny(x), atol=ATOL)
    stats1 = requests.get(f"{URL}/v1/stats", timeout=30).json()
    after = stats1["buckets"]
    d = {e: {k: after[e][k] - before[e][k] for k in ("requests", "tokens")} for e in after}
    # Where the batches' time went: every batch timed, each phase within its batches' compute time.
    p0, p1 = stats0["phases_s"], stats1["phases_s"]
    n = p1["batches"] - p0["batches"]
    assert n == sum(after[e]["batches"] - before[e]["batches"] for e in after) > 0
    compute = sum(after[e]["compute_s"] - before[e]["compute_s"] for e in after)
    phases = {k: p1[k] - p0[k] for k in ("assemble", "model", "launch", "gpu", "answers")}
    assert phases["assemble"] > 0 and phases["model"] > 0 and phases["answers"] >= 0, phases
    assert 0 <= phases["gpu"] <= phases["model"], phases  # 0 on a CPU replica
    assert 0 < phases["launch"] <= phases["model"], phases  # on a CPU replica nearly all of it
    assert phases["assemble"] + phases["model"] + phases["answers"] <= compute, (phases, compute)
    # The replica's wake-up lag probe ran through the load (deploy.lag).
    lag = lag_delta(stats0["wake_lag"], stats1["wake_lag"])
    assert lag is not None and lag["samples"] > 0 and lag["mean_ms"] >= 0, lag
    # Never mixed across buckets: each bucket saw exactly its own requests and tokens.
    assert d["128"] == {"requests": 48, "tokens": sum(len(x) for x in small)}
    assert d["512"] == {"requests": 8, "tokens": sum(len(x) for x in mid)}
    assert after["128"]["max_batch"] > 1, after


def test_handle_from_another_ray_job(cluster: dict[str, str], tiny: TinyReference, tmp_path: Path) -> None:
    """examples/handle_client.py reads the model's inputs from the app and sends dicts."""
    out = tmp_path / "handle.npz"
    r = run([sys.executable, "examples/handle_client.py", "--save", str(out)], cluster, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "-> y (300, 256) float32" in r.stdout, r.stdout
    data = np.load(out, allow_pickle=False)
    for i in range(3):
        np.testing.assert_allclose(data[f"out{i}_y"], tiny(data[f"in{i}_x"]), atol=ATOL)


def test_handle_takes_arrays_and_tensors(cluster: dict[str, str], tiny: TinyReference, tmp_path: Path) -> None:
    """The reference model's own handle calls: a NumPy array, a bfloat16 CPU tensor (answered in its type)."""
    script = tmp_path / "client.py"
    script.write_text(
        textwrap.dedent(
            """
            import sys, numpy as np, ray, torch
            from ray import serve
            ray.init(address="auto", logging_level="WARNING")
            h = serve.get_app_handle("fa3trt")
            x = np.random.default_rng(0).standard_normal((7, 256)).astype(np.float32)
            y = h.infer.remote(x).result()
            yt = h.infer.remote(torch.from_numpy(x).to(torch.bfloat16)).result()
            print(type(yt).__name__, tuple(yt.shape), yt.dtype)
            yd = h.infer.remote({"x": torch.from_numpy(x).to(torch.bfloat16)}).result()["y"]  # by name
            print("named", type(yd).__name__, yd.shape, yd.dtype)
            np.savez(sys.argv[1], x=x, y=y, yt=yt.float().numpy(), yd=yd)
            """
        )
    )
    r = run([sys.executable, str(script), str(tmp_path / "out.npz")], cluster, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Tensor (7, 256) torch.bfloat16" in r.stdout and "named ndarray (7, 256) float32" in r.stdout
    data = np.load(tmp_path / "out.npz", allow_pickle=False)
    np.testing.assert_allclose(data["y"], tiny(data["x"]), atol=ATOL)
    # bf16 input: the reply is computed from the bf16-rounded input and rounded to bf16.
    xb = torch.from_numpy(data["x"]).to(torch.bfloat16).float().numpy()
    np.testing.assert_allclose(data["yt"], tiny(xb), atol=0.05)
    np.testing.assert_allclose(data["yd"], tiny(xb), atol=1e-4)  # the bf16 values, computed in float32


def test_reconfigure_changes_batching_live(cluster: dict[str, str], tmp_path: Path) -> None:
    replica = requests.get(f"{URL}/v1/info", timeout=30).json()["replica"]
    cfg = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    # Live changes go through the deployment's user_config (changing the app's args is a new
    # code version for Serve, which restarts every replica).
    batching = dict(cfg["applications"][0]["args"]["batching"], bucket_overrides={128: {"max_batch_size": 1}})
    cfg["applications"][0]["deployments"] = [{"name": "ModelServer", "user_config": batching}]
    path = tmp_path / "reconf.yaml"
    path.write_text(yaml.safe_dump(cfg))
    r = run([shutil.which("serve") or "serve", "deploy", str(path)], cluster)
    assert r.returncode == 0, r.stderr
    t0 = time.time()
    while time.time() - t0 < 60:
        info = requests.get(f"{URL}/v1/info", timeout=30).json()
        if info["batch_limits"]["128"] == 1:
            break
        time.sleep(1)
    assert info["batch_limits"]["128"] == 1
    assert info["replica"] == replica, "a user_config change must not restart the replica"
    before = requests.get(f"{URL}/v1/stats", timeout=30).json()["buckets"]["128"]
    xs = [np.random.rand(50, 256).astype(np.float32) for _ in range(16)]
    with cf.ThreadPoolExecutor(16) as pool:
        assert all(r.status_code == 200 for r in pool.map(_post_npy, xs))
    after = requests.get(f"{URL}/v1/stats", timeout=30).json()["buckets"]["128"]
    assert after["batches"] - before["batches"] == 16  # batch size 1 now


KILL = textwrap.dedent(
    """
    import ray
    ray.init(address="auto", logging_level="WARNING")
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "ModelServer" in a["name"]]
    assert names, "no ModelServer replica actor found"
    ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
    print("killed", names[0])
    """
)


def test_replica_killed_is_replaced_and_keeps_serving(cluster: dict[str, str], tiny: TinyReference) -> None:
    old = requests.get(f"{URL}/v1/info", timeout=30).json()["replica"]
    r = run([sys.executable, "-c", KILL], cluster)
    assert r.returncode == 0 and "killed" in r.stdout, r.stderr
    x = np.random.rand(20, 256).astype(np.float32)
    t0, ok = time.time(), False
    while time.time() - t0 < 120:
        try:
            resp = _post_npy(x)
        except requests.RequestException:
            resp = None
        if resp is not None and resp.status_code == 200:
            np.testing.assert_allclose(np.load(io.BytesIO(resp.content)), tiny(x), atol=ATOL)
            if resp.headers["x-fa3trt-replica"] != old:
                ok = True
                break
        time.sleep(1)
    assert ok, "no new replica answered within 120 s"
