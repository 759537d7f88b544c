"""What runs inside the Ray workers: the per-spec ONNX export and the per-item build.

``export_spec`` exports a spec's ONNX once and puts it in the store; every ``build_item`` of that
spec (one per GPU type) depends on it, so the export is shared instead of repeated per GPU.

``build_item`` runs on the item's GPU (``num_gpus=1``) or CPU slot:

1. TensorRT backend: ``register_plugin()`` first, logged with the worker's
   ``CUDA_VISIBLE_DEVICES``; then ``fa3trt.artifacts.build_to_store`` builds and stores the engine.
2. Torch backend: fetch the ONNX (``ensure_onnx``) and verify it in ONNX Runtime against the
   eager, unrouted model in float32 (``fa3trt.models.export.verify_source``); the replicas load
   the model from its source, so the artifact is that verified ONNX.
3. Write the item's build record (kind ``artifacts``, key ``item.item_key``) naming the artifact.

Every model, the reference one included, goes through these same two branches.

Failures are raised as ``BuildItemError`` carrying where the worker ran; Ray retries them
(``max_retries``) and the driver reports the last one. Both functions are plain functions (Ray
wraps them in ``remote_functions``), so they also run in-process.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import tempfile
import time
from typing import Any

from build_jobs.plan import RECORD_KIND, BuildItem
from fa3trt import defaults
from fa3trt.errors import ArtifactCorruptError, BuildItemError
from fa3trt.models.spec import AnyModelSpec
from fa3trt.store import ArtifactStore

__all__ = ["export_spec", "build_item", "worker_info", "remote_functions"]

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


def export_spec(
    store_uri: str, model: AnyModelSpec, force: bool = False, buckets: tuple[int, ...] | None = None
) -> dict[str, Any]:
    """Export (or fetch) the spec's ONNX for ``buckets`` into the store; returns its key, sha256
    and timing. ``force`` re-exports; a corrupt stored export is replaced."""
    from fa3trt.artifacts import ensure_onnx, onnx_key
    from fa3trt.buckets import Buckets

    _setup_worker_logging()
    t0 = time.time()
    store = ArtifactStore(store_uri)
    edges = Buckets(tuple(buckets or defaults.BUCKETS))
    key = onnx_key(model, edges)

    def ensure(tmp: str) -> tuple[Any, dict[str, Any]]:
        return ensure_onnx(store, model, edges, tmp)

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
    return {"onnx_key": key, "sha256": meta.get("onnx_sha256"), "seconds": time.time() - t0, **worker_info()}


def _build_engine(
    item: BuildItem, store: ArtifactStore, force: bool, workdir: str
) -> tuple[str, str, int, dict[str, Any]]:
    """This GPU's engine of the item's model (``fa3trt.artifacts.build_to_store``)."""
    from fa3trt.artifacts import build_to_store
    from fa3trt.buckets import Buckets

    meta = build_to_store(store, item.model, Buckets(item.buckets), item.max_batch_tokens, workdir, force=force)
    extra: dict[str, Any] = {
        k: meta[k] for k in ("trt_version", "compute_capability", "gpu_name", "plugin_version") if k in meta
    }
    return "engines", str(meta["key"]), int(meta.get("size", 0)), extra


def _verify_onnx(
    item: BuildItem, store: ArtifactStore, force: bool, workdir: str
) -> tuple[str, str, int, dict[str, Any]]:
    """The torch backend's artifact: the item's ONNX, verified in ONNX Runtime against the eager
    unrouted model (the replicas load the model from its source)."""
    from fa3trt.artifacts import ensure_onnx
    from fa3trt.buckets import Buckets
    from fa3trt.models.export import verify_source

    buckets = Buckets(item.buckets)
    path, meta = ensure_onnx(store, item.model, buckets, workdir)
    err = verify_source(item.model, path, buckets)
    log.info("%s: ONNX %s verified in ONNX Runtime (max abs error %.2e)", item.label, item.onnx_key, err)
    return "onnx", item.onnx_key, int(meta.get("size", 0)), {"onnx_max_abs_error": err}


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
            build = _build_engine if item.backend == "tensorrt" else _verify_onnx
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
            "model": item.model.model_dump(mode="json", by_alias=True),
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
