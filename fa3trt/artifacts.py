"""What a model spec turns into in the store: its exported ONNX (shared by every GPU type) and
this GPU's engine. The one path from a model to an engine, for every model.

Contract:
- ``onnx_key(spec, buckets)`` names the ONNX export of a model spec: a hash of the model's
  identity (``fa3trt.models.sources.model_id``: source, config, weights, signature), the buckets
  (the bucketed axis's range), the opset, the plugin version and torch's major.minor version,
  which owns the exporter.
- ``ensure_onnx(store, spec, buckets, workdir)`` exports once (``fa3trt.models.export``) and
  shares the file through the store; every later caller, on any node, fetches it. Its metadata
  holds the file's sha256, its inputs and output, its plugin nodes' calls and the routing report.
- ``engine_key_for(store, spec, buckets, config)`` is this GPU's engine key for that file
  (``EngineNotFoundError`` naming the build command when the ONNX was never exported there).
- ``build_to_store(store, spec, buckets, max_batch_tokens, workdir)`` takes a model from its
  spec to this GPU's engine in the store: the export (once per spec), then the build with the
  store's timing cache for this (GPU, TensorRT version), written back. An engine already in the
  store is returned as is unless ``force``. Concurrent builders of one key both succeed (the
  store's writes are atomic); the timing cache is last-writer-wins, which only costs build time.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fa3trt._hashing import spec_hash
from fa3trt.attention.op import PLUGIN_NAME, PLUGIN_VERSION
from fa3trt.buckets import Buckets
from fa3trt.defaults import BUILD_HINT
from fa3trt.errors import ArtifactNotFoundError, EngineNotFoundError
from fa3trt.models.export import export_source
from fa3trt.models.sources import model_id
from fa3trt.models.spec import AnyModelSpec
from fa3trt.onnx.export import OPSET
from fa3trt.store import ArtifactStore, validate_key

if TYPE_CHECKING:
    from fa3trt.trt.build import BuildConfig

__all__ = ["onnx_key", "ensure_onnx", "engine_key_for", "build_to_store", "build_config"]

log = logging.getLogger(__name__)


def _torch_minor() -> str:
    return ".".join(torch.__version__.split("+")[0].split(".")[:2])


def onnx_key(spec: AnyModelSpec, buckets: Buckets) -> str:
    """Store key of the ONNX export of ``spec`` for ``buckets`` (see the module docstring)."""
    parts = {
        "model": model_id(spec),
        "buckets": list(buckets.edges),
        "opset": OPSET,
        "plugin": f"{PLUGIN_NAME}/{PLUGIN_VERSION}",
        "torch": _torch_minor(),
    }
    return validate_key("onnx-" + spec_hash(parts))


def ensure_onnx(
    store: ArtifactStore, spec: AnyModelSpec, buckets: Buckets, workdir: str | os.PathLike[str]
) -> tuple[Path, dict[str, Any]]:
    """A local path to the ONNX of ``spec``, exported and stored on first use; (path, metadata).

    An export with external data is stored as two entries, ``<key>`` and ``<key>.onnx.data``,
    and restored side by side."""
    key = onnx_key(spec, buckets)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / f"{key}.onnx"
    data_name = f"{key}.onnx.data"
    if store.has("onnx", key):
        blob, stored = store.get("onnx", key)
        path.write_bytes(blob)
        if stored.get("external_data"):
            ext, _ = store.get("onnx", data_name)
            (workdir / data_name).write_bytes(ext)
        return path, stored
    log.info("exporting ONNX %s of %s", key, spec.describe())
    res = export_source(spec, path, buckets)  # on the CPU: the graph is device-independent
    meta = {
        "onnx_sha256": res.sha256,
        "external_data": res.external_data,
        "plugin_nodes": res.plugin_nodes,
        "plugin_calls": res.plugins,
        "routing": res.routing,
        "inputs": res.inputs,
        "output": res.output,
        "torch": torch.__version__,
        "model": spec.model_dump(mode="json", by_alias=True),
        "model_id": model_id(spec),
        "buckets": list(buckets.edges),
    }
    if res.external_data:
        store.put("onnx", data_name, (workdir / data_name).read_bytes(), {"of": key})
    return path, store.put("onnx", key, path.read_bytes(), meta)


def build_config(buckets: Buckets, max_batch_tokens: int) -> BuildConfig:
    """The build config of an app's engines: its buckets and token budget, TensorRT's defaults
    for the rest."""
    from fa3trt.trt.build import BuildConfig

    return BuildConfig(buckets=buckets, max_batch_tokens=max_batch_tokens)


def engine_key_for(
    store: ArtifactStore,
    spec: AnyModelSpec,
    config: BuildConfig,
    env: dict[str, str] | None = None,
) -> str:
    """This GPU's engine key for ``spec`` built with ``config`` (whose buckets name the ONNX)."""
    from fa3trt.trt.build import build_hash
    from fa3trt.trt.compat import current_environment, engine_key

    env = env or current_environment()
    try:
        meta = store.metadata("onnx", onnx_key(spec, config.buckets))
    except ArtifactNotFoundError:
        raise EngineNotFoundError(
            f"no engine for {spec.describe()} in store {store.uri}: its ONNX was never exported there, so nothing "
            f"was built; run `{BUILD_HINT} --store {store.uri}`"
        ) from None
    sig = spec.signature()
    return engine_key(
        str(meta["onnx_sha256"]),
        build_hash(config, sig),
        env["trt_version"],
        env["compute_capability"],
        PLUGIN_VERSION,
    )


def build_to_store(
    store: ArtifactStore,
    spec: AnyModelSpec,
    buckets: Buckets,
    max_batch_tokens: int,
    workdir: str | os.PathLike[str],
    *,
    force: bool = False,
    config: BuildConfig | None = None,
) -> dict[str, Any]:
    """This GPU's engine of ``spec`` in ``store`` (see the module docstring); returns its
    metadata. Needs a GPU and TensorRT."""
    from fa3trt.trt.build import build_engine
    from fa3trt.trt.compat import current_environment
    from fa3trt.trt.plugin import register_plugin

    config = config or build_config(buckets, max_batch_tokens)
    register_plugin(config.plugin_namespace)  # before anything parses or builds
    env = current_environment()
    path, onnx_meta = ensure_onnx(store, spec, buckets, workdir)
    key = engine_key_for(store, spec, config, env)
    if store.has("engines", key) and not force:
        log.info("engine %s already in %s; pass force=True to rebuild", key, store.uri)
        return store.metadata("engines", key)
    gpu_type = f"{env['gpu_name']}-sm{env['compute_capability']}"
    tpath = Path(workdir) / "timing.cache"
    if (cache := store.get_timing_cache(gpu_type, env["trt_version"])) is not None:
        tpath.write_bytes(cache)  # a corrupt cache comes back as None and is not fed to TensorRT
    data, meta = build_engine(path, spec.signature(), dataclasses.replace(config, timing_cache_path=str(tpath)))
    if tpath.exists():
        store.put_timing_cache(gpu_type, env["trt_version"], tpath.read_bytes())
    meta.update(key=key, onnx_key=onnx_meta["key"], model_id=model_id(spec), model=spec.describe())
    meta["build_config"]["timing_cache_path"] = None  # a worker's temp path means nothing elsewhere
    return store.put("engines", key, data, meta)
