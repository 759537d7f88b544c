"""Engine build and runtime: every decision as a plain function (CPU), the TensorRT calls
type-checked against tensorrt-stubs (CPU), and the whole path on a TensorRT machine."""

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

from fa3trt.artifacts import onnx_key
from fa3trt.attention.op import PLUGIN_NAME, PLUGIN_VERSION
from fa3trt.buckets import Buckets
from fa3trt.errors import ConfigError, EngineMismatchError, EngineNotFoundError, InvalidInputError
from fa3trt.models.reference import ModelConfig
from fa3trt.store import ArtifactStore
from fa3trt.trt.build import (
    HASH_IGNORES,
    BuildConfig,
    ProfileSpec,
    engine_key_for,
    onnx_hidden,
    profiles,
)
from fa3trt.trt.compat import check_compatible, engine_key
from fa3trt.trt.runtime import TRTEngine, select_profile
from tests.utils import gpu, requires_tensorrt

ROOT = Path(__file__).resolve().parents[2]

ENV_H100 = {
    "trt_version": "10.13.0.35",
    "gpu_name": "NVIDIA H100 80GB HBM3",
    "compute_capability": "9.0",
    "plugin_name": PLUGIN_NAME,
    "plugin_version": PLUGIN_VERSION,
}


def _meta(**over: Any) -> dict[str, Any]:
    m: dict[str, Any] = dict(ENV_H100, hardware_compatibility_level="none")
    m.update(over)
    return m


# --------------------------------------------------------------------------- profiles and config


def test_one_profile_per_bucket() -> None:
    specs = profiles(Buckets((256, 1024, 4096)), 16384)
    assert [(s.index, s.bucket_edge) for s in specs] == [(0, 256), (1, 1024), (2, 4096)]
    assert [s.batch for s in specs] == [(1, 64, 64), (1, 16, 16), (1, 4, 4)]
    assert [s.seq for s in specs] == [(1, 256, 256), (257, 1024, 1024), (1025, 4096, 4096)]
    # A batch limit never drops below one sequence.
    assert profiles(Buckets((100, 5000)), 1000)[1].batch == (1, 1, 1)
    shapes = specs[1].shapes(hidden=64)
    assert shapes == {"x": ((1, 257, 64), (16, 1024, 64), (16, 1024, 64)), "seq_lens": ((1,), (16,), (16,))}
    assert ProfileSpec.from_dict(specs[2].to_dict()) == specs[2]
    with pytest.raises(ConfigError, match="max_batch_tokens must be >= 1"):
        profiles(Buckets((8,)), 0)


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


# --------------------------------------------------------------------------- profile selection


def test_select_profile() -> None:
    specs = profiles(Buckets((256, 1024, 4096)), 16384)
    assert select_profile(specs, 1, 1) == 0
    assert select_profile(specs, 64, 256) == 0
    assert select_profile(specs, 3, 257) == 1
    assert select_profile(specs, 4, 4096) == 2
    with pytest.raises(InvalidInputError, match="sequence length 4097 exceeds the engine's largest bucket"):
        select_profile(specs, 1, 4097)
    with pytest.raises(
        InvalidInputError, match=r"batch 65 of sequences padded to 200 fits no optimization profile .*split the batch"
    ):
        select_profile(specs, 65, 200)
    with pytest.raises(InvalidInputError, match=">= 1"):
        select_profile(specs, 0, 10)


# --------------------------------------------------------------------------- store lookups


def test_engine_key_for_needs_the_onnx_in_the_store(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    cfg = ModelConfig.preset("tiny")
    with pytest.raises(
        EngineNotFoundError, match=f"run `python -m build_jobs --config serve_config.yaml --store {store.uri}`"
    ):
        engine_key_for(store, cfg, None, Buckets((64,)), 1024, env=ENV_H100)
    store.put("onnx", onnx_key(cfg, None), b"onnx bytes", {"onnx_sha256": "f" * 64})
    key = engine_key_for(store, cfg, None, Buckets((64,)), 1024, env=ENV_H100)
    want = engine_key(
        "f" * 64,
        BuildConfig(buckets=Buckets((64,)), max_batch_tokens=1024).compute_hash(),
        "10.13.0.35",
        "9.0",
        PLUGIN_VERSION,
    )
    assert key == want
    assert engine_key_for(store, cfg, None, Buckets((64,)), 2048, env=ENV_H100) != key
    with pytest.raises(ConfigError, match="pass the same"):
        engine_key_for(store, cfg, None, Buckets((64,)), 1024, env=ENV_H100, build_config=BuildConfig())


def test_onnx_hidden_reads_the_export(tmp_path: Path) -> None:
    from fa3trt.models.reference import build_model
    from fa3trt.onnx.export import export_onnx

    cfg = ModelConfig.preset("tiny", layers=1)
    export_onnx(build_model(cfg), tmp_path / "m.onnx")
    assert onnx_hidden(tmp_path / "m.onnx") == cfg.hidden


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
    files = [
        "fa3trt/plugin",
        "fa3trt/_trt.py",
        "fa3trt/build.py",
        "fa3trt/compat.py",
        "fa3trt/runtime.py",
        "fa3trt/named_build.py",
        "fa3trt/named_runtime.py",
    ]
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


# --------------------------------------------------------------------------- without a GPU


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_tensorrt_backend_without_gpu_says_what_is_missing(tmp_path: Path) -> None:
    from fa3trt.errors import MissingDependencyError
    from fa3trt.trt.runtime import TensorRTBackend

    with pytest.raises(MissingDependencyError, match="CUDA GPU"):
        TensorRTBackend.load(
            ModelConfig.preset("tiny"),
            weights=None,
            buckets=Buckets((64,)),
            store=str(tmp_path),
            build_if_missing=False,
            max_batch_tokens=None,
        )


def test_selfcheck_exits_2_and_names_what_is_missing() -> None:
    from fa3trt.trt._trt import available as tensorrt_available

    if torch.cuda.is_available() and tensorrt_available():
        pytest.skip("this machine has everything: the TensorRT tests run the self-check's path")
    r = subprocess.run(
        [sys.executable, "-m", "fa3trt.selfcheck"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Missing:" in r.stdout and ("TensorRT" in r.stdout or "CUDA GPU" in r.stdout)


def test_selfcheck_of_a_users_model_checks_the_export_anywhere() -> None:
    """--config with a user's model: its routed export verified in ONNX Runtime on this machine,
    then exit 2 (or the TensorRT comparison where TensorRT runs)."""
    r = subprocess.run(
        [sys.executable, "-m", "fa3trt.selfcheck", "--config", "examples/serve_bert.yaml"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert "exported: 2 CustomAttnPlugin nodes" in r.stdout, r.stdout + r.stderr[-2000:]
    err = float(r.stdout.split("eager unrouted model: max abs error ")[1].split()[0])
    assert err < 1e-4
    from fa3trt.trt._trt import available as tensorrt_available

    want = 0 if torch.cuda.is_available() and tensorrt_available() else 2
    assert r.returncode == want, r.stdout + r.stderr[-2000:]
    r = subprocess.run(
        [sys.executable, "-m", "fa3trt.selfcheck", "--config", "examples/serve_bert.yaml", "--app", "nope"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 1 and "no fa3trt application 'nope'" in r.stdout


# --------------------------------------------------------------------------- TensorRT


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from fa3trt.trt.build import build_to_store

    store = ArtifactStore(tmp_path_factory.mktemp("store"))
    cfg = ModelConfig.preset("tiny", dtype="float16")
    buckets = Buckets((64, 256))
    meta = build_to_store(store, cfg, None, buckets, max_batch_tokens=1024)
    return {"store": store, "cfg": cfg, "buckets": buckets, "meta": meta}


@gpu
@requires_tensorrt
def test_build_to_store_metadata_and_key(built: dict[str, Any]) -> None:
    from fa3trt.trt.build import build_to_store
    from fa3trt.trt.compat import current_environment

    meta, store = built["meta"], built["store"]
    env = current_environment()
    for k in (
        "trt_version",
        "gpu_name",
        "compute_capability",
        "plugin_name",
        "plugin_version",
        "onnx_sha256",
        "build_config_hash",
        "hash_ignores",
        "bucket_to_profile",
        "profiles",
        "key",
    ):
        assert k in meta, k
    assert meta["trt_version"] == env["trt_version"] and meta["bucket_to_profile"] == {"64": 0, "256": 1}
    assert engine_key_for(store, built["cfg"], None, built["buckets"], 1024) == meta["key"]
    gpu_type = f"{env['gpu_name']}-sm{env['compute_capability']}"
    assert store.get_timing_cache(gpu_type, env["trt_version"]) is not None
    again = build_to_store(store, built["cfg"], None, built["buckets"], max_batch_tokens=1024)
    assert again["sha256"] == meta["sha256"]  # cached, not rebuilt


@gpu
@requires_tensorrt
def test_tensorrt_backend_matches_torch_backend(built: dict[str, Any]) -> None:
    from fa3trt.serving.backends import Backend, TorchBackend, load_backend
    from tests.utils import rel_err

    be = load_backend(
        "tensorrt", built["cfg"], buckets=built["buckets"], store=built["store"].uri, max_batch_tokens=1024
    )
    assert isinstance(be, Backend) and be.describe()["backend"] == "tensorrt"
    ref = TorchBackend(built["cfg"], device="cuda")
    g = torch.Generator().manual_seed(0)
    for s, lens in ((64, [64, 10, 1]), (200, [200, 130]), (256, [256])):
        x = torch.randn(len(lens), s, built["cfg"].hidden, generator=g)
        ls = torch.tensor(lens, dtype=torch.int32)
        got, want = be.run(x, ls), ref.run(x, ls)
        for i, n in enumerate(lens):
            assert rel_err(got[i, :n], want[i, :n]) < 1e-2
            assert torch.all(got[i, n:] == 0)
    be.warmup([(1, 64), (2, 256)])
    with pytest.raises(InvalidInputError, match="exceeds the engine's largest bucket"):
        be.run(torch.zeros(1, 257, built["cfg"].hidden), torch.tensor([257], dtype=torch.int32))


@gpu
@requires_tensorrt
def test_trt_module_is_a_drop_in(built: dict[str, Any]) -> None:
    from fa3trt.models.reference import build_model
    from fa3trt.trt.runtime import TRTModule
    from tests.utils import rel_err

    data, meta = built["store"].get("engines", built["meta"]["key"])
    mod = TRTModule.from_bytes(data, meta)
    model = build_model(built["cfg"], None, "cuda")
    x = torch.randn(2, 100, built["cfg"].hidden, device="cuda", dtype=torch.float16)
    y1 = mod(x)
    y2 = mod(y1)  # a sampler loop feeds outputs back in
    with torch.inference_mode():
        assert rel_err(y1, model(x)) < 1e-2 and rel_err(y2, model(model(x))) < 2e-2
    assert y1.data_ptr() != y2.data_ptr()  # clone_outputs: earlier results stay intact


@gpu
@requires_tensorrt
def test_real_engine_with_mismatched_metadata_is_refused(built: dict[str, Any]) -> None:
    data, meta = built["store"].get("engines", built["meta"]["key"])
    bad = dict(meta, trt_version="1.0.0")
    with pytest.raises(EngineMismatchError, match="engine was built for TensorRT 1.0.0, this is"):
        TRTEngine.from_bytes(data, bad)


@gpu
@requires_tensorrt
def test_missing_engine_names_the_build_command(tmp_path: Path) -> None:
    from fa3trt.trt.runtime import TensorRTBackend

    with pytest.raises(EngineNotFoundError, match=r"python -m build_jobs --config serve_config.yaml --store"):
        TensorRTBackend.load(
            ModelConfig.preset("tiny", dtype="float16"),
            weights=None,
            buckets=Buckets((64,)),
            store=str(tmp_path),
            build_if_missing=False,
            max_batch_tokens=1024,
        )


@gpu
@requires_tensorrt
def test_selfcheck_passes() -> None:
    from fa3trt.selfcheck import main

    assert main(["--iters", "3"]) == 0
