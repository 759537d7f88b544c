"""Buckets, batch assembly and the torch backend."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fa3trt
from fa3trt.buckets import Buckets, assemble, lengths_to_device, padding_ratio, to_host
from fa3trt.errors import ConfigError, InvalidInputError, MissingDependencyError
from fa3trt.serving.backends import Backend, IdentityBackend, TorchBackend, load_backend
from fa3trt.testing import split_rows
from tests.utils import gpu, rel_err


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


def test_assemble_split_roundtrip() -> None:
    rows = [np.random.rand(n, 8).astype(np.float32) for n in (5, 1, 3)]
    x, lens = assemble(rows)
    assert x.shape == (3, 5, 8) and lens.tolist() == [5, 1, 3] and lens.dtype == torch.int32
    assert torch.all(x[1, 1:] == 0)
    for r, back in zip(rows, split_rows(x, lens)):
        np.testing.assert_array_equal(back.numpy(), r)
    assert padding_ratio([5, 1, 3]) == pytest.approx((15 - 9) / 15)


def test_assemble_converts_mixed_dtypes() -> None:
    rows = [np.random.rand(4, 8).astype(np.float64), np.random.rand(2, 8).astype(np.float16)]
    x, _ = assemble(rows, torch.bfloat16)
    assert x.dtype == torch.bfloat16 and torch.all(x[1, 2:] == 0)
    for i, r in enumerate(rows):
        np.testing.assert_allclose(x[i, : len(r)].float().numpy(), r.astype(np.float32), rtol=1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("src", [np.float16, np.float32, np.float64])
def test_assemble_on_gpu_stages_through_pinned_memory(src: type) -> None:
    rows = [np.random.default_rng(i).standard_normal((n, 64)).astype(src) for i, n in enumerate((37, 100, 1))]
    # Leave NaN in the pinned pool: the staged padding is whatever a reused block holds, and
    # must still come out zero.
    for _ in range(3):
        torch.empty((3, 100, 64), dtype=torch.float32, pin_memory=True).fill_(float("nan"))
        torch.empty((3, 100, 64), dtype=torch.float16, pin_memory=True).fill_(float("nan"))
    x, lens = assemble(rows, torch.bfloat16, "cuda")
    assert x.device.type == "cuda" and x.dtype == torch.bfloat16 and lens.device.type == "cpu"
    ref, _ = assemble(rows, torch.bfloat16)  # the CPU path: the rows converted once, padding zeroed
    torch.testing.assert_close(x.cpu(), ref, rtol=0, atol=0)
    host = to_host(x)
    assert host.is_pinned() and host.dtype == torch.bfloat16
    torch.testing.assert_close(host, ref, rtol=0, atol=0)


def test_to_host_leaves_cpu_tensors_alone() -> None:
    t = torch.randn(2, 3)
    assert to_host(t) is t


def test_lengths_as_kernels_read_them() -> None:
    strided = torch.tensor([[5, 0], [3, 0], [7, 0]], dtype=torch.int64)[:, 0]  # int64, stride 2
    lens = lengths_to_device(strided, torch.device("cpu"))
    assert lens.dtype == torch.int32 and lens.is_contiguous() and lens.tolist() == [5, 3, 7]


def test_torch_backend_matches_model_per_sequence() -> None:
    cfg = fa3trt.ModelConfig.preset("tiny")
    be = load_backend("torch", cfg)
    assert isinstance(be, Backend) and be.describe()["backend"] == "torch"
    model = fa3trt.build_model(cfg)
    rows = [torch.randn(n, 256) for n in (31, 4)]
    x, lens = assemble(rows)
    y = be.run(x, lens)
    for i, r in enumerate(rows):
        assert rel_err(y[i, : len(r)], model(r[None])[0]) < 1e-5
    seen: list[tuple[tuple[int, ...], list[int]]] = []
    run = be.run

    def recording_run(x: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
        seen.append((tuple(x.shape), lens.tolist()))
        return run(x, lens)

    be.run = recording_run  # type: ignore[method-assign]
    be.warmup([(1, 8), (2, 16)])
    # Every shape at full length, then one ragged batch at the smallest (kernels with a
    # separately compiled ragged variant are ready for the first padded batch).
    assert seen == [((1, 8, 256), [8]), ((2, 16, 256), [16, 16]), ((1, 8, 256), [4])]


def test_identity_backend_answers_each_batch_with_itself_in_the_model_dtype() -> None:
    cfg = fa3trt.ModelConfig.preset("tiny", dtype="float16")
    be = load_backend("identity", cfg, device="cpu")
    assert isinstance(be, IdentityBackend) and isinstance(be, Backend)
    x = torch.randn(3, 8, 256)
    y = be.run(x, torch.tensor([8, 5, 1], dtype=torch.int32))
    assert y.dtype == torch.float16 and y.device.type == "cpu"
    torch.testing.assert_close(y.float(), x.half().float(), rtol=0, atol=0)
    d = be.describe()
    assert d["backend"] == "identity" and d["attention_kernel"] is None and d["model"]["hidden"] == 256
    with pytest.raises(InvalidInputError, match=r"shape \(batch, seq, 256\), got \(3, 8, 7\)"):
        be.run(torch.randn(3, 8, 7), torch.ones(3, dtype=torch.int32))


@pytest.mark.parametrize("kind", ["torch", "identity"])
def test_backends_refuse_bad_lengths(kind: str) -> None:
    be = load_backend(kind, fa3trt.ModelConfig.preset("tiny"))  # type: ignore[arg-type]
    x = torch.randn(2, 8, 256)
    with pytest.raises(InvalidInputError, match=r"seq_lens must lie in \[0, 8\].*\[9, 3\]"):
        be.run(x, torch.tensor([9, 3], dtype=torch.int32))
    with pytest.raises(InvalidInputError, match=r"seq_lens must lie in \[0, 8\].*\[-1, 3\]"):
        be.run(x, torch.tensor([-1, 3], dtype=torch.int32))
    with pytest.raises(InvalidInputError, match=r"shape \(2,\)"):
        be.run(x, torch.tensor([8], dtype=torch.int32))


@gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("lengths", [(64, 64, 64), (64, 17, 1)], ids=["full", "ragged"])
def test_torch_backend_on_gpu_matches_each_sequence_alone_without_a_sync(lengths: tuple[int, ...], dtype: str) -> None:
    """Full batches run without lengths, padded ones with lengths on the device (FA3 or the
    CuTe kernel, bf16) or on the host (the SDPA kernels); no path waits on the GPU inside
    ``run``, and every sequence equals the float32 model run on it alone."""
    cfg = fa3trt.ModelConfig.preset("tiny", dtype=dtype)
    be = load_backend("torch", cfg, device="cuda")
    ref = fa3trt.build_model(fa3trt.ModelConfig.preset("tiny"))
    rows = [torch.randn(n, cfg.hidden) for n in lengths]
    x, lens = assemble(rows, be.dtype, be.device)
    be.run(x, lens)  # compiles and plans
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = be.run(x, lens)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    y = y.float().cpu()
    for i, r in enumerate(rows):
        assert rel_err(y[i, : len(r)], ref(r[None])[0]) < (1e-4 if dtype == "float32" else 3e-2)
        assert not y[i, len(r) :].any()


def test_load_backend_auto_and_errors() -> None:
    be = load_backend("auto")
    assert isinstance(be, TorchBackend)  # no TensorRT on this machine
    with pytest.raises(ConfigError, match="one of 'auto', 'torch', 'tensorrt', 'identity', got 'onnx'"):
        load_backend("onnx")  # type: ignore[arg-type]
    if not torch.cuda.is_available():
        with pytest.raises(MissingDependencyError, match="CUDA GPU"):
            load_backend("tensorrt")
