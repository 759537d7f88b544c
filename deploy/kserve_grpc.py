"""The Open Inference Protocol (KServe v2) over gRPC: ``inference.GRPCInferenceService`` with
tritonclient's messages (the protocol's ``inference`` package), for Serve's gRPC proxy and the
replicas' own gRPC servers (direct ingress). Pure functions, no Ray.

Contract:
- ``add_GRPCInferenceServiceServicer_to_server`` (serve_config.yaml's ``grpc_servicer_functions``)
  registers the RPCs, each request handed to the replica as its bytes; ``parse_message`` reads
  them there. A method answers with a message, or with ``Serialized`` bytes.
- ``read_infer(data)`` reads a ``ModelInferRequest`` with its ``raw_input_contents`` as views on
  the request's bytes (protobuf would copy each tensor twice: into its arena, then into a Python
  ``bytes``); ``parse_grpc_infer`` makes it a ``deploy.kserve.V2Request``.
- ``encode_grpc_infer`` writes the ``ModelInferResponse``'s bytes: its small fields serialized by
  protobuf, then each output's ``raw_output_contents`` appended as the wire format lays a field
  out, so a tensor's bytes are copied once.
- ``grpc_code`` maps any error to the protocol's status code.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc
import numpy as np
from tritonclient.grpc import service_pb2 as pb

from deploy.kserve import (
    V2Request,
    array_from_bytes,
    array_from_values,
    http_status,
    tensor_header,
    wire_array,
)
from fa3trt.errors import RequestError

__all__ = [
    "pb",
    "SERVICE",
    "GRPC_METHODS",
    "add_GRPCInferenceServiceServicer_to_server",
    "parse_message",
    "Serialized",
    "read_infer",
    "parse_grpc_infer",
    "encode_grpc_infer",
    "grpc_model_metadata",
    "grpc_code",
]

SERVICE = "inference.GRPCInferenceService"
GRPC_METHODS = {
    "ServerLive": (pb.ServerLiveRequest, pb.ServerLiveResponse),
    "ServerReady": (pb.ServerReadyRequest, pb.ServerReadyResponse),
    "ModelReady": (pb.ModelReadyRequest, pb.ModelReadyResponse),
    "ServerMetadata": (pb.ServerMetadataRequest, pb.ServerMetadataResponse),
    "ModelMetadata": (pb.ModelMetadataRequest, pb.ModelMetadataResponse),
    "ModelInfer": (pb.ModelInferRequest, pb.ModelInferResponse),
}
"""The RPCs served: name -> (request, response) message classes."""

# The wire numbers of the tensor fields (grpc_service.proto).
_RAW_INPUTS = pb.ModelInferRequest.DESCRIPTOR.fields_by_name["raw_input_contents"].number
_RAW_OUTPUTS = pb.ModelInferResponse.DESCRIPTOR.fields_by_name["raw_output_contents"].number

# gRPC typed contents: the ``InferTensorContents`` field each datatype's values travel in.
_CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP16": "fp32_contents",
    "BF16": "fp32_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}


# ---------------------------------------------------------------------------- service
class Serialized:
    """An answer already in its wire bytes (``encode_grpc_infer``), for Serve, which writes every
    method's answer as ``answer.SerializeToString()``."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def SerializeToString(self) -> bytes:  # noqa: N802  # protobuf's name
        return self.data


def _serialize(response: Any) -> bytes:
    return bytes(response.SerializeToString())


def add_GRPCInferenceServiceServicer_to_server(servicer: Any, server: Any) -> None:  # noqa: N802  # gRPC's naming
    """``grpc_servicer_functions`` entry for Serve: the v2 RPCs, each request handed on as its bytes.

    Serve's proxy pickles a parsed request to the replica, and tritonclient's message classes
    do not pickle (their module is registered as ``grpc_service_pb2``, which does not import).
    Bytes travel as they are, without a parse in the proxy; the replica parses them
    (``parse_message``, ``read_infer``)."""
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(
            getattr(servicer, name), request_deserializer=None, response_serializer=_serialize
        )
        for name in GRPC_METHODS
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))


def parse_message(method: str, request: Any) -> Any:
    """The request message of RPC ``method`` from the bytes the proxy hands on (or a message)."""
    cls = GRPC_METHODS[method][0]
    if isinstance(request, cls):
        return request
    try:
        return cls.FromString(bytes(request))
    except Exception as e:
        raise RequestError(f"the {method} request does not parse as {cls.DESCRIPTOR.full_name} ({e})") from None


# ---------------------------------------------------------------------------- wire format
def _varint(buf: memoryview, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= len(buf):
            raise RequestError("the ModelInfer request is truncated (a varint runs past its end)")
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7
        if shift > 63:
            raise RequestError("the ModelInfer request holds a varint longer than 10 bytes")


def _varint_bytes(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def read_infer(data: Any) -> tuple[Any, list[memoryview]]:
    """A ``ModelInferRequest`` from its bytes: the message without its ``raw_input_contents``,
    and those as views on ``data``. A message (a call outside Serve) is taken as it is."""
    if isinstance(data, pb.ModelInferRequest):
        return data, [memoryview(r) for r in data.raw_input_contents]
    view = memoryview(data).cast("B")
    rest: list[memoryview] = []
    raws: list[memoryview] = []
    i = 0
    while i < len(view):
        start = i
        key, i = _varint(view, i)
        number, kind = key >> 3, key & 7
        if kind == 0:
            _, i = _varint(view, i)
        elif kind == 1:
            i += 8
        elif kind == 5:
            i += 4
        elif kind == 2:
            n, i = _varint(view, i)
            if i + n > len(view):
                raise RequestError(f"the ModelInfer request is truncated (field {number} claims {n} bytes)")
            if number == _RAW_INPUTS:
                raws.append(view[i : i + n])
                i += n
                continue
            i += n
        else:
            raise RequestError(f"the ModelInfer request holds wire type {kind} (field {number}), which it cannot")
        if i > len(view):
            raise RequestError(f"the ModelInfer request is truncated (field {number})")
        rest.append(view[start:i])
    return parse_message("ModelInfer", b"".join(rest)), raws


def parse_grpc_infer(request: Any, raw: Sequence[memoryview | bytes] | None = None) -> V2Request:
    """A ``ModelInferRequest`` -> ``V2Request``. ``raw``: its raw contents (``read_infer``'s
    views); by default the message's own."""
    raw = list(request.raw_input_contents) if raw is None else raw
    if raw and len(raw) != len(request.inputs):
        raise RequestError(
            f"{len(request.inputs)} inputs but {len(raw)} raw_input_contents; send raw contents for every input or none"
        )
    req = V2Request({}, {}, id=request.id)
    for i, t in enumerate(request.inputs):
        name, datatype, shape = tensor_header({"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}, i)
        if name in req.inputs:
            raise RequestError(f"input {name!r} is sent twice; send each input once")
        if raw:
            arr = array_from_bytes(name, datatype, shape, raw[i])
        else:
            arr = array_from_values(name, datatype, shape, getattr(t.contents, _CONTENTS_FIELD[datatype]))
        req.inputs[name], req.datatypes[name] = arr, datatype
    if request.outputs:
        req.outputs = {o.name: True for o in request.outputs}
    return req


def encode_grpc_infer(model: str, version: str, req: V2Request, outputs: dict[str, tuple[np.ndarray, str]]) -> bytes:
    """The ``ModelInferResponse``'s bytes, every output in ``raw_output_contents`` (see the module)."""
    resp = pb.ModelInferResponse(model_name=model, model_version=version, id=req.id)
    tail: list[Any] = []
    tag = _varint_bytes(_RAW_OUTPUTS << 3 | 2)
    for name, (y, datatype) in outputs.items():
        resp.outputs.add(name=name, datatype=datatype, shape=list(y.shape))
        w = wire_array(y, datatype)
        tail += [tag, _varint_bytes(w.nbytes), w.reshape(-1).view(np.uint8).data]
    return b"".join([resp.SerializeToString(), *tail])


def grpc_model_metadata(meta: dict[str, Any]) -> Any:
    """``deploy.kserve.model_metadata``'s answer as a ``ModelMetadataResponse``."""
    resp = pb.ModelMetadataResponse(name=meta["name"], versions=meta["versions"], platform=meta["platform"])
    for kind in ("inputs", "outputs"):
        for t in meta[kind]:
            getattr(resp, kind).add(name=t["name"], datatype=t["datatype"], shape=t["shape"])
    return resp


# ---------------------------------------------------------------------------- errors
_GRPC_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def grpc_code(e: BaseException) -> grpc.StatusCode:
    """The protocol's gRPC status for an error (a client's mistake is never INTERNAL)."""
    return _GRPC_CODES.get(http_status(e), grpc.StatusCode.INTERNAL)
