"""The wake-up lag probe: its counters and windows, and that it sees a thread holding the GIL."""

from __future__ import annotations

import sys
import threading
import time

import pytest

from deploy.lag import WakeLag, lag_delta


def test_counters_and_windows() -> None:
    lag = WakeLag(start=False)
    for ms in (0.1, 0.3, 0.8, 3.0):
        lag.record(ms / 1e3)
    first = lag.snapshot()
    assert first["samples"] == 4 and first["max_s"] == pytest.approx(3e-3)
    # Bins: (0, 0.25], (0.25, 0.5], (0.5, 1], (1, 2], (2, 5], ...
    assert first["bins"][:5] == [1, 1, 1, 0, 1]
    assert lag_delta(None, first)["p99_ms_at_most"] == 5.0  # type: ignore[index]  # the 3 ms wake-up's bin: (2, 5]
    for ms in (6.0, 60.0, -1.0):  # an early wake-up counts as on time
        lag.record(ms / 1e3)
    d = lag_delta(first, lag.snapshot())
    assert d is not None and d["samples"] == 3
    assert d["mean_ms"] == pytest.approx((6.0 + 60.0 + 0.0) / 3)
    assert d["over_1ms"] == pytest.approx(2 / 3) and d["over_5ms"] == pytest.approx(2 / 3)
    assert d["p99_ms_at_most"] is None  # 60 ms lies in the open bin, past 50 ms
    whole = lag_delta(None, lag.snapshot())
    assert whole is not None and whole["samples"] == 7 and whole["p99_ms_at_most"] is None
    assert lag_delta(lag.snapshot(), lag.snapshot()) is None
    with pytest.raises(ValueError, match="period_s=0"):
        WakeLag(period_s=0, start=False)


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    n = 0
    while time.perf_counter() < end:  # pure Python: holds the GIL until the switch interval forces a hand-off
        n += 1


def test_sees_a_thread_that_holds_the_gil() -> None:
    lag = WakeLag(period_s=0.002)
    old = sys.getswitchinterval()
    try:
        time.sleep(0.3)
        idle = lag.snapshot()
        time.sleep(0.3)
        quiet = lag_delta(idle, lag.snapshot())
        # A thread running Python keeps the GIL for a whole switch interval (here 20 ms) each time
        # the probe asks for it back: every wake-up waits for it.
        sys.setswitchinterval(0.02)
        before = lag.snapshot()
        spinner = threading.Thread(target=_spin, args=(0.6,))
        spinner.start()
        spinner.join()
        busy = lag_delta(before, lag.snapshot())
    finally:
        sys.setswitchinterval(old)
        lag.stop()
    assert quiet is not None and busy is not None
    assert busy["mean_ms"] > 5.0, (quiet, busy)
    assert busy["mean_ms"] > 3 * quiet["mean_ms"], (quiet, busy)
    assert busy["over_5ms"] > 0.5, busy
