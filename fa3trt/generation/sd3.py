"""SD3-style transformers (4-D latents, a patch size) in the denoising loop, step for step as
diffusers' ``StableDiffusion3Pipeline``.

Contract: ``SD3Family(args)`` (a ``fa3trt.generation.family.Family``) reads the transformer's
config and gives
- ``spec()``: the transformer as a served model source: latents ``hidden_states`` (C, H, W) with
  H and W multiples of the patch size, ``encoder_hidden_states`` (T, D), ``pooled_projections``
  (P,), ``timestep`` () as the scheduler gives it (float32), bucketed along H (one bucket up to
  the largest side a request may have), batched by shape;
- ``start(request, device, dtype)``: its initial latents (its ``latents`` (C, H/8, W/8), or drawn
  from its own ``seed`` on the CPU as the pipeline draws them), its rows (under classifier-free
  guidance, ``guidance_scale`` > 1 as in the pipeline, the negative prompt first, then the
  prompt), and its own scheduler set to its steps (with the token count's shift where the
  scheduler shifts dynamically, as the pipeline does);
- ``inputs(states)``, ``noise(out, states)`` (``uncond + scale * (text - uncond)``), and
  ``image_latents`` (the latents as they are: the VAE takes them unpacked).
A request under guidance carries its negative prompt (or its embeddings; with text encoders an
empty negative prompt is encoded where it sends none, as the pipeline does). Each side of an image may be up to twice the side of the
largest bucket's square, within the model's ``pos_embed_max_size``.
"""

from __future__ import annotations

import importlib
import math
from typing import Any

import torch

from fa3trt.buckets import Buckets
from fa3trt.errors import ConfigError
from fa3trt.generation.config import GenerationArgs
from fa3trt.generation.family import Family, Start, config_width, noise_from_seed, on_device, schedule
from fa3trt.generation.flux import scheduler_shift
from fa3trt.generation.requests import GenerateRequest
from fa3trt.models.spec import SourceSpec

__all__ = ["SD3Family", "SD3_SCHEDULER"]

SD3_SCHEDULER: dict[str, Any] = {"shift": 3.0}
"""Stable Diffusion 3's flow-matching Euler scheduler config (its default here)."""


class SD3Family(Family):
    """The SD3 adapter (see the module docstring)."""

    name = "sd3"
    default_scheduler = SD3_SCHEDULER
    default_guidance = 7.0  # StableDiffusion3Pipeline's
    spatial = True
    guidance_negative = True

    def __init__(self, args: GenerationArgs) -> None:
        super().__init__(args)
        cfg = self.config
        self.patch = int(cfg.get("patch_size", 2))
        self.channels = int(cfg.get("in_channels", 16))
        out = cfg.get("out_channels") or self.channels
        if out != self.channels:
            raise ConfigError(
                f"transformer.config.out_channels = {out} is not in_channels ({self.channels}): the loop feeds the "
                "model's output back as its latents"
            )
        self.latent_channels = self.channels
        self.text_dim = int(cfg.get("joint_attention_dim", 4096))
        self.pooled_dim = int(cfg.get("pooled_projection_dim", 2048))
        self.pixel_step = args.vae_scale_factor * self.patch
        side = math.isqrt(args.bucket_set().max_len)
        self.max_rows = 2 * side * self.patch  # latent rows (or columns) of the widest image
        limit = cfg.get("pos_embed_max_size")
        if limit is not None:  # the model's position embedding covers latents up to this on a side
            if side * self.patch > int(limit):
                raise ConfigError(
                    f"buckets: the largest, {args.bucket_set().max_len} image tokens, is a square of {side * self.patch} "
                    f"latents on a side, past the transformer's pos_embed_max_size ({limit}); lower the largest bucket"
                )
            self.max_rows = min(self.max_rows, int(limit) // self.patch * self.patch)
        self.max_side = self.max_rows * args.vae_scale_factor

    def buckets(self) -> Buckets:
        """One bucket along H up to the widest image's latent rows (the engine's buckets stay by tokens)."""
        return Buckets((self.max_rows,))

    def spec(self) -> SourceSpec:
        inputs: dict[str, Any] = {
            "hidden_states": {"axes": [self.channels, "H", "W"]},
            "encoder_hidden_states": {"axes": ["T", self.text_dim]},
            "pooled_projections": {"axes": [self.pooled_dim]},
            "timestep": {"axes": [], "dtype": "float32"},
        }
        ranges = {
            "H": [self.patch, self.max_rows],
            "W": [self.patch, self.max_rows],
            "T": [1, self.args.max_text_tokens],
        }
        return self._spec(inputs, [self.channels, "H", "W"], "H", ranges)

    def start(self, req: GenerateRequest, device: torch.device, dtype: torch.dtype) -> Start:
        vsf = self.args.vae_scale_factor
        shape = (1, self.channels, req.height // vsf, req.width // vsf)
        if req.latents is not None:
            latents = on_device(torch.from_numpy(req.latents)[None], device, dtype)
        else:
            latents = on_device(noise_from_seed(shape, req.seed, dtype), device)
        cfg = req.guidance_scale > 1.0  # parse_request made sure it has its negative rows
        embeds, pooled = self._rows(req, cfg, negative_first=True, device=device, dtype=dtype)
        scheduler = self.scheduler()
        config = scheduler.config
        kwargs: dict[str, Any] = {}
        if config.get("use_dynamic_shifting", None):
            kwargs["mu"] = scheduler_shift(config, self.tokens(req.height, req.width), max_shift=1.16)
        timesteps = schedule(scheduler, device, num_inference_steps=req.steps, **kwargs)
        return Start(latents, embeds, pooled, 0.0, req.guidance_scale if cfg else 1.0, scheduler, timesteps)

    def inputs(self, states: list[Any]) -> dict[str, torch.Tensor]:
        """One pass over ``states`` (each at its own step; equal image and text sizes)."""
        hidden, timestep, embeds, pooled = [], [], [], []
        for s in states:
            hidden.append(s.latents.expand(s.rows, *s.latents.shape[1:]))
            timestep.append(s.timesteps[s.step].float().reshape(1).expand(s.rows))
            embeds.append(s.embeds)
            pooled.append(s.pooled)
        return {
            "hidden_states": torch.cat(hidden),
            "encoder_hidden_states": torch.cat(embeds),
            "pooled_projections": torch.cat(pooled),
            "timestep": torch.cat(timestep),
        }

    def noise(self, out: torch.Tensor, states: list[Any]) -> list[torch.Tensor]:
        """Each state's model output (1, C, H, W) from one pass's ``out`` (rows in ``inputs``' order)."""
        noises, r = [], 0
        for s in states:
            if s.rows == 2:  # classifier-free guidance, as the pipeline combines it
                uncond, text = out[r : r + 1], out[r + 1 : r + 2]
                noises.append(uncond + s.cfg_scale * (text - uncond))
            else:
                noises.append(out[r : r + 1])
            r += s.rows
        return noises

    def image_latents(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return latents

    def negative_text(self, req: GenerateRequest) -> str | None:
        return (req.negative_prompt or "") if req.guidance_scale > 1.0 else None

    def check_text_encoders(self, configs: dict[str, dict[str, Any]]) -> None:
        if "clip_2" not in configs:
            raise ConfigError("text_encoders.clip_2: SD3 encodes with two CLIPs; add clip_2 (CLIP-G, text_encoder_2/)")
        projections = [config_width(configs[n], "projection_dim") or 512 for n in ("clip", "clip_2")]
        if sum(projections) != self.pooled_dim:
            raise ConfigError(
                f"text_encoders: clip's and clip_2's projection_dim ({projections[0]} + {projections[1]}) are not "
                f"the transformer's pooled_projection_dim {self.pooled_dim}"
            )
        t5 = configs["t5"].get("d_model")
        if t5 != self.text_dim:
            raise ConfigError(
                f"text_encoders.t5: d_model {t5} is not the transformer's joint_attention_dim {self.text_dim}"
            )
        widths = [config_width(configs[n]) for n in ("clip", "clip_2")]
        if sum(widths) > t5:
            raise ConfigError(
                f"text_encoders: clip's and clip_2's hidden_size ({widths[0]} + {widths[1]}) are wider than t5's "
                f"d_model {t5}"
            )

    def text_pipeline(self, parts: dict[str, tuple[Any, Any]], max_tokens: int) -> Any:
        diffusers = importlib.import_module("diffusers")
        pipe = diffusers.StableDiffusion3Pipeline(
            transformer=None,
            scheduler=None,
            vae=None,
            text_encoder=parts["clip"][0],
            tokenizer=parts["clip"][1],
            text_encoder_2=parts["clip_2"][0],
            tokenizer_2=parts["clip_2"][1],
            text_encoder_3=parts["t5"][0],
            tokenizer_3=parts["t5"][1],
        )
        if max_tokens - int(pipe.tokenizer_max_length) < 1:
            raise ConfigError(
                f"max_text_tokens = {max_tokens} leaves T5 no tokens after the CLIPs' {pipe.tokenizer_max_length}; "
                "raise it (SD3: 77 + 256 = 333)"
            )
        return pipe

    def encode_prompts(
        self, pipe: Any, prompts: list[str], device: torch.device, max_tokens: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # The CLIPs' tokens first, then T5's: T5 gets what the CLIPs leave of max_tokens.
        t5_tokens = max_tokens - int(pipe.tokenizer_max_length)
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompts, None, None, device=device, do_classifier_free_guidance=False, max_sequence_length=t5_tokens
        )
        return embeds, pooled
