"""The load generator's loops, driven against an in-process echo coroutine (a server that
answers after a fixed delay), so their counting and timing can be checked exactly."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from bench.serve_load import all_finite, run_load


def _echo(delay: float, fail_len: int | None = None):  # type: ignore[no-untyped-def]
    in_flight = [0, 0]  # now, most at once

    async def send(x: np.ndarray) -> np.ndarray:
        in_flight[0] += 1
        in_flight[1] = max(in_flight[1], in_flight[0])
        await asyncio.sleep(delay)
        in_flight[0] -= 1
        if x.shape[0] == fail_len:
            raise RuntimeError("refused")
        return x.copy()

    return send, in_flight


def _inputs(lengths: list[int]) -> list[np.ndarray]:
    return [np.ones((n, 4), dtype=np.float16) for n in lengths]


def test_closed_loop_sends_each_input_once() -> None:
    send, in_flight = _echo(0.01, fail_len=3)
    res = asyncio.run(run_load(send, _inputs([1, 2, 3, 4] * 5), concurrency=4, progress=False))
    assert res.requests == 20 and res.errors == 5 and res.tokens == 5 * 10
    assert len(res.latencies_ms) == len(res.completions) == 15 and in_flight[1] == 4
    assert res.first_error == "RuntimeError: refused"
    assert sum(c[2] for c in res.completions) == 5 * (1 + 2 + 4)


def test_closed_loop_for_a_duration_keeps_concurrency_and_cycles_inputs() -> None:
    send, in_flight = _echo(0.02)
    t0 = time.time()
    res = asyncio.run(run_load(send, _inputs([8, 16]), concurrency=5, progress=False, duration=0.5))
    # 5 workers x ~25 round trips of 20 ms; every request sent before the deadline is answered.
    assert 60 <= res.requests <= 130 and res.errors == 0 and in_flight[1] == 5
    assert len(res.completions) == res.requests and res.tokens == sum(c[2] for c in res.completions)
    ends = [c[0] for c in res.completions]
    assert t0 < min(ends) and max(ends) <= t0 + 0.5 + 0.2 and ends == sorted(ends)
    assert {c[2] for c in res.completions} == {8, 16}


def test_open_loop_for_a_duration_stops_arrivals_at_the_deadline() -> None:
    send, _ = _echo(0.005)
    res = asyncio.run(run_load(send, _inputs([2]), mode="open", rate=200.0, progress=False, duration=0.5, seed=1))
    assert 50 <= res.requests <= 160 and res.errors == 0  # Poisson, mean 100


def test_bad_arguments() -> None:
    send, _ = _echo(0.0)
    with pytest.raises(ValueError, match="mode must be"):
        asyncio.run(run_load(send, _inputs([1]), mode="burst", progress=False))
    with pytest.raises(ValueError, match="duration must be > 0"):
        asyncio.run(run_load(send, _inputs([1]), duration=0, progress=False))
    with pytest.raises(ValueError, match="at least one input"):
        asyncio.run(run_load(send, [], progress=False))


def test_answer_checks() -> None:
    """verify="values" refuses an answer holding NaN or Inf; "shape" checks shape and dtype only."""

    async def nan_echo(x: np.ndarray) -> np.ndarray:
        y = x.copy()
        y[-1, 0] = np.nan
        return y

    async def wrong_shape(x: np.ndarray) -> np.ndarray:
        return x[:-1].copy()

    inputs = _inputs([3, 5])
    res = asyncio.run(run_load(nan_echo, inputs, concurrency=2, progress=False))
    assert res.errors == 2 and res.first_error is not None and "bad answer" in res.first_error
    res = asyncio.run(run_load(nan_echo, inputs, concurrency=2, progress=False, verify="shape"))
    assert res.errors == 0 and len(res.completions) == 2
    res = asyncio.run(run_load(wrong_shape, inputs, concurrency=2, progress=False, verify="shape"))
    assert res.errors == 2
    with pytest.raises(ValueError, match="verify must be one of"):
        asyncio.run(run_load(nan_echo, inputs, progress=False, verify="none"))


def test_stats_delta_per_batch_phases() -> None:
    from bench.serve_load import stats_delta

    before = {
        "replica": "r",
        "busy_s": 1.0,
        "buckets": {"256": {"batches": 2, "requests": 3, "tokens": 500, "computed_tokens": 512, "compute_s": 0.1}},
        "phases_s": {"assemble": 0.01, "model": 0.05, "gpu": 0.04, "answers": 0.001, "batches": 2},
    }
    after = {
        "replica": "r",
        "busy_s": 3.0,
        "buckets": {"256": {"batches": 6, "requests": 9, "tokens": 1500, "computed_tokens": 1536, "compute_s": 0.3}},
        "phases_s": {"assemble": 0.03, "model": 0.13, "gpu": 0.12, "answers": 0.005, "batches": 6},
    }
    d = stats_delta(before, after, seconds=4.0)
    assert d["busy_fraction"] == pytest.approx(0.5)
    assert d["buckets"]["256"]["mean_batch"] == pytest.approx(1.5)
    assert d["phases_ms_per_batch"] == pytest.approx({"assemble": 5.0, "model": 20.0, "gpu": 20.0, "answers": 1.0})
    assert "wake_lag" not in d  # a replica without the probe
    lag0 = {"samples": 10, "total_s": 0.01, "max_s": 0.002, "bounds_ms": [1.0, 5.0], "bins": [9, 1, 0]}
    lag1 = {"samples": 30, "total_s": 0.07, "max_s": 0.008, "bounds_ms": [1.0, 5.0], "bins": [19, 9, 2]}
    d = stats_delta({**before, "wake_lag": lag0}, {**after, "wake_lag": lag1})
    assert d["wake_lag"]["samples"] == 20 and d["wake_lag"]["mean_ms"] == pytest.approx(3.0)
    assert d["wake_lag"]["over_5ms"] == pytest.approx(0.1)
    assert stats_delta(before, {**after, "replica": "other"}) == {}


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_all_finite_finds_every_non_finite_value(dtype: type) -> None:
    y = np.random.default_rng(0).standard_normal((64, 48)).astype(dtype) * 1000
    assert all_finite(y) and all_finite(y[:0])
    for bad in (np.inf, -np.inf, np.nan):
        z = y.copy()
        z[63, 47] = bad
        assert not all_finite(z), bad
    assert all_finite(np.array([np.finfo(dtype).max, np.finfo(dtype).min, -0.0], dtype=dtype))
