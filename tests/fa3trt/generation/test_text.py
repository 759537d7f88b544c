"""Prompts through the app's text encoders, against diffusers' FluxPipeline encoding the same
prompt with the same encoders and tokenizers (and a negative prompt under true CFG), batched with
a request that sent its embeddings; encoders that do not fit the transformer refused at start;
the prompt fields checked."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fa3trt.errors import ConfigError, InvalidInputError
from fa3trt.generation import FluxFamily, GenerationArgs, StepEngine, parse_request
from fa3trt.generation.text import PromptEncoder, text_configs
from fa3trt.serving import load_backend
from tests.models import (
    CLIP_CONFIG,
    FLUX_GEN_CONFIG,
    T5_CONFIG,
    flux_pipeline_latents,
    tiny_flux_gen,
    tiny_text_encoders,
)

pytest.importorskip("transformers")
TOKENIZERS = str(Path(__file__).resolve().parents[3] / "examples/tokenizers")
TEXT = {
    "clip": {"class": "CLIPTextModel", "config": CLIP_CONFIG, "tokenizer": f"{TOKENIZERS}/clip"},
    "t5": {"class": "T5EncoderModel", "config": T5_CONFIG, "tokenizer": f"{TOKENIZERS}/t5"},
}
ARGS: dict[str, Any] = {
    "transformer": {"config": FLUX_GEN_CONFIG},
    "text_encoders": TEXT,
    "buckets": [16, 64],
    "max_text_tokens": 24,
}


def test_prompts_are_the_pipelines_batched_with_embeddings() -> None:
    args = GenerationArgs.model_validate(ARGS)
    family = FluxFamily(args)
    limits = family.limits()
    assert limits.prompts
    encoder = PromptEncoder(args)
    eng = StepEngine(family, load_backend("torch", family.spec()), args.bucket_set(), 4)
    rng = np.random.default_rng(0)
    reqs: list[dict[str, Any]] = [
        {"prompt": "a photo of a cat", "height": 64, "width": 64, "steps": 4, "seed": 1},
        {"prompt": "a red house", "negative_prompt": "a blue sky", "true_cfg_scale": 3.0, "height": 64, "width": 64}
        | {"steps": 3, "seed": 2},
        {  # embeddings of the padded length: it shares the prompts' passes
            "prompt_embeds": rng.standard_normal((24, 32)).astype(np.float32),
            "pooled_prompt_embeds": rng.standard_normal(32).astype(np.float32),
            "height": 64,
            "width": 64,
            "steps": 4,
            "seed": 3,
        },
    ]
    gens = []
    for r in reqs:
        req = parse_request(r, limits)
        if req.needs_encoding:
            with pytest.raises(ValueError, match="needs its embeddings first"):
                eng.new(req)
            neg = encoder.encode([req.negative_prompt])[0] if req.negative_prompt else None
            req = req.encoded(encoder.encode([req.prompt])[0], neg)
        gens.append(eng.new(req))
        eng.admit(gens[-1])
    while len(eng):
        eng.step(eng.pick())
    assert eng.passes == 4  # one shape: every pass holds every request still going
    text = tiny_text_encoders(TOKENIZERS, 24)
    transformer = tiny_flux_gen()
    for g, r in zip(gens, reqs):
        want = flux_pipeline_latents(transformer, r, text=text)
        np.testing.assert_allclose(g.latents[0].numpy(), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"clip": TEXT["clip"] | {"config": CLIP_CONFIG | {"hidden_size": 16}}},
            "hidden_size 16 is not the transformer's pooled_projection_dim 32",
        ),
        (
            {"t5": TEXT["t5"] | {"config": T5_CONFIG | {"d_model": 64}}},
            "d_model 64 is not the transformer's joint_attention_dim 32",
        ),
        (
            {"t5": TEXT["t5"] | {"tokenizer": "/nonexistent-tok"}},
            "text_encoders.t5.tokenizer: /nonexistent-tok is not a folder",
        ),
        (
            {"clip": {"class": "CLIPTextModel", "path": "/nonexistent-clip", "tokenizer": "x"}},
            "/nonexistent-clip/config.json is not a readable",
        ),
        ({"clip_2": TEXT["clip"]}, "text_encoders.clip_2: FLUX has one CLIP; remove clip_2"),
    ],
)
def test_encoders_that_do_not_fit_are_refused_naming_the_fix(change: dict[str, Any], message: str) -> None:
    args = GenerationArgs.model_validate(ARGS | {"text_encoders": TEXT | change})
    with pytest.raises(ConfigError, match=message):
        text_configs(args, FluxFamily(args))


@pytest.mark.parametrize(
    ("fields", "text", "message"),
    [
        ({"prompt": "a cat"}, False, "prompt needs a text encoder.*send prompt_embeds and pooled_prompt_embeds"),
        ({"prompt": "a cat", "prompt_embeds": np.zeros((4, 32))}, True, "send prompt or prompt_embeds, not both"),
        ({"negative_prompt": "a dog"}, True, "negative_prompt needs prompt"),
        ({"prompt": "  "}, True, "prompt must be a non-empty string"),
        ({"prompt": 7}, True, "prompt must be a non-empty string, got 7"),
        ({"prompt": "x" * 9000}, True, "prompt has 9000 characters; send at most 8192"),
        ({}, True, "prompt_embeds is missing; send prompt, or prompt_embeds and pooled_prompt_embeds"),
    ],
)
def test_prompt_fields_are_checked(fields: dict[str, Any], text: bool, message: str) -> None:
    args = GenerationArgs.model_validate(ARGS if text else {k: v for k, v in ARGS.items() if k != "text_encoders"})
    with pytest.raises(InvalidInputError, match=message):
        parse_request(fields | {"height": 64, "width": 64}, FluxFamily(args).limits())


def test_shares_of_a_gpu_must_leave_the_transformer_room() -> None:
    with pytest.raises(ValueError, match="leaves the transformer under 0.1 of its GPU"):
        GenerationArgs.model_validate(
            ARGS | {"text_encoders": TEXT | {"gpu_share": 0.5}, "vae": {"config": {}, "gpu_share": 0.45}}
        )
