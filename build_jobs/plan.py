"""The build plan: which (engine spec, GPU type) items to build, as a plain function.

``compute_plan(specs, cluster_resources, store)`` turns the fa3trt applications of a serve config
and ``ray.cluster_resources()`` into ``BuildItem``s, one per (spec, GPU type), and marks those
already in the store as skipped (unless ``force``). It starts nothing, so it is tested without
Ray tasks.

- GPU types are the ``accelerator_type:<T>`` resources Ray puts on GPU nodes. A cluster with no
  types gets one item per spec (``gpu_type`` None).
- Backend: a spec's ``backend`` (or the ``backend`` override); ``auto`` resolves here, on the
  driver, to ``tensorrt`` when the cluster has GPUs and TensorRT imports, else ``torch``. Every
  model, the reference one included, is planned alike: its ONNX export (shared by its GPU
  types), then per GPU type an engine (``tensorrt``) or the export's ONNX Runtime check
  (``torch``).
- Scheduling: an item asks for ``num_gpus=1`` when the cluster has GPUs, else ``num_gpus=0``
  and one CPU. Either way it asks for ``0.001`` of its ``accelerator_type:<T>`` resource, which
  is exactly what Ray's ``accelerator_type=`` option does: the item lands on a node of that GPU
  type. On a CPU cluster whose nodes declare such resources (CI), items of all types run at once,
  bounded by CPUs.
- Every item has a build record in the store (kind ``artifacts``, key ``item_key``) written by
  its worker after the engine or torch artifact is stored; the record names that artifact. An
  item is skipped when its record and the artifact it names exist. The key hashes everything
  that changes the result except what only the workers know (their TensorRT version and
  compute capability): after upgrading TensorRT on the workers, build with ``--force``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from fa3trt import defaults, tensorrt_available
from fa3trt.config import APP_IMPORT_PATH, AppArgs
from fa3trt.errors import ArtifactCorruptError, ArtifactNotFoundError, ConfigError
from fa3trt.models.spec import AnyModelSpec
from fa3trt.store import ArtifactStore, sanitize_key_part, validate_key

__all__ = [
    "BuildItem",
    "Spec",
    "compute_plan",
    "gpu_types",
    "cluster_gpus",
    "resolve_backend",
    "resolve_uri",
    "ACCELERATOR_PREFIX",
    "ACCELERATOR_FRACTION",
    "RECORD_KIND",
]

log = logging.getLogger(__name__)

ACCELERATOR_PREFIX = "accelerator_type:"
ACCELERATOR_FRACTION = 0.001
"""What Ray's ``accelerator_type=`` task option asks for: a label, not a share of the node."""
RECORD_KIND = "artifacts"
_PLAN_FORMAT = 2

Spec = tuple[str, AppArgs]
"""(application name, validated args), as ``fa3trt.config.load_serve_config`` returns them."""

Backend = Literal["tensorrt", "torch"]


@dataclass(frozen=True)
class BuildItem:
    """One Ray task: build one spec's engine (or torch artifact) for one GPU type."""

    app: str
    """Application name in the serve config."""
    gpu_type: str | None
    """Ray accelerator type (``H100``) this item builds for; None on a cluster without types."""
    backend: Backend
    """What the item builds: a TensorRT engine, or the torch backend's verified artifacts."""
    model: AnyModelSpec
    """The app's model (its weights file, if any, as an absolute path reachable from every node)."""
    buckets: tuple[int, ...]
    max_batch_tokens: int
    store: str
    """Store URI, absolute for local paths so workers with another cwd find it."""
    onnx_key: str
    """Store key (kind ``onnx``) of the spec's ONNX export, shared by its GPU types."""
    item_key: str
    """Store key (kind ``artifacts``) of this item's build record."""
    num_gpus: int
    """1 on a cluster with GPUs, else 0."""
    action: Literal["build", "skip"] = "build"
    reason: str = ""
    """Why the item is built or skipped, for the plan printout."""
    existing: dict[str, Any] | None = field(default=None, compare=False)
    """The build record found in the store, for a skipped item."""

    @property
    def label(self) -> str:
        return f"{self.app}@{self.gpu_type or ('gpu' if self.num_gpus else 'cpu')}"

    def task_options(self, *, max_retries: int = defaults.BUILD_RETRIES) -> dict[str, Any]:
        """Keyword arguments of ``remote_fn.options(...)`` for this item."""
        resources = {f"{ACCELERATOR_PREFIX}{self.gpu_type}": ACCELERATOR_FRACTION} if self.gpu_type else {}
        return {
            "num_gpus": self.num_gpus,
            "num_cpus": 1,
            "resources": resources,
            "max_retries": max_retries,
            "retry_exceptions": True,
            "name": f"build:{self.label}",
        }


def gpu_types(cluster_resources: Mapping[str, float]) -> list[str]:
    """The accelerator types present in the cluster, sorted (``['A100', 'H100']``)."""
    return sorted(
        k[len(ACCELERATOR_PREFIX) :]
        for k, v in cluster_resources.items()
        if k.startswith(ACCELERATOR_PREFIX) and v > 0 and len(k) > len(ACCELERATOR_PREFIX)
    )


def cluster_gpus(cluster_resources: Mapping[str, float]) -> float:
    return float(cluster_resources.get("GPU", 0.0))


def resolve_uri(path_or_uri: str) -> str:
    """A local path made absolute (workers may run in another directory); URIs unchanged."""
    if "://" in path_or_uri:
        return path_or_uri
    return os.path.abspath(os.path.expanduser(path_or_uri))


def resolve_backend(requested: str, cluster_resources: Mapping[str, float], trt_available: bool) -> tuple[Backend, str]:
    """(backend, why) for a spec's ``backend`` value on this cluster."""
    has_gpus = cluster_gpus(cluster_resources) > 0
    if requested == "torch":
        return "torch", "backend torch requested"
    if requested == "tensorrt":
        if not has_gpus:
            raise ConfigError(
                "backend 'tensorrt' needs GPUs to build engines, but the Ray cluster has none "
                f"(GPU={cluster_gpus(cluster_resources):g}); connect to a GPU cluster with --address or use --backend torch"
            )
        return "tensorrt", "backend tensorrt requested"
    if requested != "auto":
        raise ConfigError(f"backend must be 'auto', 'tensorrt' or 'torch', got {requested!r}")
    if not has_gpus:
        return "torch", "auto: the cluster has no GPUs"
    if not trt_available:
        log.warning(
            "the cluster has GPUs but TensorRT does not import on this driver: building torch "
            "artifacts; pass --backend tensorrt to build TensorRT engines on the workers"
        )
        return "torch", "auto: TensorRT does not import on the driver"
    return "tensorrt", "auto: GPUs present and TensorRT imports"


def _item_key(backend: str, gpu_type: str | None, parts: dict[str, Any]) -> str:
    from fa3trt.artifacts import spec_hash

    where = sanitize_key_part(gpu_type) if gpu_type else "any"
    return validate_key(f"build-{backend}-{where}-{spec_hash(parts, 24)}")


def _existing_record(store: ArtifactStore, item_key: str) -> tuple[dict[str, Any] | None, str]:
    """(record, why) when the item's record and the artifact it names are in the store."""
    try:
        record = store.metadata(RECORD_KIND, item_key)
    except ArtifactNotFoundError:
        return None, "not in the store"
    except ArtifactCorruptError as e:
        return None, f"build record unreadable ({e})"
    kind, key = record.get("artifact_kind"), record.get("artifact_key")
    try:
        if not (isinstance(kind, str) and isinstance(key, str) and store.has(kind, key)):
            return None, f"build record names {kind}/{key}, which is missing"
    except ConfigError as e:
        return None, f"build record names a bad artifact ({e})"
    return record, f"in the store as {kind}/{key}"


def compute_plan(
    specs: Sequence[Spec],
    cluster_resources: Mapping[str, float],
    store: str | ArtifactStore | None = None,
    *,
    force: bool = False,
    backend: str | None = None,
    trt_available: bool | None = None,
) -> list[BuildItem]:
    """One ``BuildItem`` per (spec, GPU type), in spec order then GPU type order.

    ``store`` overrides every spec's ``store``; ``backend`` overrides every spec's backend.
    ``trt_available`` defaults to whether TensorRT imports on this (driver) machine. Items whose
    build record is in the store, and duplicates of an earlier item, get ``action="skip"``.
    """
    from fa3trt.artifacts import onnx_key
    from fa3trt.buckets import Buckets
    from fa3trt.models.sources import model_id

    if not specs:
        raise ConfigError(
            f"no engine specs to plan; the serve config needs an application with import_path {APP_IMPORT_PATH}"
        )
    trt_ok = tensorrt_available() if trt_available is None else trt_available
    types: list[str | None] = list(gpu_types(cluster_resources)) or [None]
    num_gpus = 1 if cluster_gpus(cluster_resources) > 0 else 0
    stores: dict[str, ArtifactStore] = {}
    items: list[BuildItem] = []
    seen: dict[str, str] = {}
    for app, args in specs:
        if isinstance(store, ArtifactStore):
            st = store
        else:
            uri = resolve_uri(store or args.store)
            st = stores.setdefault(uri, ArtifactStore(uri))
        if (backend or args.backend) == "identity":
            log.info("app %s: backend identity runs no model; nothing to build", app)
            continue
        kind, why = resolve_backend(backend or args.backend, cluster_resources, trt_ok)
        # Weights are read where the model is loaded, so a local file must be reachable there.
        model = args.model
        if model.weights is not None:
            model = model.model_copy(update={"weights": os.path.abspath(model.weights)})
        okey = onnx_key(model, Buckets(tuple(args.buckets)))
        parts: dict[str, Any] = {"format": _PLAN_FORMAT, "backend": kind, "onnx": okey, "model": model_id(model)}
        if kind == "tensorrt":  # the verified ONNX does not depend on the batch limits
            parts.update(max_batch_tokens=args.batching.max_batch_tokens)
        for gpu in types:
            key = _item_key(kind, gpu, {**parts, "gpu_type": gpu})
            item = BuildItem(
                app=app,
                gpu_type=gpu,
                backend=kind,
                model=model,
                buckets=tuple(args.buckets),
                max_batch_tokens=args.batching.max_batch_tokens,
                store=st.uri if "://" in st.uri else st.root,
                onnx_key=okey,
                item_key=key,
                num_gpus=num_gpus,
                reason=why,
            )
            if key in seen:
                item = dataclasses.replace(item, action="skip", reason=f"same build as app {seen[key]!r}")
            elif force:
                item = dataclasses.replace(item, reason=f"{why}; --force")
            else:
                record, found = _existing_record(st, key)
                if record is not None:
                    item = dataclasses.replace(item, action="skip", reason=found, existing=record)
                else:
                    item = dataclasses.replace(item, reason=f"{why}; {found}")
            seen.setdefault(key, app)
            items.append(item)
    return items
