"""The model replica: one backend, one ``@serve.batch`` queue per sequence-length bucket.

It loads its backend (the TensorRT engine for its GPU, or the torch model), warms up every
bucket before it reports ready, and keeps one batch queue per bucket with its own batch limit
(token budget // bucket edge). A batch is padded to its longest member and runs with
``seq_lens``; each caller gets exactly its own rows back. NaN and Inf are looked for on the
device, in the assembled batch, and refuse only the requests holding them. A batch that fails is
split and retried in halves, so only the requests that really fail, fail. A user's model
(``model: source: ...``) runs on ``fa3trt.serving.served``'s backends, its requests checked, batched
(padded or by shape) and answered by its ``fa3trt.signature.Signature``.

The routes are mixed in from ``deploy.routes``, so a replica can be the app's ingress itself;
``deploy.app`` deploys it, as the ingress or behind ingress processes.
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
from deploy.codec import (
    all_finite,
    from_numpy_like,
    to_numpy,
    validate_sequence,
)
from deploy.lag import WakeLag
from deploy.metrics import ReplicaMetrics, rss_bytes
from deploy.routes import V1Routes, V2Routes, api
from fa3trt.buckets import Buckets, assemble, to_host
from fa3trt.config import AppArgs, BatchingConfig, SourceSpec
from fa3trt.errors import InvalidInputError
from fa3trt.onnx.calls import reference_signature
from fa3trt.serving.served import NamedBackend, check_padding, load_named_backend
from fa3trt.signature import Checked, Signature
from fa3trt.timing import timing_events

__all__ = ["ModelReplica", "ModelServer", "ModelWorker", "bucket_limits"]

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


class ModelReplica(V1Routes, V2Routes):
    """One model replica: a backend, one batch queue per bucket, and the app's HTTP routes.

    By default HTTP (through Serve's proxy) and handle calls reach the replica directly: no hop
    in between copies a request or its answer once more (behind Serve's proxy a separate ingress
    deployment served less: docs/benchmarks.md, "Scale-out"). With direct ingress and large
    bodies, ingress processes in front (``ingress_replicas``, ``deploy.ingress``) keep the
    body copies off this process's GIL (section 8). Deployed as ``ModelServer`` or
    ``ModelWorker`` (the end of this module), bound by ``deploy.app``."""

    def __init__(self, args: dict[str, Any], batching: dict[str, Any] | None = None) -> None:
        """``args``: AppArgs without ``batching``, which arrives as Serve's ``user_config``
        through ``reconfigure`` (so changing it never restarts the replica). ``batching`` is
        for use outside Serve."""
        from fa3trt.serving.backends import load_backend

        self.args = AppArgs.model_validate(args)
        self.buckets = self.args.bucket_set()
        self._t0 = time.perf_counter()
        # How late this process's threads get to run Python again (GIL and CPU waits): /v1/stats.
        self.wake_lag = WakeLag()
        # Before anything is allocated: page-locked buffers are first-touched on the GPU's node.
        gpu = self.args.numa_affinity and torch.cuda.is_available()
        self.cpu_affinity = pin_to_gpu_node(torch.cuda.current_device()) if gpu else None
        spec = self.args.model
        # A user's model (named inputs, fa3trt.serving.served) or the reference model (one array x).
        self.named: NamedBackend | None = None
        if isinstance(spec, SourceSpec):
            self.named = load_named_backend(
                self.args.backend,
                spec,
                buckets=self.buckets,
                store=self.args.store,
                max_batch_tokens=self.args.batching.max_batch_tokens,
                build_if_missing=self.args.build_if_missing,
            )
            self.backend: Any = self.named
            self.signature: Signature = self.named.signature
            self.model_dtype: torch.dtype = getattr(torch, spec.dtype)
        else:
            cfg = spec.config()
            self.backend = load_backend(
                self.args.backend,
                cfg,
                weights=spec.weights,
                buckets=self.buckets,
                store=self.args.store,
                build_if_missing=self.args.build_if_missing,
                max_batch_tokens=self.args.batching.max_batch_tokens,
                cuda_graphs=self.args.cuda_graphs,
            )
            self.signature = reference_signature(cfg)
            self.model_dtype = cfg.torch_dtype
        self.serves_named = self.named is not None
        self.metrics = ReplicaMetrics(self.buckets.edges)
        # One CUDA stream per bucket: a bucket's batch waits for its own copies and kernels only,
        # and one bucket's copies overlap another's kernels. (On one shared stream every
        # answer's sync also waited for whatever the other buckets had queued.) With TensorRT
        # a bucket's batches meet its own profile; a batch that needs another bucket's profile
        # waits for that profile's last use (fa3trt.trt.runtime.TensorRTBackend.run).
        dev = self.backend.device
        own = dev.type == "cuda" and self.args.stream_per_bucket
        self._streams = [torch.cuda.Stream(dev) if own else None for _ in self.buckets.edges]
        self.replica = self._replica_id()
        self._queues: list[Any] = []
        self._max_concurrent = 0
        self.limits: list[tuple[int, float]] = []
        self.batching: BatchingConfig | None = None
        if batching is not None:
            self.reconfigure(batching)

    @staticmethod
    def _replica_id() -> str:
        try:
            return str(serve.get_replica_context().replica_id.unique_id)
        except Exception:  # outside Serve (direct construction in tests)
            return f"pid{os.getpid()}"

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Apply batching knobs (Serve ``user_config``): at start, then live on every change.

        The first call builds one batch queue per bucket and warms every bucket at its edge,
        alone and at its batch limit, before the replica reports ready.
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
            # captured per stream).
            for i, ((size, _), e) in enumerate(zip(self.limits, self.buckets.edges)):
                with self._on_stream(i):
                    if self.named is None:
                        self.backend.warmup(sorted({(1, e), (size, e)}))
                    else:
                        sizes = self.signature.sample_sizes(self.buckets, e)
                        self.named.warmup([self.signature.samples(sizes, b) for b in sorted({1, size})])
            if self.named is not None:
                check_padding(self.named, self.buckets, self.model_dtype)
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

    def _make_batch_fn(self, i: int) -> Callable[[list[tuple[np.ndarray, float]]], Awaitable[list[Any]]]:
        edge = self.buckets.edges[i]

        async def run_batch(items: list[tuple[np.ndarray, float]]) -> list[Any]:
            start = time.perf_counter()
            waits = [start - t for _, t in items]
            self.metrics.batch_started()
            try:
                # Compute off the event loop so the queues keep filling while the device works.
                results = await asyncio.to_thread(self._run_split, [x for x, _ in items], edge)
            finally:
                self.metrics.batch_ended()
            lens = [x.length if isinstance(x, Checked) else x.shape[0] for x, _ in items]
            self.metrics.record(edge, lens, waits, time.perf_counter() - start)
            return results

        return run_batch

    def _run_split(self, xs: list[np.ndarray], edge: int) -> list[Any]:
        """Run a batch of the bucket ``edge`` on that bucket's stream; on failure retry its
        halves, so a failure stays with the requests that cause it."""
        with self._on_stream(self.buckets.edges.index(edge)):
            result = self._attempt(xs)
        if not isinstance(result, str):
            return result
        # The failed attempt's frames (the batch, its activations) are gone with _attempt's
        # return: only now is its memory free for the halves (a retry from inside the except
        # block would run with the failed batch's tensors still held by the traceback).
        if self.backend.device.type == "cuda":
            torch.cuda.empty_cache()
        if len(xs) == 1:
            n = xs[0].length if isinstance(xs[0], Checked) else xs[0].shape[0]
            log.error("request of %d tokens failed in bucket %d: %s", n, edge, result)
            self.metrics.failed.inc(tags={"bucket": str(edge)})
            self.metrics.local[edge]["failed"] += 1
            return [RuntimeError(f"inference failed: {result}")]
        log.warning("batch of %d failed in bucket %d (%s); retrying in halves", len(xs), edge, result)
        h = len(xs) // 2
        return self._run_split(xs[:h], edge) + self._run_split(xs[h:], edge)

    def _attempt(self, xs: list[Any]) -> list[np.ndarray | InvalidInputError] | str:
        """The batch's answers (an InvalidInputError for a request holding NaN or Inf), or why it
        failed (a message only: no traceback outlives the call)."""
        if self.named is not None:
            return self._attempt_named(xs)
        try:
            t0 = time.perf_counter()
            x, lens = assemble(xs, self.backend.dtype, self.backend.device)
            finite = self._finite_rows(x) if self.args.reject_nonfinite else None
            # Back in the requests' dtype when they share float16 (half the bytes to move), else float32.
            out_dtype = torch.float16 if all(a.dtype == np.float16 for a in xs) else torch.float32
            t1 = time.perf_counter()
            events = timing_events(x.device)  # the model's device time
            if events:
                events[0].record()
            y_dev = self.backend.run(x, lens).to(out_dtype)
            if events:
                events[1].record()
            t_launch = time.perf_counter()
            y = to_host(y_dev).numpy()
            t2 = time.perf_counter()
            ok = finite.tolist() if finite is not None else [True] * len(xs)
        except Exception as e:
            return f"{type(e).__name__}: {e}"
        answers = [y[i, : a.shape[0]] if ok[i] else self._nonfinite_error() for i, a in enumerate(xs)]
        gpu_s = events[0].elapsed_time(events[1]) / 1e3 if events else 0.0  # no GPU: none of its time
        self.metrics.record_phases(t1 - t0, t2 - t1, t_launch - t1, gpu_s, time.perf_counter() - t2)
        return answers

    def _attempt_named(self, reqs: list[Checked]) -> list[Any] | str:
        """``_attempt`` for a user's model: the requests that may share a batch (equal
        ``Signature.group_key``) run together, each group one call of the model."""
        assert self.named is not None
        sig, backend = self.signature, self.named
        groups: dict[Any, list[int]] = {}
        for i, r in enumerate(reqs):
            groups.setdefault(sig.group_key(r), []).append(i)
        answers: list[Any] = [None] * len(reqs)
        try:
            t0 = time.perf_counter()
            staged = run = 0.0
            for idx in groups.values():
                group = [reqs[i] for i in idx]
                t1 = time.perf_counter()
                batch = sig.assemble(group, backend.device)
                t2 = time.perf_counter()
                y = to_host(backend.run(batch))
                staged, run = staged + t2 - t1, run + time.perf_counter() - t2
                for i, a in zip(idx, sig.split(y, group)):
                    answers[i] = a
        except Exception as e:
            return f"{type(e).__name__}: {e}"
        total = time.perf_counter() - t0
        self.metrics.record_phases(staged, run, run, 0.0, max(0.0, total - staged - run))
        return answers

    @staticmethod
    def _finite_rows(x: torch.Tensor) -> torch.Tensor:
        """(B,) bool on x's device: whether each sequence of the batch is free of NaN and Inf.

        Checked here, on the device, rather than on each request as it arrives: one pass over
        the batch (min and max propagate NaN and show an Inf) that the GPU does in microseconds
        and whose answer comes back with the batch's, instead of a pass over every request's
        bytes on the replica's event loop. Every layer works per token or per sequence, so a
        bad sequence spoils only its own rows of the output, which are not returned."""
        lo, hi = torch.aminmax(x.view(x.shape[0], -1), dim=1)
        return torch.isfinite(lo) & torch.isfinite(hi)

    def _nonfinite_error(self) -> InvalidInputError:
        dtype = str(self.backend.dtype).replace("torch.", "")
        return InvalidInputError(
            f"x holds NaN or Inf (checked as the model's {dtype}); send finite values (or serve with reject_nonfinite: false)"
        )

    async def infer(self, x: Any) -> Any:
        """One request. The reference model: one sequence (S, hidden) in, (S, hidden) out in the
        caller's dtype and type. Any model: a mapping of input name -> array (no batch axis) in,
        ``{output name: array}`` out (``infer_named``)."""
        if isinstance(x, Mapping) or self.named is not None:
            return await self.infer_named(x)
        arr, like = to_numpy(x)
        try:
            # Shape, dtype and length here; NaN and Inf in the batch, on the device (_finite_rows).
            i = validate_sequence(arr, self.backend.hidden, self.buckets, reject_nonfinite=False)
        except InvalidInputError:
            self._count_rejected("none")
            raise
        # Any accepted float dtype: the batch is assembled once, converted to the backend's dtype.
        result = await self._queues[i]((arr, time.perf_counter()))
        if isinstance(result, InvalidInputError):
            self._count_rejected(str(self.buckets.edges[i]))
            raise result
        if isinstance(result, Exception):
            raise result
        return from_numpy_like(result, like)

    def io_signature(self) -> Signature:
        """What one request carries and gets back (no batch axis): the protocol layers'
        (``deploy.kserve``) view of the model, named inputs for every model."""
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

    async def infer_named(self, inputs: Any) -> dict[str, np.ndarray]:
        """One request by name: ``{input: array}`` (each without the batch axis; the inputs the
        signature lists as sent) in, ``{output: array}`` out. Every bad input is an
        ``InvalidInputError`` naming it, raised before the request joins a batch."""
        sig = self.signature
        try:
            # The reference model batches the requests' own float dtype (assemble converts on
            # the device): checked here, not converted.
            req = sig.check(inputs, self.buckets, convert=self.named is not None)
            if self.named is not None and self.args.reject_nonfinite:
                for name, arr in req.tensors.items():
                    if arr.dtype.kind == "f" and not all_finite(arr):
                        raise InvalidInputError(
                            f"input {name!r} holds NaN or Inf; send finite values (or serve with reject_nonfinite: false)"
                        )
        except InvalidInputError:
            self._count_rejected("none")
            raise
        if self.named is None:  # the reference model's own path: x alone, a NumPy answer in x's dtype
            x = inputs["x"]
            y = await self.infer(x if isinstance(x, np.ndarray) else req.tensors["x"])
            return {sig.output.name: y}
        result = await self._queues[req.bucket]((req, time.perf_counter()))
        if isinstance(result, Exception):
            raise result
        return {sig.output.name: result}

    def _count_rejected(self, bucket: str) -> None:
        self.metrics.rejected.inc(tags={"bucket": bucket})
        self.metrics.rejected_local += 1

    def check_health(self) -> None:
        if self.named is not None:
            sig = self.signature
            sizes = {a: lo for a, (lo, _) in sig.ranges.items()} | {sig.bucketed: 1}
            with self._on_stream(0):
                y = self.named.run(sig.samples(sizes, 1))
                ok = bool(torch.isfinite(y).all())
            if not ok:
                raise RuntimeError("health check: the model returned non-finite values")
            return
        x = torch.zeros(1, 1, self.backend.hidden)
        x[0, 0, 0] = 1.0
        with self._on_stream(0):  # the smallest bucket's: its warm shapes (and CUDA graph) serve
            y = self.backend.run(x, torch.ones(1, dtype=torch.int32))
            ok = bool(torch.isfinite(y).all())
        if not ok:
            raise RuntimeError("health check: the backend returned non-finite values")


# The deployments, wrapped here, beside the class: a replica's process imports this module to
# get the class by reference, and that import is what runs `serve.ingress(api)` in it, moving
# the routes of the one FastAPI app onto this class. A second class wrapped in the same process
# breaks them (every route answers 422), so a serving process imports one wrapper only: a model
# replica's this module, an ingress replica's deploy.ingress (tests/deploy/test_codec_config.py).
ModelServer = serve.deployment(name="ModelServer")(serve.ingress(api)(ModelReplica))
# Behind ingress replicas (ingress_replicas > 0) the model replicas are called by handle only:
# the same class without the routes' FastAPI app (Serve allows one per application).
ModelWorker = serve.deployment(name="ModelServer")(ModelReplica)
