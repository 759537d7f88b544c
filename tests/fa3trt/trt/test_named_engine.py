"""Engines of any model by named inputs: profiles, ONNX and engine checks, keys (plain functions,
CPU), a transformers model exported by its signature and checked in ONNX Runtime at every
profile's corners, and the engine path on a TensorRT machine."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch

import fa3trt
from fa3trt.attention.op import PLUGIN_NAME, PLUGIN_VERSION
from fa3trt.buckets import Buckets
from fa3trt.errors import ConfigError, EngineMismatchError, EngineNotFoundError, InvalidInputError
from fa3trt.onnx.export import export_onnx, verify_onnx
from fa3trt.signature import Signature, TensorSpec
from fa3trt.store import ArtifactStore
from fa3trt.trt.build import BuildConfig
from fa3trt.trt.named_build import (
    build_named_engine,
    check_onnx_signature,
    index_named_onnx,
    named_engine_key,
    named_engine_key_for,
    named_onnx_key,
    onnx_io,
)
from fa3trt.trt.named_runtime import NamedTRTEngine, narrow_to_engine
from fa3trt.trt.profiles import (
    NamedProfile,
    batch_limits,
    dtype_fits,
    export_axis_ranges,
    io_differences,
    named_profiles,
    select_named_profile,
    signature_differences,
)
from tests.models import tiny_bert
from tests.utils import gpu, requires_tensorrt

ENV = {
    "trt_version": "10.13.0.35",
    "gpu_name": "NVIDIA H100 80GB HBM3",
    "compute_capability": "9.0",
    "plugin_name": PLUGIN_NAME,
    "plugin_version": PLUGIN_VERSION,
}


def dit_signature() -> Signature:
    """Tokens (S, 8), a context (T, 4) over a range, lengths and a mask filled by the server."""
    return Signature(
        inputs=(
            TensorSpec("x", "float32", ("S", 8)),
            TensorSpec("context", "bfloat16", ("T", 4)),
            TensorSpec("seq_lens", "int32", (), fill="lengths"),
            TensorSpec("mask", "int64", ("S",), fill="mask"),
        ),
        output=TensorSpec("y", "float32", ("S", 8)),
        bucketed="S",
        ranges={"T": (2, 10)},
        batching="pad",
    )


# --------------------------------------------------------------------------- profiles


def test_one_profile_per_bucket_per_named_axis() -> None:
    buckets = Buckets((16, 64))
    assert batch_limits(buckets, 128) == [8, 2]
    p0, p1 = named_profiles(dit_signature(), buckets, [8, 2])
    assert (p0.index, p0.bucket_edge, p1.index, p1.bucket_edge) == (0, 16, 1, 64)
    assert p0.shapes == {
        "x": ((1, 1, 8), (8, 16, 8), (8, 16, 8)),
        "context": ((1, 2, 4), (8, 10, 4), (8, 10, 4)),  # the named range, opt at its max
        "seq_lens": ((1,), (8,), (8,)),
        "mask": ((1, 1), (8, 16), (8, 16)),
    }
    assert p1.shapes["x"] == ((1, 17, 8), (2, 64, 8), (2, 64, 8))  # the bucket's range
    assert p1.shapes["mask"] == ((1, 17), (2, 64), (2, 64))
    # Through JSON and back, as in the engine metadata.
    assert NamedProfile.from_dict(json.loads(json.dumps(p1.to_dict()))) == p1


def test_unbatched_inputs_have_no_batch_axis() -> None:
    sig = Signature(
        inputs=(TensorSpec("img", "float32", ("I", 8)), TensorSpec("img_ids", "float32", ("I", 3), batched=False)),
        output=TensorSpec("out", "float32", ("I", 8)),
        bucketed="I",
    )
    (p,) = named_profiles(sig, Buckets((32,)), [4])
    assert p.shapes == {"img": ((1, 1, 8), (4, 32, 8), (4, 32, 8)), "img_ids": ((1, 3), (32, 3), (32, 3))}


def test_profile_arguments_are_checked() -> None:
    with pytest.raises(ConfigError, match=r"batch limits \[8\] must give one limit per bucket \[16, 64\]"):
        named_profiles(dit_signature(), Buckets((16, 64)), [8])
    with pytest.raises(ConfigError, match="integers >= 1"):
        named_profiles(dit_signature(), Buckets((16,)), [0])
    with pytest.raises(ConfigError, match="max_batch_tokens must be an integer >= 1, got 0"):
        batch_limits(Buckets((16,)), 0)


def test_select_named_profile_and_its_errors() -> None:
    sig = dit_signature()
    profiles = named_profiles(sig, Buckets((16, 64)), [8, 2])

    def shapes(b: int, s: int, t: int) -> dict[str, tuple[int, ...]]:
        return {"x": (b, s, 8), "context": (b, t, 4), "seq_lens": (b,), "mask": (b, s)}

    assert select_named_profile(profiles, shapes(8, 16, 10), sig) == 0
    assert select_named_profile(profiles, shapes(1, 17, 2), sig) == 1
    with pytest.raises(InvalidInputError, match=r"input 'x' has S=65 \(axis 1\), outside the engine's range \[1, 64\]"):
        select_named_profile(profiles, shapes(1, 65, 2), sig)
    with pytest.raises(InvalidInputError, match=r"input 'context' has T=11 \(axis 1\), outside .*\[2, 10\]"):
        select_named_profile(profiles, shapes(1, 8, 11), sig)
    with pytest.raises(InvalidInputError, match="fits no optimization profile .*split the batch"):
        select_named_profile(profiles, shapes(3, 40, 2), sig)  # bucket 64 takes 2 at most
    with pytest.raises(InvalidInputError, match=r"lacks inputs \['mask'\]"):
        select_named_profile(profiles, {"x": (1, 8, 8), "context": (1, 2, 4), "seq_lens": (1,)}, sig)


# --------------------------------------------------------------------------- IO and signature checks


def test_io_differences_name_the_tensor() -> None:
    sig = dit_signature()
    good = {
        "x": ("float16", 3, True),  # any float: the exported model's dtype
        "context": ("float16", 3, True),
        "seq_lens": ("int32", 1, True),
        "mask": ("int32", 2, True),  # int64 declared: int32 in the engine
        "y": ("float16", 3, False),
    }
    assert io_differences(sig, good) == []
    assert dtype_fits("int64", "int64") and not dtype_fits("int32", "int64") and not dtype_fits("bool", "float32")
    bad = dict(good, mask=("float32", 1, True), extra=("float32", 2, True))
    del bad["seq_lens"]
    problems = io_differences(sig, bad)
    assert any("input 'seq_lens' is declared but the graph has no such input" in p for p in problems)
    assert any("graph input 'extra' is not declared" in p for p in problems)
    assert any("input 'mask' has rank 1 in the graph; the signature gives rank 2" in p for p in problems)
    assert any(
        "input 'mask' is float32 in the graph; declared int64 (the graph must take int32)" in p for p in problems
    )
    renamed = dict(good, out=good["y"])
    del renamed["y"]
    assert io_differences(sig, renamed) == ["the graph's outputs are ['out']; the signature's output is 'y'"]


def test_signature_differences_where_the_engine_cares() -> None:
    sig = dit_signature()
    assert signature_differences(sig, sig) == []
    shape_batched = Signature(sig.inputs, sig.output, sig.bucketed, sig.ranges, "shape")
    assert signature_differences(sig, shape_batched) == []  # batching is the server's business
    narrower = Signature(sig.inputs, sig.output, sig.bucketed, {"T": (3, 8)}, "pad")
    assert signature_differences(sig, narrower) == []  # the engine covers what the server admits
    wider = Signature(sig.inputs, sig.output, sig.bucketed, {"T": (2, 20)}, "pad")
    assert signature_differences(sig, wider) == ["axis T: the engine takes [2, 10], the server admits [2, 20]"]
    other = (TensorSpec("x", "float32", ("S", 16)), *sig.inputs[1:])
    assert signature_differences(sig, Signature(other, sig.output, "S", sig.ranges, "pad")) == [
        "input 'x': axes ['S', 8] in the engine, ['S', 16] expected"
    ]


def test_keys_cover_model_onnx_config_signature_and_environment() -> None:
    sig, cfg = dit_signature(), BuildConfig(buckets=Buckets((16, 64)), max_batch_tokens=128)
    key = named_engine_key("model-a", "f" * 64, cfg, sig, ENV)
    assert re.fullmatch(r"engine-[0-9a-f]{32}", key) and named_engine_key("model-a", "f" * 64, cfg, sig, ENV) == key
    wider = Signature(sig.inputs, sig.output, "S", {"T": (2, 20)}, "pad")
    changed = [
        named_engine_key("model-b", "f" * 64, cfg, sig, ENV),
        named_engine_key("model-a", "e" * 64, cfg, sig, ENV),
        named_engine_key("model-a", "f" * 64, BuildConfig(buckets=Buckets((16,))), sig, ENV),
        named_engine_key("model-a", "f" * 64, cfg, wider, ENV),
        named_engine_key("model-a", "f" * 64, cfg, sig, dict(ENV, trt_version="10.8.0.43")),
        named_engine_key("model-a", "f" * 64, cfg, sig, dict(ENV, compute_capability="8.9")),
    ]
    assert len(set(changed)) == len(changed) and key not in changed
    shape_batched = Signature(sig.inputs, sig.output, "S", sig.ranges, "shape")
    assert named_engine_key("model-a", "f" * 64, cfg, shape_batched, ENV) == key
    assert named_onnx_key("model-a", sig) != named_onnx_key("model-b", sig)
    with pytest.raises(ConfigError, match="model_id must be a non-empty digest string"):
        named_onnx_key("", sig)


def test_engine_key_for_needs_the_onnx_in_the_store(tmp_path: Path) -> None:
    store, sig, cfg = ArtifactStore(tmp_path), dit_signature(), BuildConfig(buckets=Buckets((16,)))
    with pytest.raises(EngineNotFoundError, match=f"run `python -m build_jobs .* --store {re.escape(store.uri)}`"):
        named_engine_key_for(store, sig, "model-a", cfg, ENV)
    store.put("onnx", named_onnx_key("model-a", sig), b"onnx", {"onnx_sha256": "a" * 64})
    assert named_engine_key_for(store, sig, "model-a", cfg, ENV) == named_engine_key("model-a", "a" * 64, cfg, sig, ENV)


def test_the_named_record_points_to_the_exported_file_or_holds_it(tmp_path: Path) -> None:
    """The ONNX bytes are in the store once: where the export stored the same file, the named
    record only points to it; otherwise (another file, or no export key) it holds the file. The
    engine's key is found from the record either way."""
    store, sig, cfg = ArtifactStore(tmp_path / "store"), dit_signature(), BuildConfig(buckets=Buckets((16,)))
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"graph bytes" * 100)
    sha = hashlib.sha256(onnx.read_bytes()).hexdigest()
    store.put("onnx", "onnx-export", onnx.read_bytes(), {"onnx_sha256": sha})
    okey, got_sha = index_named_onnx(store, onnx, sig, "model-a", stored_as="onnx-export")
    assert okey == named_onnx_key("model-a", sig) and got_sha == sha
    data, meta = store.get("onnx", okey)
    assert data == b"" and meta["stored_as"] == "onnx-export" and meta["onnx_sha256"] == sha
    assert named_engine_key_for(store, sig, "model-a", cfg, ENV) == named_engine_key("model-a", sha, cfg, sig, ENV)
    # Another file under the same model: the export's entry no longer matches, so the record holds it.
    onnx.write_bytes(b"other graph")
    sha2 = hashlib.sha256(b"other graph").hexdigest()
    index_named_onnx(store, onnx, sig, "model-a", stored_as="onnx-export")
    data, meta = store.get("onnx", okey)
    assert data == b"other graph" and meta["stored_as"] is None and meta["onnx_sha256"] == sha2
    assert named_engine_key_for(store, sig, "model-a", cfg, ENV) == named_engine_key("model-a", sha2, cfg, sig, ENV)
    # No export key at all (a file built directly): the record holds it; asked again, it is kept.
    _, stored_at = store.get("onnx", okey)
    index_named_onnx(store, onnx, sig, "model-a")
    assert store.metadata("onnx", okey)["stored_at"] == stored_at["stored_at"]


def test_from_bytes_refuses_another_environment_before_deserializing() -> None:
    meta = dict(ENV, trt_version="9.0.0", hardware_compatibility_level="none", signature=dit_signature().to_dict())
    with pytest.raises(EngineMismatchError, match="built for TensorRT 9.0.0, this is TensorRT 10.13.0.35"):
        NamedTRTEngine.from_bytes(b"not an engine", meta, environment=ENV)


def test_int64_inputs_are_narrowed_with_a_range_check() -> None:
    t = torch.tensor([[1, 2], [3, 4]])
    got = narrow_to_engine("input_ids", t, torch.int32, torch.device("cpu"))
    assert got.dtype == torch.int32 and torch.equal(got, t.to(torch.int32))
    with pytest.raises(InvalidInputError, match=r"input 'input_ids' holds values 1..4294967296, outside int32"):
        narrow_to_engine("input_ids", torch.tensor([1, 1 << 32]), torch.int32, torch.device("cpu"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_backend_without_gpu_says_what_is_missing(tmp_path: Path) -> None:
    from fa3trt.errors import MissingDependencyError
    from fa3trt.trt.named_runtime import NamedTensorRTBackend

    with pytest.raises(MissingDependencyError, match="CUDA GPU"):
        NamedTensorRTBackend.load(dit_signature(), "model-a", buckets=Buckets((16,)), store=str(tmp_path))


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
    ranges = export_axis_ranges(sig, BUCKETS)
    assert ranges == {"S": (1, 64)}
    with torch.no_grad(), fa3trt.route_attention(bert) as report:
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
    assert res.plugin_nodes == report.routed == 0, report.summary()
    assert report.left and all(r.endswith("while tracing (values unknown)") for r in report.left), report.left
    # Strict tracing stops inside transformers' own mask code when attention_mask is an input (fallback).
    assert res.strict or with_mask
    assert {n: d["dtype"] for n, d in res.inputs.items()} == {t.name: "int32" for t in sig.inputs}
    with pytest.raises(
        ConfigError, match=r"the graph's outputs are \['y'\]; the signature's output is 'last_hidden_state'"
    ):
        check_onnx_signature(res.path, sig)
    with torch.no_grad(), fa3trt.route_attention(bert):
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
    profiles = named_profiles(sig, BUCKETS, batch_limits(BUCKETS, MAX_BATCH_TOKENS))
    corners = []
    for p in profiles:
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
    io, dims = onnx_io(res.path)
    assert io["input_ids"] == ("int32", 2, True) and dims["input_ids"] == ["B", 12]
    with pytest.raises(
        ConfigError, match=r"input 'input_ids': axis S came out static \(12\).*signature.dynamic_axes\(\)"
    ):
        build_named_engine(res.path, sig, BuildConfig(buckets=BUCKETS))  # refused on the CPU, before TensorRT
    wrong = Signature((TensorSpec("input_ids", "int64", ("S", 4)),), sig.output, "S")
    with pytest.raises(ConfigError, match=r"input 'input_ids' has rank 2 in the graph; the signature gives rank 3"):
        check_onnx_signature(res.path, wrong)


# --------------------------------------------------------------------------- TensorRT


@gpu
@requires_tensorrt
def test_bert_engine_matches_the_torch_model(bert: torch.nn.Module, tmp_path: Path) -> None:
    from fa3trt.trt.named_build import build_named_to_store
    from fa3trt.trt.named_runtime import NamedTensorRTBackend
    from tests.utils import rel_err

    sig = bert_signature(with_mask=False)
    samples = sig.samples(sig.sample_sizes(BUCKETS, length=12), batch=2)
    with torch.no_grad(), fa3trt.route_attention(bert):
        res = export_onnx(
            bert,
            tmp_path / "b.onnx",
            samples,
            sig.dynamic_axes(),
            output=0,
            output_name=sig.output.name,
            axis_ranges=export_axis_ranges(sig, BUCKETS),
        )
    store = ArtifactStore(tmp_path / "store")
    cfg = BuildConfig(buckets=BUCKETS, max_batch_tokens=MAX_BATCH_TOKENS)
    meta: dict[str, Any] = build_named_to_store(store, res.path, sig, "bert-tiny", cfg)
    assert meta["signature"] == sig.to_dict() and len(meta["named_profiles"]) == 2
    be = NamedTensorRTBackend.load(sig, "bert-tiny", buckets=BUCKETS, store=store, max_batch_tokens=MAX_BATCH_TOKENS)
    assert be.describe()["backend"] == "tensorrt" and be.signature == sig
    for shape in [(1, 1), (8, 16), (2, 64)]:
        batch = corner_inputs(sig, shape, seed=0)
        got = be.run(batch).float().cpu()
        with torch.no_grad():
            want = bert(**batch).last_hidden_state
        assert rel_err(got, want) < 1e-2, shape
    be.warmup([corner_inputs(sig, (1, 16), seed=1)])
    with pytest.raises(InvalidInputError, match="outside the engine's range"):
        be.run(corner_inputs(sig, (1, 65), seed=2))
    other = Signature(sig.inputs, TensorSpec("last_hidden_state", "float32", ("S", 64)), "S")
    with pytest.raises((EngineMismatchError, EngineNotFoundError)):
        NamedTensorRTBackend.load(other, "bert-tiny", buckets=BUCKETS, store=store, max_batch_tokens=MAX_BATCH_TOKENS)


@gpu
@requires_tensorrt
def test_build_if_missing_exports_and_builds_a_user_model(tmp_path: Path) -> None:
    """examples/serve_bert.yaml's model on backend tensorrt with an empty store: without
    build_if_missing the error names the build command; with it, the replica's loader exports
    the ONNX, builds this GPU's engine (the ONNX stored once) and serves the eager model's answers."""
    import yaml

    from fa3trt.config import AppArgs, SourceSpec
    from fa3trt.errors import EngineNotFoundError
    from fa3trt.models.sources import model_id
    from fa3trt.onnx.calls import select_output
    from fa3trt.serving.served import ModuleBackend, load_named_backend
    from tests.utils import rel_err

    doc = yaml.safe_load((Path(__file__).resolve().parents[2] / "examples/serve_bert.yaml").read_text())
    app = AppArgs.model_validate(doc["applications"][0]["args"])
    spec, buckets, mbt = app.model, app.bucket_set(), app.batching.max_batch_tokens
    assert isinstance(spec, SourceSpec)
    store = str(tmp_path / "store")
    with pytest.raises(EngineNotFoundError, match="build_jobs"):
        load_named_backend("tensorrt", spec, buckets=buckets, store=store, max_batch_tokens=mbt)
    be = load_named_backend("tensorrt", spec, buckets=buckets, store=store, max_batch_tokens=mbt, build_if_missing=True)
    assert be.describe()["backend"] == "tensorrt" and be.signature == spec.signature()
    st = ArtifactStore(store)
    record = st.metadata("onnx", named_onnx_key(model_id(spec), spec.signature()))
    assert record["size"] == 0 and record["stored_as"]  # a pointer to the export, not a second copy
    eager = ModuleBackend(spec, "cuda").module  # the model as transformers runs it, unrouted
    sig = spec.signature()
    for length in (5, 64, 300):
        req = sig.check(sig.sample_request(length, seed=length), buckets)
        batch = sig.assemble([req], be.device)
        with torch.inference_mode():
            want = select_output(eager(**batch), "last_hidden_state")
        assert rel_err(be.run(batch).float().cpu(), want.float().cpu()) < 1e-3
