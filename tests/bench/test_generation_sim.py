"""``bench.generation_sim``: the generation benchmark's loop on a simulated clock, through the
app's policy code. Checked against hand-computed schedules and the admission check's promise
(with the pass times it reads, EDF answers no admitted request late)."""

from __future__ import annotations

import numpy as np
import pytest

from bench.generation import arrival_plan
from bench.generation_sim import cost_model, replay, truth_model

RUN = {
    "card": "a card",
    "args": {"sizes": "16,32", "steps": "2-4", "requests": 40, "loads": "0.8", "slack": 3.0, "seed": 0},
    # bucket 0 (16 px): 1 row 1.0 s, 4 rows 2.5 s; bucket 1 (32 px): 2.0 s, 4 rows 6.0 s
    "cost_model_s": {"0x1": 1.0, "0x4": 2.5, "1x1": 2.0, "1x4": 6.0},
    "alone_s_per_step": {"16": 0.5, "32": 2.5},
    "bucket_of_size": {"16": 0, "32": 1},
    "capacity_rps": 0.5,
}


def test_the_replay_runs_each_arms_schedule_on_the_pass_times() -> None:
    truth = cost_model(RUN["cost_model_s"])
    # at 0: a 32 px request of 2 steps and a 16 px one of 3; at 1: a 16 px one of 2 steps
    plan = [(0.0, 32, 2), (0.0, 16, 3), (1.0, 16, 2)]
    alone = replay("alone", plan, RUN, truth, truth, 4, 3.0)
    # one at a time in arrival order: 2 x 2.0 -> 4; 3 x 1.0 -> 7; 2 x 1.0 -> 9 (arrived at 1)
    assert alone["passes"] == 7 and alone["rows_per_pass"] == 1.0
    assert alone["p50_ms"] == pytest.approx(7000.0)
    assert alone["throughput_rps"] == pytest.approx(3 / 9.0)
    assert alone["busy"] == pytest.approx(1.0)
    fifo = replay("step-fifo", plan, RUN, truth, truth, 4, 3.0)
    # the 32 px one first (2 passes: 0 -> 4); then both 16 px ones together (2 rows: 1.5 s a pass)
    # for 2 passes (-> 7), the 3-step one alone for its last (-> 8)
    lat = sorted([4.0, 8.0, 7.0 - 1.0])
    assert fifo["passes"] == 5 and fifo["p50_ms"] == pytest.approx(np.percentile(lat, 50) * 1e3)
    assert fifo["throughput_rps"] == pytest.approx(3 / 8.0)
    # request-level: the two waiting at 0 run together by size; the third waits for both to end
    request = replay("request", plan, RUN, truth, truth, 4, 3.0)
    assert request["passes"] == 2 + 3 + 2
    # deadlines 3 x the step alone: the 32 px one 15 s, the 16 px ones 4.5 and 3 s. EDF runs the
    # 16 px ones first; the one due at 4 (arrived at 1, due at 1 + 3) is admitted
    edf = replay("step-edf", plan, RUN, truth, truth, 4, 3.0)
    assert edf["late"] == 0 and edf["refused"] == 0 and edf["finished"] == 3


def test_edf_answers_no_admitted_request_late_when_its_model_is_the_truth() -> None:
    truth = truth_model(RUN, "queued")
    for seed in range(3):
        plan = arrival_plan(seed, [16, 32], "2-4", 40, 1.2 * RUN["capacity_rps"])
        for arm in ("alone", "request", "step-fifo", "step-edf"):
            r = replay(arm, plan, RUN, truth, truth, 4, 3.0)
            assert r["finished"] + r["refused"] == 40, r
            if arm == "step-edf":
                assert r["late"] == 0 and r["refused"] > 0, r  # overloaded: it refuses rather than answer late
            else:
                assert r["refused"] == 0, r


def test_queued_pass_times_take_each_buckets_step_alone() -> None:
    queued = truth_model(RUN, "queued")
    # bucket 0: alone 0.5 s against 1.0 measured -> every row count 0.5 s faster (1 row 0.5, 4 rows 2.0)
    assert queued.seconds(0, 1) == pytest.approx(0.5) and queued.seconds(0, 4) == pytest.approx(2.0)
    assert queued.seconds(1, 1) == pytest.approx(2.5) and queued.seconds(1, 4) == pytest.approx(6.5)
    assert truth_model(RUN, "synced").seconds(0, 1) == 1.0
