"""The TensorRT plugin: its plain decisions (CPU), its enqueue core exactly as TensorRT calls it
(GPU: raw pointers of torch allocations, a side stream), and the plugin inside a real engine
(TensorRT)."""

from __future__ import annotations

import logging
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from fa3trt.attention.kernels.base import Ragged
from fa3trt.attention.kernels.registry import KERNELS, device_length_kernels, direct_write_kernels
from fa3trt.attention.kernels.selector import choose_enqueue_kernel, enqueue_kernel
from fa3trt.attention.op import PLUGIN_NAME, PLUGIN_VERSION
from fa3trt.errors import ConfigError, InvalidInputError, MissingDependencyError, PluginNotRegisteredError
from fa3trt.testing import reference_attention
from fa3trt.trt import _trt, plugin
from fa3trt.trt.plugin import (
    EnqueueCache,
    enqueue_core,
    format_supported,
    output_shape,
    parse_fields,
    run_enqueue,
    serialize_fields,
)
from tests.utils import gpu, rel_err, requires_tensorrt

# --------------------------------------------------------------------------- CPU: plain functions


def test_fields_roundtrip_and_validation(caplog: pytest.LogCaptureFixture) -> None:
    for mode, causal, scale in ((0, False, 0.125), (1, True, 0.08838834764831845), (0, True, None)):
        fields = serialize_fields(mode, causal, scale)
        assert [n for n, _ in fields] == list(plugin.FIELD_NAMES)[: len(fields)]
        assert fields[0][1].dtype == np.int32 and fields[1][1].dtype == np.int32
        parsed = parse_fields(fields)
        assert parsed["mode"] == mode and parsed["causal"] is causal
        assert parsed["softmax_scale"] == (None if scale is None else pytest.approx(scale))
    assert parse_fields([]) == {"mode": 0, "causal": False, "softmax_scale": None}  # the op's defaults
    # The ONNX parser may pass int64 and float64 attributes and the lookup attributes too.
    got = parse_fields(
        [
            ("mode", np.array([1], np.int64)),
            ("causal", np.array([1], np.int64)),
            ("softmax_scale", np.array([0.25], np.float64)),
            ("plugin_version", b"2"),
            ("plugin_namespace", b""),
        ]
    )
    assert got == {"mode": 1, "causal": True, "softmax_scale": 0.25}
    with pytest.raises(ConfigError, match="mode=3; use 0 .* or 1"):
        parse_fields([("mode", np.array([3], np.int32))])
    with pytest.raises(ConfigError, match="'mode' must hold one value"):
        parse_fields([("mode", np.array([0, 1], np.int32))])
    with pytest.raises(ConfigError, match="causal=2; use 0 or 1"):
        parse_fields([("causal", np.array([2], np.int32))])
    with pytest.raises(ConfigError, match="softmax_scale=-1.0; it must be a finite number > 0"):
        parse_fields([("softmax_scale", np.array([-1.0], np.float32))])
    with caplog.at_level(logging.WARNING, logger="fa3trt.trt.plugin"):
        assert parse_fields([("window", np.array([1.0]))])["mode"] == 0
    assert "unknown field 'window'" in caplog.text


def test_format_combinations() -> None:
    for t in ("HALF", "BF16", "FLOAT"):
        assert format_supported(0, [t], True)
        assert format_supported(2, [t, t, t], True)
        assert format_supported(3, [t, t, t, "INT32"], True)
        assert format_supported(4, [t, t, t, "INT32", "INT32"], True)
        assert format_supported(5, [t, t, t, "INT32", "INT32", t], True)
    assert not format_supported(0, ["INT8"], True)
    assert not format_supported(0, ["HALF"], False)  # only linear layouts
    assert not format_supported(1, ["HALF", "BF16"], True)  # k must match q
    assert not format_supported(3, ["HALF", "HALF", "HALF", "INT64"], True)
    assert not format_supported(4, ["HALF", "HALF", "HALF", "INT32", "HALF"], True)  # key lengths are INT32
    assert not format_supported(5, ["HALF", "HALF", "HALF", "INT32", "INT32", "FLOAT"], True)
    assert not format_supported(6, ["HALF"] * 7, True)
    assert not format_supported(0, ["HALF"], True, num_inputs=4)  # an engine of plugin v1's four inputs


def test_output_shape_uses_each_inputs_own_dims() -> None:
    assert output_shape((2, 7, 4, 64), (2, 7, 4, 64), (2, 7, 4, 64)) == (2, 7, 4, 64)
    # Cross-attention and grouped-query heads: the output follows q.
    assert output_shape((2, 7, 8, 64), (2, 300, 2, 64), (2, 300, 2, 64)) == (2, 7, 8, 64)
    # A V that disagrees must be an error, not a silent misread.
    with pytest.raises(InvalidInputError, match=r"v \(2, 7, 4, 32\)"):
        output_shape((2, 7, 4, 64), (2, 7, 4, 64), (2, 7, 4, 32))
    with pytest.raises(InvalidInputError, match="k must be 4-D"):
        output_shape((2, 7, 4, 64), (2, 7, 256), (2, 7, 4, 64))
    with pytest.raises(InvalidInputError, match="q's 4 heads are not a multiple of k's 3"):
        output_shape((2, 7, 4, 64), (2, 7, 3, 64), (2, 7, 3, 64))


def test_enqueue_kernel_choice() -> None:
    sm90, sm80, sm75 = (9, 0), (8, 0), (7, 5)
    with_fa3 = ["fa3", "cudnn", "flash", "flash_seqused", "efficient", "efficient_seqused", "math"]
    without = with_fa3[1:]
    assert choose_enqueue_kernel(torch.bfloat16, with_fa3, sm90) == "fa3"
    assert choose_enqueue_kernel(torch.float16, without, sm90) == "flash_seqused"
    assert choose_enqueue_kernel(torch.float16, without, sm80) == "flash_seqused"
    assert choose_enqueue_kernel(torch.float16, without, sm75) == "efficient_seqused"
    assert choose_enqueue_kernel(torch.float32, with_fa3, sm90) == "efficient_seqused"
    with_frontend = ["cudnn", "cudnn_padded", "flash", "flash_seqused", "efficient", "efficient_seqused", "math"]
    assert choose_enqueue_kernel(torch.bfloat16, with_frontend, sm90) == "cudnn_padded"
    assert choose_enqueue_kernel(torch.bfloat16, ["fa3", *with_frontend], sm90) == "fa3"
    assert choose_enqueue_kernel(torch.float16, with_frontend, sm80) == "flash_seqused"
    assert choose_enqueue_kernel(torch.float32, with_frontend, sm90) == "efficient_seqused"
    with pytest.raises(
        ConfigError, match="cudnn_padded names a kernel that is not available here.*nvidia-cudnn-frontend"
    ):
        choose_enqueue_kernel(torch.float16, without, sm90, "cudnn_padded")
    # FlashAttention's CuTe DSL kernel: after FA3, before cuDNN; never for fp32.
    with_cute = ["flash_cute", *with_frontend]
    assert choose_enqueue_kernel(torch.bfloat16, with_cute, sm90) == "flash_cute"
    assert choose_enqueue_kernel(torch.bfloat16, ["fa3", *with_cute], sm90) == "fa3"
    assert choose_enqueue_kernel(torch.float32, with_cute, sm90) == "efficient_seqused"
    assert choose_enqueue_kernel(torch.float16, with_cute, sm90, "cudnn_padded") == "cudnn_padded"
    with pytest.raises(ConfigError, match="flash_cute names a kernel that is not available here.*hopper"):
        choose_enqueue_kernel(torch.float16, with_frontend, sm90, "flash_cute")
    with pytest.raises(ConfigError, match="cannot run torch.float32"):
        choose_enqueue_kernel(torch.float32, with_cute, sm90, "flash_cute")
    # Every choice reads the lengths on the device: never a host-length kernel.
    for forced in (None, "cudnn", "math", "flash"):
        assert choose_enqueue_kernel(torch.float16, without, sm90, forced) in device_length_kernels()
    assert choose_enqueue_kernel(torch.float16, with_fa3, sm90, "efficient_seqused") == "efficient_seqused"
    with pytest.raises(ConfigError, match="fa3 names a kernel that is not available here.*fa3_build"):
        choose_enqueue_kernel(torch.float16, without, sm90, "fa3")
    with pytest.raises(ConfigError, match="cannot run torch.float32"):
        choose_enqueue_kernel(torch.float32, with_fa3, sm90, "flash_seqused")


def test_view_cache_hits_bounds_and_keys() -> None:
    made: list[tuple[int, tuple[int, ...], torch.dtype]] = []

    def factory(ptr: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        made.append((ptr, shape, dtype))
        return torch.empty(shape, dtype=dtype)

    cache = EnqueueCache(max_views=8, factory=factory)
    a = cache.view(0x1000, (2, 3), torch.float16)
    assert cache.view(0x1000, (2, 3), torch.float16) is a
    assert (cache.hits, cache.misses) == (1, 1)
    # Same pointer, another shape or dtype: another view (TensorRT reuses memory across shapes).
    cache.view(0x1000, (3, 2), torch.float16)
    cache.view(0x1000, (2, 3), torch.bfloat16)
    assert cache.misses == 3 and len(made) == 3
    for i in range(20):
        cache.view(0x2000 + i, (1,), torch.int32)
    assert len(cache) == 8  # bounded
    assert cache.view(0x2000 + 19, (1,), torch.int32) is not None and cache.hits == 2
    with pytest.raises(ConfigError, match="max_views"):
        EnqueueCache(max_views=1)


def test_run_enqueue_reports_failure_with_reason(caplog: pytest.LogCaptureFixture) -> None:
    # Validation happens before any device memory is touched, so this runs on a CPU.
    with caplog.at_level(logging.ERROR, logger="fa3trt.trt.plugin"):
        status = run_enqueue(1, 2, 3, 4, 5, (1, 8, 2, 16), (1, 8, 2, 16), (1, 8, 2, 8), torch.float16, 0, 0)
    assert status == 1
    assert "enqueue failed" in caplog.text and "v (1, 8, 2, 8)" in caplog.text
    assert run_enqueue(1, 2, 3, 4, 5, (1, 8, 2, 16), (1, 8, 2, 16), (1, 8, 2, 16), torch.int8, 0, 0) == 1
    assert run_enqueue(1, 2, 3, 4, 5, (1, 8, 2, 16), (1, 8, 2, 16), (1, 8, 2, 16), torch.float16, 0, 7) == 1
    # An empty batch is a no-op, not an error.
    assert run_enqueue(0, 0, 0, 0, 0, (0, 8, 2, 16), (0, 8, 2, 16), (0, 8, 2, 16), torch.float16, 0, 0) == 0


def test_device_view_rejects_bad_arguments() -> None:
    with pytest.raises(InvalidInputError, match="no device view for dtype torch.int8"):
        plugin.device_view(0x1000, (4,), torch.int8)
    with pytest.raises(InvalidInputError, match="null device pointer"):
        plugin.device_view(0, (4,), torch.float16)


@pytest.mark.skipif(_trt.available(), reason="checks the behaviour without TensorRT")
def test_registration_without_tensorrt() -> None:
    assert not plugin.is_registered()
    with pytest.raises(
        PluginNotRegisteredError, match=r"call fa3trt.trt.plugin.register_plugin\(''\) before parsing ONNX"
    ):
        plugin.require_registered()
    with pytest.raises(MissingDependencyError, match="install TensorRT"):
        plugin.register_plugin()
    with pytest.raises(MissingDependencyError, match="install TensorRT"):
        plugin.plugin_classes()


# --------------------------------------------------------------------------- GPU: the enqueue core


def _qkv(b: int, s: int, h: int, d: int, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator(device="cuda").manual_seed(seed)
    return tuple(torch.randn(b, s, h, d, device="cuda", dtype=dtype, generator=g) for _ in range(3))


def _call(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lens: torch.Tensor,
    out: torch.Tensor,
    stream: torch.cuda.Stream,
    mode: int = 0,
    cache: EnqueueCache | None = None,
    write: str = "auto",
) -> None:
    enqueue_core(
        q.data_ptr(),
        k.data_ptr(),
        v.data_ptr(),
        lens.data_ptr(),
        out.data_ptr(),
        tuple(q.shape),
        tuple(k.shape),
        tuple(v.shape),
        q.dtype,
        stream.cuda_stream,
        mode,
        cache=cache,
        write=write,
    )


_TOL = {torch.float16: 5e-3, torch.bfloat16: 2e-2, torch.float32: 1e-4}


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_enqueue_core_matches_reference(dtype: torch.dtype) -> None:
    b, s, h, d = 3, 70, 4, 64
    q, k, v = _qkv(b, s, h, d, dtype)
    lens = torch.tensor([70, 33, 1], dtype=torch.int32, device="cuda")
    out = torch.full_like(q, float("nan"))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())  # inputs were made on the current stream
    _call(q, k, v, lens, out, side)
    side.synchronize()
    want = reference_attention(q, k, v, lens.cpu())
    for i, n in enumerate(lens.tolist()):
        assert rel_err(out[i, :n], want[i, :n]) < _TOL[dtype], (i, n)
        assert torch.all(out[i, n:] == 0)


@gpu
@pytest.mark.parametrize("write", ["direct", "masked"])
def test_enqueue_core_write_paths(write: str) -> None:
    """Both ways of filling TensorRT's buffer: the kernel straight into it plus a zeroing kernel,
    and the masked copy of the kernel's own result. Lengths past S are clamped (no kernel may
    read past the buffers), a length of 0 gives an all-zero sequence; the buffer starts as NaN."""
    dtype = torch.bfloat16
    b, s, h, d = 4, 96, 4, 64
    if write == "direct" and enqueue_kernel(torch.cuda.current_device(), dtype, d) not in direct_write_kernels():
        with pytest.raises(ConfigError, match="direct write needs one of"):
            _call(
                *_qkv(b, s, h, d, dtype),
                torch.full((b,), s, dtype=torch.int32, device="cuda"),
                torch.empty(b, s, h, d, device="cuda", dtype=dtype),
                torch.cuda.current_stream(),
                write=write,
            )
        pytest.skip(f"the direct write runs with {direct_write_kernels()} only (sm90 with one of them installed)")
    q, k, v = _qkv(b, s, h, d, dtype)
    lens = torch.tensor([96, 41, 0, 500], dtype=torch.int32, device="cuda")
    out = torch.full_like(q, float("nan"))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    cache = EnqueueCache()
    for _ in range(2):  # the second call runs the cached binding and prepared launch
        _call(q, k, v, lens, out, side, cache=cache, write=write)
    side.synchronize()
    assert cache.binding_hits == 1
    used = lens.clamp(0, s).cpu()
    want = reference_attention(q, k, v, used)
    for i, n in enumerate(used.tolist()):
        if n:
            assert rel_err(out[i, :n], want[i, :n]) < _TOL[dtype], (i, n)
        assert torch.all(out[i, n:] == 0), (i, n)


@gpu
def test_enqueue_core_fp8_mode_is_close() -> None:
    q, k, v = _qkv(2, 64, 4, 64, torch.bfloat16)
    lens = torch.tensor([64, 20], dtype=torch.int32, device="cuda")
    out = torch.empty_like(q)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    _call(q, k, v, lens, out, side, mode=1)
    side.synchronize()
    want = reference_attention(q, k, v, lens.cpu())
    assert rel_err(out[1, :20], want[1, :20]) < 0.1
    assert torch.all(out[1, 20:] == 0)


@gpu
def test_enqueue_core_runs_on_the_given_stream() -> None:
    """A race test: q is written on TensorRT's stream after a long GPU sleep. An enqueue that
    runs on PyTorch's current stream instead starts before q is written and reads zeros."""
    b, s, h, d = 2, 256, 4, 64
    q_true, k, v = _qkv(b, s, h, d, torch.float16)
    lens = torch.tensor([256, 100], dtype=torch.int32, device="cuda")
    q = torch.zeros_like(q_true)
    out = torch.zeros_like(q)
    cache = EnqueueCache()
    trt_stream = torch.cuda.Stream()
    torch.cuda.synchronize()
    _call(q, k, v, lens, out, trt_stream, cache=cache)  # warm: kernels loaded, views cached
    trt_stream.synchronize()
    q.zero_()
    torch.cuda.synchronize()
    with torch.cuda.stream(trt_stream):
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time before q exists
        q.copy_(q_true)
    t0 = time.perf_counter()
    _call(q, k, v, lens, out, trt_stream, cache=cache)
    host_s = time.perf_counter() - t0
    torch.cuda.synchronize()
    want = reference_attention(q_true, k, v, lens.cpu())
    assert rel_err(out[0], want[0]) < 5e-3 and rel_err(out[1, :100], want[1, :100]) < 5e-3
    # The call returned while the stream was still sleeping: it never waited for the device.
    assert host_s < 0.05, f"enqueue_core blocked the host for {host_s * 1e3:.1f} ms"


@gpu
def test_enqueue_core_never_syncs() -> None:
    q, k, v = _qkv(2, 128, 4, 64, torch.bfloat16)
    lens = torch.tensor([128, 5], dtype=torch.int32, device="cuda")
    out = torch.empty_like(q)
    side = torch.cuda.Stream()
    cache = EnqueueCache()
    _call(q, k, v, lens, out, side, cache=cache)  # first call may build constants
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host-device synchronization raises
    try:
        _call(q, k, v, lens, out, side, cache=cache)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


def _alloc_stats() -> tuple[int, int, int]:
    st = torch.cuda.memory_stats()
    return st["allocation.all.allocated"], st["allocated_bytes.all.allocated"], st["segment.all.allocated"]


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_enqueue_core_allocates_no_copies(dtype: torch.dtype) -> None:
    """Per call, the core allocates at most what the bare kernel allocates (its result and
    log-sum-exp): no copy of q, k, v, no extra output, and no new cudaMalloc segment."""
    b, s, h, d = 2, 512, 8, 64
    q, k, v = _qkv(b, s, h, d, dtype)
    lens = torch.tensor([512, 300], dtype=torch.int32, device="cuda")
    out = torch.empty_like(q)
    cache = EnqueueCache()
    stream = torch.cuda.current_stream()
    kernel = KERNELS[enqueue_kernel(torch.cuda.current_device(), dtype, d)]
    cu = torch.arange(0, (b + 1) * s, s, dtype=torch.int32, device="cuda")
    shp = kernel.packed_shape(b, s, h, d)

    def bare() -> None:
        kernel.forward_packed(q.view(shp), k.view(shp), v.view(shp), Ragged(lens, lens, cu, cu, s, s), False, d**-0.5)

    for _ in range(3):
        _call(q, k, v, lens, out, stream, cache=cache)
        bare()
    torch.cuda.synchronize()
    n0, b0, seg0 = _alloc_stats()
    _call(q, k, v, lens, out, stream, cache=cache)
    torch.cuda.synchronize()
    n1, b1, seg1 = _alloc_stats()
    bare()
    torch.cuda.synchronize()
    n2, b2, _ = _alloc_stats()
    core_n, core_bytes, bare_n, bare_bytes = n1 - n0, b1 - b0, n2 - n1, b2 - b1
    assert core_bytes <= bare_bytes, (core_bytes, bare_bytes)
    assert core_n <= bare_n, (core_n, bare_n)
    assert core_bytes < 2 * q.nbytes  # a copy of q, k and v would be 3 * q.nbytes on top
    assert seg1 == seg0  # steady state: no cudaMalloc


@gpu
def test_views_are_zero_copy_and_cached() -> None:
    q, k, v = _qkv(1, 64, 2, 64, torch.bfloat16)
    view = plugin.device_view(q.data_ptr(), tuple(q.shape), torch.bfloat16)
    assert view.dtype == torch.bfloat16 and view.data_ptr() == q.data_ptr() and torch.equal(view, q)
    lens = torch.tensor([64], dtype=torch.int32, device="cuda")
    out = torch.empty_like(q)
    cache = EnqueueCache()
    side = torch.cuda.Stream()
    _call(q, k, v, lens, out, side, cache=cache)
    misses = cache.misses
    for _ in range(5):
        _call(q, k, v, lens, out, side, cache=cache)
    assert cache.misses == misses and cache.binding_hits >= 5  # one lookup per call, nothing rebuilt
    q2 = q.clone()
    _call(q2, k, v, lens, out, side, cache=cache)
    assert cache.misses == misses + 1  # only the new pointer is wrapped
    side.synchronize()


# --------------------------------------------------------------------------- TensorRT


def _single_node_onnx(path: str, b: int, s: int, h: int, d: int, dtype: str, mode: int = 0) -> None:
    import onnx
    from onnx import TensorProto, helper

    et = {"float16": TensorProto.FLOAT16, "bfloat16": TensorProto.BFLOAT16, "float32": TensorProto.FLOAT}[dtype]
    dims = ["B", "S", h, d]
    ins = [helper.make_tensor_value_info(n, et, dims) for n in ("q", "k", "v")]
    ins.append(helper.make_tensor_value_info("seq_lens", TensorProto.INT32, ["B"]))
    out = helper.make_tensor_value_info("y", et, dims)
    node = helper.make_node(
        PLUGIN_NAME,
        ["q", "k", "v", "seq_lens"],
        ["y"],
        domain="attn",
        mode=mode,
        plugin_version=PLUGIN_VERSION,
        plugin_namespace="",
    )
    graph = helper.make_graph([node], "attn", ins, [out])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("attn", 1)])
    onnx.save(model, path)


@gpu
@requires_tensorrt
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_plugin_in_a_real_engine(tmp_path: object, dtype: str) -> None:
    """One plugin node built into an engine, serialized, deserialized (create_plugin with the
    runtime phase) and run; compared with the float64 reference."""
    import tensorrt as trt  # tests may import it; the library goes through fa3trt.trt._trt
    from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath, Profile

    plugin.register_plugin()
    assert plugin.is_registered()
    plugin.register_plugin()  # idempotent
    path = f"{tmp_path}/attn.onnx"
    h, d = 4, 64
    _single_node_onnx(path, 2, 64, h, d, dtype)
    prof = Profile()
    for n in ("q", "k", "v"):
        prof.add(n, min=(1, 1, h, d), opt=(2, 64, h, d), max=(4, 128, h, d))
    prof.add("seq_lens", min=(1,), opt=(2,), max=(4,))
    data = bytes(
        EngineBytesFromNetwork(NetworkFromOnnxPath(path, strongly_typed=True), CreateConfig(profiles=[prof]))()
    )
    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(data)
    ctx = engine.create_execution_context()
    tdt = getattr(torch, dtype)
    q, k, v = _qkv(3, 100, h, d, tdt)
    lens = torch.tensor([100, 57, 1], dtype=torch.int32, device="cuda")
    y = torch.full_like(q, float("nan"))
    for name, t in (("q", q), ("k", k), ("v", v), ("seq_lens", lens)):
        assert ctx.set_input_shape(name, tuple(t.shape))
        assert ctx.set_tensor_address(name, t.data_ptr())
    assert ctx.set_tensor_address("y", y.data_ptr())
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    assert ctx.execute_async_v3(stream.cuda_stream)
    stream.synchronize()
    want = reference_attention(q, k, v, lens.cpu())
    for i, n in enumerate(lens.tolist()):
        assert rel_err(y[i, :n], want[i, :n]) < _TOL[tdt]
        assert torch.all(y[i, n:] == 0)


@requires_tensorrt
def test_build_without_registration_is_a_clear_error(tmp_path: object) -> None:
    """In a fresh process that never registered the plugin, a build fails before parsing."""
    code = f"""
import sys
from fa3trt.trt.build import BuildConfig, build_engine
from fa3trt.errors import PluginNotRegisteredError
try:
    build_engine({str(tmp_path)!r} + "/missing.onnx", BuildConfig())
except PluginNotRegisteredError as e:
    assert "register_plugin" in str(e), e
    print("refused")
    sys.exit(0)
sys.exit("build_engine did not refuse")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "refused" in r.stdout, r.stderr


# --------------------------------------------------------------------------- GPU: the general call
GENERAL_ENQUEUE = [
    # (B, Sq, Sk, H, Hk, D, causal, scale, q lengths, k lengths (None: the q lengths' pointer))
    pytest.param(3, 80, 80, 4, 4, 64, False, None, [80, 33, 0], None, id="self"),
    pytest.param(3, 64, 96, 4, 4, 64, False, None, [64, 20, 1], [96, 7, 50], id="cross"),
    pytest.param(2, 80, 80, 8, 2, 64, False, 0.2, [80, 41], None, id="gqa-scale"),
    pytest.param(2, 80, 80, 4, 4, 64, True, None, [80, 41], None, id="causal"),
    pytest.param(2, 64, 80, 4, 4, 64, False, None, [64, 64], [80, 120], id="key-lengths-past-sk-clamped"),
]


@gpu
@pytest.mark.parametrize("b, sq, sk, h, hk, d, causal, scale, lq, lk", GENERAL_ENQUEUE)
@pytest.mark.parametrize("write", ["auto", "masked"])
def test_enqueue_core_general_call(
    b: int, sq: int, sk: int, h: int, hk: int, d: int, causal: bool, scale: float | None,
    lq: list[int], lk: list[int] | None, write: str,
) -> None:  # fmt: skip
    """Cross-attention, grouped-query heads, a scale and causal masks through the enqueue core
    exactly as TensorRT calls it (raw pointers, a side stream), against float64. A call the
    plugin's kernel here lacks runs on the next kernel that reads lengths on the GPU, or is
    refused with the reason (causal with no FA3 or CuTe kernel)."""
    dtype = torch.bfloat16
    g = torch.Generator(device="cuda").manual_seed(3)
    q = torch.randn(b, sq, h, d, device="cuda", dtype=dtype, generator=g)
    k, v = (torch.randn(b, sk, hk, d, device="cuda", dtype=dtype, generator=g) for _ in range(2))
    lens = torch.tensor(lq, dtype=torch.int32, device="cuda")
    lens_k = lens if lk is None else torch.tensor(lk, dtype=torch.int32, device="cuda")
    out = torch.full_like(q, float("nan"))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    args = (q.data_ptr(), k.data_ptr(), v.data_ptr(), lens.data_ptr(), out.data_ptr())
    shapes = (tuple(q.shape), tuple(k.shape), tuple(v.shape), dtype, side.cuda_stream, 0)
    extra = {"seq_lens_k_ptr": lens_k.data_ptr(), "causal": causal, "softmax_scale": scale, "write": write}
    from fa3trt.attention.kernels.registry import available_kernels as here

    if causal and not {"fa3", "flash_cute"} & set(here("cuda")):
        with pytest.raises(ConfigError, match="takes causal"):
            enqueue_core(*args, *shapes, cache=EnqueueCache(), **extra)
        return
    cache = EnqueueCache()
    for _ in range(2):  # the second call runs the cached binding
        enqueue_core(*args, *shapes, cache=cache, **extra)
    torch.cuda.synchronize()
    want = reference_attention(q, k, v, lens.cpu(), lens_k.clamp(0, sk).cpu(), causal=causal, softmax_scale=scale)
    for i, n in enumerate(lq):
        assert torch.all(out[i, n:] == 0), i
        if n:
            assert rel_err(out[i, :n], want[i, :n]) < _TOL[dtype], (i, n)
