"""Request decoding, the single-array API's checks, and the app's batching and replica plan (no Ray needed)."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from deploy.app import application, cpu_threads, derive_max_ongoing, ingress_plan, replica_plan
from deploy.codec import decode_json, decode_npy, encode_npy, from_numpy_like, to_numpy
from deploy.replica import ModelReplica, bucket_limits, single_input
from deploy.targets import direct_ingress_enabled
from fa3trt.buckets import Buckets
from fa3trt.config import AppArgs
from fa3trt.errors import InvalidInputError, RequestError
from fa3trt.models.spec import ReferenceSpec
from fa3trt.requests import check_request
from tests.utils import captured_log

B = Buckets((128, 512))


def _npy(arr: np.ndarray, **kw: object) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, **kw)  # type: ignore[arg-type]
    return buf.getvalue()


def test_npy_roundtrip_and_fortran_order() -> None:
    x = np.random.rand(5, 8).astype(np.float32)
    np.testing.assert_array_equal(decode_npy(encode_npy(x)), x)
    # The answer's bytes are numpy.save's, written with one copy of the data, for any layout.
    for a in (x.astype(np.float16), x[:, 2:5], np.asfortranarray(x), np.zeros((0, 4), np.float32)):
        assert encode_npy(a) == _npy(np.ascontiguousarray(a))
    f = np.asfortranarray(np.random.rand(3, 4))
    np.testing.assert_array_equal(decode_npy(_npy(f)), f)


def test_npy_pickle_refused_never_unpickled() -> None:
    body = _npy(np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(InvalidInputError, match="object or structured arrays would need pickle"):
        decode_npy(body)


@pytest.mark.parametrize(
    "body, match",
    [
        (b"hello world", "bad magic"),
        (b"\x93NUMPY\x01\x00\x40\x00{'descr': '<f4',", "truncated"),
        (b"\x93NUMPY\x01\x00\x08\x00not-dict", "corrupt .npy header"),
    ],
)
def test_npy_corrupt(body: bytes, match: str) -> None:
    with pytest.raises(RequestError, match=match) as e:
        decode_npy(body)
    assert e.value.status == 400


def test_npy_truncated_and_lying_header() -> None:
    body = _npy(np.zeros((4, 8), np.float32))
    with pytest.raises(RequestError, match="truncated or its header lies"):
        decode_npy(body[:-5])
    # A header that claims a huge shape must be refused before anything is allocated.
    lie = body.replace(b"(4, 8)", b"(99999999999, 8)".ljust(6))
    header_fixed = _npy(np.zeros((4, 8), np.float32)).replace(b"(4, 8), }", b"(9999999999999, 8), }")
    for b in (lie, header_fixed):
        with pytest.raises(RequestError) as e:
            decode_npy(b)
        assert e.value.status == 400


def test_json_decoding() -> None:
    x = decode_json(json.dumps({"x": [[1, 2], [3.5, 4]]}).encode())
    assert x.dtype == np.float64 and x.shape == (2, 2)
    assert decode_json({"x": [1, 2]}).dtype == np.int64  # integers stay integers
    with pytest.raises(RequestError, match="malformed JSON") as e:
        decode_json(b"{nope")
    assert e.value.status == 400
    with pytest.raises(InvalidInputError, match='"x" is a ragged list'):
        decode_json(b'{"x": [[1, 2], [3]]}')
    with pytest.raises(InvalidInputError, match="must be a .nested. list of numbers"):
        decode_json(b'{"x": [["a", 2]]}')
    with pytest.raises(InvalidInputError, match='JSON body must be {"inputs": {name: array, ...}}'):
        decode_json(b"[1, 2]")
    # The one input may also be named as the model names it.
    sig = ReferenceSpec().signature()
    assert decode_json({"x": [[0.5]]}, sig).shape == (1, 1)


@pytest.mark.parametrize(
    "arr, match",
    [
        (np.zeros((2, 3, 256), np.float32), r"has shape \(2, 3, 256\) \(rank 3\); it must have rank 2"),
        (np.zeros((4, 7), np.float32), "input 'x' has size 7 on axis 1; it must be 256"),
        (np.zeros((0, 256), np.float32), "input 'x' has axis S=0; this model takes at least 1 along S"),
        (np.zeros((513, 256), np.float32), "input 'x', axis S: sequence length 513 exceeds the largest bucket"),
        (np.zeros((4, 256), np.complex64), "input 'x' has dtype complex64; send a float array"),
    ],
)
def test_a_single_array_is_checked_by_the_signature(arr: np.ndarray, match: str) -> None:
    with pytest.raises(InvalidInputError, match=match):
        check_request(ReferenceSpec().signature(), {single_input(ReferenceSpec().signature()): arr}, B)


def test_single_array_accepts_floats_in_their_own_dtype() -> None:
    sig = ReferenceSpec().signature()
    assert check_request(sig, {"x": np.zeros((128, 256), np.float16)}, B).bucket == 0
    assert check_request(sig, {"x": np.zeros((129, 256))}, B).tensors["x"].dtype == np.float64
    # NaN and Inf are found later, on the device, in the batch (fa3trt.serving.batch).
    assert check_request(sig, {"x": np.full((3, 256), np.nan, np.float32)}, B).length == 3


def test_a_single_array_needs_a_model_with_one_sent_input() -> None:
    from fa3trt.signature import Signature, TensorSpec

    two = Signature((TensorSpec("a", axes=("S",)), TensorSpec("b", axes=("S",))), TensorSpec("y", axes=("S",)), "S")
    with pytest.raises(InvalidInputError, match=r"this model takes the inputs \['a', 'b'\]; send them by name"):
        single_input(two)


def test_handle_types() -> None:
    t = torch.randn(3, 8, dtype=torch.bfloat16)
    arr, like = to_numpy(t)
    assert arr.dtype == np.float32 and like == torch.bfloat16
    back = from_numpy_like(arr, like)
    assert isinstance(back, torch.Tensor) and back.dtype == torch.bfloat16
    with pytest.raises(InvalidInputError, match="NumPy array or a CPU torch tensor"):
        to_numpy([[1.0, 2.0]])
    with pytest.raises(InvalidInputError, match="dtype torch.int64"):
        to_numpy(torch.zeros(2, 2, dtype=torch.int64))


def test_batch_limits_and_replica_plan() -> None:
    args = AppArgs.model_validate(
        {
            "buckets": [128, 512, 2048],
            "batching": {
                "max_batch_tokens": 4096,
                "bucket_overrides": {512: {"max_batch_size": 3, "batch_wait_timeout_s": 0.5}},
            },
        }
    )
    assert bucket_limits(args.bucket_set(), args.batching) == [(32, 0.005), (3, 0.5), (2, 0.005)]
    assert derive_max_ongoing(args) == 2 * (32 + 3 + 2) + 3  # running and waiting batches, one spare per bucket
    # A CPU replica reserves a share of a CPU (several apps fit on one machine); its threads are the CPUs.
    cpu = replica_plan(args, 0, 8)
    assert cpu["num_replicas"] == 1 and cpu["ray_actor_options"] == {"num_cpus": 0.25}
    assert cpu_threads(args, 0, 8) == 8 and cpu_threads(AppArgs.model_validate({"replicas": 3}), 0, 8) == 2
    assert cpu_threads(args, 2, 64) is None  # GPU replicas: Ray's OMP_NUM_THREADS (their num_cpus)
    pinned = AppArgs.model_validate({"replica_cpus": 2})
    assert replica_plan(pinned, 0, 8)["ray_actor_options"] == {"num_cpus": 2} and cpu_threads(pinned, 0, 8) is None
    gpu = replica_plan(args, 2, 64)
    assert gpu["num_replicas"] == 2 and gpu["ray_actor_options"]["num_gpus"] == 1
    auto = replica_plan(AppArgs.model_validate({"autoscaling": {"min_replicas": 1, "max_replicas": 4}}), 4, 64)
    assert auto["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4} and "num_replicas" not in auto
    assert replica_plan(AppArgs.model_validate({"replicas": 3}), 8, 64)["num_replicas"] == 3
    # CPUs per GPU replica: one, or as configured.
    cpus = lambda args, gpus, n: replica_plan(args, gpus, n)["ray_actor_options"]["num_cpus"]  # noqa: E731
    assert [cpus(args, 4, 64), cpus(args, 2, 8), cpus(args, 8, 8), cpus(args, 1, 16)] == [1, 1, 1, 1]
    assert cpus(AppArgs.model_validate({"replica_cpus": 6}), 4, 64) == 6
    with pytest.raises(ValueError, match="replica_cpus must be 'auto' or an integer >= 1, got 0"):
        AppArgs.model_validate({"replica_cpus": 0})
    # Ingress processes: one CPU each, as many requests at once as a model replica.
    ing = AppArgs.model_validate({"ingress_replicas": 3})
    assert ingress_plan(ing) == {
        "num_replicas": 3,
        "ray_actor_options": {"num_cpus": 1},
        "max_ongoing_requests": derive_max_ongoing(ing),
        "max_queued_requests": ing.max_queued_requests,
    }
    with pytest.raises(ValidationError, match="ingress_replicas"):
        AppArgs.model_validate({"ingress_replicas": -1})


@pytest.mark.parametrize(
    "module,other",
    [("deploy.replica", "deploy.ingress"), ("deploy.app", "deploy.ingress"), ("deploy.ingress", "deploy.replica")],
)
def test_a_replica_process_wraps_one_class_with_the_routes(module: str, other: str) -> None:
    """A replica's process imports its class's module, and that import is what runs
    serve.ingress(api), moving the shared FastAPI app's routes onto the class (left unwrapped,
    every route took `self` as a query parameter and answered 422). Wrapping the other class too
    broke them the same way, so importing either deployment's module must not import the other's."""
    code = (
        f"import sys, {module}\n"
        "from deploy.routes import api\n"
        f"assert {other!r} not in sys.modules, 'imported {other}'\n"
        "unwrapped = [r.path for r in api.routes if any(p.name == 'self' for p in "
        "getattr(getattr(r, 'dependant', None), 'query_params', []))]\n"
        "assert not unwrapped, f'routes not wrapped for a class: {unwrapped}'\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


def test_ingress_replicas_without_direct_ingress_warn() -> None:
    """Ingress processes behind Serve's proxy add a hop and nothing else: building such an app
    says so and names the setting (this test process runs without direct ingress)."""
    assert not direct_ingress_enabled()
    for n, warned in ((0, False), (2, True)):
        args = AppArgs.model_validate({"ingress_replicas": n})
        with captured_log("ray.serve") as messages:
            application(args, replica_plan(args, 0, 2))
        hits = [m for m in messages if "without direct ingress" in m]
        assert bool(hits) == warned, messages
        if warned:
            assert "RAY_SERVE_ENABLE_DIRECT_INGRESS=1" in hits[0] and "ingress_replicas: 2" in hits[0]


def test_reconfigure_validates_through_the_schema() -> None:
    """A live replica's user_config goes through BatchingConfig with the replica's buckets: a bad
    one is refused with the schema's message and leaves the running limits as they were."""
    server = ModelReplica(
        {"model": {"preset": "tiny"}, "backend": "torch", "buckets": [64, 128]}, {"max_batch_tokens": 1024}
    )
    assert server.limits == [(16, 0.005), (8, 0.005)]
    with pytest.raises(ValidationError, match=r"names edges \[256\] that are not buckets \[64, 128\]"):
        server.reconfigure({"max_batch_tokens": 1024, "bucket_overrides": {256: {"max_batch_size": 2}}})
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        server.reconfigure({"max_batch_token": 1024})
    assert server.limits == [(16, 0.005), (8, 0.005)]
    server.reconfigure(
        {"max_batch_tokens": 1024, "bucket_overrides": {128: {"max_batch_size": 3, "batch_wait_timeout_s": 0.5}}}
    )
    assert server.limits == [(16, 0.005), (3, 0.5)]
