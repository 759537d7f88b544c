"""The attention kernels (``fa3trt.attention.kernels``): the cuDNN plan ledger and the CPU choice here; on
a GPU every kernel, dense and ragged, against the float64 reference."""

from __future__ import annotations

import math

import pytest
import torch

import fa3trt
from fa3trt.attention.kernels import cudnn, fa3, flash_cute
from fa3trt.attention.kernels.registry import available_kernels
from fa3trt.attention.kernels.selector import select_kernel
from fa3trt.errors import MissingDependencyError
from fa3trt.testing import reference_attention, run_kernel
from tests.utils import gpu, rel_err

TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def _qkv(b: int, s: int, h: int, d: int, dtype: torch.dtype, device: str = "cpu") -> list[torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(torch.seed() % (1 << 31))
    return [torch.randn(b, s, h, d, generator=g, device=device).to(dtype) for _ in range(3)]


def test_cudnn_takes_a_shape_once_its_work_would_repay_a_plan() -> None:
    seed = torch.empty(1, 15708, 32, 128)  # 4.04 TFLOP of attention per call
    per_call = 4.0 * 15708**2 * 32 * 128
    ledger = cudnn.PlanLedger()
    calls = math.ceil(ledger.after_flops / per_call)
    assert [ledger.ready(seed, 15708) for _ in range(calls)] == [False] * (calls - 1) + [True]
    assert ledger.ready(seed, 15708)
    # One request's layers are several calls of one shape: a short one-off shape stays on flash.
    short = torch.empty(1, 1500, 32, 128)
    assert not any(ledger.ready(short, 1500) for _ in range(48))
    assert not ledger.ready(seed, 15000)  # another shape starts from nothing
    ledger.flops.update({("x", i): 1.0 for i in range(ledger.max_shapes)})
    assert not ledger.ready(short, 1499) and len(ledger.flops) == 1  # bounded memory


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
    kernel = {"fa3": fa3, "flash_cute": flash_cute}[name]
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
    assert not flash_cute.available("cpu") and not flash_cute.FlashCute.available("cpu")
    q = torch.zeros(1, 4, 2, 128, dtype=torch.bfloat16)
    assert flash_cute.supports(q) and not flash_cute.supports(q.float()) and not flash_cute.supports(q[..., :32])
    if flash_cute.forward_fn() is None:
        with pytest.raises(MissingDependencyError, match="hopper"):
            flash_cute.attention(q, q, q)


# ----------------------------------------------------------------------------- GPU: the general call
GENERAL_GPU = [
    # (B, Sq, Sk, H, Hk, D, causal, scale, q lengths, k lengths)
    pytest.param(2, 300, 520, 8, 8, 128, False, None, None, None, id="cross-dense"),
    pytest.param(3, 300, 200, 8, 8, 128, False, None, [300, 17, 0], [200, 200, 9], id="cross-ragged"),
    pytest.param(2, 256, 256, 8, 2, 128, False, 0.05, [256, 100], None, id="gqa-scale-padded"),
    pytest.param(2, 256, 256, 8, 8, 64, True, None, None, None, id="causal-dense"),
    pytest.param(3, 256, 256, 8, 8, 128, True, None, [256, 99, 1], None, id="causal-padded"),
    pytest.param(2, 128, 384, 8, 4, 128, True, None, [128, 60], [384, 90], id="causal-cross-gqa"),
    pytest.param(2, 256, 256, 8, 8, 128, False, None, [256, 100], [40, 256], id="separate-lengths"),
]


@gpu
@pytest.mark.parametrize("b, sq, sk, h, hk, d, causal, scale, lq, lk", GENERAL_GPU)
@pytest.mark.parametrize("lengths_on", ["cpu", "cuda"])
def test_every_gpu_kernel_general_call(
    b: int, sq: int, sk: int, h: int, hk: int, d: int, causal: bool, scale: float | None,
    lq: list[int] | None, lk: list[int] | None, lengths_on: str,
) -> None:  # fmt: skip
    """Every kernel (or the next in line for what it lacks) on cross-attention, causal masks,
    grouped-query heads, a scale and separate query and key lengths, against float64."""
    dtype = torch.bfloat16
    g = torch.Generator(device="cuda").manual_seed(11)
    q = torch.randn(b, sq, h, d, device="cuda", generator=g).to(dtype)
    k, v = (torch.randn(b, sk, hk, d, device="cuda", generator=g).to(dtype) for _ in range(2))
    lens = None if lq is None else torch.tensor(lq, dtype=torch.int32, device=lengths_on)
    lens_k = None if lk is None else torch.tensor(lk, dtype=torch.int32, device=lengths_on)
    want = reference_attention(q, k, v, lens, lens_k, causal=causal, softmax_scale=scale)
    for name in available_kernels("cuda"):
        got = run_kernel(name, q, k, v, lens, lens_k, causal=causal, softmax_scale=scale)
        assert got.shape == q.shape, name
        assert rel_err(got, want) < TOL[dtype], name
        for i, n in enumerate(lq or []):
            assert torch.all(got[i, n:] == 0), name


@gpu
def test_fp8_model_is_refused_on_a_gpu_without_an_fp8_kernel() -> None:
    from fa3trt.attention.kernels.fp8 import fp8_refusal
    from fa3trt.errors import MissingDependencyError
    from fa3trt.models.spec import ReferenceSpec
    from fa3trt.serving.torch_backend import TorchBackend

    spec = ReferenceSpec(preset="tiny", attn_mode=1, dtype="bfloat16")
    if fp8_refusal("cuda", available_kernels("cuda"), spec.config().head_dim) is None:
        TorchBackend(spec, device="cuda")  # FA3's FP8 kernel is here: it loads
    else:
        with pytest.raises(MissingDependencyError, match="fa3_build"):
            TorchBackend(spec, device="cuda")


def test_cudnn_graphs_lengths_are_clamped_to_their_own_axis() -> None:
    # What a cuDNN graph's variant pack reads: query lengths within Sq, key lengths within Sk
    # (a key length past Sk would make cuDNN read past k), one tensor for padded self-attention.
    from fa3trt.attention.kernels.cudnn_graph import clamped_lengths

    def qk(sq: int, sk: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros(2, sq, 1, 8), torch.zeros(2, sk, 1, 8)

    lens = torch.tensor([5, 2], dtype=torch.int32)
    got, got_k = clamped_lengths(*qk(4, 4), lens, None)
    assert got.tolist() == [4, 2] and got_k is got
    got, got_k = clamped_lengths(*qk(4, 3), lens, lens)  # cross-attention, the same lengths for keys
    assert got.tolist() == [4, 2] and got_k.tolist() == [3, 2]
    got, got_k = clamped_lengths(*qk(4, 6), lens, None)  # no key lengths: every key
    assert got.tolist() == [4, 2] and got_k.tolist() == [6, 6]
    got, got_k = clamped_lengths(*qk(4, 4), None, None)
    assert got.tolist() == [4, 4] and got_k is got
    got, got_k = clamped_lengths(*qk(4, 4), lens, torch.tensor([1, 9]))
    assert got.tolist() == [4, 2] and got_k.tolist() == [1, 4] and got_k.dtype == torch.int32
