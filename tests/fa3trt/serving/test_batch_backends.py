"""Buckets, requests checked against a signature, batch assembly and answers, and the backends,
for the reference model and a user's model alike."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fa3trt
from fa3trt.buckets import Buckets, padding_ratio
from fa3trt.errors import ConfigError, InvalidInputError, MissingDependencyError
from fa3trt.models.spec import ReferenceSpec, SourceSpec
from fa3trt.requests import Checked, check_request
from fa3trt.serving import Backend, IdentityBackend, load_backend
from fa3trt.serving.batch import assemble, group_key, split, wire_dtype
from fa3trt.serving.torch_backend import TorchBackend
from fa3trt.serving.warmup import health_request, warmup_requests
from fa3trt.signature import Signature, TensorSpec
from fa3trt.transfer import lengths_to_device, to_host
from tests.utils import gpu, rel_err

TINY = ReferenceSpec(preset="tiny")
BUCKETS = Buckets((8, 32))


def test_bucket_index_and_limits() -> None:
    b = Buckets((128, 512, 2048))
    assert [b.index(n) for n in (1, 128, 129, 512, 513, 2048)] == [0, 0, 1, 1, 2, 2]
    assert [b.lower(i) for i in range(3)] == [1, 129, 513]
    assert b.batch_limit(0, 8192) == 64 and b.batch_limit(2, 1000) == 1
    with pytest.raises(InvalidInputError, match="2049 exceeds the largest bucket"):
        b.index(2049)
    with pytest.raises(InvalidInputError, match=">= 1, got 0"):
        b.index(0)
    for bad in ((), (512, 128), (0, 4), (4, 4)):
        with pytest.raises(ConfigError):
            Buckets(bad)
    assert padding_ratio([5, 1, 3]) == pytest.approx((15 - 9) / 15)


def reqs_of(sig: Signature, *arrays: np.ndarray, answer: np.dtype | None = None) -> list[Checked]:
    return [check_request(sig, {"x": a}, BUCKETS, answer) for a in arrays]


def test_a_padded_batch_and_its_answers_round_trip() -> None:
    sig = TINY.signature()
    rows = [np.random.default_rng(n).standard_normal((n, 256)).astype(np.float32) for n in (5, 1, 3)]
    reqs = reqs_of(sig, *rows)
    batch = assemble(sig, reqs, torch.device("cpu"), check_finite=True)
    x, lens = batch.inputs["x"], batch.inputs["seq_lens"]
    assert x.shape == (3, 5, 256) and lens.tolist() == [5, 1, 3] and lens.dtype == torch.int32
    assert torch.all(x[1, 1:] == 0) and batch.lengths == [5, 1, 3] and batch.size == 5
    assert batch.finite["x"].tolist() == [True, True, True]
    for r, back in zip(rows, split(sig, x, reqs)):  # cut back along the bucketed axis
        np.testing.assert_array_equal(back, r)
    assert group_key(sig, reqs[0]) == group_key(sig, reqs[1]) == ()  # pad: every request shares


def test_floats_travel_in_their_own_dtype_and_answer_in_the_requests() -> None:
    sig = ReferenceSpec(preset="tiny", dtype="bfloat16").signature()
    rows = [np.ones((4, 256), np.float64), np.ones((2, 256), np.float16)]
    reqs = [check_request(sig, {"x": r}, BUCKETS, r.dtype) for r in rows]
    assert [r.tensors["x"].dtype for r in reqs] == [np.float64, np.float16]  # not converted on the host
    batch = assemble(sig, reqs, torch.device("cpu"))
    assert batch.inputs["x"].dtype == torch.bfloat16 and torch.all(batch.inputs["x"][1, 2:] == 0)
    assert wire_dtype(sig, reqs) == torch.float32  # float64 wanted: float32 on the wire
    assert wire_dtype(sig, reqs[1:]) == torch.float16  # every request float16: half the bytes
    assert [a.dtype for a in split(sig, batch.inputs["x"].float(), reqs)] == [np.float64, np.float16]


def test_nonfinite_rows_are_found_per_input() -> None:
    sig = TINY.signature()
    bad = np.ones((3, 256), np.float32)
    bad[1, 7] = np.nan
    inf16 = np.full((2, 256), 70000.0)  # past float16's largest: Inf once converted
    batch = assemble(sig, reqs_of(sig, np.ones((4, 256), np.float32), bad), torch.device("cpu"), check_finite=True)
    assert batch.finite["x"].tolist() == [True, False]
    sig16 = ReferenceSpec(preset="tiny", dtype="float16").signature()
    batch = assemble(sig16, reqs_of(sig16, inf16), torch.device("cpu"), check_finite=True)
    assert batch.finite["x"].tolist() == [False]


def test_requests_are_checked_against_the_signature() -> None:
    sig = TINY.signature()
    with pytest.raises(InvalidInputError, match=r"inputs missing \['x'\]"):
        check_request(sig, {}, BUCKETS)
    with pytest.raises(InvalidInputError, match=r"input 'x' has size 7 on axis 1; it must be 256"):
        check_request(sig, {"x": np.zeros((3, 7), np.float32)}, BUCKETS)
    with pytest.raises(InvalidInputError, match=r"input 'x', axis S: sequence length 33 exceeds the largest bucket"):
        check_request(sig, {"x": np.zeros((33, 256), np.float32)}, BUCKETS)
    with pytest.raises(InvalidInputError, match="rank 2"):
        check_request(sig, {"x": np.zeros((256,), np.float32)}, BUCKETS)
    assert (
        check_request(sig, {"x": torch.zeros(3, 256, dtype=torch.bfloat16)}, BUCKETS).tensors["x"].dtype == np.float32
    )


def latent_signature() -> Signature:
    """A DiT's 4-D latents: H (bucketed) and W multiples of its patch size 2, H at least 4."""
    return Signature(
        inputs=(TensorSpec("hidden_states", "float32", (4, "H", "W")), TensorSpec("timestep", "float32", ())),
        output=TensorSpec("sample", "float32", (4, "H", "W")),
        bucketed="H",
        ranges={"H": (4, 64), "W": (2, 16)},
        steps={"H": 2, "W": 2},
    )


def test_axis_steps_and_lower_bounds_name_the_input_and_axis() -> None:
    sig, buckets = latent_signature(), Buckets((8, 16))
    ok = {"hidden_states": np.zeros((4, 6, 10), np.float32), "timestep": np.float32(0.5)}
    assert check_request(sig, ok, buckets).bucket == 0
    odd = dict(ok, hidden_states=np.zeros((4, 7, 10), np.float32))
    with pytest.raises(
        InvalidInputError, match=r"input 'hidden_states' has axis H=7, which is not a multiple of 2 .*send 6 or 8"
    ):
        check_request(sig, odd, buckets)
    small = dict(ok, hidden_states=np.zeros((4, 2, 10), np.float32))
    with pytest.raises(
        InvalidInputError, match=r"input 'hidden_states' has axis H=2; this model takes at least 4 along H"
    ):
        check_request(sig, small, buckets)
    wide = dict(ok, hidden_states=np.zeros((4, 6, 18), np.float32))
    with pytest.raises(InvalidInputError, match=r"axis W=18, outside this model's range \[2, 16\]"):
        check_request(sig, wide, buckets)
    # What a replica runs before it takes traffic, and its health check: only accepted sizes.
    assert sig.smallest_sizes() == {"H": 4, "W": 2}
    assert health_request(sig).tensors["hidden_states"].shape == (4, 4, 2)
    for i in range(2):
        for batch in warmup_requests(sig, buckets, i, 3):
            for r in batch:
                h, w = r.tensors["hidden_states"].shape[1:]
                assert h % 2 == 0 and w % 2 == 0 and h >= 4 and buckets.index(h) == i
    with pytest.raises(ConfigError, match="bucket 3 holds no size of axis 'H'"):
        sig.check_buckets(Buckets((3, 16)))
    with pytest.raises(
        ConfigError, match=r"the largest bucket \(128\) exceeds the most the model takes along 'H' \(64\)"
    ):
        sig.check_buckets(Buckets((16, 128)))


def test_shape_batching_groups_equal_shapes_and_equal_unbatched_inputs() -> None:
    sig = Signature(
        inputs=(TensorSpec("x", "float32", ("S", 4)), TensorSpec("ids", "float32", ("S", 3), batched=False)),
        output=TensorSpec("y", "float32", ("S", 4)),
        bucketed="S",
    )
    a = check_request(sig, {"x": np.zeros((5, 4), np.float32), "ids": np.zeros((5, 3), np.float32)}, BUCKETS)
    b = check_request(sig, {"x": np.ones((5, 4), np.float32), "ids": np.zeros((5, 3), np.float32)}, BUCKETS)
    c = check_request(sig, {"x": np.ones((5, 4), np.float32), "ids": np.ones((5, 3), np.float32)}, BUCKETS)
    d = check_request(sig, {"x": np.ones((6, 4), np.float32), "ids": np.ones((6, 3), np.float32)}, BUCKETS)
    assert group_key(sig, a) == group_key(sig, b) != group_key(sig, c) != group_key(sig, d)
    batch = assemble(sig, [a, b], torch.device("cpu"))
    assert batch.inputs["x"].shape == (2, 5, 4) and batch.inputs["ids"].shape == (5, 3)


def test_transfers() -> None:
    t = torch.randn(2, 3)
    assert to_host(t) is t
    strided = torch.tensor([[5, 0], [3, 0], [7, 0]], dtype=torch.int64)[:, 0]  # int64, stride 2
    lens = lengths_to_device(strided, torch.device("cpu"))
    assert lens.dtype == torch.int32 and lens.is_contiguous() and lens.tolist() == [5, 3, 7]


def test_torch_backend_serves_the_reference_model_per_sequence() -> None:
    be = load_backend("torch", TINY)
    assert isinstance(be, Backend) and isinstance(be, TorchBackend) and be.describe()["backend"] == "torch"
    assert [c.head_dim for c in be.calls] == [64] and not be.lengths_on_device  # recorded at load
    model = fa3trt.build_model(TINY.config())
    rows = [np.random.default_rng(n).standard_normal((n, 256)).astype(np.float32) for n in (31, 4)]
    reqs = [check_request(be.signature, {"x": r}, Buckets((32,))) for r in rows]
    y = be.run(assemble(be.signature, reqs, be.device).inputs)
    for i, r in enumerate(rows):
        with torch.inference_mode():
            assert rel_err(y[i, : len(r)], model(torch.from_numpy(r)[None])[0]) < 1e-5


def test_identity_backend_answers_with_its_one_input_in_the_output_dtype() -> None:
    be = load_backend("identity", ReferenceSpec(preset="tiny", dtype="float16"), device="cpu")
    assert isinstance(be, IdentityBackend) and isinstance(be, Backend)
    x = torch.randn(3, 8, 256)
    y = be.run({"x": x, "seq_lens": torch.tensor([8, 5, 1], dtype=torch.int32)})
    assert y.dtype == torch.float16 and y.device.type == "cpu"
    torch.testing.assert_close(y.float(), x.half().float(), rtol=0, atol=0)
    d = be.describe()
    assert d["backend"] == "identity" and d["attention_kernel"] is None and "tiny" in d["model"]["spec"]
    two = SourceSpec.model_validate(
        {
            "source": "python",
            "factory": "tests.fa3trt.serving.test_batch_backends:two_inputs",
            "inputs": {"a": {"axes": ["S", 4]}, "b": {"axes": ["S", 4]}},
            "output": {"axes": ["S", 4]},
            "bucketed_axis": "S",
        }
    )
    with pytest.raises(ConfigError, match="backend 'identity' answers each request with its input"):
        load_backend("identity", two)


def two_inputs() -> torch.nn.Module:
    class Add(torch.nn.Module):
        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return a + b

    return Add()


@gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("lengths", [(64, 64, 64), (64, 17, 1)], ids=["full", "ragged"])
def test_torch_backend_on_gpu_matches_each_sequence_alone_without_a_sync(lengths: tuple[int, ...], dtype: str) -> None:
    """Full batches run with lengths on the host (the dense kernels), padded ones with lengths on
    the device (FA3 or the CuTe kernel, bf16) or on the host (the SDPA kernels); neither assembly
    nor the run waits on the GPU, and every sequence equals the float32 model run on it alone."""
    be = load_backend("torch", ReferenceSpec(preset="tiny", dtype=dtype), device="cuda")
    ref = fa3trt.build_model(TINY.config())
    rows = [np.random.default_rng(n).standard_normal((n, 256)).astype(np.float32) for n in lengths]
    reqs = [check_request(be.signature, {"x": r}, Buckets((64,))) for r in rows]
    be.run(assemble(be.signature, reqs, be.device, lengths_on_device=be.lengths_on_device).inputs)  # compiles
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        batch = assemble(be.signature, reqs, be.device, lengths_on_device=be.lengths_on_device, check_finite=True)
        y = be.run(batch.inputs)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    y = y.float().cpu()
    for i, r in enumerate(rows):
        with torch.inference_mode():
            want = ref(torch.from_numpy(r)[None])[0]
        assert rel_err(y[i, : len(r)], want) < (1e-4 if dtype == "float32" else 3e-2)
        assert not y[i, len(r) :].any()


@gpu
@pytest.mark.parametrize("src", [np.float16, np.float32, np.float64])
def test_assemble_on_gpu_stages_through_pinned_memory(src: type) -> None:
    sig = ReferenceSpec(preset="tiny", dtype="bfloat16").signature()
    rows = [np.random.default_rng(i).standard_normal((n, 256)).astype(src) for i, n in enumerate((37, 100, 1))]
    # Leave NaN in the pinned pool: the staged padding is whatever a reused block holds, and
    # must still come out zero.
    for _ in range(3):
        torch.empty((3, 100, 256), dtype=torch.float32, pin_memory=True).fill_(float("nan"))
        torch.empty((3, 100, 256), dtype=torch.float16, pin_memory=True).fill_(float("nan"))
    reqs = [check_request(sig, {"x": r}, Buckets((128,))) for r in rows]
    batch = assemble(sig, reqs, torch.device("cuda"), check_finite=True)
    x = batch.inputs["x"]
    assert x.device.type == "cuda" and x.dtype == torch.bfloat16 and batch.finite["x"].tolist() == [True] * 3
    ref = assemble(sig, reqs, torch.device("cpu")).inputs["x"]  # the CPU path: converted once, padding zeroed
    torch.testing.assert_close(x.cpu(), ref, rtol=0, atol=0)
    host = to_host(x)
    assert host.is_pinned() and host.dtype == torch.bfloat16
    torch.testing.assert_close(host, ref, rtol=0, atol=0)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=gpu)])
def test_a_scalar_input_per_request_is_batched_as_a_row(device: str) -> None:
    """A DiT's timestep: a 0-d input per request, one row of the batch (staged on a GPU too)."""
    sig = Signature(
        inputs=(
            TensorSpec("x", "bfloat16", ("S", 4)),
            TensorSpec("timestep", "bfloat16", ()),
            TensorSpec("guidance", "float32", ()),
        ),
        output=TensorSpec("y", "bfloat16", ("S", 4)),
        bucketed="S",
    )
    reqs = [
        check_request(
            sig,
            {"x": np.full((5, 4), k, np.float32), "timestep": np.array(k / 10, dt), "guidance": np.array(3.5 + k)},
            BUCKETS,
        )
        for k, dt in enumerate((np.float32, np.float16))
    ]
    batch = assemble(sig, reqs, torch.device(device), check_finite=True)
    t, g = batch.inputs["timestep"].cpu(), batch.inputs["guidance"].cpu()
    assert t.shape == (2,) and t.dtype == torch.bfloat16 and g.dtype == torch.float32
    np.testing.assert_allclose(t.float().numpy(), [0.0, 0.1], rtol=1e-2)
    np.testing.assert_array_equal(g.numpy(), [3.5, 4.5])
    assert batch.finite["timestep"].tolist() == [True, True]


def test_load_backend_auto_and_errors() -> None:
    be = load_backend("auto")
    assert isinstance(be, TorchBackend)  # no TensorRT on this machine
    with pytest.raises(ConfigError, match="one of 'auto', 'torch', 'tensorrt', 'identity', got 'onnx'"):
        load_backend("onnx")  # type: ignore[arg-type]
    if not torch.cuda.is_available():
        with pytest.raises(MissingDependencyError, match="CUDA GPU"):
            load_backend("tensorrt")
