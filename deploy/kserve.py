"""The Open Inference Protocol (KServe v2): its datatypes, metadata, checks and the REST form.
Pure functions, no Ray, no server; the gRPC form is ``deploy.kserve_grpc``.

Contract:
- ``parse_http_infer(body, header_length)`` reads a v2 REST infer request: JSON tensors, and the
  binary tensor data extension (``Inference-Header-Content-Length``; an input's
  ``binary_data_size`` bytes follow the JSON in input order), into a ``V2Request`` whose binary
  tensors are read-only ``np.frombuffer`` views on the body's bytes: the only copy of a tensor
  is the batch it joins (BF16, which NumPy lacks, is widened to float32 once).
- ``split_request(req, signature)`` checks it against the model's ``Signature`` (every sent
  input by name, datatype, rank, fixed sizes, one batch size) and cuts the protocol's batch
  axis off: a tensor of shape [N, ...] is N requests, each batched by the server like any other.
- ``join_outputs`` stacks the answers back; ``encode_http_infer`` writes the response (binary
  outputs when asked: ``binary_data`` per output, or ``binary_data_output`` for all). A float
  output goes back as FP16 when every float input was FP16, BF16 when every float input was
  BF16, else as the model gives it.
- Errors are ``RequestError`` with the HTTP status the protocol uses (400 bad request, 404
  unknown model, 413 too large); ``http_status`` maps any error to one, ``error_body`` is the
  protocol's ``{"error": ...}``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from deploy.codec import bf16_to_float32, float32_to_bf16
from fa3trt.errors import InvalidInputError, RequestError
from fa3trt.signature import Signature, TensorSpec

__all__ = [
    "DATATYPES",
    "V2Request",
    "parse_http_infer",
    "split_request",
    "join_outputs",
    "encode_http_infer",
    "model_metadata",
    "server_metadata",
    "check_model",
    "http_status",
    "error_body",
    "tensor_header",
    "array_from_bytes",
    "array_from_values",
    "wire_array",
]

HEADER_LENGTH = "Inference-Header-Content-Length"
"""The binary tensor data extension's header: how many bytes of the body are JSON."""

DATATYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BF16": np.dtype("<u2"),  # its bits; widened to float32 on arrival
}
"""v2 datatype -> the little-endian NumPy dtype of its wire bytes (BYTES is not served)."""

_FLOATS = ("FP16", "FP32", "FP64", "BF16")
_INTS = ("UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64")
_SPEC_DATATYPE = {
    "float32": "FP32",
    "float16": "FP16",
    "bfloat16": "BF16",
    "int64": "INT64",
    "int32": "INT32",
    "bool": "BOOL",
}
_NUMPY_DATATYPE = {np.dtype(v).str: k for k, v in DATATYPES.items() if k != "BF16"}


@dataclass
class V2Request:
    """One v2 infer request as sent: tensors with the protocol's batch axis first."""

    inputs: dict[str, np.ndarray]
    datatypes: dict[str, str]
    id: str = ""
    outputs: dict[str, bool] | None = None
    """Requested outputs -> whether binary (None: every output)."""
    binary_output: bool = False
    """``binary_data_output``: outputs not asked for by name go back binary."""
    parameters: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------- datatypes
def datatype_of(spec: TensorSpec) -> str:
    return _SPEC_DATATYPE[spec.dtype]


def _accepts(spec: TensorSpec, datatype: str) -> bool:
    if spec.dtype in ("float32", "float16", "bfloat16"):
        return datatype in _FLOATS
    if spec.dtype == "bool":
        return datatype in ("BOOL", *_INTS)
    return datatype in _INTS or datatype == "BOOL"


def _accepted(spec: TensorSpec) -> str:
    if spec.dtype in ("float32", "float16", "bfloat16"):
        return ", ".join(_FLOATS)
    return "BOOL or an integer datatype (" + ", ".join(_INTS) + ")"


# ---------------------------------------------------------------------------- metadata
def server_metadata(version: str) -> dict[str, Any]:
    return {"name": "fa3trt", "version": version, "extensions": ["binary_tensor_data"]}


def _shape(spec: TensorSpec) -> list[int]:
    return [-1] + [a if isinstance(a, int) else -1 for a in spec.axes]


def model_metadata(name: str, versions: Sequence[str], platform: str, sig: Signature) -> dict[str, Any]:
    """``GET /v2/models/{name}``: every sent input and the output, batch axis first, -1 where dynamic."""
    return {
        "name": name,
        "versions": list(versions),
        "platform": platform,
        "inputs": [{"name": t.name, "datatype": datatype_of(t), "shape": _shape(t)} for t in sig.sent],
        "outputs": [{"name": sig.output.name, "datatype": datatype_of(sig.output), "shape": _shape(sig.output)}],
    }


def check_model(name: str, version: str, served: str, versions: Sequence[str]) -> None:
    """404 unless ``name`` (and ``version``, when given) is what this server serves."""
    if name != served:
        raise RequestError(
            f"unknown model {name!r}: this server serves {served!r}; call /v2/models/{served} (gRPC model_name {served!r})",
            status=404,
        )
    if version and version not in versions:
        raise RequestError(
            f"model {name!r} has no version {version!r}: its versions are {list(versions)}; send one of them or none",
            status=404,
        )


# ---------------------------------------------------------------------------- parsing
def _param(params: Any, key: str, kind: type, where: str) -> Any:
    if params is None:
        return None
    if not isinstance(params, dict):
        raise RequestError(f"{where}: parameters must be a JSON object, got {type(params).__name__}")
    v = params.get(key)
    if v is not None and (not isinstance(v, kind) or (kind is int and isinstance(v, bool))):
        raise RequestError(f"{where}: parameter {key!r} must be {kind.__name__}, got {v!r}")
    return v


def tensor_header(t: Any, i: int) -> tuple[str, str, tuple[int, ...]]:
    if not isinstance(t, dict):
        raise RequestError(f"inputs[{i}] must be a JSON object with name, shape, datatype and data, got {t!r:.80}")
    name, datatype, shape = t.get("name"), t.get("datatype"), t.get("shape")
    if not isinstance(name, str) or not name:
        raise RequestError(f"inputs[{i}] has no name (got {name!r}); give each input its model input's name")
    if datatype not in DATATYPES:
        raise RequestError(
            f"input {name!r} has datatype {datatype!r}, which this server does not take; use one of {sorted(DATATYPES)}"
        )
    if (
        not isinstance(shape, list)
        or not shape
        or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)
    ):
        raise RequestError(
            f"input {name!r} has shape {shape!r}; give a list of sizes >= 0, the batch size first (e.g. [1, S, 256])"
        )
    return name, datatype, tuple(shape)


def array_from_bytes(name: str, datatype: str, shape: tuple[int, ...], data: memoryview | bytes) -> np.ndarray:
    dt = DATATYPES[datatype]
    want = math.prod(shape) * dt.itemsize
    if len(data) != want:
        raise RequestError(
            f"input {name!r}: shape {list(shape)} of {datatype} is {want} bytes, but {len(data)} bytes were sent; "
            "send exactly the tensor's bytes (binary_data_size / raw_input_contents)"
        )
    arr = np.frombuffer(data, dtype=dt).reshape(shape)
    return bf16_to_float32(arr) if datatype == "BF16" else arr


def array_from_values(name: str, datatype: str, shape: tuple[int, ...], data: Any) -> np.ndarray:
    dt = np.dtype(np.float32) if datatype == "BF16" else DATATYPES[datatype]
    try:
        arr = np.asarray(data, dtype=dt)
    except (ValueError, TypeError) as e:
        raise RequestError(
            f"input {name!r}: data is not a list of {datatype} values ({e}); send numbers, flat or nested row-major"
        ) from None
    if arr.size != math.prod(shape):
        raise RequestError(
            f"input {name!r}: shape {list(shape)} holds {math.prod(shape)} values but data has {arr.size}; "
            "make shape and data agree"
        )
    return arr.reshape(shape)


def parse_http_infer(body: bytes, header_length: str | None) -> V2Request:
    """A v2 REST infer body (JSON, or JSON then binary tensors) -> ``V2Request`` (see the module)."""
    if header_length is None:
        n = len(body)
    else:
        if not header_length.strip().isdigit() or int(header_length) > len(body):
            raise RequestError(
                f"{HEADER_LENGTH} is {header_length!r} but the body has {len(body)} bytes; "
                "give the byte length of the JSON part"
            )
        n = int(header_length)
    view = memoryview(body)
    try:
        doc = json.loads(view[:n].tobytes() if n < len(body) else body)
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError(
            f"the request's JSON does not parse ({e}); send a v2 infer request"
            + ("" if header_length else f" (binary tensors need the {HEADER_LENGTH} header)")
        ) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list):
        raise RequestError('a v2 infer request is a JSON object with "inputs": [{name, shape, datatype, data}, ...]')
    params = doc.get("parameters") or {}
    binary_output = bool(_param(params, "binary_data_output", bool, "request"))
    req = V2Request({}, {}, id=str(doc.get("id", "")), binary_output=binary_output, parameters=params)
    offset = n
    for i, t in enumerate(doc["inputs"]):
        name, datatype, shape = tensor_header(t, i)
        if name in req.inputs:
            raise RequestError(f"input {name!r} is sent twice; send each input once")
        size = _param(t.get("parameters"), "binary_data_size", int, f"input {name!r}")
        if size is not None:
            if "data" in t:
                raise RequestError(f"input {name!r} has both data and binary_data_size; send one of them")
            if size < 0 or offset + size > len(body):
                raise RequestError(
                    f"input {name!r}: binary_data_size {size} reaches past the body's end "
                    f"({len(body) - offset} bytes left after byte {offset}); give each input's true byte size"
                )
            arr = array_from_bytes(name, datatype, shape, view[offset : offset + size])
            offset += size
        elif "data" in t:
            arr = array_from_values(name, datatype, shape, t["data"])
        else:
            raise RequestError(f"input {name!r} has neither data nor binary_data_size; send its values")
        req.inputs[name], req.datatypes[name] = arr, datatype
    if offset != len(body):
        raise RequestError(
            f"the body has {len(body) - offset} bytes past its JSON and binary inputs; "
            f"the binary_data_size parameters and {HEADER_LENGTH} must add up to the body's length"
        )
    outs = doc.get("outputs")
    if outs is not None:
        if not isinstance(outs, list):
            raise RequestError('"outputs" must be a list of {"name": ...}')
        req.outputs = {}
        for o in outs:
            if not isinstance(o, dict) or not isinstance(o.get("name"), str):
                raise RequestError(f'each requested output is {{"name": ...}}, got {o!r:.80}')
            b = _param(o.get("parameters"), "binary_data", bool, f"output {o['name']!r}")
            req.outputs[o["name"]] = binary_output if b is None else b
    return req


# ---------------------------------------------------------------------------- model calls
def split_request(req: V2Request, sig: Signature) -> list[dict[str, np.ndarray]]:
    """Check ``req`` against the model's inputs; one mapping name -> array (no batch axis) per
    row of the protocol's batch axis. Sizes along named axes and the bucket are the model's to
    check (``Signature.check`` on each row)."""
    specs = {t.name: t for t in sig.sent}
    missing, extra = sorted(set(specs) - set(req.inputs)), sorted(set(req.inputs) - set(specs))
    if missing or extra:
        parts = ([f"missing {missing}"] if missing else []) + ([f"unexpected {extra}"] if extra else [])
        raise RequestError(f"inputs {', '.join(parts)}: model inputs are exactly {sorted(specs)}")
    if req.outputs is not None:
        unknown = sorted(set(req.outputs) - {sig.output.name})
        if unknown:
            raise RequestError(f"unknown outputs {unknown}: the model's output is {sig.output.name!r}")
    batch: tuple[int, str] | None = None
    for name, arr in req.inputs.items():
        t, datatype = specs[name], req.datatypes[name]
        if not _accepts(t, datatype):
            raise RequestError(
                f"input {name!r} has datatype {datatype}; send {datatype_of(t)} (accepted: {_accepted(t)})"
            )
        want = _shape(t)
        if arr.ndim != len(want) or any(w != -1 and w != n for w, n in zip(want, arr.shape)):
            raise RequestError(
                f"input {name!r} has shape {list(arr.shape)}; it must be {want} (batch first, -1 = any size)"
            )
        if batch is not None and arr.shape[0] != batch[0]:
            raise RequestError(
                f"input {name!r} has batch size {arr.shape[0]} but {batch[1]!r} has {batch[0]}; give every input the same"
            )
        batch = (arr.shape[0], name)
    if batch is None or batch[0] < 1:
        raise RequestError("the batch size (the first size of every input's shape) is 0; send at least one row")
    return [{k: v[i] for k, v in req.inputs.items()} for i in range(batch[0])]


def _floats(req: V2Request) -> set[str]:
    return {req.datatypes[n] for n in req.inputs if req.datatypes[n] in _FLOATS}


def answer_dtype(req: V2Request) -> str | None:
    """float16 where every float input is FP16 (``join_outputs`` sends FP16 back then: the
    answers may leave the device so, half the bytes), else None (the output's own dtype)."""
    return "float16" if _floats(req) == {"FP16"} else None


def join_outputs(
    answers: Sequence[dict[str, np.ndarray]], req: V2Request, sig: Signature
) -> dict[str, tuple[np.ndarray, str]]:
    """Each requested output: the rows' answers with the batch axis in front, and its v2 datatype."""
    names = [sig.output.name] if req.outputs is None else list(req.outputs)
    floats = _floats(req)
    out: dict[str, tuple[np.ndarray, str]] = {}
    for name in names:
        rows = [a[name] for a in answers]
        shapes = {r.shape for r in rows}
        if len(shapes) > 1:
            raise InvalidInputError(
                f"output {name!r} has rows of shapes {sorted(shapes)[:3]}; send rows that give answers of one shape"
            )
        y = rows[0][None] if len(rows) == 1 else np.stack(rows)  # one row: a view, no copy
        if y.dtype.kind == "f" and floats == {"BF16"}:
            out[name] = (y.astype(np.float32, copy=False), "BF16")
            continue
        if y.dtype.kind == "f" and floats == {"FP16"}:
            y = y.astype(np.float16, copy=False)
        datatype = _NUMPY_DATATYPE.get(y.dtype.str)
        if datatype is None:
            raise RuntimeError(f"output {name!r} has dtype {y.dtype}, which v2 cannot carry")
        out[name] = (y, datatype)
    return out


def wire_array(y: np.ndarray, datatype: str) -> np.ndarray:
    """The array whose buffer is the tensor's wire bytes (C order, little endian)."""
    if datatype == "BF16":
        return float32_to_bf16(y)
    return np.ascontiguousarray(y, dtype=DATATYPES[datatype])


def encode_http_infer(
    model: str, version: str, req: V2Request, outputs: dict[str, tuple[np.ndarray, str]]
) -> tuple[bytes, int | None]:
    """(body, JSON length for ``Inference-Header-Content-Length`` or None when all JSON)."""
    head: dict[str, Any] = {"model_name": model, "model_version": version, "outputs": []}
    if req.id:
        head["id"] = req.id
    chunks: list[Any] = []
    for name, (y, datatype) in outputs.items():
        t: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(y.shape)}
        binary = req.binary_output if req.outputs is None else req.outputs[name]
        if binary:
            w = wire_array(y, datatype)
            t["parameters"] = {"binary_data_size": w.nbytes}
            chunks.append(w.reshape(-1).view(np.uint8).data)
        else:
            values = (float32_to_bf16(y).astype("<u4") << 16).view("<f4") if datatype == "BF16" else y
            t["data"] = values.ravel().tolist()
        head["outputs"].append(t)
    header = json.dumps(head, separators=(",", ":")).encode()
    if not chunks:
        return header, None
    return b"".join([header, *chunks]), len(header)  # the one copy of each output's bytes


# ---------------------------------------------------------------------------- errors
def http_status(e: BaseException) -> int:
    """The protocol's HTTP status for an error (a client's mistake is 4xx, never 5xx)."""
    if isinstance(e, RequestError):
        return 400 if e.status == 422 else e.status
    if isinstance(e, InvalidInputError):
        return 400
    if isinstance(e, TimeoutError):
        return 504
    return 500


def error_body(e: BaseException) -> dict[str, str]:
    return {"error": str(e) or type(e).__name__}
