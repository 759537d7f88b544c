"""What runs inside the Ray workers: the per-spec ONNX export and the per-item build.

``export_spec`` exports a spec's ONNX once and puts it in the store; every ``build_item`` of that
spec (one per GPU type) depends on it, so the export is shared instead of repeated per GPU.

``build_item`` runs on the item's GPU (``num_gpus=1``) or CPU slot:

1. TensorRT backend: ``register_plugin()`` first, logged with the worker's
   ``CUDA_VISIBLE_DEVICES``; then ``fa3trt.trt.build.build_to_store`` builds and stores the engine.
2. Torch backend: fetch the ONNX (``ensure_onnx``), verify it in ONNX Runtime against a float32
   copy of the model (``verify_onnx``), and store the weights the torch backend serves as
   safetensors under kind ``artifacts``.
3. Write the item's build record (kind ``artifacts``, key ``item.item_key``) naming the artifact.

Failures are raised as ``BuildItemError`` carrying where the worker ran; Ray retries them
(``max_retries``) and the driver reports the last one. Both functions are plain functions (Ray
wraps them in ``remote_functions``), so they also run in-process.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from build_jobs.plan import RECORD_KIND, BuildItem
from fa3trt import defaults
from fa3trt.config import SourceSpec
from fa3trt.errors import ArtifactCorruptError, BuildItemError
from fa3trt.models.reference import ModelConfig
from fa3trt.store import ArtifactStore, validate_key

__all__ = ["export_spec", "build_item", "weights_key", "worker_info", "remote_functions"]

log = logging.getLogger(__name__)


def _setup_worker_logging() -> None:
    """INFO logs of this project to the worker's stderr (Ray forwards it to the driver)."""
    for name in ("build_jobs", "fa3trt"):
        lg = logging.getLogger(name)
        if not lg.handlers:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            lg.addHandler(handler)
            lg.setLevel(logging.INFO)


def worker_info() -> dict[str, Any]:
    """Where this code runs: Ray node id, assigned GPU ids, CUDA_VISIBLE_DEVICES, host, pid."""
    info: dict[str, Any] = {
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "node_id": None,
        "gpu_ids": [],
    }
    try:
        import ray

        if ray.is_initialized():
            ctx = ray.get_runtime_context()
            info["node_id"] = ctx.get_node_id()
            info["gpu_ids"] = [str(g) for g in ctx.get_accelerator_ids().get("GPU", [])]
    except Exception as e:  # outside a Ray worker the context is partial; where-info is best effort
        log.debug("no Ray runtime context: %s", e)
    return info


def _device_info() -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        return {"device": "cpu"}
    props = torch.cuda.get_device_properties(0)
    return {
        "device": "cuda:0",
        "device_name": props.name,
        "device_uuid": str(getattr(props, "uuid", "")),
        "compute_capability": f"{props.major}.{props.minor}",
    }


def weights_key(model: ModelConfig, weights: str | None) -> str:
    """Store key (kind ``artifacts``) of the safetensors weights the torch backend serves."""
    from fa3trt.artifacts import spec_hash, weights_digest

    return validate_key(
        "weights-" + spec_hash({"model": model.compute_hash(), "weights": weights_digest(model, weights)})
    )


def export_spec(
    store_uri: str,
    model: ModelConfig | SourceSpec,
    weights: str | None,
    force: bool = False,
    buckets: tuple[int, ...] | None = None,
) -> dict[str, Any]:
    """Export (or fetch) the spec's ONNX into the store; returns its key, sha256 and timing.

    ``force`` re-exports; a corrupt stored export is replaced. A user's model (``SourceSpec``)
    is exported with its attention routed, for ``buckets``.
    """
    from fa3trt.artifacts import ensure_onnx, ensure_source_onnx, onnx_key, source_onnx_key
    from fa3trt.buckets import Buckets

    _setup_worker_logging()
    t0 = time.time()
    store = ArtifactStore(store_uri)
    if isinstance(model, SourceSpec):
        edges = Buckets(tuple(buckets or defaults.BUCKETS))
        key = source_onnx_key(model, edges)

        def ensure(tmp: str) -> tuple[Any, dict[str, Any]]:
            return ensure_source_onnx(store, model, edges, tmp)
    else:
        key = onnx_key(model, weights)

        def ensure(tmp: str) -> tuple[Any, dict[str, Any]]:
            return ensure_onnx(store, model, weights, tmp)

    if force:
        store.delete("onnx", key)
        store.delete("onnx", f"{key}.onnx.data")
    with tempfile.TemporaryDirectory(prefix="fa3trt-export-") as tmp:
        try:
            _, meta = ensure(tmp)
        except ArtifactCorruptError as e:
            log.warning("stored ONNX %s is corrupt (%s); exporting it again", key, e)
            store.delete("onnx", key)
            store.delete("onnx", f"{key}.onnx.data")
            _, meta = ensure(tmp)
    log.info("ONNX %s ready in %.1fs", key, time.time() - t0)
    return {"onnx_key": key, "sha256": meta.get("sha256"), "seconds": time.time() - t0, **worker_info()}


def _build_engine(
    item: BuildItem, store: ArtifactStore, force: bool, workdir: str
) -> tuple[str, str, int, dict[str, Any]]:
    from fa3trt.buckets import Buckets
    from fa3trt.trt.build import build_to_store

    if isinstance(item.model, SourceSpec):
        return _build_source_engine(item, store, force, workdir)
    meta = build_to_store(
        store,
        item.model,
        item.weights,
        Buckets(item.buckets),
        max_batch_tokens=item.max_batch_tokens,
        force=force,
        workdir=workdir,
    )
    extra: dict[str, Any] = {
        k: meta[k] for k in ("trt_version", "compute_capability", "gpu_name", "plugin_version") if k in meta
    }
    return "engines", str(meta["key"]), int(meta.get("size", 0)), extra


def _build_source_engine(
    item: BuildItem, store: ArtifactStore, force: bool, workdir: str
) -> tuple[str, str, int, dict[str, Any]]:
    """A user's model on TensorRT: its routed ONNX (exported once per spec), then this GPU's
    engine with one profile per bucket over every named axis (``fa3trt.artifacts.build_source_to_store``)."""
    from fa3trt.artifacts import build_source_to_store
    from fa3trt.buckets import Buckets

    assert isinstance(item.model, SourceSpec)
    meta = build_source_to_store(store, item.model, Buckets(item.buckets), item.max_batch_tokens, workdir, force=force)
    extra: dict[str, Any] = {
        k: meta[k] for k in ("trt_version", "compute_capability", "gpu_name", "plugin_version") if k in meta
    }
    return "engines", str(meta["key"]), int(meta.get("size", 0)), extra


def _verify_source(item: BuildItem, store: ArtifactStore, workdir: str) -> tuple[str, str, int, dict[str, Any]]:
    """A user's model on the torch backend: its ONNX verified in ONNX Runtime against the eager
    unrouted model; the replicas load the model from its source, so the artifact is that ONNX."""
    from fa3trt.artifacts import ensure_source_onnx
    from fa3trt.buckets import Buckets
    from fa3trt.models.sources import verify_source

    assert isinstance(item.model, SourceSpec)
    buckets = Buckets(item.buckets)
    path, meta = ensure_source_onnx(store, item.model, buckets, workdir)
    err = verify_source(item.model, path, buckets)
    log.info("%s: ONNX %s verified in ONNX Runtime (max abs error %.2e)", item.label, item.onnx_key, err)
    return "onnx", item.onnx_key, int(meta.get("size", 0)), {"onnx_max_abs_error": err}


def _build_torch_artifact(
    item: BuildItem, store: ArtifactStore, force: bool, workdir: str
) -> tuple[str, str, int, dict[str, Any]]:
    import safetensors.torch

    if isinstance(item.model, SourceSpec):
        return _verify_source(item, store, workdir)
    from fa3trt.artifacts import ensure_onnx, weights_digest
    from fa3trt.models.reference import build_model
    from fa3trt.onnx.export import export_onnx, verify_onnx

    onnx_path, onnx_meta = ensure_onnx(store, item.model, item.weights, workdir)
    served = build_model(item.model, item.weights, "cpu")
    # ONNX Runtime's Python op takes float32: a non-float32 spec is checked through a float32
    # export of the same weights (same graph, other dtype), kept local.
    if item.model.dtype == "float32":
        model32, check_path = served, onnx_path
    else:
        model32 = build_model(dataclasses.replace(item.model, dtype="float32"), item.weights, "cpu")
        check_path = Path(export_onnx(model32, Path(workdir) / "verify-float32.onnx").path)
    err = verify_onnx(check_path, model32)
    log.info("%s: ONNX %s verified in ONNX Runtime (max abs error %.2e)", item.label, item.onnx_key, err)

    key = weights_key(item.model, item.weights)
    if store.has("artifacts", key) and not force:
        try:
            _, meta = store.get("artifacts", key)
            return "artifacts", key, int(meta["size"]), {"onnx_max_abs_error": err}
        except ArtifactCorruptError as e:
            log.warning("stored weights %s are corrupt (%s); writing them again", key, e)
    state = {k: v.detach().contiguous() for k, v in served.state_dict().items()}
    blob = safetensors.torch.save(state, metadata={"model": json.dumps(item.model.to_dict(), sort_keys=True)})
    meta = store.put(
        "artifacts",
        key,
        blob,
        {
            "artifact": "torch-weights",
            "format": "safetensors",
            "model": item.model.to_dict(),
            "weights": weights_digest(item.model, item.weights),
            "onnx_key": item.onnx_key,
            "onnx_sha256": onnx_meta.get("sha256"),
            "onnx_max_abs_error": err,
        },
    )
    return "artifacts", key, int(meta["size"]), {"onnx_max_abs_error": err}


def build_item(item: BuildItem, force: bool = False, onnx: dict[str, Any] | None = None) -> dict[str, Any]:
    """Build one item in this worker and write its build record; returns the record.

    ``onnx`` is ``export_spec``'s result (Ray passes it once the export finished).
    """
    _setup_worker_logging()
    start = time.time()
    where = worker_info()
    try:
        plugin_registered = False
        if item.backend == "tensorrt":
            # Before anything else touches TensorRT in this process: parsing and deserializing
            # need the plugin creator in the registry.
            from fa3trt.trt.plugin import register_plugin

            register_plugin()
            plugin_registered = True
            log.info(
                "registered the attention plugin in worker pid %s for %s (CUDA_VISIBLE_DEVICES=%s, Ray GPU ids %s)",
                where["pid"],
                item.label,
                where["cuda_visible_devices"],
                where["gpu_ids"],
            )
        where.update(_device_info())  # after the plugin: it touches CUDA
        if item.backend != "tensorrt":
            log.info(
                "building torch artifacts for %s in worker pid %s (CUDA_VISIBLE_DEVICES=%s, Ray GPU ids %s)",
                item.label,
                where["pid"],
                where["cuda_visible_devices"],
                where["gpu_ids"],
            )
        store = ArtifactStore(item.store)
        with tempfile.TemporaryDirectory(prefix="fa3trt-build-") as workdir:
            build = _build_engine if item.backend == "tensorrt" else _build_torch_artifact
            kind, key, size, extra = build(item, store, force, workdir)
        end = time.time()
        record: dict[str, Any] = {
            "app": item.app,
            "gpu_type": item.gpu_type,
            "backend": item.backend,
            "artifact_kind": kind,
            "artifact_key": key,
            "artifact_size": size,
            "onnx_key": item.onnx_key,
            "onnx_sha256": (onnx or {}).get("sha256"),
            "export_seconds": (onnx or {}).get("seconds"),
            "model": item.model.model_dump(mode="json", by_alias=True)
            if isinstance(item.model, SourceSpec)
            else item.model.to_dict(),
            "buckets": list(item.buckets),
            "max_batch_tokens": item.max_batch_tokens,
            "plugin_registered": plugin_registered,
            "start": start,
            "end": end,
            "seconds": end - start,
            **where,
            **extra,
        }
        # The record goes last: its presence is what makes the plan skip this item next time.
        store.put(RECORD_KIND, item.item_key, json.dumps(record, sort_keys=True).encode(), record)
        log.info("%s: stored %s/%s (%d bytes) in %.1fs", item.label, kind, key, size, end - start)
        return record
    except Exception as e:
        raise BuildItemError(
            f"{item.label} ({item.backend}) failed on {where['hostname']} pid {where['pid']} "
            f"(CUDA_VISIBLE_DEVICES={where['cuda_visible_devices']}): {type(e).__name__}: {e}",
            {**where, "start": start, "end": time.time()},
        ) from e


_REMOTE: dict[str, Any] = {}


def remote_functions() -> tuple[Any, Any]:
    """(export_spec, build_item) as Ray remote functions, made once per process."""
    if not _REMOTE:
        import ray

        _REMOTE["export"] = ray.remote(export_spec)
        _REMOTE["build"] = ray.remote(build_item)
    return _REMOTE["export"], _REMOTE["build"]
