"""Which requests in flight run the next transformer pass, and whether a new one can make its
deadline: plain functions over the requests' step counts and a measured cost model.

Contract:
- ``order(states, policy)``: ``edf``, earliest deadline first (no deadline last; ties in arrival
  order), or ``fifo``, arrival order. Re-ordered at every step boundary, so a long request yields
  to one whose deadline is nearer: preemption, its latents and step index kept where they are.
- ``pick(states, policy, max_rows)``: the first request in that order, and the requests of its
  shape (only equal shapes share a pass) next in order, up to ``max_rows`` rows.
- ``CostModel``: seconds per pass by (bucket, rows), measured at warm-up; ``seconds`` reads the
  nearest measured row count at or above, never below a smaller count's (linearly past the largest).
- ``finish_times(states, cost, policy, max_rows)``: each request's time until it finishes if
  nothing else arrives: the loop's passes replayed, ``pick``'s batches at the measured seconds; ``estimate(new, ...)`` is ``new``'s if admitted now. A request is admitted
  only if it meets its deadline and every request in flight that would meet its own still does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeVar

__all__ = ["Policy", "order", "pick", "CostModel", "finish_times", "estimate", "Scheduled"]

Policy = Literal["edf", "fifo"]


class Scheduled(Protocol):
    """What the policy reads of a request in flight."""

    key: tuple[Any, ...]
    bucket: int
    arrival: float
    deadline: float

    @property
    def rows(self) -> int: ...

    @property
    def remaining(self) -> int: ...


S = TypeVar("S", bound=Scheduled)


def order(states: Sequence[S], policy: Policy) -> list[S]:
    """``states`` in the order they are served (see the module docstring)."""
    if policy == "fifo":
        return sorted(states, key=lambda s: s.arrival)
    return sorted(states, key=lambda s: (s.deadline, s.arrival))


def pick(states: Sequence[S], policy: Policy, max_rows: int) -> list[S]:
    """The next pass's requests (see the module docstring); empty when nothing is in flight."""
    return _fill(order(states, policy), max_rows)


def _fill(ranked: Sequence[S], max_rows: int) -> list[S]:
    """The first of ``ranked`` and the requests of its shape next in order, up to ``max_rows`` rows."""
    if not ranked:
        return []
    head = ranked[0]
    batch, rows = [head], head.rows
    for s in ranked[1:]:
        if s.key == head.key and rows + s.rows <= max_rows:
            batch.append(s)
            rows += s.rows
    return batch


@dataclass
class CostModel:
    """Seconds per transformer pass (and its scheduler steps) by (bucket, rows)."""

    seconds_by: dict[tuple[int, int], float] = field(default_factory=dict)

    def record(self, bucket: int, rows: int, seconds: float) -> None:
        self.seconds_by[(bucket, rows)] = seconds

    def seconds(self, bucket: int, rows: int) -> float:
        """The measured pass at ``rows`` or the nearest row count above; never less than a
        smaller row count's (a timing's noise does not make a larger batch look cheaper)."""
        measured = sorted((r, s) for (b, r), s in self.seconds_by.items() if b == bucket)
        if not measured:
            return 0.0
        floor = 0.0
        for r, s in measured:
            floor = max(floor, s)
            if r >= rows:
                return floor
        r, _ = measured[-1]
        return floor * rows / r

    def to_dict(self) -> dict[str, float]:
        return {f"{b}x{r}": s for (b, r), s in sorted(self.seconds_by.items())}


def finish_times(states: Sequence[S], cost: CostModel, policy: Policy, max_rows: int) -> list[tuple[S, float]]:
    """Each request in serving order with the seconds until it finishes, if nothing else
    arrives: the loop's passes replayed (``pick``'s batches at the cost model's seconds), a
    batch's passes at once until one of its requests is done."""
    ranked = order(states, policy)
    left = {id(s): s.remaining for s in ranked}
    done: dict[int, float] = {}
    live, t = [s for s in ranked if left[id(s)] > 0], 0.0
    while live:
        batch = _fill(live, max_rows)
        passes = min(left[id(s)] for s in batch)
        t += passes * cost.seconds(batch[0].bucket, sum(s.rows for s in batch))
        for s in batch:
            left[id(s)] -= passes
            if left[id(s)] == 0:
                done[id(s)] = t
        live = [s for s in live if left[id(s)] > 0]
    return [(s, done.get(id(s), 0.0)) for s in ranked]


def estimate(new: S, states: Sequence[S], cost: CostModel, policy: Policy, max_rows: int) -> float:
    """Seconds until ``new`` finishes if admitted now (see the module docstring)."""
    return next(t for s, t in finish_times([*states, new], cost, policy, max_rows) if s is new)
