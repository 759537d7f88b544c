"""A replica's metrics: per-bucket Serve metrics (exported through Ray's Prometheus endpoint),
the local counters ``/v1/stats`` shows, where a batch's time goes, and the replica's busy time."""

import os
import threading
import time

from fa3trt.buckets import padding_ratio

__all__ = ["ReplicaMetrics", "rss_bytes"]


class ReplicaMetrics:
    """Per-bucket Serve metrics (exported through Ray's Prometheus endpoint) and local counters."""

    def __init__(self, edges: tuple[int, ...]) -> None:
        from ray.serve import metrics

        tag = ("bucket",)
        self.batch_size = metrics.Histogram(
            "fa3trt_batch_size",
            description="Requests per batch.",
            boundaries=[1, 2, 4, 8, 16, 32, 64, 128, 256],
            tag_keys=tag,
        )
        self.padding = metrics.Histogram(
            "fa3trt_padding_ratio",
            description="Padded tokens / computed tokens per batch.",
            boundaries=[0.01, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75],
            tag_keys=tag,
        )
        self.queue_wait = metrics.Histogram(
            "fa3trt_queue_wait_s",
            description="Seconds from arrival to batch start.",
            boundaries=[0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5],
            tag_keys=tag,
        )
        self.compute = metrics.Histogram(
            "fa3trt_compute_s",
            description="Seconds of backend compute per batch.",
            boundaries=[0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5],
            tag_keys=tag,
        )
        self.rejected = metrics.Counter(
            "fa3trt_rejected_requests", description="Requests refused before batching.", tag_keys=tag
        )
        self.failed = metrics.Counter(
            "fa3trt_failed_requests", description="Requests whose batch failed.", tag_keys=tag
        )
        self.local = {
            e: {
                "batches": 0,
                "requests": 0,
                "max_batch": 0,
                "tokens": 0,
                "computed_tokens": 0,
                "failed": 0,
                "compute_s": 0.0,
            }
            for e in edges
        }
        self.rejected_local = 0
        # Where a batch's time goes, summed over batches (seconds; from the compute threads):
        # staging the requests into one device batch, the model from launch to answers on the
        # host, of which the host queued the work ("launch": the model call until it returns,
        # GIL waits included; on a CPU replica the whole computation) and the GPU was busy
        # ("gpu", CUDA events; 0 on a CPU replica), and cutting the answers.
        self.phases = {"assemble": 0.0, "model": 0.0, "launch": 0.0, "gpu": 0.0, "answers": 0.0, "batches": 0}
        self._phase_lock = threading.Lock()
        # Seconds with at least one batch in flight (the replica's busy time; batches of several
        # buckets overlap, so this is a union of intervals, not a sum). Event-loop only.
        self.busy_s = 0.0
        self._active = 0
        self._busy_since = 0.0

    def batch_started(self) -> None:
        if self._active == 0:
            self._busy_since = time.perf_counter()
        self._active += 1

    def batch_ended(self) -> None:
        self._active -= 1
        if self._active == 0:
            self.busy_s += time.perf_counter() - self._busy_since

    def record_phases(self, assemble_s: float, model_s: float, launch_s: float, gpu_s: float, answers_s: float) -> None:
        with self._phase_lock:
            p = self.phases
            p["assemble"] += assemble_s
            p["model"] += model_s
            p["launch"] += launch_s
            p["gpu"] += gpu_s
            p["answers"] += answers_s
            p["batches"] += 1

    def phases_snapshot(self) -> dict[str, float]:
        with self._phase_lock:
            return dict(self.phases)

    def record(self, edge: int, lens: list[int], waits: list[float], compute_s: float) -> None:
        tags = {"bucket": str(edge)}
        self.batch_size.observe(len(lens), tags=tags)
        self.padding.observe(padding_ratio(lens), tags=tags)
        for w in waits:
            self.queue_wait.observe(w, tags=tags)
        self.compute.observe(compute_s, tags=tags)
        s = self.local[edge]
        s["batches"] += 1
        s["requests"] += len(lens)
        s["max_batch"] = max(s["max_batch"], len(lens))
        s["tokens"] += sum(lens)
        s["computed_tokens"] += len(lens) * max(lens)
        s["compute_s"] += compute_s


def rss_bytes() -> int | None:
    """This process's resident memory (Linux), for leak checks; None elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None
