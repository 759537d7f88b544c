"""Sequence-length buckets: which bucket a request falls in.

A bucket is one TensorRT optimization profile and one batch queue. A batch is padded to its
longest member (not to the bucket edge: fewer wasted tokens); ``padding_ratio`` says how much.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

from fa3trt.errors import ConfigError, InvalidInputError

__all__ = ["Buckets", "padding_ratio"]


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


def padding_ratio(seq_lens: Sequence[int]) -> float:
    """Padded tokens / computed tokens for a batch padded to its longest member."""
    if not seq_lens:
        return 0.0
    computed = len(seq_lens) * max(seq_lens)
    return (computed - sum(seq_lens)) / computed
