"""NUMA locality of GPU replicas: cpulist parsing, the sysfs lookup, and pinning every thread."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deploy.affinity import gpu_local_cpus, parse_cpulist, pci_address, pin_to_gpu_node
from tests.utils import gpu


def test_parse_cpulist() -> None:
    assert parse_cpulist("0-3,8,10-11\n") == [0, 1, 2, 3, 8, 10, 11]
    assert parse_cpulist("5") == [5] and parse_cpulist("") == [] and parse_cpulist("\n") == []
    with pytest.raises(ValueError, match="not a cpulist: 'a-b'"):
        parse_cpulist("a-b")


def test_no_locality_without_a_gpu() -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    assert gpu_local_cpus(0) is None and pin_to_gpu_node(0) is None


def test_pin_process_moves_every_thread() -> None:
    """Threads started before and after the call all end up on the chosen CPU."""
    allowed = sorted(os.sched_getaffinity(0))
    code = f"""
import os, threading, time
from deploy.affinity import pin_process
stop = threading.Event()
before = threading.Thread(target=stop.wait); before.start()
moved = pin_process({{{allowed[-1]}}})
after = threading.Thread(target=stop.wait); after.start()
masks = {{int(t): os.sched_getaffinity(int(t)) for t in os.listdir("/proc/self/task")}}
stop.set()
print(moved, len(masks), sorted({{c for m in masks.values() for c in m}}))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    moved, threads, cpus = r.stdout.split(" ", 2)
    assert int(moved) >= 2 and int(threads) >= 3 and cpus.strip() == f"[{allowed[-1]}]"


@gpu
def test_gpu_locality_is_a_subset_of_the_machine() -> None:
    addr = pci_address(torch.cuda.current_device())
    assert re.fullmatch(r"[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.0", addr), addr
    assert Path("/sys/bus/pci/devices", addr).exists()
    cpus = gpu_local_cpus(torch.cuda.current_device())
    if cpus is None:
        pytest.skip("this machine publishes no PCI locality for the GPU")
    assert set(cpus) <= set(range(os.cpu_count() or 1))
