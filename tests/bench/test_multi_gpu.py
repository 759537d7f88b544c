"""The multi-GPU model benchmark's process plumbing, on the CPU: every process runs every path
after one start, and a process that fails makes the run fail with its error."""

from __future__ import annotations

import pytest

from bench.multi_gpu import run_count

ARGS = {
    "device": "cpu",
    "preset": "tiny",
    "layers": 1,
    "mix": (16, 48),
    "batch": 2,
    "duration": 0.5,
    "threads": 1,
    "start_timeout": 120.0,
}


def test_each_path_runs_in_every_process() -> None:
    rows = run_count(2, ARGS, ["device", "staged-copy"])
    assert [(r["count"], r["path"]) for r in rows] == [(2, "device"), (2, "staged-copy")]
    for r in rows:
        assert [p["rank"] for p in r["processes"]] == [0, 1]
        for p in r["processes"]:
            assert p["path"] == r["path"] and p["batches"] > 0
            # Each batch holds `batch` requests of 16..48 tokens.
            assert 2 * 16 * p["batches"] <= p["tokens"] <= 2 * 48 * p["batches"]
            assert p["gpu_ms"] == 0.0 and p["wall_ms"] >= p["enqueue_ms"] > 0
        assert r["batches_per_s"] == pytest.approx(sum(p["batches"] / p["span_s"] for p in r["processes"]))


def test_a_failing_process_fails_the_run_with_its_error() -> None:
    with pytest.raises(
        RuntimeError,
        match=r"(?s)1 of 1 processes failed; first: ValidationError.*Input should be 'tiny' or 'seed'",
    ):
        run_count(1, ARGS | {"preset": "nope"}, ["device"])
