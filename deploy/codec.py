"""Request bodies: decoding and encoding, shared by the HTTP routes and the handle API.

A request is named inputs (.npz, JSON ``{"inputs": {...}}``, a mapping through a handle) or, for
a model with one sent input, that array alone (.npy, JSON ``{"x": [...]}``, a NumPy array or a
CPU torch tensor through a handle). A body that cannot be parsed at all is a ``RequestError``
(HTTP 400); a parsed one that breaks the model's signature is an ``InvalidInputError`` raised by
``fa3trt.requests.check_request`` before the request joins a batch; NaN and Inf are looked for
later, on the device, in the batch. ``.npy`` bodies are parsed by hand from their header so that
nothing is unpickled and nothing is allocated before the header's shape is checked against the
bytes actually sent.
"""

from __future__ import annotations

import ast
import io
import json
import math
import zipfile
from typing import Any

import numpy as np
import torch

from fa3trt.errors import InvalidInputError, RequestError
from fa3trt.signature import Signature

__all__ = [
    "decode_npz",
    "encode_npz",
    "decode_inputs_json",
    "load_json",
    "encode_outputs_json",
    "decode_npy",
    "encode_npy",
    "decode_json",
    "encode_json",
    "to_numpy",
    "bf16_to_float32",
    "float32_to_bf16",
    "from_numpy_like",
]

_NPY_MAGIC = b"\x93NUMPY"


def decode_npy(body: bytes) -> np.ndarray:
    """Parse a ``.npy`` body without pickle and without trusting its header's size."""
    if not body.startswith(_NPY_MAGIC) or len(body) < 10:
        raise RequestError(
            "body is not a .npy file (bad magic); send numpy.save output with Content-Type application/x-npy"
        )
    major = body[6]
    if major == 1:
        hlen, start = int.from_bytes(body[8:10], "little"), 10
    elif major in (2, 3):
        if len(body) < 12:
            raise RequestError("truncated .npy header")
        hlen, start = int.from_bytes(body[8:12], "little"), 12
    else:
        raise RequestError(f".npy format version {major} is not supported; use numpy.save")
    if start + hlen > len(body) or hlen > 65536:
        raise RequestError("truncated or oversized .npy header")
    try:
        header = ast.literal_eval(body[start : start + hlen].decode("latin1"))
        descr, fortran, shape = header["descr"], bool(header["fortran_order"]), tuple(header["shape"])
        dtype = np.dtype(descr)
    except Exception as e:
        raise RequestError(f"corrupt .npy header ({e}); send numpy.save output") from e
    if dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None:
        raise InvalidInputError(
            f".npy dtype {dtype} is refused (object or structured arrays would need pickle); send a float array"
        )
    if not all(isinstance(n, int) and n >= 0 for n in shape):
        raise RequestError(f"corrupt .npy header: shape {shape}")
    data = memoryview(body)[start + hlen :]
    expected = math.prod(shape) * dtype.itemsize
    if len(data) != expected:
        raise RequestError(
            f".npy header says shape {shape} of {dtype} ({expected} bytes) but the body carries {len(data)} bytes: "
            "the file is truncated or its header lies"
        )
    arr = np.frombuffer(data, dtype=dtype)
    return arr.reshape(shape, order="F" if fortran else "C")


def encode_npy(arr: np.ndarray) -> bytes:
    """``numpy.save``'s bytes of ``arr`` with one copy of its data (the header, then the buffer)."""
    arr = np.ascontiguousarray(arr)
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, np.lib.format.header_data_from_array_1_0(arr))
    return b"".join([head.getvalue(), arr.reshape(-1).view(np.uint8).data])


def decode_npz(body: bytes, limit: int) -> dict[str, np.ndarray]:
    """Named arrays from an ``.npz`` body (``numpy.savez``, compressed or not) without pickle.

    The members' uncompressed sizes are read from the archive's directory and refused past
    ``limit`` bytes before anything is inflated; each member is parsed by ``decode_npy``."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(body))
        members = archive.infolist()
    except (zipfile.BadZipFile, ValueError) as e:
        raise RequestError(f"body is not an .npz archive ({e}); send numpy.savez output as application/x-npz") from e
    total = sum(m.file_size for m in members)
    if total > limit:
        raise RequestError(f".npz members unpack to {total} bytes, past the limit of {limit} bytes", status=413)
    out: dict[str, np.ndarray] = {}
    for m in members:
        if not m.filename.endswith(".npy"):
            raise RequestError(f".npz member {m.filename!r} is not an .npy array; send numpy.savez output")
        try:
            data = archive.read(m)
        except (zipfile.BadZipFile, ValueError, OSError) as e:
            raise RequestError(f".npz member {m.filename!r} is corrupt ({e})") from e
        out[m.filename[: -len(".npy")]] = decode_npy(data)
    return out


def encode_npz(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, allow_pickle=False, **{k: np.ascontiguousarray(v) for k, v in arrays.items()})
    return buf.getvalue()


def decode_inputs_json(doc: Any) -> dict[str, np.ndarray]:
    """``{"inputs": {name: nested list}}`` -> named arrays (integers stay integers)."""
    inputs = doc.get("inputs") if isinstance(doc, dict) else None
    if not isinstance(inputs, dict) or not inputs:
        raise InvalidInputError(
            'JSON body must be {"inputs": {name: array, ...}} with one entry per input, e.g. {"inputs": {"input_ids": [1, 2]}}'
        )
    out = {}
    for name, value in inputs.items():
        try:
            arr = np.asarray(value)
        except ValueError as e:
            raise InvalidInputError(
                f"input {name!r} is a ragged list ({e}); every row must have the same length"
            ) from e
        if arr.dtype == object or arr.dtype.kind not in "biuf":
            raise InvalidInputError(f"input {name!r} must be a (nested) list of numbers or booleans")
        out[name] = arr
    return out


def encode_outputs_json(outputs: dict[str, np.ndarray]) -> dict[str, Any]:
    return {"outputs": {k: np.asarray(v, dtype=np.float64).tolist() for k, v in outputs.items()}}


def load_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError as e:
        raise RequestError(
            f'malformed JSON ({e}); send {{"inputs": {{name: array}}}} (or {{"x": [[...], ...]}})'
        ) from e


def decode_json(body: bytes | dict[str, Any], signature: Signature | None = None) -> np.ndarray:
    """A single array from ``{"x": [...]}`` (or ``{<the one input's name>: [...]}``); the body, or
    the body already parsed. Integers stay integers."""
    doc = load_json(body) if isinstance(body, bytes) else body
    names = ["x"] + [t.name for t in (signature.sent if signature is not None else ())]
    key = next((k for k in names if isinstance(doc, dict) and k in doc), None)
    if key is None or len(doc) != 1:
        raise InvalidInputError(
            'JSON body must be {"inputs": {name: array, ...}} with one entry per input, or for a model with one input '
            '{"x": array}, e.g. {"x": [[0.1, 0.2]]}'
        )
    try:
        arr = np.asarray(doc[key])
    except ValueError as e:
        raise InvalidInputError(f'"{key}" is a ragged list ({e}); every row must have the same length') from e
    if arr.dtype == object or arr.dtype.kind not in "biuf":
        raise InvalidInputError(f'"{key}" must be a (nested) list of numbers')
    return arr


def encode_json(arr: np.ndarray, name: str = "y") -> dict[str, Any]:
    return {name: arr.astype(np.float64).tolist()}


def to_numpy(x: Any) -> tuple[np.ndarray, Any]:
    """(float array, how to give the answer back in the caller's type)."""
    if isinstance(x, torch.Tensor):
        if x.device.type != "cpu":
            raise InvalidInputError(f"tensor is on {x.device}; send a CPU tensor (or a NumPy array)")
        if not (x.is_floating_point() and x.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)):
            raise InvalidInputError(
                f"tensor dtype {x.dtype} is not accepted; send float16, bfloat16, float32 or float64"
            )
        return x.detach().float().numpy() if x.dtype == torch.bfloat16 else x.detach().numpy(), x.dtype
    if isinstance(x, np.ndarray):
        return x, x.dtype
    raise InvalidInputError(
        f"expected a NumPy array or a CPU torch tensor of shape (S, hidden), got {type(x).__name__}"
    )


def from_numpy_like(y: np.ndarray, like: Any) -> Any:
    """The answer in the request's own type and dtype."""
    if isinstance(like, torch.dtype):
        return torch.from_numpy(np.ascontiguousarray(y, dtype=np.float32)).to(like)
    return y.astype(like, copy=False)


def bf16_to_float32(bits: np.ndarray) -> np.ndarray:
    """BF16 wire values (uint16 bits) as float32: the high half of each float32."""
    return (bits.astype("<u4") << 16).view("<f4")


def float32_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> BF16 bits (uint16), rounded to nearest even as the hardware does; NaN stays NaN."""
    u = np.ascontiguousarray(x, dtype="<f4").view("<u4")
    bits = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype("<u2")
    nan = np.isnan(x)
    if nan.any():
        bits[nan] = 0x7FC0
    return bits
