"""Sequence-length buckets: which bucket a request falls in, and batch assembly.

A bucket is one TensorRT optimization profile and one batch queue. A batch is padded to its
longest member (not to the bucket edge: fewer wasted tokens) and carries ``seq_lens``.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fa3trt.errors import ConfigError, InvalidInputError

__all__ = ["Buckets", "assemble", "to_device", "lengths_to_device", "to_host", "padding_ratio"]


@dataclass(frozen=True)
class Buckets:
    """Ascending sequence-length edges; a sequence of length S goes to the first edge >= S."""

    edges: tuple[int, ...]

    def __post_init__(self) -> None:
        edges = tuple(self.edges)
        if not edges:
            raise ConfigError("buckets must list at least one sequence-length edge, got []")
        if any(not isinstance(e, int) or isinstance(e, bool) or e < 1 for e in edges):
            raise ConfigError(f"bucket edges must be integers >= 1, got {list(edges)}")
        if list(edges) != sorted(set(edges)):
            raise ConfigError(f"bucket edges must be strictly ascending, got {list(edges)}; e.g. [256, 1024, 4096]")
        object.__setattr__(self, "edges", edges)

    @property
    def max_len(self) -> int:
        return self.edges[-1]

    def index(self, seq_len: int) -> int:
        """Index of the bucket for a sequence of ``seq_len`` tokens."""
        if seq_len < 1:
            raise InvalidInputError(f"sequence length must be >= 1, got {seq_len}; send at least one row")
        if seq_len > self.max_len:
            raise InvalidInputError(
                f"sequence length {seq_len} exceeds the largest bucket ({self.max_len}); "
                f"split the sequence or serve with a larger bucket edge (buckets: {list(self.edges)})"
            )
        return bisect.bisect_left(self.edges, seq_len)

    def lower(self, i: int) -> int:
        """Smallest length that lands in bucket ``i`` (the TensorRT profile's min)."""
        return 1 if i == 0 else self.edges[i - 1] + 1

    def batch_limit(self, i: int, max_batch_tokens: int) -> int:
        """Largest batch for bucket ``i`` under a token budget (at least one sequence)."""
        return max(1, max_batch_tokens // self.edges[i])


def _stage_dtype(rows: Sequence[np.ndarray | torch.Tensor]) -> torch.dtype:
    """The dtype a batch travels to the GPU in: the rows' own when they share a 16- or 32-bit
    float dtype (the GPU converts), else float32 (converted once, while staging)."""
    dtypes = {r.dtype if isinstance(r, torch.Tensor) else torch.from_numpy(r[:0]).dtype for r in rows}
    if len(dtypes) == 1:
        (only,) = dtypes
        if only in (torch.float16, torch.bfloat16, torch.float32):
            return only
    return torch.float32


def assemble(
    rows: Sequence[np.ndarray | torch.Tensor],
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack (S_i, D) sequences into a (B, max S_i, D) batch, zero past each length, and
    int32 ``seq_lens`` (on the CPU: the kernels dispatch on host lengths).

    On the CPU the batch is built directly in ``dtype``: rows are copied once, converted on the
    way, and only the padding is zeroed. For a CUDA ``device`` host rows are staged into one
    page-locked buffer in their own dtype and moved by a single DMA, then converted and padded
    on the GPU: a CPU-side float16 -> bfloat16 conversion of a 16k x 4096 request costs more than
    its whole forward, and a copy from pageable memory goes through the driver's own staging
    buffer (one more CPU copy) and blocks the host per row.
    """
    if not rows:
        raise InvalidInputError("cannot assemble an empty batch")
    lens = [int(r.shape[0]) for r in rows]
    d, longest = int(rows[0].shape[1]), max(lens)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    target = torch.device(device) if device is not None else torch.device("cpu")
    srcs = [torch.from_numpy(r) if isinstance(r, np.ndarray) else r for r in rows]
    if target.type == "cuda" and all(r.device.type == "cpu" for r in srcs):
        stage = torch.empty((len(rows), longest, d), dtype=_stage_dtype(srcs), pin_memory=True)
        for i, r in enumerate(srcs):
            stage[i, : lens[i]].copy_(r)
        # The padding is staged as whatever the pinned block held; it is zeroed on the GPU below.
        # The caching host allocator keeps the block until this copy has completed.
        out = stage.to(target, non_blocking=True).to(dtype)
    else:
        out = torch.empty((len(rows), longest, d), dtype=dtype, device=target)
        for i, r in enumerate(srcs):
            out[i, : lens[i]].copy_(r)
    for i, n in enumerate(lens):
        if n < longest:
            out[i, n:].zero_()
    return out, seq_lens


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


def padding_ratio(seq_lens: Sequence[int]) -> float:
    """Padded tokens / computed tokens for a batch padded to its longest member."""
    if not seq_lens:
        return 0.0
    computed = len(seq_lens) * max(seq_lens)
    return (computed - sum(seq_lens)) / computed
