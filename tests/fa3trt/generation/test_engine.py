"""The denoising loop, batched step by step, against diffusers' ``FluxPipeline`` run alone on the
eager unrouted transformer: a request's latents are the pipeline's whatever it is batched with
(other sizes, other steps, a guided request's two rows), and the policy serves the nearest
deadline first, preempting at step boundaries. Tiny FLUX on the CPU, torch backend, no mocks."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from fa3trt.errors import DeadlineError
from fa3trt.generation import FluxFamily, GenerationArgs, StepEngine, parse_request
from fa3trt.serving import load_backend
from tests.models import FLUX_GEN_CONFIG, flux_pipeline_latents, tiny_flux_gen

pytest.importorskip("diffusers")

ATOL = 1e-5
ARGS = {"transformer": {"class": "FluxTransformer2DModel", "config": FLUX_GEN_CONFIG}, "buckets": [16, 64]}


@pytest.fixture(scope="module")
def family() -> FluxFamily:
    return FluxFamily(GenerationArgs.model_validate(ARGS | {"max_text_tokens": 16}))


@pytest.fixture(scope="module")
def backend(family: FluxFamily) -> Any:
    return load_backend("torch", family.spec())


@pytest.fixture(scope="module")
def eager() -> torch.nn.Module:
    return tiny_flux_gen()


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def engine(family: FluxFamily, backend: Any, policy: str = "edf", max_rows: int = 4, clock: Any = None) -> StepEngine:
    return StepEngine(
        family, backend, family.args.bucket_set(), max_rows, policy, **({"clock": clock} if clock else {})
    )  # type: ignore[arg-type]


def fields(h: int, w: int, steps: int, seed: int, t: int = 8, **extra: Any) -> dict[str, Any]:
    rng = np.random.default_rng(100 + seed)
    out = {
        "prompt_embeds": rng.standard_normal((t, 32)).astype(np.float32),
        "pooled_prompt_embeds": rng.standard_normal(32).astype(np.float32),
        "height": h,
        "width": w,
        "steps": steps,
        "seed": seed,
    }
    return out | extra


def guided(h: int, w: int, steps: int, seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(200 + seed)
    return fields(h, w, steps, seed) | {
        "negative_prompt_embeds": rng.standard_normal((8, 32)).astype(np.float32),
        "negative_pooled_prompt_embeds": rng.standard_normal(32).astype(np.float32),
        "true_cfg_scale": 4.0,
    }


def test_each_request_is_the_pipelines_answer_batched_with_others_at_other_steps(
    family: FluxFamily, backend: Any, eager: torch.nn.Module
) -> None:
    reqs = [
        fields(64, 64, 4, 1),
        fields(64, 64, 6, 2),
        fields(32, 64, 5, 3),  # another size: its own passes
        guided(64, 64, 3, 4),  # true classifier-free guidance: two rows a step
        fields(64, 64, 5, 5, guidance_scale=7.0),
    ]
    eng = engine(family, backend)
    gens = [eng.new(parse_request(r, family.limits())) for r in reqs]
    eng.admit(gens[0])
    eng.step(eng.pick())  # the first one alone for a step; the others join at step 1 of it
    for g in gens[1:]:
        eng.admit(g)
    while len(eng):
        eng.step(eng.pick())
    for g, r in zip(gens, reqs):
        assert g.done and g.step == r["steps"]
        np.testing.assert_allclose(g.latents[0].numpy(), flux_pipeline_latents(eager, r), atol=ATOL, rtol=0)
    # Batched: fewer passes than steps, and passes of several requests at different steps.
    assert eng.passes < sum(r["steps"] for r in reqs)
    assert eng.rows_run == sum(r["steps"] for r in reqs) + reqs[3]["steps"]


def test_given_latents_replace_the_seeds_noise(family: FluxFamily, backend: Any, eager: torch.nn.Module) -> None:
    r = fields(48, 64, 3, 0, latents=np.random.default_rng(9).standard_normal((12, 8)).astype(np.float32))
    eng = engine(family, backend)
    g = eng.new(parse_request(r, family.limits()))
    eng.admit(g)
    while len(eng):
        eng.step(eng.pick())
    np.testing.assert_allclose(g.latents[0].numpy(), flux_pipeline_latents(eager, r), atol=ATOL, rtol=0)


def test_the_nearest_deadline_preempts_at_a_step_boundary(family: FluxFamily, backend: Any) -> None:
    clock = Clock()
    eng = engine(family, backend, clock=clock)
    limits = family.limits()
    long = eng.new(parse_request(fields(64, 64, 10, 1), limits))
    eng.admit(long)
    eng.step(eng.pick())
    eng.step(eng.pick())
    clock.now = 1.0
    urgent = eng.new(parse_request(fields(32, 32, 3, 2, deadline_ms=5000), limits))
    eng.admit(urgent)
    for _ in range(3):
        assert eng.pick() == [urgent]
        eng.step([urgent])
    assert urgent.done and long.step == 2  # the long one waited where it was
    assert eng.pick() == [long]
    # A later request of the long one's shape joins its passes at its own step 0.
    twin = eng.new(parse_request(fields(64, 64, 4, 3), limits))
    eng.admit(twin)
    assert eng.pick() == [long, twin]
    eng.step([long, twin])
    assert (long.step, twin.step) == (3, 1)


def test_fifo_serves_arrival_order(family: FluxFamily, backend: Any) -> None:
    clock = Clock()
    eng = engine(family, backend, policy="fifo", clock=clock)
    limits = family.limits()
    first = eng.new(parse_request(fields(64, 64, 4, 1), limits))
    eng.admit(first)
    clock.now = 1.0
    eng.admit(eng.new(parse_request(fields(32, 32, 2, 2, deadline_ms=60000), limits)))
    assert eng.pick() == [first]


def test_rows_of_a_pass_stop_at_max_rows(family: FluxFamily, backend: Any) -> None:
    eng = engine(family, backend, max_rows=3)
    limits = family.limits()
    gens = [eng.new(parse_request(guided(64, 64, 2, i), limits)) for i in range(2)] + [
        eng.new(parse_request(fields(64, 64, 2, 9), limits))
    ]
    for g in gens:
        eng.admit(g)
    assert eng.pick() == [gens[0], gens[2]]  # 2 + 1 rows; the second guided one waits


def test_a_deadline_that_cannot_be_met_is_refused_with_the_estimate(family: FluxFamily, backend: Any) -> None:
    clock = Clock()
    eng = engine(family, backend, clock=clock)
    limits = family.limits()
    eng.cost.record(0, 1, 0.01)  # bucket 0 (up to 16 image tokens), one row: 10 ms a pass
    eng.cost.record(0, 2, 0.015)
    with pytest.raises(DeadlineError, match=r"deadline_ms 50 cannot be met.*about 100 ms") as e:
        eng.admit(eng.new(parse_request(fields(64, 64, 10, 1, deadline_ms=50), limits)))
    assert e.value.status == 429 and e.value.estimate_s == pytest.approx(0.1)
    assert len(eng) == 0  # a refused request holds nothing
    first = eng.new(parse_request(fields(64, 64, 10, 1, deadline_ms=165), limits))
    assert eng.admit(first) == pytest.approx(0.1)
    # A nearer deadline goes first: its own 5 passes, and the first still ends by 165 ms (at 150).
    small = eng.new(parse_request(fields(32, 32, 5, 2, deadline_ms=70), limits))
    assert eng.admit(small) == pytest.approx(0.05)
    # One due after both waits for them: 50 + 100 ms, then its own 5 passes of 10 ms.
    late = eng.new(parse_request(fields(32, 64, 5, 3, deadline_ms=180), limits))
    with pytest.raises(DeadlineError) as e:
        eng.admit(late)
    assert e.value.estimate_s == pytest.approx(0.2)
    # One that would meet its own deadline by going ahead of the first, but make it miss its own.
    clock.now = 0.01
    pushy = eng.new(parse_request(fields(32, 64, 3, 4, deadline_ms=100), limits))
    with pytest.raises(DeadlineError, match="would make a request in flight miss its deadline"):
        eng.admit(pushy)
    # Without a deadline it goes last; of the small one's shape it would share (and slow: 15 ms a
    # pass) the small one's passes past its deadline. With requests refused just now the loop
    # fills its passes greedily (every row counts), so it is refused; another shape is admitted.
    with pytest.raises(DeadlineError, match="would make a request in flight miss"):
        eng.admit(eng.new(parse_request(fields(32, 32, 4, 5), limits)))
    patient = eng.new(parse_request(fields(32, 64, 4, 6), limits))
    assert eng.admit(patient) == pytest.approx(0.05 + 0.1 + 0.04)
    assert eng.active == [first, small, patient]


def test_with_room_a_later_deadline_waits_rather_than_slow_an_earlier_one(family: FluxFamily, backend: Any) -> None:
    clock = Clock()
    eng = engine(family, backend, clock=clock)
    limits = family.limits()
    eng.cost.record(0, 1, 0.01)
    eng.cost.record(0, 2, 0.015)
    first = eng.new(parse_request(fields(64, 64, 10, 1, deadline_ms=165), limits))
    small = eng.new(parse_request(fields(32, 32, 5, 2, deadline_ms=70), limits))
    assert eng.admit(first) == pytest.approx(0.1) and eng.admit(small) == pytest.approx(0.05)
    # Of the small one's shape, beside it it would end it at 75 ms, past its 70: it waits for the
    # small one and the first (a nearer deadline), then runs its own 4 passes.
    waiter = eng.new(parse_request(fields(32, 32, 4, 5), limits))
    assert eng.admit(waiter) == pytest.approx(0.05 + 0.1 + 0.04)
    assert eng.pick() == [small]
    for _ in range(5):
        eng.step(eng.pick())
    assert small.done and eng.pick() == [first]


def test_a_cancelled_request_leaves_the_next_pass(family: FluxFamily, backend: Any) -> None:
    eng = engine(family, backend)
    limits = family.limits()
    seen: list[int] = []
    a = eng.new(parse_request(fields(64, 64, 4, 1), limits), on_step=lambda g: seen.append(g.step))
    b = eng.new(parse_request(fields(64, 64, 4, 2), limits))
    eng.admit(a)
    eng.admit(b)
    eng.step(eng.pick())
    eng.cancel(a)
    assert a.cancelled and eng.pick() == [b] and len(eng) == 1
    eng.step(eng.pick())
    assert seen == [1] and (a.step, b.step) == (1, 2)


def test_warm_up_measures_every_bucket_and_row_count(family: FluxFamily, backend: Any) -> None:
    eng = engine(family, backend, max_rows=4)
    cost = eng.warm(steps=2)
    assert sorted(cost.seconds_by) == [(b, r) for b in (0, 1) for r in (1, 2, 4)]
    assert all(s > 0 for s in cost.seconds_by.values())
    assert eng.passes == 0 and len(eng) == 0  # warm-up leaves no trace
    assert cost.seconds(1, 3) >= cost.seconds(1, 2)


class SmallDevice:
    """The torch backend on a device whose memory holds one row of a pass (a larger pass raises
    PyTorch's out-of-memory error, as a CUDA device does), and on which a pass holding a row whose
    pooled embedding starts with ``POISON`` fails (a request that fails alone)."""

    POISON = 1234.0

    def __init__(self, inner: Any) -> None:
        self.inner, self.device, self.dtype = inner, inner.device, inner.dtype
        self.batch_rows = inner.batch_rows

    def run(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if bool((batch["pooled_projections"][:, 0] == self.POISON).any()):
            raise RuntimeError("the kernel failed on this row")
        if batch["hidden_states"].shape[0] > 1:
            raise torch.OutOfMemoryError("out of memory: this device holds one row of a pass")
        return self.inner.run(batch)


def test_a_failed_pass_is_retried_in_halves_and_only_the_request_that_fails_alone_fails(
    family: FluxFamily, backend: Any, eager: torch.nn.Module
) -> None:
    reqs = [fields(64, 64, 3, k) for k in range(4)]
    poisoned = fields(64, 64, 3, 9)
    poisoned["pooled_prompt_embeds"][0] = SmallDevice.POISON
    eng = StepEngine(family, SmallDevice(backend), family.args.bucket_set(), 8)  # type: ignore[arg-type]
    gens = [eng.new(parse_request(r, family.limits())) for r in [*reqs, poisoned]]
    for g in gens:
        eng.admit(g)
    failed: list[tuple[Any, str]] = []
    while len(eng):
        batch = eng.pick()
        assert len(batch) == len(eng)  # every request of one size shares each pass it tries
        failed += eng.step_or_split(batch)[1]
    assert [(g, why) for g, why in failed] == [(gens[-1], "RuntimeError: the kernel failed on this row")]
    assert gens[-1].step == 0 and gens[-1].cancelled
    for g, r in zip(gens, reqs):
        assert g.done
        np.testing.assert_allclose(g.latents[0].numpy(), flux_pipeline_latents(eager, r), atol=ATOL, rtol=0)
