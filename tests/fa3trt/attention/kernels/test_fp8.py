"""FP8 attention (mode 1): quantization, the FP8 kernel's choice, the numerics reference against
float64 (CPU), and every FP8 kernel of the GPU against float64 at the project's shapes (GPU)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import fa3trt
from fa3trt.attention.kernels import KERNEL_ENV, KERNELS, fp8
from fa3trt.attention.kernels.base import FP8_DTYPE, FP8_MAX
from fa3trt.attention.kernels.quantize import quantize_pow2
from fa3trt.attention.kernels.registry import available_kernels
from fa3trt.attention.kernels.scale_cast import absmax, scale_cast
from fa3trt.attention.op import recording_calls
from fa3trt.testing import reference_attention
from tests.models import flux_inputs, tiny_flux
from tests.utils import gpu, rel_err

FP8_BOUND = 0.08
"""What FP8 e4m3 attention keeps of the answer: the relative error against float64 of the
emulation (CPU) and of every FP8 kernel (GPU), on unit-normal q, k, v."""


def _qkv(
    b: int,
    s: int,
    h: int,
    d: int,
    dtype: torch.dtype,
    device: str = "cpu",
    sk: int | None = None,
    hk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(b * 1000 + s + h + d)
    q = torch.randn(b, s, h, d, generator=g)
    k, v = (torch.randn(b, sk or s, hk or h, d, generator=g) for _ in range(2))
    return q.to(device, dtype), k.to(device, dtype), v.to(device, dtype)


def _want_descale(t: torch.Tensor, groups: int) -> np.ndarray:
    """The quantization's factors by its rule, in NumPy float64: a power of two putting the amax of
    every 16th row of the group within (128, 256], unless the group's true amax would then pass
    448; then the true amax's."""
    a = np.abs(t.double().numpy())

    def per_group(x: np.ndarray) -> np.ndarray:  # (B, rows, H, D): max per (B, group), or of all as (1,)
        return x.reshape(x.shape[0], x.shape[1], groups, -1).max(axis=(1, 3)) if groups else x.max().reshape(1)

    amax, est = (per_group(x).clip(1e-12) for x in (a, a[:, ::16]))

    def up(x: np.ndarray) -> np.ndarray:
        mant, exp = np.frexp(x)
        return exp - (mant == 0.5)

    final = np.where(amax * 2.0 ** (8 - up(est)) > FP8_MAX, up(amax), up(est))
    return 2.0 ** (final - 8)


def _within_half_a_step(back: torch.Tensor, t: torch.Tensor, descale: torch.Tensor) -> bool:
    """Every value back within half an e4m3 step of where it was: 2^-4 of it (3 mantissa bits), or
    2^-10 of the factor below e4m3's normal range (subnormals 2^-9 apart): nothing clipped."""
    per = descale if descale.numel() == 1 else descale.repeat_interleave(t.shape[2] // descale.shape[1], 1)
    per = per.reshape(-1) if descale.numel() == 1 else per[:, None, :, None]
    return bool(((back - t).abs() <= torch.maximum(t.abs() / 16, per / 1024)).all())


def test_per_tensor_quantization_puts_the_amax_within_the_e4m3_range_by_a_power_of_two() -> None:
    t = torch.randn(2, 40, 3, 8) * torch.tensor([1.0, 100.0, 0.01])[None, None, :, None]
    q8, descale = fp8.quantize(t, per_tensor=True)
    assert q8.dtype == FP8_DTYPE and q8.is_contiguous() and descale.shape == (1,) and descale.dtype == torch.float32
    np.testing.assert_array_equal(descale.double().numpy(), _want_descale(t, 0))
    assert 128 < t.abs().max() / descale <= FP8_MAX
    back = fp8.dequantize(q8, descale, torch.float32)
    assert _within_half_a_step(back, t, descale)
    # One factor for the tensor: the 0.01 head falls below e4m3's normal range and loses precision
    # that per-head factors keep. Both are within the bound on the whole tensor.
    assert rel_err(back, t) < 0.05
    assert rel_err(back[:, :, 2], t[:, :, 2]) > rel_err(
        fp8.dequantize(*fp8.quantize(t), torch.float32)[:, :, 2], t[:, :, 2]
    )
    zeros, dz = fp8.quantize(torch.zeros(1, 4, 2, 8), per_tensor=True)  # no division by a zero amax
    assert torch.isfinite(dz).all() and torch.equal(zeros.float(), torch.zeros(1, 4, 2, 8))


def test_a_large_value_the_sample_misses_gets_its_groups_factor_from_the_true_amax() -> None:
    t = torch.randn(3, 50, 4, 8)
    t[1, 7, 2, 5] = 1000.0  # row 7: not in the sample (rows 0, 16, 32, 48)
    t[2, 32, 1, 0] = -300.0  # in it
    q8, descale = fp8.quantize(t)
    np.testing.assert_array_equal(descale.double().numpy(), _want_descale(t, 4))
    assert descale[1, 2] == 4.0 and descale[2, 1] == 2.0  # 1000 -> 250, -300 -> -150
    assert descale[1, 1] <= 1 / 32 and descale[0, 2] <= 1 / 32  # the others: from their own values
    back = fp8.dequantize(q8, descale, torch.float32)
    # 1000 / 4 = 250: e4m3's nearest is 256 (steps of 16 there); at the sample's factor it would clip to 7.
    assert _within_half_a_step(back, t, descale) and back[1, 7, 2, 5] == 1024.0
    # A batch row's values and factors are its own, whatever it is batched with.
    alone, d_alone = fp8.quantize(t[1:2, :20])
    together, d_together = fp8.quantize(torch.cat([t[1:2, :20], 1e3 * torch.randn(2, 20, 4, 8)]))
    assert torch.equal(alone.float(), together[:1].float()) and torch.equal(d_alone, d_together[:1])


@pytest.mark.parametrize("per_tensor", [False, True])
def test_strided_views_quantize_like_their_copies(per_tensor: bool) -> None:
    qkv = torch.randn(2, 12, 3, 4, 16)  # a fused QKV projection's output: q, k, v are strided views
    q = qkv[:, :, 0]
    a, da = fp8.quantize(q, per_tensor=per_tensor)
    b, db = fp8.quantize(q.contiguous(), per_tensor=per_tensor)
    assert torch.equal(a.float(), b.float()) and torch.equal(da, db)


def test_padding_past_a_length_counts_for_no_factor_and_is_quantized_to_zero() -> None:
    t = torch.randn(2, 40, 4, 8)
    t[0, 25:] = 1e4  # row 0 is 20 long: what its batch pads it with
    lens = torch.tensor([20, 40], dtype=torch.int32)
    for groups in (4, 2, 0):
        q8, descale = quantize_pow2(t, groups, FP8_DTYPE, FP8_MAX, lengths=lens)
        alone, d_alone = quantize_pow2(t[:1, :20], groups, FP8_DTYPE, FP8_MAX)
        assert torch.equal(q8[0, :20].float(), alone[0].float()) and torch.equal(
            q8[0, 20:].float(), torch.zeros(20, 4, 8)
        )
        if groups:  # (one factor for the tensor: row 1's values share it)
            assert torch.equal(descale[:1], d_alone)
        np.testing.assert_array_equal(descale.double().numpy(), _want_descale(_masked(t, lens), groups))
    with pytest.raises(ValueError, match=r"lengths of shape \(3,\) for 2 batch rows"):
        quantize_pow2(t, 4, FP8_DTYPE, FP8_MAX, lengths=torch.tensor([1, 2, 3], dtype=torch.int32))


def _masked(t: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    """``t`` with each batch row's rows past its length zeroed."""
    keep = torch.arange(t.shape[1])[None, :] < lens[:, None]
    return t * keep[:, :, None, None]


def test_per_head_quantization_puts_each_heads_amax_within_the_e4m3_range() -> None:
    t = torch.randn(2, 40, 3, 8) * torch.tensor([1.0, 100.0, 0.01])[None, None, :, None]
    q8, descale = fp8.quantize(t)
    assert descale.shape == (2, 3) and descale.dtype == torch.float32
    np.testing.assert_array_equal(descale.double().numpy(), _want_descale(t, 3))
    ratio = t.abs().amax(dim=(1, 3)) / descale
    assert bool(((ratio > 128) & (ratio <= FP8_MAX)).all()), ratio
    assert _within_half_a_step(fp8.dequantize(q8, descale, torch.float32), t, descale)
    with pytest.raises(ValueError, match=r"pass one element or \(2, G\) with G dividing 3"):
        scale_cast(t, torch.ones(3, 2), FP8_DTYPE)
    with pytest.raises(ValueError, match="2 groups do not divide the tensor's 3 heads"):
        fp8.quantize(t, heads=2)


@pytest.mark.parametrize("per_tensor", [False, True])
def test_fp8_numerics_reference_is_within_the_bound(per_tensor: bool) -> None:
    """The emulation (e4m3 inputs computed in float32) against float64: what the GPU kernels meet too."""
    q, k, v = _qkv(2, 96, 4, 64, torch.float32)
    want = reference_attention(q.double(), k.double(), v.double())
    deq = [fp8.dequantize(*fp8.quantize(t, per_tensor), torch.float32) for t in (q, k, v)]
    err = rel_err(reference_attention(*deq), want)
    assert 0.005 < err < FP8_BOUND, err  # > 0.005: the quantization really happened


def test_the_fp8_kernel_is_the_first_fp8_kernel_that_takes_the_call(monkeypatch: pytest.MonkeyPatch) -> None:
    from fa3trt.attention.kernels import fa3

    monkeypatch.setattr(fa3, "build_flags", lambda: {})  # FA3 built with every kernel
    sm90 = ["fa3", "cudnn_fp8", "flash_cute", "cudnn", "cudnn_padded", "math"]
    assert fp8.choose_fp8_kernel(sm90, 128) is KERNELS["fa3"]
    assert fp8.choose_fp8_kernel(sm90, 128, "cudnn_fp8") is KERNELS["cudnn_fp8"]  # forced
    assert fp8.choose_fp8_kernel(sm90, 128, "cudnn") is KERNELS["fa3"]  # a bf16 kernel forced: mode 1's own choice
    no_fa3 = [n for n in sm90 if n != "fa3"]
    assert fp8.choose_fp8_kernel(no_fa3, 128) is KERNELS["cudnn_fp8"]
    assert fp8.choose_fp8_kernel(no_fa3, 128, cross=True, gqa=True) is KERNELS["cudnn_fp8"]
    assert fp8.choose_fp8_kernel(no_fa3, 128, causal=True) is None  # cuDNN's FP8 graph here is non-causal
    assert fp8.choose_fp8_kernel(sm90, 128, "cudnn_fp8", causal=True) is KERNELS["fa3"]
    assert fp8.choose_fp8_kernel(no_fa3, 320) is None  # past cuDNN's head dims
    monkeypatch.setattr(fa3, "build_flags", lambda: {"FLASHATTENTION_DISABLE_FP8": True})
    assert fp8.choose_fp8_kernel(sm90, 128) is KERNELS["cudnn_fp8"]
    assert fp8.choose_fp8_kernel(["math"], 128) is None  # the CPU: emulated


def test_mode_1_loads_where_cudnn_has_its_fp8_kernel() -> None:
    assert fp8.fp8_refusal("cuda", ["cudnn_fp8", "flash_cute", "cudnn"], 128) is None
    # A causal model: cuDNN's FP8 graph here is non-causal, so its calls would be emulated.
    causal = fp8.fp8_refusal("cuda", ["cudnn_fp8", "flash_cute", "cudnn"], 128, causal=True)
    assert causal is not None and "a causal FP8 attention kernel" in causal
    reason = fp8.fp8_refusal("cuda", ["flash", "efficient_seqused", "math"], 128)  # a GPU before Hopper
    assert reason is not None and "nvidia-cudnn-frontend" in reason and "fa3_build" in reason


def test_a_routed_model_opts_into_fp8(monkeypatch: pytest.MonkeyPatch) -> None:
    """``attn_mode=1`` on routing: every routed call is an FP8 call, and the answer stays within
    FP8's reach of the eager unrouted model."""
    model, inputs = tiny_flux(), flux_inputs(b=2, img=16, txt=8)
    with torch.no_grad():
        want = model(**inputs).sample
        with (
            recording_calls() as calls,
            fa3trt.route_attention(model, attn_mode=1) as report,
            warnings.catch_warnings(),
        ):
            warnings.simplefilter("ignore", RuntimeWarning)  # the CPU's emulation is announced
            got = model(**inputs).sample
    assert report.routed == 4 and {c.mode for c in calls} == {1}
    err = rel_err(got, want)
    assert 0 < err < FP8_BOUND, err
    with pytest.raises(fa3trt.ConfigError, match="attn_mode must be 0"), fa3trt.route_attention(model, attn_mode=2):
        pass


def test_a_source_in_fp8_must_be_routed() -> None:
    from pydantic import ValidationError

    from fa3trt.models.spec import SourceSpec

    fields = {
        "source": "python",
        "factory": "tests.factories:encoder",
        "inputs": {"x": {"axes": ["S", 8]}},
        "bucketed_axis": "S",
    }
    with pytest.raises(ValidationError, match="attn_mode 1 .* set model.routing to auto"):
        SourceSpec(**fields, routing="off", attn_mode=1)


class _SdpaBlock(torch.nn.Module):
    """Two self-attention layers calling PyTorch's SDPA (what routing sends to the op)."""

    def __init__(self, c: int = 32, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.ModuleList(torch.nn.Linear(c, 3 * c) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, c = x.shape
        for proj in self.qkv:
            q, k, v = proj(x).view(b, s, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
            x = x + torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, c)
        return x


def test_export_records_fp8_on_each_plugin_node(tmp_path: pytest.TempPathFactory) -> None:
    torch.manual_seed(0)
    model = _SdpaBlock().eval()
    inputs, axes = {"x": torch.randn(2, 16, 32)}, {"x": {0: "B", 1: "S"}}
    res = fa3trt.export_onnx(model, tmp_path / "m.onnx", inputs, axes, attn_mode=1)  # type: ignore[operator]
    assert res.plugin_nodes == 2 and [p["mode"] for p in res.plugins] == [1, 1]
    plain = fa3trt.export_onnx(model, tmp_path / "p.onnx", inputs, axes)  # type: ignore[operator]
    assert [p["mode"] for p in plain.plugins] == [0, 0]


# --------------------------------------------------------------------------- GPU
def _fp8_kernels() -> list[str]:
    if not torch.cuda.is_available():
        return []
    return [n for n in available_kernels("cuda") if KERNELS[n].fp8]


def _forced(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """``name`` forced for this test only: the process's cached choices are set aside meanwhile."""
    from fa3trt.attention.kernels import selector

    monkeypatch.setenv(KERNEL_ENV, name)
    monkeypatch.setattr(fp8, "_chosen", {})
    monkeypatch.setattr(selector, "_selected", {})


@gpu
@pytest.mark.parametrize(
    "case",
    ["dense", "ragged", "cross", "gqa", "head_dim_64"],
)
def test_every_fp8_kernel_within_the_bound(monkeypatch: pytest.MonkeyPatch, case: str) -> None:
    kernels = _fp8_kernels()
    if not kernels:
        pytest.skip("no FP8 attention kernel on this GPU (sm90+ with the cuDNN frontend, or FA3 with FP8)")
    shapes = {
        "dense": dict(b=2, s=512, h=8, d=128),
        "ragged": dict(b=3, s=384, h=8, d=128),
        "cross": dict(b=2, s=256, h=8, d=128, sk=384),
        "gqa": dict(b=2, s=256, h=8, d=128, hk=2),
        "head_dim_64": dict(b=2, s=300, h=4, d=64),
    }[case]
    q, k, v = _qkv(**shapes, dtype=torch.bfloat16, device="cuda")  # type: ignore[arg-type]
    lens = lens_k = None
    if case == "ragged":
        lens = torch.tensor([384, 200, 1], dtype=torch.int32, device="cuda")
    if case == "cross":
        lens, lens_k = (torch.tensor(x, dtype=torch.int32, device="cuda") for x in ([256, 100], [384, 37]))
    want = reference_attention(q.double(), k.double(), v.double(), None if lens is None else lens.cpu(),
                               None if lens_k is None else lens_k.cpu())  # fmt: skip
    for name in kernels:
        _forced(monkeypatch, name)
        kernel = fp8.fp8_kernel(q.device, q.shape[-1], cross=case == "cross", gqa=case == "gqa")
        if kernel is None or kernel.name != name:
            continue  # this kernel does not take the call (its build lacks it)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # an emulated fallback would fail here
            got = fa3trt.attention(q, k, v, lens, mode=1, seq_lens_k=lens_k)
        assert got.dtype == torch.bfloat16
        if lens is None:
            assert 0.005 < rel_err(got, want) < FP8_BOUND, (name, rel_err(got, want))
            continue
        for i, n in enumerate(lens.tolist()):
            assert rel_err(got[i, :n], want[i, :n]) < FP8_BOUND, (name, i, rel_err(got[i, :n], want[i, :n]))
            assert torch.all(got[i, n:] == 0), (name, i)


def test_absmax_is_the_largest_magnitude_per_group_of_heads() -> None:
    # Against NumPy in float64; on the CPU it is the torch reduction (the Triton pass: GPU test below).
    import numpy as np

    t = torch.randn(3, 37, 8, 16, dtype=torch.bfloat16)
    t[1, 5, 6, 3] = -50.0  # a negative extreme in one group only
    a = t.double().numpy()
    for groups in (0, 8, 4, 1):
        got = absmax(t, groups)
        assert got.dtype == torch.float32
        if groups == 0:
            want = np.abs(a).max().reshape(1)
        else:
            want = np.abs(a.reshape(3, 37, groups, 8 // groups, 16)).max(axis=(1, 3, 4))
        np.testing.assert_array_equal(got.double().numpy(), want)
    with pytest.raises(ValueError, match="3 groups do not divide the tensor's 8 heads"):
        absmax(t, 3)


@gpu
def test_triton_quantization_equals_the_torch_ops() -> None:
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("e4m3 casts need sm89+")
    qkv = torch.randn(3, 777, 3, 8, 128, device="cuda", dtype=torch.bfloat16) * 3
    qkv[1, 21, 0, 5, 7] = 2000.0  # off the sample (every 16th row): its group is cast again
    for t in (qkv[:, :, 0], qkv[:, :, 2].contiguous(), qkv[:1, :, 1], qkv[:, :300, 0]):
        for groups in (0, 8, 4):  # per tensor, per head, GQA's q (2 heads per key head)
            (fast, d_fast), (ops, d_ops) = (
                quantize_pow2(t, groups, FP8_DTYPE, FP8_MAX, method=m) for m in ("triton", "torch")
            )
            assert torch.equal(fast.view(torch.uint8), ops.view(torch.uint8)), (t.shape, groups)
            assert torch.equal(d_fast, d_ops), (t.shape, groups)
            np.testing.assert_array_equal(d_fast.double().cpu().numpy(), _want_descale(t.cpu(), groups))
            amax = absmax(t, groups, method="torch")  # the amax itself, by one Triton pass
            assert torch.equal(absmax(t.contiguous(), groups, method="triton"), amax), (t.shape, groups)
            # ... and back (an e4m3 output into the model's dtype), with the same factors.
            back = [scale_cast(fast, d_fast, torch.bfloat16, method=m) for m in ("triton", "torch")]
            assert torch.equal(back[0], back[1]), (t.shape, groups)
            # A padded batch: each row's padding past its length (on the device) counts for nothing.
            lens = torch.tensor([t.shape[1], 21, 300][: t.shape[0]], dtype=torch.int32, device="cuda")
            (fast, d_fast), (ops, d_ops) = (
                quantize_pow2(t, groups, FP8_DTYPE, FP8_MAX, lengths=lens, method=m) for m in ("triton", "torch")
            )
            assert torch.equal(fast.view(torch.uint8), ops.view(torch.uint8)), (t.shape, groups, "lengths")
            assert torch.equal(d_fast, d_ops), (t.shape, groups, "lengths")


@gpu
def test_fp8_runs_inside_a_cuda_graph() -> None:
    if "cudnn_fp8" not in _fp8_kernels():
        pytest.skip("cuDNN's FP8 SDPA is not available here")
    q, k, v = _qkv(2, 256, 8, 128, torch.bfloat16, "cuda")
    lens = torch.tensor([256, 77], dtype=torch.int32, device="cuda")
    fa3trt.attention(q, k, v, lens, mode=1)  # builds the plan and the constants outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fa3trt.attention(q, k, v, lens, mode=1)
    for _ in range(2):  # new values in the captured buffers, then replay
        for t in (q, k, v):
            t.copy_(torch.randn_like(t))
        lens.copy_(torch.tensor([100, 256], dtype=torch.int32, device="cuda"))
        graph.replay()
        want = fa3trt.attention(q, k, v, lens, mode=1)
        assert torch.equal(out, want)


@gpu
def test_a_served_model_in_fp8_answers_close_to_its_bf16_answer() -> None:
    """The torch backend loads the reference model in mode 1 where an FP8 kernel exists (it
    refuses it elsewhere: ``test_kernels``), and its answers stay within FP8's reach of mode 0's."""
    from fa3trt.models.spec import ReferenceSpec
    from fa3trt.serving.torch_backend import TorchBackend

    if not _fp8_kernels():
        pytest.skip("no FP8 attention kernel on this GPU")
    lens = torch.tensor([128, 50], dtype=torch.int32)
    outs = []
    for mode in (0, 1):
        backend = TorchBackend(ReferenceSpec(preset="tiny", attn_mode=mode, dtype="bfloat16"), device="cuda")
        x = torch.randn(2, 128, backend.spec.config().hidden, generator=torch.Generator().manual_seed(0))
        outs.append(backend.run({"x": x.to("cuda", torch.bfloat16), "seq_lens": lens}).float())
    for i, n in enumerate(lens.tolist()):
        assert 0 < rel_err(outs[1][i, :n], outs[0][i, :n]) < FP8_BOUND
        assert torch.all(outs[1][i, n:] == 0)


def test_a_compiled_routed_model_runs_its_attention_in_fp8() -> None:
    from fa3trt.attention.compiled import compile_routed

    model, inputs = tiny_flux(double=1, single=1), flux_inputs(b=2, img=16, txt=8)
    compiled = compile_routed(model, attn_mode=1)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the CPU's emulation is announced
        want = model(**inputs).sample
        got = compiled(**inputs).sample
    assert compiled.report.routed == 2
    assert 0 < rel_err(got, want) < FP8_BOUND


def test_grouped_query_heads_share_one_factor_per_key_head() -> None:
    # FA3 takes q's descale per (batch, key head): under GQA each group of query heads shares it.
    t = torch.randn(2, 16, 6, 8) * torch.tensor([1.0, 2.0, 100.0, 50.0, 0.5, 0.1])[None, None, :, None]
    q8, descale = fp8.quantize(t, heads=3)
    assert descale.shape == (2, 3)
    np.testing.assert_array_equal(descale.double().numpy(), _want_descale(t, 3))
    back = fp8.dequantize(q8, descale, torch.float32)
    assert _within_half_a_step(back, t, descale) and rel_err(back, t) < 0.05
