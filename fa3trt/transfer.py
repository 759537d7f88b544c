"""Moving tensors between the host and a CUDA device without waiting for the GPU.

Contract: ``to_device`` and ``lengths_to_device`` queue a copy on the current stream (a host
tensor goes through page-locked memory: a copy from pageable memory first waits for the GPU);
``to_host`` returns a complete host tensor in page-locked memory from PyTorch's caching host
allocator. On the CPU each is the identity.
"""

from __future__ import annotations

import torch

__all__ = ["to_device", "lengths_to_device", "to_host"]


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``, queued on the current stream: a CPU tensor goes to a CUDA device
    through page-locked memory, since a copy from pageable memory first waits for the GPU."""
    if t.device.type == "cpu" and device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def lengths_to_device(seq_lens: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Sequence lengths as a kernel reads them: contiguous int32 on ``device``, queued (a host
    copy that waited for the GPU would leave it idle between launches)."""
    return to_device(seq_lens.to(torch.int32), device).contiguous()


def to_host(y: torch.Tensor) -> torch.Tensor:
    """``y`` on the CPU, complete when this returns. A CUDA tensor lands in page-locked memory
    from PyTorch's caching host allocator by one DMA: no pageable bounce copy, and no fresh
    pages to fault in for every answer. The block returns to the allocator's pool once the
    last view of it (the answers handed out) is gone."""
    if y.device.type != "cuda":
        return y
    host = torch.empty(y.shape, dtype=y.dtype, pin_memory=True)
    host.copy_(y, non_blocking=True)
    torch.cuda.current_stream(y.device).synchronize()
    return host
