"""Shared pieces of the benchmark scripts: device timing, the card's name, JSON + PNG output."""

from __future__ import annotations

import json
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fa3trt.timing import time_cuda_ms  # noqa: E402  (re-exported for the benchmarks)


def card() -> str:
    if not torch.cuda.is_available():
        return f"cpu ({platform.processor() or platform.machine()})"
    return torch.cuda.get_device_name()


def cpu_times() -> list[int] | None:
    """The host's CPU time so far (/proc/stat's first line, in clock ticks: user, nice, system,
    idle, iowait, irq, softirq, steal); None where there is no /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    return [int(x) for x in fields[1:9]] + [0] * max(0, 9 - len(fields))


def cpu_shares(before: list[int] | None, after: list[int] | None) -> dict[str, float] | None:
    """How the host's CPUs spent the time between two ``cpu_times()``: the shares busy (user,
    nice, system, irq, softirq), idle (idle, iowait) and stolen by the hypervisor ("steal": a
    virtual machine's CPU ready to run but not running), summing to 1. None without both."""
    if before is None or after is None:
        return None
    d = [a - b for a, b in zip(after, before)]
    total = sum(d)
    if total <= 0:
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = d[:8]
    return {
        "busy": (user + nice + system + irq + softirq) / total,
        "idle": (idle + iowait) / total,
        "steal": steal / total,
    }


class GpuSampler:
    """Every GPU as nvidia-smi sees it, sampled every ``interval_ms`` from ``start()`` to
    ``stop()``: per GPU index the mean SM clock (MHz), power (W) and utilization (percent of
    the time a kernel ran). Empty where nvidia-smi is missing (a CPU machine)."""

    QUERY = "index,clocks.sm,power.draw,utilization.gpu"

    def __init__(self, interval_ms: int = 500) -> None:
        self.interval_ms = interval_ms
        self._proc: subprocess.Popen[str] | None = None

    def start(self) -> GpuSampler:
        if shutil.which("nvidia-smi"):
            self._proc = subprocess.Popen(
                [
                    "nvidia-smi",
                    f"--query-gpu={self.QUERY}",
                    "--format=csv,noheader,nounits",
                    "-lms",
                    str(self.interval_ms),
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
        return self

    def stop(self) -> dict[int, dict[str, float]]:
        if self._proc is None:
            return {}
        self._proc.terminate()
        out, _ = self._proc.communicate()
        self._proc = None
        return self.parse(out)

    @staticmethod
    def parse(text: str) -> dict[int, dict[str, float]]:
        """Per GPU index the means of nvidia-smi's ``QUERY`` lines; lines it could not measure
        ("[N/A]") or cut short are skipped."""
        per: dict[int, list[tuple[float, float, float]]] = {}
        for line in text.splitlines():
            try:
                i, mhz, watts, util = (p.strip() for p in line.split(","))
                per.setdefault(int(i), []).append((float(mhz), float(watts), float(util)))
            except ValueError:
                continue
        return {
            i: {
                "sm_mhz": statistics.mean(v[0] for v in rows),
                "power_w": statistics.mean(v[1] for v in rows),
                "util_pct": statistics.mean(v[2] for v in rows),
            }
            for i, rows in per.items()
        }


def time_host_ms(fn: Callable[[], Any], *, warmup: int = 1, iters: int = 5) -> float:
    """Median wall time of ``fn`` (CPU work, or GPU work that synchronizes itself)."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def gemm_tflops(n: int = 8192, dtype: torch.dtype = torch.bfloat16) -> float:
    """The card's measured dense matrix-product rate on random data (the MFU denominator)."""
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    ms = time_cuda_ms(lambda: a @ b, warmup=5, iters=20)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def host_us(fn: Callable[[], Any], iters: int, warmup: int = 0) -> float:
    """Host µs per call of ``fn``, not waiting for the GPU inside the loop (after ``warmup``
    calls); at shapes the GPU finishes faster than the host issues them, the host's cost."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / iters * 1e6


def save(out_dir: str | Path, name: str, result: dict[str, Any]) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "card": card(),
        "torch": torch.__version__,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **result,
    }
    path = out / f"{name}.json"
    path.write_text(json.dumps(result, indent=1, sort_keys=True))
    return path


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (no display on the machines the benchmarks run on)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, out_dir: str | Path, name: str, title: str, dpi: int = 110) -> Path:
    """Title, lay out, write ``out_dir/name.png`` and close ``fig``."""
    import matplotlib.pyplot as plt

    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(out_dir) / f"{name}.png"
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def bar_plot(
    out_dir: str | Path,
    name: str,
    labels: list[str],
    values: list[float],
    ylabel: str,
    title: str,
    goal: float | None = None,
) -> Path:
    fig, ax = pyplot().subplots(figsize=(max(6, 0.7 * len(labels)), 4))
    ax.bar(range(len(values)), values, color="#4c72b0")
    ax.set_xticks(range(len(labels)), labels, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    if goal is not None:
        ax.axhline(goal, color="#c44e52", linestyle="--", linewidth=1)
    for i, v in enumerate(values):
        ax.text(i, v, f"{v:.0f}", ha="center", va="bottom", fontsize=7)
    return save_figure(fig, out_dir, name, title, dpi=120)
