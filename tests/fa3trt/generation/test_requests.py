"""A generation request checked field by field, and the app's arguments: every bad value is
refused with a message that names it and says what to send. No model runs here."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from fa3trt.errors import ConfigError, InvalidInputError
from fa3trt.generation import FluxFamily, GenerationArgs, family_for, parse_request
from fa3trt.generation.policy import CostModel, Planner, admission, finish_times, order, pick
from fa3trt.generation.requests import Limits

LIMITS = Limits(
    text_dim=32,
    pooled_dim=16,
    max_text_tokens=64,
    pixel_step=16,
    max_tokens=256,
    max_steps=50,
    channels=8,
    default_guidance=3.5,
)


def good(**extra: Any) -> dict[str, Any]:
    return {
        "prompt_embeds": np.zeros((8, 32), np.float32),
        "pooled_prompt_embeds": np.zeros(16, np.float32),
        "height": 128,
        "width": 64,
    } | extra


def test_a_good_request_with_its_defaults() -> None:
    r = parse_request(good(), LIMITS)
    assert (r.height, r.width, r.steps, r.guidance_scale, r.seed, r.deadline_ms) == (128, 64, 28, 3.5, 0, None)
    assert not r.cfg
    # JSON lists, a batch of one as the pipelines take it, and the size as a token count.
    r = parse_request(
        {"prompt_embeds": [[[0.0] * 32] * 3], "pooled_prompt_embeds": [[1.0] * 16], "tokens": 64, "steps": 4}, LIMITS
    )
    assert (
        r.prompt_embeds.shape == (3, 32) and r.pooled_prompt_embeds.shape == (16,) and (r.height, r.width) == (128, 128)
    )
    neg = {"negative_prompt_embeds": np.ones((8, 32)), "negative_pooled_prompt_embeds": np.ones(16)}
    assert parse_request(good(true_cfg_scale=4.0, **neg), LIMITS).cfg
    assert not parse_request(good(**neg), LIMITS).cfg  # true_cfg_scale 1: the negative prompt is unused


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"prompt_embeds": np.zeros((8, 31))}, r"prompt_embeds has shape \(8, 31\); it must be \(T, 32\)"),
        ({"prompt_embeds": np.zeros((65, 32))}, "prompt_embeds has 65 tokens; send 1 to 64"),
        ({"prompt_embeds": np.full((2, 32), np.nan)}, "prompt_embeds holds NaN or Inf"),
        ({"prompt_embeds": "a cat"}, "prompt_embeds must be an array of numbers"),
        ({"pooled_prompt_embeds": np.zeros(15)}, r"pooled_prompt_embeds has shape \(15,\); it must be \(16\)"),
        ({"height": 100}, "height = 100 is not a multiple of 16 .*; send 96 or 112"),
        ({"width": 8}, r"width = 8 is outside \[16, 65536\]"),
        ({"height": 512, "width": 256}, "512 x 256 is 512 image tokens, past the largest bucket \\(256\\)"),
        ({"height": 64.5}, "height must be an integer, got 64.5"),
        ({"steps": 0}, r"steps = 0 is outside \[1, 50\]"),
        ({"steps": True}, "steps must be an integer, got True"),
        ({"guidance_scale": "high"}, "guidance_scale must be a number"),
        ({"seed": -1}, r"seed = -1 is outside"),
        ({"deadline_ms": 0}, r"deadline_ms = 0.0 is outside \[1, "),
        ({"tokens": 64}, "send tokens, or height and width, not both"),
        ({"prompt": "a cat"}, "prompt needs a text encoder.*send prompt_embeds"),
        ({"nagative_prompt_embeds": np.zeros((8, 32))}, r"unknown fields \['nagative_prompt_embeds'\]"),
        ({"negative_prompt_embeds": np.zeros((8, 32))}, "send both negative_prompt_embeds and negative_pooled"),
        (
            {"negative_prompt_embeds": np.zeros((4, 32)), "negative_pooled_prompt_embeds": np.zeros(16)},
            r"negative_prompt_embeds has shape \(4, 32\); it must be prompt_embeds' \(8, 32\)",
        ),
        ({"latents": np.zeros((31, 8))}, r"latents has 31 tokens; height x width = 128 x 64 makes 32"),
        ({"latents": np.zeros((32, 4))}, r"latents has shape \(32, 4\); it must be \(S, 8\)"),
        ({"output": "png"}, r"output 'png' is not offered \(this app has no VAE\); send one of \['latents'\]"),
        ({"output": "jpeg"}, r"output 'jpeg' is not offered \(unknown output\)"),
    ],
)
def test_each_bad_field_is_named_with_the_fix(change: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        parse_request(good(**change), LIMITS)


def test_a_missing_field_and_a_non_mapping() -> None:
    with pytest.raises(InvalidInputError, match="pooled_prompt_embeds is missing"):
        parse_request({"prompt_embeds": np.zeros((8, 32)), "height": 64, "width": 64}, LIMITS)
    with pytest.raises(InvalidInputError, match="height is missing"):
        parse_request({k: v for k, v in good().items() if k != "height"}, LIMITS)
    sized = {k: v for k, v in good().items() if k not in ("height", "width")}
    with pytest.raises(InvalidInputError, match="tokens = 60 is not a square .*send 49"):
        parse_request(sized | {"tokens": 60}, LIMITS)
    with pytest.raises(InvalidInputError, match=r"tokens = 324 is outside \[1, 256\]"):
        parse_request(sized | {"tokens": 324}, LIMITS)
    with pytest.raises(InvalidInputError, match="a mapping of field -> value, got list"):
        parse_request([1, 2], LIMITS)


FLUX = {"class": "FluxTransformer2DModel", "config": {"in_channels": 8, "joint_attention_dim": 32}}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"transformer": FLUX, "bucket": [64]}, "bucket"),
        ({"transformer": FLUX | {"path": "/models/flux"}}, "exactly one of transformer.config and transformer.path"),
        ({"transformer": FLUX, "buckets": [256, 64]}, "buckets"),
        ({"transformer": FLUX, "max_batch_rows": 0}, "max_batch_rows"),
        ({"transformer": FLUX, "policy": "sjf"}, "policy"),
        ({"transformer": FLUX, "replicas": 0}, "replicas must be 'auto' or an integer >= 1"),
    ],
)
def test_bad_app_arguments_are_refused_naming_the_key(args: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        GenerationArgs.model_validate(args)


@pytest.mark.parametrize(
    ("transformer", "message"),
    [
        ({"class": "PixArtTransformer2DModel", "config": {}}, "the generation app runs"),
        (FLUX | {"config": {"patch_size": 2}}, "patch_size = 2: FLUX packs 2x2 latents itself; use 1"),
        (FLUX | {"config": {"in_channels": 6}}, "in_channels = 6 is not 4 x the latent channels"),
        ({"class": "FluxTransformer2DModel", "path": "/nonexistent"}, "/nonexistent/config.json is not a readable"),
    ],
)
def test_transformers_the_loop_cannot_run_are_refused(transformer: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        family_for(GenerationArgs.model_validate({"transformer": transformer}))


def test_a_scheduler_that_is_not_diffusers_is_refused() -> None:
    pytest.importorskip("diffusers")
    family = FluxFamily(GenerationArgs.model_validate({"transformer": FLUX, "scheduler": {"class": "Flux"}}))
    with pytest.raises(ConfigError, match="scheduler.class 'Flux' is not a diffusers scheduler"):
        family.scheduler()


class S:
    """A request in flight as the policy reads it."""

    def __init__(self, key: str, rows: int, arrival: float, deadline: float, remaining: int) -> None:
        self.key, self.bucket, self.rows = (key,), 0, rows
        self.arrival, self.deadline, self.remaining = arrival, deadline, remaining


def test_policy_orders_picks_and_replays_the_passes() -> None:
    a, b, c, d = S("x", 1, 0, 9, 4), S("y", 1, 1, 2, 2), S("x", 1, 2, 5, 3), S("x", 2, 3, float("inf"), 1)
    assert order([a, b, c, d], "edf") == [b, c, a, d]
    assert order([d, c, b, a], "fifo") == [a, b, c, d]
    assert pick([a, b, c, d], "edf", 8) == [b]
    assert pick([a, c, d], "edf", 8) == [c, a, d]
    assert pick([a, c, d], "edf", 2) == [c, a]  # d's two rows do not fit
    cost = CostModel()
    cost.record(0, 1, 1.0)
    cost.record(0, 2, 1.5)
    cost.record(0, 4, 1.2)  # noisier than the 2-row pass: read as 1.5
    assert [cost.seconds(0, r) for r in (1, 2, 3, 4, 8)] == [1.0, 1.5, 1.5, 1.5, 3.0]
    between = CostModel({(1, 1): 1.0, (1, 4): 2.5, (1, 8): 4.5})  # between measured counts: linear
    assert [between.seconds(1, r) for r in (1, 2, 3, 4, 6, 8, 16)] == [1.0, 1.5, 2.0, 2.5, 3.5, 4.5, 9.0]
    graphs = CostModel(between.seconds_by, runs_as=lambda b: {5: 6, 7: 8}.get(b, b))  # CUDA graphs: 5 rows run as 6
    assert [graphs.seconds(1, r) for r in (4, 5, 6, 7)] == [2.5, 3.5, 3.5, 4.5]
    # edf: b alone 2 x 1.0; then c, a, d together (4 rows: 1.5) for d's 1 pass, c and a (2 rows)
    # for 2 passes until c is done, a alone for its last.
    times = dict((s.key + (s.arrival,), t) for s, t in finish_times([a, b, c, d], cost, "fifo", 8))
    # fifo: a, c, d together (4 rows: 1.5) for d's 1 pass, a and c (2 rows) for 2 passes until c
    # is done, a alone for its last, then b.
    assert times == {("x", 0): 5.5, ("y", 1): 7.5, ("x", 2): 4.5, ("x", 3): 1.5}


def test_under_edf_a_later_deadline_waits_rather_than_make_an_earlier_one_late() -> None:
    # Pass seconds: 1.0 at one row, 1.5 at two or three.
    cost = CostModel({(0, 1): 1.0, (0, 2): 1.5, (0, 4): 1.5})
    a, b, c, d = S("x", 1, 0, 9, 4), S("y", 1, 1, 2, 2), S("x", 1, 2, 5, 3), S("x", 2, 3, float("inf"), 1)
    # Without the cost model every request of c's shape joins it; with it, c (3 passes, due at 5)
    # makes its deadline alone from t = 2 and not at two rows, so a and d wait.
    assert pick([a, c, d], "edf", 8) == [c, a, d]
    assert pick([a, c, d], "edf", 8, cost, now=2.0) == [c]
    assert pick([a, c, d], "edf", 8, cost, now=0.0) == [c, a, d]  # due at 5: 4.5 at two rows is in time
    assert pick([a, c, d], "fifo", 8, cost, now=2.0) == [a, c, d]  # arrival order, no deadlines
    # edf: b alone 2 x 1.0; c alone to 5 (in time, where joined by a and d it would end at 6.5);
    # a alone to 9 (d would make it late); d last.
    times = dict((s.key + (s.arrival,), t) for s, t in finish_times([a, b, c, d], cost, "edf", 8))
    assert times == {("y", 1): 2.0, ("x", 2): 5.0, ("x", 0): 9.0, ("x", 3): 10.5}
    # The admission check replays the same plan: a request that can wait is admitted.
    # At t = 2 with c in flight, a request of 3 passes due at 8: beside c both would end at 6.5, c
    # late; waiting for c, it ends at 8.
    assert admission(S("x", 1, 2, 8.0, 3), [c], cost, "edf", 8, 2.0) == (6.0, None)


def test_the_loop_keeps_its_batch_until_one_of_it_finishes_or_a_request_is_admitted() -> None:
    cost = CostModel({(0, 1): 1.0, (0, 2): 1.5, (0, 4): 1.5})
    c, a = S("x", 1, 2, 5.5, 3), S("x", 1, 0, 9, 4)
    planner = Planner()
    assert planner.pick([a, c], "edf", 8, cost, now=2.0) == [c]  # beside a, c would end at 6.5: a waits
    # Two passes on, c's last pass would end in time beside a (4 + 1.5 <= 5.5): re-filled, a
    # would join, but the loop runs the plan it was admitted on, c alone to its end.
    c.remaining = 1
    assert pick([a, c], "edf", 8, cost, now=4.0) == [c, a]
    assert planner.current([a, c]) == [c] and planner.pick([a, c], "edf", 8, cost, now=4.0) == [c]
    planner.replan()  # a request admitted: a new plan
    assert planner.pick([a, c], "edf", 8, cost, now=4.0) == [c, a]
    c.remaining = 0  # done: the next pick fills anew
    assert planner.current([a]) is None and planner.pick([a], "edf", 8, cost, now=5.5) == [a]


def test_the_replayed_plan_reads_each_requests_passes_left_at_that_point() -> None:
    cost = CostModel({(0, 1): 1.0, (0, 2): 1.5, (0, 4): 1.5})
    e, a, c = S("x", 1, 0, 2, 1), S("x", 1, 1, 5, 4), S("x", 1, 2, 3.5, 3)
    # c shares e's one pass (to 1.5), a does not (beside it c would end at 4.5). Then c has 2
    # passes left: alone they end at 3.5, in time, beside a at 4.5: a waits for c again. (Read at
    # c's 3 passes of the start, c would look late alone too, and a would join and make it so.)
    times = dict((s.arrival, t) for s, t in finish_times([e, a, c], cost, "edf", 8))
    assert times == {0: 1.5, 2: 3.5, 1: 7.5}


def test_after_a_refusal_the_loop_fills_its_batches_greedily_for_a_while() -> None:
    cost = CostModel({(0, 1): 1.0, (0, 2): 1.5, (0, 4): 1.5})
    c = S("x", 1, 0, 3.5, 3)  # alone it ends at 3 (at 3.5 from t = 0.5), beside another at 5
    a = S("x", 1, 0.5, 12.0, 4)
    patient = Planner()
    assert patient.admit(c, [], cost, "edf", 8, 0.0) == (3.0, None)
    assert patient.admit(a, [c], cost, "edf", 8, 0.5)[1] is None  # with room, a waits for c
    assert patient.pick([c, a], "edf", 8, cost, 0.5) == [c] and patient.patient
    greedy = Planner()
    greedy.admit(c, [], cost, "edf", 8, 0.0)
    # 3 passes due at 2: it cannot make it; refused, the loop fills greedily for 3 x 2 s, and a,
    # which would now share c's passes and make it late, is refused too.
    assert "cannot be met" in str(greedy.admit(S("y", 1, 0, 2.0, 3), [c], cost, "edf", 8, 0.0)[1])
    assert not greedy.patient
    assert "would make a request in flight miss" in str(greedy.admit(a, [c], cost, "edf", 8, 0.5)[1])
    # Each refusal holds it greedy for 3 of its deadlines: a's (11.5 s) to 0.5 + 34.5; past that,
    # with no refusal since, it fills patiently again.
    assert greedy.admit(S("z", 1, 34.0, 40.0, 1), [c], cost, "edf", 8, 34.0)[1] is None and not greedy.patient
    assert greedy.admit(S("z", 1, 35.5, 40.0, 1), [c], cost, "edf", 8, 35.5)[1] is None and greedy.patient
