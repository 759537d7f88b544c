"""The kernel registry and selector: capabilities as data, one ``FA3TRT_ATTN_KERNEL`` vocabulary
for the op and the plugin, and the fall to the next kernel for what a kernel lacks (CPU)."""

from __future__ import annotations

import warnings

import pytest
import torch

from fa3trt.attention.kernels import KERNEL_ENV, KERNELS, fp8
from fa3trt.attention.kernels.registry import device_length_kernels, direct_write_kernels, get, names
from fa3trt.attention.kernels.selector import choose_enqueue_kernel, forced_kernel, kernel_for, lengths_on_device
from fa3trt.errors import ConfigError
from fa3trt.testing import reference_attention, run_kernel
from tests.utils import rel_err


def test_registry_lists_every_kernel_once_with_its_capabilities() -> None:
    assert names() == [
        "fa3",
        "cudnn_fp8",
        "flash_cute",
        "cudnn",
        "cudnn_padded",
        "flash",
        "flash_seqused",
        "efficient",
        "efficient_seqused",
        "math",
    ]
    assert all(KERNELS[n].name == n for n in names())
    # The lists the plugin reads are derived from the kernels' own declarations.
    assert device_length_kernels() == [
        "fa3",
        "cudnn_fp8",
        "flash_cute",
        "cudnn_padded",
        "flash_seqused",
        "efficient_seqused",
    ]
    assert direct_write_kernels() == ["fa3", "flash_cute", "cudnn_padded"]
    assert set(direct_write_kernels()) <= set(device_length_kernels())
    assert [n for n in names() if KERNELS[n].fp8] == ["fa3", "cudnn_fp8"]
    assert [n for n in names() if not KERNELS[n].dtypes] == ["cudnn_fp8"]  # FP8 only
    assert [n for n in names() if not KERNELS[n].cuda_only] == ["math"]
    with pytest.raises(ConfigError, match=r"no attention kernel is called 'fa4'; choose one of \['fa3'"):
        get("fa4")


def test_one_vocabulary_for_the_op_and_the_plugin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KERNEL_ENV, raising=False)
    assert forced_kernel() is None
    sm90 = (9, 0)
    everything = names()
    for name in names():
        monkeypatch.setenv(KERNEL_ENV, name)
        assert forced_kernel() == name  # every kernel name is valid for the op ...
        chosen = choose_enqueue_kernel(torch.bfloat16, everything, sm90, name)
        # ... and the plugin: the name itself where it reads lengths on the GPU, else its own choice.
        # (an FP8-only kernel is forced for mode 1 calls only).
        direct = name in device_length_kernels() and KERNELS[name].dtypes
        assert chosen == name if direct else chosen in device_length_kernels()
    monkeypatch.setenv(KERNEL_ENV, "efficient_seqused_v2")
    with pytest.raises(
        ConfigError, match=r"FA3TRT_ATTN_KERNEL='efficient_seqused_v2' is not an attention kernel; set one of \["
    ):
        forced_kernel()
    with pytest.raises(ConfigError, match="no attention kernel is called 'flash3'"):
        choose_enqueue_kernel(torch.bfloat16, everything, sm90, "flash3")


def test_enqueue_choice_respects_head_dims() -> None:
    # FlashAttention's CuTe kernel is built for some head dims only: others go to the next kernel.
    available = ["flash_cute", "cudnn", "cudnn_padded", "flash_seqused", "efficient_seqused"]
    assert choose_enqueue_kernel(torch.bfloat16, available, (9, 0), None, 128) == "flash_cute"
    assert choose_enqueue_kernel(torch.bfloat16, available, (9, 0), None, 80) == "cudnn_padded"
    assert choose_enqueue_kernel(torch.bfloat16, available, (8, 0), None, 80) == "flash_seqused"


def test_a_kernel_that_lacks_a_combination_falls_to_the_next(caplog: pytest.LogCaptureFixture) -> None:
    cpu = torch.device("cpu")
    # On a CPU only math runs: whatever is asked for, what it lacks lands there.
    assert kernel_for("flash_cute", cpu, torch.float32, 64).name == "math"
    assert kernel_for("math", cpu, torch.float32, 64).name == "math"
    assert "'flash_cute' has no kernel for torch.float32 at head dim 64" in caplog.text
    q, k, v = (torch.randn(2, 12, 2, 64) for _ in range(3))
    lens = torch.tensor([12, 5], dtype=torch.int32)
    assert rel_err(run_kernel("flash_cute", q, k, v, lens), reference_attention(q, k, v, lens)) < 1e-5


def test_lengths_on_device_follows_the_declarations() -> None:
    assert lengths_on_device("flash_cute", torch.bfloat16, 128)
    assert not lengths_on_device("flash_cute", torch.float32, 128)
    assert not lengths_on_device("flash_cute", torch.bfloat16, 80)
    assert lengths_on_device("efficient_seqused", torch.float32, 80)
    assert not lengths_on_device("cudnn", torch.bfloat16, 128) and not lengths_on_device("math", torch.float32, 64)


def test_fp8_falls_back_to_emulation_once_per_kernel_and_dtype() -> None:
    q, k, v = (torch.randn(1, 16, 2, 32) for _ in range(3))
    fp8.EMULATION_WARNED.clear()
    calls: list[torch.dtype] = []

    def emulated(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        calls.append(a.dtype)
        return KERNELS["math"].forward(a, b, c, None)

    with pytest.warns(RuntimeWarning, match="'math' kernel in torch.float32"):
        out = fp8.run_fp8(KERNELS["math"], q, k, v, None, emulated)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        out2 = fp8.run_fp8(KERNELS["math"], q, k, v, None, emulated)
    assert not [w for w in seen if issubclass(w.category, RuntimeWarning)]  # announced once
    assert calls == [torch.float32, torch.float32] and torch.equal(out, out2)
    assert 0 < rel_err(out, reference_attention(q, k, v)) < 0.1


def test_fp8_mode_loads_only_where_a_kernel_computes_in_fp8(monkeypatch: pytest.MonkeyPatch) -> None:
    from fa3trt.attention.kernels import fa3

    # A GPU with the CuTe kernel and cuDNN but no FA3: FP8 would be emulated, slower than bf16.
    reason = fp8.fp8_refusal("cuda", ["flash_cute", "cudnn", "efficient_seqused", "math"], 128)
    assert reason is not None and "fa3_build" in reason and "attn_mode to 0" in reason
    # FA3 built with FP8 at this head dim (a build without flash_attn_config holds every kernel).
    monkeypatch.setattr(fa3, "build_flags", lambda: {})
    assert fp8.fp8_refusal("cuda", ["fa3", "flash_cute", "cudnn"], 128) is None
    # ... and FA3 built without FP8.
    monkeypatch.setattr(fa3, "build_flags", lambda: {"FLASHATTENTION_DISABLE_FP8": True})
    assert fp8.fp8_refusal("cuda", ["fa3", "flash_cute", "cudnn"], 128) is not None
    # On the CPU the emulation is the numerics reference and loads.
    assert fp8.fp8_refusal("cpu", ["math"], 128) is None
