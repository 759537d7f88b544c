"""The application's arguments (``args:`` of an application in ``serve_config.yaml``).

Contract: validated with pydantic; unknown keys are refused, every field has a bound and a
description, and every default comes from ``fa3trt.defaults``. The Serve app
(``deploy.app``) and the build jobs (``build_jobs``) read this one schema, so what is served is
exactly what is built; the app is named by ``APP_IMPORT_PATH``, a string, so nothing here
imports ``deploy``. ``BatchingConfig`` is also what a live replica's ``reconfigure`` validates
(``context={"buckets": edges}`` checks its overrides against the replica's buckets).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from fa3trt import defaults
from fa3trt.buckets import Buckets
from fa3trt.errors import ConfigError
from fa3trt.models.spec import AnyModelSpec, ReferenceSpec

__all__ = [
    "BucketOverride",
    "BatchingConfig",
    "AppArgs",
    "load_serve_config",
    "apply_env_overrides",
    "APP_IMPORT_PATH",
    "ENV_OVERRIDES",
]

APP_IMPORT_PATH = "deploy.app:build_app"

log = logging.getLogger(__name__)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BucketOverride(_Strict):
    """Batching knobs for one bucket, overriding the global ones."""

    max_batch_size: int | None = Field(None, ge=1, le=4096, description="Largest batch of this bucket.")
    batch_wait_timeout_s: float | None = Field(None, ge=0.0, le=10.0, description="Longest wait to fill a batch.")


class BatchingConfig(_Strict):
    """Knobs that ``reconfigure`` can change on a live replica (Serve ``user_config``)."""

    max_batch_tokens: int = Field(
        defaults.MAX_BATCH_TOKENS,
        ge=1,
        le=1 << 24,
        description="Token budget per batch; a bucket's batch limit is this divided by its edge.",
    )
    batch_wait_timeout_s: float = Field(
        defaults.BATCH_WAIT_TIMEOUT_S, ge=0.0, le=10.0, description="Longest wait for a batch to fill, in seconds."
    )
    max_concurrent_batches: int = Field(
        defaults.MAX_CONCURRENT_BATCHES, ge=1, le=64, description="Batches of one bucket that may run at once."
    )
    bucket_overrides: dict[int, BucketOverride] = Field(
        default_factory=dict, description="Per-bucket overrides, keyed by bucket edge."
    )

    @model_validator(mode="after")
    def _overrides_name_context_buckets(self, info: ValidationInfo) -> BatchingConfig:
        # A live replica validates its user_config with context={"buckets": its edges};
        # AppArgs checks against its own buckets field.
        buckets = (info.context or {}).get("buckets")
        if buckets is not None:
            self.check_overrides(buckets)
        return self

    def check_overrides(self, buckets: Sequence[int]) -> None:
        """``ValueError`` when ``bucket_overrides`` names an edge that is not one of ``buckets``."""
        unknown = sorted(set(self.bucket_overrides) - set(buckets))
        if unknown:
            raise ValueError(
                f"batching.bucket_overrides names edges {unknown} that are not buckets {list(buckets)}; "
                "key each override by one of the bucket edges"
            )


class AppArgs(_Strict):
    """Everything the Serve app (``APP_IMPORT_PATH``) takes."""

    model: AnyModelSpec = Field(default_factory=lambda: ReferenceSpec())
    buckets: list[int] = Field(
        default_factory=lambda: list(defaults.BUCKETS),
        min_length=1,
        max_length=64,
        description="Ascending sequence-length edges; one batch queue (and one TensorRT profile) each.",
    )
    backend: Literal["auto", "tensorrt", "torch", "identity"] = Field(
        defaults.BACKEND,
        description="auto: TensorRT when it imports and a GPU is present, else torch. identity: no model, each request answered with itself (the reference model's shape): what serving costs without the model (bench.transports).",
    )
    store: str = Field(
        defaults.STORE,
        min_length=1,
        description="Artifact store (engines, ONNX, weights): a folder or an fsspec URI every node can reach.",
    )
    build_if_missing: bool = Field(
        defaults.BUILD_IF_MISSING, description="Build this GPU's engine at replica start when the store lacks it."
    )
    batching: BatchingConfig = Field(default_factory=lambda: BatchingConfig())
    replicas: int | Literal["auto"] = Field(
        defaults.REPLICAS, description="auto: one per GPU in the cluster (one CPU replica without GPUs)."
    )
    ingress_replicas: int = Field(
        defaults.INGRESS_REPLICAS,
        ge=0,
        le=256,
        description="0: the model replicas take HTTP and gRPC themselves (one hop). N: N CPU replicas of an ingress deployment take them and hand each request to the model replicas by handle, spreading the copying of large bodies over N processes (deploy.ingress).",
    )
    autoscaling: dict[str, Any] | None = Field(
        None,
        description="Serve autoscaling_config passed through (min_replicas, max_replicas, target_ongoing_requests, ...); replaces replicas.",
    )
    max_queued_requests: int = Field(
        defaults.MAX_QUEUED_REQUESTS,
        ge=1,
        le=1 << 20,
        description="Requests queued per handle before Serve answers 503.",
    )
    max_body_bytes: int = Field(
        defaults.MAX_BODY_BYTES, ge=1024, le=1 << 32, description="Largest HTTP request body; larger ones get 413."
    )
    reject_nonfinite: bool = Field(
        defaults.REJECT_NONFINITE,
        description="Refuse inputs holding NaN or Inf (422); checked on the device, in the batch.",
    )
    numa_affinity: bool = Field(
        defaults.NUMA_AFFINITY, description="Keep each GPU replica's threads on the CPUs of its GPU's NUMA node."
    )
    cuda_graphs: bool = Field(
        defaults.CUDA_GRAPHS,
        description="Torch backend on a GPU: run batches as CUDA graphs (fa3trt.serving.graphs): one launch per batch instead of the model's few dozen. Needs FA3 or FlashAttention's CuTe kernel.",
    )
    compile: bool = Field(
        defaults.COMPILE,
        description="Torch backend: run the model under torch.compile, its attention one opaque call of the op inside the compiled graph (the first batch of each shape compiles).",
    )
    stream_per_bucket: bool = Field(
        defaults.STREAM_PER_BUCKET,
        description="GPU replicas: each bucket's batches on a CUDA stream of their own, so one bucket's copies and answers never wait on another's kernels (false: every bucket on the default stream).",
    )
    replica_cpus: int | Literal["auto"] = Field(
        defaults.REPLICA_CPUS,
        description=f'CPUs reserved per GPU replica (its PyTorch threads, which only stage batches): auto = {defaults.REPLICA_CPUS_AUTO}, as one thread keeps up and leaves the host\'s CPUs to the other replicas (docs/benchmarks.md, "Scale-out"). CPU replicas: auto shares the CPUs of the cluster among the replicas; an integer reserves that many (several apps on one cluster).',
    )
    request_timeout_s: float = Field(
        defaults.REQUEST_TIMEOUT_S, gt=0, le=3600, description="Longest time a request may take end to end."
    )

    @field_validator("buckets")
    @classmethod
    def _buckets_valid(cls, v: list[int]) -> list[int]:
        try:
            Buckets(tuple(v))
        except ConfigError as e:
            raise ValueError(str(e)) from e
        return v

    @field_validator("replicas", "replica_cpus")
    @classmethod
    def _count_positive(cls, v: int | str, info: ValidationInfo) -> int | str:
        if isinstance(v, int) and v < 1:
            raise ValueError(f"{info.field_name} must be 'auto' or an integer >= 1, got {v}")
        return v

    @model_validator(mode="after")
    def _overrides_name_buckets(self) -> AppArgs:
        self.batching.check_overrides(self.buckets)
        try:
            self.model.signature().check_buckets(self.bucket_set())
        except ConfigError as e:
            raise ValueError(str(e)) from None
        return self

    def bucket_set(self) -> Buckets:
        return Buckets(tuple(self.buckets))


# Environment overrides, so one serve_config.yaml serves the tiny model on a laptop and the seed
# model on a GPU cluster (FA3TRT_MODEL_PRESET=seed FA3TRT_MODEL_LAYERS=2 serve run ...). The app
# and the build jobs both apply them, so the engines built are the ones the replicas load.
ENV_OVERRIDES = (("FA3TRT_MODEL_PRESET", "preset"), ("FA3TRT_MODEL_LAYERS", "layers"))


def apply_env_overrides(args: dict[str, Any], environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """A copy of an application's raw args with ``ENV_OVERRIDES`` applied to ``model``."""
    env = os.environ if environ is None else environ
    args = dict(args or {})
    for var, field in ENV_OVERRIDES:
        if env.get(var):
            args["model"] = dict(args.get("model") or {}, **{field: env[var]})
            log.info("fa3trt: %s=%s overrides model.%s", var, env[var], field)
    return args


def load_serve_config(path: str | Path) -> list[tuple[str, AppArgs]]:
    """(application name, validated args) for every fa3trt application in a Serve config file."""
    try:
        doc = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"serve config {str(path)!r} does not exist") from None
    apps = (doc or {}).get("applications") or []
    out = []
    for app in apps:
        if app.get("import_path") == APP_IMPORT_PATH:
            try:
                out.append(
                    (app.get("name", "default"), AppArgs.model_validate(apply_env_overrides(app.get("args") or {})))
                )
            except ValueError as e:
                raise ConfigError(f"{path}: application {app.get('name')!r} has invalid args: {e}") from e
    if not out:
        raise ConfigError(f"{path} has no application with import_path {APP_IMPORT_PATH!r}")
    return out
