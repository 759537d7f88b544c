"""Build and name the engine of any model described by a ``Signature`` (named inputs, one output).

Contract:
- ``check_onnx_signature(onnx_path, signature)`` compares the ONNX file's graph inputs and
  output with the signature before anything is built: names, ranks, dtypes (``int64`` declared
  is ``int32`` in the graph: ``fa3trt.onnx.calls``), fixed sizes, and named axes left dynamic. A
  difference is a ``ConfigError`` naming the input and the fix.
- ``build_named_engine(onnx_path, signature, config)`` builds one optimization profile per
  bucket (``fa3trt.trt.profiles.named_profiles``) and returns (bytes, metadata); the metadata holds
  the environment, ``signature`` (``Signature.to_dict()``), the ``named_profiles`` and the
  build config, as ``fa3trt.trt.build.build_engine``'s does for the reference model.
- Keys: ``named_onnx_key(model_id, signature)`` names the ONNX file in the store and
  ``named_engine_key(model_id, onnx_sha256, config, signature, env)`` the engine: a hash of the
  model source's identity (``model_id``, an opaque digest its caller computes from the model
  config), the ONNX file, the build config, the engine-shaping part of the signature, and the
  TensorRT version, compute capability and plugin version (``fa3trt.trt.compat.engine_key``).
- ``index_named_onnx`` records under ``named_onnx_key`` which ONNX file (its sha256) a named
  model's engines come from: a pointer where the export already stored the file (``stored_as``),
  else the file itself. ``build_named_to_store`` does this and puts this GPU's engine in the
  store; ``named_engine_key_for`` finds the engine's key again from that record.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from fa3trt._hashing import spec_hash
from fa3trt.attention.op import PLUGIN_NAME, PLUGIN_VERSION
from fa3trt.errors import ArtifactNotFoundError, ConfigError, EngineNotFoundError
from fa3trt.onnx.export import file_sha256
from fa3trt.signature import Signature
from fa3trt.store import BUILD_HINT, ArtifactStore, validate_key
from fa3trt.trt.build import BuildConfig, build_metadata, engine_bytes
from fa3trt.trt.compat import current_environment, engine_key
from fa3trt.trt.plugin import register_plugin
from fa3trt.trt.profiles import IOSpec, batch_limits, engine_signature, io_differences, named_profiles

__all__ = [
    "onnx_io",
    "check_onnx_signature",
    "build_named_engine",
    "named_onnx_key",
    "named_engine_key",
    "named_engine_key_for",
    "index_named_onnx",
    "build_named_to_store",
]

log = logging.getLogger(__name__)

_ONNX_DTYPES = {1: "float32", 10: "float16", 16: "bfloat16", 6: "int32", 7: "int64", 9: "bool"}


def onnx_io(onnx_path: str | os.PathLike[str]) -> tuple[dict[str, IOSpec], dict[str, list[int | str]]]:
    """The file's graph inputs and outputs as (dtype, rank, is_input), and each one's dims
    (a static size, or its axis name)."""
    import onnx

    graph = onnx.load(os.fspath(onnx_path), load_external_data=False).graph
    io: dict[str, IOSpec] = {}
    dims: dict[str, list[int | str]] = {}
    for values, is_input in ((graph.input, True), (graph.output, False)):
        for v in values:
            t = v.type.tensor_type
            dtype = _ONNX_DTYPES.get(t.elem_type, onnx.TensorProto.DataType.Name(t.elem_type).lower())
            io[v.name] = (dtype, len(t.shape.dim), is_input)
            dims[v.name] = [d.dim_param or d.dim_value for d in t.shape.dim]
    return io, dims


def check_onnx_signature(onnx_path: str | os.PathLike[str], signature: Signature) -> None:
    """``ConfigError`` naming every input of ``onnx_path`` that disagrees with ``signature``."""
    io, dims = onnx_io(onnx_path)
    problems = io_differences(signature, io)
    for t in signature.inputs:
        if t.name not in dims or len(dims[t.name]) != len(t.axes) + (1 if t.batched else 0):
            continue  # reported above
        got = dims[t.name][1:] if t.batched else dims[t.name]
        if t.batched and not isinstance(dims[t.name][0], str):
            problems.append(f"input {t.name!r}: the batch axis is static ({dims[t.name][0]}) in the graph")
        for i, (want, have) in enumerate(zip(t.axes, got)):
            if isinstance(want, int) and have not in (want, 0):
                problems.append(f"input {t.name!r}: axis {i} has size {have} in the graph; declared {want}")
            if isinstance(want, str) and not isinstance(have, str):
                problems.append(f"input {t.name!r}: axis {want} came out static ({have}) in the graph")
    if problems:
        raise ConfigError(
            f"ONNX file {onnx_path} does not match the model's signature: {'; '.join(problems)}. Fix: export "
            "with fa3trt.export_onnx(model, path, signature.samples(sizes), signature.dynamic_axes(), "
            "output_name=signature.output.name), or correct the signature"
        )


def build_named_engine(
    onnx_path: str | os.PathLike[str], signature: Signature, config: BuildConfig
) -> tuple[bytes, dict[str, Any]]:
    """Build the engine of a named model (see the module docstring); returns (bytes, metadata).

    The plugin must be registered in this process first (``fa3trt.trt.plugin.register_plugin``)."""
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise ConfigError(f"ONNX file {onnx_path} does not exist; export it first (fa3trt.export_onnx)")
    check_onnx_signature(onnx_path, signature)  # before the GPU and TensorRT are asked anything
    env = current_environment()
    specs = named_profiles(signature, config.buckets, batch_limits(config.buckets, config.max_batch_tokens))
    data, seconds = engine_bytes(onnx_path, config, [s.shapes for s in specs])
    meta: dict[str, Any] = {
        **build_metadata(onnx_path, config, env),
        "signature": signature.to_dict(),
        "named_profiles": [s.to_dict() for s in specs],
        "bucket_to_profile": {str(s.bucket_edge): s.index for s in specs},
        "build_seconds": round(seconds, 3),
        "built_at": time.time(),
    }
    log.info("built engine from %s in %.1fs (%d bytes, %d profiles)", onnx_path.name, seconds, len(data), len(specs))
    return data, meta


def _model_id(model_id: str) -> str:
    if not isinstance(model_id, str) or not model_id:
        raise ConfigError(f"model_id must be a non-empty digest string (the model source's identity), got {model_id!r}")
    return model_id


def named_onnx_key(model_id: str, signature: Signature) -> str:
    """Store key of a named model's ONNX file: its source's identity and its signature."""
    parts = {
        "model": _model_id(model_id),
        "signature": engine_signature(signature),
        "plugin": f"{PLUGIN_NAME}/{PLUGIN_VERSION}",
    }
    return validate_key("onnx-named-" + spec_hash(parts))


def named_engine_key(
    model_id: str, onnx_sha256: str, config: BuildConfig, signature: Signature, env: dict[str, str]
) -> str:
    """Store key of a named model's engine on the GPU and TensorRT of ``env`` (``current_environment()``)."""
    build = spec_hash(
        {"build": config.compute_hash(), "model": _model_id(model_id), "signature": engine_signature(signature)}
    )
    return engine_key(onnx_sha256, build, env["trt_version"], env["compute_capability"], PLUGIN_VERSION)


def named_engine_key_for(
    store: ArtifactStore,
    signature: Signature,
    model_id: str,
    config: BuildConfig,
    env: dict[str, str] | None = None,
) -> str:
    """This GPU's engine key for a named model whose ONNX file is in ``store``; without that file
    there can be no engine either, and ``EngineNotFoundError`` names the build command."""
    env = env or current_environment()
    try:
        meta = store.metadata("onnx", named_onnx_key(model_id, signature))
    except ArtifactNotFoundError:
        raise EngineNotFoundError(
            f"no engine for model {model_id} in store {store.uri}: its ONNX was never put there, so nothing "
            f"was built; run `{BUILD_HINT} --store {store.uri}`"
        ) from None
    return named_engine_key(model_id, str(meta["onnx_sha256"]), config, signature, env)


def index_named_onnx(
    store: ArtifactStore,
    onnx_path: str | os.PathLike[str],
    signature: Signature,
    model_id: str,
    *,
    stored_as: str | None = None,
) -> tuple[str, str]:
    """Record in ``store``, under ``named_onnx_key``, the ONNX file a named model's engines are
    built from; returns (that key, the file's sha256).

    Where the export already stored the same file (``stored_as``, its key, whose
    ``onnx_sha256`` matches), the record only points to it; otherwise it holds the file, so the
    bytes are in the store once either way. A record that already says the same is kept."""
    sha = file_sha256(onnx_path)
    okey = named_onnx_key(model_id, signature)
    pointer = (
        stored_as is not None
        and store.has("onnx", stored_as)
        and str(store.metadata("onnx", stored_as).get("onnx_sha256")) == sha
    )
    meta: dict[str, Any] = {"onnx_sha256": sha, "model_id": model_id, "stored_as": stored_as if pointer else None}
    if store.has("onnx", okey):
        have = store.metadata("onnx", okey)
        if all(have.get(k) == v for k, v in meta.items()):
            return okey, sha
    store.put("onnx", okey, b"" if pointer else Path(onnx_path).read_bytes(), meta)
    return okey, sha


def build_named_to_store(
    store: ArtifactStore,
    onnx_path: str | os.PathLike[str],
    signature: Signature,
    model_id: str,
    config: BuildConfig,
    *,
    force: bool = False,
    stored_as: str | None = None,
) -> dict[str, Any]:
    """Put this GPU's engine built from ``onnx_path`` in ``store``, and the file's record
    (``index_named_onnx``; ``stored_as``: the file's key where the export stored it); returns the
    engine's metadata.

    Registers the plugin, checks the file against the signature, and builds with the store's
    timing cache for this (GPU, TensorRT version), writing it back. An engine already in the
    store is returned as is unless ``force``.
    """
    register_plugin(config.plugin_namespace)
    env = current_environment()
    check_onnx_signature(onnx_path, signature)
    okey, sha = index_named_onnx(store, onnx_path, signature, model_id, stored_as=stored_as)
    key = named_engine_key(model_id, sha, config, signature, env)
    if store.has("engines", key) and not force:
        log.info("engine %s already in %s; pass force=True to rebuild", key, store.uri)
        return store.metadata("engines", key)
    gpu_type = f"{env['gpu_name']}-sm{env['compute_capability']}"
    with tempfile.TemporaryDirectory(prefix="fa3trt-build-") as tmp:
        tpath = Path(tmp) / "timing.cache"
        if (cache := store.get_timing_cache(gpu_type, env["trt_version"])) is not None:
            tpath.write_bytes(cache)
        data, meta = build_named_engine(onnx_path, signature, dataclasses.replace(config, timing_cache_path=str(tpath)))
        if tpath.exists():
            store.put_timing_cache(gpu_type, env["trt_version"], tpath.read_bytes())
    meta.update(key=key, onnx_key=okey, model_id=model_id)
    meta["build_config"]["timing_cache_path"] = None  # a worker's temp path means nothing elsewhere
    return store.put("engines", key, data, meta)
