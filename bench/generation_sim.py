"""``bench.generation``'s four schedules replayed on a simulated clock at a measured card's speed:
what a change to the scheduling or the admission check does, without the card.

Reads a ``bench.generation`` result (its JSON: the card's cost model by bucket and rows, each
size's step in the loop alone, the capacity, the run's arguments) and replays the same Poisson
arrivals (``bench.generation.arrival_plan``, the same draw) at the same loads through the same
policy code as the app (``fa3trt.generation.policy.Planner``: its ``pick`` and ``admit``), the loop of
``bench.generation.run_arm`` with each pass taking the seconds of ``--truth``:

- ``synced``: the cost model as measured, every pass followed by a device sync (how the warm-up
  timed passes before it timed them back to back, and how ``run_arm`` ran them before it synced
  only when a pass finished a request): replays a run of that time, to check the replay;
- ``queued``: passes back to back, as the app's loop runs them: the cost model moved by each
  bucket's difference between its one-request pass in the loop alone and in the cost model.

The admission check reads the ``--model`` cost model: ``measured`` (the run's) or ``truth`` (the
pass times above: what a warm-up that times passes as the loop runs them measures). The figures
are a model's, printed and saved like ``bench.generation``'s (JSON + PNG) under ``--name``.

    python -m bench.generation_sim docs/benchmarks/generation_h100.json --truth synced --model measured
    python -m bench.generation_sim docs/benchmarks/generation_h100.json --truth queued --model truth
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench._common import save
from bench.generation import ARMS, arrival_plan, capacity_rps, plot, print_goals, print_row, summarize
from fa3trt.generation.policy import CostModel, Planner, Policy


@dataclass(eq=False)
class Request:
    """A request in flight on the simulated clock: what ``fa3trt.generation.policy`` reads."""

    key: tuple[Any, ...]
    bucket: int
    arrival: float
    deadline: float
    budget: float
    rows: int
    steps: int
    step: int = 0

    @property
    def remaining(self) -> int:
        return self.steps - self.step


def cost_model(seconds_by: dict[str, float], runs_as: dict[str, int] | None = None) -> CostModel:
    """A ``CostModel`` from its JSON form (``"{bucket}x{rows}": seconds``; the rows a batch ran as,
    where the run recorded them)."""
    rounded = {int(k): int(v) for k, v in (runs_as or {}).items()}
    cost = CostModel(runs_as=(lambda b: rounded.get(b, b)) if rounded else None)
    for key, s in seconds_by.items():
        bucket, rows = (int(v) for v in key.split("x"))
        cost.record(bucket, rows, s)
    return cost


def truth_model(run: dict[str, Any], truth: str) -> CostModel:
    """The seconds a pass takes in the replay (see the module docstring)."""
    measured = cost_model(run["cost_model_s"], run.get("runs_as"))
    if truth == "synced":
        return measured
    shift = {}
    for size, per_step in run["alone_s_per_step"].items():
        bucket, rows = bucket_of(run, int(size)), rows_of(run, int(size))
        shift[bucket] = per_step - measured.seconds(bucket, rows)
    queued = CostModel(runs_as=measured.runs_as)
    for (bucket, rows), s in measured.seconds_by.items():
        queued.record(bucket, rows, max(s + shift.get(bucket, 0.0), 0.25 * s))
    return queued


def bucket_of(run: dict[str, Any], size: int) -> int:
    """The size's bucket: recorded by the run, else the sizes in order over the cost model's buckets."""
    if "bucket_of_size" in run:
        return int(run["bucket_of_size"][str(size)])
    sizes = sorted(int(s) for s in run["alone_s_per_step"])
    buckets = sorted({int(k.split("x")[0]) for k in run["cost_model_s"]})
    if len(sizes) != len(buckets):
        raise ValueError(f"{len(sizes)} sizes over {len(buckets)} buckets: the run must record bucket_of_size")
    return buckets[sizes.index(size)]


def rows_of(run: dict[str, Any], size: int) -> int:
    """Rows per request of the size (2 under classifier-free guidance): recorded by the run, else 1."""
    return int(run.get("rows_of_size", {}).get(str(size), 1))


def replay(
    arm: str,
    plan: list[tuple[float, int, int]],
    run: dict[str, Any],
    truth: CostModel,
    model: CostModel,
    max_rows: int,
    slack: float,
) -> dict[str, Any]:
    """``bench.generation.run_arm``'s loop over ``plan`` on a simulated clock."""
    policy: Policy = "edf" if arm == "step-edf" else "fifo"
    per_step = {int(s): v for s, v in run["alone_s_per_step"].items()}
    active: list[Request] = []
    waiting: list[Request] = []
    done: list[tuple[float, float, float]] = []
    refused = passes = rows = nxt = 0
    now = busy = 0.0
    planner = Planner()
    while nxt < len(plan) or waiting or active:
        while nxt < len(plan) and plan[nxt][0] <= now:
            at, size, steps = plan[nxt]
            budget = slack * per_step[size] * steps
            deadline = at + budget if arm == "step-edf" else math.inf
            req = Request((size, size), bucket_of(run, size), at, deadline, budget, rows_of(run, size), steps)
            waiting.append(req)
            nxt += 1
        if arm.startswith("step"):
            admit, waiting = waiting, []
        elif not active:
            admit, waiting = (waiting[:1], waiting[1:]) if arm == "alone" else (waiting, [])
        else:
            admit = []
        for req in admit:
            if planner.admit(req, active, model, policy, max_rows, now)[1] is None:
                active.append(req)
            else:
                refused += 1
        batch = planner.pick(active, policy, max_rows, model, now)
        if not batch:
            if nxt < len(plan):
                now = max(now, plan[nxt][0])
            continue
        n = sum(r.rows for r in batch)
        seconds = truth.seconds(batch[0].bucket, n)
        now += seconds
        busy += seconds
        passes += 1
        rows += n
        for r in batch:
            r.step += 1
            if r.remaining == 0:
                active.remove(r)
                done.append((r.arrival, now, r.budget))
    return summarize(arm, len(plan), plan[0][0], done, refused, busy, passes, rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run", help="a bench.generation result (JSON)")
    p.add_argument("--truth", choices=("synced", "queued"), default="queued")
    p.add_argument("--model", choices=("measured", "truth"), default="truth")
    p.add_argument("--max-rows", type=int, default=None, help="default: the largest row count in the cost model")
    p.add_argument("--loads", default=None, help="default: the run's")
    p.add_argument("--slack", type=float, default=None, help="default: the run's")
    p.add_argument("--requests", type=int, default=None, help="default: the run's")
    p.add_argument("--sizes", default=None, help="a mix of the run's sizes (default: the run's mix)")
    p.add_argument("--seeds", type=int, default=1, help="replay this many arrival draws (seed, seed + 1, ...)")
    p.add_argument("--out", default=None, help="save JSON + PNG here")
    p.add_argument("--name", default="generation_sim")
    args = p.parse_args()

    run = json.loads(Path(args.run).read_text())
    a = run["args"]
    loads = [float(v) for v in (args.loads or a["loads"]).split(",")]
    slack = args.slack if args.slack is not None else float(a["slack"])
    requests = args.requests or int(a["requests"])
    sizes = [int(s) for s in (args.sizes or a["sizes"]).split(",")]
    capacity = capacity_rps({int(s): v for s, v in run["alone_s_per_step"].items()}, sizes, a["steps"])
    truth = truth_model(run, args.truth)
    model = truth if args.model == "truth" else truth_model(run, "synced")  # the cost model as measured
    max_rows = args.max_rows or max(int(k.split("x")[1]) for k in run["cost_model_s"])
    print(f"replay of {args.run} ({run.get('card')}): truth {args.truth}, admission model {args.model}")
    print(f"pass seconds by bucket x rows: { {k: round(v, 4) for k, v in truth.to_dict().items()} }")
    rows: list[dict[str, Any]] = []
    for seed in range(int(a["seed"]), int(a["seed"]) + args.seeds):
        for load in loads:
            plan = arrival_plan(seed, sizes, a["steps"], requests, load * capacity)
            for arm in ARMS:
                r = replay(arm, plan, run, truth, model, max_rows, slack) | {"load": load, "seed": seed}
                rows.append(r)
                print_row(r)
    merged = merge(rows) if args.seeds > 1 else rows
    if args.seeds > 1:
        print(f"over {args.seeds} draws:")
        for r in merged:
            print_row(r)
    goals = print_goals(merged)
    if args.out:
        result = {
            "card": f"simulated from {run.get('card')}",
            "replayed": args.run,
            "args": vars(args),
            "pass_s": truth.to_dict(),
            "runs": rows,
            "merged": merged,
            "goals": goals,
        }
        path = save(args.out, args.name, result)
        print("saved", path, plot(merged, Path(args.out), args.name, f"generation replayed ({args.truth})"))


def merge(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each (load, arm)'s figures over the draws: counts summed, the rest averaged."""
    out = []
    for key in sorted({(r["load"], r["arm"]) for r in rows}, key=lambda k: (k[0], ARMS.index(k[1]))):
        group = [r for r in rows if (r["load"], r["arm"]) == key]
        m: dict[str, Any] = {"load": key[0], "arm": key[1]}
        for f in ("requests", "finished", "late", "refused", "passes"):
            m[f] = sum(r[f] for r in group)
        for f in ("throughput_rps", "p50_ms", "p99_ms", "busy", "rows_per_pass"):
            m[f] = sum(r[f] for r in group) / len(group)
        m["miss_rate"] = (m["late"] + m["refused"]) / m["requests"]
        out.append(m)
    return out


if __name__ == "__main__":
    main()
