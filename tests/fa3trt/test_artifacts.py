"""The one path from a model's spec to this GPU's engine in the store: the ONNX key and its
export (CPU), the engine key found from the stored export, and on a GPU with TensorRT the
engines of the reference model and of a transformers model, each against the torch backend."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from fa3trt.artifacts import build_config, engine_key_for, ensure_onnx, onnx_key
from fa3trt.attention.op import PLUGIN_NAME, PLUGIN_VERSION
from fa3trt.buckets import Buckets
from fa3trt.config import AppArgs
from fa3trt.errors import EngineMismatchError, EngineNotFoundError, InvalidInputError, MissingDependencyError
from fa3trt.models.spec import ReferenceSpec, SourceSpec
from fa3trt.requests import check_request
from fa3trt.serving.batch import assemble
from fa3trt.store import ArtifactStore
from fa3trt.trt.build import build_hash
from fa3trt.trt.compat import engine_key
from tests.utils import gpu, rel_err, requires_tensorrt

ROOT = Path(__file__).resolve().parents[2]
ENV = {
    "trt_version": "10.13.0.35",
    "gpu_name": "NVIDIA H100 80GB HBM3",
    "compute_capability": "9.0",
    "plugin_name": PLUGIN_NAME,
    "plugin_version": PLUGIN_VERSION,
}


def bert_spec() -> tuple[SourceSpec, Buckets, int]:
    doc = yaml.safe_load((ROOT / "examples/serve_bert.yaml").read_text())
    app = AppArgs.model_validate(doc["applications"][0]["args"])
    assert isinstance(app.model, SourceSpec)
    return app.model, app.bucket_set(), app.batching.max_batch_tokens


def test_onnx_key_covers_the_model_and_the_buckets(tmp_path: Path) -> None:
    tiny, buckets = ReferenceSpec(preset="tiny"), Buckets((64, 256))
    key = onnx_key(tiny, buckets)
    assert re.fullmatch(r"onnx-[0-9a-f]{32}", key)
    # The same model written otherwise (the preset's own layer count) is the same export.
    assert onnx_key(ReferenceSpec(preset="tiny", layers=2), buckets) == key
    weights = tmp_path / "w.safetensors"
    from fa3trt.models.reference import ModelConfig, build_model, save_weights

    save_weights(build_model(ModelConfig.preset("tiny", seed=3)), weights)
    others = [
        onnx_key(ReferenceSpec(preset="tiny", layers=1), buckets),
        onnx_key(ReferenceSpec(preset="tiny", dtype="float16"), buckets),
        onnx_key(ReferenceSpec(preset="tiny", seed=1), buckets),
        onnx_key(ReferenceSpec(preset="tiny", weights=str(weights)), buckets),
        onnx_key(tiny, Buckets((64, 512))),  # the bucketed axis's range
        onnx_key(bert_spec()[0], buckets),
        onnx_key(bert_spec()[0].model_copy(update={"attn_mode": 1}), buckets),  # FP8 routed calls
        onnx_key(ReferenceSpec(preset="tiny", attn_mode=1), buckets),
    ]
    assert len(set(others)) == len(others) and key not in others


def test_engine_key_for_needs_the_onnx_in_the_store(tmp_path: Path) -> None:
    store, spec = ArtifactStore(tmp_path), ReferenceSpec(preset="tiny")
    config = build_config(Buckets((64,)), 1024)
    with pytest.raises(
        EngineNotFoundError,
        match=f"run `python -m build_jobs --config serve_config.yaml --store {re.escape(store.uri)}`",
    ):
        engine_key_for(store, spec, config, ENV)
    store.put("onnx", onnx_key(spec, config.buckets), b"onnx bytes", {"onnx_sha256": "f" * 64})
    key = engine_key_for(store, spec, config, ENV)
    assert key == engine_key("f" * 64, build_hash(config, spec.signature()), "10.13.0.35", "9.0", PLUGIN_VERSION)
    assert engine_key_for(store, spec, build_config(Buckets((64,)), 2048), ENV) != key
    assert engine_key_for(store, spec, config, dict(ENV, compute_capability="8.9")) != key


def test_ensure_onnx_exports_once_and_records_what_the_engine_needs(tmp_path: Path) -> None:
    store, spec, buckets = ArtifactStore(tmp_path / "store"), ReferenceSpec(preset="tiny", layers=1), Buckets((32,))
    path, meta = ensure_onnx(store, spec, buckets, tmp_path / "a")
    assert path.is_file() and meta["key"] == onnx_key(spec, buckets)
    assert meta["plugin_nodes"] == 1 and meta["plugin_calls"] == [{"mode": 0, "causal": False, "head_dim": 64}]
    assert meta["inputs"] == {
        "x": {"dtype": "float32", "shape": ["B", "S", 256]},
        "seq_lens": {"dtype": "int32", "shape": ["B"]},
    }
    again, meta2 = ensure_onnx(store, spec, buckets, tmp_path / "b")  # fetched, not exported again
    assert again.read_bytes() == path.read_bytes() and meta2["stored_at"] == meta["stored_at"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_tensorrt_backend_without_gpu_says_what_is_missing(tmp_path: Path) -> None:
    from fa3trt.serving import load_backend

    with pytest.raises(MissingDependencyError, match="CUDA GPU"):
        load_backend("tensorrt", ReferenceSpec(), buckets=Buckets((64,)), store=str(tmp_path))


# --------------------------------------------------------------------------- TensorRT


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from fa3trt.artifacts import build_to_store

    tmp = tmp_path_factory.mktemp("built")
    store = ArtifactStore(tmp / "store")
    spec, buckets = ReferenceSpec(preset="tiny", dtype="float16"), Buckets((64, 256))
    meta = build_to_store(store, spec, buckets, 1024, tmp)
    return {"store": store, "spec": spec, "buckets": buckets, "meta": meta, "tmp": tmp}


@gpu
@requires_tensorrt
def test_build_to_store_metadata_and_key(built: dict[str, Any]) -> None:
    from fa3trt.artifacts import build_to_store
    from fa3trt.trt.compat import current_environment

    meta, store, spec = built["meta"], built["store"], built["spec"]
    env = current_environment()
    for k in ("trt_version", "gpu_name", "compute_capability", "plugin_name", "plugin_version", "format"):
        assert k in meta, k
    for k in ("onnx_sha256", "build_hash", "signature", "profiles", "bucket_to_profile", "plugin_calls", "key"):
        assert k in meta, k
    assert meta["bucket_to_profile"] == {"64": 0, "256": 1} and meta["signature"] == spec.signature().to_dict()
    assert meta["plugin_calls"] == [{"mode": 0, "causal": False, "head_dim": 64}] * 2
    assert engine_key_for(store, spec, build_config(built["buckets"], 1024)) == meta["key"]
    gpu_type = f"{env['gpu_name']}-sm{env['compute_capability']}"
    assert store.get_timing_cache(gpu_type, env["trt_version"]) is not None
    again = build_to_store(store, spec, built["buckets"], 1024, built["tmp"])
    assert again["sha256"] == meta["sha256"]  # cached, not rebuilt


@gpu
@requires_tensorrt
def test_reference_engine_matches_the_torch_backend(built: dict[str, Any]) -> None:
    from fa3trt.serving import Backend, load_backend

    spec, buckets = built["spec"], built["buckets"]
    be = load_backend("tensorrt", spec, buckets=buckets, store=built["store"].uri, max_batch_tokens=1024)
    ref = load_backend("torch", spec, device="cuda")
    assert isinstance(be, Backend) and be.describe()["backend"] == "tensorrt"
    sig = be.signature
    g = torch.Generator().manual_seed(0)
    for lens in ([64, 10, 1], [200, 130], [256]):
        reqs = [check_request(sig, {"x": torch.randn(n, 256, generator=g).numpy()}, buckets) for n in lens]
        batch = assemble(sig, reqs, be.device, lengths_on_device=True).inputs
        got, want = be.run(batch), ref.run(batch)
        for i, n in enumerate(lens):
            assert rel_err(got[i, :n], want[i, :n]) < 1e-2
            assert torch.all(got[i, n:] == 0)
    with pytest.raises(InvalidInputError, match="outside the engine's range"):
        be.run({"x": torch.zeros(1, 257, 256, device="cuda"), "seq_lens": torch.tensor([257], dtype=torch.int32)})


@gpu
@requires_tensorrt
def test_trt_module_is_a_drop_in(built: dict[str, Any]) -> None:
    from fa3trt.models.reference import build_model
    from fa3trt.trt.runtime import TRTModule

    data, meta = built["store"].get("engines", built["meta"]["key"])
    mod = TRTModule.from_bytes(data, meta)
    model = build_model(built["spec"].config(), None, "cuda")
    x = torch.randn(2, 100, 256, device="cuda", dtype=torch.float16)
    lens = torch.full((2,), 100, dtype=torch.int32, device="cuda")
    y1 = mod(x=x, seq_lens=lens)
    y2 = mod(x=y1, seq_lens=lens)  # a sampler loop feeds outputs back in
    with torch.inference_mode():
        assert rel_err(y1, model(x)) < 1e-2 and rel_err(y2, model(model(x))) < 2e-2
    assert y1.data_ptr() != y2.data_ptr()  # clone_outputs: earlier results stay intact


@gpu
@requires_tensorrt
def test_real_engine_with_mismatched_metadata_is_refused(built: dict[str, Any]) -> None:
    from fa3trt.trt.runtime import TRTEngine

    data, meta = built["store"].get("engines", built["meta"]["key"])
    with pytest.raises(EngineMismatchError, match="engine was built for TensorRT 1.0.0, this is"):
        TRTEngine.from_bytes(data, dict(meta, trt_version="1.0.0"))


@gpu
@requires_tensorrt
def test_build_if_missing_exports_and_builds_a_user_model(tmp_path: Path) -> None:
    """examples/serve_bert.yaml's model on backend tensorrt with an empty store: without
    build_if_missing the error names the build command; with it, the loader exports the ONNX,
    builds this GPU's engine and serves the eager unrouted model's answers."""
    from fa3trt.models.sources import load_source
    from fa3trt.onnx.calls import select_output
    from fa3trt.serving import load_backend

    spec, buckets, mbt = bert_spec()
    store = str(tmp_path / "store")
    with pytest.raises(EngineNotFoundError, match="build_jobs"):
        load_backend("tensorrt", spec, buckets=buckets, store=store, max_batch_tokens=mbt)
    be = load_backend("tensorrt", spec, buckets=buckets, store=store, max_batch_tokens=mbt, build_if_missing=True)
    assert be.describe()["backend"] == "tensorrt" and be.signature == spec.signature()
    eager = load_source(spec).module.to("cuda")  # the model as transformers runs it, unrouted
    sig = spec.signature()
    for length in (5, 64, 300):
        req = check_request(sig, sig.sample_request(length, seed=length), buckets)
        batch = assemble(sig, [req], be.device, lengths_on_device=True).inputs
        with torch.inference_mode():
            want = select_output(eager(**batch), "last_hidden_state")
        assert rel_err(be.run(batch).float().cpu(), want.float().cpu()) < 1e-3
