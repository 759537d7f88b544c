"""``build_all``: plan, submit one Ray task per item, follow them with a progress bar, report.

Every item runs as its own task, so one failure cancels nothing; failed tasks are retried up to
``max_retries`` times (``retry_exceptions=True``) and the last worker error is reported in its
``BuildResult``. Results come back in plan order whatever order the tasks finish in.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from build_jobs.plan import BuildItem, Spec, compute_plan
from fa3trt import defaults
from fa3trt.config import load_serve_config
from fa3trt.errors import BuildItemError, ConfigError, RayUnavailableError

__all__ = ["BuildResult", "build_all", "load_specs", "Status"]

log = logging.getLogger(__name__)

Status = Literal["ok", "skipped", "failed", "planned"]


@dataclass
class BuildResult:
    """What happened to one plan item. ``planned`` is a dry run's status."""

    key: str
    """The stored artifact's key (engine, or the verified ONNX) when known, else the item key."""
    gpu_type: str | None
    spec: str
    """Application name of the spec in the serve config."""
    status: Status
    backend: str = "torch"
    item_key: str = ""
    """Key of the item's build record (kind ``artifacts``)."""
    artifact_kind: str | None = None
    seconds: float | None = None
    """Time of this item's task (engine build, or verify + store for torch)."""
    export_seconds: float | None = None
    """Time of the spec's ONNX export (or fetch), shared by its GPU types."""
    size: int | None = None
    error: str | None = None
    node_id: str | None = None
    gpu_ids: list[str] = field(default_factory=list)
    cuda_visible_devices: str | None = None
    hostname: str | None = None
    pid: int | None = None
    start: float | None = None
    end: float | None = None
    reason: str = ""
    plugin_registered: bool = False
    details: dict[str, Any] = field(default_factory=dict)
    """The whole build record (or worker info of a failure)."""

    @property
    def ok(self) -> bool:
        return self.status in ("ok", "skipped", "planned")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_specs(config: str | os.PathLike[str] | Sequence[Spec]) -> list[Spec]:
    """Specs from a serve config path, or the given (name, AppArgs) pairs unchanged."""
    if isinstance(config, (str, os.PathLike)):
        return load_serve_config(Path(config))
    specs = list(config)
    for spec in specs:
        if not (isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[0], str)):
            raise ConfigError(f"specs must be (app name, AppArgs) pairs as load_serve_config returns, got {spec!r}")
    return specs


def _from_record(item: BuildItem, status: Status, record: dict[str, Any]) -> BuildResult:
    return BuildResult(
        key=str(record.get("artifact_key") or item.item_key),
        gpu_type=item.gpu_type,
        spec=item.app,
        status=status,
        backend=item.backend,
        item_key=item.item_key,
        artifact_kind=record.get("artifact_kind"),
        seconds=record.get("seconds"),
        export_seconds=record.get("export_seconds"),
        size=record.get("artifact_size"),
        node_id=record.get("node_id"),
        gpu_ids=list(record.get("gpu_ids") or []),
        cuda_visible_devices=record.get("cuda_visible_devices"),
        hostname=record.get("hostname"),
        pid=record.get("pid"),
        start=record.get("start"),
        end=record.get("end"),
        reason=item.reason,
        plugin_registered=bool(record.get("plugin_registered")),
        details=record,
    )


def _failure(item: BuildItem, err: BaseException) -> BuildResult:
    import ray.exceptions

    cause: BaseException = err
    if isinstance(err, ray.exceptions.RayTaskError) and err.cause is not None:
        cause = err.cause
    where: dict[str, Any] = dict(getattr(cause, "where", {}) or {})
    if "could not be computed" in str(err):  # the only input is the shared export: it failed upstream
        message = f"ONNX export of {item.app!r} failed: {type(cause).__name__}: {cause}"
    elif isinstance(cause, BuildItemError):
        message = str(cause)
    else:
        message = f"{item.label}: {type(cause).__name__}: {cause}"
    log.debug("%s failed: %s", item.label, err)
    result = _from_record(item, "failed", where)
    result.key = item.item_key
    result.error = " ".join(message.split()) or type(cause).__name__
    result.details = {**where, "error_full": str(err)}
    return result


def build_all(
    config: str | os.PathLike[str] | Sequence[Spec],
    store: str | None = None,
    force: bool = False,
    address: str | None = None,
    dry_run: bool = False,
    *,
    backend: str | None = None,
    max_retries: int = defaults.BUILD_RETRIES,
    progress: bool = True,
    plan_callback: Any = None,
) -> list[BuildResult]:
    """Build every (spec, GPU type) item of ``config`` on Ray; one ``BuildResult`` per item.

    ``config``: a serve config path or ``(app name, AppArgs)`` pairs. ``store`` overrides the
    specs' stores; ``backend`` their backends. Uses the Ray session of this process when there
    is one, else ``ray.init(address=address)`` (shut down again at the end). ``plan_callback``,
    if given, is called with the plan before anything is submitted (the CLI prints it).
    """
    import ray
    from tqdm.auto import tqdm

    from build_jobs.tasks import remote_functions

    if max_retries < 0:
        raise ConfigError(f"max_retries must be >= 0, got {max_retries}")
    specs = load_specs(config)
    started_ray = False
    if not ray.is_initialized():
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=True)
        except Exception as e:  # ConnectionError, RuntimeError, ValueError: all mean no cluster
            raise RayUnavailableError(
                f"could not start or connect to Ray (address={address!r}): {type(e).__name__}: {e}; "
                "start one with `ray start --head`, or pass --address auto|ray://HOST:10001|local"
            ) from e
        started_ray = True
    elif address is not None:
        log.info("using this process's Ray session; ignoring address=%r", address)
    try:
        resources = ray.cluster_resources()
        plan = compute_plan(specs, resources, store, force=force, backend=backend)
        log.info("plan: %d items, %d to build", len(plan), sum(i.action == "build" for i in plan))
        if plan_callback is not None:
            plan_callback(plan)
        results: list[BuildResult | None] = [None] * len(plan)
        for i, item in enumerate(plan):
            if item.action == "skip":
                results[i] = _from_record(item, "skipped", item.existing or {})
            elif dry_run:
                results[i] = BuildResult(
                    key=item.item_key,
                    gpu_type=item.gpu_type,
                    spec=item.app,
                    status="planned",
                    backend=item.backend,
                    item_key=item.item_key,
                    reason=item.reason,
                )
        if dry_run:
            return [r for r in results if r is not None]

        export_fn, build_fn = remote_functions()
        exports: dict[tuple[str, str], Any] = {}
        pending: dict[Any, int] = {}
        for i, item in enumerate(plan):
            if item.action != "build":
                continue
            ekey = (item.store, item.onnx_key)
            if ekey not in exports:  # one export per ONNX, shared by every GPU type and spec
                exports[ekey] = export_fn.options(
                    num_cpus=1,
                    num_gpus=0,
                    max_retries=max_retries,
                    retry_exceptions=True,
                    name=f"export:{item.app}",
                ).remote(item.store, item.model, force, item.buckets)
            ref = build_fn.options(**item.task_options(max_retries=max_retries)).remote(item, force, exports[ekey])
            pending[ref] = i
        t0 = time.time()
        with tqdm(total=len(pending), desc="building", unit="item", disable=not progress or not pending) as bar:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    i = pending.pop(ref)
                    item = plan[i]
                    try:
                        results[i] = _from_record(item, "ok", ray.get(ref))
                    except ray.exceptions.RayError as e:
                        results[i] = _failure(item, e)
                        log.error("%s failed: %s", item.label, results[i].error)  # type: ignore[union-attr]
                    bar.set_postfix_str(f"{item.label} {results[i].status}")  # type: ignore[union-attr]
                    bar.update(1)
        log.info("built %d items in %.1fs", len(plan), time.time() - t0)
        return [r for r in results if r is not None]
    finally:
        if started_ray:
            ray.shutdown()
