"""The model replica: one backend, one ``@serve.batch`` queue per sequence-length bucket.

One path for every model, the reference one included. The replica loads its backend (this GPU's
TensorRT engine, or the torch model; ``fa3trt.serving``), warms every bucket with requests the
model accepts, and checks that ``batching: pad`` is exact for the model, before it reports
ready. Each bucket keeps one batch queue with its own batch limit (token budget // bucket
edge). A request is checked against the model's signature before it joins a batch; a batch is
assembled on the device (pinned staging, conversion and NaN/Inf there: ``fa3trt.serving.batch``),
run, and cut back into each caller's answer. A request holding NaN or Inf gets its own 422 and
the requests batched with it are answered. A batch that fails is split and retried in halves,
so only the requests that really fail, fail.

The handle API is ``infer``: named inputs (a mapping) in, ``{output name: array}`` out; for a
model with one sent input, the array alone in (NumPy or a CPU torch tensor), its answer alone
out, in the request's dtype and type. The routes are mixed in from ``deploy.routes``, so a
replica can be the app's ingress itself; ``deploy.app`` deploys it, as the ingress or behind
ingress processes.
"""

import asyncio
import contextlib
import logging
import os
import time
import warnings
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import numpy as np
import torch
from ray import serve

from deploy.affinity import pin_to_gpu_node
from deploy.codec import from_numpy_like, to_numpy
from deploy.lag import WakeLag
from deploy.metrics import ReplicaMetrics, rss_bytes
from deploy.routes import V1Routes, V2Routes, api
from fa3trt.buckets import Buckets
from fa3trt.config import AppArgs, BatchingConfig
from fa3trt.errors import InvalidInputError
from fa3trt.requests import Checked, check_request
from fa3trt.serving import load_backend
from fa3trt.serving.batch import assemble, group_key, split, wire_dtype
from fa3trt.serving.warmup import check_padding, health_request, warmup_requests
from fa3trt.signature import Signature
from fa3trt.timing import timing_events
from fa3trt.transfer import to_host

__all__ = ["ModelReplica", "ModelServer", "ModelWorker", "bucket_limits", "replica_id", "single_input"]

log = logging.getLogger("ray.serve")
# Requests arrive as read-only NumPy views of Ray's object store; they are only read (copied
# into the batch), so torch's warning about non-writable arrays is noise here.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")


def bucket_limits(buckets: Buckets, batching: BatchingConfig) -> list[tuple[int, float]]:
    """(max_batch_size, batch_wait_timeout_s) per bucket, overrides applied."""
    out = []
    for i, edge in enumerate(buckets.edges):
        o = batching.bucket_overrides.get(edge)
        size = (o.max_batch_size if o and o.max_batch_size else None) or buckets.batch_limit(
            i, batching.max_batch_tokens
        )
        wait = o.batch_wait_timeout_s if o and o.batch_wait_timeout_s is not None else batching.batch_wait_timeout_s
        out.append((size, wait))
    return out


def single_input(signature: Signature) -> str:
    """The name of a model's one sent input: what a single array (``/v1/infer`` as .npy or
    ``{"x": ...}``, ``infer(array)``) is; an ``InvalidInputError`` naming them where it has several."""
    sent = [t.name for t in signature.sent]
    if len(sent) != 1:
        raise InvalidInputError(
            f"this model takes the inputs {sent}; send them by name (a mapping, .npz, or JSON "
            '{"inputs": {name: array}}), not a single array'
        )
    return sent[0]


def replica_id() -> str:
    """This Serve replica's id; outside Serve (a replica class built directly) the process's."""
    try:
        return str(serve.get_replica_context().replica_id.unique_id)
    except Exception:  # outside Serve (direct construction in tests)
        return f"pid{os.getpid()}"


class ModelReplica(V1Routes, V2Routes):
    """One model replica: a backend, one batch queue per bucket, and the app's HTTP routes.

    By default HTTP (through Serve's proxy) and handle calls reach the replica directly: no hop
    in between copies a request or its answer once more (behind Serve's proxy a separate ingress
    deployment served less: docs/benchmarks.md, "Scale-out"). With direct ingress and large
    bodies, ingress processes in front (``ingress_replicas``, ``deploy.ingress``) keep the
    body copies off this process's GIL (section 8). Deployed as ``ModelServer`` or
    ``ModelWorker`` (the end of this module), bound by ``deploy.app``."""

    def __init__(
        self, args: dict[str, Any], batching: dict[str, Any] | None = None, cpu_threads: int | None = None
    ) -> None:
        """``args``: AppArgs without ``batching``, which arrives as Serve's ``user_config``
        through ``reconfigure`` (so changing it never restarts the replica). ``batching`` is
        for use outside Serve. ``cpu_threads``: PyTorch's threads on a CPU replica
        (``deploy.app.replica_plan``)."""
        self.args = AppArgs.model_validate(args)
        self.buckets = self.args.bucket_set()
        self._t0 = time.perf_counter()
        if cpu_threads is not None:
            torch.set_num_threads(cpu_threads)
        # How late this process's threads get to run Python again (GIL and CPU waits): /v1/stats.
        self.wake_lag = WakeLag()
        # Before anything is allocated: page-locked buffers are first-touched on the GPU's node.
        gpu = self.args.numa_affinity and torch.cuda.is_available()
        self.cpu_affinity = pin_to_gpu_node(torch.cuda.current_device()) if gpu else None
        self.backend = load_backend(
            self.args.backend,
            self.args.model,
            buckets=self.buckets,
            store=self.args.store,
            max_batch_tokens=self.args.batching.max_batch_tokens,
            build_if_missing=self.args.build_if_missing,
            cuda_graphs=self.args.cuda_graphs,
            compile=self.args.compile,
        )
        self.signature: Signature = self.backend.signature
        self.metrics = ReplicaMetrics(self.buckets.edges)
        # One CUDA stream per bucket: a bucket's batch waits for its own copies and kernels only,
        # and one bucket's copies overlap another's kernels. (On one shared stream every
        # answer's sync also waited for whatever the other buckets had queued.) With TensorRT
        # a bucket's batches meet its own profile; a batch that needs another bucket's profile
        # waits for that profile's last use (fa3trt.trt.runtime.ProfileTurns).
        dev = self.backend.device
        own = dev.type == "cuda" and self.args.stream_per_bucket
        self._streams = [torch.cuda.Stream(dev) if own else None for _ in self.buckets.edges]
        self.replica = replica_id()
        self._queues: list[Any] = []
        self._max_concurrent = 0
        self.limits: list[tuple[int, float]] = []
        self.batching: BatchingConfig | None = None
        if batching is not None:
            self.reconfigure(batching)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Apply batching knobs (Serve ``user_config``): at start, then live on every change.

        The first call builds one batch queue per bucket and warms every bucket, alone and at its
        batch limit, before the replica reports ready.
        """
        batching = BatchingConfig.model_validate(user_config, context={"buckets": self.buckets.edges})
        self.limits = bucket_limits(self.buckets, batching)
        self.batching = batching
        if not self._queues:
            self._max_concurrent = batching.max_concurrent_batches
            for i, (size, wait) in enumerate(self.limits):
                queue = serve.batch(
                    max_batch_size=size, batch_wait_timeout_s=wait, max_concurrent_batches=self._max_concurrent
                )
                self._queues.append(queue(self._make_batch_fn(i)))  # type: ignore[arg-type]  # Ray's stub types only the sync form
            # Each bucket warms on its own stream (per-stream library state; CUDA graphs are
            # captured per stream), through the batch assembler as served.
            for i, (size, _) in enumerate(self.limits):
                with self._on_stream(i):
                    reqs = warmup_requests(self.signature, self.buckets, i, size)
                    self.backend.warmup([self._assemble(r).inputs for r in reqs])
            check_padding(self.backend, self.buckets)
            log.info(
                "fa3trt replica %s ready in %.1fs: %s",
                self.replica,
                time.perf_counter() - self._t0,
                self.backend.describe(),
            )
        else:
            if batching.max_concurrent_batches != self._max_concurrent:
                log.warning("max_concurrent_batches changes only at deployment; keeping %d", self._max_concurrent)
            for q, (size, wait) in zip(self._queues, self.limits):
                q.set_max_batch_size(size)
                q.set_batch_wait_timeout_s(wait)
        log.info("batching: %s", dict(zip(self.buckets.edges, self.limits)))

    def _on_stream(self, i: int) -> contextlib.AbstractContextManager[Any]:
        """Bucket ``i``'s CUDA stream as the current stream (nothing on a CPU replica)."""
        stream = self._streams[i]
        return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()

    def _assemble(self, reqs: list[Checked], check_finite: bool = False) -> Any:
        return assemble(
            self.signature,
            reqs,
            self.backend.device,
            lengths_on_device=self.backend.lengths_on_device,
            check_finite=check_finite,
        )

    def _make_batch_fn(self, i: int) -> Callable[[list[tuple[Checked, float]]], Awaitable[list[Any]]]:
        edge = self.buckets.edges[i]

        async def run_batch(items: list[tuple[Checked, float]]) -> list[Any]:
            start = time.perf_counter()
            waits = [start - t for _, t in items]
            self.metrics.batch_started()
            try:
                # Compute off the event loop so the queues keep filling while the device works.
                results = await asyncio.to_thread(self._run_split, [r for r, _ in items], edge)
            finally:
                self.metrics.batch_ended()
            self.metrics.record(edge, [r.length for r, _ in items], waits, time.perf_counter() - start)
            return results

        return run_batch

    def _run_split(self, reqs: list[Checked], edge: int) -> list[Any]:
        """Run a batch of the bucket ``edge`` on that bucket's stream; on failure retry its
        halves, so a failure stays with the requests that cause it."""
        with self._on_stream(self.buckets.edges.index(edge)):
            result = self._attempt(reqs)
        if not isinstance(result, str):
            return result
        # The failed attempt's frames (the batch, its activations) are gone with _attempt's
        # return: only now is its memory free for the halves (a retry from inside the except
        # block would run with the failed batch's tensors still held by the traceback).
        if self.backend.device.type == "cuda":
            torch.cuda.empty_cache()
        if len(reqs) == 1:
            log.error("request of %d tokens failed in bucket %d: %s", reqs[0].length, edge, result)
            self.metrics.failed.inc(tags={"bucket": str(edge)})
            self.metrics.local[edge]["failed"] += 1
            return [RuntimeError(f"inference failed: {result}")]
        log.warning("batch of %d failed in bucket %d (%s); retrying in halves", len(reqs), edge, result)
        h = len(reqs) // 2
        return self._run_split(reqs[:h], edge) + self._run_split(reqs[h:], edge)

    def _attempt(self, reqs: list[Checked]) -> list[Any] | str:
        """The batch's answers (an InvalidInputError for a request holding NaN or Inf), or why it
        failed (a message only: no traceback outlives the call). Requests that may share a batch
        (equal ``group_key``: all of them under ``pad``) run together, each group one call."""
        groups: dict[Any, list[int]] = {}
        for i, r in enumerate(reqs):
            groups.setdefault(group_key(self.signature, r), []).append(i)
        answers: list[Any] = [None] * len(reqs)
        phases = [0.0] * 5  # assemble, model (to the answer on the host), launch, GPU, answers
        try:
            for idx in groups.values():
                group = [reqs[i] for i in idx]
                t0 = time.perf_counter()
                batch = self._assemble(group, self.args.reject_nonfinite)
                t1 = time.perf_counter()
                events = timing_events(self.backend.device)  # the model's device time
                if events:
                    events[0].record()
                y_dev = self.backend.run(batch.inputs).to(wire_dtype(self.signature, group))
                if events:
                    events[1].record()
                t_launch = time.perf_counter()
                y = to_host(y_dev)
                t2 = time.perf_counter()
                bad = self._nonfinite(batch.finite, len(group))
                for k, (i, a) in enumerate(zip(idx, split(self.signature, y, group))):
                    answers[i] = self._nonfinite_error(bad[k]) if bad[k] else a
                gpu_s = events[0].elapsed_time(events[1]) / 1e3 if events else 0.0  # no GPU: none of its time
                for j, v in enumerate((t1 - t0, t2 - t1, t_launch - t1, gpu_s, time.perf_counter() - t2)):
                    phases[j] += v
        except Exception as e:
            return f"{type(e).__name__}: {e}"
        self.metrics.record_phases(*phases)
        return answers

    @staticmethod
    def _nonfinite(finite: dict[str, torch.Tensor], n: int) -> list[list[str]]:
        """Per row, the float inputs holding NaN or Inf (one host copy per input, after the output's)."""
        rows: list[list[str]] = [[] for _ in range(n)]
        for name, ok in finite.items():
            for k, good in enumerate(ok.tolist()):
                if not good:
                    rows[k].append(name)
        return rows

    def _nonfinite_error(self, names: list[str]) -> InvalidInputError:
        dtype = str(self.backend.dtype).replace("torch.", "")
        return InvalidInputError(
            f"input {' and '.join(map(repr, names))} holds NaN or Inf (checked as the model's {dtype}); send finite "
            "values (or serve with reject_nonfinite: false)"
        )

    async def infer(self, x: Any, answer_dtype: str | None = None) -> Any:
        """One request: named inputs (a mapping of input name -> array, no batch axis) in,
        ``{output name: array}`` out (in ``answer_dtype`` where given, else the output's dtype);
        or, for a model with one sent input, that array alone (NumPy or a CPU torch tensor) in
        and its answer alone out, in the request's dtype and type. Every bad input is an
        ``InvalidInputError`` naming it, raised before the request joins a batch."""
        if isinstance(x, Mapping):
            answer = np.dtype(answer_dtype) if answer_dtype is not None else None
            return {self.signature.output.name: await self._submit(x, answer)}
        try:
            arr, like = to_numpy(x)
            name = single_input(self.signature)
        except InvalidInputError:
            self._count_rejected("none")
            raise
        answer = np.dtype(arr.dtype) if arr.dtype.kind == "f" else None
        return from_numpy_like(await self._submit({name: arr}, answer), like)

    async def _submit(self, inputs: Any, answer_dtype: np.dtype | None) -> np.ndarray:
        try:
            req = check_request(self.signature, inputs, self.buckets, answer_dtype)
        except InvalidInputError:
            self._count_rejected("none")
            raise
        result = await self._queues[req.bucket]((req, time.perf_counter()))
        if isinstance(result, InvalidInputError):
            self._count_rejected(str(self.buckets.edges[req.bucket]))
            raise result
        if isinstance(result, Exception):
            raise result
        return result  # type: ignore[no-any-return]

    def io_signature(self) -> Signature:
        """What one request carries and gets back (no batch axis): the protocol layers'
        (``deploy.kserve``) view of the model."""
        return self.signature

    def is_ready(self) -> bool:
        return bool(self._queues)

    async def backend_name(self) -> str:
        return str(self.backend.name)

    async def replica_info(self) -> dict[str, Any]:
        """``/v1/info``: the backend, device, buckets and batch limits, and the app's arguments."""
        d = self.backend.describe()
        d.update(
            replica=self.replica,
            buckets=list(self.buckets.edges),
            batch_limits={e: size for e, (size, _) in zip(self.buckets.edges, self.limits)},
            signature=self.signature.to_dict(),
            cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
            cpu_threads=torch.get_num_threads(),
            cpu_affinity=self.cpu_affinity,
            app_args=self.args.model_dump() | ({"batching": self.batching.model_dump()} if self.batching else {}),
        )
        return d

    async def replica_stats(self) -> dict[str, Any]:
        """``/v1/stats``: this replica's counters since it started."""
        return {
            "replica": self.replica,
            "rss_bytes": rss_bytes(),
            "rejected": self.metrics.rejected_local,
            "busy_s": self.metrics.busy_s,
            "phases_s": self.metrics.phases_snapshot(),
            "wake_lag": self.wake_lag.snapshot(),
            "buckets": {str(e): dict(v) for e, v in self.metrics.local.items()},
        }

    def _count_rejected(self, bucket: str) -> None:
        self.metrics.rejected.inc(tags={"bucket": bucket})
        self.metrics.rejected_local += 1

    def check_health(self) -> None:
        """One request of the smallest sizes the model accepts, on the smallest bucket's stream."""
        with self._on_stream(0):
            y = self.backend.run(self._assemble([health_request(self.signature)]).inputs)
            ok = bool(torch.isfinite(y).all())
        if not ok:
            raise RuntimeError("health check: the model returned non-finite values")


# The deployments, wrapped here, beside the class: a replica's process imports this module to
# get the class by reference, and that import is what runs `serve.ingress(api)` in it, moving
# the routes of the one FastAPI app onto this class. A second class wrapped in the same process
# breaks them (every route answers 422), so a serving process imports one wrapper only: a model
# replica's this module, an ingress replica's deploy.ingress (tests/deploy/test_codec_config.py).
ModelServer = serve.deployment(name="ModelServer")(serve.ingress(api)(ModelReplica))
# Behind ingress replicas (ingress_replicas > 0) the model replicas are called by handle only:
# the same class without the routes' FastAPI app (Serve allows one per application).
ModelWorker = serve.deployment(name="ModelServer")(ModelReplica)
