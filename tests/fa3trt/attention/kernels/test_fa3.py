"""FA3 proper (``fa3trt.attention.kernels.fa3``) and its forward-only build (``fa3trt.fa3_build``): what a build
holds, the build's switches on CPU; the kernel itself against the float64 reference on GPU."""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import fa3trt
from fa3trt.attention.kernels import fa3 as _fa3
from fa3trt.attention.kernels.registry import available_kernels
from fa3trt.errors import MissingDependencyError
from fa3trt.fa3_build import HEAD_DIMS, build_env, main
from fa3trt.testing import reference_attention, run_kernel
from tests.utils import gpu, rel_err

TOL = {torch.float16: 5e-3, torch.bfloat16: 2e-2}


@pytest.fixture
def fa3_config(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, bool]]:
    """A build's ``flash_attn_config`` module (FA3's setup.py writes it next to the interface),
    filled in by the test; the cached flags are re-read around it."""
    flags: dict[str, bool] = {}
    mod = types.ModuleType("flash_attn_config")
    mod.CONFIG = {"build_flags": flags}  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "flash_attn_config", mod)
    _fa3.build_flags.cache_clear()
    yield flags
    _fa3.build_flags.cache_clear()


def test_supports_what_the_forward_only_build_holds(fa3_config: dict[str, bool]) -> None:
    # What `python -m fa3trt.fa3_build` builds by default: head dims 64 and 128, bf16, fp16, FP8.
    fa3_config.update({f"FLASHATTENTION_DISABLE_HDIM{d}": d not in (64, 128) for d in HEAD_DIMS})
    fa3_config.update({"FLASHATTENTION_DISABLE_FP16": False, "FLASHATTENTION_DISABLE_FP8": False})
    ok = _fa3.supports_config
    assert ok(torch.bfloat16, 128) and ok(torch.float16, 64) and ok(torch.float8_e4m3fn, 128)
    assert ok(torch.bfloat16, 32) and ok(torch.bfloat16, 96)  # on the next kernel up (64, 128)
    assert not ok(torch.bfloat16, 192) and not ok(torch.bfloat16, 256)  # no kernel that wide
    assert not ok(torch.float32, 128)  # FA3 has no fp32 kernel
    assert not ok(torch.bfloat16, 100)  # not a multiple of 8
    fa3_config["FLASHATTENTION_DISABLE_FP16"] = True
    _fa3.build_flags.cache_clear()
    assert not ok(torch.float16, 128) and ok(torch.bfloat16, 128)


def test_a_build_without_a_config_holds_every_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "flash_attn_config", None)  # import fails: a build that predates it
    _fa3.build_flags.cache_clear()
    try:
        assert _fa3.build_flags() == {}
        assert _fa3.supports_config(torch.float16, 256) and _fa3.supports_config(torch.float8_e4m3fn, 192)
    finally:
        _fa3.build_flags.cache_clear()


def test_without_fa3_or_a_gpu() -> None:
    assert not _fa3.available("cpu")
    if _fa3.module() is None:
        q = torch.zeros(1, 4, 2, 128, dtype=torch.bfloat16)
        with pytest.raises(MissingDependencyError, match="fa3_build"):
            _fa3.attention(q, q, q)


def test_an_interface_without_the_op_is_not_used(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An FA3 interface that imports but registers no ``torch.ops.flash_attn_3.fwd`` with the
    arguments used here (another release's) is not offered, says why, and refuses calls."""
    if _fa3.op() is not None:
        pytest.skip("a real FA3 build is installed here")
    monkeypatch.setitem(sys.modules, "flash_attn_interface", types.ModuleType("flash_attn_interface"))
    _fa3.module.cache_clear()
    _fa3.op.cache_clear()
    try:
        with caplog.at_level("WARNING", logger="fa3trt.attention.kernels.fa3"):
            assert _fa3.module() is not None and _fa3.op() is None
        assert "torch.ops.flash_attn_3.fwd" in caplog.text and "fa3_build" in caplog.text
        assert not _fa3.available("cpu")
        q = torch.zeros(1, 4, 2, 128, dtype=torch.bfloat16)
        with pytest.raises(MissingDependencyError, match="torch.ops.flash_attn_3.fwd"):
            _fa3.attention(q, q, q)
    finally:
        _fa3.module.cache_clear()
        _fa3.op.cache_clear()


def test_build_env_keeps_only_the_forward_kernels_asked_for() -> None:
    env = build_env((128,), fp16=False)
    for off in (
        "BACKWARD",
        "SPLIT",
        "PAGEDKV",
        "APPENDKV",
        "LOCAL",
        "SOFTCAP",
        "PACKGQA",
        "SM80",
        "HDIM64",
        "HDIM96",
        "HDIM192",
        "HDIM256",
        "FP16",
    ):
        assert env[f"FLASH_ATTENTION_DISABLE_{off}"] == "TRUE", off
    for kept in ("HDIM128", "FP8", "VARLEN", "CLUSTER"):
        assert f"FLASH_ATTENTION_DISABLE_{kept}" not in env, kept
    assert env["FLASH_ATTENTION_FORCE_BUILD"] == "TRUE"
    with pytest.raises(ValueError, match="not FA3 kernel widths"):
        build_env((128, 80))


def test_build_refuses_a_tree_that_is_not_flash_attention(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main([str(tmp_path)])
    assert "hopper/setup.py not found" in capsys.readouterr().err
    (tmp_path / "hopper").mkdir()
    (tmp_path / "hopper" / "setup.py").write_text("")
    with pytest.raises(SystemExit):
        main([str(tmp_path)])
    assert "git submodule update --init csrc/cutlass" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(tmp_path), "--head-dims", "64,x"])
    assert "comma-separated integers" in capsys.readouterr().err


# ----------------------------------------------------------------------------- GPU
needs_fa3 = pytest.mark.skipif(
    not _fa3.available("cuda"), reason="FA3 is not installed (python -m fa3trt.fa3_build) or the GPU is not sm90"
)


def _qkv(b: int, s: int, h: int, d: int, dtype: torch.dtype) -> list[torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(5)
    return [torch.randn(b, s, h, d, generator=g, device="cuda").to(dtype) for _ in range(3)]


@gpu
@needs_fa3
def test_fa3_fp8_ragged_within_its_bound() -> None:
    """mode=1 runs FA3's e4m3 kernel with per-(batch, head) descale factors: within 6% of the
    float64 reference (e4m3 keeps 3 mantissa bits), with the padded rows zero."""
    q, k, v = _qkv(2, 512, 8, 128, torch.bfloat16)
    lens = torch.tensor([512, 200], dtype=torch.int32)
    out = fa3trt.attention(q, k, v, lens, mode=1)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, reference_attention(q, k, v, lens.cuda())) < 0.06
    assert torch.all(out[1, 200:] == 0)


@gpu
@needs_fa3
def test_fa3_hands_what_its_build_lacks_to_the_next_kernel() -> None:
    """fp32, and a head dim wider than any built kernel, still run (on the kernel after FA3)."""
    wide = 256 if not _fa3.supports_config(torch.bfloat16, 256) else None
    cases = [(torch.float32, 64)] + ([(torch.bfloat16, wide)] if wide else [])
    for dtype, d in cases:
        q, k, v = _qkv(2, 300, 4, d, dtype)
        lens = torch.tensor([300, 77], dtype=torch.int32)
        got = run_kernel("fa3", q, k, v, lens)
        assert rel_err(got, reference_attention(q, k, v, lens.cuda())) < (
            1e-4 if dtype == torch.float32 else TOL[dtype]
        ), (dtype, d)
    assert "fa3" in available_kernels("cuda")
