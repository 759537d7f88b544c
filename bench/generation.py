"""Generation on the server: step-level batching with deadlines against a loop per request and
request-level batching, on one card, in one run.

Reads a generation app config (default ``examples/generate_flux_gpu.yaml``: FLUX.1's transformer
at its real width, 2 + 4 blocks, bf16, random weights), measures each size's loop alone, and
replays the same Poisson arrivals of a mix of sizes at ``--loads`` of the measured capacity (the
alone loop's requests/s over the mix) through four schedules of one ``StepEngine`` (one pass
code, one backend):

- ``alone``: each request's whole loop by itself, in arrival order (a Serve deployment around a
  diffusers pipeline);
- ``request``: request-level batching: the requests waiting when the device frees run all their
  steps together (grouped by size), new ones wait for the batch to end;
- ``step-fifo``: step-level batching, requests join and leave at any step, arrival order;
- ``step-edf``: the same, earliest deadline first with the admission check (what the app runs).

A request's deadline is ``--slack`` times its size's loop alone. Passes are queued as the app
queues them (the engine keeps the host one pass ahead of the device), never waited for: a
finished request ends when its last pass ends on the device (a CUDA event; the app copies its
answer out on another thread); the busy fraction is the passes' device time (CUDA events). Reports throughput, p50/p99 latency, deadline misses (answered
late, and refused at admission), the device's busy fraction and the rows per pass; the goals are
printed as ratios against ``alone`` and ``request`` measured in this process.

    python -m bench.generation --out docs/benchmarks                       # GPU, FLUX width
    python -m bench.generation --config examples/generate_flux.yaml --device cpu --sizes 64,128 \\
        --steps 4-6 --requests 12 --loads 0.5,1.0                         # the script itself, on a CPU
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from bench._common import pyplot, save, save_figure
from fa3trt.errors import DeadlineError
from fa3trt.generation import GenerationArgs, StepEngine, family_for, parse_request
from fa3trt.generation.engine import Generation
from fa3trt.serving import load_backend

ARMS = ("alone", "request", "step-fifo", "step-edf")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _event(device: torch.device) -> torch.cuda.Event:
    """A timing event recorded on the (CUDA) device's current stream."""
    event = torch.cuda.Event(enable_timing=True)
    event.record(torch.cuda.current_stream(device))
    return event


def make_fields(limits: Any, size: int, steps: int, seed: int, text: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    fields = {
        "prompt_embeds": rng.standard_normal((text, limits.text_dim)).astype(np.float32),
        "pooled_prompt_embeds": rng.standard_normal(limits.pooled_dim).astype(np.float32),
        "height": size,
        "width": size,
        "steps": steps,
        "seed": seed,
    }
    if limits.guidance_negative:  # classifier-free guidance (SD3): an empty negative prompt, two rows a step
        fields["negative_prompt_embeds"] = np.zeros((text, limits.text_dim), np.float32)
        fields["negative_pooled_prompt_embeds"] = np.zeros(limits.pooled_dim, np.float32)
    return fields


def arrival_plan(seed: int, sizes: list[int], steps: str, requests: int, rate: float) -> list[tuple[float, int, int]]:
    """Poisson arrivals at ``rate`` per second: (seconds from the start, size, steps) per request,
    the sizes in turn and the steps uniform in ``steps`` ("lo-hi"). The same draw for every arm,
    and for ``bench.generation_sim``'s replay of a run."""
    rng = np.random.default_rng(seed)
    lo, hi = (int(v) for v in steps.split("-"))
    t, out = 0.0, []
    for i in range(requests):
        t += float(rng.exponential(1.0 / rate))
        out.append((t, sizes[i % len(sizes)], int(rng.integers(lo, hi + 1))))
    return out


def workload(args: argparse.Namespace, limits: Any, rate: float) -> list[tuple[float, dict[str, Any]]]:
    """``arrival_plan``'s requests as request fields (random prompt embeddings of ``--text`` tokens)."""
    sizes = [int(s) for s in args.sizes.split(",")]
    plan = arrival_plan(args.seed, sizes, args.steps, args.requests, rate)
    return [(t, make_fields(limits, size, steps, i, args.text)) for i, (t, size, steps) in enumerate(plan)]


def capacity_rps(per_step: dict[int, float], sizes: list[int], steps: str) -> float:
    """Requests/s of the loop alone over the size mix: each size's step alone times the mean of
    ``steps`` ("lo-hi"), averaged over the sizes."""
    lo, hi = (int(v) for v in steps.split("-"))
    return 1.0 / float(np.mean([per_step[s] * (lo + hi) / 2 for s in sizes]))


def summarize(
    arm: str,
    n: int,
    start: float,
    done: list[tuple[float, float, float]],
    refused: int,
    busy: float,
    passes: int,
    rows: int,
) -> dict[str, Any]:
    """One arm's figures from its finished requests (arrival, end, deadline budget; seconds from
    the start), out of ``n`` sent, the first at ``start``."""
    span = max(end for _, end, _ in done) - start if done else 0.0
    lat = np.array([end - at for at, end, _ in done]) * 1e3
    late = sum(1 for at, end, budget in done if end - at > budget)
    return {
        "arm": arm,
        "requests": n,
        "finished": len(done),
        "throughput_rps": len(done) / span if span else 0.0,
        "p50_ms": float(np.percentile(lat, 50)) if len(lat) else math.nan,
        "p99_ms": float(np.percentile(lat, 99)) if len(lat) else math.nan,
        "late": late,
        "refused": refused,
        "miss_rate": (late + refused) / n,
        "busy": busy / span if span else 0.0,
        "rows_per_pass": rows / passes if passes else 0.0,
        "passes": passes,
    }


def run_arm(
    arm: str, eng: StepEngine, limits: Any, arrivals: list[tuple[float, dict[str, Any]]], deadline_of: dict[int, float]
) -> dict[str, Any]:
    """Replays ``arrivals`` (seconds from the start, fields) through ``eng`` under ``arm``'s schedule."""
    eng.policy = "edf" if arm == "step-edf" else "fifo"
    device = eng.backend.device
    waiting: list[Generation] = []
    arrival_of: dict[int, float] = {}
    done: list[tuple[Generation, float]] = []
    refused = passes = rows = 0
    busy = 0.0
    timed: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
    ended: list[tuple[Generation, torch.cuda.Event]] = []  # a finishing pass's end on the device
    nxt = 0
    _sync(device)
    start = _event(device) if device.type == "cuda" else None
    t0 = time.perf_counter()
    while nxt < len(arrivals) or waiting or len(eng):
        now = time.perf_counter() - t0
        while nxt < len(arrivals) and arrivals[nxt][0] <= now:
            at, fields = arrivals[nxt]
            req = parse_request(fields, limits)
            gen = eng.new(req)
            budget = deadline_of[fields["height"]] * fields["steps"]
            arrival_of[gen.id] = at
            gen.arrival = t0 + at  # the engine's clock is time.perf_counter
            if arm == "step-edf":  # its deadline counts for the order and the admission check
                gen.deadline = gen.arrival + budget
            gen.budget = budget  # type: ignore[attr-defined]
            waiting.append(gen)
            nxt += 1
        if arm.startswith("step"):
            admit, waiting = waiting, []
        elif not len(eng):
            admit, waiting = (waiting[:1], waiting[1:]) if arm == "alone" else (waiting, [])
        else:
            admit = []
        for gen in admit:
            try:
                eng.admit(gen)
            except DeadlineError:
                refused += 1
        batch = eng.pick()
        if not batch:
            if nxt < len(arrivals):
                time.sleep(max(0.0, arrivals[nxt][0] - (time.perf_counter() - t0)))
            continue
        s = time.perf_counter()
        begin = _event(device) if device.type == "cuda" else None
        finished = eng.step(batch)  # queued: the engine keeps the host one pass ahead of the device
        if begin is not None:
            timed.append((begin, _event(device)))
            # Each finished request ends when its last pass does on the device (the app copies
            # its answer out on another thread; the loop does not wait for it).
            ended.extend((g, timed[-1][1]) for g in finished)
        else:
            busy += time.perf_counter() - s
            done.extend((g, time.perf_counter() - t0) for g in finished)
        passes += 1
        rows += sum(g.rows for g in batch)
    _sync(device)
    busy += sum(a.elapsed_time(b) for a, b in timed) / 1e3  # each pass's time on the device
    if start is not None:
        done.extend((g, start.elapsed_time(event) / 1e3) for g, event in ended)
    ends = [(arrival_of[g.id], end, g.budget) for g, end in done]  # type: ignore[attr-defined]
    return summarize(arm, len(arrivals), arrivals[0][0], ends, refused, busy, passes, rows)


def alone_step_seconds(eng: StepEngine, limits: Any, sizes: list[int], steps: int, text: int) -> dict[int, float]:
    """Seconds per step of each size's loop alone (after one untimed loop of it)."""
    out = {}
    for size in sizes:
        for timed in (False, True):
            gen = eng.new(parse_request(make_fields(limits, size, steps, 0, text), limits))
            eng.admit(gen)
            s = time.perf_counter()
            while len(eng):
                eng.step(eng.pick())
            _sync(eng.backend.device)
            if timed:
                out[size] = (time.perf_counter() - s) / steps
    return out


def print_goals(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """The issue's goals per load as ratios of ``step-edf`` against ``alone`` and ``request``, and
    of ``step-fifo`` (step-level batching of requests without deadlines: the app runs those in
    arrival order, with no admission check), printed and returned."""
    goals = {}
    for load in sorted({r["load"] for r in rows}):
        by = {r["arm"]: r for r in rows if r["load"] == load}
        if {"alone", "request", "step-edf"} <= set(by):
            goals[f"{load:g}"] = {
                "throughput_vs_alone": by["step-edf"]["throughput_rps"] / by["alone"]["throughput_rps"],
                "throughput_vs_request": by["step-edf"]["throughput_rps"] / by["request"]["throughput_rps"],
                # step-level batching of requests without deadlines (the app orders those by arrival)
                "fifo_throughput_vs_alone": by.get("step-fifo", {}).get("throughput_rps", math.nan)
                / by["alone"]["throughput_rps"],
                "fifo_throughput_vs_request": by.get("step-fifo", {}).get("throughput_rps", math.nan)
                / by["request"]["throughput_rps"],
                "p99_vs_alone": by["step-edf"]["p99_ms"] / by["alone"]["p99_ms"],
                "edf_miss_rate": by["step-edf"]["miss_rate"],
                "fifo_miss_rate": by.get("step-fifo", {}).get("miss_rate"),
            }
            print(
                f"load {load:g}: " + ", ".join(f"{k} {v:.3g}" for k, v in goals[f"{load:g}"].items() if v is not None)
            )
    return goals


def print_row(r: dict[str, Any]) -> None:
    print(
        f"load {r['load']:.1f} {r['arm']:9s} {r['throughput_rps']:7.2f} req/s  p50 {r['p50_ms']:8.1f} ms  "
        f"p99 {r['p99_ms']:8.1f} ms  late {r['late']:3d}  refused {r['refused']:3d}  "
        f"busy {r['busy']:.2f}  rows/pass {r['rows_per_pass']:.2f}"
    )


def plot(rows: list[dict[str, Any]], out: Path, name: str, title: str) -> Path:
    fig, axes = pyplot().subplots(1, 4, figsize=(16, 3.6))
    panels = (("throughput_rps", "requests/s"), ("p99_ms", "p99 latency (ms)"), ("miss_rate", "deadline misses"))
    for ax, (key, label) in zip(axes, (*panels, ("rows_per_pass", "rows per pass"))):
        for arm in ARMS:
            pts = sorted((r["load"], r[key]) for r in rows if r["arm"] == arm)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=arm)
        ax.set_xlabel("load (of the alone loop's capacity)")
        ax.set_ylabel(label)
    axes[0].legend(fontsize=8)
    return save_figure(fig, out, name, title)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="examples/generate_flux_gpu.yaml")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sizes", default="512,768,1024", help="square image sizes in pixels, the mix in turn")
    p.add_argument("--steps", default="20-28", help="steps per request, uniform in lo-hi")
    p.add_argument("--text", type=int, default=512, help="text tokens per request")
    p.add_argument("--requests", type=int, default=60, help="requests per arm and load")
    p.add_argument("--loads", default="0.5,0.8,1.0", help="arrival rates as fractions of the alone loop's capacity")
    p.add_argument("--slack", type=float, default=3.0, help="a request's deadline: this times its loop alone")
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="docs/benchmarks")
    p.add_argument("--name", default="generation")
    args = p.parse_args()

    doc = yaml.safe_load(Path(args.config).read_text())["applications"][0]["args"]
    app = GenerationArgs.model_validate(doc | {"backend": "torch"})
    family = family_for(app)
    limits = family.limits()
    backend = load_backend("torch", family.spec(), device=args.device, cuda_graphs=app.cuda_graphs, compile=app.compile)
    eng = StepEngine(family, backend, app.bucket_set(), app.max_batch_rows, clock=time.perf_counter)
    cost = eng.warm()
    sizes = [int(s) for s in args.sizes.split(",")]
    lo = int(args.steps.split("-")[0])
    per_step = alone_step_seconds(eng, limits, sizes, lo, args.text)
    capacity = capacity_rps(per_step, sizes, args.steps)
    deadline_of = {s: args.slack * per_step[s] for s in sizes}  # seconds per step of the budget
    print(f"card: {backend.describe().get('device_name')}; alone s/step {per_step}; capacity {capacity:.2f} req/s")
    rows: list[dict[str, Any]] = []
    for load in (float(v) for v in args.loads.split(",")):
        arrivals = workload(args, limits, load * capacity)
        for arm in args.arms.split(","):
            r = run_arm(arm, eng, limits, arrivals, deadline_of) | {"load": load}
            rows.append(r)
            print_row(r)
    goals = print_goals(rows)
    result = {
        "config": args.config,
        "device": args.device,
        "args": vars(args),
        "cost_model_s": cost.to_dict(),
        "alone_s_per_step": {str(k): v for k, v in per_step.items()},
        "bucket_of_size": {str(s): eng.buckets.index(family.tokens(s, s)) for s in sizes},
        "rows_of_size": {str(s): eng.new(parse_request(make_fields(limits, s, lo, 0, 1), limits)).rows for s in sizes},
        "capacity_rps": capacity,
        "runs_as": {str(r): backend.batch_rows(r) for r in range(1, app.max_batch_rows + 1)},
        "runs": rows,
        "goals": goals,
    }
    print(
        "saved", save(args.out, args.name, result), plot(rows, Path(args.out), args.name, f"generation ({args.config})")
    )


if __name__ == "__main__":
    main()
