"""The generation benchmark's schedules on the CPU (tiny FLUX): every arrival is answered or
refused, each schedule batches as it says (one row a pass alone; request-level batches only
requests that waited together), and the same arrivals replay through every arm."""

from __future__ import annotations

import argparse
import time

import pytest

from bench.generation import ARMS, run_arm, workload
from fa3trt.generation import FluxFamily, GenerationArgs, StepEngine
from fa3trt.serving import load_backend
from tests.models import FLUX_GEN_CONFIG

pytest.importorskip("diffusers")


def test_every_arm_answers_or_refuses_every_arrival() -> None:
    app = GenerationArgs.model_validate(
        {"transformer": {"config": FLUX_GEN_CONFIG}, "buckets": [16, 64], "max_text_tokens": 8, "max_batch_rows": 4}
    )
    family = FluxFamily(app)
    limits = family.limits()
    eng = StepEngine(family, load_backend("torch", family.spec()), app.bucket_set(), 4, clock=time.perf_counter)
    eng.warm(steps=2)
    opts = argparse.Namespace(seed=0, steps="2-4", sizes="64,128", requests=10, text=8)
    arrivals = workload(opts, limits, rate=400.0)  # all but at once: batches form
    assert [f["height"] for _, f in arrivals] == [64, 128] * 5
    again = workload(opts, limits, rate=400.0)
    assert [(t, f["steps"], f["prompt_embeds"].tobytes()) for t, f in arrivals] == [
        (t, f["steps"], f["prompt_embeds"].tobytes()) for t, f in again
    ]
    steps = sum(f["steps"] for _, f in arrivals)
    for arm in ARMS:
        r = run_arm(arm, eng, limits, arrivals, {64: 10.0, 128: 10.0})  # deadlines no one misses
        assert r["finished"] + r["refused"] == 10 and r["late"] == 0, r
        assert r["refused"] == 0 and r["throughput_rps"] > 0 and 0 < r["busy"] <= 1
        if arm == "alone":
            assert r["passes"] == steps and r["rows_per_pass"] == 1.0
        else:
            assert r["passes"] < steps  # equal sizes shared passes
        assert len(eng) == 0
