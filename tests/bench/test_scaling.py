"""The scale-out benchmark's arithmetic: merging the load clients' results, efficiency against
the smallest replica count, and per-replica counters from two stats readings; its arguments;
merging the result files of separate runs; and whole runs with echo replicas on the CPU, one
cluster for every count or a fresh one for each."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from bench._common import GpuSampler, cpu_shares, cpu_times
from bench.scaling import busiest_mean, efficiency, merge, merge_runs, per_replica


def test_merge_counts_only_the_common_window() -> None:
    # Client a: one answer a second from t=100.5 to 111.5; client b from 101.5 to 112.5, with errors.
    a = {
        "start": 100.0,
        "end": 112.0,
        "requests": 12,
        "errors": 0,
        "first_error": None,
        "completions": [(100.5 + i, 10.0, 100) for i in range(12)],
    }
    b = {
        "start": 101.0,
        "end": 113.0,
        "requests": 14,
        "errors": 2,
        "first_error": "ValueError: x",
        "completions": [(101.5 + i, 30.0, 200) for i in range(12)],
    }
    m = merge([a, b], window=(102.0, 110.0))
    # Inside [102, 110]: a's answers at 102.5 ... 109.5 (8), b's at 102.5 ... 109.5 (8).
    assert m["requests"] == 16 and m["seconds"] == pytest.approx(8.0)
    assert m["rps"] == pytest.approx(2.0) and m["tokens_per_s"] == pytest.approx((8 * 100 + 8 * 200) / 8)
    lat = np.array([10.0] * 8 + [30.0] * 8)
    assert m["p50_ms"] == pytest.approx(np.percentile(lat, 50)) and m["p99_ms"] == pytest.approx(np.percentile(lat, 99))
    assert m["errors"] == 2 and m["sent"] == 26 and m["clients"] == 2 and m["first_error"] == "ValueError: x"
    assert m["span_s"] == pytest.approx(13.0)
    with pytest.raises(ValueError, match="empty measurement window"):
        merge([a], window=(5.0, 5.0))


def test_efficiency_against_the_smallest_count() -> None:
    eff = efficiency({1: {"rps": 100.0}, 2: {"rps": 180.0}, 4: {"rps": 360.0}})
    assert eff == pytest.approx({1: 1.0, 2: 0.9, 4: 0.9})
    # Without a 1-replica run, the smallest count's per-replica rate is the baseline.
    assert efficiency({2: {"rps": 200.0}, 4: {"rps": 300.0}}) == pytest.approx({2: 1.0, 4: 0.75})


def test_gpu_samples_and_the_replicas_gpus() -> None:
    text = (
        "0, 1980, 250.5, 40\n1, 1980, 120.0, 0\n0, 1965, 249.5, 50\n1, [N/A], 118.0, 0\n0, 19"  # cut short at the end
    )
    g = GpuSampler.parse(text)
    assert g[0] == pytest.approx({"sm_mhz": 1972.5, "power_w": 250.0, "util_pct": 45.0})
    assert g[1] == pytest.approx({"sm_mhz": 1980.0, "power_w": 120.0, "util_pct": 0.0})
    # One replica per GPU: the replicas' GPUs are the busiest ones.
    assert busiest_mean([45.0, 0.0, 30.0, 5.0], 2) == pytest.approx(37.5)
    assert busiest_mean([], 2) is None


def test_host_cpu_shares() -> None:
    # user, nice, system, idle, iowait, irq, softirq, steal (clock ticks)
    before = [100, 0, 50, 800, 10, 0, 0, 40]
    after = [400, 0, 150, 1100, 10, 50, 50, 240]  # 300 + 100 + 50 + 50 busy, 300 idle, 200 stolen
    assert cpu_shares(before, after) == pytest.approx({"busy": 0.5, "idle": 0.3, "steal": 0.2})
    assert cpu_shares(None, after) is None and cpu_shares(after, after) is None
    now = cpu_times()
    if Path("/proc/stat").exists():
        assert now is not None and len(now) == 8 and all(x >= 0 for x in now)


def _stats(rid: str, busy: float, **buckets: tuple[int, int, float]) -> dict[str, object]:
    return {
        "replica": rid,
        "busy_s": busy,
        "buckets": {
            e: {"batches": b, "requests": r, "tokens": 10 * r, "computed_tokens": 12 * r, "compute_s": c}
            for e, (b, r, c) in buckets.items()
        },
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


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--app-json", "{nope"], "is not JSON"),
        (["--app-json", "[1, 2]"], "must be a JSON object"),
        (["--clients-per-replica", "0"], "--clients-per-replica 0 must be between 1 and"),
        (
            ["--clients-per-replica", "5", "--concurrency-per-replica", "4"],
            "--clients-per-replica 5 must be between 1 and",
        ),
        (
            ["--fresh-cluster", "--address", "auto"],
            "--fresh-cluster starts a cluster for each count: give --address local",
        ),
    ],
)
def test_arguments_are_checked_before_anything_starts(argv: list[str], message: str) -> None:
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "bench.scaling", *argv], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and message in r.stderr


def test_noop_run_end_to_end_on_the_cpu(tmp_path: Path) -> None:
    """The whole benchmark on a local cluster with echo replicas: two clients share the
    replica's concurrency and start together, every answer is checked, and the result file
    holds the count's throughput."""
    import json
    import subprocess
    import sys

    cmd = [
        sys.executable,
        "-m",
        "bench.scaling",
        "--address",
        "local",
        "--replicas",
        "1",
        "--noop",
        "--preset",
        "tiny",
        "--duration",
        "4",
        "--warmup",
        "1",
        "--ramp",
        "1",
        "--concurrency-per-replica",
        "4",
        "--clients-per-replica",
        "2",
        "--out",
        str(tmp_path),
        "--name",
        "noop",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads((tmp_path / "noop.json").read_text())
    one = result["results"]["1"]
    assert one["errors"] == 0 and one["rps"] > 0 and one["replicas"] == [] and one["clients"] == 2
    if shutil.which("nvidia-smi") is None:  # a CPU machine: nothing to sample
        assert one["gpus"] == {} and one["gpu_util_pct"] is None
    assert result["summary"]["efficiency"] == {"1": 1.0}
    if Path("/proc/stat").exists():  # the host's CPUs over the pass, shares of the time
        assert sum(one["host_cpu"].values()) == pytest.approx(1.0) and one["host_cpu"]["busy"] > 0


def _run_file(path: Path, card: str, rps: dict[int, float]) -> str:
    import json

    args = {
        "noop": False,
        "preset": "seed",
        "layers": 2,
        "mix": "256-2048",
        "concurrency_per_replica": 48,
        "clients_per_replica": 1,
        "goal": 0.9,
        "fresh_cluster": False,
    }
    results = {str(n): {"rps": v, "p50_ms": 1.0, "p99_ms": 2.0, "gpu_util_pct": None} for n, v in rps.items()}
    path.write_text(json.dumps({"card": card, "args": args, "gpus": 4, "host": {"cpus": 64}, "results": results}))
    return str(path)


def test_merge_runs_of_one_count_each(tmp_path: Path) -> None:
    import json

    from bench.scaling import report

    files = [_run_file(tmp_path / f"r{n}.json", "NVIDIA H200", {n: v}) for n, v in ((4, 900.0), (1, 250.0), (2, 490.0))]
    merged = merge_runs(files)
    assert not isinstance(merged, str)
    assert (
        list(merged["results"]) == [1, 2, 4]
        and merged["card_name"] == "NVIDIA H200"
        and merged["args"]["merged"] == files
    )
    report(str(tmp_path), "merged", **merged)
    saved = json.loads((tmp_path / "merged.json").read_text())
    assert saved["card"] == "NVIDIA H200"  # the runs' card, not this machine's
    assert saved["summary"]["efficiency"] == pytest.approx({"1": 1.0, "2": 0.98, "4": 0.9})
    assert (tmp_path / "merged.png").is_file()
    # A count given twice, or runs of different cards, are refused.
    again = _run_file(tmp_path / "again.json", "NVIDIA H200", {2: 480.0})
    assert "has a result for 2 replica(s) that an earlier file has too" in str(merge_runs(files + [again]))
    other = _run_file(tmp_path / "other.json", "NVIDIA H100 80GB HBM3", {8: 1800.0})
    assert "different cards" in str(merge_runs(files + [other]))


def test_noop_run_on_a_fresh_cluster_per_count(tmp_path: Path) -> None:
    """--fresh-cluster: each count on a local cluster started for it; both counts answered."""
    import json
    import subprocess
    import sys

    cmd = [
        sys.executable,
        "-m",
        "bench.scaling",
        "--address",
        "local",
        "--fresh-cluster",
        "--replicas",
        "1,2",
        "--noop",
        "--preset",
        "tiny",
        "--duration",
        "3",
        "--warmup",
        "1",
        "--ramp",
        "1",
        "--concurrency-per-replica",
        "2",
        "--out",
        str(tmp_path),
        "--name",
        "fresh",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("cluster: 0 GPUs") == 2 and "a fresh cluster per count" in r.stdout
    result = json.loads((tmp_path / "fresh.json").read_text())
    assert sorted(result["results"]) == ["1", "2"] and result["args"]["fresh_cluster"] is True
    assert all(v["errors"] == 0 and v["rps"] > 0 for v in result["results"].values())
