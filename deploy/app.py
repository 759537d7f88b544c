"""The Ray Serve application: ``deploy.app:build_app`` builds it from ``serve_config.yaml`` args.

One model deployment, ``ModelServer`` (``deploy.replica.ModelReplica``): one replica per GPU
(``num_gpus: 1``; one CPU replica on a cluster without GPUs). It is also the app's ingress, its
routes mixed in from ``deploy.routes``: FastAPI over HTTP (``POST /v1/infer`` in .npz, .npy or
JSON, ``GET /v1/info``, ``GET /v1/stats``), the Open Inference Protocol (KServe v2) over HTTP
(``/v2/...``) and gRPC (``inference.GRPCInferenceService`` through Serve's gRPC proxy; the
protocol itself is ``deploy.kserve``), and the handle API
(``serve.get_app_handle("fa3trt").infer.remote(x)``, or a dict of named inputs), so a request
reaches its replica in one hop. With ``ingress_replicas: N``, N CPU ingress processes
(``deploy.ingress``) take the routes instead and call the model replicas by handle.

``max_ongoing_requests`` of the model replicas is derived so every bucket's batches can fill.
The app builder checks the arguments and the model's source (package, class, folder, factory)
before any replica starts. Where it fails while Serve's controller builds the app for
``serve run <config>`` (which otherwise waits on a failed app forever), it prints why to that
terminal and stops ``serve run``, non-zero (``stop_serve_run``).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from ray import serve

from deploy.replica import ModelServer, ModelWorker, bucket_limits
from deploy.targets import direct_ingress_enabled
from fa3trt import defaults
from fa3trt.config import AppArgs, apply_env_overrides
from fa3trt.models.sources import check_source

__all__ = [
    "build_app",
    "application",
    "ModelServer",
    "ModelWorker",
    "derive_max_ongoing",
    "replica_plan",
    "ingress_plan",
    "cpu_threads",
    "stop_serve_run",
]

log = logging.getLogger("ray.serve")


def derive_max_ongoing(args: AppArgs) -> int:
    """In-flight requests per replica: every bucket's running batches full, plus one more full
    batch per bucket already received and waiting, so the next batch starts the moment the
    device is free (a request's bytes take longer to arrive than a short batch to run)."""
    limits = bucket_limits(args.bucket_set(), args.batching)
    return sum(size for size, _ in limits) * (args.batching.max_concurrent_batches + 1) + len(limits)


def replica_plan(args: AppArgs, cluster_gpus: float, cluster_cpus: float = 1) -> dict[str, Any]:
    """Deployment options for the model replicas on a cluster with these GPUs and CPUs.

    One replica per GPU (``num_gpus: 1``). Without GPUs, ``replica_cpus: auto`` reserves a share
    of a CPU per replica (``defaults.CPU_REPLICA_CPUS``), so several apps in one config all start
    on a small machine; the replica's PyTorch threads are set apart from the reservation
    (``cpu_threads``), since Ray gives a fractional reservation one thread.
    """
    gpus = int(cluster_gpus)
    if args.autoscaling is not None:
        sizing: dict[str, Any] = {"autoscaling_config": args.autoscaling}
    else:
        sizing = {"num_replicas": (gpus or 1) if args.replicas == "auto" else args.replicas}
    if gpus:
        # A GPU replica's PyTorch threads (OMP_NUM_THREADS = its num_cpus) only copy requests
        # into the staging buffer: one thread stages as fast as several, and replicas sharing a
        # host serve more when each leaves the others its CPUs (docs/benchmarks.md,
        # "Scale-out", the replica_cpus passes).
        cpus = args.replica_cpus if isinstance(args.replica_cpus, int) else defaults.REPLICA_CPUS_AUTO
        actor: dict[str, Any] = {"num_gpus": 1, "num_cpus": cpus}
    elif isinstance(args.replica_cpus, int):  # an explicit reservation, its threads as many
        actor = {"num_cpus": args.replica_cpus}
    else:
        actor = {"num_cpus": defaults.CPU_REPLICA_CPUS}
    return {
        "ray_actor_options": actor,
        "max_ongoing_requests": derive_max_ongoing(args),
        "max_queued_requests": args.max_queued_requests,
        "user_config": args.batching.model_dump(),
        **sizing,
    }


def cpu_threads(args: AppArgs, cluster_gpus: float, cluster_cpus: float) -> int | None:
    """PyTorch threads of a CPU replica with ``replica_cpus: auto``: the cluster's CPUs shared
    among the app's replicas (its compute is its threads); None elsewhere (Ray's OMP_NUM_THREADS,
    the reservation)."""
    if cluster_gpus or isinstance(args.replica_cpus, int):
        return None
    n = int(args.autoscaling.get("max_replicas", 1)) if args.autoscaling is not None else None
    if n is None:
        n = 1 if args.replicas == "auto" else args.replicas
    return max(1, int(cluster_cpus) // max(1, n))


def build_app(args: dict[str, Any]) -> serve.Application:
    """Serve application builder (``import_path: deploy.app:build_app``)."""
    import ray

    try:
        parsed = AppArgs.model_validate(apply_env_overrides(args))
        # Before any replica starts: a source that cannot load fails `serve run` now, with its fix.
        check_source(parsed.model)
    except Exception as e:
        stop_serve_run(f"the fa3trt app cannot start: {type(e).__name__}: {e}")
        raise
    resources = ray.cluster_resources() if ray.is_initialized() else {}
    gpus, cpus = resources.get("GPU", 0), resources.get("CPU", 1)
    opts = replica_plan(parsed, gpus, cpus)
    log.info("fa3trt app: %s GPUs in the cluster -> model deployment options %s", gpus, opts)
    return application(parsed, opts, cpu_threads(parsed, gpus, cpus))


def application(args: AppArgs, opts: dict[str, Any], threads: int | None = None) -> serve.Application:
    """The app from parsed arguments, the model replicas' deployment options and their PyTorch
    threads: the model replicas as the ingress, or ``ingress_replicas`` ingress processes in front."""
    # Batching travels as user_config, not as constructor args: changing it reconfigures live.
    static = args.model_dump(exclude={"batching"}, by_alias=True)
    if not args.ingress_replicas:
        return ModelServer.options(**opts).bind(static, None, threads)  # type: ignore[attr-defined,no-any-return]  # @serve.deployment returns a Deployment
    model = ModelWorker.options(**opts).bind(static, None, threads)
    # Imported here, not at the top: see deploy.replica's ModelServer. (This module is imported
    # by the process that builds the app, which serves nothing.)
    from deploy.ingress import Ingress

    if not direct_ingress_enabled():
        log.warning(
            "ingress_replicas: %d without direct ingress: every request still passes Serve's proxy, one process "
            "per node, which caps large requests (docs/benchmarks.md, section 8). Start Ray with "
            "RAY_SERVE_ENABLE_DIRECT_INGRESS=1 and call the ingress replicas' own ports (python -m deploy.targets)",
            args.ingress_replicas,
        )
    ingress = ingress_plan(args)
    log.info("fa3trt app: ingress deployment options %s", ingress)
    return Ingress.options(**ingress).bind(static, model)  # type: ignore[attr-defined,no-any-return]


def ingress_plan(args: AppArgs) -> dict[str, Any]:
    """Deployment options of the ingress replicas (``ingress_replicas: N``): N processes of one
    CPU each, each taking as many requests at once as a model replica does."""
    return {
        "num_replicas": args.ingress_replicas,
        "ray_actor_options": {"num_cpus": 1},
        "max_ongoing_requests": derive_max_ongoing(args),
        "max_queued_requests": args.max_queued_requests,
    }


def stop_serve_run(message: str) -> bool:
    """Where Serve's controller builds this app for ``serve run <config>`` (in a Ray task of that
    driver's job, on its node), print ``message`` to the driver's terminal and stop it (SIGTERM:
    it exits non-zero); ``serve run`` of a config otherwise waits forever on an app that cannot
    start. Elsewhere (a builder called in a Python process, ``serve deploy``), nothing: the error
    reaches its caller, or Serve's status. Returns whether it stopped one."""
    import ray

    if not ray.is_initialized() or ray.get_runtime_context().worker.mode != ray.WORKER_MODE:
        return False  # built in the caller's own process: the exception reaches it
    try:
        from ray.util.state import list_jobs

        job = ray.get_runtime_context().get_job_id()
        (found,) = list_jobs(filters=[("job_id", "=", job)], raise_on_missing_output=False)
        driver = found.driver_info
        if driver is None or driver.node_ip_address != ray.util.get_node_ip_address():
            return False
        pid = int(driver.pid)
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except Exception as e:  # no state API, another node, no /proc: Serve's status says what failed
        log.debug("not stopping the deploying driver: %s", e)
        return False
    # Only `serve run` (its script, directly or through the interpreter): never a dashboard or a
    # user's own driver.
    if "serve" not in [Path(a.decode(errors="replace")).name for a in argv[:2]] or b"run" not in argv[1:3]:
        return False
    print(f"\n{message}\nStopping `serve run` (pid {pid}).", file=sys.stderr, flush=True)
    time.sleep(2)  # Ray forwards this task's lines to the driver's terminal first
    os.kill(pid, signal.SIGTERM)
    return True
