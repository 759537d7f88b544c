"""Zeroing the padded rows of a (B, S, ...) batch (fa3trt.attention.kernels.tail), against a row-by-row loop."""

from __future__ import annotations

import pytest
import torch

from fa3trt.attention.kernels import tail as _tail
from tests.utils import gpu


def _expected(out: torch.Tensor, lens: list[int]) -> torch.Tensor:
    want = out.clone()
    for b, n in enumerate(lens):
        want[b, max(n, 0) :] = 0
    return want


def test_masked_fill_path_on_cpu() -> None:
    out = torch.randn(4, 9, 2, 3)
    lens = [9, 4, 0, 20]
    want = _expected(out, lens)
    got = _tail.zero_tail_(out, torch.tensor(lens, dtype=torch.int32), method="masked_fill")
    assert got is out and torch.equal(out, want)


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_triton_launcher_zeroes_and_clamps(dtype: torch.dtype) -> None:
    if _tail.triton_kernel() is None:
        pytest.skip("Triton is not installed")
    s = 37  # not a multiple of the kernel's row block
    out = torch.randn(5, s, 3, 128, device="cuda", dtype=dtype)
    lens_list = [-3, 0, 5, s, s + 100]
    lens = torch.tensor(lens_list, dtype=torch.int32, device="cuda")
    want = _expected(out, lens_list)
    clamped = torch.full((5,), -7, dtype=torch.int32, device="cuda")
    launch = _tail.zero_tail_launcher(out, lens, clamp_into=clamped)
    assert launch is not None
    launch()
    torch.cuda.synchronize()
    assert torch.equal(out, want)
    assert clamped.tolist() == [0, 0, 5, s, s]
    assert lens.tolist() == lens_list  # the input lengths are left as they were
    # Without clamp_into: the same zeroing, nothing else written.
    out2 = torch.randn(5, s, 3, 128, device="cuda", dtype=dtype)
    want2 = _expected(out2, lens_list)
    _tail.zero_tail_(out2, lens, method="triton")
    torch.cuda.synchronize()
    assert torch.equal(out2, want2)
