"""Keep a GPU replica's threads on the CPUs of its GPU's NUMA node.

Every request and answer crosses host memory twice (the staging copy, the DMA) and a batch's
copies run on the replica's threads. On a multi-socket host a replica that Ray's scheduler left
on the far socket copies across the inter-socket link, and its page-locked buffers land in the
far node's memory. Linux publishes which CPUs sit next to each PCI device
(``/sys/bus/pci/devices/<address>/local_cpulist``); the replica moves all its threads there
(within the CPUs it may use at all) before it allocates anything, so later allocations are
first-touched on that node.
"""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path

import torch

__all__ = ["parse_cpulist", "pci_address", "gpu_local_cpus", "pin_process", "pin_to_gpu_node"]

log = logging.getLogger("ray.serve")


def parse_cpulist(text: str) -> list[int]:
    """CPUs of a Linux cpulist such as ``0-15,32-47`` (``""`` is no CPU)."""
    cpus: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        try:
            cpus.extend(range(int(lo), int(hi or lo) + 1))
        except ValueError:
            raise ValueError(f"not a cpulist: {text!r} (expected e.g. 0-15,32-47)") from None
    return cpus


def pci_address(device: torch.device | int = 0) -> str:
    """The sysfs PCI address (``0000:18:00.0``) of a CUDA device: from torch's device
    properties where they carry PCI ids, else from ``nvidia-smi`` by the device's UUID."""
    p = torch.cuda.get_device_properties(device)
    ids = [getattr(p, n, None) for n in ("pci_domain_id", "pci_bus_id", "pci_device_id")]
    if all(isinstance(i, int) for i in ids):
        return f"{ids[0]:04x}:{ids[1]:02x}:{ids[2]:02x}.0"
    uuid = str(p.uuid)
    rows = subprocess.run(
        ["nvidia-smi", "--query-gpu=uuid,pci.bus_id", "--format=csv,noheader"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    for row in rows.splitlines():
        gpu_uuid, _, bus_id = (f.strip() for f in row.partition(","))
        if uuid and gpu_uuid.endswith(uuid):
            domain, _, rest = bus_id.lower().partition(":")  # 00000000:18:00.0: sysfs has 4 domain digits
            return f"{domain[-4:]}:{rest}"
    raise RuntimeError(f"nvidia-smi lists no GPU with UUID {uuid}")


def gpu_local_cpus(
    device: torch.device | int = 0, sysfs: str | os.PathLike[str] = "/sys/bus/pci/devices"
) -> list[int] | None:
    """The CPUs next to a CUDA device (its PCI function's ``local_cpulist``), or None when this
    is not known (no CUDA, no sysfs, no way to learn the device's PCI address)."""
    try:
        cpus = parse_cpulist((Path(sysfs) / pci_address(device) / "local_cpulist").read_text())
    except (OSError, RuntimeError, AssertionError, ValueError, subprocess.SubprocessError) as e:
        log.debug("no NUMA locality for CUDA device %s: %s", device, e)
        return None
    return cpus or None


def pin_process(cpus: set[int]) -> int:
    """Set the CPU affinity of every thread of this process (threads started later inherit
    it from their parent). Returns how many threads were moved."""
    moved = 0
    for task in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(task), cpus)
            moved += 1
        except (ProcessLookupError, PermissionError):  # a thread that just ended, or a locked one
            continue
    return moved


def pin_to_gpu_node(device: torch.device | int = 0) -> list[int] | None:
    """Move this process onto the CPUs next to ``device`` that it may use; the CPUs chosen, or
    None when nothing was changed (locality unknown, or no allowed CPU is local)."""
    if not hasattr(os, "sched_setaffinity") or not os.path.isdir("/proc/self/task"):
        return None  # not Linux: no per-thread affinity to set
    local = gpu_local_cpus(device)
    allowed = os.sched_getaffinity(0)
    cpus = sorted(set(local or ()) & allowed)
    if not cpus or set(cpus) == allowed:
        return None
    moved = pin_process(set(cpus))
    log.info(
        "fa3trt replica: %d threads moved to the %d CPUs next to cuda:%s (of %d allowed)",
        moved,
        len(cpus),
        device,
        len(allowed),
    )
    return cpus
