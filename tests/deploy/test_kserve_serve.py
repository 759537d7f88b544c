"""KServe v2 end to end: `serve run serve_config.yaml` on a real local Ray cluster, called by the
unmodified `tritonclient` over HTTP and gRPC. Answers are compared with the PyTorch model called
directly (fp32: 1e-4 abs; fp16 answers: the rounding of a half)."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import json
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc
from tritonclient.utils import InferenceServerException

from tests.deploy.isolated import Cluster, isolated_serve_cluster
from tests.utils import TinyReference

ATOL = 1e-4
HIDDEN = 256
MAX_BODY = 8 << 20


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with isolated_serve_cluster(tmp_path_factory.mktemp("kserve"), {"max_body_bytes": MAX_BODY}) as c:
        yield c


def _expect(tiny: TinyReference, x: np.ndarray) -> np.ndarray:
    """The model on each row of x (batch first), fp32."""
    return np.stack([tiny(r) for r in x])


def _check(tiny: TinyReference, x: np.ndarray, y: np.ndarray) -> None:
    assert y.shape == x.shape and y.dtype == x.dtype
    want = _expect(tiny, x)
    if x.dtype == np.float16:
        np.testing.assert_allclose(y.astype(np.float32), want, atol=2e-3, rtol=1e-3)
    else:
        np.testing.assert_allclose(y, want, atol=ATOL)


def _http_infer(c: httpclient.InferenceServerClient, x: np.ndarray, binary: bool = True, **kw: Any) -> np.ndarray:
    dt = kw.pop("datatype", "FP16" if x.dtype == np.float16 else "FP32")
    t = httpclient.InferInput(kw.pop("name", "x"), list(x.shape), dt)
    t.set_data_from_numpy(x, binary_data=binary)
    out = [httpclient.InferRequestedOutput("y", binary_data=binary)]
    return c.infer(kw.pop("model", "fa3trt"), [t], outputs=out, **kw).as_numpy("y")


def _grpc_infer(c: grpcclient.InferenceServerClient, x: np.ndarray, **kw: Any) -> np.ndarray:
    dt = "FP16" if x.dtype == np.float16 else "FP32"
    t = grpcclient.InferInput(kw.pop("name", "x"), list(x.shape), dt)
    t.set_data_from_numpy(x)
    return c.infer(kw.pop("model", "fa3trt"), [t], **kw).as_numpy("y")


def test_http_client(cluster: Cluster, tiny: TinyReference) -> None:
    c = httpclient.InferenceServerClient(cluster.http.removeprefix("http://"))
    assert c.is_server_live() and c.is_server_ready() and c.is_model_ready("fa3trt")
    assert not c.is_model_ready("other")
    meta = c.get_model_metadata("fa3trt")
    assert meta["name"] == "fa3trt" and meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, -1, HIDDEN]}]
    assert meta["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [-1, -1, HIDDEN]}]
    assert "binary_tensor_data" in c.get_server_metadata()["extensions"]
    rng = np.random.default_rng(0)
    for shape in [(1, 1, HIDDEN), (1, 130, HIDDEN), (3, 40, HIDDEN), (1, 2048, HIDDEN)]:
        x = rng.standard_normal(shape).astype(np.float32)
        _check(tiny, x, _http_infer(c, x))
    x16 = rng.standard_normal((2, 77, HIDDEN)).astype(np.float16)
    _check(tiny, x16, _http_infer(c, x16))
    xj = rng.standard_normal((1, 5, HIDDEN)).astype(np.float32)  # JSON in and out
    _check(tiny, xj, _http_infer(c, xj, binary=False))
    _check(tiny, xj, _http_infer(c, xj, model_version="1"))


def test_grpc_client(cluster: Cluster, tiny: TinyReference) -> None:
    c = grpcclient.InferenceServerClient(cluster.grpc)
    assert c.is_server_live() and c.is_server_ready() and c.is_model_ready("fa3trt")
    meta = c.get_model_metadata("fa3trt", as_json=True)
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [str(-1), str(-1), str(HIDDEN)]}]
    assert c.get_server_metadata().name == "fa3trt"
    rng = np.random.default_rng(1)
    for shape in [(1, 1, HIDDEN), (1, 600, HIDDEN), (2, 33, HIDDEN)]:
        x = rng.standard_normal(shape).astype(np.float32)
        _check(tiny, x, _grpc_infer(c, x))
    x16 = rng.standard_normal((1, 300, HIDDEN)).astype(np.float16)
    _check(tiny, x16, _grpc_infer(c, x16))


def _raw_http(cluster: Cluster, body: bytes, header_length: int | None, model: str = "fa3trt") -> requests.Response:
    headers = {} if header_length is None else {"Inference-Header-Content-Length": str(header_length)}
    return requests.post(f"{cluster.http}/v2/models/{model}/infer", data=body, headers=headers, timeout=60)


def test_bad_requests_get_protocol_errors_and_good_ones_are_unharmed(cluster: Cluster, tiny: TinyReference) -> None:
    def hc() -> httpclient.InferenceServerClient:  # one per call: its gevent pool stays in one thread
        return httpclient.InferenceServerClient(cluster.http.removeprefix("http://"))

    gc = grpcclient.InferenceServerClient(cluster.grpc)
    rng = np.random.default_rng(2)
    x = np.zeros((1, 3, HIDDEN), np.float32)
    t = httpclient.InferInput("x", [1, 3, HIDDEN], "FP32")
    t.set_data_from_numpy(x)
    body, n = httpclient.InferenceServerClient.generate_request_body([t])
    stub = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(cluster.grpc))
    lying = pb.ModelInferRequest(model_name="fa3trt")
    lying.inputs.add(name="x", datatype="FP32", shape=[1, 3, HIDDEN])
    lying.raw_input_contents.append(b"\0" * (3 * HIDDEN * 4 - 4))

    def http_err(f: Callable[[], Any]) -> tuple[str, str]:
        try:
            f()
        except InferenceServerException as e:
            return str(e.status()), e.message()
        raise AssertionError("the bad request was answered")

    def grpc_err(f: Callable[[], Any]) -> tuple[str, str]:
        try:
            f()
        except InferenceServerException as e:
            return str(e.status()), e.message()
        except grpc.RpcError as e:
            return str(e.code()), str(e.details())
        raise AssertionError("the bad request was answered")

    def raw(b: bytes, hl: int | None) -> tuple[str, str]:
        r = _raw_http(cluster, b, hl)
        return str(r.status_code), r.json()["error"]

    big = np.zeros((1, MAX_BODY // (HIDDEN * 4) + 1, HIDDEN), np.float32)
    bad: list[tuple[Callable[[], tuple[str, str]], str, str]] = [
        (lambda: http_err(lambda: _http_infer(hc(), x, model="nope")), "404", "unknown model 'nope'"),
        (lambda: http_err(lambda: _http_infer(hc(), x, name="z")), "400", "missing ['x']"),
        (lambda: http_err(lambda: _http_infer(hc(), x.astype(np.int32), datatype="INT32")), "400", "datatype INT32"),
        (lambda: http_err(lambda: _http_infer(hc(), np.zeros((1, 3, 100), np.float32))), "400", "[1, 3, 100]"),
        (lambda: http_err(lambda: _http_infer(hc(), np.zeros((1, 3000, HIDDEN), np.float32))), "400", "3000"),
        (lambda: http_err(lambda: _http_infer(hc(), np.full((1, 3, HIDDEN), np.nan, np.float32))), "400", "NaN"),
        (lambda: http_err(lambda: _http_infer(hc(), x, model_version="9")), "404", "no version '9'"),
        (lambda: raw(body[:-8], n), "400", "binary_data_size"),
        (lambda: raw(body + b"\0" * 8, n), "400", "8 bytes past"),
        (lambda: raw(json.dumps({"inputs": [{"name": "x"}]}).encode(), None), "400", "datatype None"),
        (lambda: http_err(lambda: _http_infer(hc(), big)), "413", "exceeds the limit"),
        (lambda: grpc_err(lambda: _grpc_infer(gc, x, model="nope")), "StatusCode.NOT_FOUND", "unknown model"),
        (lambda: grpc_err(lambda: _grpc_infer(gc, x, name="z")), "StatusCode.INVALID_ARGUMENT", "missing ['x']"),
        (lambda: grpc_err(lambda: stub.ModelInfer(lying)), "StatusCode.INVALID_ARGUMENT", "3068 bytes were sent"),
        (lambda: grpc_err(lambda: _grpc_infer(gc, big)), "StatusCode.RESOURCE_EXHAUSTED", "exceeds the limit"),
    ]
    goods = [rng.standard_normal((1, int(s), HIDDEN)).astype(np.float32) for s in rng.integers(1, 128, 10)]

    def good(i: int) -> np.ndarray:
        return _http_infer(hc(), goods[i]) if i % 2 else _grpc_infer(gc, goods[i])

    with cf.ThreadPoolExecutor(12) as pool:
        good_f = [pool.submit(good, i) for i in range(len(goods))]
        bad_f = [(pool.submit(f), status, word) for f, status, word in bad]
        for f, status, word in bad_f:
            got_status, message = f.result()
            assert got_status == status and word in message, (got_status, message)
        for x_good, f in zip(goods, good_f):
            _check(tiny, x_good, f.result())


def test_bench_v2_transports(cluster: Cluster, tiny: TinyReference) -> None:
    """bench.serve_load's v2 senders (tritonclient's asyncio clients) against the app."""
    import tritonclient.grpc.aio as grpc_aio
    import tritonclient.http.aio as http_aio

    from bench.serve_load import make_inputs, run_load, v2_grpc_sender, v2_http_sender

    inputs = make_inputs(12, 1, 300, HIDDEN, dtype=np.float16)

    async def go() -> None:
        hc = http_aio.InferenceServerClient(cluster.http.removeprefix("http://"))
        gc = grpc_aio.InferenceServerClient(cluster.grpc)
        try:
            for send in (v2_http_sender([hc]), v2_grpc_sender([gc])):
                _check(tiny, inputs[0][None], (await send(inputs[0]))[None])
                res = await run_load(send, inputs, concurrency=4, progress=False)
                assert res.requests == 12 and res.errors == 0, res.first_error
        finally:
            await hc.close()
            await gc.close()

    asyncio.run(go())
