"""Which requests in flight run the next transformer pass, and whether a new one can make its
deadline: plain functions over the requests' step counts and a measured cost model.

Contract:
- ``order(states, policy)``: ``edf``, earliest deadline first (no deadline last; ties in arrival
  order), or ``fifo``, arrival order. Re-ordered at every step boundary, so a long request yields
  to one whose deadline is nearer: preemption, its latents and step index kept where they are.
- ``pick(states, policy, max_rows, cost, now)``: the first request in that order, and the
  requests of its shape (only equal shapes share a pass) next in order, up to ``max_rows`` rows.
  Under ``edf`` with a cost model, a request joins only if it makes no request already in the
  batch miss a deadline that one would meet without it (each one's remaining passes at the
  batch's rows): a later deadline waits rather than slow an earlier one past its own.
- ``Planner``: ``pick`` for a serving loop, its batch kept until a request of it finishes or
  leaves, or one is admitted (``replan``): the passes ``finish_times`` replays (from the kept
  batch, ``current``, for the requests in flight without the new one).
- ``CostModel``: seconds per pass by (bucket, rows), measured at warm-up (1 and powers of two);
  ``seconds`` is linear between the measured row counts around the rows the batch runs as (its
  own, or the CUDA graph's it replays: ``runs_as``), never below a smaller count's, linear past
  the largest.
- ``finish_times(states, cost, policy, max_rows, now)``: each request's time until it finishes
  if nothing else arrives: the loop's passes replayed, ``pick``'s batches at the measured seconds.
- ``admission(new, states, cost, policy, max_rows, now)``: ``new``'s estimate and why it is
  refused (None when admitted): a request is admitted only if it meets its deadline and every
  request in flight that would meet its own still does. The engine's admission check, and the
  one ``bench.generation_sim`` replays.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeVar

__all__ = ["Policy", "order", "pick", "Planner", "CostModel", "finish_times", "admission", "Scheduled"]

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


def pick(
    states: Sequence[S], policy: Policy, max_rows: int, cost: CostModel | None = None, now: float = 0.0
) -> list[S]:
    """The next pass's requests (see the module docstring); empty when nothing is in flight."""
    return _fill(order(states, policy), max_rows, cost if policy == "edf" else None, now)


def _fill(
    ranked: Sequence[S],
    max_rows: int,
    cost: CostModel | None = None,
    now: float = 0.0,
    left: dict[int, int] | None = None,
) -> list[S]:
    """The first of ``ranked`` and the requests of its shape next in order, up to ``max_rows``
    rows; with ``cost``, a request joins only if no request already in the batch that would
    finish by its deadline at the batch's rows would miss it at the rows with it (at ``now``,
    with the passes ``left`` to each, by id: default its ``remaining``)."""
    if not ranked:
        return []
    head = ranked[0]
    batch, rows = [head], head.rows

    def on_time(s: S, n: int) -> bool:  # s's remaining passes all at n rows
        assert cost is not None
        passes = s.remaining if left is None else left[id(s)]
        return now + passes * cost.seconds(head.bucket, n) <= s.deadline

    for s in ranked[1:]:
        if s.key != head.key or rows + s.rows > max_rows:
            continue
        if cost is not None and any(on_time(m, rows) and not on_time(m, rows + s.rows) for m in batch):
            continue  # it waits: joining would slow a request that makes its deadline past it
        batch.append(s)
        rows += s.rows
    return batch


class Planner:
    """``pick`` for a serving loop: the batch kept from one pass to the next until one of its
    requests finishes or leaves, or a request is admitted (``replan``), so the passes run the
    plan ``finish_times`` replays for the admission check. (Re-filled every pass under ``edf``, a
    waiting request would join as the batch's deadlines loosen, and the slower passes would delay
    the requests planned after the batch past the times they were admitted on.)"""

    def __init__(self) -> None:
        self._batch: list[Any] = []

    def replan(self) -> None:
        self._batch = []

    def current(self, states: Sequence[S]) -> list[S] | None:
        """The batch the next pass runs if nothing changes, where one is kept (None: a new fill)."""
        live = {id(s) for s in states if s.remaining > 0}
        return list(self._batch) if self._batch and all(id(s) in live for s in self._batch) else None

    def pick(
        self, states: Sequence[S], policy: Policy, max_rows: int, cost: CostModel | None = None, now: float = 0.0
    ) -> list[S]:
        kept = self.current(states)
        if kept is None:
            self._batch = kept = pick(states, policy, max_rows, cost, now)
        return kept


@dataclass
class CostModel:
    """Seconds per transformer pass (and its scheduler steps) by (bucket, rows)."""

    seconds_by: dict[tuple[int, int], float] = field(default_factory=dict)
    runs_as: Callable[[int], int] | None = None
    """The rows a batch runs as (the backend's ``batch_rows``: CUDA graphs round it up); None: as it is."""

    def record(self, bucket: int, rows: int, seconds: float) -> None:
        self.seconds_by[(bucket, rows)] = seconds

    def seconds(self, bucket: int, rows: int) -> float:
        """The pass at ``rows``: measured, or linear between the measured row counts around it
        (linearly past the largest); never less than a smaller row count's (a timing's noise does
        not make a larger batch look cheaper)."""
        measured = sorted((r, s) for (b, r), s in self.seconds_by.items() if b == bucket)
        if not measured:
            return 0.0
        if self.runs_as is not None:
            rows = self.runs_as(rows)
        envelope, floor = [], 0.0
        for r, s in measured:
            floor = max(floor, s)
            envelope.append((r, floor))
        below = (0, envelope[0][1])  # fewer rows than the smallest count measured cost as much as it
        for r, s in envelope:
            if r >= rows:
                r0, s0 = below
                return s if r == rows or r0 == 0 else s0 + (s - s0) * (rows - r0) / (r - r0)
            below = (r, s)
        r, s = envelope[-1]
        return s * rows / r

    def to_dict(self) -> dict[str, float]:
        return {f"{b}x{r}": s for (b, r), s in sorted(self.seconds_by.items())}


def finish_times(
    states: Sequence[S],
    cost: CostModel,
    policy: Policy,
    max_rows: int,
    now: float = 0.0,
    first: Sequence[S] | None = None,
) -> list[tuple[S, float]]:
    """Each request in serving order with the seconds until it finishes, if nothing else
    arrives: the loop's passes replayed (``pick``'s batches at the cost model's seconds, from
    ``now`` on the deadlines' clock; ``first``: the batch the loop keeps, where it keeps one), a
    batch's passes at once until one of its requests is done."""
    ranked = order(states, policy)
    left = {id(s): s.remaining for s in ranked}
    done: dict[int, float] = {}
    live, t = [s for s in ranked if left[id(s)] > 0], 0.0
    while live:
        batch = list(first) if first else _fill(live, max_rows, cost if policy == "edf" else None, now + t, left)
        first = None
        passes = min(left[id(s)] for s in batch)
        t += passes * cost.seconds(batch[0].bucket, sum(s.rows for s in batch))
        for s in batch:
            left[id(s)] -= passes
            if left[id(s)] == 0:
                done[id(s)] = t
        live = [s for s in live if left[id(s)] > 0]
    return [(s, done.get(id(s), 0.0)) for s in ranked]


def admission(
    new: S,
    states: Sequence[S],
    cost: CostModel,
    policy: Policy,
    max_rows: int,
    now: float,
    current: Sequence[S] | None = None,
) -> tuple[float, str | None]:
    """(``new``'s seconds to its end if admitted at ``now``, why it is refused or None): see the
    module docstring. Deadlines are on ``now``'s clock; ``current``: the batch the loop keeps
    (``Planner.current``), which it runs on if ``new`` is refused (if admitted, it plans anew)."""
    after = finish_times([*states, new], cost, policy, max_rows, now)
    eta = next(t for s, t in after if s is new)
    if now + eta > new.deadline:
        budget = (new.deadline - new.arrival) * 1e3
        return eta, (
            f"deadline_ms {budget:.0f} cannot be met: this request would take about {eta * 1e3:.0f} ms with "
            f"the {len(states)} in flight; retry later, or give it {math.ceil(eta * 1e3)} ms"
        )
    before = {id(s): t for s, t in finish_times(states, cost, policy, max_rows, now, current)}
    for s, t in after:
        if s is not new and now + t > s.deadline >= now + before[id(s)]:
            return eta, (
                f"this request would make a request in flight miss its deadline: its passes (about "
                f"{math.ceil(eta * 1e3)} ms) run ahead of or beside one due in {(s.deadline - now) * 1e3:.0f} "
                "ms; retry later" + ("" if new.deadline == math.inf else ", or give it a later deadline")
            )
    return eta, None
