"""How long a replica's threads wait to run Python again once they could: its wake-up lag.

A replica's batch threads spend their time in calls that let go of the GIL (a torch copy, a
kernel launch, a stream sync) and must take it back each time, from the event loop that
deserializes requests or from another bucket's thread. A thread asking for the GIL waits until
the holder gives it up, which a thread running pure Python does only every switch interval
(``sys.getswitchinterval()``, 5 ms by default). With a CPU shared by more processes than it
has cores, the wait for a core adds to it.

``WakeLag`` measures exactly that wait, from outside the code it slows: a daemon thread sleeps
``period_s`` again and again and records by how much each sleep overran (the OS's timer slack,
some 0.05-0.1 ms, plus the time spent waiting for the GIL and a core). Its counters are
cumulative, so two readings give the lag over any window: ``/v1/stats`` carries them, and
``bench.scaling`` reports them per replica and per pass.
"""

from __future__ import annotations

import bisect
import threading
import time
from typing import Any

__all__ = ["WakeLag", "lag_delta"]

# Upper edges of the histogram's bins, in ms; a last bin holds everything above.
BOUNDS_MS = (0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0)


class WakeLag:
    """A thread that measures how late it wakes up; ``snapshot()`` reads its counters."""

    def __init__(self, period_s: float = 0.01, start: bool = True) -> None:
        if not 0 < period_s <= 1:
            raise ValueError(f"period_s={period_s} must be in (0, 1] seconds")
        self.period_s = period_s
        self._lock = threading.Lock()
        self._samples = 0
        self._total_s = 0.0
        self._max_s = 0.0
        self._bins = [0] * (len(BOUNDS_MS) + 1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fa3trt-wake-lag", daemon=True)
        if start:
            self._thread.start()

    def record(self, lag_s: float) -> None:
        """Count one wake-up that came ``lag_s`` seconds late (negative: on time)."""
        lag_s = max(0.0, lag_s)
        with self._lock:
            self._samples += 1
            self._total_s += lag_s
            self._max_s = max(self._max_s, lag_s)
            self._bins[bisect.bisect_left(BOUNDS_MS, 1e3 * lag_s)] += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            t0 = time.perf_counter()
            time.sleep(self.period_s)
            self.record(time.perf_counter() - t0 - self.period_s)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2 * self.period_s + 1)

    def snapshot(self) -> dict[str, Any]:
        """Cumulative counters: samples, total and largest lag (s), and the histogram's counts
        per bin (``bounds_ms`` are the bins' upper edges; the last bin is open)."""
        with self._lock:
            return {
                "samples": self._samples,
                "total_s": self._total_s,
                "max_s": self._max_s,
                "bounds_ms": list(BOUNDS_MS),
                "bins": list(self._bins),
            }


def lag_delta(before: dict[str, Any] | None, after: dict[str, Any]) -> dict[str, float | None] | None:
    """The lag between two snapshots: mean (ms), the share of wake-ups late by over 1 ms and
    over 5 ms, and an upper bound of the 99th percentile (the upper edge of its bin; None when
    it falls in the open bin, past the last edge). None when no wake-up happened in between."""
    b = before or {"samples": 0, "total_s": 0.0, "bins": [0] * len(after["bins"])}
    n = after["samples"] - b["samples"]
    if n <= 0:
        return None
    bins = [x - y for x, y in zip(after["bins"], b["bins"])]
    bounds: list[float | None] = [*after["bounds_ms"], None]  # None: the open bin's upper edge

    def share_above(ms: float) -> float:
        return sum(c for c, edge in zip(bins, bounds) if edge is None or edge > ms) / n

    seen, p99 = 0, None
    for c, edge in zip(bins, bounds):
        seen += c
        if seen >= 0.99 * n:
            p99 = edge
            break
    return {
        "samples": n,
        "mean_ms": 1e3 * (after["total_s"] - b["total_s"]) / n,
        "over_1ms": share_above(1.0),
        "over_5ms": share_above(5.0),
        "p99_ms_at_most": p99,
    }
