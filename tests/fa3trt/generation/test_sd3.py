"""SD3-style transformers in the loop (4-D latents, patch size 2, classifier-free guidance by
``guidance_scale``), against diffusers' ``StableDiffusion3Pipeline`` run alone on the eager
unrouted transformer: a request's latents are the pipeline's whatever it is batched with (other
steps, other sizes, guided and unguided requests), its PNG is the pipeline's image, and what the
family cannot take is refused naming the field. Tiny SD3 on the CPU, torch backend, no mocks."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest

from fa3trt.errors import ConfigError, InvalidInputError
from fa3trt.generation import GenerationArgs, StepEngine, family_for, parse_request
from fa3trt.generation.sd3 import SD3Family
from fa3trt.generation.text import PromptEncoder, text_configs
from fa3trt.generation.vae import Decoder
from fa3trt.serving import load_backend
from tests.deploy.cluster import ROOT
from tests.models import (
    SD3_CLIP_2_CONFIG,
    SD3_CLIP_CONFIG,
    SD3_GEN_CONFIG,
    SD3_VAE_CONFIG,
    T5_CONFIG,
    sd3_fields,
    sd3_pipeline_latents,
    tiny_sd3_text_encoders,
    tiny_sd3_vae,
)

pytest.importorskip("diffusers")

ATOL = 1e-5
ARGS: dict[str, Any] = {
    "transformer": {"class": "SD3Transformer2DModel", "config": SD3_GEN_CONFIG},
    "buckets": [16, 64],
    "max_text_tokens": 16,
}


fields = sd3_fields


@pytest.fixture(scope="module")
def family() -> SD3Family:
    family = family_for(GenerationArgs.model_validate(ARGS))
    assert isinstance(family, SD3Family)
    return family


@pytest.fixture(scope="module")
def backend(family: SD3Family) -> Any:
    return load_backend("torch", family.spec(), buckets=family.buckets())


def run(family: SD3Family, backend: Any, reqs: list[dict[str, Any]], late: int = 1) -> tuple[list[Any], StepEngine]:
    """``reqs`` through one engine: the first ``late`` alone for a step, then all of them."""
    eng = StepEngine(family, backend, family.args.bucket_set(), 6)
    gens = [eng.new(parse_request(r, family.limits())) for r in reqs]
    for g in gens[:late]:
        eng.admit(g)
    eng.step(eng.pick())
    for g in gens[late:]:
        eng.admit(g)
    while len(eng):
        eng.step(eng.pick())
    assert all(g.done for g in gens)
    return gens, eng


def test_each_request_is_the_pipelines_answer_batched_with_others(family: SD3Family, backend: Any) -> None:
    reqs = [
        fields(64, 64, 4, 1),
        fields(64, 64, 6, 2),  # joins the first at its step 1
        fields(64, 64, 5, 3, guided=False),  # one row a step, beside guided ones
        fields(32, 96, 5, 4),  # another size: its own passes
        fields(64, 64, 3, 5, guidance_scale=4.5),
    ]
    gens, eng = run(family, backend, reqs)
    for g, r in zip(gens, reqs):
        assert g.latents.shape == (1, 4, r["height"] // 8, r["width"] // 8)
        np.testing.assert_allclose(g.latents[0].numpy(), sd3_pipeline_latents(r), atol=ATOL, rtol=0)
    # Batched: fewer passes than steps; a guided request is two rows a step, an unguided one one.
    assert eng.passes < sum(r["steps"] for r in reqs)
    assert eng.rows_run == 2 * sum(r["steps"] for r in reqs) - reqs[2]["steps"]


def test_given_latents_replace_the_seeds_noise(family: SD3Family, backend: Any) -> None:
    r = fields(32, 64, 3, 0, latents=np.random.default_rng(9).standard_normal((4, 4, 8)).astype(np.float32))
    (g,), _ = run(family, backend, [r])
    np.testing.assert_allclose(g.latents[0].numpy(), sd3_pipeline_latents(r), atol=ATOL, rtol=0)


def test_the_png_is_the_pipelines_image() -> None:
    pil = pytest.importorskip("PIL.Image")
    args = GenerationArgs.model_validate(ARGS | {"vae": {"config": SD3_VAE_CONFIG}})
    family = family_for(args)
    assert family.limits().outputs == ("latents", "png")
    r = fields(32, 64, 3, 7, output="png")
    (g,), _ = run(family, load_backend("torch", family.spec(), buckets=family.buckets()), [r])  # type: ignore[arg-type]
    png = Decoder(args, family).decode(g.latents[0].numpy(), 32, 64)
    got = np.asarray(pil.open(io.BytesIO(png)))
    want = sd3_pipeline_latents(r, vae=tiny_sd3_vae())
    assert got.shape == want.shape == (32, 64, 3)
    assert np.abs(got.astype(int) - want).max() <= 1  # float32 rounding at a level's edge at most


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"negative_prompt_embeds": None},
            "guidance_scale = 7 guides with a negative prompt: send negative_prompt_embeds",
        ),
        ({"true_cfg_scale": 2.0}, "true_cfg_scale: this model guides by guidance_scale"),
        ({"height": 40}, "height = 40 is not a multiple of 16"),
        ({"width": 272}, "width = 272 is past the longest side this app takes \\(256\\)"),
        (
            {"latents": np.zeros((12, 4), np.float32)},
            "latents has shape \\(12, 4\\); .* makes latents of shape \\(4, 4, 8\\)",
        ),
    ],
)
def test_what_the_family_cannot_take_is_refused_naming_the_field(
    family: SD3Family, change: dict[str, Any], message: str
) -> None:
    r = fields(32, 64, 3, 0) | change
    r = {k: v for k, v in r.items() if v is not None}
    if "negative_prompt_embeds" not in r:
        r.pop("negative_pooled_prompt_embeds")
    with pytest.raises(InvalidInputError, match=message):
        parse_request(r, family.limits())


def test_the_family_defaults_and_what_it_refuses_at_start(family: SD3Family) -> None:
    assert family.limits().default_guidance == 7.0 and family.scheduler().config.shift == 3.0
    assert not family.scheduler().config.use_dynamic_shifting
    spec = family.spec()
    assert spec.bucketed_axis == "H" and family.buckets().edges == (32,)
    with pytest.raises(ConfigError, match="out_channels = 8 is not in_channels"):
        family_for(
            GenerationArgs.model_validate(
                ARGS
                | {"transformer": {"class": "SD3Transformer2DModel", "config": SD3_GEN_CONFIG | {"out_channels": 8}}}
            )
        )


TOKENIZERS = str(ROOT / "examples/tokenizers")
TEXT = {
    "clip": {"class": "CLIPTextModelWithProjection", "config": SD3_CLIP_CONFIG, "tokenizer": f"{TOKENIZERS}/clip"},
    "clip_2": {"class": "CLIPTextModelWithProjection", "config": SD3_CLIP_2_CONFIG, "tokenizer": f"{TOKENIZERS}/clip"},
    "t5": {"class": "T5EncoderModel", "config": T5_CONFIG, "tokenizer": f"{TOKENIZERS}/t5"},
}


def test_prompts_are_encoded_and_generated_as_the_pipeline_does() -> None:
    pytest.importorskip("transformers")
    args = GenerationArgs.model_validate(ARGS | {"text_encoders": TEXT, "max_text_tokens": 40})
    family = family_for(args)
    encoder = PromptEncoder(args)
    assert encoder.pipe.tokenizer_max_length == 16  # the tiny CLIP tokenizer's 16 tokens, then T5's 24
    eng = StepEngine(family, load_backend("torch", family.spec(), buckets=family.buckets()), args.bucket_set(), 6)
    reqs = [
        {"prompt": "a red house", "negative_prompt": "blurry", "height": 64, "width": 64, "steps": 3, "seed": 1},
        {"prompt": "a cat", "height": 64, "width": 64, "steps": 4, "seed": 2},  # guided by an empty negative
        {"prompt": "a dog", "height": 64, "width": 64, "steps": 3, "seed": 3, "guidance_scale": 1.0},  # one row
    ]
    gens = []
    for r in reqs:
        req = parse_request(r, family.limits())
        negative = family.negative_text(req)
        texts = [req.prompt] + ([negative] if negative is not None else [])
        encoded = encoder.encode(texts)
        gens.append(eng.new(req.encoded(encoded[0], encoded[1] if len(encoded) > 1 else None)))
        eng.admit(gens[-1])
    assert [g.rows for g in gens] == [2, 2, 1] and gens[0].embeds.shape[1] == 40
    while len(eng):
        eng.step(eng.pick())
    text = tiny_sd3_text_encoders(TOKENIZERS, 40 - 16)
    for g, r in zip(gens, reqs):
        np.testing.assert_allclose(g.latents[0].numpy(), sd3_pipeline_latents(r, text=text), atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"clip_2": None}, "SD3 encodes with two CLIPs; add clip_2"),
        (
            {"clip_2": TEXT["clip_2"] | {"config": SD3_CLIP_2_CONFIG | {"projection_dim": 20}}},
            "projection_dim \\(12 \\+ 20\\) are not the transformer's pooled_projection_dim 24",
        ),
        ({"t5": TEXT["t5"] | {"config": T5_CONFIG | {"d_model": 48}}}, "d_model 48 is not the transformer's"),
    ],
)
def test_text_encoders_that_do_not_fit_are_refused(change: dict[str, Any], message: str) -> None:
    args = GenerationArgs.model_validate(ARGS | {"text_encoders": {k: v for k, v in (TEXT | change).items() if v}})
    with pytest.raises(ConfigError, match=message):
        text_configs(args, family_for(args))
