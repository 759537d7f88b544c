"""A generation decoded to a PNG, against diffusers' FluxPipeline decoding the same request with
the same VAE (``output_type="pil"``), and VAEs that do not fit the transformer refused at start."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fa3trt.errors import ConfigError
from fa3trt.generation import FluxFamily, GenerationArgs, StepEngine, parse_request
from fa3trt.generation.vae import Decoder, vae_config
from fa3trt.serving import load_backend
from tests.models import FLUX_GEN_CONFIG, FLUX_GEN_VAE_CONFIG, flux_pipeline_latents, tiny_flux_gen, tiny_vae

PIL = pytest.importorskip("PIL.Image")

ARGS: dict[str, Any] = {
    "transformer": {"config": FLUX_GEN_CONFIG},
    "vae": {"config": FLUX_GEN_VAE_CONFIG},
    "buckets": [16, 64],
    "max_text_tokens": 16,
}


def test_the_png_is_the_pipelines_image() -> None:
    args = GenerationArgs.model_validate(ARGS)
    family = FluxFamily(args)
    assert family.limits().outputs == ("latents", "png")
    eng = StepEngine(family, load_backend("torch", family.spec()), args.bucket_set(), 4)
    rng = np.random.default_rng(0)
    reqs = [
        {
            "prompt_embeds": rng.standard_normal((8, 32)).astype(np.float32),
            "pooled_prompt_embeds": rng.standard_normal(32).astype(np.float32),
            "height": h,
            "width": w,
            "steps": 4,
            "seed": seed,
            "output": "png",
        }
        for h, w, seed in ((64, 128, 1), (64, 128, 2))
    ]
    gens = [eng.new(parse_request(r, family.limits())) for r in reqs]
    for g in gens:
        eng.admit(g)
    while len(eng):
        eng.step(eng.pick())
    decoder = Decoder(args, family)
    pngs = decoder.decode_many([g.latents[0].numpy() for g in gens], 64, 128)
    assert decoder.decode(gens[1].latents[0].numpy(), 64, 128) == pngs[1]
    transformer, vae = tiny_flux_gen(), tiny_vae()
    for png, r in zip(pngs, reqs):
        got = np.asarray(PIL.open(io.BytesIO(png)))
        want = flux_pipeline_latents(transformer, r, vae=vae)
        assert got.shape == want.shape == (64, 128, 3) and got.dtype == np.uint8
        assert np.abs(got.astype(int) - want).max() <= 1  # float32 rounding at a level's edge at most


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"vae_scale_factor": 16},
            "vae_scale_factor = 16 but the vae scales by 8 \\(4 blocks\\); set vae_scale_factor: 8",
        ),
        (
            {"vae": {"config": FLUX_GEN_VAE_CONFIG | {"latent_channels": 4}}},
            "latent_channels = 4, but the transformer.s latents have 2 channels",
        ),
        ({"vae": {"path": "/nonexistent-vae"}}, "vae.path: /nonexistent-vae/config.json is not a readable config.json"),
    ],
)
def test_a_vae_that_does_not_fit_is_refused_naming_the_fix(change: dict[str, Any], message: str) -> None:
    args = GenerationArgs.model_validate(ARGS | change)
    with pytest.raises(ConfigError, match=message):
        vae_config(args, FluxFamily(args).latent_channels)


def test_without_a_vae_png_is_refused(tmp_path: Path) -> None:
    args = GenerationArgs.model_validate({k: v for k, v in ARGS.items() if k != "vae"})
    with pytest.raises(ConfigError, match="has no vae"):
        Decoder(args, FluxFamily(args))
