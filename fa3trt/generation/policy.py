"""Which requests in flight run the next transformer pass, and whether a new one can make its
deadline: plain functions over the requests' step counts and a measured cost model.

Contract:
- ``order(states, policy)``: ``edf``, earliest deadline first (no deadline last; ties in arrival
  order), or ``fifo``, arrival order. Re-ordered at every step boundary, so a long request yields
  to one whose deadline is nearer: preemption, its latents and step index kept where they are.
- ``pick(states, policy, max_rows, cost, now)``: the first request in that order, and the
  requests of its shape (only equal shapes share a pass) next in order, up to ``max_rows`` rows.
  Under ``edf`` with a cost model a request joins only if it makes no request miss a deadline
  that one would meet without it: no request of the batch (the batch running on as its requests
  finish) and none ahead of it in the order that waits for the batch to end. A later deadline
  waits rather than slow an earlier one past its own.
- ``Planner``: the serving loop's ``pick`` and ``admit``, one plan for both. Its batch is kept
  until a request of it finishes or leaves, or one is admitted, so the passes run the plan
  ``finish_times`` replays when a request is admitted. It fills as ``pick`` does with the cost
  model (patient) while there is room, and without it (every row a pass counts) for
  ``GREEDY_DEADLINES`` of a refused request's deadlines after each refusal, switching only where
  the other plan keeps every request in flight that is on time on time.
- ``CostModel``: seconds per pass by (bucket, rows), measured at warm-up (1 and powers of two);
  ``seconds`` is linear between the measured row counts around the rows the batch runs as (its
  own, or the CUDA graph's it replays: ``runs_as``), never below a smaller count's, linear past
  the largest.
- ``finish_times(states, cost, policy, max_rows, now, first, patient)``: each request's time
  until it finishes if nothing else arrives: the loop's passes replayed, ``pick``'s batches (the
  loop's kept batch ``first``) at the measured seconds, with each request's passes left at each
  point.
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

GREEDY_DEADLINES = 3.0
"""After a refusal the loop fills batches greedily for this many of the refused request's
deadlines (``Planner``): with no room, more rows a pass serve more requests in time (in the
replay at an H100's pass times, 200% load: as many as greedy filling throughout, where patient
filling throughout served 14% fewer of a 512/768/1024 mix)."""


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
    rows; with ``cost``, a request joins only if it makes no request miss a deadline that one
    would meet without it, in the batch or ahead of it in ``ranked`` (at ``now``, with the
    passes ``left`` to each, by id: default its ``remaining``)."""
    if not ranked:
        return []
    head = ranked[0]
    batch = [head]
    alone = _ends(batch, cost, now, left) if cost is not None else {}
    for i, s in enumerate(ranked[1:], 1):
        if s.key != head.key or sum(m.rows for m in batch) + s.rows > max_rows:
            continue
        if cost is not None:
            beside = _ends([*batch, s], cost, now, left)
            if any(alone[id(m)] <= m.deadline < beside[id(m)] for m in batch):
                continue  # it waits: joining would slow a request that makes its deadline past it
            # ... or one ahead of it in the order that waits for this batch to end.
            waiting = [r for r in ranked[:i] if r not in batch]
            done_alone, done_beside = max(alone.values()), max(beside.values())
            if any(
                done_alone + _alone(r, cost, left) <= r.deadline < done_beside + _alone(r, cost, left) for r in waiting
            ):
                continue
            alone = beside  # the batch's ends from now on
        batch.append(s)
    return batch


def _alone(s: S, cost: CostModel, left: dict[int, int] | None) -> float:
    """Seconds of ``s``'s passes left, run by themselves."""
    return (s.remaining if left is None else left[id(s)]) * cost.seconds(s.bucket, s.rows)


def _ends(batch: Sequence[S], cost: CostModel, now: float, left: dict[int, int] | None) -> dict[int, float]:
    """When each request of ``batch`` ends if the batch runs alone, shrinking as they finish."""
    passes = {id(s): s.remaining if left is None else left[id(s)] for s in batch}
    ends, t, done = {}, now, 0
    for s in sorted(batch, key=lambda s: passes[id(s)]):
        rows = sum(m.rows for m in batch if passes[id(m)] > done)
        t += (passes[id(s)] - done) * cost.seconds(s.bucket, rows)
        ends[id(s)], done = t, passes[id(s)]
    return ends


class Planner:
    """The serving loop's batches and admission check on one plan (see the module docstring).
    (Re-filled every pass, a waiting request would join as the batch's deadlines loosen, and the
    slower passes would delay the requests planned after the batch past the times they were
    admitted on; so the batch is kept until the plan changes.)"""

    def __init__(self) -> None:
        self._batch: list[Any] = []
        self.patient = True
        self._greedy_until = -math.inf

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
            self._batch = kept = pick(states, policy, max_rows, cost if self.patient else None, now)
        return kept

    def admit(
        self, new: S, states: Sequence[S], cost: CostModel, policy: Policy, max_rows: int, now: float
    ) -> tuple[float, str | None]:
        """``admission`` of ``new`` on this plan, a new plan where it is admitted; then the way of
        filling batches the refusals so far call for, where switching keeps every request on time."""
        eta, why = admission(new, states, cost, policy, max_rows, now, self.current(states), self.patient)
        if why is None:
            self.replan()
            states = [*states, new]
        elif new.deadline < math.inf:  # full: every row a pass counts, for a few deadlines' time
            self._greedy_until = max(self._greedy_until, now + GREEDY_DEADLINES * (new.deadline - new.arrival))
        want = now >= self._greedy_until
        if policy == "edf" and want != self.patient:
            kept = self.current(states)
            before = dict(finish_times(states, cost, policy, max_rows, now, kept, self.patient))
            after = finish_times(states, cost, policy, max_rows, now, None, want)
            if all(now + t <= s.deadline or now + before[s] > s.deadline for s, t in after):
                self.patient = want
                self.replan()
        return eta, why


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
    patient: bool = True,
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
        batch = (
            list(first)
            if first
            else _fill(live, max_rows, cost if policy == "edf" and patient else None, now + t, left)
        )
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
    patient: bool = True,
) -> tuple[float, str | None]:
    """(``new``'s seconds to its end if admitted at ``now``, why it is refused or None): see the
    module docstring. Deadlines are on ``now``'s clock; ``current``: the batch the loop keeps
    (``Planner.current``), which it runs on if ``new`` is refused (if admitted, it plans anew);
    ``patient``: whether the plans fill batches patiently (``Planner``)."""
    after = finish_times([*states, new], cost, policy, max_rows, now, patient=patient)
    eta = next(t for s, t in after if s is new)
    if now + eta > new.deadline:
        budget = (new.deadline - new.arrival) * 1e3
        return eta, (
            f"deadline_ms {budget:.0f} cannot be met: this request would take about {eta * 1e3:.0f} ms with "
            f"the {len(states)} in flight; retry later, or give it {math.ceil(eta * 1e3)} ms"
        )
    before = {id(s): t for s, t in finish_times(states, cost, policy, max_rows, now, current, patient)}
    for s, t in after:
        if s is not new and now + t > s.deadline >= now + before[id(s)]:
            return eta, (
                f"this request would make a request in flight miss its deadline: its passes (about "
                f"{math.ceil(eta * 1e3)} ms) run ahead of or beside one due in {(s.deadline - now) * 1e3:.0f} "
                "ms; retry later" + ("" if new.deadline == math.inf else ", or give it a later deadline")
            )
    return eta, None
