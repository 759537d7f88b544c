"""The attention op against a float64 math reference, on CPU and (marked) on GPU."""

from __future__ import annotations

import importlib
import math

import pytest
import torch

import fa3trt
from fa3trt.attention import available_kernels, fp8_quantize, reference_attention, run_kernel, select_kernel
from fa3trt.errors import InvalidInputError
from tests.utils import gpu, rel_err

# The module itself (the package exports a function of the same name).
A = importlib.import_module("fa3trt.attention")

# Tolerances for ||out - ref|| / ||ref|| (see the device method notes: fp32 far under 1e-3,
# bf16/fp16 operands between 1e-3 and 1e-2).
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def _qkv(b: int, s: int, h: int, d: int, dtype: torch.dtype, device: str = "cpu") -> list[torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(torch.seed() % (1 << 31))
    return [torch.randn(b, s, h, d, generator=g, device=device).to(dtype) for _ in range(3)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dense_matches_reference(dtype: torch.dtype) -> None:
    q, k, v = _qkv(2, 33, 4, 32, dtype)
    out = fa3trt.attention(q, k, v)
    assert out.shape == q.shape and out.dtype == dtype
    assert rel_err(out, reference_attention(q, k, v)) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_padded_batch_equals_each_sequence_alone(dtype: torch.dtype) -> None:
    lens = [40, 7, 1, 0, 25]
    q, k, v = _qkv(len(lens), max(lens), 2, 16, dtype)
    # Poison the padding: any read of a padded key would change the answer.
    for i, n in enumerate(lens):
        for t in (q, k, v):
            t[i, n:] = 1e4
    out = fa3trt.attention(q, k, v, torch.tensor(lens, dtype=torch.int32))
    for i, n in enumerate(lens):
        assert torch.all(out[i, n:] == 0), f"rows past length {n} of sequence {i} are not zero"
        if n:
            alone = reference_attention(q[i : i + 1, :n], k[i : i + 1, :n], v[i : i + 1, :n])
            assert rel_err(out[i : i + 1, :n], alone) < TOL[dtype]


def test_reference_is_plain_softmax_attention() -> None:
    # The reference itself, checked against a hand-written NumPy computation.
    import numpy as np

    q, k, v = _qkv(1, 5, 1, 3, torch.float64)
    s = q[0, :, 0].numpy() @ k[0, :, 0].numpy().T / np.sqrt(3)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    want = p @ v[0, :, 0].numpy()
    np.testing.assert_allclose(reference_attention(q, k, v)[0, :, 0].numpy(), want, rtol=1e-12)


def test_fp8_mode_error_bound() -> None:
    # FP8 e4m3 keeps 3 mantissa bits (relative step 2^-4); after softmax averaging the
    # output error stays well inside 10% of the output norm. This bound is the promise.
    q, k, v = _qkv(2, 64, 4, 64, torch.float32)
    with pytest.warns(RuntimeWarning, match="FP8"):
        A._fp8_warned = False
        out = fa3trt.attention(q, k, v, mode=1)
    err = rel_err(out, reference_attention(q, k, v))
    assert 0 < err < 0.1, err  # > 0: the FP8 quantization really happened


def test_fp8_quantize_roundtrip() -> None:
    t = torch.randn(2, 16, 3, 8) * torch.tensor([1.0, 100.0, 0.01])[None, None, :, None]
    q8, descale = fp8_quantize(t)
    assert q8.dtype == torch.float8_e4m3fn and descale.shape == (2, 3)
    back = q8.float() * descale[:, None, :, None]
    assert rel_err(back, t) < 0.05


@pytest.mark.parametrize(
    "shapes, match",
    [
        (((2, 8, 4), (2, 8, 4), (2, 8, 4)), "4-D"),
        (((2, 8, 4, 16), (2, 8, 2, 16), (2, 8, 2, 16)), "agree"),
        (((2, 8, 4, 16), (2, 9, 4, 16), (2, 9, 4, 16)), "agree"),
    ],
)
def test_bad_shapes(shapes: tuple, match: str) -> None:
    q, k, v = (torch.randn(*s) for s in shapes)
    with pytest.raises(InvalidInputError, match=match):
        fa3trt.attention(q, k, v)


def test_bad_seq_lens_and_dtype_and_mode() -> None:
    q, k, v = _qkv(2, 8, 2, 16, torch.float32)
    with pytest.raises(InvalidInputError, match=r"\[0, 8\].*max 9"):
        fa3trt.attention(q, k, v, torch.tensor([9, 3], dtype=torch.int32))
    with pytest.raises(InvalidInputError, match=r"shape \(2,\)"):
        fa3trt.attention(q, k, v, torch.tensor([3], dtype=torch.int32))
    with pytest.raises(InvalidInputError, match="int32"):
        fa3trt.attention(q, k, v, torch.tensor([3.0, 2.0]))
    with pytest.raises(InvalidInputError, match="float64"):
        fa3trt.attention(q.double(), k.double(), v.double())
    with pytest.raises(InvalidInputError, match="mode"):
        fa3trt.attention(q, k, v, mode=3)


def test_op_is_registered_with_fake_kernel() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(2, 8, 2, 16)
        out = torch.ops.attn.custom_attn(q, q, q, None, 0)
        assert out.shape == q.shape


def test_cudnn_takes_a_shape_once_its_work_would_repay_a_plan() -> None:
    seed = torch.empty(1, 15708, 32, 128)  # 4.04 TFLOP of attention per call
    per_call = 4.0 * 15708**2 * 32 * 128
    calls = math.ceil(A._CUDNN_AFTER_FLOPS / per_call)
    A._shape_flops.clear()
    assert [A._cudnn_ready(seed, 15708) for _ in range(calls)] == [False] * (calls - 1) + [True]
    assert A._cudnn_ready(seed, 15708)
    # One request's layers are several calls of one shape: a short one-off shape stays on flash.
    short = torch.empty(1, 1500, 32, 128)
    assert not any(A._cudnn_ready(short, 1500) for _ in range(48))
    assert not A._cudnn_ready(seed, 15000)  # another shape starts from nothing
    A._shape_flops.update({("x", i): 1.0 for i in range(A._CUDNN_MAX_SHAPES)})
    assert not A._cudnn_ready(short, 1499) and len(A._shape_flops) == 1  # bounded memory


def test_cpu_kernel_choice() -> None:
    assert select_kernel("cpu") == "math"
    assert available_kernels("cpu") == ["math"]


# ----------------------------------------------------------------------------- GPU
@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_every_gpu_kernel_dense_and_ragged(dtype: torch.dtype) -> None:
    lens = torch.tensor([300, 17, 256, 1], dtype=torch.int32)
    q, k, v = _qkv(4, 300, 8, 128, dtype, "cuda")
    want_dense = reference_attention(q, k, v)
    want_ragged = reference_attention(q, k, v, lens.cuda())
    for name in available_kernels("cuda"):
        got = run_kernel(name, q, k, v)
        assert rel_err(got, want_dense) < TOL[dtype], name
        for lens_on in (lens, lens.cuda()):
            got = run_kernel(name, q, k, v, lens_on)
            assert rel_err(got, want_ragged) < TOL[dtype], name
            for i, n in enumerate(lens.tolist()):
                assert torch.all(got[i, n:] == 0), name


@gpu
def test_gpu_default_kernel_and_fp8() -> None:
    q, k, v = _qkv(2, 512, 8, 128, torch.bfloat16, "cuda")
    name = select_kernel("cuda")
    major, _ = torch.cuda.get_device_capability()
    if major == 9:
        assert name in ("fa3", "flash_cute", "cudnn")
    out = fa3trt.attention(q, k, v, mode=1)
    assert rel_err(out, reference_attention(q, k, v)) < 0.1


@gpu
def test_ragged_batch_on_fused_qkv_views() -> None:
    """q, k, v as a fused QKV projection hands them over (views with a token stride of 3*H*D),
    through the default kernel's first, second and later sightings of the shape: every path it
    takes (flash before the shape recurs, cuDNN after) matches the reference and zeroes the tails."""
    g = torch.Generator(device="cuda").manual_seed(3)
    qkv = torch.randn(3, 700, 3, 8, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    q, k, v = qkv.unbind(2)
    assert not q.is_contiguous()
    lens = torch.tensor([700, 513, 9], dtype=torch.int32)
    want = reference_attention(q, k, v, lens.cuda())
    for name in [n for n in ("cudnn", "flash_cute", "fa3") if n in available_kernels("cuda")]:
        for lens_on in (lens, lens.cuda(), lens.cuda(), lens):
            got = run_kernel(name, q, k, v, lens_on)
            assert rel_err(got, want) < TOL[torch.bfloat16], name
            for i, n in enumerate(lens.tolist()):
                assert torch.all(got[i, n:] == 0), name


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["fa3", "flash_cute"])
def test_flashattention_kernels_run_on_the_current_stream_into_out(name: str, dtype: torch.dtype) -> None:
    """FA3 and FlashAttention's CuTe kernel queue on torch's current stream (the TensorRT plugin
    sets it to TensorRT's): q is written on a side stream after a long GPU sleep, so a launch
    on any other stream reads zeros. With ``out=`` the result lands in the caller's buffer;
    rows past a length are zero."""
    if name not in available_kernels("cuda"):
        pytest.skip(f"{name} is not installed here or the GPU is not sm90")
    from fa3trt import _fa3, _flash_cute

    kernel = {"fa3": _fa3, "flash_cute": _flash_cute}[name]
    q_true, k, v = _qkv(3, 640, 8, 128, dtype, "cuda")
    lens = torch.tensor([640, 129, 1], dtype=torch.int32, device="cuda")
    q = torch.zeros_like(q_true)
    out = torch.full_like(q, float("nan"))
    kernel.attention(q, k, v, lens, out=out)  # compile or load outside the race
    side = torch.cuda.Stream()
    torch.cuda.synchronize()
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)
        q.copy_(q_true)
        got = kernel.attention(q, k, v, lens, out=out)
    torch.cuda.synchronize()
    assert got.data_ptr() == out.data_ptr()
    want = reference_attention(q_true, k, v, lens)
    for i, n in enumerate(lens.tolist()):
        assert rel_err(out[i, :n], want[i, :n]) < TOL[dtype]
        assert torch.all(out[i, n:] == 0)


def test_flash_cute_without_the_package_or_a_gpu() -> None:
    """Off sm90 (or without the wheels) the CuTe kernel is not offered, and calling it directly
    says what to install."""
    from fa3trt import _flash_cute

    assert not _flash_cute.available("cpu")
    q = torch.zeros(1, 4, 2, 128, dtype=torch.bfloat16)
    assert _flash_cute.supports(q) and not _flash_cute.supports(q.float()) and not _flash_cute.supports(q[..., :32])
    if _flash_cute._forward() is None:
        with pytest.raises(RuntimeError, match="hopper"):
            _flash_cute.attention(q, q, q)
