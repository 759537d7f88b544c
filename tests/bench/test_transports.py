"""The transports benchmark: its summary arithmetic, and one whole run on a real local cluster
with direct ingress on (tiny model, CPU): every transport answers, each pass records its clients'
CPU time, the identity twin is deployed beside the app, measured and removed, and the floor server
answers the same clients."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import requests

from bench.serve_load import http_sender, v2_grpc_sender, v2_http_sender
from bench.transport_floor import FLOOR_MODEL, FloorServer
from bench.transports import FLOOR_TRANSPORTS, TRANSPORTS, client_cpu, summarize
from tests.deploy.isolated import isolated_serve_cluster


def test_summary_against_the_handle_path() -> None:
    load = {"handle": {"rps": 100.0, "requests": 10}, "v1-http": {"rps": 60.0, "requests": 6}}
    load["v2-http-direct"] = {"rps": 85.0, "requests": 8}
    load["v2-grpc"] = {"rps": 0.0, "requests": 0}  # a pass that answered nothing is no candidate
    batch1 = {"handle": {"p50_ms": 20.0}, "v1-http": {"p50_ms": 30.0}, "v2-http-direct": {"p50_ms": 22.0}}
    s = summarize(load, batch1)
    assert s["best_network"] == "v2-http-direct" and s["best_network_over_handle"] == pytest.approx(0.85)
    assert s["rps_over_handle"] == pytest.approx({"v1-http": 0.6, "v2-http-direct": 0.85})
    assert s["batch1_p50_over_handle"] == pytest.approx({"v1-http": 1.5, "v2-http-direct": 1.1})
    assert summarize({"v1-http": load["v1-http"]}, {}) == {}  # no handle pass: no ratios


def test_client_cpu_is_cpu_time_over_wall_time() -> None:
    parts = [{"cpu_s": 3.0, "wall_s": 4.0}, {"cpu_s": 1.0, "wall_s": 4.0}, {"cpu_s": 0.0, "wall_s": 0.0}]
    assert client_cpu(parts) == pytest.approx({"max": 0.75, "mean": 0.5})


def test_floor_server_echoes_through_every_client() -> None:
    """The bare server answers /v1 (.npy), v2 HTTP and v2 gRPC, from the clients the benchmark
    uses, with the request's own tensor, exactly (FP16 and FP32)."""
    import aiohttp
    from tritonclient.grpc.aio import InferenceServerClient as GrpcClient
    from tritonclient.http.aio import InferenceServerClient as HttpClient

    async def go() -> None:
        server = FloorServer()
        addr = await server.start()
        http, grpc = HttpClient(addr["http"].removeprefix("http://")), GrpcClient(addr["grpc"])
        try:
            async with aiohttp.ClientSession() as session:
                sends = [http_sender(addr["http"], session), v2_http_sender([http], FLOOR_MODEL)]
                sends.append(v2_grpc_sender([grpc], FLOOR_MODEL))
                rng = np.random.default_rng(0)
                for dtype in (np.float16, np.float32):
                    x = rng.standard_normal((37, 24)).astype(dtype)
                    for send in sends:
                        y = await send(x)
                        assert y.dtype == x.dtype and np.array_equal(y, x)
        finally:
            await http.close()
            await grpc.close()
            await server.stop()

    asyncio.run(go())


def test_every_transport_in_one_run(tmp_path: Path) -> None:
    # One CPU for the app's replica, one for its identity twin.
    args = {"replica_cpus": 1, "buckets": [64, 256]}
    env = {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1"}
    with isolated_serve_cluster(tmp_path, args, num_cpus=2, extra_env=env) as c:
        cmd = [sys.executable, "-m", "bench.transports", "--url", c.http, "--grpc-url", c.grpc]
        cmd += ["--dashboard", c.dashboard, "--clients", "2", "--concurrency", "4", "--duration", "3"]
        cmd += ["--warmup", "1", "--batch1-requests", "4", "--mix", "16-200", "--dtype", "float32"]
        cmd += ["--out", str(tmp_path), "--name", "t"]
        r = subprocess.run(cmd, env=c.env, capture_output=True, text=True, timeout=480)
        assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
        # The twin is gone again; the app still answers.
        apps = requests.get(
            f"{c.dashboard}/api/serve/applications/",
            timeout=30,
            headers={"Authorization": f"Bearer {c.env['RAY_AUTH_TOKEN']}"},
        ).json()
        assert set(apps["applications"]) == {"fa3trt"}
    out = json.loads((tmp_path / "t.json").read_text())
    assert (tmp_path / "t.png").stat().st_size > 0
    for phase in ("model", "identity"):
        load, batch1 = out[phase]["load"], out[phase]["batch1"]
        assert set(load) == set(TRANSPORTS) and set(batch1) == set(TRANSPORTS)
        for t in TRANSPORTS:
            assert load[t]["errors"] == 0 and load[t]["requests"] > 0, (phase, t, load[t]["first_error"])
            assert load[t]["clients"] == 2 and 0 < load[t]["client_cpu"]["max"] <= 1.5
            assert batch1[t]["requests"] == 4 and batch1[t]["errors"] == 0
            assert load[t]["replicas"] and load[t]["replicas"][0]["requests"] > 0
        assert out[phase]["summary"]["best_network_over_handle"] > 0
    floor = out["floor"]["batch1"]
    assert set(floor) == set(FLOOR_TRANSPORTS)
    assert all(b["requests"] == 4 and b["errors"] == 0 for b in floor.values()), floor
    assert "floor: batch-1 p50" in r.stdout
    assert out["info"]["backend"] == "torch"
    assert "best network path" in r.stdout and "batch-1 p50" in r.stdout
