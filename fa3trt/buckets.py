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

__all__ = ["Buckets", "assemble", "split_rows", "padding_ratio"]


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


def assemble(
    rows: Sequence[np.ndarray | torch.Tensor],
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack (S_i, D) sequences into a (B, max S_i, D) batch, zero past each length, and
    int32 ``seq_lens`` (on the CPU: the kernels dispatch on host lengths).

    The batch is built directly in ``dtype`` on ``device``: rows are copied once, converted on
    the way, and only the padding is zeroed.
    """
    if not rows:
        raise InvalidInputError("cannot assemble an empty batch")
    lens = [int(r.shape[0]) for r in rows]
    d, longest = int(rows[0].shape[1]), max(lens)
    out = torch.empty((len(rows), longest, d), dtype=dtype, device=device)
    on_gpu = out.device.type == "cuda"
    for i, r in enumerate(rows):
        src = torch.from_numpy(r) if isinstance(r, np.ndarray) else r
        if on_gpu and src.device.type == "cpu" and src.dtype != dtype:
            # Move in the request's own dtype and convert on the GPU: a CPU-side float16 ->
            # bfloat16 conversion of a 16k x 4096 request costs more than its whole forward.
            src = src.to(out.device)
        out[i, : lens[i]].copy_(src)
        if lens[i] < longest:
            out[i, lens[i] :].zero_()
    return out, torch.tensor(lens, dtype=torch.int32)


def split_rows(y: torch.Tensor, seq_lens: Sequence[int] | torch.Tensor) -> list[torch.Tensor]:
    """Each sequence's own rows of a padded (B, L, D) output (views)."""
    lens = seq_lens.tolist() if isinstance(seq_lens, torch.Tensor) else list(seq_lens)
    return [y[i, :n] for i, n in enumerate(lens)]


def padding_ratio(seq_lens: Sequence[int]) -> float:
    """Padded tokens / computed tokens for a batch padded to its longest member."""
    if not seq_lens:
        return 0.0
    computed = len(seq_lens) * max(seq_lens)
    return (computed - sum(seq_lens)) / computed
