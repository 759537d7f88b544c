"""What a model spec turns into in the store: its exported ONNX (shared by every GPU type) and
the weights the torch backend serves.

``onnx_key(config, weights)`` names the ONNX export of a model spec: a hash of everything that
changes the exported graph (model config, weights content, opset, plugin version, torch's
major.minor version, which owns the exporter). ``ensure_onnx`` exports once and shares the file
through the store; every later caller, on any node, fetches it. ``build_source_to_store`` takes
a user's model from its spec to this GPU's engine: the export (once per spec), then the build.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fa3trt._hashing import spec_hash
from fa3trt.attention.op import PLUGIN_NAME, PLUGIN_VERSION
from fa3trt.buckets import Buckets
from fa3trt.config import SourceSpec
from fa3trt.models.reference import ModelConfig, build_model
from fa3trt.models.sources import export_source, model_id
from fa3trt.onnx.export import OPSET, export_onnx, file_sha256
from fa3trt.store import ArtifactStore

__all__ = [
    "weights_digest",
    "onnx_key",
    "ensure_onnx",
    "source_onnx_key",
    "ensure_source_onnx",
    "build_source_to_store",
    "spec_hash",
]

log = logging.getLogger(__name__)


def weights_digest(config: ModelConfig, weights: str | os.PathLike[str] | None) -> str:
    """sha256 of the weights file, or ``seed:<n>`` for the seeded init."""
    return f"seed:{config.seed}" if weights is None else file_sha256(weights)


def _torch_minor() -> str:
    return ".".join(torch.__version__.split("+")[0].split(".")[:2])


def onnx_key(config: ModelConfig, weights: str | os.PathLike[str] | None) -> str:
    """Store key of the ONNX export of (config, weights). Ignores ``config.name`` (a label)."""
    parts = {
        "model": config.compute_hash(),
        "weights": weights_digest(config, weights),
        "opset": OPSET,
        "plugin": f"{PLUGIN_NAME}/{PLUGIN_VERSION}",
        "torch": _torch_minor(),
    }
    return "onnx-" + spec_hash(parts)


def source_onnx_key(spec: SourceSpec, buckets: Buckets) -> str:
    """Store key of the ONNX export of a user's model (its ``model_id``) for ``buckets`` (the
    bucketed axis's range)."""
    parts = {
        "model": model_id(spec),
        "buckets": list(buckets.edges),
        "opset": OPSET,
        "plugin": f"{PLUGIN_NAME}/{PLUGIN_VERSION}",
        "torch": _torch_minor(),
    }
    return "onnx-" + spec_hash(parts)


def _ensure(
    store: ArtifactStore, key: str, workdir: str | os.PathLike[str], export: Callable[[Path], Any], meta: dict[str, Any]
) -> tuple[Path, dict[str, Any]]:
    """The stored ONNX ``key`` in ``workdir``, made by ``export(path)`` and stored on first use."""
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
    log.info("exporting ONNX %s", key)
    res = export(path)
    meta = {
        "onnx_sha256": res.sha256,
        "external_data": res.external_data,
        "plugin_nodes": res.plugin_nodes,
        "inputs": res.inputs,
        "output": res.output,
        "torch": torch.__version__,
        **meta,
    }
    if res.external_data:
        store.put("onnx", data_name, (workdir / data_name).read_bytes(), {"of": key})
    return path, store.put("onnx", key, path.read_bytes(), meta)


def ensure_onnx(
    store: ArtifactStore,
    config: ModelConfig,
    weights: str | os.PathLike[str] | None,
    workdir: str | os.PathLike[str],
) -> tuple[Path, dict[str, Any]]:
    """A local path to the ONNX of (config, weights), exported and stored on first use.

    Returns (path, metadata); metadata has the file's ``sha256``. An export with external data
    is stored as two entries, ``<key>`` and ``<key>.onnx.data``, and restored side by side.
    """
    meta = {"model": config.to_dict(), "weights": weights_digest(config, weights)}
    # Exported on the CPU: the graph is device-independent.
    return _ensure(
        store, onnx_key(config, weights), workdir, lambda p: export_onnx(build_model(config, weights), p), meta
    )


def ensure_source_onnx(
    store: ArtifactStore, spec: SourceSpec, buckets: Buckets, workdir: str | os.PathLike[str]
) -> tuple[Path, dict[str, Any]]:
    """``ensure_onnx`` for a user's model (``fa3trt.models.sources.export_source``)."""
    meta = {"model": spec.model_dump(mode="json", by_alias=True), "model_id": model_id(spec)}
    return _ensure(store, source_onnx_key(spec, buckets), workdir, lambda p: export_source(spec, p, buckets), meta)


def build_source_to_store(
    store: ArtifactStore,
    spec: SourceSpec,
    buckets: Buckets,
    max_batch_tokens: int,
    workdir: str | os.PathLike[str],
    *,
    force: bool = False,
) -> dict[str, Any]:
    """A user's model on TensorRT: its routed ONNX (``ensure_source_onnx``: exported once per
    spec, on any node), then this GPU's engine with one profile per bucket over every named axis
    (``fa3trt.trt.named_build.build_named_to_store``; its ONNX record points to the export's entry).
    Returns the engine's metadata. Needs a GPU and TensorRT."""
    from fa3trt.trt.build import BuildConfig
    from fa3trt.trt.named_build import build_named_to_store

    path, onnx_meta = ensure_source_onnx(store, spec, buckets, workdir)
    config = BuildConfig(buckets=buckets, max_batch_tokens=max_batch_tokens)
    return build_named_to_store(
        store, path, spec.signature(), model_id(spec), config, force=force, stored_as=str(onnx_meta["key"])
    )
