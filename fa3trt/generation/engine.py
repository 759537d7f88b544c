"""Step-level continuous batching of generations: every pass a batch of requests in flight, each
at its own step, one transformer pass, each request's own scheduler step. No Ray, no asyncio:
``deploy.generation`` drives it from a loop.

Contract:
- ``StepEngine(family, backend, buckets, max_rows, policy)`` holds the requests in flight.
  ``new(request)`` prepares one (its latents, ids, rows and scheduler on the backend's device) as
  a ``Generation``; ``admit(gen)`` adds it, or refuses it with ``DeadlineError`` (the estimate
  in its message) when the cost model says its deadline cannot be met, or that it would make a
  request in flight miss a deadline that one would otherwise meet; ``cancel(gen)`` drops it
  (its memory is free once the pass in flight, if any, is done).
- ``pick()`` is the next pass's requests (``fa3trt.generation.policy.Planner``: the plan the
  admission check replays); ``step(batch)`` runs one pass over them and each one's scheduler
  step, and returns the requests it finished; ``step_or_split(batch)`` retries a failed pass in
  halves, so only a request that fails alone fails (with why). Requests join and leave at any
  step boundary. On a GPU the host queues a pass while the device runs the
  one before, never further ahead. ``admit``, ``cancel`` and ``pick`` may be called from
  another thread than ``step``'s (a lock guards the requests in flight).
- ``warm(rows)`` runs passes of each bucket's size at 1 row and each power of two up to
  ``max_rows`` (or at ``rows``) and records the cost model; warm-up requests never reach a caller.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fa3trt.buckets import Buckets
from fa3trt.errors import DeadlineError
from fa3trt.generation.family import Family, Start
from fa3trt.generation.policy import CostModel, Planner, Policy
from fa3trt.generation.requests import GenerateRequest

__all__ = ["Generation", "StepEngine"]

log = logging.getLogger(__name__)
_ids = itertools.count()


@dataclass(eq=False, kw_only=True)
class Generation(Start):
    """One request in flight: its state on the device (``Start``'s, its latents moved on each
    step), its step, its deadline."""

    request: GenerateRequest
    key: tuple[Any, ...]
    """What must be equal to share a pass: the image's and the prompt's sizes."""
    bucket: int
    arrival: float
    deadline: float
    id: int = field(default_factory=lambda: next(_ids))
    step: int = 0
    cancelled: bool = False
    on_step: Callable[[Generation], None] | None = None

    @property
    def rows(self) -> int:
        return int(self.embeds.shape[0])

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    @property
    def remaining(self) -> int:
        return self.steps - self.step

    @property
    def done(self) -> bool:
        return self.step >= self.steps


class StepEngine:
    """The requests in flight and their passes (see the module docstring)."""

    def __init__(
        self,
        family: Family,
        backend: Any,
        buckets: Buckets,
        max_rows: int,
        policy: Policy = "edf",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.family, self.backend, self.buckets = family, backend, buckets
        self.max_rows, self.policy, self.clock = max_rows, policy, clock
        self.cost = CostModel(runs_as=backend.batch_rows)
        self.planner = Planner()
        self.active: list[Generation] = []
        self._lock = threading.Lock()
        self.passes = 0
        self.rows_run = 0
        self._in_flight: torch.cuda.Event | None = None  # the pass the device may still be running

    def new(
        self,
        request: GenerateRequest,
        on_step: Callable[[Generation], None] | None = None,
        arrival: float | None = None,
    ) -> Generation:
        """``request`` prepared on the device (see the module docstring); its deadline counts from
        ``arrival`` (on the engine's clock; default now)."""
        if request.needs_encoding:
            raise ValueError("a request that sent prompt needs its embeddings first (GenerateRequest.encoded)")
        tokens = self.family.tokens(request.height, request.width)
        now = self.clock() if arrival is None else arrival
        start = self.family.start(request, self.backend.device, self.backend.dtype)
        key = (request.height, request.width, int(request.prompt_embeds.shape[0]))
        deadline = now + request.deadline_ms / 1e3 if request.deadline_ms is not None else math.inf
        return Generation(
            **vars(start),
            request=request,
            key=key,
            bucket=self.buckets.index(tokens),
            arrival=now,
            deadline=deadline,
            on_step=on_step,
        )

    def admit(self, gen: Generation) -> float:
        """Add ``gen`` to the requests in flight; returns the estimated seconds to its end, or
        raises ``DeadlineError`` when its deadline cannot be met, or when going ahead of a request
        in flight would make that one miss a deadline it would otherwise meet."""
        with self._lock:
            eta, refused = self.planner.admit(gen, self.active, self.cost, self.policy, self.max_rows, self.clock())
            if refused is not None:
                raise DeadlineError(refused, eta)
            self.active.append(gen)
            return eta

    def cancel(self, gen: Generation) -> None:
        with self._lock:
            gen.cancelled = True
            if gen in self.active:
                self.active.remove(gen)

    def pick(self) -> list[Generation]:
        with self._lock:
            return self.planner.pick(self.active, self.policy, self.max_rows, self.cost, self.clock())

    def __len__(self) -> int:
        return len(self.active)

    def step(self, batch: Sequence[Generation]) -> list[Generation]:
        """One pass over ``batch`` and each one's scheduler step; the requests it finished."""
        batch = list(batch)
        return self._advance(batch, self._pass(batch))

    def _pass(self, batch: list[Generation]) -> list[torch.Tensor]:
        """One transformer pass over ``batch``: each request's model output."""
        with torch.inference_mode():
            return self.family.noise(self.backend.run(self.family.inputs(batch)), batch)

    def _advance(self, batch: list[Generation], noises: list[torch.Tensor]) -> list[Generation]:
        """Each request's scheduler step from its model output; the requests this finished."""
        with torch.inference_mode():
            for gen, noise in zip(batch, noises):
                t = gen.timesteps[gen.step]
                gen.latents = gen.scheduler.step(noise, t, gen.latents, return_dict=False)[0].to(gen.latents.dtype)
                gen.step += 1
        self._queued()
        self.passes += 1
        self.rows_run += sum(g.rows for g in batch)
        finished = [g for g in batch if g.done]
        with self._lock:
            for g in finished:
                if g in self.active:
                    self.active.remove(g)
        for g in batch:
            if g.on_step is not None and not g.cancelled:
                g.on_step(g)
        return finished

    def _queued(self) -> None:
        """Bounds the host's lead over the device to one pass: the pass just queued runs while the
        host picks and queues the next, and every decision (admission, order, cancellation) is
        taken at most one pass ahead of the device, on a step count that pass is about to make
        true. (Unbounded, the host runs as far ahead as CUDA's launch queue lets it.)"""
        if self.backend.device.type != "cuda":
            return
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(self.backend.device))
        if self._in_flight is not None:
            self._in_flight.synchronize()
        self._in_flight = done

    def _sync(self) -> None:
        if self.backend.device.type == "cuda":
            torch.cuda.synchronize(self.backend.device)

    def step_or_split(self, batch: Sequence[Generation]) -> tuple[list[Generation], list[tuple[Generation, str]]]:
        """``step``, with a failed pass retried in halves, so a failure stays with the requests
        that cause it (a pass too large for the device's memory runs as smaller ones). Returns the
        requests it finished and those that failed alone, each with why (dropped from flight)."""
        batch = list(batch)
        try:
            noises = self._pass(batch)
        except Exception as e:  # any failure of the pass; its frames go with this block
            why = f"{type(e).__name__}: {e}"
        else:
            return self._advance(batch, noises), []
        # Only here, with the failed pass's frames (its batch, its activations) gone, is their memory free.
        if self.backend.device.type == "cuda":
            torch.cuda.empty_cache()
        if len(batch) == 1:
            self.cancel(batch[0])
            return [], [(batch[0], why)]
        log.warning("a pass of %d requests failed (%s); retrying in halves", len(batch), why)
        h = len(batch) // 2
        done_a, failed_a = self.step_or_split(batch[:h])
        done_b, failed_b = self.step_or_split(batch[h:])
        return done_a + done_b, failed_a + failed_b

    def warm(self, rows: Sequence[int] | None = None, steps: int = 4) -> CostModel:
        """Passes of each bucket's largest square image with the longest prompt at each row count
        in ``rows`` (default 1 and every power of two up to ``max_rows``), timed into the cost
        model: the first pass of a shape compiles and allocates; the others run back to back, as
        the serving loop runs them (the host queues a pass while the device runs the one before),
        and their mean is recorded."""
        counts = sorted(set(rows or [min(self.max_rows, 1 << i) for i in range(int(math.log2(self.max_rows)) + 1)]))
        limits = self.family.limits()
        for edge in self.buckets.edges:
            side = max(1, math.isqrt(edge)) * limits.pixel_step
            req = GenerateRequest(
                prompt_embeds=np.zeros((limits.max_text_tokens, limits.text_dim), np.float32),
                pooled_prompt_embeds=np.zeros(limits.pooled_dim, np.float32),
                height=side,
                width=side,
                steps=max(2, steps),
                guidance_scale=1.0 if limits.guidance_negative else limits.default_guidance,  # one row each
                seed=0,
            )
            for n in counts:
                gens = [self.new(req) for _ in range(n)]
                self.step(gens)
                self._sync()
                t0 = time.perf_counter()
                for _ in range(req.steps - 1):
                    self.step(gens)
                self._sync()
                self.cost.record(gens[0].bucket, n, (time.perf_counter() - t0) / (req.steps - 1))
        self.passes = self.rows_run = 0
        log.info("generation cost model (seconds per pass by bucket x rows): %s", self.cost.to_dict())
        return self.cost
