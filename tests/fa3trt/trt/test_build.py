"""Building engines, decided without TensorRT: the build config and its hash, what makes an
engine incompatible (refused naming both sides, before its bytes are touched), the check of an
ONNX file against the model's signature, FP8 engines on GPUs without an FP8 kernel, and the
TensorRT calls type-checked against tensorrt-stubs."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from fa3trt.attention.op import PLUGIN_NAME, PLUGIN_VERSION
from fa3trt.buckets import Buckets
from fa3trt.errors import ConfigError, EngineMismatchError, InvalidInputError, MissingDependencyError
from fa3trt.onnx.export import export_onnx, verify_onnx
from fa3trt.onnx.graph import graph_io
from fa3trt.signature import Signature, TensorSpec
from fa3trt.trt.build import HASH_IGNORES, BuildConfig, build_engine, build_hash, check_onnx_signature
from fa3trt.trt.compat import METADATA_FORMAT, check_compatible, engine_key
from fa3trt.trt.profiles import batch_limits, profiles
from fa3trt.trt.runtime import TRTEngine, check_plugin_calls, narrow_to_engine
from tests.models import tiny_bert

ROOT = Path(__file__).resolve().parents[3]

ENV_H100 = {
    "trt_version": "10.13.0.35",
    "gpu_name": "NVIDIA H100 80GB HBM3",
    "compute_capability": "9.0",
    "plugin_name": PLUGIN_NAME,
    "plugin_version": PLUGIN_VERSION,
}


def _meta(**over: Any) -> dict[str, Any]:
    m: dict[str, Any] = dict(ENV_H100, hardware_compatibility_level="none", format=METADATA_FORMAT)
    m.update(over)
    return m


# --------------------------------------------------------------------------- config and keys


def test_build_config_validation() -> None:
    assert BuildConfig(buckets=Buckets((8, 16))).buckets.edges == (8, 16)
    assert BuildConfig(buckets=(8, 16)).buckets == Buckets((8, 16))  # type: ignore[arg-type]
    for bad, match in [
        ({"max_batch_tokens": 0}, "max_batch_tokens must be an integer >= 1, got 0"),
        ({"workspace_bytes": 10}, "workspace_bytes must be None or an integer >= 1 MiB, got 10"),
        ({"hardware_compatibility_level": "turing"}, "hardware_compatibility_level='turing'"),
        ({"builder_optimization_level": 9}, "builder_optimization_level must be None or 0..5, got 9"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(match)):
            BuildConfig(**bad)


def test_config_hash_and_its_ignores() -> None:
    base = BuildConfig()
    fields = {f.name for f in dataclasses.fields(BuildConfig)}
    assert set(HASH_IGNORES) <= fields  # the ignore list names real fields
    assert BuildConfig(timing_cache_path="/tmp/a.cache").compute_hash() == base.compute_hash()
    changed = [
        BuildConfig(buckets=Buckets((256, 1024))),
        BuildConfig(max_batch_tokens=8192),
        BuildConfig(workspace_bytes=1 << 30),
        BuildConfig(hardware_compatibility_level="ampere_plus"),
        BuildConfig(builder_optimization_level=5),
        BuildConfig(plugin_namespace="fa3trt"),
    ]
    hashes = {c.compute_hash() for c in changed}
    assert len(hashes) == len(changed) and base.compute_hash() not in hashes
    # Every field is either hashed (changing it changes the hash) or listed as ignored.
    assert len(changed) + len(HASH_IGNORES) == len(fields)


def test_build_hash_covers_config_and_the_engine_shaping_signature() -> None:
    sig = Signature((TensorSpec("x", "float32", ("S", 8)),), TensorSpec("y", "float32", ("S", 8)), "S", {}, "pad")
    cfg = BuildConfig(buckets=Buckets((16, 64)), max_batch_tokens=128)
    h = build_hash(cfg, sig)
    assert build_hash(BuildConfig(buckets=Buckets((16, 64)), max_batch_tokens=128), sig) == h
    assert build_hash(BuildConfig(buckets=Buckets((16,))), sig) != h
    wider = Signature((TensorSpec("x", "float32", ("S", 16)),), TensorSpec("y", "float32", ("S", 16)), "S")
    stepped = Signature(sig.inputs, sig.output, "S", {}, "pad", {"S": 2})
    assert len({h, build_hash(cfg, wider), build_hash(cfg, stepped)}) == 3
    # batching is the server's business, not the engine's
    assert build_hash(cfg, Signature(sig.inputs, sig.output, "S", {}, "shape")) == h


def test_engine_and_timing_keys() -> None:
    args = ("a" * 64, "b" * 32, "10.13.0.35", "9.0", PLUGIN_VERSION)
    key = engine_key(*args)
    assert re.fullmatch(r"engine-[0-9a-f]{32}", key) and engine_key(*args) == key
    for i, other in enumerate(("c" * 64, "d" * 32, "10.8.0.43", "8.9", "3")):
        changed = list(args)
        changed[i] = other
        assert engine_key(*changed) != key


# --------------------------------------------------------------------------- compatibility


def test_compatible_engine_is_accepted() -> None:
    check_compatible(_meta(), ENV_H100)
    # An sm90 engine built hardware-compatible runs on any sm80+ GPU.
    check_compatible(_meta(hardware_compatibility_level="ampere_plus"), dict(ENV_H100, compute_capability="8.9"))


@pytest.mark.parametrize(
    "meta, current, message",
    [
        (
            _meta(trt_version="10.8.0.43"),
            ENV_H100,
            "engine was built for TensorRT 10.8.0.43, this is TensorRT 10.13.0.35",
        ),
        (
            _meta(),
            dict(ENV_H100, compute_capability="8.9", gpu_name="NVIDIA L4"),
            "engine was built for compute capability 9.0 (NVIDIA H100 80GB HBM3), this is 8.9 (NVIDIA L4)",
        ),
        (
            _meta(hardware_compatibility_level="ampere_plus"),
            dict(ENV_H100, compute_capability="7.5", gpu_name="Tesla T4"),
            "it needs an sm80+ GPU",
        ),
        (
            _meta(plugin_version="1"),
            ENV_H100,
            f"engine was built for plugin {PLUGIN_NAME} v1, this is {PLUGIN_NAME} v2",
        ),
        # An engine of an earlier release (its metadata says format 1, or nothing): rebuilt once, never loaded.
        (_meta(format=1), ENV_H100, "engine was built in metadata format 1, this is format 2"),
        (dict(ENV_H100, hardware_compatibility_level="none"), ENV_H100, "metadata format 1, this is format 2"),
        ({"trt_version": "10.13.0.35"}, ENV_H100, "engine metadata lacks"),
    ],
)
def test_mismatch_is_refused_naming_both_sides(meta: dict[str, Any], current: dict[str, str], message: str) -> None:
    with pytest.raises(EngineMismatchError, match=re.escape(message)) as e:
        check_compatible(meta, current)
    assert "build" in str(e.value)  # and says how to fix it


def test_from_bytes_refuses_before_deserializing() -> None:
    # Garbage bytes: the refusal must come from the metadata check, before TensorRT sees them.
    with pytest.raises(EngineMismatchError, match="built for TensorRT 9.0.0, this is TensorRT 10.13.0.35"):
        TRTEngine.from_bytes(b"not an engine", _meta(trt_version="9.0.0"), environment=ENV_H100)


def test_fp8_engine_needs_an_fp8_kernel_at_its_head_dims() -> None:
    """What the export recorded of each plugin node decides: mode 1 at a head dim no FP8 kernel
    of the device takes is refused before the engine loads; mode 0 never is."""
    fp8 = {"plugin_calls": [{"mode": 1, "causal": False, "head_dim": 64}]}
    check_plugin_calls({"plugin_calls": [{"mode": 0, "causal": False, "head_dim": 64}]}, torch.device("cuda", 0))
    check_plugin_calls(fp8, torch.device("cpu"))  # the CPU's emulation is the FP8 numerics reference
    if not torch.cuda.is_available():
        return
    from fa3trt.attention.kernels.fp8 import fp8_refusal
    from fa3trt.attention.kernels.registry import available_kernels

    dev = torch.device("cuda", 0)
    if fp8_refusal("cuda", available_kernels(dev), 64) is None:
        check_plugin_calls(fp8, dev)
    else:
        with pytest.raises(MissingDependencyError, match="attention mode 1 .FP8. needs an FP8 attention kernel"):
            check_plugin_calls(fp8, dev)


def test_int64_inputs_are_narrowed_with_a_range_check() -> None:
    t = torch.tensor([[1, 2], [3, 4]])
    got = narrow_to_engine("input_ids", t, torch.int32, torch.device("cpu"))
    assert got.dtype == torch.int32 and torch.equal(got, t.to(torch.int32))
    with pytest.raises(InvalidInputError, match=r"input 'input_ids' holds values 1..4294967296, outside int32"):
        narrow_to_engine("input_ids", torch.tensor([1, 1 << 32]), torch.int32, torch.device("cpu"))


# --------------------------------------------------------------------------- a transformers model end to end
BUCKETS = Buckets((16, 64))
MAX_BATCH_TOKENS = 128  # batch limits 8 and 2


def bert_signature(with_mask: bool) -> Signature:
    ids = TensorSpec("input_ids", "int64", ("S",))
    mask = TensorSpec("attention_mask", "int64", ("S",), fill="mask")
    out = TensorSpec("last_hidden_state", "float32", ("S", 32))
    if with_mask:
        return Signature((ids, mask), out, "S", {}, "pad")
    return Signature((ids,), out, "S", {}, "shape")


@pytest.fixture(scope="module")
def bert() -> torch.nn.Module:
    return tiny_bert(max_positions=64)


def corner_inputs(sig: Signature, shape: tuple[int, ...], seed: int) -> dict[str, torch.Tensor]:
    """Random ids at a profile corner (B, S); a mask of ragged prefix lengths (the first full)."""
    g = torch.Generator().manual_seed(seed)
    b, s = shape
    out = {"input_ids": torch.randint(1, 64, (b, s), generator=g)}
    if any(t.name == "attention_mask" for t in sig.inputs):
        lens = torch.randint(1, s + 1, (b,), generator=g)
        lens[0] = s
        out["attention_mask"] = (torch.arange(s)[None, :] < lens[:, None]).long()
    return out


@pytest.mark.parametrize("with_mask", [False, True], ids=["ids", "ids+mask"])
def test_bert_exported_by_its_signature_matches_at_every_profile_corner(
    bert: torch.nn.Module, tmp_path: Path, with_mask: bool
) -> None:
    sig = bert_signature(with_mask)
    samples = sig.samples(sig.sample_sizes(BUCKETS, length=12), batch=2)
    ranges = {"S": sig.axis_range("S", BUCKETS)}
    assert ranges == {"S": (1, 64)}
    with torch.no_grad():
        res = export_onnx(
            bert,
            tmp_path / "bert.onnx",
            samples,
            sig.dynamic_axes(),
            output="last_hidden_state",
            output_name="y",
            axis_ranges=ranges,
        )
    # Exporting, transformers materializes a mask even without attention_mask and its values are
    # unknown, so routing leaves every call alone (fa3trt.attention.routing): SDPA in the graph, no plugin node.
    report = res.routing or {}
    assert res.plugin_nodes == report["routed"] == 0, report
    assert report["left"] and all(r.endswith("while tracing (values unknown)") for r in report["left"]), report
    # Strict tracing stops inside transformers' own mask code when attention_mask is an input (fallback).
    assert res.strict or with_mask
    assert {n: d["dtype"] for n, d in res.inputs.items()} == {t.name: "int32" for t in sig.inputs}
    with pytest.raises(
        ConfigError, match=r"the graph's outputs are \['y'\]; the signature's output is 'last_hidden_state'"
    ):
        check_onnx_signature(res.path, sig)
    with torch.no_grad():
        res = export_onnx(
            bert,
            tmp_path / "bert.onnx",
            samples,
            sig.dynamic_axes(),
            output=0,
            output_name=sig.output.name,
            axis_ranges=ranges,
        )
    check_onnx_signature(res.path, sig)
    corners = []
    for p in profiles(sig, BUCKETS, batch_limits(BUCKETS, MAX_BATCH_TOKENS)):
        lo, _, hi = p.shapes["input_ids"]
        corners += [lo, hi]
    assert corners == [(1, 1), (8, 16), (1, 17), (2, 64)]
    for i, shape in enumerate(corners):
        inputs = corner_inputs(sig, shape, seed=i)
        # The graph fed int32 ids (as the engine is) against the eager unrouted model fed int64.
        err = verify_onnx(
            res.path, bert, inputs, output="last_hidden_state", check_sizes={"B": [shape[0]], "S": [shape[1]]}
        )
        assert err < 1e-4, shape


def test_onnx_that_disagrees_with_the_signature_is_refused_before_building(
    bert: torch.nn.Module, tmp_path: Path
) -> None:
    sig = bert_signature(with_mask=False)
    samples = sig.samples(sig.sample_sizes(BUCKETS, length=12), batch=2)
    res = export_onnx(
        bert, tmp_path / "b.onnx", samples, {"input_ids": {0: "B"}}, output=0, output_name=sig.output.name
    )
    io, dims = graph_io(res.path)
    assert io["input_ids"] == ("int32", 2, True) and dims["input_ids"] == ["B", 12]
    with pytest.raises(ConfigError, match=r"input 'input_ids': axis S came out static \(12\).*the model.s spec"):
        build_engine(res.path, sig, BuildConfig(buckets=BUCKETS))  # refused on the CPU, before TensorRT
    wrong = Signature((TensorSpec("input_ids", "int64", ("S", 4)),), sig.output, "S")
    with pytest.raises(ConfigError, match=r"input 'input_ids' has rank 2 in the graph; the signature gives rank 3"):
        check_onnx_signature(res.path, wrong)


# --------------------------------------------------------------------------- static check of TensorRT calls


def _sanitized_stubs(dst: Path) -> Path | None:
    """tensorrt-stubs as mypy can read them: 10.13's stubs name parameters ``in`` (a syntax
    error) and ship no py.typed, so mypy would otherwise treat every TensorRT call as Any."""
    spec = importlib.util.find_spec("tensorrt_stubs")
    if spec is None or spec.origin is None:
        return None
    site = Path(spec.origin).parent.parent
    for rel in ("tensorrt/__init__.pyi", "tensorrt_bindings/__init__.pyi", "tensorrt_bindings/tensorrt.pyi"):
        src = site / rel
        if not src.exists():
            return None
        text = re.sub(r"\bin: ", "in_: ", src.read_text())
        text = text.replace("channel_axis: int)", "channel_axis: int = ...)")
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        (dst / rel).write_text(text)
    cfg = dst / "mypy.ini"
    cfg.write_text(
        "[mypy]\npython_version = 3.11\ncheck_untyped_defs = True\nignore_missing_imports = True\n"
        "warn_unused_ignores = False\n[mypy-tensorrt.*]\nignore_errors = True\n[mypy-tensorrt_bindings.*]\nignore_errors = True\n"
    )
    return cfg


def test_tensorrt_calls_typecheck_against_stubs(tmp_path: Path) -> None:
    cfg = _sanitized_stubs(tmp_path)
    if cfg is None:
        pytest.skip("tensorrt-stubs is not installed (pip install --no-deps tensorrt-stubs)")
    files = ["fa3trt/trt"]
    env = dict(os.environ, MYPYPATH=str(tmp_path))
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--config-file",
            str(cfg),
            "--no-incremental",
            "--cache-dir",
            str(tmp_path / ".mypy"),
            *files,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    ours = [line for line in r.stdout.splitlines() if line.startswith(tuple(files))]
    assert not ours, "\n".join(ours)
    assert "error: Module has no attribute" not in r.stdout
