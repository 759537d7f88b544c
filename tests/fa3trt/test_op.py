"""The attention op (``fa3trt.op``) against a float64 math reference: numerics, FP8, validation."""

from __future__ import annotations

import pytest
import torch

import fa3trt
from fa3trt.errors import InvalidInputError
from fa3trt.kernels import fp8
from fa3trt.testing import reference_attention
from tests.utils import rel_err

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
        fp8.EMULATION_WARNED.clear()
        out = fa3trt.attention(q, k, v, mode=1)
    err = rel_err(out, reference_attention(q, k, v))
    assert 0 < err < 0.1, err  # > 0: the FP8 quantization really happened


def test_fp8_quantize_roundtrip() -> None:
    t = torch.randn(2, 16, 3, 8) * torch.tensor([1.0, 100.0, 0.01])[None, None, :, None]
    q8, descale = fp8.quantize(t)
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
