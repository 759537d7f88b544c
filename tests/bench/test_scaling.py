"""The scale-out benchmark's arithmetic: merging the load clients' results, efficiency against
the smallest replica count, and per-replica counters from two stats readings."""

from __future__ import annotations

import numpy as np
import pytest

from bench.scaling import efficiency, merge, per_replica


def test_merge_spans_all_clients() -> None:
    a = {"start": 100.0, "end": 110.0, "requests": 50, "errors": 0, "tokens": 5000, "latencies_ms": [10.0] * 50, "first_error": None}
    b = {"start": 101.0, "end": 112.0, "requests": 30, "errors": 2, "tokens": 3000, "latencies_ms": [30.0] * 28, "first_error": "ValueError: x"}
    m = merge([a, b])
    assert m["seconds"] == pytest.approx(12.0)  # first start to last end, not a sum or a mean
    assert m["requests"] == 80 and m["errors"] == 2 and m["clients"] == 2
    assert m["rps"] == pytest.approx(80 / 12) and m["tokens_per_s"] == pytest.approx(8000 / 12)
    lat = np.array([10.0] * 50 + [30.0] * 28)
    assert m["p50_ms"] == pytest.approx(np.percentile(lat, 50)) and m["p99_ms"] == pytest.approx(np.percentile(lat, 99))
    assert m["first_error"] == "ValueError: x"


def test_efficiency_against_the_smallest_count() -> None:
    eff = efficiency({1: {"rps": 100.0}, 2: {"rps": 180.0}, 4: {"rps": 360.0}})
    assert eff == pytest.approx({1: 1.0, 2: 0.9, 4: 0.9})
    # Without a 1-replica run, the smallest count's per-replica rate is the baseline.
    assert efficiency({2: {"rps": 200.0}, 4: {"rps": 300.0}}) == pytest.approx({2: 1.0, 4: 0.75})


def _stats(rid: str, busy: float, **buckets: tuple[int, int, float]) -> dict[str, object]:
    return {
        "replica": rid,
        "busy_s": busy,
        "buckets": {e: {"batches": b, "requests": r, "tokens": 10 * r, "computed_tokens": 12 * r, "compute_s": c} for e, (b, r, c) in buckets.items()},
    }


def test_per_replica_deltas() -> None:
    before = {"r1": _stats("r1", 5.0, **{"256": (10, 20, 1.0)})}
    after = {
        "r1": _stats("r1", 13.0, **{"256": (30, 60, 2.0), "512": (10, 10, 1.0)}),
        "r2": _stats("r2", 9.0, **{"256": (20, 30, 1.5)}),  # started after the first reading
    }
    rows = {r["replica"]: r for r in per_replica(before, after, seconds=10.0)}
    assert rows["r1"]["requests"] == 50 and rows["r1"]["batches"] == 30
    assert rows["r1"]["busy_fraction"] == pytest.approx(0.8)
    assert rows["r1"]["compute_ms_per_batch"] == pytest.approx(1e3 * 2.0 / 30)
    assert rows["r2"]["requests"] == 30 and rows["r2"]["busy_fraction"] == pytest.approx(0.9)
    assert rows["r2"]["compute_ms_per_batch"] == pytest.approx(1e3 * 1.5 / 20)
