"""deploy.kserve without a server: the bytes tritonclient's own encoders produce, parsed; our
answers, decoded by tritonclient's own decoders; every refusal with its status and message."""

from __future__ import annotations

import json
from typing import Any

import grpc
import ml_dtypes
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.grpc import service_pb2 as pb

from deploy import codec, kserve, kserve_grpc
from fa3trt.buckets import Buckets
from fa3trt.errors import InvalidInputError, RequestError
from fa3trt.requests import check_request
from fa3trt.signature import Signature, TensorSpec

SIG = Signature(
    inputs=(TensorSpec("x", "float32", ("S", 8)), TensorSpec("seq_lens", "int32", (), fill="lengths")),
    output=TensorSpec("y", "float32", ("S", 8)),
    bucketed="S",
    batching="pad",
)


def _http_body(
    arrays: dict[str, np.ndarray], binary: bool = True, datatype: str | None = None, binary_out: bool | None = None
) -> tuple[bytes, str | None]:
    inputs = []
    for name, a in arrays.items():
        t = httpclient.InferInput(name, list(a.shape), datatype or _dt(a))
        t.set_data_from_numpy(a, binary_data=binary)
        inputs.append(t)
    outputs = None if binary_out is None else [httpclient.InferRequestedOutput("y", binary_data=binary_out)]
    body, n = httpclient.InferenceServerClient.generate_request_body(inputs, outputs=outputs, request_id="r1")
    return body, None if n is None else str(n)


def _dt(a: np.ndarray) -> str:
    return {np.float32: "FP32", np.float16: "FP16", np.float64: "FP64", np.int32: "INT32"}[a.dtype.type]


@pytest.mark.parametrize("binary", [True, False])
@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
def test_http_request_from_tritonclient_parses(binary: bool, dtype: type) -> None:
    x = np.random.default_rng(0).standard_normal((2, 5, 8)).astype(dtype)
    body, n = _http_body({"x": x}, binary=binary)
    req = kserve.parse_http_infer(body, n)
    assert req.id == "r1" and req.binary_output and req.outputs is None
    assert req.datatypes == {"x": _dt(x)}
    assert req.inputs["x"].dtype == x.dtype
    np.testing.assert_array_equal(req.inputs["x"], x)
    rows = kserve.split_request(req, SIG)
    assert len(rows) == 2
    np.testing.assert_array_equal(rows[1]["x"], x[1])


def test_binary_input_is_a_view_on_the_body() -> None:
    x = np.arange(40, dtype=np.float32).reshape(1, 5, 8)
    body, n = _http_body({"x": x})
    arr = kserve.parse_http_infer(body, n).inputs["x"]
    assert not arr.flags.owndata and not arr.flags.writeable  # np.frombuffer on the body, no copy
    row = kserve.split_request(kserve.parse_http_infer(body, n), SIG)[0]["x"]
    assert np.shares_memory(row, np.frombuffer(body, np.uint8))
    # The replica checks a request without converting its floats (the batch converts them, on
    # the device): a float16 request stays the body's float16 bytes.
    bf16 = Signature(
        (TensorSpec("x", "bfloat16", ("S", 8)), TensorSpec("seq_lens", "int32", (), fill="lengths")),
        TensorSpec("y", "bfloat16", ("S", 8)),
        "S",
    )
    body16, n16 = _http_body({"x": x.astype(np.float16)})
    row16 = kserve.split_request(kserve.parse_http_infer(body16, n16), bf16)[0]
    kept = check_request(bf16, row16, Buckets((8,))).tensors["x"]
    assert kept.dtype == np.float16 and np.shares_memory(kept, np.frombuffer(body16, np.uint8))


def test_bf16_round_trip_matches_tritonclient() -> None:
    x = np.random.default_rng(1).standard_normal((1, 3, 8)).astype(ml_dtypes.bfloat16)
    body, n = _http_body({"x": x}, datatype="BF16")
    req = kserve.parse_http_infer(body, n)
    assert req.datatypes["x"] == "BF16" and req.inputs["x"].dtype == np.float32
    np.testing.assert_array_equal(req.inputs["x"], x.astype(np.float32))
    out = kserve.join_outputs([{"y": req.inputs["x"][0] * 2}], req, SIG)
    assert out["y"][1] == "BF16"
    resp, m = kserve.encode_http_infer("m", "1", req, out)
    y = httpclient.InferenceServerClient.parse_response_body(resp, header_length=m).as_numpy("y")
    np.testing.assert_array_equal(np.asarray(y, np.float32), req.inputs["x"] * 2)  # bf16 * 2 is exact
    assert codec.float32_to_bf16(np.array([1.00390625, 1.01171875, np.nan], np.float32)).tolist() == [
        0x3F80,  # ties to even (down)
        0x3F82,  # ties to even (up)
        0x7FC0,
    ]


@pytest.mark.parametrize("binary_out", [True, False, None])
def test_http_response_decodes_with_tritonclient(binary_out: bool | None) -> None:
    x = np.random.default_rng(2).standard_normal((2, 4, 8)).astype(np.float16)
    body, n = _http_body({"x": x}, binary_out=binary_out)
    req = kserve.parse_http_infer(body, n)
    answers = [{"y": r["x"] + 1} for r in kserve.split_request(req, SIG)]
    out = kserve.join_outputs(answers, req, SIG)
    assert out["y"][1] == "FP16"  # FP16 in, FP16 out
    resp, m = kserve.encode_http_infer("fa3trt", "1", req, out)
    assert (m is None) == (binary_out is False)
    result = httpclient.InferenceServerClient.parse_response_body(resp, header_length=m)
    y = result.as_numpy("y")
    np.testing.assert_array_equal(y, x + 1)
    assert result.get_response()["model_name"] == "fa3trt" and result.get_response()["id"] == "r1"


def test_grpc_request_and_response_with_tritonclient_messages() -> None:
    x = np.random.default_rng(3).standard_normal((1, 6, 8)).astype(np.float32)
    t = grpcclient.InferInput("x", list(x.shape), "FP32")
    t.set_data_from_numpy(x)
    msg = pb.ModelInferRequest(model_name="fa3trt", id="g")
    msg.inputs.extend([t._get_tensor()])
    msg.raw_input_contents.extend([t._get_content()])
    msg.outputs.add(name="y")
    data = msg.SerializeToString()  # as the server receives it
    head, raw = kserve_grpc.read_infer(data)
    # The tensor is a view on the request's bytes; the rest is the message protobuf reads.
    assert len(raw) == 1 and np.shares_memory(np.frombuffer(raw[0], np.uint8), np.frombuffer(data, np.uint8))
    whole = pb.ModelInferRequest.FromString(data)
    assert bytes(raw[0]) == whole.raw_input_contents[0] and not head.raw_input_contents
    assert (head.model_name, head.id, list(head.inputs), list(head.outputs)) == (
        whole.model_name,
        whole.id,
        list(whole.inputs),
        list(whole.outputs),
    )
    req = kserve_grpc.parse_grpc_infer(head, raw)
    np.testing.assert_array_equal(req.inputs["x"], x)
    assert req.outputs == {"y": True}
    np.testing.assert_array_equal(kserve_grpc.parse_grpc_infer(whole).inputs["x"], x)  # a message, as it is
    out = kserve.join_outputs([{"y": r["x"] * 3} for r in kserve.split_request(req, SIG)], req, SIG)
    resp = kserve_grpc.encode_grpc_infer("fa3trt", "1", req, out)
    # Our bytes are the message protobuf would write, and tritonclient reads the answer from them.
    want = pb.ModelInferResponse(model_name="fa3trt", model_version="1", id="g")
    want.outputs.add(name="y", datatype="FP32", shape=[1, 6, 8])
    want.raw_output_contents.append((x * 3).tobytes())
    assert pb.ModelInferResponse.FromString(resp) == want
    y = grpcclient.InferResult(pb.ModelInferResponse.FromString(resp)).as_numpy("y")
    np.testing.assert_array_equal(y, x * 3)
    # Typed contents instead of raw bytes.
    typed = pb.ModelInferRequest(model_name="fa3trt")
    typed.inputs.add(name="x", datatype="FP32", shape=[1, 2, 8]).contents.fp32_contents.extend(range(16))
    head, raw = kserve_grpc.read_infer(typed.SerializeToString())
    assert raw == [] and kserve_grpc.parse_grpc_infer(head, raw).inputs["x"].reshape(-1).tolist() == list(range(16))


@pytest.mark.parametrize(
    ("cut", "match"),
    [
        (lambda d: d[:-3], "truncated"),  # the raw tensor's bytes end early
        (lambda d: d + b"\x80", "truncated"),  # a varint with no end
        (lambda d: d + b"\x0b", "wire type 3"),  # a group, which the protocol never sends
        (lambda d: b"\x0a\xff\xff\xff\xff\x0f" + d, "truncated"),  # a length past the end
    ],
)
def test_grpc_request_bytes_that_do_not_parse_are_refused(cut: Any, match: str) -> None:
    msg = pb.ModelInferRequest(model_name="fa3trt")
    msg.inputs.add(name="x", datatype="FP32", shape=[1, 2, 8])
    msg.raw_input_contents.append(np.zeros(16, np.float32).tobytes())
    with pytest.raises(RequestError, match=match):
        kserve_grpc.read_infer(cut(msg.SerializeToString()))


def test_metadata_from_the_signature() -> None:
    meta = kserve.model_metadata("fa3trt", ["1"], "fa3trt_torch", SIG)
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, -1, 8]}]  # seq_lens is made, not sent
    assert meta["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [-1, -1, 8]}]
    g = kserve_grpc.grpc_model_metadata(meta)
    assert list(g.inputs[0].shape) == [-1, -1, 8] and g.outputs[0].name == "y"


def _refused(body: bytes, n: str | None, *words: str, status: int = 400) -> None:
    with pytest.raises(RequestError) as e:
        kserve.split_request(kserve.parse_http_infer(body, n), SIG)
    assert e.value.status == status
    for w in words:
        assert w in str(e.value), str(e.value)


def test_refusals_name_the_value_and_the_fix() -> None:
    x = np.zeros((1, 3, 8), np.float32)
    body, n = _http_body({"x": x})
    assert n is not None
    head = json.loads(body[: int(n)])
    bin_ = body[int(n) :]

    def with_head(h: dict, data: bytes = bin_) -> tuple[bytes, str]:
        j = json.dumps(h).encode()
        return j + data, str(len(j))

    _refused(body[:-4], n, "binary_data_size 96", "reaches past")  # a size that lies (body short)
    _refused(body + b"xxxx", n, "4 bytes past")
    h = json.loads(json.dumps(head))
    h["inputs"][0]["parameters"]["binary_data_size"] = 92
    _refused(*with_head(h, bin_[:92]), "96 bytes", "92 bytes were sent")
    _refused(body, str(len(body) + 1), "Inference-Header-Content-Length")
    _refused(b"{nope", None, "does not parse")
    _refused(*_http_body({"z": x}), "missing ['x']", "unexpected ['z']")
    _refused(*_http_body({"x": x, "w": x}), "unexpected ['w']")
    _refused(*_http_body({"x": x.astype(np.int32)}), "datatype INT32", "send FP32")
    _refused(*_http_body({"x": np.zeros((1, 3, 9), np.float32)}), "[1, 3, 9]", "[-1, -1, 8]")
    _refused(*_http_body({"x": np.zeros((3, 8), np.float32)}), "[3, 8]", "batch first")
    _refused(*_http_body({"x": np.zeros((0, 3, 8), np.float32)}), "batch size")
    h = json.loads(json.dumps(head))
    h["inputs"][0]["datatype"] = "BYTES"
    _refused(*with_head(h), "'BYTES'", "FP32")
    h = json.loads(json.dumps(head))
    h["outputs"] = [{"name": "q"}]
    _refused(*with_head(h), "unknown outputs ['q']", "'y'")
    j = {"inputs": [{"name": "x", "shape": [1, 2, 8], "datatype": "FP32", "data": [1.0] * 15}]}
    _refused(json.dumps(j).encode(), None, "16 values", "data has 15")
    with pytest.raises(RequestError) as e:
        kserve.check_model("other", "", "fa3trt", ["1"])
    assert e.value.status == 404 and "'other'" in str(e.value) and "/v2/models/fa3trt" in str(e.value)
    with pytest.raises(RequestError, match="no version '7'"):
        kserve.check_model("fa3trt", "7", "fa3trt", ["1"])


def test_error_mapping() -> None:
    assert kserve.http_status(RequestError("x", 413)) == 413
    assert kserve_grpc.grpc_code(RequestError("x", 413)) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert kserve.http_status(RequestError("x", 404)) == 404
    assert kserve_grpc.grpc_code(RequestError("x", 404)) == grpc.StatusCode.NOT_FOUND
    assert kserve.http_status(InvalidInputError("x")) == 400
    assert kserve_grpc.grpc_code(InvalidInputError("x")) == grpc.StatusCode.INVALID_ARGUMENT
    assert kserve.http_status(TimeoutError()) == 504
    assert kserve_grpc.grpc_code(RuntimeError("boom")) == grpc.StatusCode.INTERNAL
    assert kserve.error_body(InvalidInputError("bad x")) == {"error": "bad x"}
