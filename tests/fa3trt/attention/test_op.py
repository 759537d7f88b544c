"""The attention op (``fa3trt.attention.op``) against a float64 math reference: numerics, FP8, validation."""

from __future__ import annotations

import pytest
import torch

import fa3trt
from fa3trt.attention.kernels import fp8
from fa3trt.errors import InvalidInputError
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
        (((2, 8, 4, 16), (2, 8, 3, 16), (2, 8, 3, 16)), "multiple of k's"),
        (((2, 8, 4, 16), (2, 9, 4, 16), (2, 8, 4, 16)), "k and v must share one shape"),
        (((2, 8, 4, 16), (3, 9, 4, 16), (3, 9, 4, 16)), "q's batch"),
        (((2, 8, 4, 16), (2, 9, 4, 8), (2, 9, 4, 8)), "head_dim"),
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
        out = torch.ops.attn.custom_attn(q, q, q, None, None, 0, False, 0.25)
        assert out.shape == q.shape


# ----------------------------------------------------------------------------- the general call
GENERAL = [
    # (B, Sq, Sk, H, Hk, D, causal, scale, q lengths, k lengths)
    pytest.param(2, 9, 13, 4, 4, 16, False, None, None, None, id="cross"),
    pytest.param(3, 11, 7, 4, 2, 16, False, None, [11, 4, 0], [7, 7, 3], id="cross-ragged-gqa"),
    pytest.param(2, 10, 10, 4, 1, 32, True, None, None, None, id="causal-mqa"),
    pytest.param(3, 10, 10, 2, 2, 16, True, 0.3, [10, 6, 1], None, id="causal-padded-scale"),
    pytest.param(2, 6, 12, 2, 2, 16, True, None, [6, 3], [12, 5], id="causal-cross-bottom-right"),
    pytest.param(2, 12, 5, 2, 2, 16, True, None, None, None, id="causal-more-queries-than-keys"),
    pytest.param(2, 8, 8, 2, 2, 16, False, None, [8, 5], [3, 8], id="separate-lengths"),
]


def _lens(x: list[int] | None) -> torch.Tensor | None:
    return None if x is None else torch.tensor(x, dtype=torch.int32)


@pytest.mark.parametrize("b, sq, sk, h, hk, d, causal, scale, lq, lk", GENERAL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_general_call_matches_reference(
    b: int, sq: int, sk: int, h: int, hk: int, d: int, causal: bool, scale: float | None,
    lq: list[int] | None, lk: list[int] | None, dtype: torch.dtype,
) -> None:  # fmt: skip
    g = torch.Generator().manual_seed(7)
    q = torch.randn(b, sq, h, d, generator=g).to(dtype)
    k, v = (torch.randn(b, sk, hk, d, generator=g).to(dtype) for _ in range(2))
    seq_lens, seq_lens_k = _lens(lq), _lens(lk)
    out = fa3trt.attention(q, k, v, seq_lens, seq_lens_k=seq_lens_k, causal=causal, softmax_scale=scale)
    assert out.shape == q.shape and out.dtype == dtype
    want = reference_attention(q, k, v, seq_lens, seq_lens_k, causal=causal, softmax_scale=scale)
    assert rel_err(out, want) < TOL[dtype]
    if lq is not None:
        for i, n in enumerate(lq):
            assert torch.all(out[i, n:] == 0)


def test_reference_general_call_by_hand() -> None:
    """The reference itself on a case small enough to write out: one query head group of two
    over one key head, causal bottom-right with 2 queries over 3 keys."""
    import numpy as np

    q = torch.randn(1, 2, 2, 4, dtype=torch.float64)
    k, v = (torch.randn(1, 3, 1, 4, dtype=torch.float64) for _ in range(2))
    got = reference_attention(q, k, v, causal=True, softmax_scale=0.5)
    for head in range(2):
        for i in range(2):
            visible = i + 1 + 1  # query i sees keys 0..i+1
            s = q[0, i, head].numpy() @ k[0, :visible, 0].numpy().T * 0.5
            p = np.exp(s - s.max())
            p /= p.sum()
            np.testing.assert_allclose(got[0, i, head].numpy(), p @ v[0, :visible, 0].numpy(), rtol=1e-12)


def test_bad_general_arguments() -> None:
    q = torch.randn(2, 8, 2, 16)
    k = torch.randn(2, 5, 2, 16)
    with pytest.raises(InvalidInputError, match=r"seq_lens_k must lie in \[0, 5\]"):
        fa3trt.attention(q, k, k, seq_lens_k=torch.tensor([6, 1], dtype=torch.int32))
    with pytest.raises(InvalidInputError, match="softmax_scale must be a finite number > 0"):
        fa3trt.attention(q, q, q, softmax_scale=0.0)
    with pytest.raises(InvalidInputError, match=r"seq_lens_k must have shape \(2,\)"):
        fa3trt.attention(q, k, k, seq_lens_k=torch.tensor([1], dtype=torch.int32))
